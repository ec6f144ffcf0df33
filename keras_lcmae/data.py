"""Data sources.

``load_fashion_mnist`` reads the real Fashion-MNIST IDX files that ship with
Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``)
or sit in the Keras cache (``~/.keras/datasets/fashion-mnist``), so tests and
demos run offline.
"""

import gzip
import os

import numpy as np

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


# ---------------------------------------------------------------------------
# tf.data pipelines
# ---------------------------------------------------------------------------
import threading  # noqa: E402
import warnings  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


class SkipCounter:
    """Thread-safe record of the files (or TFRecord records, named
    ``path#index``) a pipeline could not read. ``what`` names them in the
    warning."""

    def __init__(self, what="image file(s)"):
        self._lock = threading.Lock()
        self.paths = set()
        self._warned = 0
        self.what = what

    def add(self, path):
        with self._lock:
            self.paths.add(path)

    @property
    def count(self):
        return len(self.paths)

    def warn_if_new(self):
        """One warning giving the count, when new files were skipped since the
        last call."""
        with self._lock:
            n = len(self.paths)
            if n > self._warned:
                examples = ", ".join(sorted(self.paths)[:3])
                warnings.warn(f"Skipped {n} unreadable {self.what} (e.g. {examples}).", stacklevel=2)
                self._warned = n
        return n


def list_image_folder(root):
    """``(paths, labels, class_names)`` of an image folder with one sub-folder
    per class (sorted names -> labels 0..C-1), or of a flat folder of images
    (one class). Files are matched by extension (jpg, jpeg, png, bmp, gif)."""
    if not os.path.isdir(root):
        raise ValueError(f"--data: {root!r} is not a folder.")
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
        raise ValueError(f"--data: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}.")
    return paths, np.asarray(labels, np.int32), classes


def read_image(path, channels=3):
    """Decodes one image file with PIL into ``(H, W, channels)`` uint8: grey,
    palette and CMYK files are converted, transparent ones composited over
    black, GIFs give their first frame. Returns ``None`` for a file that cannot
    be read (corrupt, truncated, empty, not an image)."""
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(path) as img:
            img.load()
            mode = "L" if channels == 1 else "RGB"
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, img)
            arr = np.asarray(img.convert(mode), np.uint8)
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bad files
        return None
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        return None
    return arr


def _tf():
    import tensorflow as tf  # noqa: PLC0415 - tf only where pipelines are built

    return tf


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
        found = (f"none of {len(candidates)} image files sampled across the {n} under {where!r} "
                 f"can be decoded (e.g. {names})")
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


TFRECORD_FEATURES = {
    "image": "encoded image bytes (JPEG/PNG/BMP/GIF)",
    "label": "int64 class index (optional; -1 when absent)",
}
_EXPECTED = ("expected 'image' (bytes_list: one encoded JPEG/PNG/BMP/GIF) and optionally "
             "'label' (int64_list: one class index)")


def tfrecord_files(pattern_or_files):
    """The sorted TFRecord files of a glob pattern (or a list of files);
    ``ValueError`` when nothing matches or a match is a folder."""
    tf = _tf()
    if isinstance(pattern_or_files, (str, bytes, os.PathLike)):
        pattern = os.fsdecode(pattern_or_files)
        files = tf.io.gfile.glob(pattern)
        if not files:
            raise ValueError(f"--data: no TFRecord files match {pattern!r}.")
    else:
        files = [os.fsdecode(f) for f in pattern_or_files]
        if not files:
            raise ValueError("the list of TFRecord files is empty.")
    for f in files:
        if tf.io.gfile.isdir(f):
            raise ValueError(f"{f!r} is a folder, not a TFRecord file; give a glob such as "
                             f"{os.path.join(f, '*.tfrecord')!r}.")
    return sorted(files)


def _tf_error_text(e):
    """The first line of a TensorFlow error, without the function-node prefix."""
    import re  # noqa: PLC0415

    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", (getattr(e, "message", None) or str(e)).strip())
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text.splitlines()[0] if text else "")
    return text or type(e).__name__


def _not_tfrecord(tf, path, detail):
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(2)
    except Exception:  # noqa: BLE001
        head = b""
    hint = ""
    if head == b"\x1f\x8b":
        hint = " It is GZIP-compressed: decompress it (compressed TFRecords are not supported)."
    return ValueError(f"{path!r} is not a readable TFRecord file ({detail}).{hint}")


def _describe_features(feature_map):
    if not feature_map:
        return "no features at all"
    parts = []
    for key in sorted(feature_map):
        feat = feature_map[key]
        kind = feat.WhichOneof("kind")
        if kind is None:
            parts.append(f"{key!r} (empty)")
            continue
        n = len(getattr(feat, kind).value)
        parts.append(f"{key!r} ({kind})" if n == 1 else f"{key!r} ({kind}, {n} values)")
    return "features " + ", ".join(parts)


