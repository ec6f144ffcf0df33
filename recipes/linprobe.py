#!/usr/bin/env python
"""Linear probing of a pretrained encoder (official MAE ``main_linprobe.py``).

    python recipes/linprobe.py --encoder=runs/demo_cpu/pretrain/encoder.keras --flagfile=recipes/configs/linprobe_demo_cpu.flags
    python recipes/linprobe.py --flagfile=recipes/configs/linprobe_vitb16_in1k.flags --encoder=runs/lcmae/encoder.keras

The encoder is frozen (inference mode); the head is BatchNorm without affine
(eps 1e-6) then a linear layer; LARS (momentum 0.9, no weight decay by
default) with lr = blr * batch / 256, warmup then cosine; RandomResizedCrop +
flip only. ``--cache_features`` trades the crop augmentation for speed: the
features of the centre-cropped training images are computed once and the head
is trained on them (the quick protocol of the CPU demo); the same features
then also give a weighted kNN score (``--knn_k``, ``knn_top1``). Reports top-1/top-5
on the validation split each epoch, keeps the best, writes ``metrics.json``,
TensorBoard logs in ``tensorboard/`` (the flags and the final figures also in
its HParams dashboard) and one final JSON line.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import flags

from recipes import common

FLAGS = flags.FLAGS
common.define_eval_flags(
    dict(
        batch_size=16384, epochs=90, blr=0.1, warmup_epochs=10, weight_decay=0.0, pool="cls", output_dir="runs/linprobe"
    )
)
flags.DEFINE_bool("cache_features", False, "Train the head on features computed once (no crop augmentation).")
flags.DEFINE_integer(
    "knn_k",
    20,
    lower_bound=0,
    help="With --cache_features: also score a weighted kNN classifier (DINO's, temperature 0.07) with this many "
    "neighbours on the same features, reported as knn_top1 (0: off).",
)
common.check_numbers()
flags.adopt_module_key_flags(common)  # --help lists the run flags of recipes/common.py too
__doc__ = common.usage(__doc__, __file__)  # absl's --help prints it, with the flagfiles of recipes/configs/


def head_model(dim, num_classes):
    """BatchNorm without affine (eps 1e-6) + linear head: the probe on features
    (the same layers ``ViTClassifier(linear_probe=True)`` puts on the encoder)."""
    import keras

    from keras_lcmae.classifier import probe_batch_norm

    inputs = keras.Input((dim,))
    x = probe_batch_norm()(inputs)
    x = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01), name="head")(x)
    return keras.Model(inputs, x, name="linear_probe_head")


def main(argv):
    del argv
    common.validate_eval_flags()
    run = common.start_run()
    import keras
    import tensorflow as tf

    from keras_lcmae import LARS, ViTClassifier, data, extract_features
    from keras_lcmae.training import BestCheckpoint

    train_src, val_src, num_classes, n_train, channels, mean, std, crop_pct = common.labelled_data()
    steps, schedule, derived = common.lr_schedule(run, n_train)
    derived.update(num_classes=num_classes, encoder=FLAGS.encoder)
    micro = run.plan.global_micro_batch
    metrics = [
        keras.metrics.SparseCategoricalAccuracy(name="top1"),
        keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
    ]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    eval_batches = data.labelled_dataset(
        val_src, min(micro, 1024), FLAGS.image_size, mean, std, train=False, crop_pct=crop_pct
    )

    def optimizer():
        return LARS(schedule, weight_decay=FLAGS.weight_decay, accum_steps=run.plan.accum_steps)

    if FLAGS.cache_features:
        encoder = common.build_encoder(channels)  # features are computed once, before training
        with run.scope():
            model = head_model(encoder.hidden_dim, num_classes)
            model.compile(optimizer=optimizer(), loss=loss, metrics=metrics, jit_compile=common.jit_compile())
    else:
        with run.scope():
            encoder = common.build_encoder(channels)
            model = ViTClassifier(encoder, num_classes, pool=FLAGS.pool, linear_probe=True)
            model.compile(optimizer=optimizer(), loss=loss, metrics=metrics, jit_compile=common.jit_compile())
    common.write_run_files(run, model.get_config(), derived)
    trainable = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    plan = common.print_plan(
        run,
        derived,
        encoder if FLAGS.cache_features else model,
        "linprobe" if FLAGS.cache_features else None,
        params=dict(trainable_params=trainable),
    )
    if FLAGS.dry_run:
        print(json.dumps({"dry_run": True, **plan}, default=str), flush=True)
        return
    before = [w.copy() for w in encoder.get_weights()]
    knn_top1 = None
    start = time.time()
    if FLAGS.cache_features:
        train_eval = data.labelled_dataset(train_src, 1024, FLAGS.image_size, mean, std, train=False, crop_pct=crop_pct)
        x_train, y_train = extract_features(encoder, train_eval, pool=FLAGS.pool)
        x_val, y_val = extract_features(encoder, eval_batches, pool=FLAGS.pool)
        common.check_labels(y_train, num_classes, "the training split")
        common.check_labels(y_val, num_classes, "the validation split")
        if FLAGS.knn_k:
            from keras_lcmae.evaluation import knn_accuracy

            knn_top1 = knn_accuracy(x_train, y_train, x_val, y_val, num_classes, k=min(FLAGS.knn_k, len(x_train)))
        rng = np.random.default_rng(FLAGS.seed)

        def batches():
            while True:
                order = rng.permutation(len(x_train))
                for i in range(0, len(order) - micro + 1, micro):
                    idx = order[i : i + micro]
                    yield x_train[idx], y_train[idx]

        train_ds = tf.data.Dataset.from_generator(
            batches,
            output_signature=(tf.TensorSpec((micro, x_train.shape[1]), tf.float32), tf.TensorSpec((micro,), tf.int32)),
        )
        val_ds = (x_val, y_val)
    else:
        train_ds = data.labelled_dataset(train_src, micro, FLAGS.image_size, mean, std, train=True, seed=FLAGS.seed)
        val_ds = eval_batches
    best = os.path.join(run.output_dir, "best.keras")
    callbacks = common.run_callbacks(
        run, schedule, derived["total_steps"], after=[BestCheckpoint(best, monitor="val_top1", mode="max")]
    )
    history = common.fit(run, model, train_ds, steps, callbacks, validation_data=val_ds)
    model.save(os.path.join(run.output_dir, "last.keras"))  # the final weights (best.keras: the best epoch's)
    h = history.history
    if not all(np.array_equal(a, b) for a, b in zip(before, encoder.get_weights())):
        raise RuntimeError("the encoder changed during linear probing")  # a frozen encoder must stay frozen
    final = dict(
        top1=float(h["val_top1"][-1]),
        top5=float(h["val_top5"][-1]),
        loss=float(h["loss"][-1]),
        best_top1=float(max(h["val_top1"])),
        train_top1=float(h["top1"][-1]),
        epochs_run=len(h["loss"]),
        steps=common.updates_done(model),
        seconds=round(time.time() - start, 1),
        encoder=FLAGS.encoder,
        cache_features=FLAGS.cache_features,
        pool=FLAGS.pool,
        best_checkpoint=best,
    )
    if knn_top1 is not None:
        final.update(knn_top1=knn_top1, knn_k=min(FLAGS.knn_k, len(x_train)))
    common.report(run, final, h, derived)


if __name__ == "__main__":
    common.run(main)
