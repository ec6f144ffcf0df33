#!/usr/bin/env python
"""Training-step throughput and peak memory of MAE / LC-MAE, side by side with
transformers' PyTorch ViTMAE on the same configuration.

Every measurement runs in its own process (Keras fixes its backend at import;
peak memory is per process) and prints one JSON line; ratios measured in the
same run follow. Throughput is the median over timed steps after warm-up of
``train_on_batch`` on one fixed batch, in images per second (LC-MAE counts
each image once although it runs two views). Each record also gives the
device, the model FLOPs per image of a training step, the achieved TFLOP/s,
the model-FLOP utilisation against the device's peak where it is known (bf16
on the NVIDIA GPUs of ``GPU_PEAK_BF16_TFLOPS``, or ``--peak_tflops``) and, on
a GPU, the peak device memory; the HF reference runs on the GPU when PyTorch
sees one, trained with transformers' ``Trainer`` default optimizer (fused
``torch.optim.AdamW``; ``--reference_optimizer plain`` for torch's own).
Our workers run with the host allocator the recipes set
(``keras_lcmae.cpu.keep_freed_memory``; ``--allocator default`` for glibc's
own), the HF reference with glibc's own, as transformers leaves it
(``--reference_allocator tuned`` gives it ours); records name theirs.

    python tools/benchmark.py --configs tiny32 --methods mae,lcmae --backends tensorflow,jax,torch
    python tools/benchmark.py --configs base224 --methods mae --reference
    python tools/benchmark.py --configs base224 --methods mae,ae --backends torch --pipeline
    python tools/benchmark.py --configs base224 --methods mae --dtype bfloat16 --reference --batch 64  # a GPU
    python tools/benchmark.py --configs tiny32 --methods finetune --backends torch --accum_steps 1,4
    python tools/benchmark.py --suite cpu --markdown docs/benchmarks.md   # the CPU tables, one command
    python tools/benchmark.py --suite gpu --markdown docs/benchmarks.md   # the GPU figures

``--suite`` runs a fixed plan of sections (each a run of its own, with its
own rounds and ratios: :data:`SUITES`) and ``--markdown`` writes the figures
as one table per config, naming the machine, the versions and the command.

Configs: ``tiny32`` (ViT 192 x 12, 3 heads, 32 px, patch 4, decoder 128 x 2
with 4 heads, batch 64), ``base224`` (ViT-B/16 at 224, decoder 512 x 8 with 16
heads, batch 8), ``test`` (seconds-long smoke size). Methods: ``mae``,
``lcmae``, ``ae`` (AE(p): no masking, all tokens), ``finetune`` (a
``ViTClassifier`` with ``pool="avg"`` and 1000 classes on the config's
encoder, compiled as the finetuning recipe: ``finetune_adamw``, sparse
cross-entropy on logits), timed at the config's micro-batch once per
``--accum_steps`` K (default ``1,4``: without and with gradient
accumulation), each K in its own process so that its peak memory is its
own (records ``finetune`` and ``finetune_k4``); with K > 1 a timed step is
one whole cycle of K micro-batches and one update, recorded per micro-batch,
so images/s counts the micro-batches' images and includes the update's
share. Model records also give ``estimated_mb``, the per-device training
memory :func:`keras_lcmae.memory.estimate_training_memory` predicts (to set
against ``peak_device_mb`` on a GPU). ``--pipeline`` adds the
input pipeline's images/s on a folder of JPEGs cut from scikit-image's photos,
with the pretraining transform at the config's image size; ratios printed:
LC-MAE/MAE step, MAE/AE step, finetune with/without accumulation (step and
peak memory), pipeline/fastest model, ours/HF.

This file is the command line (absl flags; ``--flagfile`` works too); the
work is in ``tools/bench/``, one concern a module: the plan of jobs
(``bench.plan``), the FLOP model (``bench.flops``), the GPU table
(``bench.gpus``), the machine (``bench.machine``), the worker processes
(``bench.workers``) and the report (``bench.report``). Their names are
importable from here as well.
"""

import argparse
import json
import os
import re
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

