"""Patch clustering utilities against numpy re-derivations and planted clusters."""

import numpy as np
import pytest

from keras_lcmae.clustering import (
    bipartition,
    cluster_gap,
    feature_variance,
    mean_token_similarity,
    similarity_variance,
    token_similarity,
)
from tests.helpers import to_np


def np_normalize(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def np_similarity(x):
    f = np_normalize(x)
    return f @ f.transpose(0, 2, 1)


def np_feature_variance(x):
    f = np_normalize(x)
    return np.array([np.var(fi, axis=0).mean() for fi in f])  # population variance over tokens, mean over dims


def np_similarity_variance(x):
    out = []
    for m in np_similarity(x):
        n = len(m)
        out.append(np.var(m[~np.eye(n, dtype=bool)]))
    return np.array(out)


def np_cluster_gap(x, a):
    out = []
    for m, ai in zip(np_similarity(x), a):
        n = len(m)
        same = ai[:, None] == ai[None, :]
        intra = m[same & ~np.eye(n, dtype=bool)]
        inter = m[~same]
        out.append((intra.mean() if intra.size else 0.0) - (inter.mean() if inter.size else 0.0))
    return np.array(out)


def planted(rng, sizes, dim=16, spread=0.1, batch=1):
    """``batch`` images with two clusters of the given sizes around random centres, shuffled."""
    feats, labels = [], []
    for _ in range(batch):
        centres = rng.normal(size=(2, dim))
        lab = np.repeat([0, 1], sizes)
        x = centres[lab] + spread * rng.normal(size=(len(lab), dim)) * np.linalg.norm(centres, axis=1).mean() / np.sqrt(
            dim
        )
        perm = rng.permutation(len(lab))
        feats.append(x[perm])
        labels.append(lab[perm])
    return np.stack(feats).astype("float32"), np.stack(labels)


def test_similarity_matches_numpy(rng):
    x = rng.normal(size=(3, 20, 8)).astype("float32")
    np.testing.assert_allclose(to_np(token_similarity(x)), np_similarity(x), atol=1e-5)
    np.testing.assert_allclose(np.diagonal(to_np(token_similarity(x)), axis1=1, axis2=2), 1.0, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 16, 8), (3, 49, 32), (1, 5, 3)])
def test_metrics_match_numpy(rng, shape):
    x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=shape[:2] + (1,))).astype("float32")
    a = rng.integers(0, 2, size=shape[:2])
    np.testing.assert_allclose(to_np(feature_variance(x)), np_feature_variance(x), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(to_np(similarity_variance(x)), np_similarity_variance(x), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(to_np(cluster_gap(x, a)), np_cluster_gap(x, a), atol=1e-5)
    assert to_np(feature_variance(x)).shape == (shape[0],)


def test_known_values_antipodal_clusters():
    u = np.eye(4, dtype="float32")[1] * 3.0
    x = np.stack([u] * 5 + [-u] * 11)[None]
    a = np.array([[0] * 5 + [1] * 11])
    # intra pairs all have cosine 1, inter pairs -1
    assert float(to_np(cluster_gap(x, a))[0]) == pytest.approx(2.0, abs=1e-5)
    # sigma_F = (1 - ||mu||^2) / D with mu = (5 - 11)/16 u_hat
    assert float(to_np(feature_variance(x))[0]) == pytest.approx((1 - (6 / 16) ** 2) / 4, abs=1e-6)
    # off-diagonal similarities: +1 on 5*4 + 11*10 = 130 pairs, -1 on 2*55 = 110 pairs
    vals = np.array([1.0] * 130 + [-1.0] * 110)
    assert float(to_np(similarity_variance(x))[0]) == pytest.approx(vals.var(), abs=1e-5)
    # identical tokens: no variance, and a wrong split (clusters mixed) has gap 0
    same = np.ones((1, 8, 4), "float32")
    assert float(to_np(feature_variance(same))[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(to_np(similarity_variance(same))[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(to_np(cluster_gap(same, np.array([[0, 1] * 4])))[0]) == pytest.approx(0.0, abs=1e-6)


def test_gap_with_a_single_cluster_has_no_inter_term():
    x = np.array([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]], "float32")
    intra = np_similarity(x)[0][~np.eye(3, dtype=bool)].mean()
    assert float(to_np(cluster_gap(x, np.ones((1, 3))))[0]) == pytest.approx(intra, abs=1e-6)


@pytest.mark.parametrize("sizes", [(5, 11), (11, 5), (3, 46), (25, 24), (8, 8)])
def test_bipartition_recovers_planted_split(rng, sizes):
    x, labels = planted(rng, sizes, batch=4)
    a = to_np(bipartition(x))
    assert a.dtype == np.int32 and a.shape == labels.shape
    for ai, li in zip(a, labels):
        assert (ai == li).all() or (ai == 1 - li).all(), (ai, li)
    # labelling rule: cluster 1 is, on average, more similar to the mean token
    score = to_np(mean_token_similarity(x))
    for si, ai in zip(score, a):
        assert si[ai == 1].mean() >= si[ai == 0].mean()


def test_bipartition_majority_cluster_is_one_and_threshold_only_works(rng):
    x, labels = planted(rng, (4, 12), spread=0.05, batch=3)
    for iterations in (0, 3):
        a = to_np(bipartition(x, iterations=iterations))
        np.testing.assert_array_equal(a, labels)  # the 12-token cluster dominates the mean token


def test_bipartition_degenerate_inputs():
    np.testing.assert_array_equal(to_np(bipartition(np.ones((2, 6, 3), "float32"))), 1)
    with pytest.raises(ValueError, match="iterations"):
        bipartition(np.ones((1, 4, 2), "float32"), iterations=-1)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(batch, tokens, dim\)"):
        token_similarity(np.ones((4, 3), "float32"))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        feature_variance(np.ones((2, 1, 3), "float32"))
    with pytest.raises(ValueError, match="assignments must have shape"):
        cluster_gap(np.ones((2, 4, 3), "float32"), np.ones((2, 5)))
