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
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    "test": dict(image=32, patch=8, width=32, depth=2, heads=2, dec_width=32, dec_depth=1, dec_heads=2, batch=8),
    "tiny32": dict(image=32, patch=4, width=192, depth=12, heads=3, dec_width=128, dec_depth=2, dec_heads=4, batch=64),
    "base224": dict(image=224, patch=16, width=768, depth=12, heads=12, dec_width=512, dec_depth=8, dec_heads=16, batch=8),
}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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


def forward_flops_per_image(c, method, mask_ratio=0.75, mlp_ratio=4):
    """Matmul FLOPs (two per multiply-add) of one image's forward pass through
    the network: the patch embedding of every patch, the encoder on ``[CLS]``
    + the visible tokens (all tokens for ``ae``), the decoder embedding, the
    decoder on ``[CLS]`` + every position, and the prediction head on the
    patch positions. Per block: the qkv, output and two MLP projections and
    the two attention products (``QK^T`` and ``AV``). LC-MAE embeds the
    patches once and runs the rest for each of its two views; its projector
    and loss matmuls are not counted (they are the loss's, and
    under 1 % of the network's at these sizes). Finetuning: the patch
    embedding and the encoder on all ``1 + N`` tokens, and the head.
    Elementwise work (norms, softmax, GELU) is not counted, as is usual for
    model FLOPs."""
    from keras_lcmae.masking import num_visible

    n = (c["image"] // c["patch"]) ** 2
    pix = c["patch"] ** 2 * 3

    def blocks(depth, tokens, width):
        dense = 2 * tokens * width * width * (3 + 1 + 2 * mlp_ratio)
        return depth * (dense + 4 * tokens * tokens * width)

    if finetune_accum_steps(method):
        return 2 * n * pix * c["width"] + blocks(c["depth"], 1 + n, c["width"]) + 2 * c["width"] * FINETUNE_CLASSES

    encoded = 1 + (n if method == "ae" else num_visible(n, mask_ratio))
    view = blocks(c["depth"], encoded, c["width"])
    view += 2 * encoded * c["width"] * c["dec_width"]
    view += blocks(c["dec_depth"], 1 + n, c["dec_width"])
    view += 2 * n * c["dec_width"] * pix  # AE(p): the block is the patch
    # LC-MAE embeds the patches once and runs the rest for each view
    return 2 * n * pix * c["width"] + view * (2 if method == "lcmae" else 1)


def train_flops_per_image(c, method):
    """Model FLOPs of one training step per image: 3 x the forward matmul
    FLOPs (the backward does two matmuls per forward one), the convention of
    model-FLOP utilisation (MFU)."""
    trained = method in ("mae", "lcmae", "ae") or finetune_accum_steps(method)
    return 3 * forward_flops_per_image(c, method) if trained else None


# Dense (no sparsity) bf16 tensor-core peak of GPUs, TFLOP/s, from NVIDIA's
# data sheets; the first pattern found in the device name wins. A device not
# listed gets no MFU unless --peak_tflops gives its peak.
GPU_PEAK_BF16_TFLOPS = (
    (r"H200 NVL", 835.5),
    (r"H200", 989.4),  # H200 SXM, GH200
    (r"H100 PCIe", 756.0),
    (r"H100 NVL", 835.5),
    (r"H100", 989.4),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    (r"A100", 312.0),
    (r"L40S", 362.05),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def peak_tflops_for(device, dtype, override=None):
    """The device's peak TFLOP/s for ``dtype`` training: ``override`` when
    given; for bfloat16 on a GPU of :data:`GPU_PEAK_BF16_TFLOPS` its dense
    bf16 peak; otherwise None (float32 peaks depend on TF32 settings, and a
    CPU's on its vector units: pass ``--peak_tflops``)."""
    if override:
        return float(override)
    if dtype != "bfloat16" or not device.startswith("gpu:"):
        return None
    for pattern, peak in GPU_PEAK_BF16_TFLOPS:
        if re.search(pattern, device):
            return peak
    return None


_CPU_MODULE = []


def cpu_module():
    """``keras_lcmae/cpu.py`` loaded as a file: its allocator and cpuinfo
    helpers without importing Keras (and a backend) into this process."""
    if not _CPU_MODULE:
        import importlib.util

        spec = importlib.util.spec_from_file_location("_lcmae_cpu", os.path.join(ROOT, "keras_lcmae", "cpu.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CPU_MODULE.append(module)
    return _CPU_MODULE[0]


def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU has bf16 matrix instructions (x86 AVX-512 BF16 or AMX,
    Arm BF16); None when cpuinfo has no flags line."""
    return cpu_module().native_cpu_dtype("bfloat16", cpuinfo)


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
    return specs, (f"bfloat16 left out: this CPU has no native bf16 (none of the cpuinfo flags {wanted}), where "
                   "it is emulated; every section runs in float32.")


def cpu_name(cpuinfo="/proc/cpuinfo"):
    """``"cpu: <model> (<n> cores, <widest matrix ISA>)"``: the ISA (amx_bf16,
    avx512_bf16, avx512f, avx2) decides what bf16 and float32 cost, so it is
    named; it is left out where cpuinfo has no flags line."""
    name = "unknown"
    try:
        with open(cpuinfo) as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    flags = cpu_module().cpu_flags(cpuinfo) or ()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), None)
    return f"cpu: {name} ({cores} cores{', ' + isa if isa else ''})"


def device_and_memory(backend):
    """``(device, peak_device_mb)`` of the worker's backend: ``"gpu: <name>"``
    and the accelerator's peak allocated memory when the backend computes on
    a GPU, else ``(cpu_name(), None)``."""
    if backend in ("torch", "hf_torch"):
        import torch

        if torch.cuda.is_available():
            return f"gpu: {torch.cuda.get_device_name(0)}", torch.cuda.max_memory_allocated() / 2**20
    elif backend == "jax":
        import jax

        dev = jax.devices()[0]
        if dev.platform == "gpu":
            stats = dev.memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
            return f"gpu: {dev.device_kind}", (peak / 2**20 if peak is not None else None)
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "unknown")
            return f"gpu: {name}", tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return cpu_name(), None


def time_steps(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def build_model(method, c):
    from keras_lcmae import LCMAE, MAE, AutoEncoder, TransformerDecoder, ViTEncoder

    encoder = ViTEncoder(image_size=c["image"], patch_size=c["patch"], hidden_dim=c["width"], depth=c["depth"], num_heads=c["heads"])
    decoder = TransformerDecoder(c["dec_width"], c["dec_depth"], c["dec_heads"])
    if method == "mae":
        return MAE(encoder, decoder, mask_ratio=0.75, seed=0)
    if method == "lcmae":
        return LCMAE(encoder, decoder, projector_dim=1024, mask_ratio=0.75, seed=0)
    if method == "ae":  # AE(p): MAE without masking, every token through encoder and decoder
        return AutoEncoder(encoder, decoder, block_size=c["patch"])
    raise ValueError(f"unknown method {method}")


def build_finetune(c, accum_steps=1, jit="auto"):
    """The finetune job's model, compiled as ``recipes/finetune.py`` compiles
    it: a :class:`keras_lcmae.ViTClassifier` (``pool="avg"``,
    :data:`FINETUNE_CLASSES` classes) on the config's encoder (tiny32:
    ``vit_tiny``'s sizes, base224: ``vit_base``'s), ``finetune_adamw``
    (layer-wise lr decay AdamW) with ``accum_steps`` micro-batches per update,
    sparse cross-entropy on the logits."""
    import keras

    from keras_lcmae import ViTClassifier, ViTEncoder, optim

    encoder = ViTEncoder(image_size=c["image"], patch_size=c["patch"], hidden_dim=c["width"], depth=c["depth"],
                         num_heads=c["heads"])
    model = ViTClassifier(encoder, FINETUNE_CLASSES, pool="avg")
    extra = {"accum_steps": accum_steps} if accum_steps > 1 else {}  # K = 1: the optimizer as the recipe builds it
    model.compile(optimizer=optim.finetune_adamw(model, 1e-4, **extra),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    return model


def estimated_mb(model, batch):
    """:func:`keras_lcmae.memory.estimate_training_memory` of a compiled
    model at ``batch`` images per step, MiB; None when it cannot tell."""
    try:
        from keras_lcmae import memory
    except ImportError:  # a checkout from before the module
        return None
    try:
        return round(memory.estimate_training_memory(model, batch)["total"] / 2**20, 1)
    except ValueError:
        return None


def keras_worker(args, methods):
    """Times ``methods`` in one process, their steps interleaved (m1, m2, m1,
    m2, ...) so that drift on a shared machine hits all of them alike. A
    finetune method with K > 1 times whole cycles of K micro-batches (one
    update each) and records the cycle's time / K."""
    import keras
    import numpy as np

    from keras_lcmae import optim

    c = config_for(args)
    if args.dtype == "bfloat16":
        keras.config.set_dtype_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    jit = {"on": True, "off": False, "auto": "auto"}[args.jit]
    x = np.random.default_rng(0).random((c["batch"], c["image"], c["image"], 3)).astype("float32")
    x = keras.ops.convert_to_tensor(x)  # on the backend's device once, as the reference's input is
    steps, per_step, args.estimates = {}, {}, {}
    for method in methods:
        k = finetune_accum_steps(method)
        if k:
            labels = keras.ops.convert_to_tensor(np.random.default_rng(1).integers(0, FINETUNE_CLASSES, c["batch"]))
            model = build_finetune(c, k, jit)

            def step(model=model, k=k, labels=labels):
                for _ in range(k):  # one cycle: K micro-batches, one update
                    logs = model.train_on_batch(x, labels, return_dict=True)
                    float(logs["loss"])  # host sync
        else:
            model, k = build_model(method, c), 1
            # the recipe's optimizer: keras_lcmae.optim.AdamW with the official decay exclusions
            model.compile(optimizer=optim.adamw(model, 1e-4, weight_decay=0.05), jit_compile=jit)

            def step(model=model):
                logs = model.train_on_batch(x, return_dict=True)
                float(logs["loss"])  # host sync

        for _ in range(args.warmup):
            step()
        steps[method], per_step[method] = step, k
        args.estimates[method] = estimated_mb(model, c["batch"])
    times = {m: [] for m in methods}
    for _ in range(args.steps):
        for method in methods:
            t = time.perf_counter()
            steps[method]()
            times[method].append((time.perf_counter() - t) / per_step[method])
    return times, c["batch"]


def optimizer_worker(args):
    """One AdamW update of the config's MAE parameters (random gradients):
    ``keras.optimizers.AdamW`` against ``keras_lcmae.optim.AdamW`` (the
    recipe's), interleaved; on PyTorch also ``torch.optim.AdamW``, its own
    default (a per-parameter loop on the CPU) and ``fused=True`` (the kernel
    the recipe's runs there). Step times are per update."""
    import keras
    import numpy as np

    from keras_lcmae import optim

    c = config_for(args)
    model = build_model("mae", c)
    model(np.zeros((1, c["image"], c["image"], 3), "float32"))
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32")) for v in variables]
    updates = {}
    for name, cls in (("update_keras_adamw", keras.optimizers.AdamW), ("update_ours_adamw", optim.AdamW)):
        opt = cls(1e-4, weight_decay=0.05, beta_1=0.9, beta_2=0.95)
        opt.exclude_from_weight_decay(var_list=optim.decay_exclusions(model))
        opt.build(variables)
        updates[name] = lambda opt=opt: (opt.apply(grads, variables), float(keras.ops.convert_to_numpy(variables[0][0]).ravel()[0]))
    if keras.backend.backend() == "torch":
        import torch

        for name, fused in (("update_torch_adamw", None), ("update_torch_adamw_fused", True)):
            params = [torch.nn.Parameter(v.value.detach().clone()) for v in variables]
            for p, g in zip(params, grads):
                p.grad = g
            topt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)
            updates[name] = topt.step
    times = {name: [] for name in updates}
    for _ in range(args.warmup):
        for fn in updates.values():
            fn()
    for _ in range(args.steps):
        for name, fn in updates.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times, None


def make_jpeg_folder(root, n, seed=0):
    """``n`` JPEG files (quality 90) in 4 class folders, each a random crop
    (sides 256-480 px) of one of scikit-image's bundled photos, so decoding
    costs what real photos cost. Returns ``root``."""
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    photos = [getattr(skdata, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")]
    photos = [p for p in photos if p.ndim == 3 and min(p.shape[:2]) >= 256]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        h = int(rng.integers(256, min(480, photo.shape[0]) + 1))
        w = int(rng.integers(256, min(480, photo.shape[1]) + 1))
        y, x = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        folder = os.path.join(root, f"class_{i % 4}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(photo[y:y + h, x:x + w, :3]).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return root


def pipeline_worker(args):
    """Images/s of the pretraining input pipeline (parallel decode of a JPEG
    folder, RandomResizedCrop to the config's size, flip, normalise, batch,
    prefetch) on this process's cores; each timed step takes 8 batches (the
    figure is per batch), after ``warmup`` such steps have drained the
    prefetch buffer."""
    import tempfile

    from keras_lcmae import data

    c = config_for(args)
    with tempfile.TemporaryDirectory() as root:
        make_jpeg_folder(root, args.pipeline_images)
        source, _, _, _ = data.image_folder_dataset(root, channels=3)
        ds = data.batched_pretrain_dataset(source, c["batch"], c["image"], data.IMAGENET_MEAN, data.IMAGENET_STD,
                                           seed=0, shuffle_buffer=1000)
        it = iter(ds)

        def chunk(n=8):  # 8 batches a timed step, so prefetched batches cannot flatter the median
            for _ in range(n):
                next(it)

        times = [t / 8 for t in time_steps(chunk, args.warmup, args.steps)]
    return times, c["batch"]


def hf_config(c, **kwargs):
    """transformers' ``ViTMAEConfig`` of config ``c`` (norm-pix loss, mask 0.75)."""
    from transformers import ViTMAEConfig

    return ViTMAEConfig(
        image_size=c["image"], patch_size=c["patch"], num_channels=3, hidden_size=c["width"], num_hidden_layers=c["depth"],
        num_attention_heads=c["heads"], intermediate_size=4 * c["width"], decoder_hidden_size=c["dec_width"],
        decoder_num_hidden_layers=c["dec_depth"], decoder_num_attention_heads=c["dec_heads"],
        decoder_intermediate_size=4 * c["dec_width"], mask_ratio=0.75, norm_pix_loss=True, layer_norm_eps=1e-6, **kwargs,
    )


def reference_worker(args):
    """transformers' ViTMAEForPreTraining in PyTorch, eager, same sizes, on
    the GPU when PyTorch sees one; with ``--dtype bfloat16`` its forward runs
    under ``torch.autocast``."""
    import torch
    from transformers import ViTMAEForPreTraining

    c = config_for(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(hf_config(c)).to(device).train()
    # "fused": transformers' Trainer default (``adamw_torch_fused`` on
    # torch >= 2.8, as HF's run_mae.py trains ViTMAE); "plain":
    # torch.optim.AdamW's own default (a per-tensor loop on the CPU)
    fused = {"fused": True, "plain": None}[args.reference_optimizer]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)
    x = torch.rand(c["batch"], 3, c["image"], c["image"], device=device)
    # bfloat16: the usual PyTorch mixed precision (float32 weights, autocast forward)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(pixel_values=x).loss
        loss.backward()
        opt.step()
        float(loss)

    return time_steps(step, args.warmup, args.steps), c["batch"]


def tune_allocator(setting):
    """Applies ``setting`` ("tuned": ``keras_lcmae.cpu.keep_freed_memory``,
    or "default") to this process's malloc; returns what the record says.
    :func:`cpu_module` keeps Keras out of the HF worker."""
    if setting != "tuned":
        return "default"
    return "tuned" if cpu_module().keep_freed_memory() else "default (not glibc's malloc)"


def worker(args):
    methods = args.method.split(",")
    args.allocator_applied = tune_allocator(args.reference_allocator if args.backend == "hf_torch" else args.allocator)
    if args.backend == "pipeline":
        import tensorflow as tf

        times, batch = pipeline_worker(args)
        times = {"pipeline": times}
        version = f"tensorflow {tf.__version__} (tf.data)"
    elif args.backend == "hf_torch":
        times, batch = reference_worker(args)
        times = {"mae": times}
        import torch

        version = f"torch {torch.__version__}"
    elif methods == ["optimizer"]:
        times, batch = optimizer_worker(args)
        import keras

        version = f"keras {keras.__version__} ({args.backend})"
    else:
        times, batch = keras_worker(args, methods)
        import keras

        version = f"keras {keras.__version__} ({args.backend})"
    for method, ts in times.items():
        emit(args, method, ts, batch, version)


def emit(args, method, times, batch, version):
    device, device_mb = device_and_memory(args.backend)
    rec = {
        "config": args.config,
        "method": method,
        "backend": args.backend,
        "jit": args.jit,
        "dtype": args.dtype,
        "batch": batch,
        "device": device,
        "flops_per_image": train_flops_per_image(config_for(args), method),
        "peak_tflops": peak_tflops_for(device, args.dtype, args.peak_tflops),
        "steps_timed": len(times),
        "step_s": [round(t, 5) for t in times],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_device_mb": round(device_mb, 1) if device_mb is not None else None,
        "version": version,
        "allocator": args.allocator_applied,
    }
    if args.backend == "hf_torch":
        rec["optimizer"] = f"torch.optim.AdamW ({args.reference_optimizer})"
    if method in getattr(args, "estimates", {}):
        rec["estimated_mb"] = args.estimates[method]
    if finetune_accum_steps(method):
        rec["accum_steps"] = finetune_accum_steps(method)
    print(json.dumps(with_rates(rec, times)), flush=True)


def with_rates(rec, times):
    """``rec`` with what its step times give: the median step, images/s, the
    achieved TFLOP/s of model FLOPs and, where the device's peak is known,
    the model-FLOP utilisation ``mfu``."""
    median = statistics.median(times)
    rec = dict(rec, median_step_s=round(median, 5))
    batch, flops, peak = rec.get("batch"), rec.get("flops_per_image"), rec.get("peak_tflops")
    rec["images_per_s"] = round(batch / median, 2) if batch else None
    tflops = flops * batch / median / 1e12 if batch and flops else None
    rec["tflops"] = float(f"{tflops:.4g}") if tflops is not None else None
    rec["mfu"] = float(f"{tflops / peak:.4g}") if tflops is not None and peak else None
    return rec


def spawn(config, method, backend, jit, dtype, warmup, steps, pipeline_images=256, batch=None, peak_tflops=None,
          reference_optimizer="fused", allocator="tuned", reference_allocator="default"):
    """Runs one worker process; returns its JSON records (one per method)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--configs", config, "--methods", method,
           "--backends", backend, "--jit", jit, "--dtype", dtype, "--warmup", str(warmup), "--steps", str(steps),
           "--pipeline_images", str(pipeline_images), "--reference_optimizer", reference_optimizer,
           "--allocator", allocator, "--reference_allocator", reference_allocator]
    if batch:
        cmd += ["--batch", str(batch)]
    if peak_tflops:
        cmd += ["--peak_tflops", str(peak_tflops)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if backend not in ("hf_torch", "pipeline"):
        env["KERAS_BACKEND"] = backend
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return records or [{"config": config, "method": method, "backend": backend, "jit": jit, "error": proc.stderr.strip().splitlines()[-1:]}]


# ``--suite``: the figures of docs/benchmarks.md, each suite a list of sections; a section
# is one benchmark run (its own jobs, rounds and ratios), given as the flags
# it would take on the command line. ``models=False``: no model jobs (only
# the optimizer or pipeline ones).
SUITES = {
    "cpu": (  # docs/benchmarks.md on a CPU machine (about 30 min on 2 cores)
        # ours against HF: MAE alone in its process, as HF's is (the same
        # conditions; the method ratios come from the runs below)
        dict(configs="tiny32", methods="mae", backends="torch", dtype="float32,bfloat16", reference=True,
             rounds=2, steps=10),
        dict(configs="base224", methods="mae", backends="torch", dtype="float32,bfloat16", reference=True,
             rounds=2, warmup=2, steps=5),
        # the method ratios: the methods of one setting interleaved in one process
        dict(configs="tiny32", methods="mae,lcmae,ae", backends="torch", dtype="float32,bfloat16", steps=8),
        dict(configs="tiny32", methods="mae,lcmae,ae", backends="tensorflow", jit="on,off", dtype="float32,bfloat16",
             steps=10),  # six steps gave LC-MAE/MAE 1.96 and 2.15 in two runs
        dict(configs="tiny32", methods="mae,lcmae,ae", backends="jax", steps=6),
        # eight steps: with four, LC-MAE/MAE read 2.233 on one run of a noisy machine, 1.787 with eight
        dict(configs="base224", methods="mae,lcmae,ae", backends="torch", dtype="bfloat16", warmup=2, steps=8),
        dict(configs="base224", methods="mae", backends="tensorflow", jit="on,off", dtype="float32,bfloat16",
             warmup=1, steps=3),
        dict(configs="base224", methods="mae", backends="jax", dtype="float32,bfloat16", warmup=1, steps=3),
        # two rounds, the second in reverse order: one suite run read the tiny32 pipeline at 1.05x the model in a
        # slow spell of the machine (3.2x in two reruns alone); alternating puts such a spell on both sides
        dict(configs="tiny32,base224", methods="mae", backends="torch", dtype="bfloat16", pipeline=True, rounds=2,
             warmup=2, steps=5),
        dict(configs="tiny32,base224", backends="torch", optimizer=True, models=False, warmup=2, steps=5),
    ),
    "gpu": (  # the GPU figures: ViT-B/16 in bf16 at a GPU-sized batch, HF on the same GPU
        dict(configs="base224", methods="mae,lcmae,ae", backends="torch,jax,tensorflow", dtype="bfloat16",
             reference=True, batch=64, warmup=3, steps=10),
        dict(configs="tiny32", methods="mae,lcmae", backends="torch,jax,tensorflow", dtype="bfloat16",
             reference=True, batch=256, warmup=3, steps=10),
    ),
    "smoke": (  # a minute-long run of every kind of section, for tests and a first look
        dict(configs="test", methods="mae,lcmae,ae", backends="torch", dtype="float32,bfloat16", reference=True,
             warmup=1, steps=2),
        dict(configs="test", methods="mae,lcmae,ae", backends="tensorflow", jit="off", pipeline=True,
             pipeline_images=24, optimizer=True, warmup=1, steps=2),
    ),
}
DEFAULT_ACCUM_STEPS = "1,4"
# the flags a suite fixes (they may not be given with --suite)
PLAN_FLAGS = ("configs", "methods", "backends", "jit", "dtype", "reference", "pipeline", "optimizer", "rounds",
              "warmup", "steps")


def section_plan(args, spec=None):
    """The flags of one section: ``args`` with ``spec`` over them (a suite's
    section; ``models`` is True unless the spec says otherwise); ``--batch``
    and ``--pipeline_images`` given on the command line win over the spec."""
    plan = {k: getattr(args, k) for k in PLAN_FLAGS + ("batch", "peak_tflops", "reference_optimizer", "allocator",
                                                       "reference_allocator")}
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
            for rec in spawn(*job, plan.warmup, plan.steps, plan.pipeline_images, plan.batch, plan.peak_tflops,
                             plan.reference_optimizer, plan.allocator, plan.reference_allocator):
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


METHOD_NAMES = {"mae": "MAE", "lcmae": "LC-MAE", "ae": "AE"}


def describe_config(name, batch=None):
    """One line naming a config's sizes, e.g. for a table's heading."""
    c = dict(CONFIGS[name])
    return (f"{name}: ViT {c['width']}x{c['depth']} ({c['heads']} heads), {c['image']} px, patch {c['patch']}, "
            f"decoder {c['dec_width']}x{c['dec_depth']} ({c['dec_heads']} heads), batch {batch or c['batch']}")


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def finetune_notes(run, records, found):
    """Markdown lines of the finetune records of one run and config: per
    (backend, jit, dtype), each K's images/s and peak memory, and with K > 1
    the step and memory against K = 1 (from ``found``, the run's ratios)."""
    lines = []
    tuned = [r for r in records if finetune_accum_steps(r["method"])]
    for key in dict.fromkeys((r["backend"], r["jit"], r["dtype"]) for r in tuned):
        recs = sorted((r for r in tuned if (r["backend"], r["jit"], r["dtype"]) == key),
                      key=lambda r: finetune_accum_steps(r["method"]))
        parts = []
        for r in recs:
            k = finetune_accum_steps(r["method"])
            mem = f"peak RSS {_fmt(r.get('peak_rss_mb'), '.0f')} MB"
            if r.get("peak_device_mb") is not None:
                mem += f", peak device {r['peak_device_mb']:.0f} MB"
            if r.get("estimated_mb") is not None:
                mem += f", estimated {r['estimated_mb']:.0f} MB"
            part = f"K={k} {_fmt(r['images_per_s'], '.4g')} images/s ({mem})"
            q = next((q for q in found if q["ratio"] == f"{r['method']}_step/finetune_step"
                      and (q["backend"], q["jit"], q["dtype"]) == key and q.get("config") == r["config"]), None)
            if q:
                added = q.get("peak_device_mb_added", q.get("peak_rss_mb_added"))
                part += f", step **{q['value']:.3f}x** K=1's" + (f", {added:+.0f} MB" if added is not None else "")
            parts.append(part)
        backend, jit, dtype = key
        lines.append(f"- Run {run}: finetune (ViTClassifier, avg pool, finetune_adamw; micro-batch {recs[0]['batch']}, "
                     f"{backend} jit={jit} {dtype}): " + "; ".join(parts) + ".")
    return lines


def markdown_report(sections, command, when=None, failures=(), note=None, title=None, commit=None):
    """Markdown tables of the figures of ``sections`` (a list of
    ``(results, ratios)``, one per section, as :func:`run_section` returns),
    one table per config, naming the machine, the versions and the command.
    A row is one (backend, jit_compile, dtype) setting of one section; its
    ratio columns come from that section's run only (LC-MAE/MAE and MAE/AE
    step, ours/HF at the same dtype), as do the lines under each table
    (best ours/best HF, input pipeline/fastest model, one AdamW update).
    ``failures`` (error records of jobs that did not finish) are listed at
    the end, so a missing row is never silent. The text is one section whose
    heading names the date, ``title`` (e.g. the suite), the machine and the
    commit, for :func:`add_markdown_section`."""
    when = when or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    everything = [r for results, _ in sections for r in results]
    devices = sorted({r["device"] for r in everything if r.get("device")})
    versions = sorted({r["version"] for r in everything if r.get("version")})
    device = "; ".join(devices) or "an unknown device"
    title = f"## {when.split()[0]} — {title or 'benchmark'}, {device}, commit {commit or git_commit()}"
    lines = [title, "",
             f"Measured {when} on {device}.", "",
             f"Versions: {'; '.join(versions)}.", "",
             f"Command: `{command}`", "",
             "Images/s = batch / median step time (timed steps after warm-up, pooled over rounds). A run is one "
             "section of the plan (its own processes and rounds); every ratio is taken within one run, and the "
             "methods of a row share one process, steps interleaved. Peak RSS: the row's largest process.", ""]
    if note:
        lines += [note, ""]
    configs = list(dict.fromkeys(r["config"] for r in everything))
    for config in configs:
        rows, notes = [], []
        has_mfu = any(r.get("mfu") is not None for r in everything if r["config"] == config)
        for run, (results, found) in enumerate(sections, 1):
            here = [r for r in results if r["config"] == config]
            def ratio(name, **keys):
                for q in found:
                    if q["ratio"] == name and q.get("config") == config and all(q.get(k) == v for k, v in keys.items()):
                        return q["value"]
                return None
            refs = {r["dtype"]: r for r in here if r["backend"] == "hf_torch"}
            settings = list(dict.fromkeys((r["backend"], r["jit"], r["dtype"]) for r in here
                                          if r["method"] in METHOD_NAMES and r["backend"] != "hf_torch"))
            for backend, jit, dtype in settings:
                by = {r["method"]: r for r in here if (r["backend"], r["jit"], r["dtype"]) == (backend, jit, dtype)
                      and not finetune_accum_steps(r["method"])}  # finetune: lines of its own below
                mae_rec = by.get("mae", {})
                ref = refs.get(dtype)
                keys = dict(backend=backend, jit=jit, dtype=dtype)
                cells = [run, backend, jit, dtype] + [_fmt(by[m]["images_per_s"] if m in by else None, ".4g") for m in METHOD_NAMES]
                cells.append(_fmt(mae_rec.get("tflops"), ".3g"))
                if has_mfu:
                    cells.append(_fmt(mae_rec.get("mfu"), ".1%"))
                same = ratio("ours/hf_torch images_per_s (same dtype)", **keys)
                cells += [_fmt(ratio("lcmae_step/mae_step", **keys), ".3f"), _fmt(ratio("mae_step/ae_step", **keys), ".3f"),
                          _fmt(ref["images_per_s"] if ref else None, ".4g"), f"{same:.3f}x" if same else "",
                          _fmt(max(r["peak_rss_mb"] for r in by.values()), ".0f")]
                rows.append(cells)
            for dtype, ref in refs.items():
                label = f"HF ViTMAE (transformers, PyTorch eager, {ref.get('optimizer', 'torch.optim.AdamW')}"
                label += f", {ref['allocator']} malloc)" if ref.get("allocator") else ")"
                cells = [run, label, "", dtype + (" autocast" if dtype == "bfloat16" else ""),
                         _fmt(ref["images_per_s"], ".4g"), "", "", _fmt(ref.get("tflops"), ".3g")]
                if has_mfu:
                    cells.append(_fmt(ref.get("mfu"), ".1%"))
                rows.append(cells + ["", "", "", "", _fmt(ref.get("peak_rss_mb"), ".0f")])
            notes += finetune_notes(run, here, found)
            for q in found:
                if q.get("config") != config:
                    continue
                if q["ratio"] == "best ours/best hf_torch images_per_s":
                    notes.append(f"- Run {run}: best ours / best HF ViTMAE **{q['value']:.3f}x** (ours: {q['ours']}; HF: {q['hf_torch']}).")
                elif q["ratio"] == "pipeline/fastest model images_per_s":
                    pipe = next(r for r in here if r["method"] == "pipeline")
                    notes.append(f"- Run {run}: input pipeline (JPEG folder, pretraining transform) {pipe['images_per_s']:.4g} images/s, "
                                 f"**{q['value']:.3g}x** the fastest model of its run ({q['model']}).")
                elif q["ratio"] == "keras AdamW update/ours":
                    ups = {r["method"]: r["median_step_s"] for r in here
                           if r["backend"] == q["backend"] and r["method"].startswith("update_")}
                    torch_part = (f", torch.optim.AdamW {ups['update_torch_adamw']:.3g} s"
                                  if "update_torch_adamw" in ups else "")
                    if "update_torch_adamw_fused" in ups:
                        torch_part += f" (fused: {ups['update_torch_adamw_fused']:.3g} s)"
                    notes.append(f"- Run {run}: one AdamW update of the MAE parameters ({q['backend']}): Keras' "
                                 f"{ups['update_keras_adamw']:.3g} s, the recipe's {ups['update_ours_adamw']:.3g} s"
                                 f"{torch_part} (Keras/recipe {q['value']:.3g}x).")
        batch = next((r["batch"] for r in everything if r["config"] == config and r.get("batch")), None)
        lines += [f"### {describe_config(config, batch)}", ""]
        if rows:
            head = ["run", "backend", "jit_compile", "dtype"] + [f"{n} images/s" for n in METHOD_NAMES.values()] + [
                "MAE TFLOP/s"] + (["MAE MFU"] if has_mfu else []) + [
                "LC-MAE/MAE step", "MAE/AE step", "HF ViTMAE images/s, same run and dtype", "ours/HF", "peak RSS MB"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]
            lines.append("")
        if notes:
            lines += notes + [""]
    if failures:
        lines += ["### Jobs that failed", ""]
        lines += [f"- {f.get('config')} {f.get('method')} {f.get('backend')} jit={f.get('jit')}: "
                  f"{' '.join(f.get('error') or ['no output'])}" for f in failures]
        lines.append("")
    return "\n".join(lines)


RESULTS_MARKER = ("<!-- results: newest first; tools/benchmark.py --markdown docs/benchmarks.md "
                  "inserts new sections below this line -->")


def git_commit():
    """The short hash of the checkout's HEAD, with ``+changes`` when the work
    tree differs from it; ``unknown`` outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty else "")


def add_markdown_section(path, section):
    """Adds one dated section (as :func:`markdown_report` writes) to the
    markdown file ``path``, newest first: right under :data:`RESULTS_MARKER`
    when the file has it (``docs/benchmarks.md``), at the top of any other
    existing file, or as a new file with a title and the marker."""
    section = section.strip() + "\n"
    if not os.path.exists(path):
        text = f"# Benchmarks\n\n{RESULTS_MARKER}\n\n{section}"
    else:
        with open(path) as f:
            old = f.read()
        at = old.find(RESULTS_MARKER)
        if at >= 0:
            end = old.index("\n", at) + 1 if "\n" in old[at:] else len(old)
            rest = old[end:].lstrip("\n")
            text = old[:end] + "\n" + section + ("\n" + rest if rest else "")
        else:
            text = section + "\n" + old
    with open(path, "w") as f:
        f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default=None, choices=sorted(SUITES),
                        help="run a fixed plan of sections: cpu (the CPU tables), gpu (ViT-B/16 in bf16 on a GPU), "
                             "smoke (a minute-long check); it sets the measurement flags itself")
    parser.add_argument("--markdown", default=None,
                        help="also write the figures as markdown tables naming the machine to this file ('-': stdout)")
    parser.add_argument("--configs", default="tiny32")
    parser.add_argument("--methods", default="mae,lcmae")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--jit", default="auto", help="on, off, auto, or a comma list (e.g. on,off)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 (mixed), or a comma list")
    parser.add_argument("--reference", action="store_true", help="also time transformers' ViTMAE (torch) for mae")
    parser.add_argument("--reference_optimizer", default="fused", choices=("fused", "plain"),
                        help="the HF reference's torch.optim.AdamW: fused (transformers' Trainer default on torch "
                             ">= 2.8, default) or plain (torch.optim.AdamW's own default)")
    parser.add_argument("--allocator", default="tuned", choices=("tuned", "default"),
                        help="our workers' malloc: tuned (keras_lcmae.cpu.keep_freed_memory, as the recipes run, "
                             "default) or default (glibc's own)")
    parser.add_argument("--reference_allocator", default="default", choices=("default", "tuned"),
                        help="the HF reference's malloc: default (glibc's own, as transformers leaves it) or tuned "
                             "(the same as ours)")
    parser.add_argument("--pipeline", action="store_true",
                        help="also time the input pipeline (JPEG folder -> pretraining transform) at each config's size")
    parser.add_argument("--pipeline_images", type=int, default=None, help="JPEG files made for --pipeline (default 256)")
    parser.add_argument("--optimizer", action="store_true",
                        help="also time one AdamW update of each config's MAE parameters: Keras' against the recipe's "
                             "(and torch.optim.AdamW on the torch backend), on each backend")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every measurement this many times, alternating order; steps are pooled")
    parser.add_argument("--batch", type=int, default=None, help="batch size in place of each config's (e.g. for a GPU)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the MFU figure (default: the table of GPUs, bf16 only)")
    parser.add_argument("--accum_steps", default=DEFAULT_ACCUM_STEPS,
                        help="the finetune method's gradient-accumulation steps K, a comma list; each K is timed at the "
                             "same micro-batch in its own process (default 1,4: without and with accumulation)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be a positive integer, got {args.batch}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak_tflops must be positive, got {args.peak_tflops}")
    for name in ("rounds", "steps", "pipeline_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if not re.fullmatch(r"\d+(,\d+)*", args.accum_steps) or min(int(k) for k in args.accum_steps.split(",")) < 1:
        parser.error(f"--accum_steps takes a comma list of positive integers (e.g. 1,4), got {args.accum_steps!r}")
    if args.suite:
        given = [f"--{k}" for k in PLAN_FLAGS if getattr(args, k) != parser.get_default(k)]
        if given:
            parser.error(f"--suite {args.suite} sets {', '.join(given)} itself; drop them (--batch, --peak_tflops, "
                         "--pipeline_images, --reference_optimizer, --allocator, --reference_allocator and --markdown may be given)")
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
        text = markdown_report([s[:2] for s in sections], command=" ".join(["python", "tools/benchmark.py", *sys.argv[1:]]),
                               failures=[f for s in sections for f in s[2]], note=note,
                               title=f"{args.suite} suite" if args.suite else None)
        if args.markdown == "-":
            print(text, end="")
        else:
            add_markdown_section(args.markdown, text)


def pool(records, rounds):
    """One record per (config, method, backend, jit, dtype): the step times
    of its ``rounds`` worker records pooled, the median, images/s, TFLOP/s
    and MFU taken over all of them, the largest peak RSS and device memory."""
    pooled = {}
    for rec in records:
        key = tuple(rec[k] for k in ("config", "method", "backend", "jit", "dtype"))
        if key in pooled:
            pooled[key]["step_s"] = pooled[key]["step_s"] + rec["step_s"]
            for mem in ("peak_rss_mb", "peak_device_mb"):
                values = [v for v in (pooled[key].get(mem), rec.get(mem)) if v is not None]
                pooled[key][mem] = max(values) if values else None
        else:
            pooled[key] = dict(rec)
    results = []
    for rec in pooled.values():
        steps = rec.pop("step_s")
        rec = with_rates(rec, steps)
        rec.update(steps_timed=len(steps), rounds=rounds)
        results.append(rec)
    return results


def ratios(results):
    """The ratios the issue's targets are stated in, each from figures of
    this run: LC-MAE/MAE and MAE/AE step time, pipeline/fastest model
    images/s, ours/HF images/s at the same dtype, best/best (ours over
    all backends, jit and dtype settings against the faster of HF's float32
    and bfloat16 autocast), and the cost of gradient accumulation in
    finetuning: the K-step cycle's time per micro-batch over the plain
    step's, with the peak memories' difference (MB, each K in its own
    process)."""
    ok = [r for r in results if "median_step_s" in r]
    same = ("config", "backend", "jit", "dtype")
    out = []
    for num, den, name in (("lcmae", "mae", "lcmae_step/mae_step"), ("mae", "ae", "mae_step/ae_step")):
        for r in ok:
            for d in ok:
                if r["method"] == num and d["method"] == den and all(r[k] == d[k] for k in same):
                    out.append({"ratio": name, **{k: r[k] for k in same},
                                "value": round(r["median_step_s"] / d["median_step_s"], 3)})
    for r in ok:
        if r["method"] == "update_keras_adamw":
            for o in ok:
                if o["method"] == "update_ours_adamw" and o["config"] == r["config"] and o["backend"] == r["backend"]:
                    out.append({"ratio": "keras AdamW update/ours", "config": r["config"], "backend": r["backend"],
                                "value": round(r["median_step_s"] / o["median_step_s"], 3)})
    for p in [r for r in ok if r["method"] == "pipeline"]:
        models = [m for m in ok if m["config"] == p["config"] and m["method"] in ("mae", "lcmae", "ae")]
        if models:
            best = max(models, key=lambda m: m["images_per_s"])
            out.append({"ratio": "pipeline/fastest model images_per_s", "config": p["config"],
                        "model": f"{best['method']} {best['backend']} jit={best['jit']} {best['dtype']}",
                        "value": round(p["images_per_s"] / best["images_per_s"], 3)})
    refs = [r for r in ok if r["backend"] == "hf_torch"]
    ours = [m for m in ok if m["method"] == "mae" and m["backend"] not in ("hf_torch", "pipeline")]
    for ref in refs:
        for m in ours:
            if m["config"] == ref["config"] and m["dtype"] == ref["dtype"]:
                out.append({"ratio": "ours/hf_torch images_per_s (same dtype)", **{k: m[k] for k in same},
                            "value": round(m["images_per_s"] / ref["images_per_s"], 3)})
    for config in dict.fromkeys(r["config"] for r in refs):
        cr = [r for r in refs if r["config"] == config]
        co = [m for m in ours if m["config"] == config]
        if cr and co:
            ref, best = max(cr, key=lambda r: r["images_per_s"]), max(co, key=lambda m: m["images_per_s"])
            out.append({"ratio": "best ours/best hf_torch images_per_s", "config": config,
                        "ours": f"{best['backend']} jit={best['jit']} {best['dtype']}", "hf_torch": ref["dtype"],
                        "value": round(best["images_per_s"] / ref["images_per_s"], 3)})
    for r in ok:
        k = finetune_accum_steps(r["method"])
        if not k or k == 1:
            continue
        for d in ok:
            if d["method"] == "finetune" and all(r[key] == d[key] for key in same):
                rec = {"ratio": f"{r['method']}_step/finetune_step", **{key: r[key] for key in same}, "accum_steps": k,
                       "value": round(r["median_step_s"] / d["median_step_s"], 3)}
                for mem in ("peak_rss_mb", "peak_device_mb", "estimated_mb"):
                    if r.get(mem) is not None and d.get(mem) is not None:
                        rec[f"{mem}_added"] = round(r[mem] - d[mem], 1)
                out.append(rec)
    return out


if __name__ == "__main__":
    main()
