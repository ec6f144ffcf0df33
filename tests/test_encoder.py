"""Tests of keras_lcmae/encoder.py: the ViT encoder and its presets."""

import os

import keras
import numpy as np
import pytest

from keras_lcmae import ViTEncoder
from tests.helpers import check_layer, to_np
from tests.test_models import tiny_mae


def test_encoder_passes_the_common_layer_checks(tmp_path):
    """Symbolic and eager calls agree on the shape, one fit step trains, a
    .keras round trip computes the same outputs, the config mirrors __init__."""
    model = check_layer(
        lambda: ViTEncoder(image_size=32, patch_size=8, hidden_dim=32, depth=2, num_heads=2, drop_path_rate=0.1),
        (2, 32, 32, 3),
        tmp_path,
    )
    assert tuple(model.output.shape) == (None, 1 + 16, 32)


def test_encoder_is_a_standalone_model(tmp_path, rng):
    mae = tiny_mae()
    x = rng.random((2, 32, 32, 3)).astype("float32")
    features = to_np(mae.encoder(x))
    assert features.shape == (2, 17, 32)
    path = os.path.join(tmp_path, "encoder.keras")
    mae.encoder.save(path)
    encoder = keras.saving.load_model(path)
    np.testing.assert_allclose(to_np(encoder(x)), features, atol=1e-6)
    # Downstream: a functional classifier on the loaded encoder trains.
    inputs = keras.Input((32, 32, 3))
    logits = keras.layers.Dense(10)(encoder(inputs)[:, 0])
    clf = keras.Model(inputs, logits)
    clf.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clf.fit(x, np.array([1, 2]), verbose=0)


def test_presets_have_the_standard_sizes():
    torch = pytest.importorskip("torch")  # noqa: F841
    from transformers import ViTMAEConfig, ViTMAEModel

    ours = ViTEncoder.from_preset("vit_base", image_size=224, patch_size=16)
    theirs = ViTMAEModel(ViTMAEConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072))
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    n_ours = sum(int(np.prod(v.shape)) for v in ours.trainable_weights)
    assert n_ours == n_theirs
    for name, (width, depth, heads) in {
        "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_large": (1024, 24, 16), "vit_huge": (1280, 32, 16)
    }.items():
        from keras_lcmae.encoder import preset_kwargs

        kw = preset_kwargs(name)
        assert (kw["hidden_dim"], kw["depth"], kw["num_heads"]) == (width, depth, heads)
        # official MAE: ViT-B/16, ViT-L/16, ViT-H/14
        assert kw.get("patch_size", 16) == (14 if name == "vit_huge" else 16)
    assert ViTEncoder(**preset_kwargs("vit_huge", depth=1)).grid_size == (16, 16)  # 224 px / 14
    assert ViTEncoder.from_preset("vit_test", patch_size=4).num_patches == 64