def check_tfrecords(pattern_or_files, channels=3, need_labels=False):
    """Fails fast on TFRecords that :func:`tfrecord_dataset` would drop
    record by record (it skips records it cannot parse or decode).

    Reads the first record of the first non-empty file (sorted) eagerly,
    parses it as a ``tf.train.Example`` and decodes its ``'image'`` as the
    pipeline does. Raises ``ValueError`` naming the file and listing the
    feature keys found with their kinds (bytes_list / int64_list /
    float_list) when: the file is not a TFRecord file; there are no records;
    the record is not a ``tf.train.Example``; there is no ``'image'``
    feature, or it is not one bytes value, or the bytes are not an image;
    a ``'label'`` feature is not one int64; ``need_labels`` and there is no
    ``'label'``. Only the first record is read: later bad records are the
    pipeline's to skip (and count).

    Returns ``{"files": n, "file": checked file, "image_shape": (H, W, C),
    "label": first label or None}``.

    Example message::

        '/d/train-0.tfrecord', first record: no 'image' feature; found
        features 'img' (bytes_list), 'label' (int64_list); expected 'image' ...
    """
    tf = _tf()
    from google.protobuf.message import DecodeError  # noqa: PLC0415

    files = tfrecord_files(pattern_or_files)
    record = None
    for path in files:
        try:
            first = list(tf.data.TFRecordDataset(path).take(1).as_numpy_iterator())
        except tf.errors.OpError as e:
            raise _not_tfrecord(tf, path, _tf_error_text(e)) from None
        if first:
            record = first[0]
            break
        size = tf.io.gfile.stat(path).length
        if size:
            raise _not_tfrecord(tf, path, f"{size} bytes but no complete record")
    if record is None:
        which = f"{files[0]!r}" if len(files) == 1 else f"all {len(files)} files ({files[0]!r}, ...)"
        raise ValueError(f"{which}: no records (empty TFRecord file{'s' if len(files) > 1 else ''}).")
    where = f"{path!r}, first record"
    try:
        example = tf.train.Example.FromString(record)
    except DecodeError:
        raise ValueError(
            f"{where}: not a tf.train.Example ({len(record)} bytes starting {record[:16]!r}); {_EXPECTED}."
        ) from None
    feats = example.features.feature
    found = _describe_features(feats)

    def fail(problem):
        return ValueError(f"{where}: {problem}; found {found}; {_EXPECTED}.")

    if "image" not in feats:
        raise fail("no 'image' feature")
    image_kind = feats["image"].WhichOneof("kind")
    if image_kind != "bytes_list":
        raise fail(f"feature 'image' is {image_kind or 'empty'}, not bytes_list (raw pixel arrays are not "
                   "supported: store encoded PNG/JPEG bytes)")
    if len(feats["image"].bytes_list.value) != 1:
        raise fail(f"feature 'image' holds {len(feats['image'].bytes_list.value)} values, not one")
    blob = feats["image"].bytes_list.value[0]
    try:
        image = tf.io.decode_image(blob, channels=channels, expand_animations=False)
    except tf.errors.OpError as e:
        raise fail(f"feature 'image' ({len(blob)} bytes starting {blob[:8]!r}) does not decode as an image "
                   f"({_tf_error_text(e)}); raw pixel bytes are not supported, store encoded PNG/JPEG") from None
    label = None
    if "label" in feats:
        label_kind = feats["label"].WhichOneof("kind")
        if label_kind != "int64_list":
            raise fail(f"feature 'label' is {label_kind or 'empty'}, not int64_list")
        if len(feats["label"].int64_list.value) != 1:
            raise fail(f"feature 'label' holds {len(feats['label'].int64_list.value)} values, not one")
        label = int(feats["label"].int64_list.value[0])
    elif need_labels:
        raise fail("no 'label' feature, needed for labelled data")
    return {"files": len(files), "file": path, "image_shape": tuple(int(d) for d in image.shape), "label": label}


def count_tfrecords(pattern_or_files):
    """The number of records in all TFRecord files matching a glob (or in a
    list of files), for epoch sizes. Reads raw records without parsing them;
    ``ValueError`` naming a file that is not a readable TFRecord file."""
    tf = _tf()
    total = 0
    for path in tfrecord_files(pattern_or_files):
        try:
            total += int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
        except tf.errors.OpError as e:
            raise ValueError(f"{path!r} cannot be read to the end ({_tf_error_text(e)}): not a TFRecord file, "
                             "or a truncated or corrupt one.") from None
    return total


