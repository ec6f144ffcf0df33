"""Official MAE checkpoints <-> keras_lcmae weights.

A *state dict* here is a mapping from the official key names
(``patch_embed.proj.weight``, ``cls_token``, ``pos_embed``,
``blocks.0.attn.qkv.weight``, ..., ``decoder_pred.bias``) to arrays, the
layout of ``facebookresearch/mae``'s ``models_mae.py`` and of its finetuned
``models_vit.py`` checkpoints. Torch tensors are accepted too (anything
``numpy.asarray`` converts).

Layout rules:

* ``nn.Linear`` weights ``(out, in)`` are Keras kernels ``(in, out)``
  transposed;
* the patch-embedding convolution ``(D, C, p, p)`` is our linear patch kernel
  ``(p*p*C, D)``: transposed to ``(p, p, C, D)`` then flattened, matching the
  ``(row, col, channel)`` order of :func:`keras_lcmae.ops.patchify`;
* the fused ``qkv`` weight keeps its ``q | k | v`` thirds;
* position tables are loaded from the checkpoint (its own table wins).

Example:
>>> mae = MAE(ViTEncoder.from_preset("vit_test"),
...           TransformerDecoder(hidden_dim=32, depth=1, num_heads=2))
>>> state = export_official_state_dict(mae)   # or torch.load("mae_pretrain_vit_base.pth")["model"]
>>> state["patch_embed.proj.weight"].shape, state["blocks.0.attn.qkv.weight"].shape
((32, 3, 8, 8), (96, 32))
>>> copy = mae_from_official_state_dict(state, num_heads=2, decoder_num_heads=2)
>>> all(np.array_equal(v, state[k]) for k, v in export_official_state_dict(copy).items())
True
"""

import re

import numpy as np

from keras_lcmae.decoders import TransformerDecoder
from keras_lcmae.encoder import ViTEncoder, find_encoder
from keras_lcmae.models import MAE

# Keys of a full official checkpoint that an encoder-only target does not use.
_NOT_ENCODER = re.compile(r"^(decoder_|mask_token$|head\.|fc_norm\.)")


def _linear(prefix, dense):
    yield f"{prefix}.weight", dense.kernel, "linear"
    if dense.use_bias:
        yield f"{prefix}.bias", dense.bias, "plain"


def _norm(prefix, ln):
    yield f"{prefix}.weight", ln.gamma, "plain"
    yield f"{prefix}.bias", ln.beta, "plain"


def _block(prefix, block):
    yield from _norm(f"{prefix}.norm1", block.norm1)
    yield from _linear(f"{prefix}.attn.qkv", block.attn.qkv)
    yield from _linear(f"{prefix}.attn.proj", block.attn.proj)
    yield from _norm(f"{prefix}.norm2", block.norm2)
    yield from _linear(f"{prefix}.mlp.fc1", block.fc1)
    yield from _linear(f"{prefix}.mlp.fc2", block.fc2)


def _encoder_entries(encoder):
    yield "cls_token", encoder.cls_token, "plain"
    yield "pos_embed", encoder.pos_embed, "plain"
    yield "patch_embed.proj.weight", encoder.patch_embed.proj.kernel, "patch"
    yield "patch_embed.proj.bias", encoder.patch_embed.proj.bias, "plain"
    for i, block in enumerate(encoder.blocks):
        yield from _block(f"blocks.{i}", block)
    if encoder.norm is not None:
        yield from _norm("norm", encoder.norm)


def _decoder_entries(decoder):
    if not isinstance(decoder, TransformerDecoder):
        raise ValueError(
            f"Only the Transformer decoder has an official checkpoint layout, not {type(decoder).__name__}."
        )
    yield from _linear("decoder_embed", decoder.decoder_embed)
    yield "mask_token", decoder.mask_token, "plain"
    yield "decoder_pos_embed", decoder.decoder_pos_embed, "plain"
    for i, block in enumerate(decoder.blocks):
        yield from _block(f"decoder_blocks.{i}", block)
    yield from _norm("decoder_norm", decoder.decoder_norm)
    yield from _linear("decoder_pred", decoder.decoder_pred)


