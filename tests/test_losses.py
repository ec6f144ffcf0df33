import keras
import numpy as np
import pytest

from keras_lcmae.losses import (
    collapse_std,
    contrastive_terms,
    cross_view_loss,
    in_view_loss,
    normalize_patches,
    reconstruction_loss,
)
from keras_lcmae.masking import random_masking
from tests.helpers import gradients, to_np


def numpy_mae_loss(pred, target, mask, norm_pix, ddof=1):
    if norm_pix:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, ddof=ddof, keepdims=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum()


def _inputs(rng, b=3, n=16, p=48):
    pred = rng.normal(size=(b, n, p)).astype("float32")
    target = rng.random((b, n, p)).astype("float32")
    mask = (rng.random((b, n)) < 0.75).astype("float32")
    mask[:, 0] = 1
    return pred, target, mask


@pytest.mark.parametrize("norm_pix", [True, False])
def test_matches_numpy(rng, norm_pix):
    pred, target, mask = _inputs(rng)
    ours = float(to_np(reconstruction_loss(pred, target, mask, norm_pix_loss=norm_pix)))
    np.testing.assert_allclose(ours, numpy_mae_loss(pred, target, mask, norm_pix), rtol=1e-5)


def test_perfect_prediction_gives_zero(rng):
    _, target, mask = _inputs(rng)
    assert float(to_np(reconstruction_loss(target, target, mask, norm_pix_loss=False))) == 0.0
    normalised = to_np(normalize_patches(target))
    assert float(to_np(reconstruction_loss(normalised, target, mask, norm_pix_loss=True))) < 1e-10


def test_norm_pix_uses_unbiased_variance(rng):
    # With short patch vectors the ddof matters: the loss must follow ddof=1.
    pred, target, mask = _inputs(rng, p=12)
    ours = float(to_np(reconstruction_loss(pred, target, mask)))
    unbiased = numpy_mae_loss(pred, target, mask, True, ddof=1)
    biased = numpy_mae_loss(pred, target, mask, True, ddof=0)
    np.testing.assert_allclose(ours, unbiased, rtol=1e-5)
    assert abs(unbiased - biased) / unbiased > 1e-2
    assert abs(ours - biased) / biased > 1e-2


def test_only_masked_patches_count(rng):
    pred, target, mask = _inputs(rng)
    changed = pred.copy()
    changed[mask == 0] += 100.0
    a = to_np(reconstruction_loss(pred, target, mask))
    b = to_np(reconstruction_loss(changed, target, mask))
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_normalised_over_whole_batch(rng):
    # A sample with more masked patches weighs more (sum over batch / count).
    pred, target, mask = _inputs(rng, b=2)
    mask[0] = 1
    mask[1] = 0
    mask[1, :2] = 1
    per = ((pred - to_np(normalize_patches(target))) ** 2).mean(-1)
    expected = (per[0].sum() + per[1, :2].sum()) / (16 + 2)
    np.testing.assert_allclose(float(to_np(reconstruction_loss(pred, target, mask))), expected, rtol=1e-5)


def test_shape_errors_name_the_problem(rng):
    pred, target, mask = _inputs(rng)
    with pytest.raises(ValueError, match="Shape mismatch"):
        reconstruction_loss(pred[:, :, :10], target, mask)
    with pytest.raises(ValueError, match="`mask` must have rank 2"):
        reconstruction_loss(pred, target, mask[..., None])


# -- LC-MAE's contrastive terms (Eq. 5, Eq. 6) against numpy loops ---------------


def np_cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def np_cross_view(v1, v2, m1, m2):
    """Eq. 5 with batch normalisation, by explicit loops."""
    total, count = 0.0, 0
    for b in range(v1.shape[0]):
        for i in range(v1.shape[1]):
            if m1[b, i] and m2[b, i]:
                total += 1 - np_cos(v1[b, i], v2[b, i])
                count += 1
    return total / max(count, 1)


def np_in_view(v, x, m):
    """Eq. 6 with batch normalisation, by explicit loops over ordered pairs."""
    total, count = 0.0, 0
    for b in range(v.shape[0]):
        for i in range(v.shape[1]):
            for j in range(v.shape[1]):
                if i != j and m[b, i] and m[b, j]:
                    total += abs(np_cos(v[b, i], v[b, j]) - np_cos(x[b, i], x[b, j]))
                    count += 1
    return total / max(count, 1)


def realistic_masks(rng, b, n, ratio=0.75):
    dummy = np.zeros((b, n, 1), "float32")
    return to_np(random_masking(dummy, ratio, noise=rng.random((b, n)).astype("float32"))["mask"])


def test_cross_view_matches_numpy(rng):
    v1 = rng.normal(size=(3, 16, 24)).astype("float32")
    v2 = rng.normal(size=(3, 16, 24)).astype("float32")
    m1, m2 = realistic_masks(rng, 3, 16), realistic_masks(rng, 3, 16)
    assert 0 < (m1 * m2).sum() < m1.sum()
    np.testing.assert_allclose(float(to_np(cross_view_loss(v1, v2, m1, m2))), np_cross_view(v1, v2, m1, m2), rtol=1e-5)


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (49, 0.75), (36, 0.5)])
def test_in_view_matches_numpy(rng, n, ratio):
    v = rng.normal(size=(2, n, 24)).astype("float32")
    x = rng.random((2, n, 12)).astype("float32")
    x[0, 3] = 0.0  # an all-black patch: cosine 0, never NaN
    m = realistic_masks(rng, 2, n, ratio)
    ours = float(to_np(in_view_loss(v, x, m)))
    assert np.isfinite(ours)
    np.testing.assert_allclose(ours, np_in_view(v, x, m), rtol=1e-5)