def tfrecord_dataset(pattern, channels=3, need_labels=False, skipped=None, check=True):
    """``(uint8 image (H, W, channels), int32 label)`` from TFRecord files of
    ``tf.train.Example`` with the features of :data:`TFRECORD_FEATURES`
    (label -1 when absent).

    ``check`` (default): :func:`check_tfrecords` first, so a wrong schema or
    undecodable data raises ``ValueError`` here instead of every record being
    dropped. ``need_labels``: the check requires a ``'label'`` and records
    without one are skipped. Records that still fail to parse or decode are
    skipped and recorded in ``skipped`` (a :class:`SkipCounter`, pass your
    own to read it) as ``'path#index'`` (0-based record index in its file).
    Records are read from the files in parallel, interleaved one at a time.
    """
    tf = _tf()
    files = tfrecord_files(pattern)
    if check:
        check_tfrecords(files, channels=channels, need_labels=need_labels)
    skipped = skipped if skipped is not None else SkipCounter("TFRecord record(s)")
    label_spec = (tf.io.FixedLenFeature([], tf.int64) if need_labels
                  else tf.io.FixedLenFeature([], tf.int64, default_value=-1))
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": label_spec}

    def read_file(file_index, path):
        # Each file's records, then one end marker, numbered 0, 1, ... so a
        # record dropped by ignore_errors shows as a gap in its file's numbers.
        records = tf.data.TFRecordDataset(path).map(lambda record: (record, False))
        marker = tf.data.Dataset.from_tensors((tf.constant(b""), True))
        numbered = records.concatenate(marker).enumerate()
        return numbered.map(lambda index, item: (file_index, index, item[0], item[1]))

    def parse(file_index, index, record, is_marker):
        def decode():
            ex = tf.io.parse_single_example(record, spec)
            image = tf.io.decode_image(ex["image"], channels=channels, expand_animations=False)
            return image, tf.cast(ex["label"], tf.int32)

        def placeholder():
            return tf.zeros([1, 1, channels], tf.uint8), tf.constant(-1, tf.int32)

        image, label = tf.cond(is_marker, placeholder, decode)
        image.set_shape([None, None, channels])
        return file_index, index, image, label, is_marker

    def note(file_index, start, stop):
        for k in range(int(start), int(stop)):
            skipped.add(f"{files[int(file_index)]}#{k}")
        return np.int64(stop - start)

    def count_gaps(last, element):
        file_index, index, image, label, is_marker = element
        previous = last[file_index]
        noted = tf.cond(
            index > previous + 1,
            lambda: tf.numpy_function(note, [file_index, previous + 1, index], tf.int64, stateful=True),
            lambda: tf.constant(0, tf.int64),
        )
        with tf.control_dependencies([noted]):
            last = tf.tensor_scatter_nd_update(last, [[file_index]], [index])
        return last, (image, label, is_marker)

    def keep(image, label, is_marker):
        return tf.logical_not(is_marker)

    def drop_marker(image, label, is_marker):
        return image, label

    ds = tf.data.Dataset.from_tensor_slices((tf.range(len(files), dtype=tf.int64), files))
    ds = ds.interleave(read_file, cycle_length=tf.data.AUTOTUNE, block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    ds = ds.scan(tf.fill([len(files)], tf.constant(-1, tf.int64)), count_gaps)
    return ds.filter(keep).map(drop_marker)


def tfds_dataset(name, split="train", channels=3, data_dir=None):
    """A TFDS dataset already on disk (nothing is downloaded)."""
    tf = _tf()
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as e:
        raise ValueError("--data tfds:NAME needs `pip install tensorflow-datasets`.") from e
    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False, as_supervised=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--data: TFDS dataset {name!r} ({split}) is not available offline: {e}") from None

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


def random_resized_crop(image, size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), seed=None):
    """RandomResizedCrop (area fraction ``scale``, aspect ``ratio``, bicubic) on
    one ``(H, W, C)`` image, as torchvision's; when 10 draws fail the whole
    image is used (``sample_distorted_bounding_box``'s fallback)."""
    tf = _tf()
    channels = image.shape[-1]
    shape = tf.shape(image)
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4])
    kwargs = dict(
        bounding_boxes=bbox,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    if seed is None:
        begin, crop, _ = tf.image.sample_distorted_bounding_box(shape, **kwargs)
    else:
        begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(shape, seed=seed, **kwargs)
    image = tf.slice(image, begin, crop)
    image = tf.image.resize(tf.cast(image, tf.float32), (size, size), method="bicubic")
    image.set_shape([size, size, channels])
    return tf.clip_by_value(image, 0.0, 255.0)


def normalize(image, mean, std):
    """uint8-range float image -> ``(x / 255 - mean) / std`` per channel."""
    tf = _tf()
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def pretrain_transform(image_size, mean, std, scale=(0.2, 1.0)):
    """The MAE pretraining augmentation: RandomResizedCrop(scale 0.2-1, ratio
    3/4-4/3, bicubic), horizontal flip, mean/std normalisation. A function of
    ``(image, seed)`` for ``Dataset.map``; ``seed`` is a ``(2,)`` int tensor."""
    tf = _tf()

    def transform(image, seed):
        seeds = tf.random.experimental.stateless_split(seed, 2)
        image = random_resized_crop(image, image_size, scale=scale, seed=seeds[0])
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
        return normalize(image, mean, std)

    return transform


def eval_transform(image_size, mean, std, crop_pct=0.875):
    """Resize (shorter side to ``size / crop_pct``) and centre crop, then
    normalise (``crop_pct=1``: resize the shorter side to ``size``)."""
    tf = _tf()
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}.")

    def transform(image):
        image = tf.cast(image, tf.float32)
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        short = tf.cast(tf.minimum(h, w), tf.float32)
        resize = tf.cast(tf.math.ceil(image_size / crop_pct), tf.float32)
        new_h = tf.cast(tf.round(tf.cast(h, tf.float32) * resize / short), tf.int32)
        new_w = tf.cast(tf.round(tf.cast(w, tf.float32) * resize / short), tf.int32)
        image = tf.image.resize(image, (new_h, new_w), method="bicubic")
        image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
        return normalize(tf.clip_by_value(image, 0.0, 255.0), mean, std)

    return transform


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
        ds = source.map(lambda image, label: (resize(image), tf.cast(label, tf.int32)),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch_size, drop_remainder=bool(drop_remainder))
        if repeat:
            ds = ds.repeat()
    return ds.prefetch(tf.data.AUTOTUNE)


