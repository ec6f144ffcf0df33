import numpy as np
import pytest

from keras_lcmae.losses import normalize_patches, reconstruction_loss
from tests.helpers import to_np


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
