"""What one worker process times, and the spawning of such a process.

Each measurement runs in a process of its own (Keras fixes its backend at
import; peak memory is per process) and prints one JSON record per method.
"""

import json
import os
import subprocess
import sys
import time

from bench import BENCHMARK_SCRIPT, ROOT
from bench.flops import train_flops_per_image, with_rates
from bench.gpus import peak_tflops_for
from bench.machine import device_and_memory, peak_rss_mb, tune_allocator
from bench.plan import FINETUNE_CLASSES, config_for, finetune_accum_steps


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

    encoder = ViTEncoder(
        image_size=c["image"], patch_size=c["patch"], hidden_dim=c["width"], depth=c["depth"], num_heads=c["heads"]
    )
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

    encoder = ViTEncoder(
        image_size=c["image"], patch_size=c["patch"], hidden_dim=c["width"], depth=c["depth"], num_heads=c["heads"]
    )
    model = ViTClassifier(encoder, FINETUNE_CLASSES, pool="avg")
    extra = {"accum_steps": accum_steps} if accum_steps > 1 else {}  # K = 1: the optimizer as the recipe builds it
    model.compile(
        optimizer=optim.finetune_adamw(model, 1e-4, **extra),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
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
        updates[name] = lambda opt=opt: (
            opt.apply(grads, variables),
            float(keras.ops.convert_to_numpy(variables[0][0]).ravel()[0]),
        )
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
        Image.fromarray(photo[y : y + h, x : x + w, :3]).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
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
        ds = data.batched_pretrain_dataset(
            source, c["batch"], c["image"], data.IMAGENET_MEAN, data.IMAGENET_STD, seed=0, shuffle_buffer=1000
        )
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
        image_size=c["image"],
        patch_size=c["patch"],
        num_channels=3,
        hidden_size=c["width"],
        num_hidden_layers=c["depth"],
        num_attention_heads=c["heads"],
        intermediate_size=4 * c["width"],
        decoder_hidden_size=c["dec_width"],
        decoder_num_hidden_layers=c["dec_depth"],
        decoder_num_attention_heads=c["dec_heads"],
        decoder_intermediate_size=4 * c["dec_width"],
        mask_ratio=0.75,
        norm_pix_loss=True,
        layer_norm_eps=1e-6,
        **kwargs,
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


def spawn(
    config,
    method,
    backend,
    jit,
    dtype,
    warmup,
    steps,
    pipeline_images=256,
    batch=None,
    peak_tflops=None,
    reference_optimizer="fused",
    allocator="tuned",
    reference_allocator="default",
):
    """Runs one worker process; returns its JSON records (one per method)."""
    cmd = [
        sys.executable,
        BENCHMARK_SCRIPT,
        "--worker",
        "--configs",
        config,
        "--methods",
        method,
        "--backends",
        backend,
        "--jit",
        jit,
        "--dtype",
        dtype,
        "--warmup",
        str(warmup),
        "--steps",
        str(steps),
        "--pipeline_images",
        str(pipeline_images),
        "--reference_optimizer",
        reference_optimizer,
        "--allocator",
        allocator,
        "--reference_allocator",
        reference_allocator,
    ]
    if batch:
        cmd += ["--batch", str(batch)]
    if peak_tflops:
        cmd += ["--peak_tflops", str(peak_tflops)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if backend not in ("hf_torch", "pipeline"):
        env["KERAS_BACKEND"] = backend
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return records or [
        {
            "config": config,
            "method": method,
            "backend": backend,
            "jit": jit,
            "error": proc.stderr.strip().splitlines()[-1:],
        }
    ]
