"""One training step of MAE / LC-MAE on one device and under MirroredStrategy on
two logical CPU devices, same weights, images and noise. Prints JSON."""

import json
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_lcmae import LCMAE, MAE, TransformerDecoder, ViTEncoder  # noqa: E402
from keras_lcmae.data import fashion_mnist_for_vit  # noqa: E402

method = sys.argv[1]
images, _ = fashion_mnist_for_vit("test", image_size=32, channels=1, limit=8)
n = 16
rng = np.random.default_rng(0)
views = 2 if method == "lcmae" else 1
noise = rng.random((8, n * views)).astype("float32")


def make():
    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=1, hidden_dim=32, depth=2, num_heads=2)
    decoder = TransformerDecoder(32, 1, 2)
    if method == "mae":
        return MAE(encoder, decoder, seed=0)
    return LCMAE(encoder, decoder, projector_dim=64, loss_weights="a", seed=0)


def run(strategy, init):
    with strategy.scope():
        model = make()
        if init is not None:
            model.set_weights(init)
        model.compile(optimizer=keras.optimizers.SGD(0.5))
    start = [w.numpy() for w in model.weights]
    start_trainable = [w.numpy() for w in model.trainable_weights]
    if method == "lcmae":  # per-sample noise for both views, kept together when the batch is split
        noise_in = noise.reshape(8, 2, n)
    else:
        noise_in = noise
    ds = tf.data.Dataset.from_tensor_slices({"images": images, "noise": noise_in}).batch(8)
    history = model.fit(ds, epochs=1, verbose=0)
    after = [w.numpy() for w in model.trainable_weights]
    return start, start_trainable, history.history, after


init, t0, h1, w1 = run(tf.distribute.OneDeviceStrategy("/cpu:0"), None)
_, _, h2, w2 = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), init)


def replica_masks():
    """Masks drawn inside the model (no noise given) on two replicas fed the
    same images: they must differ, or replicas would share mask patterns."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = make()
    same = np.concatenate([images[:4], images[:4]])
    ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(same).batch(8))
    batch = next(iter(ds))
    masks = strategy.run(lambda x: model(x, training=True)["mask"], args=(batch,))
    a, b = (m.numpy() for m in strategy.experimental_local_results(masks))
    return float(np.mean(a != b)), float(a.mean())


mask_disagreement, mask_mean = replica_masks()
print(
    json.dumps(
        {
            "mask_disagreement": mask_disagreement,
            "mask_mean": mask_mean,
            "loss_single": h1["loss"][0],
            "loss_mirrored": h2["loss"][0],
            "loss_mae_single": h1["loss_mae"][0],
            "loss_mae_mirrored": h2["loss_mae"][0],
            "loss_cross_single": h1.get("loss_cross", [0.0])[0],
            "loss_cross_mirrored": h2.get("loss_cross", [0.0])[0],
            "max_weight_diff": float(max(np.abs(a - b).max() for a, b in zip(w1, w2))),
            "max_update": float(max(np.abs(a - b).max() for a, b in zip(w1, t0))),
        }
    )
)
