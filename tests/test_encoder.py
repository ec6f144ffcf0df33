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
    theirs = ViTMAEModel(
        ViTMAEConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    )
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    n_ours = sum(int(np.prod(v.shape)) for v in ours.trainable_weights)
    assert n_ours == n_theirs
    for name, (width, depth, heads) in {
        "vit_tiny": (192, 12, 3),
        "vit_small": (384, 12, 6),
        "vit_large": (1024, 24, 16),
        "vit_huge": (1280, 32, 16),
    }.items():
        from keras_lcmae.encoder import preset_kwargs

        kw = preset_kwargs(name)
        assert (kw["hidden_dim"], kw["depth"], kw["num_heads"]) == (width, depth, heads)
        # official MAE: ViT-B/16, ViT-L/16, ViT-H/14
        assert kw.get("patch_size", 16) == (14 if name == "vit_huge" else 16)
    assert ViTEncoder(**preset_kwargs("vit_huge", depth=1)).grid_size == (16, 16)  # 224 px / 14
    assert ViTEncoder.from_preset("vit_test", patch_size=4).num_patches == 64


# -- forward_intermediates: the one token pass -----------------------------------


def _manual_pass(encoder, tokens):
    """Block outputs and the normed output, by hand from the encoder's parts."""
    cls = keras.ops.broadcast_to(
        encoder.cls_token + encoder.pos_embed[:, :1, :], (tokens.shape[0], 1, encoder.hidden_dim)
    )
    x = keras.ops.concatenate([cls, tokens], axis=1)
    outputs = []
    for block in encoder.blocks:
        x = block(x, training=False)
        outputs.append(keras.ops.convert_to_numpy(x))
    return outputs, keras.ops.convert_to_numpy(encoder.norm(x))


def test_forward_intermediates_equals_the_blocks_run_by_hand():
    encoder = ViTEncoder.from_preset("vit_test", depth=3)
    tokens = encoder.embed(np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32"))
    blocks, normed = _manual_pass(encoder, tokens)
    out = encoder.forward_intermediates(tokens, indices=[2, 0], training=False, return_attention=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["output"]), normed, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["intermediates"][0]), blocks[2], atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out["intermediates"][1]), blocks[0], atol=1e-5)
    assert len(out["attention"]) == 3
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(encoder.forward_tokens(tokens, training=False)), normed, atol=1e-5
    )
    plain = encoder.forward_intermediates(tokens, training=False, norm=False)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(plain["output"]), blocks[-1], atol=1e-5)
    assert plain["intermediates"] == [] and plain["attention"] == []
    early = encoder.forward_intermediates(tokens, indices=[-2], training=False, stop_early=True, return_attention=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(early["output"]), blocks[1], atol=1e-5)
    assert len(early["attention"]) == 2  # the last block did not run


@pytest.mark.parametrize("kwargs", [dict(indices=[3]), dict(indices=[-4]), dict(indices=[True]), dict(stop_early=True)])
def test_forward_intermediates_bad_arguments(kwargs):
    encoder = ViTEncoder.from_preset("vit_test", depth=3)
    tokens = encoder.embed(np.zeros((1, 32, 32, 3), "float32"))
    with pytest.raises(ValueError, match="indices"):
        encoder.forward_intermediates(tokens, **kwargs)
