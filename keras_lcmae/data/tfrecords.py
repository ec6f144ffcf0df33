"""TFRecord files of ``tf.train.Example``: listing, counting, the fail-fast
schema check, and the ``tf.data`` source that counts the records it skips."""

import os
import re

import numpy as np

from keras_lcmae.backend import tf as _tf
from keras_lcmae.data.skipped import SkipCounter
from keras_lcmae.errors import ArgumentError

TFRECORD_FEATURES = {
    "image": "encoded image bytes (JPEG/PNG/BMP/GIF)",
    "label": "int64 class index (optional; -1 when absent)",
}
_EXPECTED = (
    "expected 'image' (bytes_list: one encoded JPEG/PNG/BMP/GIF) and optionally 'label' (int64_list: one class index)"
)


def tfrecord_files(pattern_or_files):
    """The sorted TFRecord files of a glob pattern (or a list of files);
    ``ValueError`` when nothing matches or a match is a folder."""
    tf = _tf()
    if isinstance(pattern_or_files, (str, bytes, os.PathLike)):
        pattern = os.fsdecode(pattern_or_files)
        files = tf.io.gfile.glob(pattern)
        if not files:
            raise ArgumentError("pattern_or_files", f"no TFRecord files match {pattern!r}.")
    else:
        files = [os.fsdecode(f) for f in pattern_or_files]
        if not files:
            raise ValueError("the list of TFRecord files is empty.")
    for f in files:
        if tf.io.gfile.isdir(f):
            raise ValueError(
                f"{f!r} is a folder, not a TFRecord file; give a glob such as {os.path.join(f, '*.tfrecord')!r}."
            )
    return sorted(files)


def _tf_error_text(e):
    """The first line of a TensorFlow error, without the function-node prefix."""
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", (getattr(e, "message", None) or str(e)).strip())
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text.splitlines()[0] if text else "")
    return text or type(e).__name__


def _not_tfrecord(tf, path, detail):
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(2)
    except Exception:
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
    from google.protobuf.message import DecodeError  # protobuf comes with TensorFlow, imported here with it

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
        raise fail(
            f"feature 'image' is {image_kind or 'empty'}, not bytes_list (raw pixel arrays are not "
            "supported: store encoded PNG/JPEG bytes)"
        )
    if len(feats["image"].bytes_list.value) != 1:
        raise fail(f"feature 'image' holds {len(feats['image'].bytes_list.value)} values, not one")
    blob = feats["image"].bytes_list.value[0]
    try:
        image = tf.io.decode_image(blob, channels=channels, expand_animations=False)
    except tf.errors.OpError as e:
        raise fail(
            f"feature 'image' ({len(blob)} bytes starting {blob[:8]!r}) does not decode as an image "
            f"({_tf_error_text(e)}); raw pixel bytes are not supported, store encoded PNG/JPEG"
        ) from None
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
            raise ValueError(
                f"{path!r} cannot be read to the end ({_tf_error_text(e)}): not a TFRecord file, "
                "or a truncated or corrupt one."
            ) from None
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
    label_spec = (
        tf.io.FixedLenFeature([], tf.int64) if need_labels else tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    )
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
    ds = ds.interleave(
        read_file,
        cycle_length=tf.data.AUTOTUNE,
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    ds = ds.scan(tf.fill([len(files)], tf.constant(-1, tf.int64)), count_gaps)
    return ds.filter(keep).map(drop_marker)
