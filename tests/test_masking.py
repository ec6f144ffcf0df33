import keras
import numpy as np
import pytest

from keras_lcmae.masking import num_visible, random_masking
from tests.helpers import to_np


def numpy_random_masking(x, ratio, noise):
    """Official random_masking re-derived in numpy."""
    n, length, d = x.shape
    keep = int(length * (1 - ratio))
    ids_shuffle = np.argsort(noise, axis=1)
    ids_restore = np.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :keep]
    x_masked = np.take_along_axis(x, ids_keep[..., None], axis=1)
    mask = np.ones([n, length])
    mask[:, :keep] = 0
    mask = np.take_along_axis(mask, ids_restore, axis=1)
    return x_masked, mask, ids_restore, ids_shuffle


@pytest.mark.parametrize("length,ratio", [(16, 0.75), (49, 0.75), (196, 0.75), (64, 0.3), (64, 0.9), (50, 0.55)])
def test_matches_numpy_official(rng, length, ratio):
    x = rng.normal(size=(3, length, 8)).astype("float32")
    noise = rng.random((3, length)).astype("float32")
    out = random_masking(x, ratio, noise=noise)
    ref_x, ref_mask, ref_restore, ref_shuffle = numpy_random_masking(x, ratio, noise)
    np.testing.assert_array_equal(to_np(out["x_masked"]), ref_x)
    np.testing.assert_array_equal(to_np(out["mask"]), ref_mask)
    np.testing.assert_array_equal(to_np(out["ids_restore"]), ref_restore)
    keep = int(length * (1 - ratio))
    assert to_np(out["ids_keep"]).shape == (3, keep)
    # exactly int(N * (1 - r)) visible per sample
    np.testing.assert_array_equal(to_np(out["mask"]).sum(1), length - keep)
    # ids_restore inverts ids_shuffle
    np.testing.assert_array_equal(
        np.take_along_axis(ref_shuffle, to_np(out["ids_restore"]), 1), np.tile(np.arange(length), (3, 1))
    )


def test_drawn_noise_is_per_sample_and_seeded():
    x = np.zeros((4, 64, 4), "float32")
    a = to_np(random_masking(x, 0.75, seed=keras.random.SeedGenerator(3))["mask"])
    b = to_np(random_masking(x, 0.75, seed=keras.random.SeedGenerator(3))["mask"])
    np.testing.assert_array_equal(a, b)
    assert len({tuple(row) for row in a}) == 4, "each sample must get its own mask"
    np.testing.assert_array_equal(a.sum(1), 48)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, "high"])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(196, ratio)


def test_ratio_leaving_no_visible_patch():
    with pytest.raises(ValueError, match="leaves no visible patch"):
        random_masking(np.zeros((1, 16, 4), "float32"), 0.95)


def test_noise_shape_checked():
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(np.zeros((2, 16, 4), "float32"), 0.75, noise=np.zeros((2, 15), "float32"))


# -- strategies ------------------------------------------------------------------


def test_strategies_from_names_and_their_serialisation():
    from keras_lcmae.masking import RandomMasking, SelfGuidedMasking, get_masking

    assert get_masking("random") == RandomMasking()
    assert get_masking("self_guided") == SelfGuidedMasking()
    strategy = SelfGuidedMasking(informed_start_epoch=4, hint_ratio=0.25, guide_layer="decoder")
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(strategy))
    assert again == strategy and again is not strategy
    assert again != SelfGuidedMasking(informed_start_epoch=4, hint_ratio=0.25, guide_layer=0)
    for bad in ("smart", 3, None):
        with pytest.raises(ValueError, match="masking must be a strategy"):
            get_masking(bad)


def test_random_strategy_is_official_random_masking_of_the_model_seed():
    from keras_lcmae import MAE, TransformerDecoder, ViTEncoder
    from keras_lcmae.masking import RandomMasking

    mae = MAE(
        ViTEncoder.from_preset("vit_test"),
        TransformerDecoder(32, depth=1, num_heads=2),
        seed=5,
        masking=RandomMasking(),
    )
    x = keras.random.normal((3, 16, 32), seed=0)
    got = mae.apply_masking(x)
    expected = random_masking(x, 0.75, seed=keras.random.SeedGenerator(5))
    for key in ("mask", "ids_restore", "ids_keep"):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got[key]), keras.ops.convert_to_numpy(expected[key]))
