"""The pure losses under MirroredStrategy on two logical CPU devices whose
replicas hold unequal parts of one batch (3 images and 1), averaged over the
replicas as the trainer does, against the same losses on the whole batch on
one device. Prints JSON."""

import json

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np  # noqa: E402

from keras_lcmae.losses import contrastive_terms, cross_view_loss, in_view_loss, reconstruction_loss  # noqa: E402

rng = np.random.default_rng(0)
b, n, k = 4, 16, 6  # images, positions, visible positions per view
arrays = {
    "pred": rng.normal(size=(b, n, 12)),
    "target": rng.normal(size=(b, n, 12)),
    "mask": (rng.random((b, n)) < np.linspace(0.3, 0.9, b)[:, None]),  # a different masked count per image
    "mask2": rng.random((b, n)) < 0.6,
    "v1": rng.normal(size=(b, n, 6)),
    "v2": rng.normal(size=(b, n, 6)),
    "x": rng.normal(size=(b, n, 5)),
}
arrays = {key: value.astype("float32") for key, value in arrays.items()}
# contrastive_terms takes the two views stacked per replica: (2b', M, .)
shuffle = np.stack([rng.permutation(n) for _ in range(2 * b)]).astype("int32")
restore = np.argsort(shuffle, axis=1).astype("int32")
ids_masked = shuffle[:, k:]
feats = np.take_along_axis(np.concatenate([arrays["v1"], arrays["v2"]]), ids_masked[..., None], axis=1)
xm = np.take_along_axis(np.concatenate([arrays["x"], arrays["x"]]), ids_masked[..., None], axis=1)


def losses(a, f, xs, ids, rest):
    terms = contrastive_terms(f, xs, ids, rest, k)
    return {
        "mae": reconstruction_loss(a["pred"], a["target"], a["mask"], norm_pix_loss=True),
        "in": in_view_loss(a["v1"], a["x"], a["mask"]),
        "cross": cross_view_loss(a["v1"], a["v2"], a["mask"], a["mask2"]),
        "terms_in": terms["in"],
        "terms_cross": terms["cross"],
    }


def rows(replica):
    return slice(0, 3) if replica == 0 else slice(3, 4)


def stacked(t, r):  # view 1 rows then view 2 rows of replica r's images
    s = rows(r)
    return np.concatenate([t[:b][s], t[b:][s]])


def per_replica(ctx):
    r = ctx.replica_id_in_sync_group
    return (
        {key: tf.constant(value[rows(r)]) for key, value in arrays.items()},
        *(tf.constant(stacked(t, r)) for t in (feats, xm, ids_masked, restore)),
    )


single = {key: float(value) for key, value in losses(arrays, feats, xm, ids_masked, restore).items()}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
values = strategy.experimental_distribute_values_from_function(per_replica)
out = strategy.run(tf.function(losses), args=values)
mirrored = {key: float(strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)) for key, value in out.items()}
print(json.dumps({"single": single, "mirrored": mirrored}))
