#!/usr/bin/env python
r"""MAE / LC-MAE pretraining: flags -> builders -> ``model.fit``.

    python recipes/pretrain.py --flagfile=recipes/configs/demo_cpu.flags
    python recipes/pretrain.py --data=/data/imagenet/train --model=vit_base --method=lcmae \
        --loss_weights=a --batch_size=1024 --epochs=100 --output_dir=runs/lcmae

Every flag equals a constructor argument or a recipe knob. The run folder gets
``flags.txt`` (resolved flags), ``model_config.json``, TensorBoard logs in
``tensorboard/`` (the flags and the final figures also in its HParams
dashboard), ``backup/`` (rerun the same command to resume after preemption), periodic
checkpoints, ``encoder.keras`` and ``metrics.json``; the last stdout line is
one JSON object with the final figures.
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
SETTINGS = tuple("abcdefg")  # the keys of keras_lcmae.models.SETTINGS (parsing the flags imports no Keras)
flags.DEFINE_string(
    "data", "fashion_mnist", "fashion_mnist (offline demo), an image folder, tfds:NAME, or a TFRecord glob."
)
flags.DEFINE_integer("image_size", 224, "Input side in pixels.", lower_bound=1)
flags.DEFINE_integer(
    "patch_size",
    None,
    lower_bound=1,
    help="Patch side in pixels (default: the --model preset's: 14 for vit_huge, as official MAE's ViT-H/14, else 16).",
)
flags.DEFINE_integer("num_channels", None, "Image channels (default: 1 for fashion_mnist, else 3).", lower_bound=1)
flags.DEFINE_string(
    "model", "vit_base", "Encoder preset: vit_test, vit_tiny, vit_small, vit_base, vit_large, vit_huge."
)
flags.DEFINE_integer("hidden_dim", None, "Override the preset's width.", lower_bound=1)
flags.DEFINE_integer("depth", None, "Override the preset's depth.", lower_bound=1)
flags.DEFINE_integer("num_heads", None, "Override the preset's heads.", lower_bound=1)
flags.DEFINE_enum(
    "method",
    "lcmae",
    ["mae", "lcmae", "ae"],
    "Pretraining method; ae = AutoEncoder(k), no masking (LC-MAE paper Table 3, see --block_size).",
)
flags.DEFINE_integer(
    "block_size",
    None,
    lower_bound=1,
    help="--method=ae: side k in pixels of the block each token predicts "
    "(default: --patch_size; k >= patch_size, k - patch_size even).",
)
flags.DEFINE_float("mask_ratio", 0.75, "Fraction of patches removed.", lower_bound=0, upper_bound=1)
flags.DEFINE_bool("norm_pix_loss", True, "Reconstruct per-patch normalised pixels.")
flags.DEFINE_string(
    "loss_weights",
    "a",
    "LC-MAE's loss_weights: a setting a-g of Table 1 of the paper, or three "
    "comma-separated non-negative numbers w_mae,w_cross,w_in (not all zero).",
)
flags.register_validator(
    "loss_weights",
    lambda v: parse_loss_weights(v) is not None,
    "must be one of the LC-MAE settings a-g (Table 1 of the paper) or three comma-separated "
    "non-negative numbers w_mae,w_cross,w_in, not all zero",
)
flags.DEFINE_integer("decoder_depth", 8, "Decoder blocks (LC-MAE paper: 2).", lower_bound=1)
flags.DEFINE_integer("decoder_hidden_dim", 512, "Decoder width.", lower_bound=1)
flags.DEFINE_integer("decoder_num_heads", 16, "Decoder heads.", lower_bound=1)
flags.DEFINE_enum(
    "decoder",
    "transformer",
    ["transformer", "gaussian", "conv"],
    "Decoder (LC-MAE paper Table 2): transformer, gaussian weighted average + MLP, or one conv layer.",
)
flags.DEFINE_integer("decoder_kernel_size", 5, "--decoder=conv: kernel size in patches (odd; paper: 5).", lower_bound=1)
flags.DEFINE_float("decoder_sigma", 1.0, "--decoder=gaussian: Gaussian std in patches (paper: 1).", lower_bound=0)
flags.DEFINE_integer("projector_dim", 1024, "LC-MAE projector width.", lower_bound=1)
flags.DEFINE_enum("projector_input", "pred", ["pred", "hidden"], "What the projector reads.")
flags.DEFINE_enum(
    "masking",
    "random",
    ["random", "self_guided"],
    "random (official MAE) or self_guided (Self-guided MAE informed masks; MAE and LC-MAE).",
)
flags.DEFINE_integer(
    "informed_start_epoch",
    None,
    lower_bound=0,
    help="--masking=self_guided: first epoch (0-based) with informed masks (default: once the patch clustering "
    "has formed: a quarter of --epochs, rounded up; docs/self_guided.md).",
)
flags.DEFINE_float(
    "hint_ratio",
    0.05,
    lower_bound=0,
    upper_bound=1,
    help="--masking=self_guided: fraction of the masked patches given back as hints.",
)
flags.DEFINE_string("guide_layer", "-1", "--masking=self_guided: encoder block index (-1: last) or 'decoder'.")
flags.DEFINE_enum(
    "hint_strategy",
    "similarity",
    ["similarity", "random"],
    "--masking=self_guided: hints drawn by their similarity score (weights (1 + score) / 2) or uniformly.",
)
common.define_run_flags(
    dict(batch_size=4096, epochs=400, blr=1.5e-4, warmup_epochs=40, weight_decay=0.05, output_dir="runs/pretrain")
)
flags.DEFINE_integer(
    "train_limit",
    None,
    lower_bound=1,
    help="Pretrain on the first N training images only (N=1: the single-image pretraining of the LC-MAE "
    "paper's Table A.1; the images repeat with fresh augmentations until --steps_per_epoch).",
)
flags.DEFINE_integer("save_every", 1, "Epochs between checkpoints.", lower_bound=1)
flags.DEFINE_integer(
    "monitor_every",
    1,
    lower_bound=0,
    help="Epochs between the kNN and linear-probe monitors (0: off; fashion_mnist only).",
)
flags.DEFINE_enum("monitor_pool", "cls", ["cls", "avg"], "Monitor features: [CLS] token or mean patch token.")
flags.DEFINE_integer("monitor_bank", 5000, "Labelled training images the monitors fit on.", lower_bound=1)
flags.DEFINE_integer("monitor_queries", 2000, "Held-out (test split) images the monitors score.", lower_bound=1)
flags.DEFINE_integer(
    "online_probe_every",
    1,
    lower_bound=0,
    help="Steps between online linear-probe steps (0: no online probe; fashion_mnist with --monitor_every only).",
)
# The names of a former release, kept for one more: each warns and sets the flag that replaces it.
for old, new in (
    ("channels", "num_channels"),
    ("decoder_width", "decoder_hidden_dim"),
    ("decoder_heads", "decoder_num_heads"),
    ("decoder_kernel", "decoder_kernel_size"),
    ("gaussian_sigma", "decoder_sigma"),
    ("setting", "loss_weights"),
):
    common.define_alias(old, new)
flags.register_validator(
    "setting",
    lambda v: v is None or v.strip().strip("()").lower() in SETTINGS,
    "must be one of the LC-MAE settings a-g (Table 1 of the paper)",
)
# --w_*: the weight of one loss term, replacing that of the --loss_weights row (read by loss_weights_from_flags)
for term, loss in (("mae", "L_MAE"), ("cross", "L_cross"), ("in", "L_in")):
    flags.DEFINE_float(
        f"w_{term}",
        None,
        f"Deprecated: use --loss_weights=w_mae,w_cross,w_in. The {loss} weight, "
        "replacing the one of the --loss_weights row.",
        lower_bound=0,
    )
    common.define_alias(f"w_{term}", "loss_weights", copy=False)
common.check_numbers()
flags.adopt_module_key_flags(common)  # --help lists the run flags of recipes/common.py too
__doc__ = common.usage(__doc__, __file__)  # absl's --help prints it, with the flagfiles of recipes/configs/


def parse_loss_weights(value):
    """``--loss_weights`` as LCMAE takes it: a setting letter (``"a"``,
    ``"(b)"``) as given, or ``{"mae", "cross", "in"}`` from three
    comma-separated numbers; None for a value that is neither (or weights
    that are negative, not finite or all zero)."""
    import math

    if value.strip().strip("()").lower() in SETTINGS:
        return value
    parts = value.split(",")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        return None
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        return None
    return dict(zip(("mae", "cross", "in"), weights))


def loss_weights_from_flags():
    """LCMAE's ``loss_weights``: ``--loss_weights`` (a setting letter or three
    numbers), with the weights of any deprecated ``--w_mae`` / ``--w_cross`` /
    ``--w_in`` given replacing those of the row."""
    weights = parse_loss_weights(FLAGS.loss_weights)
    explicit = (FLAGS.w_mae, FLAGS.w_cross, FLAGS.w_in)
    if all(w is None for w in explicit):
        return weights
    from keras_lcmae.models import resolve_loss_weights

    base = resolve_loss_weights(weights)
    return {k: (base[k] if w is None else w) for k, w in zip(("mae", "cross", "in"), explicit)}


def build_dataset(batch_size):
    """Returns ``(dataset, num_images, channels, mean, std, skipped)``."""
    from keras_lcmae import data

    channels = FLAGS.num_channels
    skipped = None
    if FLAGS.data == "fashion_mnist":
        channels = channels or 1
        images, labels = data.load_fashion_mnist("train", limit=FLAGS.train_limit)
        source = data.array_dataset(images if channels == 1 else np.repeat(images[..., None], 3, -1), labels)
        n = len(images)
        mean, std = (data.FASHION_MNIST_MEAN * channels, data.FASHION_MNIST_STD * channels)
    else:
        channels = channels or 3
        mean, std = (data.IMAGENET_MEAN, data.IMAGENET_STD) if channels == 3 else ((0.5,) * channels, (0.5,) * channels)
        if FLAGS.data.startswith("tfds:"):
            source = data.tfds_dataset(FLAGS.data[5:], channels=channels)
            n = int(source.cardinality())
        elif os.path.isdir(FLAGS.data):
            source, _, skipped, n = data.image_folder_dataset(FLAGS.data, channels=channels)
        elif "tfrecord" in FLAGS.data or "*" in FLAGS.data:
            skipped = data.SkipCounter("TFRecord record(s)")
            source = data.tfrecord_dataset(FLAGS.data, channels=channels, skipped=skipped)
            n = None if FLAGS.steps_per_epoch else data.count_tfrecords(FLAGS.data)
        else:
            raise app.UsageError(
                f"--data: {FLAGS.data!r} is not fashion_mnist, a folder, tfds:NAME or a TFRecord glob."
            )
        if FLAGS.train_limit:
            source = source.take(FLAGS.train_limit)
            n = FLAGS.train_limit if n is None else min(n, FLAGS.train_limit)
    ds = data.batched_pretrain_dataset(source, batch_size, FLAGS.image_size, mean, std, seed=FLAGS.seed)
    return ds, n, channels, mean, std, skipped


def build_decoder_from_flags():
    """The ``--decoder`` of width ``--decoder_hidden_dim`` (depth and heads
    apply to the transformer, ``--decoder_kernel_size`` to conv,
    ``--decoder_sigma`` to gaussian)."""
    from keras_lcmae.decoders import build_decoder

    kwargs = {
        "transformer": dict(depth=FLAGS.decoder_depth, num_heads=FLAGS.decoder_num_heads),
        "gaussian": dict(sigma=FLAGS.decoder_sigma),
        "conv": dict(kernel_size=FLAGS.decoder_kernel_size),
    }[FLAGS.decoder]
    return build_decoder(FLAGS.decoder, hidden_dim=FLAGS.decoder_hidden_dim, **kwargs)


def build_model(channels):
    from keras_lcmae import LCMAE, MAE, AutoEncoder, RandomMasking, SelfGuidedMasking, ViTEncoder

    encoder = ViTEncoder.from_preset(
        FLAGS.model,
        image_size=FLAGS.image_size,
        patch_size=FLAGS.patch_size,
        num_channels=channels,
        hidden_dim=FLAGS.hidden_dim,
        depth=FLAGS.depth,
        num_heads=FLAGS.num_heads,
    )
    decoder = build_decoder_from_flags()
    if FLAGS.method == "ae":  # no masking: the masking flags do not apply
        return AutoEncoder(encoder, decoder, block_size=FLAGS.block_size, norm_pix_loss=FLAGS.norm_pix_loss)
    masking = RandomMasking()
    if FLAGS.masking == "self_guided":
        masking = SelfGuidedMasking(
            informed_start_epoch=FLAGS.informed_start_epoch,
            hint_ratio=FLAGS.hint_ratio,
            guide_layer=parse_guide_layer(FLAGS.guide_layer),
            hint_strategy=FLAGS.hint_strategy,
        )
    shared = dict(mask_ratio=FLAGS.mask_ratio, norm_pix_loss=FLAGS.norm_pix_loss, seed=FLAGS.seed, masking=masking)
    if FLAGS.method == "mae":
        return MAE(encoder, decoder, **shared)
    return LCMAE(
        encoder,
        decoder,
        projector_dim=FLAGS.projector_dim,
        loss_weights=loss_weights_from_flags(),
        projector_input=FLAGS.projector_input,
        **shared,
    )


def build_monitors(channels, mean, std):
    """kNN, linear-probe and online-probe monitors on Fashion-MNIST: fit on
    (the online probe: trained alongside on batches of) the first
    ``--monitor_bank`` training images, scored on the first
    ``--monitor_queries`` test images (resized, not augmented)."""
    if not FLAGS.monitor_every or FLAGS.data != "fashion_mnist":
        return []
    from keras_lcmae import data
    from keras_lcmae.callbacks import KNNMonitor, LinearProbeMonitor, OnlineLinearProbe

    splits = []
    for split, limit in (("train", FLAGS.monitor_bank), ("test", FLAGS.monitor_queries)):
        images, labels = data.load_fashion_mnist(split, limit=limit)
        images = images[..., None] if channels == 1 else np.repeat(images[..., None], channels, -1)
        ds = data.labelled_dataset(
            data.array_dataset(images, labels), 1024, FLAGS.image_size, mean, std, train=False, crop_pct=1.0
        )
        batches = [(x.numpy(), y.numpy()) for x, y in ds]
        splits += [np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])]
    every = FLAGS.monitor_every
    pool = FLAGS.monitor_pool
    monitors = [
        KNNMonitor(*splits, num_classes=10, every=every, pool=pool),
        LinearProbeMonitor(*splits, num_classes=10, every=every, pool=pool),
    ]
    if FLAGS.online_probe_every:
        monitors.insert(
            0, OnlineLinearProbe(*splits, num_classes=10, pool=pool, every=FLAGS.online_probe_every, seed=FLAGS.seed)
        )
    return monitors


def parse_guide_layer(value):
    """``--guide_layer``: ``"decoder"`` or an encoder block index."""
    value = str(value).strip()
    if value == "decoder":
        return value
    try:
        return int(value)
    except ValueError:
        raise app.UsageError(
            f"--guide_layer: {value!r} is neither an encoder block index (e.g. -1, the last block) nor 'decoder'."
        ) from None


def validate_masking_flags():
    """The self-guided masking flags, checked before any work."""
    from keras_lcmae.encoder import PRESETS
    from keras_lcmae.masking import num_hints
    from keras_lcmae.ops import grid_shape

    if FLAGS.masking != "self_guided":
        return
    grid = grid_shape(FLAGS.image_size, FLAGS.patch_size)
    try:
        num_hints(grid[0] * grid[1], FLAGS.mask_ratio, FLAGS.hint_ratio)
    except ValueError as e:
        raise app.UsageError(f"--hint_ratio: {e}") from None
    if FLAGS.informed_start_epoch is None:
        from keras_lcmae.masking import SelfGuidedMasking

        if SelfGuidedMasking().start_epoch(FLAGS.epochs) >= FLAGS.epochs:
            raise app.UsageError(
                f"--informed_start_epoch: the default start (once the clustering has formed, a quarter of "
                f"--epochs={FLAGS.epochs}, rounded up) leaves no epoch with informed masks; pass "
                "--informed_start_epoch=0 or more --epochs."
            )
    elif FLAGS.informed_start_epoch < 0:
        raise app.UsageError(f"--informed_start_epoch must be >= 0, got {FLAGS.informed_start_epoch}.")
    elif FLAGS.informed_start_epoch >= FLAGS.epochs:
        raise app.UsageError(
            f"--informed_start_epoch={FLAGS.informed_start_epoch} is not below --epochs={FLAGS.epochs}: informed "
            "masks would never be used; lower it or use --masking=random."
        )
    layer = parse_guide_layer(FLAGS.guide_layer)
    depth = FLAGS.depth or PRESETS[FLAGS.model]["depth"]
    if layer != "decoder" and not -depth <= layer < depth:
        raise app.UsageError(
            f"--guide_layer={layer} is outside the encoder's {depth} blocks; use an index in [-{depth}, {depth}) "
            "or 'decoder'."
        )


def validate_decoder_flags():
    """--decoder / --decoder_kernel_size / --decoder_sigma and --method=ae's --block_size."""
    if FLAGS.decoder == "conv" and (FLAGS.decoder_kernel_size < 1 or FLAGS.decoder_kernel_size % 2 == 0):
        raise app.UsageError(
            f"--decoder_kernel_size must be a positive odd number (paper: 5), got {FLAGS.decoder_kernel_size}."
        )
    if FLAGS.decoder == "gaussian" and not FLAGS.decoder_sigma > 0:
        raise app.UsageError(f"--decoder_sigma must be > 0 (in patches; paper: 1.0), got {FLAGS.decoder_sigma}.")
    if FLAGS.decoder != "transformer" and FLAGS.decoder_hidden_dim % 4:
        raise app.UsageError(
            f"--decoder_hidden_dim must be a multiple of 4 (sin-cos table), got {FLAGS.decoder_hidden_dim}."
        )
    if FLAGS.block_size is not None:
        k, p = FLAGS.block_size, FLAGS.patch_size
        if FLAGS.method != "ae":
            raise app.UsageError(f"--block_size applies to --method=ae only (got --method={FLAGS.method}).")
        if k < p or (k - p) % 2:
            raise app.UsageError(
                f"--block_size={k} must be >= --patch_size={p} with block_size - patch_size even "
                f"(a block centred on its patch), e.g. --block_size={3 * p}."
            )
    if FLAGS.method == "ae" and FLAGS.masking != "random":
        raise app.UsageError("--masking: --method=ae does not mask; leave --masking at 'random' (it is ignored).")


