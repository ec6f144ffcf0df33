"""Weighted kNN and feature extraction against independent numpy code."""

import keras
import numpy as np
import pytest

from keras_lcmae import ViTEncoder, extract_features, knn_accuracy, knn_classify
from keras_lcmae.evaluation import knn_votes
from tests.helpers import to_np


def numpy_knn(train, labels, test, num_classes, k, temperature):
    """InstDisc/DINO weighted kNN, one test sample at a time, float64.
    Returns predictions and, per sample, the gap between the k-th and (k+1)-th
    similarity and the relative margin of the winning vote."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    preds, gaps, margins = [], [], []
    for q in test:
        sims = train @ q
        order = np.argsort(-sims, kind="stable")
        votes = np.zeros(num_classes)
        for i in order[:k]:
            votes[labels[i]] += np.exp(sims[i] / temperature)
        preds.append(int(np.argmax(votes)))
        gaps.append(sims[order[k - 1]] - sims[order[k]] if k < len(sims) else np.inf)
        top2 = np.sort(votes)[-2:]
        margins.append((top2[1] - top2[0]) / top2[1])
    return np.array(preds), np.array(gaps), np.array(margins)


@pytest.fixture
def clusters(rng):
    """4 overlapping Gaussian classes in 8-D, train vectors at random scales
    (the kNN must L2-normalise)."""
    centres = rng.normal(size=(4, 8))
    train_labels = np.repeat(np.arange(4), 15)
    test_labels = rng.integers(0, 4, size=25)
    train = centres[train_labels] + 0.9 * rng.normal(size=(60, 8))
    train *= rng.uniform(0.5, 3.0, size=(60, 1))
    test = centres[test_labels] + 0.9 * rng.normal(size=(25, 8))
    return train.astype("float32"), train_labels, test.astype("float32"), test_labels


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5), (60, 0.1)])
def test_knn_matches_numpy(clusters, k, temperature):
    train, train_labels, test, test_labels = clusters
    want, gaps, margins = numpy_knn(train, train_labels, test, 4, k, temperature)
    # Well defined: no near-tie at the k-th neighbour nor between the top two classes.
    keep = (gaps > 1e-5) & (margins > 1e-4)
    assert keep.sum() >= 20
    got = knn_classify(train, train_labels, test, 4, k=k, temperature=temperature, batch_size=7)
    assert got.dtype == np.int32 and got.shape == (25,)
    np.testing.assert_array_equal(got[keep], want[keep])
    acc = knn_accuracy(train, train_labels, test[keep], test_labels[keep], 4, k=k, temperature=temperature)
    assert acc == pytest.approx(np.mean(want[keep] == test_labels[keep]))


def test_knn_votes_are_the_weighted_sums(clusters):
    train, train_labels, test, _ = clusters
    votes = knn_votes(train, train_labels, test[:3], 4, k=5, temperature=0.2)
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    for row, q in zip(votes, test[:3]):
        sims = tn @ (q / np.linalg.norm(q))
        top = np.argsort(-sims)[:5]
        want = np.zeros(4)
        np.add.at(want, train_labels[top], np.exp((sims[top] - sims[top].max()) / 0.2))
        np.testing.assert_allclose(row, want, rtol=1e-4)


def test_temperature_changes_the_vote():
    """One very close class-1 neighbour against two slightly farther class-0
    ones: a sharp temperature follows the closest, a flat one the majority.
    (With T = 0.01, exp(s / T) overflows float32 unless weights are shifted.)"""
    angles = np.array([0.0, np.arccos(0.99), np.arccos(0.9), -np.arccos(0.9), np.pi])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1)[1:].astype("float32")
    labels = np.array([1, 0, 0, 2])
    query = np.array([[2.0, 0.0]], "float32")
    # exp(0.99/T) vs 2 exp(0.9/T): class 1 wins iff T < 0.09 / ln 2 = 0.13.
    assert knn_classify(train, labels, query, 3, k=3, temperature=0.01)[0] == 1
    assert knn_classify(train, labels, query, 3, k=3, temperature=0.07)[0] == 1
    assert knn_classify(train, labels, query, 3, k=3, temperature=0.5)[0] == 0
    assert knn_classify(train, labels, query, 3, k=1, temperature=0.5)[0] == 1
    assert knn_accuracy(train, labels, query, np.array([0]), 3, k=3, temperature=1.0) == 1.0


def test_knn_bad_input(clusters):
    train, labels, test, _ = clusters
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, 60\]"):
        knn_classify(train, labels, test, 4, k=61)
    with pytest.raises(ValueError, match="dim 8 but test features dim 3"):
        knn_classify(train, labels, test[:, :3], 4)
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\)"):
        knn_classify(train, labels, test, 3)
    with pytest.raises(ValueError, match="60 train features but 59 train labels"):
        knn_classify(train, labels[:-1], test, 4)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(train, labels, test, 4, temperature=0.0)
    with pytest.raises(ValueError, match="25 test features but 3 test labels"):
        knn_accuracy(train, labels, test, labels[:3], 4)


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_extract_features(rng, pool):
    encoder = ViTEncoder(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=2)
    x = rng.random((4, 32, 32, 3)).astype("float32")
    y = np.array([3, 1, 4, 1])
    tokens = to_np(encoder(x))
    want = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
    feats, labels = extract_features(encoder, (x, y), pool=pool, batch_size=3)  # batches of 3 and 1
    np.testing.assert_allclose(feats, want, atol=1e-5)
    np.testing.assert_array_equal(labels, y)
    feats, labels = extract_features(encoder, x, pool=pool, batch_size=4)
    np.testing.assert_allclose(feats, want, atol=1e-5)
    assert labels is None
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]  # any iterable of (images, labels) batches
    feats, labels = extract_features(encoder, batches, pool=pool)
    np.testing.assert_allclose(feats, want, atol=1e-5)
    np.testing.assert_array_equal(labels, y)


def test_extract_features_from_tf_data(rng):
    tf = pytest.importorskip("tensorflow")
    encoder = ViTEncoder(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=2)
    x = rng.random((4, 32, 32, 3)).astype("float32")
    y = np.arange(4)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    feats, labels = extract_features(encoder, ds)
    np.testing.assert_allclose(feats, to_np(encoder(x))[:, 0], atol=1e-5)
    np.testing.assert_array_equal(labels, y)


def test_extract_features_bad_input(rng):
    encoder = ViTEncoder(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=2)
    x = rng.random((2, 32, 32, 3)).astype("float32")
    with pytest.raises(ValueError, match="pool"):
        extract_features(encoder, x, pool="max")
    with pytest.raises(ValueError, match="ViTEncoder"):
        extract_features(object(), x)
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        extract_features(encoder, (x, np.arange(3)))
    with pytest.raises(ValueError, match="no images"):
        extract_features(encoder, [])
    with pytest.raises(ValueError, match="iterable of batches"):
        extract_features(encoder, 3)


def test_linear_probe_accuracy_on_separable_and_noisy_data():
    from keras_lcmae.evaluation import linear_probe_accuracy

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, 400)
    x = centers[y] + rng.normal(size=(400, 16)) * 0.1  # clusters: a linear probe is exact
    assert linear_probe_accuracy(x[:300], y[:300], x[300:], y[300:], 4) == 1.0
    noise = rng.normal(size=(400, 16))  # labels independent of the features: chance
    assert linear_probe_accuracy(noise[:300], y[:300], noise[300:], y[300:], 4) < 0.45
    with pytest.raises(ValueError, match="labels"):
        linear_probe_accuracy(x, y + 4, x, y, 4)


def test_online_head_learns_online_and_keeps_batchnorm_statistics():
    from keras_lcmae.evaluation import OnlineLinearHead

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3 + 5.0  # offset: the BatchNorm must centre them
    y = rng.integers(0, 4, 2000)
    x = centers[y] + rng.normal(size=(2000, 16)) * 0.3
    head = OnlineLinearHead(16, 4, learning_rate=0.1, bn_momentum=0.9)
    mean, var = np.zeros(16), np.ones(16)
    for i in range(0, 1600, 32):
        head.update(x[i : i + 32], y[i : i + 32])
        mean = 0.9 * mean + 0.1 * x[i : i + 32].mean(0)  # BatchNorm's running statistics, by hand
        var = 0.9 * var + 0.1 * x[i : i + 32].var(0, ddof=1)
    np.testing.assert_allclose(head.running_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(head.running_var, var, rtol=1e-12)
    assert head.steps == 50
    assert np.mean(head.predict(x[1600:]) == y[1600:]) > 0.98
    # first step from zero weights: the gradient of the mean cross-entropy at uniform softmax
    fresh = OnlineLinearHead(16, 4, learning_rate=0.5)
    assert fresh.update(x[:32], y[:32]) == np.mean(y[:32] == 0)  # all-zero logits: argmax is class 0
    z = (x[:32] - x[:32].mean(0)) / np.sqrt(x[:32].var(0) + 1e-6)
    grad = (np.full((32, 4), 0.25) - np.eye(4)[y[:32]]) / 32
    np.testing.assert_allclose(fresh.w, -0.5 * z.T @ grad, atol=1e-12)
    noise = OnlineLinearHead(16, 4)
    for i in range(0, 1600, 32):
        noise.update(rng.normal(size=(32, 16)), y[i : i + 32])  # labels independent of the features
    assert np.mean(noise.predict(rng.normal(size=(400, 16))) == y[1600:]) < 0.4
    with pytest.raises(ValueError, match="labels"):
        head.update(x[:4], y[:4] + 4)
    with pytest.raises(ValueError, match="features"):
        head.update(x[:4, :8], y[:4])


def test_online_probe_trains_alongside_fit_and_leaves_the_encoder_alone(fmnist):
    from keras_lcmae import MAE, TransformerDecoder, ViTEncoder
    from keras_lcmae.callbacks import OnlineLinearProbe

    images, labels = fmnist
    model = MAE(ViTEncoder.from_preset("vit_test", num_channels=3), TransformerDecoder(32, 1, 2), seed=0)
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # lr 0: the encoder must stay as it is
    before = [np.array(w) for w in model.encoder.get_weights()]
    probe = OnlineLinearProbe(
        images[:150],
        labels[:150],
        images[150:],
        labels[150:],
        num_classes=10,
        every=2,
        batch_size=32,
        learning_rate=0.1,
        seed=0,
    )
    history = model.fit(images[:64], batch_size=16, epochs=2, callbacks=[probe], verbose=0)
    assert probe.head.steps == 4  # 8 training steps, a probe step every 2
    top1 = history.history["online_probe_top1"]
    assert len(top1) == 2 and all(0.0 <= a <= 1.0 for a in top1)
    assert np.abs(probe.head.w).max() > 0
    for a, b in zip(before, model.encoder.get_weights()):
        np.testing.assert_array_equal(a, b)
    # the logged accuracy is the head's on the held-out features
    from keras_lcmae.evaluation import extract_features

    feats, _ = extract_features(model, images[150:], pool="cls")
    assert top1[-1] == pytest.approx(np.mean(probe.head.predict(feats) == labels[150:]))
