"""Sources without files of this package's formats: TFDS datasets already on
disk, and numpy arrays."""

import numpy as np

from keras_lcmae.backend import tf as _tf
from keras_lcmae.errors import ArgumentError


def tfds_dataset(name, split="train", channels=3, data_dir=None):
    """A TFDS dataset already on disk (nothing is downloaded)."""
    tf = _tf()
    try:
        import tensorflow_datasets as tfds  # optional: only for tfds:NAME sources
    except ImportError as e:
        raise ArgumentError("name", f"the TFDS dataset {name!r} needs `pip install tensorflow-datasets`.") from e
    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False, as_supervised=True)
    except Exception as e:
        raise ArgumentError("name", f"TFDS dataset {name!r} ({split}) is not available offline: {e}") from None

    def fix(image, label):
        if image.shape[-1] != channels:
            image = tf.image.rgb_to_grayscale(image) if channels == 1 else tf.image.grayscale_to_rgb(image)
        return image, tf.cast(label, tf.int32)

    return ds.map(fix, num_parallel_calls=tf.data.AUTOTUNE)


def array_dataset(images, labels=None):
    """``(image, label)`` from numpy arrays ``(n, H, W[, C])`` (uint8 or float in
    [0, 1]); labels default to -1.

    Example:
    >>> image, label = next(iter(array_dataset(np.ones((10, 40, 40)), np.arange(10))))
    >>> tuple(image.shape), image.dtype.name, int(image[0, 0, 0]), int(label)
    ((40, 40, 1), 'uint8', 255, 0)
    """
    tf = _tf()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must be (n, H, W) or (n, H, W, C), got shape {images.shape}.")
    if images.dtype != np.uint8:
        images = np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)
    labels = np.full(len(images), -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    return tf.data.Dataset.from_tensor_slices((images, labels))
