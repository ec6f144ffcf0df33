"""The batched ``tf.data`` pipelines of the recipes: shuffle, augment
(seeded per element), batch, prefetch."""

from keras_lcmae.backend import tf as _tf
from keras_lcmae.data.augment import eval_transform, pretrain_transform


def batched_pretrain_dataset(
    source,
    batch_size,
    image_size,
    mean,
    std,
    seed=0,
    shuffle_buffer=10_000,
    drop_remainder=True,
    repeat=True,
    scale=(0.2, 1.0),
    with_labels=False,
):
    """Shuffle -> augment (parallel, seeded per element) -> batch -> prefetch.

    ``source`` yields ``(uint8 image, label)``. The result yields normalised
    float32 ``(batch, size, size, C)`` images (with labels if asked).

    Example (the source may also be :func:`image_folder_dataset` or
    :func:`tfrecord_dataset`):

    >>> import numpy as np
    >>> from keras_lcmae.data import IMAGENET_MEAN, IMAGENET_STD, array_dataset
    >>> source = array_dataset(np.zeros((10, 40, 40, 3), "uint8"))
    >>> ds = batched_pretrain_dataset(source, batch_size=4, image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    >>> batch = next(iter(ds))          # repeated, so a model.fit(ds) needs steps_per_epoch
    >>> tuple(batch.shape), batch.dtype.name
    ((4, 32, 32, 3), 'float32')
    """
    tf = _tf()
    transform = pretrain_transform(image_size, mean, std, scale)
    ds = source
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    counter = tf.data.Dataset.counter()
    ds = tf.data.Dataset.zip((ds, counter))

    def augment(pair, index):
        image, label = pair
        out = transform(image, tf.stack([tf.cast(seed, tf.int64), index]))
        return (out, label) if with_labels else out

    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def labelled_dataset(
    source,
    batch_size,
    image_size,
    mean,
    std,
    train,
    seed=0,
    scale=(0.08, 1.0),
    crop_pct=0.875,
    shuffle_buffer=10_000,
    drop_remainder=None,
    repeat=None,
):
    """``(images, labels)`` batches for linear probing, finetuning and
    evaluation.

    ``train=True``: shuffle, RandomResizedCrop (``scale``; torchvision's
    default 0.08-1 as the official probe and finetune) and horizontal flip,
    seeded per element, repeated, full batches only. ``train=False``: resize
    and centre crop (:func:`eval_transform`), in order, one pass, the last
    partial batch kept (every image is evaluated). Labels are int32.

    Example:
    >>> import numpy as np
    >>> from keras_lcmae.data import IMAGENET_MEAN, IMAGENET_STD, array_dataset
    >>> source = array_dataset(np.zeros((10, 40, 48, 3), "uint8"), np.arange(10))
    >>> ds = labelled_dataset(source, 4, 32, IMAGENET_MEAN, IMAGENET_STD, train=False)
    >>> [(tuple(x.shape), y.numpy().tolist()) for x, y in ds]     # one pass, every image
    [((4, 32, 32, 3), [0, 1, 2, 3]), ((4, 32, 32, 3), [4, 5, 6, 7]), ((2, 32, 32, 3), [8, 9])]
    """
    tf = _tf()
    if train:
        crop = pretrain_transform(image_size, mean, std, scale)
        ds = source.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True) if shuffle_buffer else source
        if repeat is not False:
            ds = ds.repeat()
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter()))

        def augment(pair, index):
            image, label = pair
            return crop(image, tf.stack([tf.cast(seed, tf.int64), index])), tf.cast(label, tf.int32)

        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=True if drop_remainder is None else drop_remainder)
    else:
        resize = eval_transform(image_size, mean, std, crop_pct)
        ds = source.map(
            lambda image, label: (resize(image), tf.cast(label, tf.int32)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        ds = ds.batch(batch_size, drop_remainder=bool(drop_remainder))
        if repeat:
            ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)