def validate_flags():
    """Fails before any work with a message naming the flag."""
    from keras_lcmae.encoder import PRESETS
    from keras_lcmae.masking import num_visible
    from keras_lcmae.ops import grid_shape

    if FLAGS.model not in PRESETS:
        raise app.UsageError(f"--model: unknown preset {FLAGS.model!r}; choose one of {sorted(PRESETS)}.")
    if FLAGS.patch_size is None:
        FLAGS.patch_size = PRESETS[FLAGS.model].get("patch_size", 16)
    if FLAGS.patch_size < 1:
        raise app.UsageError(f"--patch_size must be >= 1, got {FLAGS.patch_size}.")
    try:
        grid = grid_shape(FLAGS.image_size, FLAGS.patch_size)
    except ValueError as e:
        raise app.UsageError(f"--image_size/--patch_size: {e}") from None
    try:
        num_visible(grid[0] * grid[1], FLAGS.mask_ratio)
    except ValueError as e:
        raise app.UsageError(f"--mask_ratio: {e}") from None
    validate_decoder_flags()
    if FLAGS.method == "lcmae":
        from keras_lcmae.models import resolve_loss_weights

        try:
            resolve_loss_weights(loss_weights_from_flags())
        except ValueError as e:
            raise app.UsageError(f"--loss_weights/--w_mae/--w_cross/--w_in: {e}") from None
    common.validate_run_flags()
    validate_masking_flags()
    if FLAGS.online_probe_every < 0:
        raise app.UsageError(f"--online_probe_every must be >= 0 (0: off), got {FLAGS.online_probe_every}.")
    if FLAGS.data != "fashion_mnist" and not (
        FLAGS.data.startswith("tfds:") or os.path.exists(FLAGS.data) or "*" in FLAGS.data
    ):
        raise app.UsageError(f"--data: {FLAGS.data!r} does not exist.")


