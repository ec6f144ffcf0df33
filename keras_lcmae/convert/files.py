"""Checkpoint files in and out, in the official MAE key layout (also timm's).

* :func:`read_state_dict`: ``.safetensors``, ``.pth``/``.pt``/``.bin`` and
  ``.npz`` files to a state dict of numpy arrays, never running code from the
  file (``safetensors``; ``torch.load(weights_only=True)`` with only
  ``argparse.Namespace``, the official scripts' ``args`` entry, allowed;
  ``numpy.load(allow_pickle=False)``);
* :func:`export`: a model's weights written in that layout, with the decoder
  when the model has one, so the official MAE code and timm load them;
* :func:`load_pretrained`: one entry point that reads any of those files (or a
  ``.keras`` file, in Keras' safe mode, a Hugging Face ViT/ViTMAE folder or a
  keras-hub ViT preset)
  into an :class:`~keras_lcmae.MAE` or a :class:`~keras_lcmae.ViTEncoder`.

Example:
>>> import os, tempfile
>>> from keras_lcmae import MAE, TransformerDecoder, ViTEncoder
>>> mae = MAE(ViTEncoder.from_preset("vit_test"), TransformerDecoder(hidden_dim=32, depth=1, num_heads=2))
>>> path = export(mae, os.path.join(tempfile.mkdtemp(), "mae.safetensors"))
>>> copy = load_pretrained(path, num_heads=2, decoder_num_heads=2)
>>> type(copy).__name__, copy.decoder.depth
('MAE', 1)
>>> type(load_pretrained(path, num_heads=2, encoder_only=True)).__name__
'ViTEncoder'
"""

import argparse
import os

import keras
import numpy as np

from keras_lcmae.classifier import rebuild_encoder
from keras_lcmae.convert.hf import is_hf_folder, load_hf_folder
from keras_lcmae.convert.hub import is_keras_hub_preset, load_keras_hub_preset
from keras_lcmae.convert.official import (
    encoder_from_official_state_dict,
    export_official_state_dict,
    mae_from_official_state_dict,
)
from keras_lcmae.encoder import find_encoder
from keras_lcmae.errors import ArgumentError
from keras_lcmae.ops import to_2tuple

# Encoder heads of the standard ViT sizes, by width (Ti, S, B, L, H): the one
# architecture argument a state dict's shapes cannot give.
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SUFFIXES = (".safetensors", *TORCH_SUFFIXES, ".npz")


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def read_state_dict(path):
    """The state dict in ``path`` as float32 numpy arrays keyed by name.

    A ``.pth`` holding ``{"model": ...}`` (official training checkpoints) or
    ``{"state_dict": ...}`` gives that entry. A pickle that needs anything
    but tensors, containers and ``argparse.Namespace`` is refused (it could
    run code), with an :class:`~keras_lcmae.errors.ArgumentError` about
    ``path``.
    """
    if not os.path.isfile(path):
        raise ArgumentError("path", f"no such file {path!r}.")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k], np.float32) for k in data.files}
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ArgumentError("path", f"reading {path!r} needs `pip install safetensors`.") from None
        try:
            return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
        except Exception as e:  # a damaged file, or a dtype numpy lacks (bfloat16)
            torch = _torch()
            if torch is None:
                raise ArgumentError("path", f"cannot read {path!r}: {str(e).splitlines()[0]}") from None
            from safetensors.torch import load_file as load_torch

            return {k: v.float().numpy() for k, v in load_torch(path).items()}
    if path.endswith(TORCH_SUFFIXES):
        torch = _torch()
        if torch is None:
            raise ArgumentError("path", f"reading {path!r} needs torch (pip install torch); or convert it to .npz.")
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds
            raise ArgumentError(
                "path",
                f"{path!r} could not be read as a weights-only checkpoint (it may contain code, which is "
                f"refused): {str(e).splitlines()[0]}",
            ) from None
        for key in ("model", "state_dict"):
            if isinstance(ckpt, dict) and hasattr(ckpt.get(key), "keys"):
                ckpt = ckpt[key]
                break
        if not hasattr(ckpt, "keys"):
            raise ArgumentError("path", f"{path!r} holds a {type(ckpt).__name__}, not a state dict.")
        return {k: v.detach().float().numpy() for k, v in ckpt.items() if hasattr(v, "detach")}
    raise ArgumentError("path", f"unknown checkpoint type {path!r}; expected one of {(*SUFFIXES, '.keras')}.")


