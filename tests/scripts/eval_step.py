"""Two optimizer updates of the finetuning classifier (LayerDecayAdamW) or the
linear probe (frozen encoder, BatchNorm + linear head, LARS) on one device
and distributed over two host devices (MirroredStrategy on TensorFlow,
DataParallel on JAX), from the same weights on the same images; and the same
update distributed with --accum_steps=2 (two micro-batches of half the
images). Prints JSON.

    python tests/scripts/eval_step.py finetune|linprobe mirrored|data_parallel
"""

import json
import os
import sys

method, mode = sys.argv[1], sys.argv[2]
if mode == "data_parallel":
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=2"
        # a loaded CI machine can starve one host device past XLA's 40 s collective timeout
        " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    )
else:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import contextlib  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_lcmae import LARS, ViTClassifier, ViTEncoder, finetune_adamw  # noqa: E402
from keras_lcmae.data import fashion_mnist_for_vit  # noqa: E402
from keras_lcmae.optim import WarmupCosine  # noqa: E402

images, labels = fashion_mnist_for_vit("test", image_size=32, channels=1, limit=32)  # two updates of 16
labels = labels.astype("int32")


def make(accum_steps):
    keras.utils.set_random_seed(0)
    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=1, hidden_dim=32, depth=2, num_heads=2)
    schedule = WarmupCosine(1e-2 if method == "finetune" else 1.0, 1, 10)  # updates at lr 0 and the peak
    if method == "finetune":
        model = ViTClassifier(encoder, 10, pool="avg")
        opt = finetune_adamw(model, schedule, 0.05, 0.75, accum_steps=accum_steps)
    else:
        model = ViTClassifier(encoder, 10, pool="cls", linear_probe=True)
        opt = LARS(schedule, accum_steps=accum_steps)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    return model


def step(scope, accum_steps, init=None):
    with scope:
        model = make(accum_steps)
        if init is not None:
            model.set_weights(init)
    start = [keras.ops.convert_to_numpy(w) for w in model.weights]
    history = model.fit(images, labels, batch_size=16 // accum_steps, epochs=1, verbose=0, shuffle=False)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    return start, after, history.history, int(keras.ops.convert_to_numpy(model.optimizer.iterations))


init, single, h1, _ = step(contextlib.nullcontext(), 1)
if mode == "data_parallel":
    from keras_lcmae.distribute import setup

    dist = setup("data_parallel")
    replicas = dist.num_replicas
    scopes = [contextlib.nullcontext(), contextlib.nullcontext()]
else:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    replicas = strategy.num_replicas_in_sync
    scopes = [strategy.scope(), tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope()]
_, dist_w, h2, _ = step(scopes[0], 1, init)
_, accum_w, h3, updates = step(scopes[1], 2, init)
start_trainable = [w for w, v in zip(init, make(1).weights) if v.trainable]


def rel(a, b):
    return float(max(np.abs(x - y).max() / max(np.abs(x).max(), 1e-12) for x, y in zip(a, b)))


def absolute(a, b):
    return float(max(np.abs(x - y).max() for x, y in zip(a, b)))


print(
    json.dumps(
        {
            "replicas": replicas,
            "loss_single": h1["loss"][0],
            "loss_distributed": h2["loss"][0],
            "distributed_rel_diff": rel(single, dist_w),
            "distributed_abs_diff": absolute(single, dist_w),
            "accum_rel_diff": rel(single, accum_w),
            "accum_abs_diff": absolute(single, accum_w),
            "accum_updates": updates,
            "max_update": float(max(np.abs(a - b).max() for a, b in zip(single, start_trainable))),
        }
    )
)
