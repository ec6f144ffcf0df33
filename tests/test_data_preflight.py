"""Bad training data fails before training with a clear ValueError (image
folders none of whose files decode, TFRecords of the wrong schema), and bad
records mixed with good ones are skipped and counted."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

from keras_lcmae import data

pytestmark = [pytest.mark.tf_only]


def _good_image(path, rng, size=(6, 8)):
    Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(path)


def _corrupt_files(folder, rng, names=("a.jpg", "b.png", "c.jpg")):
    """Random bytes, an empty file and a truncated JPEG."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, names[0]), "wb") as f:
        f.write(bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
    open(os.path.join(folder, names[1]), "wb").close()
    full = os.path.join(folder, "full.tmp")
    _good_image(full + ".jpg", rng, (32, 32))
    with open(full + ".jpg", "rb") as f:
        jpeg = f.read()
    os.remove(full + ".jpg")
    with open(os.path.join(folder, names[2]), "wb") as f:
        f.write(jpeg[: len(jpeg) // 3])


def test_folder_of_only_corrupt_images_fails_before_training(tmp_path, rng):
    root = str(tmp_path / "bad")
    _corrupt_files(root, rng)
    with pytest.raises(ValueError) as caught:
        data.check_image_folder(root)
    msg = str(caught.value)
    assert f"none of the 3 image files under {root!r} can be decoded" in msg
    assert "a.jpg, b.png, c.jpg" in msg and "corrupt or not images" in msg
    with pytest.raises(ValueError, match="none of the 3 image files"):
        data.image_folder_dataset(root)
    # a list of paths works too
    paths = [os.path.join(root, n) for n in ("a.jpg", "b.png")]
    with pytest.raises(ValueError, match=r"none of the 2 image files .*a\.jpg, b\.png"):
        data.check_image_folder(paths)


def test_large_corrupt_folder_is_sampled_and_one_good_file_passes(tmp_path, rng):
    root = str(tmp_path / "many")
    for k in range(3):
        _corrupt_files(root, rng, names=(f"{k}a.jpg", f"{k}b.png", f"{k}c.jpg"))
    with pytest.raises(ValueError, match=r"none of 4 image files sampled across the 9 under"):
        data.check_image_folder(root, max_files=4)
    _good_image(os.path.join(root, "z_good.png"), rng)  # last in the listing: the sample reaches it
    assert data.check_image_folder(root, max_files=4) == 4
    assert data.check_image_folder(root, max_files=None) == 10


def test_one_good_two_corrupt_images_build_and_skip(tmp_path, rng):
    root = str(tmp_path / "mixed")
    _corrupt_files(root, rng, names=("a_bad.jpg", "b_bad.png", "unused.jpg"))
    os.remove(os.path.join(root, "unused.jpg"))
    _good_image(os.path.join(root, "c_good.png"), rng)
    assert data.check_image_folder(root) == 3  # listing order: two bad ones, then the good one
    ds, classes, skipped, n = data.image_folder_dataset(root, channels=3)
    assert classes == ["mixed"] and n == 3
    items = list(ds.as_numpy_iterator())
    assert len(items) == 1 and items[0][0].shape == (6, 8, 3)
    assert skipped.count == 2


# ---------------------------------------------------------------------------
# TFRecords
# ---------------------------------------------------------------------------


def _example(**features):
    import tensorflow as tf

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        if isinstance(value, float) or (isinstance(value, list) and isinstance(value[0], float)):
            return tf.train.Feature(float_list=tf.train.FloatList(value=np.atleast_1d(value).tolist()))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=np.atleast_1d(value).tolist()))

    ex = tf.train.Example(features=tf.train.Features(feature={k: feature(v) for k, v in features.items()}))
    return ex.SerializeToString()


def _write(path, records):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as w:
        for r in records:
            w.write(r)
    return str(path)


@pytest.fixture
def png(rng):
    import tensorflow as tf

    return tf.io.encode_png((rng.random((5, 7, 3)) * 255).astype("uint8")).numpy()


@pytest.mark.parametrize(
    "case, expect",
    [
        ("wrong_key", ["first record: no 'image' feature", "'img' (bytes_list)", "'label' (int64_list)"]),
        ("image_int64", ["'image' is int64_list, not bytes_list", "'image' (int64_list, 6 values)"]),
        ("image_float", ["'image' is float_list, not bytes_list", "'image' (float_list, 2 values)"]),
        ("not_image_bytes", ["feature 'image' (11 bytes", "does not decode as an image", "'image' (bytes_list)"]),
        ("label_float", ["'label' is float_list, not int64_list", "'image' (bytes_list), 'label' (float_list)"]),
        ("missing_label", ["first record: no 'label' feature", "found features 'image' (bytes_list)"]),
        ("not_example", ["first record: not a tf.train.Example"]),
        ("no_features", ["no 'image' feature; found no features at all"]),
    ],
)
def test_tfrecord_schema_errors_name_file_and_keys(tmp_path, png, case, expect):
    first = {
        "wrong_key": _example(img=png, label=1),
        "image_int64": _example(image=[1, 2, 3, 4, 5, 6]),
        "image_float": _example(image=[0.5, 0.25]),
        "not_image_bytes": _example(image=b"not a photo"),
        "label_float": _example(image=png, label=1.0),
        "missing_label": _example(image=png),
        "not_example": b"not an example",
        "no_features": b"",
    }[case]
    path = _write(tmp_path / "a.tfrecord", [first, _example(image=png, label=0)])
    need_labels = case == "missing_label"
    with pytest.raises(ValueError) as caught:
        data.check_tfrecords(str(tmp_path / "*.tfrecord"), need_labels=need_labels)
    msg = str(caught.value)
    assert repr(path) in msg and "\n" not in msg
    for text in expect:
        assert text in msg
    # the pipeline runs the same check
    with pytest.raises(ValueError, match="first record"):
        data.tfrecord_dataset(str(tmp_path / "*.tfrecord"), need_labels=need_labels)


def test_tfrecord_file_errors(tmp_path, png):
    garbage = tmp_path / "garbage.tfrecord"
    garbage.write_bytes(b"this is a text file, not a TFRecord file at all")
    with pytest.raises(ValueError, match=r"'.*garbage\.tfrecord' is not a readable TFRecord file"):
        data.check_tfrecords(str(garbage))
    short = tmp_path / "short.tfrecord"
    short.write_bytes(b"hi")
    with pytest.raises(ValueError, match=r"short\.tfrecord' is not a readable TFRecord file \(2 bytes"):
        data.check_tfrecords(str(short))
    empty = tmp_path / "empty.tfrecord"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.tfrecord': no records"):
        data.check_tfrecords(str(empty))
    _write(tmp_path / "empty2.tfrecord", [])
    with pytest.raises(ValueError, match=r"all 2 files .*no records"):
        data.check_tfrecords([str(empty), str(tmp_path / "empty2.tfrecord")])
    with pytest.raises(ValueError, match="is a folder"):
        data.check_tfrecords(str(tmp_path))
    with pytest.raises(ValueError, match=r"garbage\.tfrecord' cannot be read to the end"):
        data.count_tfrecords(str(garbage))


def test_good_tfrecords_check_count_and_skip_bad_records(tmp_path, png):
    # an empty first shard is passed over; bad records in the middle and at the end are skipped and counted
    _write(tmp_path / "d-0.tfrecord", [])
    _write(tmp_path / "d-1.tfrecord", [_example(image=png, label=3), b"garbage", _example(image=png, label=4)])
    last = [_example(image=png, label=5), _example(image=png), _example(image=b"x", label=6)]
    _write(tmp_path / "d-2.tfrecord", last)
    pattern = str(tmp_path / "d-*.tfrecord")
    info = data.check_tfrecords(pattern, need_labels=True)
    assert info["files"] == 3 and info["file"].endswith("d-1.tfrecord")
    assert info["image_shape"] == (5, 7, 3) and info["label"] == 3
    assert data.count_tfrecords(pattern) == 6
    assert data.count_tfrecords([str(tmp_path / "d-2.tfrecord")]) == 3

    skipped = data.SkipCounter("TFRecord record(s)")
    items = list(data.tfrecord_dataset(pattern, need_labels=True, skipped=skipped).as_numpy_iterator())
    assert sorted(int(label) for _, label in items) == [3, 4, 5]
    assert all(img.shape == (5, 7, 3) and img.dtype == np.uint8 and lab.dtype == np.int32 for img, lab in items)
    f1, f2 = str(tmp_path / "d-1.tfrecord"), str(tmp_path / "d-2.tfrecord")
    assert skipped.paths == {f"{f1}#1", f"{f2}#1", f"{f2}#2"}  # garbage, no label (needed), not an image
    # without need_labels the unlabelled record is kept with label -1; a second pass adds nothing new
    skipped = data.SkipCounter("TFRecord record(s)")
    ds = data.tfrecord_dataset(pattern, skipped=skipped)
    for _ in range(2):
        assert sorted(int(label) for _, label in ds.as_numpy_iterator()) == [-1, 3, 4, 5]
    assert skipped.count == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipped.warn_if_new()
    assert "Skipped 2 unreadable TFRecord record(s)" in str(caught[0].message)