# the names of the parts, importable from here as before the split
from bench.flops import forward_flops_per_image, train_flops_per_image, with_rates  # noqa: E402, F401
from bench.gpus import GPU_PEAK_BF16_TFLOPS, peak_tflops_for  # noqa: E402, F401
from bench.machine import (  # noqa: E402, F401
    cpu_has_native_bf16,
    cpu_module,
    cpu_name,
    device_and_memory,
    peak_rss_mb,
    tune_allocator,
)
from bench.plan import (  # noqa: E402, F401
    CONFIGS,
    DEFAULT_ACCUM_STEPS,
    FINETUNE_CLASSES,
    PLAN_FLAGS,
    SUITES,
    config_for,
    finetune_accum_steps,
    finetune_methods,
    section_jobs,
    section_plan,
    split_methods,
    suite_specs,
)
from bench.report import (  # noqa: E402, F401
    METHOD_NAMES,
    RESULTS_MARKER,
    add_markdown_section,
    describe_config,
    finetune_notes,
    git_commit,
    markdown_report,
    pool,
    ratios,
)
from bench.workers import (  # noqa: E402, F401
    build_finetune,
    build_model,
    emit,
    estimated_mb,
    hf_config,
    keras_worker,
    make_jpeg_folder,
    optimizer_worker,
    pipeline_worker,
    reference_worker,
    spawn,
    time_steps,
    worker,
)


def run_section(plan):
    """Runs one section's jobs ``plan.rounds`` times, every other round in
    reverse order, so that slow spells of a shared machine hit every job
    alike; each figure is the median of its steps pooled over the rounds.
    Prints and returns the pooled records and the ratios of this section,
    and the error records of jobs that failed."""
    jobs = section_jobs(plan)
    records, failed = [], []
    for r in range(plan.rounds):
        for job in jobs if r % 2 == 0 else jobs[::-1]:
            for rec in spawn(
                *job,
                plan.warmup,
                plan.steps,
                plan.pipeline_images,
                plan.batch,
                plan.peak_tflops,
                plan.reference_optimizer,
                plan.allocator,
                plan.reference_allocator,
            ):
                if "step_s" not in rec:
                    print(json.dumps(rec), flush=True)
                    failed.append(rec)
                else:
                    records.append(rec)
    results = pool(records, plan.rounds)
    found = ratios(results)
    for rec in results + found:
        print(json.dumps(rec), flush=True)
    return results, found, failed


FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags. Defined when the script runs, not when it is
    imported (tests import it next to other modules' absl flags)."""
    flags.DEFINE_enum(
        "suite",
        None,
        sorted(SUITES),
        "run a fixed plan of sections: cpu (the CPU tables), gpu (ViT-B/16 in bf16 on a GPU), "
        "smoke (a minute-long check); it sets the measurement flags itself",
    )
    flags.DEFINE_string(
        "markdown", None, "also write the figures as markdown tables naming the machine to this file ('-': stdout)"
    )
    flags.DEFINE_string("configs", "tiny32", f"comma list of configs ({', '.join(CONFIGS)})")
    flags.DEFINE_string("methods", "mae,lcmae", "comma list of methods: mae, lcmae, ae, finetune")
    flags.DEFINE_string("backends", "tensorflow,jax,torch", "comma list of Keras backends")
    flags.DEFINE_string("jit", "auto", "on, off, auto, or a comma list (e.g. on,off)")
    flags.DEFINE_string("dtype", "float32", "float32 or bfloat16 (mixed), or a comma list")
    flags.DEFINE_boolean("reference", False, "also time transformers' ViTMAE (torch) for mae")
    flags.DEFINE_enum(
        "reference_optimizer",
        "fused",
        ["fused", "plain"],
        "the HF reference's torch.optim.AdamW: fused (transformers' Trainer default on torch "
        ">= 2.8, default) or plain (torch.optim.AdamW's own default)",
    )
    flags.DEFINE_enum(
        "allocator",
        "tuned",
        ["tuned", "default"],
        "our workers' malloc: tuned (keras_lcmae.cpu.keep_freed_memory, as the recipes run, "
        "default) or default (glibc's own)",
    )
    flags.DEFINE_enum(
        "reference_allocator",
        "default",
        ["default", "tuned"],
        "the HF reference's malloc: default (glibc's own, as transformers leaves it) or tuned (the same as ours)",
    )
    flags.DEFINE_boolean(
        "pipeline", False, "also time the input pipeline (JPEG folder -> pretraining transform) at each config's size"
    )
    flags.DEFINE_integer("pipeline_images", None, "JPEG files made for --pipeline (default 256)")
    flags.DEFINE_boolean(
        "optimizer",
        False,
        "also time one AdamW update of each config's MAE parameters: Keras' against the recipe's "
        "(and torch.optim.AdamW on the torch backend), on each backend",
    )
    flags.DEFINE_integer("rounds", 1, "run every measurement this many times, alternating order; steps are pooled")
    flags.DEFINE_integer("batch", None, "batch size in place of each config's (e.g. for a GPU)")
    flags.DEFINE_float(
        "peak_tflops", None, "the device's peak TFLOP/s for the MFU figure (default: the table of GPUs, bf16 only)"
    )
    flags.DEFINE_string(
        "accum_steps",
        DEFAULT_ACCUM_STEPS,
        "the finetune method's gradient-accumulation steps K, a comma list; each K is timed at the "
        "same micro-batch in its own process (default 1,4: without and with accumulation)",
    )
    flags.DEFINE_integer("warmup", 3, "untimed steps before the timed ones")
    flags.DEFINE_integer("steps", 10, "timed steps")
    flags.DEFINE_boolean("worker", False, "internal: run one measurement in this process (as spawn starts it)")


def checked_args():
    """The flags as a namespace, after the checks absl's parsers do not make
    (ranges, known configs, flags a suite fixes); a problem is a
    ``UsageError`` naming the flag."""
    args = argparse.Namespace(**{name: FLAGS[name].value for name in FLAG_NAMES})
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        raise app.UsageError(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if args.batch is not None and args.batch < 1:
        raise app.UsageError(f"--batch must be a positive integer, got {args.batch}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise app.UsageError(f"--peak_tflops must be positive, got {args.peak_tflops}")
    for name in ("rounds", "steps", "pipeline_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise app.UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        raise app.UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    if not re.fullmatch(r"\d+(,\d+)*", args.accum_steps) or min(int(k) for k in args.accum_steps.split(",")) < 1:
        raise app.UsageError(
            f"--accum_steps takes a comma list of positive integers (e.g. 1,4), got {args.accum_steps!r}"
        )
    if args.suite:
        given = [f"--{k}" for k in PLAN_FLAGS if getattr(args, k) != FLAGS[k].default]
        if given:
            raise app.UsageError(
                f"--suite {args.suite} sets {', '.join(given)} itself; drop them (--batch, --peak_tflops, "
                "--pipeline_images, --reference_optimizer, --allocator, --reference_allocator and --markdown may be "
                "given)"
            )
    return args


FLAG_NAMES = (
    "suite",
    "markdown",
    "configs",
    "methods",
    "backends",
    "jit",
    "dtype",
    "reference",
    "reference_optimizer",
    "allocator",
    "reference_allocator",
    "pipeline",
    "pipeline_images",
    "optimizer",
    "rounds",
    "batch",
    "peak_tflops",
    "accum_steps",
    "warmup",
    "steps",
    "worker",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (every option is a --flag)")
    args = checked_args()
    if args.worker:
        args.config, args.method, args.backend = args.configs, args.methods, args.backends
        args.pipeline_images = args.pipeline_images or 256
        worker(args)
        return
    specs, note = suite_specs(args.suite, cpu_has_native_bf16()) if args.suite else ((None,), None)
    if note:
        print(json.dumps({"note": note}), flush=True)
    sections = [run_section(section_plan(args, spec)) for spec in specs]
    if args.markdown:
        text = markdown_report(
            [s[:2] for s in sections],
            command=" ".join(["python", "tools/benchmark.py", *sys.argv[1:]]),
            failures=[f for s in sections for f in s[2]],
            note=note,
            title=f"{args.suite} suite" if args.suite else None,
        )
        if args.markdown == "-":
            print(text, end="")
        else:
            add_markdown_section(args.markdown, text)


def run(main):
    """``absl.app.run(main)``, a ``UsageError`` from ``main`` printed as one
    line naming the flag (as the recipes print theirs), exit status 1 as
    absl's own parse errors."""

    def checked(argv):
        try:
            return main(argv)
        except app.UsageError as e:
            print(f"FATAL Flags error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(checked)


if __name__ == "__main__":
    define_flags()
    run(main)
