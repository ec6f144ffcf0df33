import os
import warnings

import numpy as np
import pytest
from PIL import Image

from keras_lcmae import data
from keras_lcmae.errors import ArgumentError

pytestmark = pytest.mark.tf_only


def make_messy_folder(root, rng):
    """A folder with good files of every mode and every kind of bad file."""
    a, b = os.path.join(root, "cats"), os.path.join(root, "dogs")
    os.makedirs(a)
    os.makedirs(b)
    rgb = (rng.random((40, 50, 3)) * 255).astype("uint8")
    Image.fromarray(rgb).save(os.path.join(a, "rgb.jpg"))
    Image.fromarray(rgb[..., 0]).save(os.path.join(a, "grey.png"))
    Image.fromarray(rgb).convert("CMYK").save(os.path.join(a, "cmyk.jpg"))
    rgba = np.concatenate([rgb, np.full((40, 50, 1), 128, "uint8")], -1)
    Image.fromarray(rgba, "RGBA").save(os.path.join(b, "rgba.png"))
    Image.fromarray(rgb).convert("P").save(os.path.join(b, "palette.gif"))
    Image.fromarray(rgb).save(os.path.join(b, "pic.bmp"))
    good = 6
    with open(os.path.join(a, "rgb.jpg"), "rb") as f:
        jpeg = f.read()
    with open(os.path.join(b, "truncated.jpg"), "wb") as f:
        f.write(jpeg[: len(jpeg) // 3])
    open(os.path.join(b, "empty.png"), "wb").close()
    with open(os.path.join(a, "notes.jpg"), "w") as f:
        f.write("this is not an image")
    with open(os.path.join(a, "garbage.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    with open(os.path.join(a, "readme.txt"), "w") as f:
        f.write("ignored: not an image extension")
    return good, 4


def test_messy_folder_trains_and_counts_skips(tmp_path, rng):
    good, bad = make_messy_folder(str(tmp_path), rng)
    ds, classes, skipped, n = data.image_folder_dataset(str(tmp_path), channels=3)
    assert classes == ["cats", "dogs"] and n == good + bad
    items = list(ds.as_numpy_iterator())
    assert len(items) == good
    assert skipped.count == bad
    assert all(img.ndim == 3 and img.shape[-1] == 3 and img.dtype == np.uint8 for img, _ in items)
    assert sorted({int(label) for _, label in items}) == [0, 1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert skipped.warn_if_new() == bad
        assert skipped.warn_if_new() == bad  # no second warning for the same files
    assert len(caught) == 1 and f"Skipped {bad} unreadable" in str(caught[0].message)

    import keras

    from keras_lcmae import MAE, TransformerDecoder, ViTEncoder

    batches = data.batched_pretrain_dataset(
        ds, batch_size=4, image_size=32, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, seed=1, shuffle_buffer=8
    )
    first = next(iter(batches))
    assert tuple(first.shape) == (4, 32, 32, 3) and first.dtype.name == "float32"
    mae = MAE(ViTEncoder.from_preset("vit_test"), TransformerDecoder(32, 1, 2))
    mae.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = mae.fit(batches, steps_per_epoch=3, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_grey_conversion_and_alpha(tmp_path):
    rgba = np.zeros((4, 4, 4), "uint8")
    rgba[..., 0] = 200
    rgba[..., 3] = 0  # fully transparent: composited over black
    path = os.path.join(tmp_path, "t.png")
    Image.fromarray(rgba, "RGBA").save(path)
    np.testing.assert_array_equal(data.read_image(path, 3), 0)
    assert data.read_image(path, 1).shape == (4, 4, 1)


def test_folder_errors(tmp_path):
    with pytest.raises(ArgumentError, match="^root: .*not a folder") as error:
        data.list_image_folder(os.path.join(tmp_path, "missing"))
    assert error.value.argument == "root"
    os.makedirs(os.path.join(tmp_path, "empty", "cls"))
    with pytest.raises(ArgumentError, match="^root: no image files") as error:
        data.list_image_folder(os.path.join(tmp_path, "empty"))
    assert error.value.argument == "root"


def test_tfds_errors_name_the_dataset_argument(tmp_path):
    # without tensorflow-datasets installed: the install hint; with it: nothing on disk under data_dir
    with pytest.raises(ArgumentError, match="^name: .*'no_such_dataset'") as error:
        data.tfds_dataset("no_such_dataset", data_dir=str(tmp_path))
    assert error.value.argument == "name"


def test_random_resized_crop_eager_and_in_tf_data(rng):
    import tensorflow as tf

    img = (rng.random((60, 80, 3)) * 255).astype("uint8")
    out = data.random_resized_crop(tf.constant(img), 32, seed=tf.constant([1, 2]))
    assert tuple(out.shape) == (32, 32, 3)
    again = data.random_resized_crop(tf.constant(img), 32, seed=tf.constant([1, 2]))
    np.testing.assert_array_equal(out.numpy(), again.numpy())
    # full-area, square crop of a square image is the (resized) image itself
    sq = img[:, :60]
    whole = data.random_resized_crop(tf.constant(sq), 60, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=tf.constant([0, 0]))
    np.testing.assert_allclose(whole.numpy(), sq.astype("float32"), atol=1e-3)
    ds = tf.data.Dataset.from_tensors(img).map(lambda x: data.random_resized_crop(x, 16, seed=tf.constant([3, 4])))
    assert next(iter(ds)).shape == (16, 16, 3)


def test_pretrain_transform_normalises_and_is_seeded(rng):
    import tensorflow as tf

    images = (rng.random((8, 28, 28, 1)) * 255).astype("uint8")
    src = data.array_dataset(images)
    make = lambda: data.batched_pretrain_dataset(  # noqa: E731
        src, 4, 32, data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD, seed=5, repeat=False
    )
    a = [b.numpy() for b in make()]
    b = [b.numpy() for b in make()]
    assert len(a) == 2 and a[0].shape == (4, 32, 32, 1)
    np.testing.assert_array_equal(a[0], b[0])
    lo, hi = (0 - 0.286) / 0.353, (1 - 0.286) / 0.353
    assert a[0].min() >= lo - 1e-4 and a[0].max() <= hi + 1e-4
    del tf


def test_tfrecord_round_trip(tmp_path, rng):
    import tensorflow as tf

    path = os.path.join(tmp_path, "d.tfrecord")
    img = (rng.random((10, 12, 3)) * 255).astype("uint8")
    with tf.io.TFRecordWriter(path) as w:
        for label in (3, 4):
            ex = tf.train.Example(
                features=tf.train.Features(
                    feature={
                        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[tf.io.encode_png(img).numpy()])),
                        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                    }
                )
            )
            w.write(ex.SerializeToString())
        w.write(b"not an example")
    items = list(data.tfrecord_dataset(os.path.join(tmp_path, "*.tfrecord")).as_numpy_iterator())
    assert [int(label) for _, label in items] == [3, 4]
    np.testing.assert_array_equal(items[0][0], img)
    with pytest.raises(ArgumentError, match="^pattern_or_files: no TFRecord files") as error:
        data.tfrecord_dataset(os.path.join(tmp_path, "*.nothing"))
    assert error.value.argument == "pattern_or_files"


def _mix(alpha_mixup, alpha_cutmix, smoothing=0.0, seed=(3, 4)):
    import tensorflow as tf

    from keras_lcmae.data import mixup_cutmix

    rng = np.random.default_rng(0)
    x = rng.random((6, 8, 8, 1)).astype("float32")
    y = np.array([0, 1, 2, 3, 4, 5])
    mixed, t = mixup_cutmix(
        tf.constant(x), tf.constant(y), 6, alpha_mixup, alpha_cutmix, smoothing=smoothing, seed=tf.constant(seed)
    )
    return x, y, mixed.numpy(), t.numpy()


def test_mixup_blends_images_and_targets_with_one_lambda():
    x, y, mixed, t = _mix(0.8, 0.0)
    lam = t[0, y[0]]  # the labels are all different, so each target's own class holds lam
    assert 0 < lam < 1
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(t[np.arange(6), y], lam, rtol=1e-6)
    np.testing.assert_allclose(t[np.arange(6), y[::-1]], 1 - lam, rtol=1e-6)
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-5, atol=1e-6)


def test_cutmix_pastes_a_box_and_lambda_is_its_area():
    for seed in [(1, 2), (5, 6), (7, 8)]:
        x, y, mixed, t = _mix(0.0, 1.0, seed=seed)
        from_self = np.isclose(mixed, x) & ~np.isclose(x, x[::-1])
        from_other = np.isclose(mixed, x[::-1]) & ~np.isclose(x, x[::-1])
        assert np.all(from_self | from_other)  # every pixel comes from one of the two images
        box = from_other[0, :, :, 0]
        rows, cols = np.where(box)
        if rows.size:  # the pasted region is one rectangle, the same for every image
            assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
            assert np.array_equal(from_other[:, :, :, 0], np.broadcast_to(box, (6, 8, 8)))
        lam = 1 - box.mean()
        np.testing.assert_allclose(t[np.arange(6), y], lam, rtol=1e-6)


def test_label_smoothing_without_mixing():
    _, y, _, t = _mix(0.0, 0.0, smoothing=0.1)
    expected = np.full((6, 6), 0.1 / 6)
    expected[np.arange(6), y] = 0.9 + 0.1 / 6
    np.testing.assert_allclose(t, expected, rtol=1e-6)


def test_labelled_dataset_eval_keeps_every_image_in_order():
    from keras_lcmae.data import array_dataset, labelled_dataset

    images = np.random.default_rng(0).integers(0, 255, (10, 28, 28, 1)).astype(np.uint8)
    ds = labelled_dataset(array_dataset(images, np.arange(10)), 4, 32, (0.5,), (0.5,), train=False, crop_pct=1.0)
    batches = list(ds)
    assert [int(b[0].shape[0]) for b in batches] == [4, 4, 2]
    assert np.concatenate([b[1].numpy() for b in batches]).tolist() == list(range(10))
    assert tuple(batches[0][0].shape[1:]) == (32, 32, 1)