def test_identical_views_give_zero_cross_loss(rng):
    v = rng.normal(size=(2, 16, 8)).astype("float32")
    m = realistic_masks(rng, 2, 16)
    assert abs(float(to_np(cross_view_loss(v, v, m, m)))) < 1e-6


def test_constant_projector_collapses_cross_but_not_in_view(rng):
    x = rng.random((2, 16, 48)).astype("float32") - 0.5
    m1, m2 = realistic_masks(rng, 2, 16), realistic_masks(rng, 2, 16)
    const = np.broadcast_to(rng.normal(size=(1, 1, 8)), (2, 16, 8)).astype("float32")
    spread = rng.normal(size=(2, 16, 8)).astype("float32")
    assert abs(float(to_np(cross_view_loss(const, const, m1, m2)))) < 1e-6
    collapsed_in = float(to_np(in_view_loss(const, x, m1)))
    # cos(v_i, v_j) = 1 for all pairs: L_in = mean |1 - cos(x_i, x_j)|, large.
    assert collapsed_in > 0.8
    assert collapsed_in > 1.5 * float(to_np(in_view_loss(spread, x, m1)))
    assert float(to_np(collapse_std(const))) < 1e-3
    assert float(to_np(collapse_std(spread))) > 0.2
    # v following the input similarity structure exactly gives L_in = 0.
    assert float(to_np(in_view_loss(x, x, m1))) < 1e-6


def test_collapse_std_matches_numpy(rng):
    v = rng.normal(size=(2, 10, 6)).astype("float32") + 0.5
    m = (rng.random((2, 10)) < 0.6).astype("float32")
    u = v.reshape(-1, 6) / np.linalg.norm(v.reshape(-1, 6), axis=1, keepdims=True)
    np.testing.assert_allclose(float(to_np(collapse_std(v))), np.sqrt(u.var(0).mean()), rtol=1e-4)
    sel = u[m.reshape(-1) == 1]
    np.testing.assert_allclose(float(to_np(collapse_std(v, m))), np.sqrt(sel.var(0).mean()), rtol=1e-4)


def test_no_co_masked_position_is_finite():
    v = np.ones((1, 4, 3), "float32")
    m1 = np.array([[1, 1, 0, 0]], "float32")
    m2 = np.array([[0, 0, 1, 1]], "float32")
    assert float(to_np(cross_view_loss(v, v + 1, m1, m2))) == 0.0
    one = np.array([[1, 0, 0, 0]], "float32")
    assert float(to_np(in_view_loss(v, v, one))) == 0.0


class _Holder(keras.layers.Layer):
    """Variables to differentiate the pure loss functions against."""

    def __init__(self, arrays):
        super().__init__()
        self.vs = [self.add_weight(shape=a.shape, initializer=keras.initializers.Constant(a)) for a in arrays]


def test_zero_projector_output_has_finite_gradients(rng):
    # An all-zero v (zero features with the projector's zero initial bias) has
    # cosine 0 with anything, as torch.nn.functional.normalize gives; its
    # gradient must be finite too: max(sqrt(|v|^2), eps) gave 0 * inf = NaN.
    b, n, k, d = 2, 6, 2, 5
    v = rng.normal(size=(2 * b, n, d)).astype("float32")
    v[0, 1] = 0.0
    v[b, 1] = 0.0  # the same position in view 2, so the zero sits in L_cross too
    x = rng.normal(size=(2 * b, n, 7)).astype("float32")
    shuffle = np.stack([np.r_[0, 2, 1, 3, 4, 5]] * 2 + [rng.permutation(n)] * (2 * b - 2)).astype("int32")
    shuffle[b] = np.r_[2, 1, 0, 3, 4, 5]  # position 1 masked in both views of image 0
    restore = np.argsort(shuffle, axis=1).astype("int32")
    ids_masked = shuffle[:, k:]
    mask = (restore >= k).astype("float32")
    feats = np.take_along_axis(v, ids_masked[..., None], axis=1)
    xm = np.take_along_axis(x, ids_masked[..., None], axis=1)
    kernel = rng.normal(size=(d, 8)).astype("float32")
    holder = _Holder([v, feats, kernel])

    def explicit():
        vv = holder.vs[0]
        return cross_view_loss(vv[:b], vv[b:], mask[:b], mask[b:]) + in_view_loss(vv, x, mask)

    def narrow():  # features narrower than the projector: the inner-product path
        t = contrastive_terms(holder.vs[1], xm, ids_masked, restore, k, holder.vs[2], np.zeros(8, "float32"))
        return t["cross"] + t["in"]

    def given_v():
        t = contrastive_terms(holder.vs[1], xm, ids_masked, restore, k)
        return t["cross"] + t["in"]

    for fn in (explicit, narrow, given_v):
        assert np.isfinite(float(to_np(fn()))), fn.__name__
        grads = [g for g in gradients(holder, fn) if g is not None]
        assert grads and all(np.isfinite(g).all() for g in grads), fn.__name__
    # value: the zero vector has cosine 0 (torch.nn.functional.normalize semantics)
    u = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    both = mask[:b] * mask[b:]
    ref_cross = (both * (1 - (u[:b] * u[b:]).sum(-1))).sum() / both.sum()
    np.testing.assert_allclose(float(to_np(cross_view_loss(v[:b], v[b:], mask[:b], mask[b:]))), ref_cross, rtol=1e-5)


def test_shape_errors_are_named(rng):
    v = rng.normal(size=(2, 16, 8)).astype("float32")
    m = np.ones((2, 16), "float32")
    with pytest.raises(ValueError, match="Shape mismatch"):
        cross_view_loss(v, v[:, :8], m, m)
    with pytest.raises(ValueError, match="`mask` must have rank 2"):
        in_view_loss(v, v, m[None])
