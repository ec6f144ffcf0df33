#!/usr/bin/env python
r"""Converts MAE/ViT checkpoints between the official key layout and Keras.

    # an official (or timm) checkpoint to a .keras model
    python tools/convert_mae_checkpoint.py --input mae_pretrain_vit_base_full.pth \
        --output mae_vitb16.keras --num_heads 12 --decoder_num_heads 16
    # a model trained here to the official layout, for the official MAE code or timm
    python tools/convert_mae_checkpoint.py --input runs/x/checkpoints/epoch_400.keras \
        --output mae_vitb16.safetensors

``--input``: ``.pth``/``.pt``/``.bin``, ``.npz``, ``.safetensors`` (official
key layout) or ``.keras``. ``--output``: ``.keras`` writes the Keras model;
``.safetensors``, ``.pth`` or ``.npz`` export the official layout (with the
decoder when the model has one). ``--encoder_only`` keeps just the
ViTEncoder. Files are read without running code from them
(:func:`keras_lcmae.convert.read_state_dict`; ``.keras`` in safe mode). The
architecture is read off the tensor shapes; head counts cannot be, so they
are flags (defaults: the standard ViT sizes by width, 16 decoder heads).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cli  # tools/cli.py, importable once tools/ is on the path
from absl import app, flags

FLAGS = flags.FLAGS
FLAG_OF = {"path": "input"}
flags.DEFINE_string("input", None, "Checkpoint: .pth/.pt/.bin, .npz, .safetensors (official layout) or .keras.")
flags.DEFINE_string("output", None, ".keras (a Keras model) or .safetensors/.pth/.npz (the official layout).")
flags.DEFINE_integer("num_heads", None, "Encoder heads (default: standard ViT for the width).", lower_bound=1)
flags.DEFINE_integer("decoder_num_heads", 16, "Decoder heads (official MAE: 16).", lower_bound=1)
flags.DEFINE_bool("encoder_only", False, "Write only the encoder.")
flags.DEFINE_float("mask_ratio", 0.75, "Mask ratio stored in the MAE model.", lower_bound=0, upper_bound=1)
flags.DEFINE_bool("norm_pix_loss", True, "norm_pix_loss stored in the MAE model.")

OUTPUTS = (".keras", ".safetensors", ".pth", ".pt", ".npz")


def convert(path, output, num_heads=None, decoder_num_heads=16, encoder_only=False, **mae_kwargs):
    """Reads ``path`` (:func:`keras_lcmae.convert.load_pretrained`) and writes
    ``output``: a ``.keras`` model, or the official layout
    (:func:`keras_lcmae.convert.export`). Returns the model."""
    from keras_lcmae.convert import export, load_pretrained

    if not str(output).endswith(OUTPUTS):
        raise ValueError(f"--output must end in one of {OUTPUTS}, got {output!r}.")
    model = load_pretrained(path, num_heads, decoder_num_heads, encoder_only=encoder_only, **mae_kwargs)
    if output.endswith(".keras"):
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        model.save(output)
    else:
        export(model, output)
    return model


def main(argv):
    del argv
    from keras_lcmae.errors import ArgumentError

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
    except ArgumentError as e:  # name the tool's flag, not the library's argument
        cli.fail(f"--{FLAG_OF.get(e.argument, e.argument)}: {e.detail}")
    except ValueError as e:
        cli.fail(str(e))
    print(f"wrote {type(model).__name__} ({model.count_params():,} weights) to {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