def main(argv):
    del argv
    validate_flags()
    run = common.start_run()
    import keras

    from keras_lcmae import optim
    from keras_lcmae.callbacks import last_good_checkpoint, pretrain_callbacks
    from keras_lcmae.errors import ArgumentError

    try:
        ds, n, channels, mean, std, skipped = build_dataset(run.plan.global_micro_batch)
    except ArgumentError:  # names its argument: common.run makes it a flag error
        raise
    except (ValueError, OSError) as e:  # missing / empty / unreadable data
        raise app.UsageError(common.flag_message("--data", FLAGS.data, e)) from None
    steps, schedule, derived = common.lr_schedule(run, n)
    derived["patch_size"] = FLAGS.patch_size
    with run.scope():
        model = build_model(channels)
        model.compile(
            optimizer=optim.adamw(model, schedule, FLAGS.weight_decay, accum_steps=run.plan.accum_steps),
            jit_compile=common.jit_compile(),
        )
    common.write_run_files(run, model.get_config(), derived)
    params = dict(
        encoder_params=int(model.encoder.count_params()),
        model_params=int(sum(int(np.prod(w.shape)) for w in model.trainable_weights)),
    )
    plan = common.print_plan(run, derived, model, params=params)
    if FLAGS.dry_run:
        print(json.dumps({"dry_run": True, **plan}, default=str), flush=True)
        return
    preview = next(iter(ds.take(1)))
    preview = keras.ops.convert_to_numpy(preview[0] if isinstance(preview, tuple) else preview)
    callbacks = pretrain_callbacks(
        run.output_dir,
        model,
        schedule,
        run.plan.global_micro_batch,
        FLAGS.save_every,
        skipped,
        preview,
        mean,
        std,
        backup_every=FLAGS.backup_every,
        total_steps=derived["total_steps"],
        monitors=build_monitors(channels, mean, std),
        log_every=FLAGS.log_every,
        accum_steps=run.plan.accum_steps,
    )
    encoder_path = os.path.join(run.output_dir, "encoder.keras")

    def keep_last_good_encoder():
        checkpoint = last_good_checkpoint(os.path.join(run.output_dir, "checkpoints"))
        if checkpoint is None:
            return "no checkpoint was finished before, so no encoder.keras was written"
        keras.saving.load_model(checkpoint).encoder.save(encoder_path)
        return f"encoder.keras holds the encoder of the last good checkpoint, {checkpoint}"

    start = time.time()
    history = common.fit(run, model, ds, steps, callbacks, on_divergence=keep_last_good_encoder)
    seconds = time.time() - start
    model.encoder.save(encoder_path)
    final = {k: float(v[-1]) for k, v in history.history.items()}
    final.update(
        epochs_run=len(history.history.get("loss", [])),
        steps=common.updates_done(model),
        seconds=round(seconds, 1),
        skipped_files=skipped.count if skipped else 0,
        encoder=encoder_path,
    )
    common.report(run, final, history.history, derived)


if __name__ == "__main__":
    common.run(main)
