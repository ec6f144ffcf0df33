#!/usr/bin/env python
"""Mask ratio vs encoder attention distance (LC-MAE paper, Sec. 4.2, Fig. 6).

Pretrains one model per mask ratio with ``recipes/pretrain.py`` (a
subprocess per run, same flags and seed except ``--mask_ratio``), then
measures the encoder's mean attention distance per layer on all patches of
``--num_images`` held-out images (``keras_lcmae.analysis``), and writes
``<output_dir>/mask_ratio_sweep.csv`` (mask_ratio, layer, distance_px, head
min/max) and ``mask_ratio_sweep.png`` (a line per ratio; the dashed line is
the distance of uniform attention).

    # demo scale on CPU: 5 runs of 1 x 30 steps of the demo model (~2-3 min each on 2 cores)
    python tools/mask_ratio_sweep.py --mask_ratios=0.3,0.45,0.6,0.75,0.9 --epochs=1 --steps_per_epoch=30

Only the encoder is needed (the recipe's ``encoder.keras``); ``--reuse``
skips runs whose ``encoder.keras`` already exists. Extra recipe flags go
through ``--pretrain_flag`` (repeatable), e.g. ``--pretrain_flag=--batch_size=64``.
"""

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # tools/cli.py, importable once tools/ is on the path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_ratios(text):
    """``--mask_ratios``: the ratios, or None for a value that is not a comma
    list of distinct numbers strictly between 0 and 1."""
    try:
        ratios = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        return None
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios) or len(set(ratios)) != len(ratios):
        return None
    return ratios


FLAGS = cli.new_flags(own_flagfile=True)
flags.DEFINE_string(
    "mask_ratios", "0.3,0.45,0.6,0.75,0.9", "Comma list of the mask ratios to pretrain with.", flag_values=FLAGS
)
flags.register_validator(
    "mask_ratios",
    lambda v: parse_ratios(v) is not None,
    "must be a comma list of distinct numbers strictly between 0 and 1",
    flag_values=FLAGS,
)
flags.DEFINE_enum("method", "mae", ["mae", "lcmae"], "Pretraining method.", flag_values=FLAGS)
flags.DEFINE_string(
    "flagfile",
    os.path.join(ROOT, "recipes", "configs", "demo_cpu.flags"),
    "Base flags of recipes/pretrain.py.",
    flag_values=FLAGS,
)
flags.register_validator("flagfile", os.path.exists, "no such file", flag_values=FLAGS)
flags.DEFINE_integer("epochs", 1, "Pretraining epochs per ratio.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("steps_per_epoch", 30, "Pretraining steps per epoch.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_multi_string(
    "pretrain_flag",
    [],
    "Extra flag for recipes/pretrain.py (repeatable), e.g. --pretrain_flag=--batch_size=64.",
    flag_values=FLAGS,
)
flags.DEFINE_string("output_dir", "runs/mask_ratio_sweep", "Runs, CSV and PNG go here.", flag_values=FLAGS)
flags.DEFINE_string("data", "fashion_mnist", "Analysis images: fashion_mnist or a folder.", flag_values=FLAGS)
flags.DEFINE_integer("num_images", 64, "Images for the attention distance.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of pretraining and of the image choice.", flag_values=FLAGS)
flags.DEFINE_bool("reuse", False, "Skip runs whose encoder.keras exists.", flag_values=FLAGS)


def run_dir(output_dir, ratio):
    return os.path.join(output_dir, f"mask_{ratio:g}")


def pretrain(args, ratio):
    out = run_dir(args.output_dir, ratio)
    encoder_path = os.path.join(out, "encoder.keras")
    if args.reuse and os.path.exists(encoder_path):
        return encoder_path, 0.0
    flags = [
        f"--flagfile={args.flagfile}",
        f"--method={args.method}",
        f"--mask_ratio={ratio}",
        f"--epochs={args.epochs}",
        f"--steps_per_epoch={args.steps_per_epoch}",
        "--monitor_every=0",
        f"--seed={args.seed}",
        f"--output_dir={out}",
        *args.pretrain_flag,
    ]
    start = time.time()
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "pretrain.py"), *flags], capture_output=True, text=True, cwd=ROOT
    )
    if result.returncode != 0 or not os.path.exists(encoder_path):
        raise RuntimeError(
            f"recipes/pretrain.py failed for mask ratio {ratio} (exit {result.returncode}); flags: "
            f"{' '.join(flags)}\n{result.stderr[-3000:]}"
        )
    return encoder_path, time.time() - start


def measure(encoder_path, args):
    from keras_lcmae.analysis import attention_distance, encoder_layers, mean_pairwise_distance
    from keras_lcmae.analysis.inputs import load_checkpoint, load_images

    model, _ = load_checkpoint(encoder_path)
    encoder = model if not hasattr(model, "encoder") else model.encoder
    images, _, _ = load_images(args.data, encoder.image_size, encoder.num_channels, args.num_images, args.seed)
    out = encoder_layers(encoder, images)
    per_head = np.stack([attention_distance(a, encoder.grid_size, encoder.patch_size) for a in out["attention"]])
    return per_head, mean_pairwise_distance(encoder.grid_size, encoder.patch_size)


def main(argv=None):
    """The sweep; ``argv``: the command-line arguments (default
    ``sys.argv[1:]``). Returns the exit status."""
    cli.parse(FLAGS, argv, __doc__)
    args = FLAGS
    os.makedirs(args.output_dir, exist_ok=True)
    rows, curves, uniform = [], {}, None
    for ratio in parse_ratios(args.mask_ratios):
        try:
            path, seconds = pretrain(args, ratio)
        except RuntimeError as e:
            print(str(e), file=sys.stderr)
            return 1
        per_head, uniform = measure(path, args)
        curves[ratio] = per_head.mean(axis=1)
        for l, heads in enumerate(per_head):
            rows.append(
                {
                    "mask_ratio": ratio,
                    "layer": l + 1,
                    "distance_px": float(heads.mean()),
                    "head_min_px": float(heads.min()),
                    "head_max_px": float(heads.max()),
                }
            )
        print(
            json.dumps(
                {
                    "mask_ratio": ratio,
                    "encoder": path,
                    "pretrain_seconds": round(seconds, 1),
                    "distance_px": [round(float(v), 3) for v in curves[ratio]],
                }
            ),
            flush=True,
        )
    from keras_lcmae.analysis.plots import sweep_figure

    csv_path = os.path.join(args.output_dir, "mask_ratio_sweep.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    png_path = sweep_figure(curves, os.path.join(args.output_dir, "mask_ratio_sweep.png"), uniform=uniform)
    print(json.dumps({"csv": csv_path, "png": png_path}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
