"""Image folders: listing, decoding with PIL, the fail-fast check, and the
``tf.data`` source."""

import os

import numpy as np

from keras_lcmae.backend import tf as _tf
from keras_lcmae.data.skipped import SkipCounter
from keras_lcmae.errors import ArgumentError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def list_image_folder(root):
    """``(paths, labels, class_names)`` of an image folder with one sub-folder
    per class (sorted names -> labels 0..C-1), or of a flat folder of images
    (one class). Files are matched by extension (jpg, jpeg, png, bmp, gif)."""
    if not os.path.isdir(root):
        raise ArgumentError("root", f"{root!r} is not a folder.")
    entries = sorted(os.listdir(root))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    paths, labels = [], []
    if classes:
        for label, name in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(label)
    else:
        classes = [os.path.basename(os.path.normpath(root))]
        paths = [os.path.join(root, f) for f in entries if f.lower().endswith(IMAGE_EXTENSIONS)]
        labels = [0] * len(paths)
    if not paths:
        raise ArgumentError("root", f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}.")
    return paths, np.asarray(labels, np.int32), classes


def read_image(path, channels=3):
    """Decodes one image file with PIL into ``(H, W, channels)`` uint8: grey,
    palette and CMYK files are converted, transparent ones composited over
    black, GIFs give their first frame. Returns ``None`` for a file that cannot
    be read (corrupt, truncated, empty, not an image)."""
    from PIL import Image  # an optional dependency, needed only to decode image files

    try:
        with Image.open(path) as img:
            img.load()
            mode = "L" if channels == 1 else "RGB"
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, img)
            arr = np.asarray(img.convert(mode), np.uint8)
    except Exception:  # PIL raises many kinds for bad files
        return None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        return None
    return arr


def _check_image_paths(paths, where, channels, max_files, skipped):
    n = len(paths)
    if not n:
        raise ValueError(f"no image files under {where!r}.")
    if max_files is None or n <= max_files:
        candidates = list(paths)
    else:  # a spread over the whole listing (every class), in listing order, the first file first
        candidates = [paths[i] for i in sorted(set(np.linspace(0, n - 1, max(int(max_files), 1)).astype(int)))]
    for tried, path in enumerate(candidates, 1):
        if read_image(path, channels) is not None:
            return tried
        if skipped is not None:
            skipped.add(path)
    root = where if os.path.isdir(where) else os.path.dirname(where)
    names = ", ".join(os.path.relpath(p, root) if root else p for p in candidates[:3])
    if n == 1:
        found = f"no image file under {where!r} can be decoded (the only one: {names})"
    elif len(candidates) == n:
        found = f"none of the {n} image files under {where!r} can be decoded (e.g. {names})"
    else:
        found = (
            f"none of {len(candidates)} image files sampled across the {n} under {where!r} "
            f"can be decoded (e.g. {names})"
        )
    raise ValueError(f"{found}: corrupt or not images.")


def check_image_folder(paths_or_root, channels=3, max_files=64, skipped=None):
    """Fails fast on an image folder (or a list of image paths) none of whose
    files can be read, instead of a pipeline that silently drops them all.

    Decodes files with :func:`read_image`, in listing order, until one
    decodes: the first ``max_files`` (``None``: all), or when there are more,
    ``max_files`` spread evenly over the listing (first file first, so every
    class folder is reached). Returns how many it tried (1 on good data).
    Raises ``ValueError`` naming the folder, the count and example files when
    none decodes. Files that failed are added to ``skipped`` (a
    :class:`SkipCounter`) when one is given. Corrupt files mixed with good
    ones pass: the pipeline skips and counts them.

    Example:
    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
    ...     with open(os.path.join(folder.name, name), "wb") as f:
    ...         _ = f.write(b"not an image")
    >>> check_image_folder(folder.name)
    Traceback (most recent call last):
        ...
    ValueError: none of the 4 image files under '...' can be decoded (e.g. a.jpg, b.jpg, c.jpg): corrupt or not images.
    >>> from PIL import Image
    >>> Image.new("RGB", (8, 8)).save(os.path.join(folder.name, "e.png"))
    >>> check_image_folder(folder.name)           # files tried: one readable file passes
    5
    """
    if isinstance(paths_or_root, (str, bytes, os.PathLike)):
        where = os.fsdecode(paths_or_root)
        paths, _, _ = list_image_folder(where)
    else:
        paths = [os.fsdecode(p) for p in paths_or_root]
        if not paths:
            raise ValueError("check_image_folder: the list of image paths is empty.")
        where = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
    return _check_image_paths(paths, where, channels, max_files, skipped)


def image_folder_dataset(root, channels=3, skipped=None, check=True):
    """A ``tf.data.Dataset`` of ``(uint8 image (H, W, channels), label)`` from an
    image folder, decoded in parallel; unreadable files are dropped and
    recorded in ``skipped`` (a :class:`SkipCounter`). Returns
    ``(dataset, class_names, skipped, num_files)``.

    ``check`` (default): :func:`check_image_folder` first, so a folder none of
    whose files decodes raises ``ValueError`` here rather than an empty
    dataset (and ``OutOfRangeError``) in training."""
    tf = _tf()
    paths, labels, classes = list_image_folder(root)
    skipped = skipped if skipped is not None else SkipCounter()
    if check:
        _check_image_paths(paths, os.fsdecode(root), channels, 64, skipped)

    def load(path):
        p = path.decode() if isinstance(path, bytes) else str(path)
        arr = read_image(p, channels)
        if arr is None:
            skipped.add(p)
            return np.zeros((1, 1, channels), np.uint8), False
        return arr, True

    def tf_load(path, label):
        image, ok = tf.numpy_function(load, [path], [tf.uint8, tf.bool])
        image.set_shape([None, None, channels])
        ok.set_shape([])
        return image, label, ok

    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda image, label, ok: ok).map(lambda image, label, ok: (image, label))
    return ds, classes, skipped, len(paths)
