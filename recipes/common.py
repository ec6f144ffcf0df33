"""What the evaluation recipes (linprobe.py, finetune.py) share: labelled
train/val data from one ``--data`` value, the encoder from ``--encoder``
(a pretraining run's ``encoder.keras``, a converted checkpoint, or ``random``),
and the final report. Library code lives in ``keras_lcmae``; this module only
maps flags onto it."""

import json
import os

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def define_common_flags(defaults):
    """Flags both evaluation recipes take; ``defaults`` overrides values."""
    d = dict(
        data="fashion_mnist", encoder="random", model="vit_base", image_size=224, patch_size=None,
        batch_size=256, epochs=10, blr=1e-3, warmup_epochs=1, weight_decay=0.0, pool="cls",
        output_dir="runs/eval",
    )
    d.update(defaults)
    flags.DEFINE_string("data", d["data"], "fashion_mnist (offline), a folder with train/ and val/ class folders, or tfds:NAME.")
    flags.DEFINE_string("encoder", d["encoder"], "encoder.keras of a pretraining run, a .keras MAE/LC-MAE model, "
                        "or 'random' (a fresh encoder of --model: the baseline).")
    flags.DEFINE_string("model", d["model"], "Encoder preset for --encoder=random.")
    flags.DEFINE_string("architecture_of", None, "With --encoder=random: copy the architecture (not the weights) "
                        "of this encoder.keras, so that the baseline matches a pretrained encoder exactly.")
    flags.DEFINE_integer("hidden_dim", None, "Override the preset's width (--encoder=random).")
    flags.DEFINE_integer("depth", None, "Override the preset's depth (--encoder=random).")
    flags.DEFINE_integer("num_heads", None, "Override the preset's heads (--encoder=random).")
    flags.DEFINE_integer("image_size", d["image_size"], "Input side in pixels (must match the encoder).")
    flags.DEFINE_integer("patch_size", d["patch_size"], "Patch side for --encoder=random (default: the --model "
                         "preset's: 14 for vit_huge, else 16).")
    flags.DEFINE_integer("channels", None, "Image channels (default: 1 for fashion_mnist, else 3).")
    flags.DEFINE_integer("num_classes", None, "Classes of the head (default: read from the data; checked against it).")
    flags.DEFINE_enum("pool", d["pool"], ["cls", "avg"], "Features: the [CLS] token or the mean patch token.")
    flags.DEFINE_integer("batch_size", d["batch_size"], "Global batch size.")
    flags.DEFINE_integer("epochs", d["epochs"], "Epochs.")
    flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (default: train images // batch).")
    flags.DEFINE_integer("train_limit", None, "Use only the first N training images (fashion_mnist, tfds; quick runs).")
    flags.DEFINE_integer("val_limit", None, "Evaluate on the first N validation images only (fashion_mnist, tfds; quick runs).")
    flags.DEFINE_float("blr", d["blr"], "Base lr; lr = blr * batch_size / 256.")
    flags.DEFINE_float("min_lr", 0.0, "Final lr of the cosine.")
    flags.DEFINE_float("warmup_epochs", d["warmup_epochs"], "Linear warmup epochs.")
    flags.DEFINE_float("weight_decay", d["weight_decay"], "Weight decay.")
    flags.DEFINE_string("output_dir", d["output_dir"], "Run folder.")
    flags.DEFINE_integer("seed", 0, "Seed of data order, augmentation and init.")
    define_keep_freed_memory_flag()


def define_keep_freed_memory_flag():
    """``--keep_freed_memory``, which every recipe takes (see :func:`keep_freed_memory`)."""
    flags.DEFINE_bool("keep_freed_memory", True, "Make glibc malloc keep and reuse freed memory "
                      "(keras_lcmae.cpu.keep_freed_memory): a CPU step then stops page-faulting its activations in "
                      "afresh; the process keeps its peak memory.")


def keep_freed_memory():
    """Applies ``--keep_freed_memory``; whether freed memory is now kept
    (False where the flag is off or malloc is not glibc's)."""
    from keras_lcmae import cpu  # noqa: PLC0415

    return bool(FLAGS.keep_freed_memory and cpu.keep_freed_memory())


def validate_common_flags():
    if FLAGS.architecture_of and not os.path.exists(FLAGS.architecture_of):
        raise app.UsageError(f"--architecture_of: {FLAGS.architecture_of!r} does not exist.")
    if FLAGS.encoder != "random" and not os.path.exists(FLAGS.encoder):
        raise app.UsageError(f"--encoder: {FLAGS.encoder!r} does not exist (give an encoder.keras or 'random').")
    if FLAGS.data != "fashion_mnist" and not FLAGS.data.startswith("tfds:") and not os.path.isdir(FLAGS.data):
        raise app.UsageError(f"--data: {FLAGS.data!r} is not fashion_mnist, tfds:NAME or a folder.")
    for name in ("batch_size", "epochs"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name} must be >= 1.")


def labelled_data():
    """``(train_source, val_source, num_classes, n_train, channels, mean, std,
    crop_pct)``; sources yield ``(uint8 image, int label)``."""
    from keras_lcmae import data

    channels = FLAGS.channels
    try:
        if FLAGS.data == "fashion_mnist":
            channels = channels or 1
            sources = []
            for split in ("train", "test"):
                images, labels = data.load_fashion_mnist(split, limit=FLAGS.train_limit if split == "train" else FLAGS.val_limit)
                images = images[..., None] if channels == 1 else np.repeat(images[..., None], channels, -1)
                sources.append((data.array_dataset(images, labels), len(images), labels))
            mean, std = data.FASHION_MNIST_MEAN * channels, data.FASHION_MNIST_STD * channels
            crop_pct = 1.0  # 28-px images whose objects fill the frame: resize, no crop
            (train, n_train, train_labels), (val, _, _) = sources
            num_classes = int(train_labels.max()) + 1
        elif FLAGS.data.startswith("tfds:"):
            channels = channels or 3
            train = data.tfds_dataset(FLAGS.data[5:], "train", channels=channels)
            try:
                val = data.tfds_dataset(FLAGS.data[5:], "validation", channels=channels)
            except ValueError:
                val = data.tfds_dataset(FLAGS.data[5:], "test", channels=channels)
            n_train = int(train.cardinality())
            if FLAGS.train_limit:
                train, n_train = train.take(FLAGS.train_limit), min(n_train, FLAGS.train_limit)
            if FLAGS.val_limit:
                val = val.take(FLAGS.val_limit)
            import tensorflow_datasets as tfds  # tfds_dataset above checked that it is installed

            num_classes = tfds.builder(FLAGS.data[5:]).info.features["label"].num_classes
            mean, std, crop_pct = data.IMAGENET_MEAN, data.IMAGENET_STD, 0.875
        else:
            channels = channels or 3
            folders = [os.path.join(FLAGS.data, s) for s in ("train", "val")]
            for f in folders:
                if not os.path.isdir(f):
                    raise ValueError(f"--data: {FLAGS.data!r} needs train/ and val/ sub-folders of class folders; "
                                     f"{f!r} is missing.")
                if not any(os.path.isdir(os.path.join(f, e)) for e in os.listdir(f)):
                    raise ValueError(f"--data: labels are missing: {f!r} holds no class sub-folders (one folder "
                                     f"of images per class is how labels are given).")
            train, train_classes, _, n_train = data.image_folder_dataset(folders[0], channels=channels)
            val, val_classes, _, _ = data.image_folder_dataset(folders[1], channels=channels)
            if not train_classes or list(val_classes) != list(train_classes):
                raise ValueError(f"--data: train/ and val/ must hold the same class folders (labels); got "
                                 f"{list(train_classes)[:5]}... and {list(val_classes)[:5]}...")
            num_classes = len(train_classes)
            if channels == 3:
                mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
            else:
                mean, std = (0.5,) * channels, (0.5,) * channels
            crop_pct = 0.875
    except (ValueError, OSError) as e:
        message = str(e)
        raise app.UsageError(message if message.startswith("--") else f"--data={FLAGS.data}: {message}") from None
    if num_classes is None or num_classes < 2:
        raise app.UsageError(f"--data: the training data has no usable labels (found {num_classes} classes).")
    if FLAGS.num_classes is not None and FLAGS.num_classes != num_classes:
        raise app.UsageError(f"--num_classes={FLAGS.num_classes} but the data has {num_classes} classes.")
    return train, val, num_classes, n_train, channels, mean, std, crop_pct


def build_encoder(channels, drop_path_rate=None):
    """The encoder of ``--encoder`` (checked against the data's geometry) or a
    fresh one of ``--model`` for ``--encoder=random``."""
    from keras_lcmae import ViTEncoder, load_encoder

    if FLAGS.encoder == "random" and FLAGS.architecture_of:
        try:
            template = load_encoder(FLAGS.architecture_of, image_size=FLAGS.image_size, num_channels=channels)
        except (ValueError, OSError) as e:
            raise app.UsageError(f"--architecture_of={FLAGS.architecture_of}: {e}") from None
        # from_config builds the same architecture with freshly initialised weights
        return ViTEncoder.from_config(dict(template.get_config(), drop_path_rate=drop_path_rate or 0.0, trainable=True))
    if FLAGS.encoder == "random":
        return ViTEncoder.from_preset(
            FLAGS.model, image_size=FLAGS.image_size, patch_size=FLAGS.patch_size, num_channels=channels,
            hidden_dim=FLAGS.hidden_dim, depth=FLAGS.depth, num_heads=FLAGS.num_heads,
            drop_path_rate=drop_path_rate or 0.0,
        )
    try:
        return load_encoder(FLAGS.encoder, image_size=FLAGS.image_size, num_channels=channels,
                            drop_path_rate=drop_path_rate)
    except (ValueError, OSError) as e:
        raise app.UsageError(f"--encoder={FLAGS.encoder}: {e}") from None


def lr_schedule(n_train, num_classes):
    """``(steps_per_epoch, schedule, derived)``: lr = blr * batch / 256, linear
    warmup over ``--warmup_epochs`` then cosine to ``--min_lr``, per step."""
    from keras_lcmae import optim

    steps = FLAGS.steps_per_epoch or max(n_train // FLAGS.batch_size, 1)
    lr = optim.scaled_lr(FLAGS.blr, FLAGS.batch_size)
    total = steps * FLAGS.epochs
    warmup = min(int(round(FLAGS.warmup_epochs * steps)), total)
    derived = dict(lr=lr, steps_per_epoch=steps, total_steps=total, warmup_steps=warmup, images=n_train,
                   num_classes=num_classes, encoder=FLAGS.encoder)
    return steps, optim.WarmupCosine(lr, warmup, total, FLAGS.min_lr), derived


def check_labels(labels, num_classes, where):
    labels = np.asarray(labels)
    if labels.size == 0 or labels.min() < 0:
        raise app.UsageError(f"--data: {where} images have no labels (label -1); a labelled dataset is needed.")
    if labels.max() >= num_classes:
        raise app.UsageError(f"--data: {where} has label {int(labels.max())} but the model has {num_classes} classes.")


def report(output_dir, final, history=None, derived=None):
    """``metrics.json`` and the final JSON line on stdout."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump({"final": final, "history": history or {}, "derived": derived or {}}, f, indent=1, default=float)
    print(json.dumps(final), flush=True)
