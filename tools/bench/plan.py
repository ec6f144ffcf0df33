"""What a benchmark run times: the configs, the methods, the suites and the
worker jobs of one section."""

import argparse
import re

from bench.machine import cpu_module

CONFIGS = {
    "test": dict(image=32, patch=8, width=32, depth=2, heads=2, dec_width=32, dec_depth=1, dec_heads=2, batch=8),
    "tiny32": dict(image=32, patch=4, width=192, depth=12, heads=3, dec_width=128, dec_depth=2, dec_heads=4, batch=64),
    "base224": dict(
        image=224, patch=16, width=768, depth=12, heads=12, dec_width=512, dec_depth=8, dec_heads=16, batch=8
    ),
}


def config_for(args):
    """The named config, with ``--batch`` in place of its batch when given."""
    c = dict(CONFIGS[args.config])
    if getattr(args, "batch", None):
        c["batch"] = int(args.batch)
    return c


FINETUNE_CLASSES = 1000  # the finetune job's head: ImageNet's classes


def finetune_accum_steps(method):
    """K of a finetune method name (``finetune`` 1, ``finetune_k4`` 4);
    None for other methods."""
    match = re.fullmatch(r"finetune(?:_k(\d+))?", method)
    return None if match is None else int(match.group(1) or 1)


# ``--suite``: the figures of docs/benchmarks.md, each suite a list of sections; a section
# is one benchmark run (its own jobs, rounds and ratios), given as the flags
# it would take on the command line. ``models=False``: no model jobs (only
# the optimizer or pipeline ones).
SUITES = {
    "cpu": (  # docs/benchmarks.md on a CPU machine (about 30 min on 2 cores)
        # ours against HF: MAE alone in its process, as HF's is (the same
        # conditions; the method ratios come from the runs below)
        dict(
            configs="tiny32",
            methods="mae",
            backends="torch",
            dtype="float32,bfloat16",
            reference=True,
            rounds=2,
            steps=10,
        ),
        dict(
            configs="base224",
            methods="mae",
            backends="torch",
            dtype="float32,bfloat16",
            reference=True,
            rounds=2,
            warmup=2,
            steps=5,
        ),
        # the method ratios: the methods of one setting interleaved in one process
        dict(configs="tiny32", methods="mae,lcmae,ae", backends="torch", dtype="float32,bfloat16", steps=8),
        dict(
            configs="tiny32",
            methods="mae,lcmae,ae",
            backends="tensorflow",
            jit="on,off",
            dtype="float32,bfloat16",
            steps=10,
        ),  # fewer steps leave the LC-MAE/MAE ratio at the mercy of machine noise
        dict(configs="tiny32", methods="mae,lcmae,ae", backends="jax", steps=6),
        # eight steps: with fewer, one noisy step moves the LC-MAE/MAE ratio
        dict(configs="base224", methods="mae,lcmae,ae", backends="torch", dtype="bfloat16", warmup=2, steps=8),
        dict(
            configs="base224",
            methods="mae",
            backends="tensorflow",
            jit="on,off",
            dtype="float32,bfloat16",
            warmup=1,
            steps=3,
        ),
        dict(configs="base224", methods="mae", backends="jax", dtype="float32,bfloat16", warmup=1, steps=3),
        # two rounds, the second in reverse order: a slow spell of the machine during one job would skew the
        # pipeline/model ratio; alternating puts such a spell on both sides
        dict(
            configs="tiny32,base224",
            methods="mae",
            backends="torch",
            dtype="bfloat16",
            pipeline=True,
            rounds=2,
            warmup=2,
            steps=5,
        ),
        dict(configs="tiny32,base224", backends="torch", optimizer=True, models=False, warmup=2, steps=5),
    ),
    "gpu": (  # the GPU figures: ViT-B/16 in bf16 at a GPU-sized batch, HF on the same GPU
        dict(
            configs="base224",
            methods="mae,lcmae,ae",
            backends="torch,jax,tensorflow",
            dtype="bfloat16",
            reference=True,
            batch=64,
            warmup=3,
            steps=10,
        ),
        dict(
            configs="tiny32",
            methods="mae,lcmae",
            backends="torch,jax,tensorflow",
            dtype="bfloat16",
            reference=True,
            batch=256,
            warmup=3,
            steps=10,
        ),
    ),
    "smoke": (  # a minute-long run of every kind of section, for tests and a first look
        dict(
            configs="test",
            methods="mae,lcmae,ae",
            backends="torch",
            dtype="float32,bfloat16",
            reference=True,
            warmup=1,
            steps=2,
        ),
        dict(
            configs="test",
            methods="mae,lcmae,ae",
            backends="tensorflow",
            jit="off",
            pipeline=True,
            pipeline_images=24,
            optimizer=True,
            warmup=1,
            steps=2,
        ),
    ),
}
DEFAULT_ACCUM_STEPS = "1,4"
# the flags a suite fixes (they may not be given with --suite)
PLAN_FLAGS = (
    "configs",
    "methods",
    "backends",
    "jit",
    "dtype",
    "reference",
    "pipeline",
    "optimizer",
    "rounds",
    "warmup",
    "steps",
)


