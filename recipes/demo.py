#!/usr/bin/env python
"""The README's main job: LC-MAE pretraining on the offline demo data, then
the pretrained encoder judged against a randomly initialised one under the
same protocols (linear probe, short finetune), each pair printed.

    python recipes/demo.py                      # the three steps, ~10-15 min on 2 CPU cores
    python recipes/demo.py --output_dir=runs/demo --seed=1

Runs ``recipes/pretrain.py --flagfile=recipes/configs/demo_cpu.flags``, then
``recipes/linprobe.py`` and ``recipes/finetune.py`` with their ``*_demo_cpu``
flagfiles on ``encoder.keras`` and on ``--encoder=random`` (same architecture,
same budget, same seed), each in its own process. Writes ``demo.json`` and
prints one JSON line: ``linprobe_top1`` / ``random_linprobe_top1`` and
``finetune_top1`` / ``random_finetune_top1`` (and their differences).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "recipes", "configs")
FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "runs/demo_cpu", "Folder of the three runs.")
flags.DEFINE_integer("seed", 0, "Seed of every step.")
flags.DEFINE_bool("finetune", True, "Also compare under the short finetune.")
flags.DEFINE_multi_string("pretrain_flag", [], "Extra flags for pretrain.py (e.g. --pretrain_flag=--epochs=2).")


def run(script, *args):
    """Runs a recipe, streams its output, returns its final JSON line."""
    cmd = [sys.executable, os.path.join(ROOT, "recipes", script), *args]
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    last = None
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith("{"):
            last = line
    if proc.wait() != 0 or last is None:
        raise SystemExit(f"error: {script} failed (exit {proc.returncode}); see its output above.")
    return json.loads(last)


def main(argv):
    del argv
    out = FLAGS.output_dir
    seed = f"--seed={FLAGS.seed}"
    start = time.time()
    pretrain = run(
        "pretrain.py",
        f"--flagfile={os.path.join(CONFIGS, 'demo_cpu.flags')}",
        f"--output_dir={os.path.join(out, 'pretrain')}",
        seed,
        *FLAGS.pretrain_flag,
    )
    encoder = pretrain["encoder"]
    results = {"pretrain_seconds": pretrain["seconds"], "pretrain_loss": pretrain["loss"]}
    protocols = [("linprobe", "linprobe.py", "linprobe_demo_cpu.flags")]
    if FLAGS.finetune:
        protocols.append(("finetune", "finetune.py", "finetune_demo_cpu.flags"))
    for name, script, config in protocols:
        for tag, enc in (("", encoder), ("random_", f"random --architecture_of={encoder}")):
            r = run(
                script,
                f"--flagfile={os.path.join(CONFIGS, config)}",
                *f"--encoder={enc}".split(),
                f"--output_dir={os.path.join(out, tag + name)}",
                seed,
            )
            results[f"{tag}{name}_top1"] = r["top1"]
        results[f"{name}_gain"] = round(results[f"{name}_top1"] - results[f"random_{name}_top1"], 4)
    results["seconds"] = round(time.time() - start, 1)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    app.run(main)