def official_entries(model):
    """``(official_key, keras_variable, kind)`` for every weight of an
    :class:`MAE` (encoder and decoder) or a :class:`ViTEncoder`."""
    if isinstance(model, ViTEncoder):
        return list(_encoder_entries(model))
    if isinstance(model, MAE):
        return list(_encoder_entries(model.encoder)) + list(_decoder_entries(model.decoder))
    raise ValueError(f"Expected an MAE model or a ViTEncoder, got {type(model).__name__}.")


def _to_official(value, kind, patch_size):
    if kind == "linear":
        return value.T
    if kind == "patch":
        d = value.shape[1]
        c = value.shape[0] // (patch_size * patch_size)
        return value.reshape(patch_size, patch_size, c, d).transpose(3, 2, 0, 1)
    return value


def _from_official(value, kind):
    if kind == "linear":
        return value.T
    if kind == "patch":
        d, c, ph, pw = value.shape
        return value.transpose(2, 3, 1, 0).reshape(ph * pw * c, d)
    return value


def _official_shape(variable, kind, patch_size):
    shape = tuple(variable.shape)
    if kind == "linear":
        return shape[::-1]
    if kind == "patch":
        return (shape[1], shape[0] // (patch_size * patch_size), patch_size, patch_size)
    return shape


def as_numpy(value):
    """A float32 numpy array from an array or a torch tensor (also bfloat16)."""
    if hasattr(value, "detach"):  # a torch tensor: bfloat16 has no numpy type
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def load_official_state_dict(model, state_dict, strict=True):
    """Loads an official-layout state dict into ``model`` in place.

    Args:
        model: an :class:`MAE` (needs encoder and decoder keys) or a
            :class:`ViTEncoder` (encoder keys; a checkpoint's ``decoder_*``,
            ``mask_token``, ``head.*`` and ``fc_norm.*`` entries are skipped and
            reported, so full pretraining and finetuned checkpoints load).
        state_dict: mapping from official key names to arrays.
        strict: raise on keys the model does not know (besides the skipped
            ones above). Missing and misshaped keys always raise.

    Returns:
        dict with ``loaded`` (keys loaded) and ``skipped`` (keys ignored).

    Raises:
        ValueError naming each missing, unexpected or misshaped key.
    """
    if not hasattr(state_dict, "keys"):
        raise ValueError(
            f"state_dict must be a mapping of official key names to arrays, got {type(state_dict).__name__}."
        )
    entries = official_entries(model)
    encoder = find_encoder(model, "load_official_state_dict")
    p = encoder.patch_size
    expected = {key for key, _, _ in entries}
    given = set(state_dict.keys())
    missing = sorted(expected - given)
    extra = sorted(given - expected)
    skipped = [k for k in extra if isinstance(model, ViTEncoder) and _NOT_ENCODER.match(k)]
    unexpected = [k for k in extra if k not in skipped]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected and strict:
        problems.append(f"unexpected keys {unexpected}")

    kw = state_dict.get("patch_embed.proj.weight")
    if kw is not None and len(np.shape(kw)) == 4 and np.shape(kw)[1] != encoder.num_channels:
        problems.insert(
            0,
            f"the checkpoint takes {np.shape(kw)[1]}-channel images (patch_embed.proj.weight "
            f"{tuple(np.shape(kw))}) but the model was built with num_channels={encoder.num_channels}",
        )
    values = {}
    for key, variable, kind in entries:
        if key not in state_dict:
            continue
        value = as_numpy(state_dict[key])
        want = _official_shape(variable, kind, p)
        if tuple(value.shape) != want:
            problems.append(f"{key}: checkpoint shape {tuple(value.shape)}, model expects {want}")
            continue
        values[key] = (variable, _from_official(value, kind))
    if problems:
        raise ValueError("The state dict does not fit the model: " + "; ".join(problems) + ".")
    for variable, value in values.values():
        variable.assign(value.astype(variable.dtype))
    return {"loaded": sorted(values), "skipped": skipped}


def export_official_state_dict(model):
    """The weights of an :class:`MAE` or :class:`ViTEncoder` as an official
    state dict (numpy float32 arrays keyed by the official names)."""
    p = find_encoder(model, "load_official_state_dict").patch_size
    return {
        key: _to_official(np.asarray(variable.numpy(), dtype=np.float32), kind, p)
        for key, variable, kind in official_entries(model)
    }


def _count(prefix, state_dict):
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    ids = {int(m.group(1)) for k in state_dict for m in [pattern.match(k)] if m}
    return max(ids) + 1 if ids else 0


def _require(state_dict, *keys):
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(f"The state dict lacks {missing}, needed to infer the architecture.")


def encoder_kwargs_from_state_dict(state_dict, num_heads):
    """ViTEncoder arguments read off the shapes of an official state dict."""
    _require(state_dict, "cls_token", "pos_embed", "patch_embed.proj.weight")
    d, c, p, p2 = np.shape(state_dict["patch_embed.proj.weight"])
    if p != p2:
        raise ValueError(f"patch_embed.proj.weight {np.shape(state_dict['patch_embed.proj.weight'])} is not square.")
    n = np.shape(state_dict["pos_embed"])[1] - 1
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid.")
    depth = _count("blocks", state_dict)
    if depth == 0:
        raise ValueError("The state dict has no 'blocks.N.*' keys.")
    mlp = np.shape(state_dict["blocks.0.mlp.fc1.weight"])[0] if "blocks.0.mlp.fc1.weight" in state_dict else 4 * d
    return dict(
        image_size=side * p,
        patch_size=p,
        num_channels=c,
        hidden_dim=d,
        depth=depth,
        num_heads=int(num_heads),
        mlp_ratio=mlp / d,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        final_norm="norm.weight" in state_dict,
    )


def encoder_from_official_state_dict(state_dict, num_heads, **encoder_kwargs):
    """Builds a :class:`ViTEncoder` shaped like the checkpoint and loads it.

    Works with pretraining checkpoints (the decoder is skipped) and finetuned
    ones (``head``/``fc_norm`` skipped; without ``norm.*`` the encoder has no
    final norm, as the official global-pool model).
    """
    kwargs = encoder_kwargs_from_state_dict(state_dict, num_heads)
    kwargs.update(encoder_kwargs)
    encoder = ViTEncoder(**kwargs)
    load_official_state_dict(encoder, state_dict)
    return encoder


def mae_from_official_state_dict(state_dict, num_heads, decoder_num_heads, layer_norm_epsilon=None, **mae_kwargs):
    """Builds an :class:`MAE` with the architecture read from the checkpoint's
    shapes (widths, depths, MLP ratios, patch size, channels, image size) and
    loads its weights. Head counts cannot be read off shapes, so they are
    arguments; so is the LayerNorm epsilon of encoder and decoder (``None``:
    official MAE's 1e-6). Extra keyword arguments go to :class:`MAE`
    (``mask_ratio``, ``norm_pix_loss``, ``seed``).
    """
    kwargs = encoder_kwargs_from_state_dict(state_dict, num_heads)
    eps = {} if layer_norm_epsilon is None else {"layer_norm_epsilon": float(layer_norm_epsilon)}
    kwargs.update(eps)
    _require(state_dict, "decoder_embed.weight", "decoder_pred.weight")
    width = np.shape(state_dict["decoder_embed.weight"])[0]
    depth = _count("decoder_blocks", state_dict)
    mlp = (
        np.shape(state_dict["decoder_blocks.0.mlp.fc1.weight"])[0]
        if "decoder_blocks.0.mlp.fc1.weight" in state_dict
        else 4 * width
    )
    out = np.shape(state_dict["decoder_pred.weight"])[0]
    patch_dim = kwargs["patch_size"] ** 2 * kwargs["num_channels"]
    if out != patch_dim:
        raise ValueError(
            f"decoder_pred predicts {out} values per token but one {kwargs['patch_size']}px patch of "
            f"{kwargs['num_channels']} channels has {patch_dim}: not an MAE checkpoint of this layout."
        )
    decoder = TransformerDecoder(width, depth, int(decoder_num_heads), mlp / width, **eps)
    model = MAE(ViTEncoder(**kwargs), decoder, **mae_kwargs)
    load_official_state_dict(model, state_dict)
    return model
