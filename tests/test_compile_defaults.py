"""compile() with no optimizer gives the recipes' optimizers (and, for the
classifier, loss and top-1 metric); anything explicit is used as given. On
every backend."""

import os

import keras
import numpy as np
import pytest

from keras_lcmae import LCMAE, MAE, AutoEncoder, TransformerDecoder, ViTClassifier, ViTEncoder
from keras_lcmae.optim import LARS, AdamW, LayerDecayAdamW
from tests.helpers import to_np as to_numpy


def small_decoder():
    return TransformerDecoder(hidden_dim=32, depth=1, num_heads=2)


def assert_decoupled_decay_except_1d(model, lr, wd):
    """A zero gradient leaves Adam's moments at zero, so AdamW's whole update
    is its decoupled decay: w <- w (1 - lr wd) on every parameter of rank
    >= 2, nothing on biases and norms. RMSprop (Keras' default) or Adam
    would move nothing at all."""
    variables = model.trainable_variables
    before = [to_numpy(v).copy() for v in variables]
    model.optimizer.apply([np.zeros(v.shape, "float32") for v in variables], variables)
    decayed = 0
    for v, b in zip(variables, before):
        after = to_numpy(v)
        if len(v.shape) <= 1:
            np.testing.assert_array_equal(after, b, err_msg=f"{v.path} (1-D) was decayed")
        else:
            np.testing.assert_allclose(after, b * (1 - lr * wd), rtol=1e-5, atol=1e-9, err_msg=v.path)
            decayed += 1
    assert decayed >= 10


def test_mae_compile_with_nothing_trains_with_the_recipe_adamw(rng):
    mae = MAE(ViTEncoder.from_preset("vit_test"))  # the default decoder
    mae.compile()
    opt = mae.optimizer
    assert isinstance(opt, AdamW) and opt.exclude_1d
    assert (opt.beta_1, opt.beta_2, opt.weight_decay) == (0.9, 0.95, 0.05)
    assert float(to_numpy(opt.learning_rate)) == pytest.approx(MAE.DEFAULT_LEARNING_RATE)
    assert_decoupled_decay_except_1d(mae, MAE.DEFAULT_LEARNING_RATE, 0.05)  # one update, fresh moments
    start = [to_numpy(w).copy() for w in mae.encoder.trainable_weights]
    history = mae.fit(rng.random((4, 32, 32, 3), dtype="float32"), batch_size=2, epochs=1, verbose=0)
    assert int(to_numpy(opt.iterations)) == 3 and np.isfinite(history.history["loss"]).all()
    assert any(np.abs(to_numpy(w) - s).max() > 0 for w, s in zip(mae.encoder.trainable_weights, start))


@pytest.mark.parametrize("kind", ["lcmae", "autoencoder"])
def test_lcmae_and_autoencoder_get_the_same_default(kind, rng):
    if kind == "lcmae":
        model = LCMAE(ViTEncoder.from_preset("vit_test"), small_decoder(), projector_dim=16)
    else:
        model = AutoEncoder(ViTEncoder.from_preset("vit_test"), small_decoder(), block_size=16)
    model.compile(optimizer="auto")
    assert isinstance(model.optimizer, AdamW) and model.optimizer.beta_2 == 0.95
    assert_decoupled_decay_except_1d(model, MAE.DEFAULT_LEARNING_RATE, 0.05)
    history = model.fit(rng.random((2, 32, 32, 3), dtype="float32"), batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_an_explicit_optimizer_is_used_as_given():
    mae = MAE(ViTEncoder.from_preset("vit_test"), small_decoder())
    sgd = keras.optimizers.SGD(0.1)
    mae.compile(optimizer=sgd)
    assert mae.optimizer is sgd
    mae.compile(optimizer="adam")
    assert isinstance(mae.optimizer, keras.optimizers.Adam) and not isinstance(mae.optimizer, keras.optimizers.AdamW)
    model = ViTClassifier(ViTEncoder.from_preset("vit_test"), num_classes=3)
    model.compile(optimizer=sgd, loss="mse", metrics=None)
    assert model.optimizer is sgd and model.loss == "mse"


def test_classifier_compile_with_nothing_reports_top1(rng):
    model = ViTClassifier(ViTEncoder.from_preset("vit_test"), num_classes=4, pool="avg")
    model.compile()
    opt = model.optimizer
    assert isinstance(opt, LayerDecayAdamW)
    assert (opt.beta_1, opt.beta_2, opt.weight_decay) == (0.9, 0.999, 0.05)
    assert "vit_encoder/pos_embed" in opt.no_weight_decay and "vit_encoder/cls_token" in opt.no_weight_decay
    x = rng.random((8, 32, 32, 3), dtype="float32")
    y = np.arange(8) % 4
    history = model.fit(x, y, batch_size=4, verbose=0)
    assert sorted(history.history) == ["loss", "top1"]
    assert 0 <= history.history["top1"][0] <= 1
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    predicted = np.argmax(to_numpy(model.predict(x, verbose=0)), axis=-1)
    assert result["top1"] == pytest.approx(np.mean(predicted == y))
    # an explicit metrics list replaces top-1; the loss stays the default
    model.compile(metrics=[])
    assert sorted(model.fit(x, y, batch_size=4, verbose=0).history) == ["loss"]


def test_a_linear_probe_gets_lars(rng):
    probe = ViTClassifier(ViTEncoder.from_preset("vit_test"), num_classes=4, linear_probe=True)
    probe.compile()
    assert isinstance(probe.optimizer, LARS) and probe.optimizer.weight_decay == 0.0
    history = probe.fit(rng.random((8, 32, 32, 3), dtype="float32"), np.arange(8) % 4, batch_size=4, verbose=0)
    assert "top1" in history.history


def test_the_default_optimizer_survives_saving(tmp_path, rng):
    mae = MAE(ViTEncoder.from_preset("vit_test"), small_decoder())
    mae.compile()
    mae.fit(rng.random((2, 32, 32, 3), dtype="float32"), batch_size=2, verbose=0)
    path = os.path.join(tmp_path, "mae.keras")
    mae.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, AdamW) and loaded.optimizer.exclude_1d and loaded.optimizer.beta_2 == 0.95
    assert int(to_numpy(loaded.optimizer.iterations)) == 1  # its state came back with it
    model = ViTClassifier(ViTEncoder.from_preset("vit_test"), num_classes=4)
    model.compile()
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, LayerDecayAdamW) and loaded.optimizer.beta_2 == 0.999
    x, y = rng.random((4, 32, 32, 3), dtype="float32"), np.arange(4)
    assert sorted(loaded.evaluate(x, y, verbose=0, return_dict=True)) == ["loss", "top1"]
