#!/usr/bin/env python
"""Linear probing of a pretrained encoder (official MAE ``main_linprobe.py``).

    python recipes/linprobe.py --encoder=runs/demo_cpu/encoder.keras --flagfile=recipes/configs/linprobe_demo_cpu.flags
    python recipes/linprobe.py --flagfile=recipes/configs/linprobe_vitb16_in1k.flags --encoder=runs/lcmae/encoder.keras

The encoder is frozen (inference mode); the head is BatchNorm without affine
(eps 1e-6) then a linear layer; LARS (momentum 0.9, no weight decay by
default) with lr = blr * batch / 256, warmup then cosine; RandomResizedCrop +
flip only. ``--cache_features`` trades the crop augmentation for speed: the
features of the centre-cropped training images are computed once and the head
is trained on them (the quick protocol of the CPU demo). Reports top-1/top-5
on the validation split each epoch, keeps the best, writes ``metrics.json``
and one final JSON line.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from recipes import common  # noqa: E402

FLAGS = flags.FLAGS
common.define_common_flags(dict(batch_size=16384, epochs=90, blr=0.1, warmup_epochs=10, weight_decay=0.0,
                                pool="cls", output_dir="runs/linprobe"))
flags.DEFINE_bool("cache_features", False, "Train the head on features computed once (no crop augmentation).")


def head_model(dim, num_classes):
    """BatchNorm without affine (eps 1e-6) + linear head: the probe on features
    (the same layers ``ViTClassifier(linear_probe=True)`` puts on the encoder)."""
    import keras

    inputs = keras.Input((dim,))
    x = keras.layers.BatchNormalization(center=False, scale=False, epsilon=1e-6, momentum=0.9, name="head_norm")(inputs)
    x = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01), name="head")(x)
    return keras.Model(inputs, x, name="linear_probe_head")


def main(argv):
    del argv
    common.validate_common_flags()
    import keras

    from keras_lcmae import LARS, ViTClassifier, data, extract_features

    kept = common.keep_freed_memory()
    keras.utils.set_random_seed(FLAGS.seed)
    train_src, val_src, num_classes, n_train, channels, mean, std, crop_pct = common.labelled_data()
    encoder = common.build_encoder(channels)
    before = [w.copy() for w in encoder.get_weights()]
    steps, schedule, derived = common.lr_schedule(n_train, num_classes)
    derived["freed_memory_kept"] = kept
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="top1"),
               keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5")]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    eval_batches = data.labelled_dataset(val_src, min(FLAGS.batch_size, 1024), FLAGS.image_size, mean, std,
                                         train=False, crop_pct=crop_pct)
    start = time.time()
    if FLAGS.cache_features:
        train_eval = data.labelled_dataset(train_src, 1024, FLAGS.image_size, mean, std, train=False, crop_pct=crop_pct)
        x_train, y_train = extract_features(encoder, train_eval, pool=FLAGS.pool)
        x_val, y_val = extract_features(encoder, eval_batches, pool=FLAGS.pool)
        common.check_labels(y_train, num_classes, "the training split")
        common.check_labels(y_val, num_classes, "the validation split")
        model = head_model(x_train.shape[1], num_classes)
        model.compile(optimizer=LARS(schedule, weight_decay=FLAGS.weight_decay), loss=loss, metrics=metrics)
        rng = np.random.default_rng(FLAGS.seed)

        def batches():
            while True:
                order = rng.permutation(len(x_train))
                for i in range(0, len(order) - FLAGS.batch_size + 1, FLAGS.batch_size):
                    idx = order[i:i + FLAGS.batch_size]
                    yield x_train[idx], y_train[idx]

        import tensorflow as tf

        train_ds = tf.data.Dataset.from_generator(
            batches, output_signature=(tf.TensorSpec((FLAGS.batch_size, x_train.shape[1]), tf.float32),
                                       tf.TensorSpec((FLAGS.batch_size,), tf.int32)))
        val_ds = (x_val, y_val)
    else:
        model = ViTClassifier(encoder, num_classes, pool=FLAGS.pool, linear_probe=True)
        model.compile(optimizer=LARS(schedule, weight_decay=FLAGS.weight_decay), loss=loss, metrics=metrics)
        train_ds = data.labelled_dataset(train_src, FLAGS.batch_size, FLAGS.image_size, mean, std, train=True,
                                         seed=FLAGS.seed)
        val_ds = eval_batches
    best = keras.callbacks.ModelCheckpoint(os.path.join(FLAGS.output_dir, "best.keras"), monitor="val_top1",
                                           mode="max", save_best_only=True)
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    history = model.fit(train_ds, epochs=FLAGS.epochs, steps_per_epoch=steps, validation_data=val_ds,
                        callbacks=[best, keras.callbacks.TensorBoard(os.path.join(FLAGS.output_dir, "tensorboard"))],
                        verbose=2)
    h = history.history
    if not all(np.array_equal(a, b) for a, b in zip(before, encoder.get_weights())):
        raise RuntimeError("the encoder changed during linear probing")  # a frozen encoder must stay frozen
    final = dict(
        top1=float(h["val_top1"][-1]), top5=float(h["val_top5"][-1]),
        best_top1=float(max(h["val_top1"])), train_top1=float(h["top1"][-1]),
        epochs_run=len(h["loss"]), seconds=round(time.time() - start, 1), encoder=FLAGS.encoder,
        cache_features=FLAGS.cache_features, pool=FLAGS.pool,
    )
    common.report(FLAGS.output_dir, final, h, derived)


if __name__ == "__main__":
    app.run(main)
