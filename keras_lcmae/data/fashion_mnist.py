"""Fashion-MNIST, read offline.

``load_fashion_mnist`` reads the real Fashion-MNIST IDX files that ship with
Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``)
or sit in the Keras cache (``~/.keras/datasets/fashion-mnist``), so tests and
demos run offline.
"""

import gzip
import os

import numpy as np

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_DIRS = (
    "/usr/share/datasets/fashion-mnist",
    os.path.join(os.path.expanduser("~"), ".keras", "datasets", "fashion-mnist"),
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise ValueError(f"{path} is truncated: expected {count} values, found {len(data) - offset}.")
    return np.frombuffer(data, np.uint8, count, offset).reshape(dims)


def find_fashion_mnist(directory=None):
    """The folder holding the Fashion-MNIST IDX files, or a clear error."""
    candidates = [directory] if directory else list(FASHION_MNIST_DIRS)
    for folder in candidates:
        if folder and all(os.path.exists(os.path.join(folder, f)) for f in _FILES["train"] + _FILES["test"]):
            return folder
    raise FileNotFoundError(
        "Fashion-MNIST was not found in "
        + ", ".join(str(c) for c in candidates)
        + ". Install Debian's package (`apt-get install dataset-fashion-mnist`) or place the four "
        "IDX .gz files in ~/.keras/datasets/fashion-mnist."
    )


def load_fashion_mnist(split="train", directory=None, limit=None):
    """Fashion-MNIST images ``(n, 28, 28)`` uint8 and labels ``(n,)``.

    Example:
    >>> images, labels = load_fashion_mnist("test", limit=100)
    >>> images.shape, labels.shape
    ((100, 28, 28), (100,))
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    folder = find_fashion_mnist(directory)
    image_file, label_file = _FILES[split]
    images = _read_idx(os.path.join(folder, image_file))
    labels = _read_idx(os.path.join(folder, label_file))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def fashion_mnist_for_vit(split="train", image_size=32, channels=1, limit=None, directory=None):
    """Fashion-MNIST as float32 NHWC images in [0, 1], zero-padded from 28 px
    to ``image_size`` (centred) and repeated to ``channels``; with labels.

    Example:
    >>> x, y = fashion_mnist_for_vit("test", image_size=32, channels=3, limit=8)
    >>> x.shape, x.dtype.name, float(x.min()), float(x.max()), y[:4].tolist()
    ((8, 32, 32, 3), 'float32', 0.0, 1.0, [9, 2, 1, 1])
    """
    images, labels = load_fashion_mnist(split, directory, limit)
    if image_size < 28:
        raise ValueError(f"image_size must be at least 28 for Fashion-MNIST, got {image_size}.")
    pad = image_size - 28
    before = pad // 2
    x = np.pad(images, ((0, 0), (before, pad - before), (before, pad - before)))
    x = np.repeat(x[..., None], channels, axis=-1).astype("float32") / 255.0
    return x, labels.astype("int32")
