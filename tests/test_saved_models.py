"""``.keras`` files written by an earlier layout of the library still load and
compute the same outputs.

``tests/data/saved_2026-12-03`` holds tiny models (``vit_test`` encoder)
written by ``tests/scripts/make_saved_models.py`` with the library of commit
4e3901b on TensorFlow, and their outputs on fixed images and masking noise.
Every backend loads them: the test fails if a class, argument or weight name
changes without a path for old files.
"""

import os

import keras
import numpy as np
import pytest

from keras_lcmae.classifier import ViTClassifier
from keras_lcmae.models import LCMAE

DATA = os.path.join(os.path.dirname(__file__), "data", "saved_2026-12-03")
NAMES = ["mae", "mae_self_guided", "lcmae", "autoencoder", "autoencoder_conv", "classifier", "probe"]


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(DATA, "outputs.npz")))


@pytest.mark.parametrize("name", NAMES)
def test_old_file_loads_and_computes_the_same(name, reference):
    model = keras.saving.load_model(os.path.join(DATA, name + ".keras"))
    images, noise = reference["images"], reference["noise"]
    if isinstance(model, ViTClassifier):
        got = keras.ops.convert_to_numpy(model(images, training=False))
        np.testing.assert_allclose(got, reference[name + "/logits"], rtol=1e-4, atol=1e-5)
    else:
        out = model(images, noise=(noise, noise) if isinstance(model, LCMAE) else noise, training=False)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(out["pred"]), reference[name + "/pred"], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(out["mask"]), reference[name + "/mask"])
    # the loaded model saves again and reloads to the same class and config
    assert model.optimizer is not None, "the saved compile() state should come back"
    again = type(model).from_config(model.get_config())
    assert again.get_config() == model.get_config()