def export(model, path):
    """Writes the weights of ``model`` (an :class:`~keras_lcmae.MAE`, a
    :class:`~keras_lcmae.ViTEncoder` or a model holding one as ``.encoder``)
    in the official key layout and returns ``path``:

    * ``.safetensors``: the flat state dict (what timm and Hugging Face
      read; float32, metadata ``format=pt``);
    * ``.pth``/``.pt``: ``{"model": state_dict}`` of torch tensors, as the
      official training scripts save (needs torch);
    * ``.npz``: the arrays.

    An MAE's file holds the decoder (``decoder_*``, ``mask_token``); an
    encoder's or a classifier's holds the encoder alone.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).endswith(SUFFIXES):
        raise ArgumentError("path", f"must end in one of {SUFFIXES}, got {path!r}.")
    path = os.fspath(path)
    if getattr(model, "decoder", None) is not None and hasattr(model, "mask_ratio"):
        state = export_official_state_dict(model)
    else:
        state = export_official_state_dict(find_encoder(model, "export"))
    state = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(state, path, metadata={"format": "pt"})
    elif path.endswith(TORCH_SUFFIXES):
        torch = _torch()
        if torch is None:
            raise ArgumentError("path", f"writing {path!r} needs torch; write .safetensors or .npz instead.")
        torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, path)
    else:
        np.savez(path, **state)
    return path


def load_pretrained(
    path, num_heads=None, decoder_num_heads=16, encoder_only=False, image_size=None, patch_size=None, **mae_kwargs
):
    """A model from a checkpoint file, its format told by the suffix.

    Args:
        path: ``.safetensors``, ``.pth``/``.pt``/``.bin`` or ``.npz`` in the
            official key layout (:func:`read_state_dict`), a ``.keras``
            file (loaded in safe mode) or a Hugging Face ``save_pretrained``
            folder of a ViT or ViTMAE (:mod:`keras_lcmae.convert.hf`; heads,
            epsilon and MAE settings then come from its ``config.json``), or
            a keras-hub ViT preset folder (``save_to_preset``; a
            ``ViTEncoder``, :mod:`keras_lcmae.convert.hub`).
        num_heads: encoder heads; shapes cannot tell, so the standard ViT
            count for the width when omitted.
        decoder_num_heads: decoder heads (official MAE: 16).
        encoder_only: return the :class:`~keras_lcmae.ViTEncoder` even when
            the file holds a decoder.
        image_size: the encoder's image size when it differs from the
            checkpoint's: the position table is resampled (bicubic, ``[CLS]``
            kept, as for finetuning; :func:`keras_lcmae.rebuild_encoder`).
            Encoders only: an MAE's decoder table is not resampled.
        patch_size: the patch size the caller expects; another one in the
            file is an error (a patch kernel cannot be resampled).
        **mae_kwargs: :class:`~keras_lcmae.MAE` arguments (``mask_ratio``,
            ``norm_pix_loss``, ``seed``) for a file with a decoder.

    Returns an :class:`~keras_lcmae.MAE` when the file holds a decoder (and
    ``encoder_only`` is false), else a :class:`~keras_lcmae.ViTEncoder`; a
    ``.keras`` file gives the model it holds (its encoder with
    ``encoder_only``).
    """
    model = _load(path, num_heads, decoder_num_heads, encoder_only, mae_kwargs)
    encoder = find_encoder(model, "load_pretrained")
    if patch_size is not None and int(patch_size) != encoder.patch_size:
        raise ArgumentError(
            "patch_size",
            f"{path!r} holds {encoder.patch_size}-px patches, not {patch_size}: a patch-embedding kernel cannot be "
            f"resampled; build with patch_size={encoder.patch_size}.",
        )
    if image_size is not None and to_2tuple(image_size) != tuple(encoder.image_size):
        if model is not encoder:
            raise ArgumentError(
                "image_size",
                f"resampling the position table applies to an encoder (encoder_only=True); this {type(model).__name__}'s "
                f"decoder keeps the checkpoint's {tuple(encoder.image_size)} table.",
            )
        model = rebuild_encoder(encoder, image_size=image_size)
    return model


def _load(path, num_heads, decoder_num_heads, encoder_only, mae_kwargs):
    if os.path.isdir(path):
        if is_keras_hub_preset(path):
            return load_keras_hub_preset(path)
        if not is_hf_folder(path):
            raise ArgumentError("path", f"{path!r} is a folder without a config.json (a transformers folder has one).")
        return load_hf_folder(path, encoder_only=encoder_only, **mae_kwargs)
    if str(path).endswith(".keras"):
        if not os.path.isfile(path):
            raise ArgumentError("path", f"no such file {path!r}.")
        model = keras.saving.load_model(path, safe_mode=True)
        return find_encoder(model, "load_pretrained") if encoder_only else model
    state = read_state_dict(path)
    if "cls_token" not in state:
        some = sorted(state)[:8]
        raise ArgumentError(
            "path", f"{path!r} has no 'cls_token': not an official MAE/ViT state dict (keys start {some})."
        )
    width = state["cls_token"].shape[-1]
    if num_heads is None:
        if width not in STANDARD_HEADS:
            raise ArgumentError("num_heads", f"width {width} is not a standard ViT; pass the head count.")
        num_heads = STANDARD_HEADS[width]
    if encoder_only or "decoder_embed.weight" not in state:
        return encoder_from_official_state_dict(state, num_heads)
    return mae_from_official_state_dict(state, num_heads, decoder_num_heads, **mae_kwargs)
