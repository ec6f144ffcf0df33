import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


@pytest.fixture(autouse=True)
def _fresh_session():
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    yield


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {BACKEND}"


@pytest.fixture(scope="session")
def fmnist():
    """200 real Fashion-MNIST test images, 32 px, 3 channels, and labels."""
    from keras_lcmae.data import fashion_mnist_for_vit

    return fashion_mnist_for_vit("test", image_size=32, channels=3, limit=200)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A saved tiny ViTEncoder (32 px, 8-px patches, 1 channel, width 32,
    depth 2) for the evaluation recipes' tests."""
    from keras_lcmae import ViTEncoder

    keras.utils.set_random_seed(0)
    path = str(tmp_path_factory.mktemp("enc") / "encoder.keras")
    ViTEncoder(image_size=32, patch_size=8, num_channels=1, hidden_dim=32, depth=2, num_heads=2).save(path)
    return path


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """A few 32-px RGB images in train/ and val/ class folders."""
    from PIL import Image

    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            os.makedirs(root / split / c)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return str(root)


@pytest.fixture
def policy():
    """``keras.config.set_dtype_policy``, with the global policy set back to
    float32 after the test."""
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy("float32")
