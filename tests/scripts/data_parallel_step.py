"""One training step of MAE / LC-MAE on one JAX device and under
keras.distribution.DataParallel on two forced host devices, same weights,
images and noise (and once without noise). Prints JSON."""

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
    " --xla_force_host_platform_device_count=2"
    # a loaded CI machine can starve one host device past XLA's 40 s collective timeout
    " --xla_cpu_collective_call_terminate_timeout_seconds=600"
)

import jax
import keras
import numpy as np

from keras_lcmae import LCMAE, MAE, TransformerDecoder, ViTEncoder
from keras_lcmae.data import fashion_mnist_for_vit
from keras_lcmae.distribute import setup

method = sys.argv[1]
images, _ = fashion_mnist_for_vit("test", image_size=32, channels=1, limit=8)
n = 16
views = 2 if method == "lcmae" else 1
noise = np.random.default_rng(0).random((8, views, n)).astype("float32")
noise = noise[:, 0] if views == 1 else noise


def make():
    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=1, hidden_dim=32, depth=2, num_heads=2)
    decoder = TransformerDecoder(32, 1, 2)
    if method == "mae":
        return MAE(encoder, decoder, seed=0)
    return LCMAE(encoder, decoder, projector_dim=64, loss_weights="a", seed=0)


def step(init):
    model = make()
    if init is not None:
        model.set_weights(init)
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    start = [keras.ops.convert_to_numpy(w) for w in model.weights]
    t0 = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    history = model.fit({"images": images, "noise": noise}, batch_size=8, epochs=1, verbose=0, shuffle=False)
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    placed = len(model.trainable_weights[0].value.sharding.device_set)
    free = model.fit(images, batch_size=8, epochs=1, verbose=0, shuffle=False)  # masks drawn inside
    return start, t0, history.history, after, free.history, placed


init, t0, h1, w1, _, placed1 = step(None)
dist = setup("data_parallel")
_, _, h2, w2, free, placed2 = step(init)
print(
    json.dumps(
        {
            "devices": len(jax.devices()),
            "replicas": dist.num_replicas,
            "weight_devices": [placed1, placed2],
            "loss_single": h1["loss"][0],
            "loss_parallel": h2["loss"][0],
            "loss_mae_single": h1["loss_mae"][0],
            "loss_mae_parallel": h2["loss_mae"][0],
            "loss_cross_single": h1.get("loss_cross", [0.0])[0],
            "loss_cross_parallel": h2.get("loss_cross", [0.0])[0],
            "free_loss_finite": bool(np.isfinite(free["loss"][0])),
            "max_weight_diff": float(max(np.abs(a - b).max() for a, b in zip(w1, w2))),
            "max_update": float(max(np.abs(a - b).max() for a, b in zip(w1, t0))),
        }
    )
)
