#!/usr/bin/env python
r"""Converts an official MAE checkpoint (``.pth`` or ``.npz``) to a ``.keras`` file.

    python tools/convert_mae_checkpoint.py --input mae_pretrain_vit_base_full.pth \
        --output mae_vitb16.keras --num_heads 12 --decoder_num_heads 16

``--encoder_only`` writes just the ViTEncoder (for pretraining checkpoints
without a decoder and for finetuned ones). A ``.pth`` is read with
``torch.load(weights_only=True)`` (the ``argparse.Namespace`` of the
official training scripts' ``args`` entry is the one class allowed), an ``.npz`` with ``allow_pickle=False``:
a checkpoint never runs code on load. The architecture is read off the
tensor shapes; head counts cannot be, so they are flags (defaults: the
standard ViT sizes by width, 16 decoder heads).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cli  # tools/cli.py, importable once tools/ is on the path
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "Official checkpoint: .pth (torch) or .npz.")
flags.DEFINE_string("output", None, "Where to write the .keras file.")
flags.DEFINE_integer("num_heads", None, "Encoder heads (default: standard ViT for the width).", lower_bound=1)
flags.DEFINE_integer("decoder_num_heads", 16, "Decoder heads (official MAE: 16).", lower_bound=1)
flags.DEFINE_bool("encoder_only", False, "Write only the encoder.")
flags.DEFINE_float("mask_ratio", 0.75, "Mask ratio stored in the MAE model.", lower_bound=0, upper_bound=1)
flags.DEFINE_bool("norm_pix_loss", True, "norm_pix_loss stored in the MAE model.")

STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def read_state_dict(path):
    """An official state dict as numpy arrays, read without running code."""
    import numpy as np

    if not os.path.exists(path):
        raise ValueError(f"--input: no such file {path!r}.")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if path.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError as e:
            raise ValueError("--input: reading a .pth needs torch (pip install torch); or convert it to .npz.") from e
        try:
            # official main_pretrain/main_finetune checkpoints also hold the run's
            # ``args`` (an argparse.Namespace): allowed by name, nothing else is
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds
            raise ValueError(
                f"--input: {path!r} could not be read as a weights-only checkpoint "
                f"(it may contain code, which is refused): {str(e).splitlines()[0]}"
            ) from None
        if isinstance(ckpt, dict) and "model" in ckpt and hasattr(ckpt["model"], "keys"):
            ckpt = ckpt["model"]
        if not hasattr(ckpt, "keys"):
            raise ValueError(f"--input: {path!r} holds a {type(ckpt).__name__}, not a state dict.")
        return {k: v.detach().float().numpy() for k, v in ckpt.items() if hasattr(v, "detach")}
    raise ValueError(f"--input: unknown checkpoint type {path!r}; expected .pth or .npz.")


def convert(path, output, num_heads=None, decoder_num_heads=16, encoder_only=False, **mae_kwargs):
    from keras_lcmae.convert import encoder_from_official_state_dict, mae_from_official_state_dict

    state = read_state_dict(path)
    if "cls_token" not in state:
        raise ValueError(f"--input: {path!r} has no 'cls_token': not an official MAE/ViT state dict.")
    width = state["cls_token"].shape[-1]
    if num_heads is None:
        if width not in STANDARD_HEADS:
            raise ValueError(f"--num_heads: width {width} is not a standard ViT; pass the head count.")
        num_heads = STANDARD_HEADS[width]
    has_decoder = "decoder_embed.weight" in state
    if encoder_only or not has_decoder:
        model = encoder_from_official_state_dict(state, num_heads)
    else:
        model = mae_from_official_state_dict(state, num_heads, decoder_num_heads, **mae_kwargs)
    if not output.endswith(".keras"):
        raise ValueError(f"--output must end in .keras, got {output!r}.")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    model.save(output)
    return model


def main(argv):
    del argv
    if not FLAGS.input or not FLAGS.output:
        cli.fail("--input and --output are required.")
    try:
        model = convert(
            FLAGS.input,
            FLAGS.output,
            FLAGS.num_heads,
            FLAGS.decoder_num_heads,
            FLAGS.encoder_only,
            mask_ratio=FLAGS.mask_ratio,
            norm_pix_loss=FLAGS.norm_pix_loss,
        )
    except ValueError as e:
        cli.fail(str(e))
    print(f"wrote {type(model).__name__} ({model.count_params():,} weights) to {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