def section_plan(args, spec=None):
    """The flags of one section: ``args`` with ``spec`` over them (a suite's
    section; ``models`` is True unless the spec says otherwise); ``--batch``
    and ``--pipeline_images`` given on the command line win over the spec."""
    plan = {
        k: getattr(args, k)
        for k in PLAN_FLAGS + ("batch", "peak_tflops", "reference_optimizer", "allocator", "reference_allocator")
    }
    plan.update(models=True, pipeline_images=256, accum_steps=getattr(args, "accum_steps", None) or DEFAULT_ACCUM_STEPS)
    plan.update(spec or {})
    for key in ("batch", "pipeline_images"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    return argparse.Namespace(**plan)


def finetune_methods(accum_steps):
    """The finetune methods of an ``--accum_steps`` list: ``"1,4"`` ->
    ``["finetune", "finetune_k4"]``."""
    ks = [int(k) for k in str(accum_steps).split(",") if k.strip()]
    return ["finetune" if k == 1 else f"finetune_k{k}" for k in dict.fromkeys(ks)]


def split_methods(methods, accum_steps=None):
    """``(shared, alone)``: the methods that share one process (steps
    interleaved) and the finetune ones, each alone in its process (one per
    ``--accum_steps`` K for ``finetune``), so that each K's peak memory is
    its own."""
    shared, alone = [], []
    for method in methods.split(","):
        if method == "finetune":
            alone += finetune_methods(accum_steps or DEFAULT_ACCUM_STEPS)
        elif finetune_accum_steps(method):
            alone.append(method)
        else:
            shared.append(method)
    return shared, list(dict.fromkeys(alone))


def section_jobs(plan):
    """The worker jobs of one section: (config, methods, backend, jit, dtype)."""
    jobs = []
    for config in plan.configs.split(","):
        if plan.reference:
            jobs += [(config, "mae", "hf_torch", "off", dtype) for dtype in plan.dtype.split(",")]
        if plan.pipeline:
            jobs.append((config, "pipeline", "pipeline", "off", "float32"))
        if plan.optimizer:
            jobs += [(config, "optimizer", backend, "auto", "float32") for backend in plan.backends.split(",")]
        if plan.models:
            for backend in plan.backends.split(","):
                for jit in plan.jit.split(","):
                    for dtype in plan.dtype.split(","):
                        # all methods of one setting share a process (interleaved steps), but each finetune K
                        # has one of its own (its peak memory)
                        shared, alone = split_methods(plan.methods, getattr(plan, "accum_steps", None))
                        if shared:
                            jobs.append((config, ",".join(shared), backend, jit, dtype))
                        jobs += [(config, method, backend, jit, dtype) for method in alone]
    return jobs


def suite_specs(name, native_bf16=True):
    """The sections of suite ``name`` and a note (or None). On a CPU without
    native bf16 the cpu suite times float32 only: there PyTorch emulates bf16
    at ~16x the float32 step (keras_lcmae.cpu), which would stretch the
    suite to hours and measure the emulation, not the library."""
    specs = SUITES[name]
    if name != "cpu" or native_bf16 is not False:
        return specs, None
    specs = tuple(dict(spec, dtype="float32") if "bfloat16" in spec.get("dtype", "") else spec for spec in specs)
    wanted = ", ".join(cpu_module().NATIVE_16BIT_FLAGS["bfloat16"])
    return specs, (
        f"bfloat16 left out: this CPU has no native bf16 (none of the cpuinfo flags {wanted}), where "
        "it is emulated; every section runs in float32."
    )
