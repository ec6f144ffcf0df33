#!/usr/bin/env python
"""End-to-end finetuning of a pretrained encoder (official MAE ``main_finetune.py``).

    python recipes/finetune.py --flagfile=recipes/configs/finetune_vitb16_in1k.flags --encoder=runs/lcmae/encoder.keras
    python recipes/finetune.py --flagfile=recipes/configs/finetune_demo_cpu.flags --encoder=runs/demo_cpu/pretrain/encoder.keras

Global average pooling + fc_norm (or ``--pool=cls``), drop path, layer-wise lr
decay, AdamW (torch's betas 0.9/0.999; no decay on 1-D parameters, the
``[CLS]`` token and the position table), lr = blr * batch / 256 with warmup
then cosine; RandomResizedCrop + flip + RandAugment, random erasing, Mixup /
CutMix with label smoothing. Reports top-1/top-5 on the validation split each
epoch, keeps the best checkpoint (``best.keras``), writes ``metrics.json``,
TensorBoard logs in ``tensorboard/`` (the flags and the final figures also in
its HParams dashboard) and one final JSON line.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app, flags

from recipes import common

FLAGS = flags.FLAGS
common.define_eval_flags(
    dict(
        batch_size=1024,
        epochs=100,
        blr=5e-4,
        warmup_epochs=5,
        weight_decay=0.05,
        pool="avg",
        output_dir="runs/finetune",
    )
)
flags.DEFINE_float(
    "layer_decay",
    0.65,
    "Layer-wise lr decay (official ViT-B: 0.65; script default 0.75).",
    lower_bound=0,
    upper_bound=1,
)
flags.DEFINE_float("drop_path_rate", 0.1, "Stochastic depth rate of the last block.", lower_bound=0, upper_bound=1)
flags.DEFINE_float("smoothing", 0.1, "Label smoothing.", lower_bound=0, upper_bound=1)
flags.DEFINE_float("mixup_alpha", 0.8, "Mixup alpha (0: off).", lower_bound=0)
flags.DEFINE_float("cutmix_alpha", 1.0, "CutMix alpha (0: off).", lower_bound=0)
flags.DEFINE_float("reprob", 0.25, "Random erasing probability.", lower_bound=0, upper_bound=1)
flags.DEFINE_float(
    "crop_min_scale", 0.08, "Smallest area fraction of RandomResizedCrop (official 0.08).", lower_bound=0, upper_bound=1
)
flags.DEFINE_float("randaug_magnitude", 9, "RandAugment magnitude on timm's 0-10 scale (0: off).", lower_bound=0)
flags.DEFINE_float("randaug_mstd", 0.5, "Spread of the RandAugment magnitude (timm's mstd).", lower_bound=0)
# The names of a former release, kept for one more: each warns and sets the flag that replaces it.
for old, new in (("drop_path", "drop_path_rate"), ("mixup", "mixup_alpha"), ("cutmix", "cutmix_alpha")):
    common.define_alias(old, new)
common.check_numbers()
flags.adopt_module_key_flags(common)  # --help lists the run flags of recipes/common.py too
__doc__ = common.usage(__doc__, __file__)  # absl's --help prints it, with the flagfiles of recipes/configs/


def train_dataset(source, num_classes, mean, std, batch_size):
    """Crop + flip + RandAugment -> normalise -> erase -> batch -> Mixup/CutMix."""
    import keras
    import tensorflow as tf

    from keras_lcmae import data

    crop = data.pretrain_transform(
        FLAGS.image_size, (0.0,) * len(mean), (1 / 255.0,) * len(mean), (FLAGS.crop_min_scale, 1.0)
    )
    layers = []
    if FLAGS.randaug_magnitude > 0:
        # Keras draws the magnitude uniformly in `factor`; this range has timm's mean m/10 and std mstd/10.
        m, half = FLAGS.randaug_magnitude / 10, FLAGS.randaug_mstd / 10 * 3**0.5
        layers.append(
            keras.layers.RandAugment(
                value_range=(0, 255), num_ops=2, factor=(max(m - half, 0.0), min(m + half, 1.0)), seed=FLAGS.seed
            )
        )
    erase = (
        keras.layers.RandomErasing(factor=FLAGS.reprob, value_range=(0, 255), seed=FLAGS.seed) if FLAGS.reprob else None
    )
    ds = source.shuffle(10_000, seed=FLAGS.seed, reshuffle_each_iteration=True).repeat()
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter()))
    channels = len(mean)

    def augment(pair, index):
        image, label = pair
        image = crop(image, tf.stack([tf.cast(FLAGS.seed, tf.int64), index]))  # 0-255 floats
        if layers and channels == 3:  # RandAugment's colour ops need RGB
            image = layers[0](image)
        if erase is not None:
            image = erase(image)
        return data.normalize(image, mean, std), label

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True)  # a micro-batch: Mixup/CutMix pair images within it
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter()))

    def mix(batch, index):
        images, labels = batch
        seed = tf.stack([tf.cast(FLAGS.seed + 1, tf.int64), index])
        return data.mixup_cutmix(
            images, labels, num_classes, FLAGS.mixup_alpha, FLAGS.cutmix_alpha, smoothing=FLAGS.smoothing, seed=seed
        )

    return ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def main(argv):
    del argv
    common.validate_eval_flags()
    if not 0 < FLAGS.layer_decay <= 1:
        raise app.UsageError(f"--layer_decay must be in (0, 1], got {FLAGS.layer_decay}.")
    run = common.start_run()
    import keras
    import tensorflow as tf

    from keras_lcmae import ViTClassifier, data, finetune_adamw
    from keras_lcmae.training import BestCheckpoint

    train_src, val_src, num_classes, n_train, channels, mean, std, crop_pct = common.labelled_data()
    steps, schedule, derived = common.lr_schedule(run, n_train)
    derived.update(num_classes=num_classes, encoder=FLAGS.encoder)
    with run.scope():
        encoder = common.build_encoder(channels, drop_path_rate=FLAGS.drop_path_rate)
        model = ViTClassifier(encoder, num_classes, pool=FLAGS.pool)
        model.compile(
            optimizer=finetune_adamw(
                model, schedule, FLAGS.weight_decay, FLAGS.layer_decay, accum_steps=run.plan.accum_steps
            ),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
            metrics=[
                keras.metrics.CategoricalAccuracy(name="top1"),
                keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5"),
            ],
            jit_compile=common.jit_compile(),
        )
    common.write_run_files(run, model.get_config(), derived)
    plan = common.print_plan(run, derived, model, params=dict(model_params=int(model.count_params())))
    if FLAGS.dry_run:
        print(json.dumps({"dry_run": True, **plan}, default=str), flush=True)
        return
    train = train_dataset(train_src, num_classes, mean, std, run.plan.global_micro_batch)
    val = data.labelled_dataset(
        val_src, min(run.plan.global_micro_batch, 512), FLAGS.image_size, mean, std, train=False, crop_pct=crop_pct
    ).map(lambda x, y: (x, tf.one_hot(y, num_classes)))
    best = os.path.join(run.output_dir, "best.keras")
    callbacks = common.run_callbacks(
        run, schedule, derived["total_steps"], after=[BestCheckpoint(best, monitor="val_top1", mode="max")]
    )
    start = time.time()
    history = common.fit(run, model, train, steps, callbacks, validation_data=val)
    model.save(os.path.join(run.output_dir, "last.keras"))  # the final weights (best.keras: the best epoch's)
    h = history.history
    final = dict(
        top1=float(h["val_top1"][-1]),
        top5=float(h["val_top5"][-1]),
        loss=float(h["loss"][-1]),
        best_top1=float(np.max(h["val_top1"])),
        epochs_run=len(h["loss"]),
        steps=common.updates_done(model),
        seconds=round(time.time() - start, 1),
        encoder=FLAGS.encoder,
        best_checkpoint=best,
    )
    common.report(run, final, h, derived)


if __name__ == "__main__":
    common.run(main)
