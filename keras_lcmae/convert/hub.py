"""keras-hub's ``ViTBackbone`` <-> :class:`~keras_lcmae.ViTEncoder`.

:func:`to_keras_hub` gives a ``keras_hub.models.ViTBackbone`` with the
encoder's weights and outputs; :func:`from_keras_hub` gives a ``ViTEncoder``
from a backbone (e.g. one loaded with ``ViTBackbone.from_preset`` from a
folder written by ``save_to_preset``), so a keras-hub ViT becomes an MAE /
LC-MAE encoder, a classifier's encoder or a reference model for the analyses.
Both go through the official key layout (:mod:`keras_lcmae.convert.official`).

What does not carry over:

* drop path: keras-hub's ViT has none (``drop_path_rate`` is 0 after
  :func:`from_keras_hub`; :func:`to_keras_hub` drops it, inference is
  unchanged);
* the position table: keras-hub's is a learned ``Embedding``; ours may be the
  fixed sin-cos table. The values carry over both ways;
  :func:`from_keras_hub` makes the table trainable (``pos_embed_trainable``),
  as keras-hub trains it;
* ``final_norm=False`` encoders (official MAE's global-pool finetuning) and
  ``qkv_bias=False`` ones have no keras-hub counterpart (its ViT always ends
  in a LayerNorm and has biases on all attention projections or none), and
  neither do backbones without a class token or without biases.

keras-hub is an optional dependency: ``pip install keras_lcmae[hub]``.
"""

import json
import os

import numpy as np

from keras_lcmae.convert.official import encoder_from_official_state_dict, export_official_state_dict
from keras_lcmae.encoder import find_encoder
from keras_lcmae.errors import ArgumentError

# official block entry -> keras-hub sub-path, for LayerNorms and Dense layers
_NORMS = {"norm1": "ln_1", "norm2": "ln_2"}
_DENSE = {"mlp.fc1": "mlp/dense_1", "mlp.fc2": "mlp/dense_2"}


def _ends_with(path, suffix):
    return path == suffix or path.endswith("/" + suffix)


def _keras_hub():
    try:
        import keras_hub
    except ImportError:
        raise ImportError("keras-hub is needed here: pip install 'keras_lcmae[hub]' (or keras-hub).") from None
    return keras_hub


