"""ViTClassifier: pools, linear probe vs finetune, loading, serialization."""

import os

import keras
import numpy as np
import pytest

from keras_lcmae import MAE, TransformerDecoder, ViTClassifier, ViTEncoder, load_encoder
from keras_lcmae.convert import export_official_state_dict
from keras_lcmae.ops import resize_pos_embed
from keras_lcmae.optim import LARS, finetune_adamw
from tests.helpers import assert_config_mirrors_init, to_np

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def tiny_encoder(**kwargs):
    kwargs = dict(dict(image_size=32, patch_size=8, hidden_dim=32, depth=2, num_heads=2), **kwargs)
    return ViTEncoder(**kwargs)


def numpy_layer_norm(x, gamma, beta, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


@pytest.fixture
def images(rng):
    return rng.random((4, 32, 32, 3)).astype("float32")


@pytest.mark.parametrize("pool", ["cls", "avg"])
@pytest.mark.parametrize("linear_probe", [False, True], ids=["finetune", "probe"])
def test_output_shapes(images, pool, linear_probe):
    model = ViTClassifier(tiny_encoder(), num_classes=5, pool=pool, linear_probe=linear_probe)
    assert tuple(model(images).shape) == (4, 5)
    assert tuple(model.forward_features(images).shape) == (4, 32)


def test_cls_pool_is_the_normed_cls_token(images):
    encoder = tiny_encoder()
    model = ViTClassifier(encoder, num_classes=3, pool="cls")
    np.testing.assert_allclose(to_np(model.forward_features(images)), to_np(encoder(images))[:, 0], atol=1e-6)


def test_avg_pool_skips_the_final_norm_and_the_cls_token(images, rng):
    encoder = tiny_encoder()
    for v in encoder.norm.weights:  # make the final norm visible if it were used
        v.assign(rng.normal(size=v.shape).astype("float32"))
    model = ViTClassifier(encoder, num_classes=3, pool="avg")
    for v in model.fc_norm.weights:
        v.assign(rng.normal(size=v.shape).astype("float32"))
    # The same weights in an encoder without a final norm give the pre-norm tokens.
    plain = tiny_encoder(final_norm=False)
    for v in plain.weights:
        v.assign(next(w for w in encoder.weights if w.path == v.path))
    tokens = to_np(plain(images))
    want = numpy_layer_norm(tokens[:, 1:].mean(1), to_np(model.fc_norm.gamma), to_np(model.fc_norm.beta))
    np.testing.assert_allclose(to_np(model.forward_features(images)), want, atol=1e-5)
    assert model.fc_norm.epsilon == 1e-6
    # The unused final norm is frozen so it is neither trained nor decayed.
    assert not any("vit_encoder/norm/" in v.path for v in model.trainable_variables)


def test_heads_as_official():
    probe = ViTClassifier(tiny_encoder(), num_classes=100, linear_probe=True)
    norm = probe.head_norm
    assert isinstance(norm, keras.layers.BatchNormalization)
    assert (norm.center, norm.scale, norm.epsilon, norm.momentum) == (False, False, 1e-6, 0.9)
    assert [v.path for v in probe.trainable_variables] == ["vit_classifier/head/kernel", "vit_classifier/head/bias"]
    finetune = ViTClassifier(tiny_encoder(), num_classes=100)
    assert finetune.head_norm is None
    for model, std in ((probe, 0.01), (finetune, 2e-5)):
        kernel = to_np(model.head.kernel)
        assert kernel.shape == (32, 100)
        assert np.std(kernel) == pytest.approx(std, rel=0.06)
        np.testing.assert_array_equal(to_np(model.head.bias), 0.0)


@pytest.mark.parametrize("pool,linear_probe", [("cls", True), ("avg", False)])
def test_keras_round_trip(tmp_path, images, pool, linear_probe):
    model = ViTClassifier(tiny_encoder(), num_classes=3, pool=pool, head_dropout=0.1, linear_probe=linear_probe)
    clone = assert_config_mirrors_init(model)
    assert (clone.pool, clone.linear_probe, clone.head_dropout) == (pool, linear_probe, 0.1)
    path = os.path.join(tmp_path, "clf.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, ViTClassifier) and isinstance(loaded.encoder, ViTEncoder)
    np.testing.assert_allclose(to_np(loaded(images)), to_np(model(images)), atol=1e-6)
    assert [v.path for v in loaded.trainable_variables] == [v.path for v in model.trainable_variables]


def test_linear_probe_trains_only_the_head(images):
    model = ViTClassifier(tiny_encoder(), num_classes=3, linear_probe=True)
    encoder_before = [to_np(v).copy() for v in model.encoder.weights]
    head_before = to_np(model.head.kernel).copy()
    model.compile(optimizer=LARS(1.0, trust_coefficient=0.1), loss=LOSS)
    model.fit(images, np.array([0, 1, 2, 0]), batch_size=2, epochs=2, verbose=0)
    for before, v in zip(encoder_before, model.encoder.weights):
        np.testing.assert_array_equal(to_np(v), before, err_msg=v.path)
    assert np.abs(to_np(model.head.kernel) - head_before).max() > 1e-4
    assert np.abs(to_np(model.head_norm.moving_mean)).max() > 0  # BatchNorm in training mode


def test_finetune_step_updates_the_encoder(images):
    model = ViTClassifier(tiny_encoder(drop_path_rate=0.1), num_classes=3, pool="avg")
    model.compile(optimizer=finetune_adamw(model, 1e-3, layer_decay=0.65), loss=LOSS)
    # the position table trains too (official finetuning: timm's learnable pos_embed)
    watched = [
        model.encoder.patch_embed.proj.kernel,
        model.encoder.blocks[0].attn.qkv.kernel,
        model.encoder.cls_token,
        model.encoder.pos_embed,
        model.head.kernel,
    ]
    before = [to_np(v).copy() for v in watched]
    model.fit(images, np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
    for b, v in zip(before, watched):
        assert np.abs(to_np(v) - b).max() > 1e-5, v.path


def test_from_encoder_file(tmp_path, images):
    encoder = tiny_encoder()
    path = os.path.join(tmp_path, "encoder.keras")
    encoder.save(path)
    model = ViTClassifier.from_encoder_file(path, 10, image_size=32, patch_size=8, num_channels=3, drop_path_rate=0.1)
    assert model.encoder.drop_path_rate == 0.1 and model.num_classes == 10
    np.testing.assert_allclose(to_np(model.forward_features(images)), to_np(encoder(images))[:, 0], atol=1e-6)
    # another resolution: the position table is resampled to the new grid (official finetuning)
    bigger = ViTClassifier.from_encoder_file(path, 10, image_size=(48, 64))
    assert bigger.encoder.grid_size == (6, 8) and bigger.encoder.image_size == (48, 64)
    np.testing.assert_allclose(
        to_np(bigger.encoder.pos_embed), resize_pos_embed(to_np(encoder.pos_embed), (4, 4), (6, 8)), atol=1e-6
    )
    np.testing.assert_array_equal(
        to_np(bigger.encoder.blocks[0].attn.qkv.kernel), to_np(encoder.blocks[0].attn.qkv.kernel)
    )
    assert tuple(bigger(np.zeros((2, 48, 64, 3), "float32")).shape) == (2, 10)
    with pytest.raises(ValueError, match=r"image_size=36"):
        ViTClassifier.from_encoder_file(path, 10, image_size=36)  # not a multiple of the 8-px patches
    with pytest.raises(ValueError, match=r"patch_size=8 \(asked for 16\)"):
        ViTClassifier.from_encoder_file(path, 10, patch_size=16)
    with pytest.raises(ValueError, match=r"num_channels=3 \(asked for 1\)"):
        load_encoder(path, num_channels=1)
    with pytest.raises(FileNotFoundError):
        load_encoder(os.path.join(tmp_path, "missing.keras"))


def test_from_model_files(tmp_path, images):
    """A whole MAE file gives its encoder; another architecture is refused."""
    mae = MAE(tiny_encoder(), TransformerDecoder(hidden_dim=32, depth=1, num_heads=2), seed=0)
    path = os.path.join(tmp_path, "mae.keras")
    mae.save(path)
    model = ViTClassifier.from_encoder_file(path, 3)
    np.testing.assert_allclose(to_np(model.forward_features(images)), to_np(mae.encoder(images))[:, 0], atol=1e-6)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    other_path = os.path.join(tmp_path, "other.keras")
    other.save(other_path)
    with pytest.raises(ValueError, match="holds a Sequential, not a ViTEncoder"):
        ViTClassifier.from_encoder_file(other_path, 3)


def test_from_official_state_dict(images, rng):
    encoder = tiny_encoder()
    state = export_official_state_dict(encoder)
    model = ViTClassifier.from_official_state_dict(state, 4, num_heads=2, image_size=32, drop_path_rate=0.1)
    assert model.encoder.drop_path_rate == 0.1
    np.testing.assert_allclose(to_np(model.forward_features(images)), to_np(encoder(images))[:, 0], atol=1e-5)
    # Global pool: the checkpoint's final norm is dropped, as the official finetuning.
    avg = ViTClassifier.from_official_state_dict(state, 4, num_heads=2, pool="avg")
    assert avg.encoder.norm is None
    reference = ViTClassifier(encoder, 4, pool="avg")
    np.testing.assert_allclose(
        to_np(avg.forward_features(images)), to_np(reference.forward_features(images)), atol=1e-5
    )
    # A finetuned (global pool) checkpoint: its fc_norm and head load when the classes match.
    finetuned = {k: v for k, v in state.items() if not k.startswith("norm.")}
    finetuned.update(
        {
            "fc_norm.weight": rng.normal(size=32).astype("float32"),
            "fc_norm.bias": rng.normal(size=32).astype("float32"),
            "head.weight": rng.normal(size=(4, 32)).astype("float32"),
            "head.bias": rng.normal(size=4).astype("float32"),
        }
    )
    loaded = ViTClassifier.from_official_state_dict(finetuned, 4, num_heads=2, pool="avg")
    np.testing.assert_array_equal(to_np(loaded.head.kernel), finetuned["head.weight"].T)
    np.testing.assert_array_equal(to_np(loaded.fc_norm.gamma), finetuned["fc_norm.weight"])
    fresh = ViTClassifier.from_official_state_dict(finetuned, 7, num_heads=2, pool="avg")
    assert np.abs(to_np(fresh.head.kernel)).max() < 1e-3  # other classes: a new head (std 2e-5)
    resized = ViTClassifier.from_official_state_dict(state, 4, num_heads=2, image_size=64)
    np.testing.assert_allclose(to_np(resized.encoder.pos_embed), resize_pos_embed(state["pos_embed"], 4, 8), atol=1e-6)
    with pytest.raises(ValueError, match=r"num_channels=3 \(asked for 1\)"):
        ViTClassifier.from_official_state_dict(state, 4, num_heads=2, num_channels=1)
    with pytest.raises(ValueError, match="mapping"):
        ViTClassifier.from_official_state_dict([1, 2], 4, num_heads=2)


def test_loading_at_a_new_size_builds_the_encoder_once(tmp_path, monkeypatch):
    """Resizing, a new drop-path rate and the trainable position table of
    finetuning happen in one rebuild: after loading (file) or building from
    the state dict, exactly one more ViTEncoder is made, and the constructor
    keeps it (the probe keeps the loaded encoder as it is)."""
    from keras_lcmae.encoder import ViTEncoder

    encoder = tiny_encoder()
    path = os.path.join(tmp_path, "encoder.keras")
    encoder.save(path)
    state = export_official_state_dict(encoder)
    made = []
    init = ViTEncoder.__init__

    def counting_init(self, *args, **kwargs):
        made.append(kwargs.get("pos_embed_trainable"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(ViTEncoder, "__init__", counting_init)
    model = ViTClassifier.from_encoder_file(path, 3, image_size=48, drop_path_rate=0.1)
    assert len(made) == 2 and made[-1] is True  # the file's encoder, then the one rebuild
    assert (
        model.encoder.pos_embed.trainable and model.encoder.grid_size == (6, 6) and model.encoder.drop_path_rate == 0.1
    )
    made.clear()
    probe = ViTClassifier.from_encoder_file(path, 3, linear_probe=True)
    assert len(made) == 1 and not probe.encoder.pos_embed_trainable
    made.clear()
    model = ViTClassifier.from_official_state_dict(state, 3, num_heads=2, image_size=48)
    assert len(made) == 2 and model.encoder.pos_embed.trainable and model.encoder.grid_size == (6, 6)
    made.clear()
    model = ViTClassifier.from_official_state_dict(state, 3, num_heads=2)
    assert len(made) == 1 and model.encoder.pos_embed.trainable


def test_bad_input():
    for bad in (1, 0, 2.0, "10", True, None):
        with pytest.raises(ValueError, match="num_classes"):
            ViTClassifier(tiny_encoder(), num_classes=bad)
    with pytest.raises(ValueError, match="pool"):
        ViTClassifier(tiny_encoder(), num_classes=3, pool="max")
    with pytest.raises(ValueError, match="head_dropout"):
        ViTClassifier(tiny_encoder(), num_classes=3, head_dropout=1.0)
    with pytest.raises(ValueError, match="must be a ViTEncoder"):
        ViTClassifier(keras.Sequential([keras.layers.Dense(2)]), num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        ViTClassifier.from_encoder_file("unused.keras", 1)
    model = ViTClassifier(tiny_encoder(), num_classes=3)
    with pytest.raises(ValueError, match="32x32 images"):
        model(np.zeros((1, 64, 64, 3), "float32"))


def test_finetuning_trains_a_copy_of_the_position_table(tmp_path, images):
    """Finetuning learns the position table (official: timm's learnable
    pos_embed starts from the checkpoint's); pretraining and the probe keep it
    fixed. The classifier holds a trainable copy, so the encoder given to it is
    left as it was, and the setting survives saving."""
    encoder = tiny_encoder()
    assert not any(v is encoder.pos_embed for v in encoder.trainable_variables)
    model = ViTClassifier(encoder, num_classes=3, pool="avg")
    assert model.encoder.pos_embed_trainable and any(v is model.encoder.pos_embed for v in model.trainable_variables)
    assert not encoder.pos_embed_trainable
    for a, b in zip(encoder.weights, model.encoder.weights):
        np.testing.assert_array_equal(to_np(a), to_np(b), err_msg=a.path)
    probe = ViTClassifier(encoder, num_classes=3, linear_probe=True)
    assert probe.encoder is encoder and probe.trainable_variables[0] is not encoder.pos_embed
    path = os.path.join(tmp_path, "ft.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.encoder.pos_embed_trainable
    assert [v.path for v in loaded.trainable_variables] == [v.path for v in model.trainable_variables]
