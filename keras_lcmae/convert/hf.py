"""Hugging Face ``transformers`` ViT folders (``save_pretrained``) into
keras_lcmae, read without running code from them.

A folder holds ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` read with
``torch.load(weights_only=True)``). ``ViTMAEForPreTraining`` folders load
into :class:`~keras_lcmae.MAE` with the decoder (or the encoder alone);
``ViTModel``, ``ViTForImageClassification`` and ``ViTMAEModel`` folders
into :class:`~keras_lcmae.ViTEncoder` (pooler and classifier skipped).

Key mapping to the official layout (:func:`hf_to_official`): both the
``transformers`` 4 names that ``save_pretrained`` writes
(``encoder.layer.N.attention.attention.query``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``) and the 5.x module names
(``layers.N.attention.q_proj``, ``o_proj``, ``mlp.fc1``, ``mlp.fc2``); the
separate ``query``/``key``/``value`` projections are concatenated into the
fused ``qkv``. The architecture (heads, LayerNorm epsilon, whether ``qkv``
has a bias) comes from ``config.json``; ``hidden_act`` must be ``gelu``
(exact GELU, as ours).
"""

import json
import os
import re

import numpy as np

from keras_lcmae.convert.official import encoder_from_official_state_dict, mae_from_official_state_dict
from keras_lcmae.errors import ArgumentError

# (pattern of a block prefix, official prefix)
_BLOCKS = [
    (re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)$"), "blocks"),
    (re.compile(r"^decoder\.(?:decoder_layers|decoder_encoder\.layer)\.(\d+)\.(.+)$"), "decoder_blocks"),
]
# inside a block: HF name -> official name (None: part of the fused qkv)
_IN_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_PLAIN = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "decoder.decoder_embed.weight": "decoder_embed.weight",
    "decoder.decoder_embed.bias": "decoder_embed.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    "decoder.decoder_norm.weight": "decoder_norm.weight",
    "decoder.decoder_norm.bias": "decoder_norm.bias",
    "decoder.decoder_pred.weight": "decoder_pred.weight",
    "decoder.decoder_pred.bias": "decoder_pred.bias",
}
_SKIPPED = re.compile(r"^(?:vit\.)?(?:pooler\.|classifier\.)|^classifier\.")


def hf_to_official(state_dict):
    """A ``transformers`` ViT / ViTMAE state dict (numpy arrays) in the
    official MAE key layout. Pooler and classifier weights are dropped; a key
    it cannot place raises an :class:`~keras_lcmae.errors.ArgumentError`
    listing them."""
    out, qkv, unplaced = {}, {}, []
    for key, value in state_dict.items():
        if _SKIPPED.match(key):
            continue
        plain = key[4:] if key.startswith("vit.") else key
        if plain in _PLAIN:
            out[_PLAIN[plain]] = value
            continue
        for pattern, prefix in _BLOCKS:
            m = pattern.match(key)
            if not m:
                continue
            index, rest = m.groups()
            name, _, kind = rest.rpartition(".")
            if name in _QKV:
                qkv.setdefault((prefix, index, kind), {})[_QKV[name]] = (key, value)
            elif name in _IN_BLOCK:
                out[f"{prefix}.{index}.{_IN_BLOCK[name]}.{kind}"] = value
            else:
                unplaced.append(key)
            break
        else:
            unplaced.append(key)
    for (prefix, index, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:  # a projection without the other two
            unplaced.extend(key for key, _ in parts.values())
            continue
        out[f"{prefix}.{index}.attn.qkv.{kind}"] = np.concatenate([parts[p][1] for p in "qkv"], 0)
    if unplaced:
        raise ArgumentError("path", f"keys of no known ViT/ViTMAE layout: {sorted(unplaced)[:20]}")
    return out


def is_hf_folder(path):
    """Whether ``path`` is a folder with a ``config.json``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def read_hf_folder(path):
    """``(config dict, state dict of float32 numpy arrays)`` of a
    ``save_pretrained`` folder, with the weights in ``transformers``' names."""
    from keras_lcmae.convert.files import read_state_dict

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_state_dict(os.path.join(path, shard)))
        return config, state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return config, read_state_dict(os.path.join(path, name))
    raise ArgumentError("path", f"{path!r} has a config.json but no model.safetensors or pytorch_model.bin.")


def load_hf_folder(path, encoder_only=False, **mae_kwargs):
    """An :class:`~keras_lcmae.MAE` (ViTMAE pretraining folders) or a
    :class:`~keras_lcmae.ViTEncoder` from a ``transformers`` folder. MAE's
    ``mask_ratio`` and ``norm_pix_loss`` default to the folder's config."""
    config, state = read_hf_folder(path)
    model_type = config.get("model_type")
    if model_type not in ("vit", "vit_mae"):
        raise ArgumentError("path", f"{path!r} holds a {model_type!r} model; ViT and ViTMAE folders load.")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ArgumentError(
            "path", f"hidden_act={config['hidden_act']!r}: the encoder's MLP uses exact GELU ('gelu') only."
        )
    state = hf_to_official(state)
    heads = int(config["num_attention_heads"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    if encoder_only or "decoder_embed.weight" not in state:
        return encoder_from_official_state_dict(state, heads, layer_norm_epsilon=eps)
    mae_kwargs.setdefault("mask_ratio", config.get("mask_ratio", 0.75))
    mae_kwargs.setdefault("norm_pix_loss", bool(config.get("norm_pix_loss", False)))
    return mae_from_official_state_dict(
        state, heads, int(config["decoder_num_attention_heads"]), layer_norm_epsilon=eps, **mae_kwargs
    )