def _official_to_hub(state, depth, num_heads):
    """Official-layout arrays -> {keras-hub variable path suffix: array}."""
    d = state["cls_token"].shape[-1]
    hd = d // num_heads
    out = {
        "class_token": state["cls_token"],
        "patch_embedding/kernel": np.transpose(state["patch_embed.proj.weight"], (2, 3, 1, 0)),
        "patch_embedding/bias": state["patch_embed.proj.bias"],
        "position_embedding/embeddings": state["pos_embed"][0],
        "vit_encoder/ln/gamma": state["norm.weight"],
        "vit_encoder/ln/beta": state["norm.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}", f"transformer_block_{i + 1}"
        for ours, theirs in _NORMS.items():
            out[f"{dst}/{theirs}/gamma"] = state[f"{src}.{ours}.weight"]
            out[f"{dst}/{theirs}/beta"] = state[f"{src}.{ours}.bias"]
        for ours, theirs in _DENSE.items():
            out[f"{dst}/{theirs}/kernel"] = state[f"{src}.{ours}.weight"].T
            out[f"{dst}/{theirs}/bias"] = state[f"{src}.{ours}.bias"]
        qkv_w, qkv_b = state[f"{src}.attn.qkv.weight"], state[f"{src}.attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            out[f"{dst}/mha/{name}/kernel"] = qkv_w[j * d : (j + 1) * d].T.reshape(d, num_heads, hd)
            out[f"{dst}/mha/{name}/bias"] = qkv_b[j * d : (j + 1) * d].reshape(num_heads, hd)
        out[f"{dst}/mha/attention_output/kernel"] = state[f"{src}.attn.proj.weight"].T.reshape(num_heads, hd, d)
        out[f"{dst}/mha/attention_output/bias"] = state[f"{src}.attn.proj.bias"]
    return out


def _hub_to_official(weights, depth):
    """{keras-hub variable path: array} -> official-layout arrays."""

    def get(suffix):
        found = [v for path, v in weights.items() if _ends_with(path, suffix)]
        if len(found) != 1:
            raise ArgumentError("backbone", f"expected one weight ending in {suffix!r}, found {len(found)}.")
        return found[0]

    state = {
        "cls_token": get("class_token"),
        "patch_embed.proj.weight": np.transpose(get("patch_embedding/kernel"), (3, 2, 0, 1)),
        "patch_embed.proj.bias": get("patch_embedding/bias"),
        "pos_embed": get("position_embedding/embeddings")[None],
        "norm.weight": get("vit_encoder/ln/gamma"),
        "norm.bias": get("vit_encoder/ln/beta"),
    }
    for i in range(depth):
        dst, src = f"blocks.{i}", f"transformer_block_{i + 1}"
        for ours, theirs in _NORMS.items():
            state[f"{dst}.{ours}.weight"] = get(f"{src}/{theirs}/gamma")
            state[f"{dst}.{ours}.bias"] = get(f"{src}/{theirs}/beta")
        for ours, theirs in _DENSE.items():
            state[f"{dst}.{ours}.weight"] = get(f"{src}/{theirs}/kernel").T
            state[f"{dst}.{ours}.bias"] = get(f"{src}/{theirs}/bias")
        kernels = [get(f"{src}/mha/{n}/kernel") for n in ("query", "key", "value")]
        d = kernels[0].shape[0]
        state[f"{dst}.attn.qkv.weight"] = np.concatenate([k.reshape(d, -1).T for k in kernels], 0)
        state[f"{dst}.attn.qkv.bias"] = np.concatenate(
            [get(f"{src}/mha/{n}/bias").reshape(-1) for n in ("query", "key", "value")], 0
        )
        state[f"{dst}.attn.proj.weight"] = get(f"{src}/mha/attention_output/kernel").reshape(-1, d).T
        state[f"{dst}.attn.proj.bias"] = get(f"{src}/mha/attention_output/bias")
    return state


def to_keras_hub(encoder):
    """A ``keras_hub.models.ViTBackbone`` with the weights of ``encoder`` (a
    :class:`~keras_lcmae.ViTEncoder` or a model holding one as ``.encoder``)
    and the same outputs, ``(B, 1 + N, D)`` with ``[CLS]`` first."""
    keras_hub = _keras_hub()
    encoder = find_encoder(encoder, "to_keras_hub")
    if not encoder.final_norm:
        raise ArgumentError("encoder", "final_norm=False has no keras-hub counterpart (its ViT ends in a LayerNorm).")
    if not encoder.qkv_bias:
        raise ArgumentError("encoder", "qkv_bias=False has no keras-hub counterpart (attention biases on all or none).")
    h, w = encoder.image_size
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(h, w, encoder.num_channels),
        patch_size=encoder.patch_size,
        num_layers=encoder.depth,
        num_heads=encoder.num_heads,
        hidden_dim=encoder.hidden_dim,
        mlp_dim=int(encoder.mlp_ratio * encoder.hidden_dim),
        layer_norm_epsilon=encoder.layer_norm_epsilon,
    )
    values = _official_to_hub(export_official_state_dict(encoder), encoder.depth, encoder.num_heads)
    for variable in backbone.weights:
        matches = [k for k in values if _ends_with(variable.path, k)]
        if len(matches) != 1:
            raise ValueError(f"keras-hub weight {variable.path!r} matches {matches} of the converted weights.")
        value = values.pop(matches[0])
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{variable.path}: converted shape {value.shape}, keras-hub expects {variable.shape}.")
        variable.assign(value.astype(variable.dtype))
    if values:
        raise ValueError(f"converted weights keras-hub has no place for: {sorted(values)}")
    return backbone


def from_keras_hub(backbone, **encoder_kwargs):
    """A :class:`~keras_lcmae.ViTEncoder` with the weights of a keras-hub
    ``ViTBackbone`` and the same outputs. ``encoder_kwargs`` override the
    encoder arguments (e.g. ``drop_path_rate`` for finetuning)."""
    config = backbone.get_config()
    needed = {"use_class_token": True, "use_mha_bias": True, "use_mlp_bias": True, "use_patch_bias": True}
    off = [k for k, v in needed.items() if config.get(k, v) is not v]
    if off or type(backbone).__name__ != "ViTBackbone":
        raise ArgumentError(
            "backbone",
            f"a keras-hub ViTBackbone with class token and biases converts; got {type(backbone).__name__} {off}",
        )
    h, w, _ = config["image_shape"]
    if h is None or w is None:
        raise ArgumentError("backbone", f"image_shape {config['image_shape']} has no fixed size.")
    weights = {v.path: np.asarray(v.numpy(), np.float32) for v in backbone.weights}
    state = _hub_to_official(weights, int(config["num_layers"]))
    kwargs = dict(layer_norm_epsilon=float(config["layer_norm_epsilon"]), pos_embed_trainable=True)
    kwargs.update(encoder_kwargs)
    return encoder_from_official_state_dict(state, int(config["num_heads"]), **kwargs)


def is_keras_hub_preset(path):
    """Whether ``path`` is a folder written by keras-hub's ``save_to_preset``."""
    config = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(config)):
        return False
    with open(config) as f:
        try:
            return str(json.load(f).get("registered_name", "")).startswith("keras_hub>")
        except (ValueError, AttributeError):
            return False


def load_keras_hub_preset(path, **encoder_kwargs):
    """The ``ViTEncoder`` of a local keras-hub ViT preset folder (nothing is
    downloaded)."""
    backbone = _keras_hub().models.Backbone.from_preset(path)
    return from_keras_hub(backbone, **encoder_kwargs)