def mixup_cutmix(images, labels, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                 smoothing=0.1, seed=None):
    """Batch-level Mixup / CutMix with label smoothing, as timm's ``Mixup``
    (batch mode) used by the official MAE finetuning.

    Each batch is mixed with itself reversed (``x[::-1]``): with probability
    ``switch_prob`` (when both are on) CutMix pastes a box of area fraction
    ``1 - lam``, ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``, clipped to the image,
    and ``lam`` is corrected to the pasted area; otherwise Mixup blends with
    ``lam ~ Beta(mixup_alpha, mixup_alpha)``. Targets are smoothed one-hot
    vectors (``1 - smoothing + smoothing / C`` on the class, ``smoothing / C``
    elsewhere) mixed with the same ``lam``. An alpha of 0 turns a method off.

    Args:
        images: ``(B, H, W, C)`` float. labels: ``(B,)`` int.
        seed: a ``(2,)`` int tensor for the stateless draws.

    Returns ``(mixed_images, soft_targets (B, num_classes))``.
    """
    tf = _tf()
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}.")
    seed = tf.zeros([2], tf.int64) if seed is None else tf.cast(seed, tf.int64)
    seeds = tf.random.experimental.stateless_split(seed, 5)
    off = smoothing / num_classes
    targets = tf.one_hot(tf.cast(labels, tf.int32), num_classes, on_value=1.0 - smoothing + off, off_value=off)
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return images, targets

    def beta(alpha, s):
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        a = tf.random.stateless_gamma([], s1, alpha=alpha)
        b = tf.random.stateless_gamma([], s2, alpha=alpha)
        return a / (a + b)

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = tf.random.stateless_uniform([], seeds[0]) < switch_prob
    else:
        use_cutmix = tf.constant(cutmix_alpha > 0)
    images = tf.cast(images, tf.float32)
    other = images[::-1]
    h, w = tf.shape(images)[1], tf.shape(images)[2]

    def cutmix():
        lam = beta(cutmix_alpha, seeds[1])
        ratio = tf.sqrt(1.0 - lam)
        cut_h = tf.cast(tf.cast(h, tf.float32) * ratio, tf.int32)
        cut_w = tf.cast(tf.cast(w, tf.float32) * ratio, tf.int32)
        cy = tf.random.stateless_uniform([], seeds[2], 0, h, dtype=tf.int32)
        cx = tf.random.stateless_uniform([], seeds[3], 0, w, dtype=tf.int32)
        y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + cut_h // 2, 0, h)
        x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + cut_w // 2, 0, w)
        rows = tf.logical_and(tf.range(h) >= y0, tf.range(h) < y1)
        cols = tf.logical_and(tf.range(w) >= x0, tf.range(w) < x1)
        box = tf.cast(tf.logical_and(rows[:, None], cols[None, :]), tf.float32)[None, :, :, None]
        lam_area = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
        return images * (1.0 - box) + other * box, lam_area

    def mixup():
        lam = beta(mixup_alpha, seeds[4])
        return images * lam + other * (1.0 - lam), lam

    mixed, lam = tf.cond(use_cutmix, cutmix, mixup)
    return mixed, targets * lam + targets[::-1] * (1.0 - lam)
