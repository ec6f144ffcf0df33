import os

import keras
import numpy as np
import pytest

from keras_lcmae import MAE, TransformerDecoder, ViTEncoder
from tests.helpers import assert_all_gradients, assert_config_mirrors_init, to_np


def tiny_mae(**kwargs):
    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=3, hidden_dim=32, depth=2, num_heads=2)
    decoder = TransformerDecoder(hidden_dim=32, depth=1, num_heads=2)
    return MAE(encoder, decoder, seed=1, **kwargs)


def test_call_returns_official_outputs(rng):
    mae = tiny_mae()
    x = rng.random((3, 32, 32, 3)).astype("float32")
    out = mae(x)
    assert tuple(out["pred"].shape) == (3, 16, 8 * 8 * 3)
    assert tuple(out["mask"].shape) == (3, 16)
    assert tuple(out["ids_restore"].shape) == (3, 16)
    assert tuple(out["latent"].shape) == (3, 1 + 4, 32)
    np.testing.assert_array_equal(to_np(out["mask"]).sum(1), 12)


def test_noise_fixes_the_mask_and_dict_input(rng):
    mae = tiny_mae()
    x = rng.random((2, 32, 32, 3)).astype("float32")
    noise = rng.random((2, 16)).astype("float32")
    a = mae(x, noise=noise)
    b = mae({"images": x, "noise": noise})
    np.testing.assert_array_equal(to_np(a["mask"]), to_np(b["mask"]))
    np.testing.assert_allclose(to_np(a["pred"]), to_np(b["pred"]), atol=1e-6)
    expected = (np.argsort(np.argsort(noise, 1), 1) >= 4).astype("float32")
    np.testing.assert_array_equal(to_np(a["mask"]), expected)


def test_model_configs_mirror_init():
    mae = tiny_mae(mask_ratio=0.6, norm_pix_loss=False)
    assert_config_mirrors_init(mae.encoder)
    assert_config_mirrors_init(mae.decoder)
    clone = assert_config_mirrors_init(mae)
    assert clone.mask_ratio == 0.6 and clone.norm_pix_loss is False


def test_keras_file_round_trip(tmp_path, rng):
    mae = tiny_mae()
    x = rng.random((2, 32, 32, 3)).astype("float32")
    noise = rng.random((2, 16)).astype("float32")
    before = mae(x, noise=noise)
    path = os.path.join(tmp_path, "mae.keras")
    mae.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, MAE)
    after = loaded(x, noise=noise)
    for key in ("pred", "mask", "ids_restore", "latent"):
        np.testing.assert_array_equal(to_np(after[key]), to_np(before[key]), err_msg=key)


def test_every_weight_gets_a_gradient(rng):
    mae = tiny_mae()
    x = rng.random((2, 32, 32, 3)).astype("float32")
    noise = rng.random((2, 16)).astype("float32")

    def loss_fn():
        out = mae(x, noise=noise, training=True)
        return mae.compute_loss(x=x, y_pred=out)

    assert_all_gradients(mae, loss_fn)


def test_fit_lowers_loss_on_real_images(fmnist):
    images, _ = fmnist
    mae = tiny_mae()
    noise = np.random.default_rng(1).random((64, 16)).astype("float32")

    def eval_loss():
        out = mae(images[:64], noise=noise)
        return float(to_np(mae.forward_loss(images[:64], out["pred"], out["mask"])))

    before = eval_loss()
    mae.compile(optimizer=keras.optimizers.AdamW(2e-3, beta_1=0.9, beta_2=0.95))
    history = mae.fit(images, batch_size=20, epochs=4, verbose=0)
    after = eval_loss()
    assert set(history.history) >= {"loss", "loss_mae"}
    assert len(history.history["loss_mae"]) == 4
    assert after < 0.8 * before, (before, after)
    assert history.history["loss_mae"][-1] < history.history["loss_mae"][0]


def test_labelled_dataset_and_evaluate(fmnist):
    """Labels in the data are ignored: fit on (images, labels) trains the same
    weights as fit on images alone, and evaluate reports the same loss."""
    images, labels = fmnist

    def trained(*data):
        keras.utils.set_random_seed(0)
        mae = tiny_mae()
        mae.compile(optimizer="adam")
        mae.fit(*data, batch_size=8, verbose=0)
        keras.utils.set_random_seed(1)
        return mae, mae.evaluate(images[:16], batch_size=8, verbose=0, return_dict=True)

    labelled, result = trained(images[:16], labels[:16])
    plain, plain_result = trained(images[:16])
    for a, b in zip(labelled.trainable_variables, plain.trainable_variables):
        np.testing.assert_array_equal(to_np(a), to_np(b), err_msg=a.path)
    assert set(result) == {"loss", "loss_mae"}
    assert result["loss"] == pytest.approx(result["loss_mae"])  # MAE's loss is its reconstruction term alone
    assert result == pytest.approx(plain_result)
    assert 0.1 < result["loss_mae"] < 10.0  # a norm-pix MSE of a barely trained model: about 1


def test_bad_images_are_named(rng):
    mae = tiny_mae()
    with pytest.raises(ValueError, match="3-channel images but got 1 channels"):
        mae(rng.random((1, 32, 32, 1)).astype("float32"))
    with pytest.raises(ValueError, match="built for 32x32 images but got 24x24"):
        mae(rng.random((1, 24, 24, 3)).astype("float32"))


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="not divisible by patch size 16"):
        ViTEncoder(image_size=40, patch_size=16)
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_mae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="leaves no visible patch"):
        tiny_mae(mask_ratio=0.97)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ViTEncoder(image_size=32, patch_size=8, hidden_dim=30, num_heads=4)
    encoder = ViTEncoder(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="grid_size"):
        MAE(encoder, TransformerDecoder(32, 1, 2, grid_size=8))
    with pytest.raises(ValueError, match="Unknown encoder preset"):
        ViTEncoder.from_preset("vit_gigantic")


def test_fresh_model_position_tables_are_official():
    from tests.test_ops import official_sincos

    mae = MAE(
        ViTEncoder(image_size=32, patch_size=4, hidden_dim=48, depth=1, num_heads=2),
        TransformerDecoder(hidden_dim=64, depth=1, num_heads=2),
    )
    np.testing.assert_allclose(to_np(mae.encoder.pos_embed)[0], official_sincos(48, 8, cls_token=True), atol=1e-6)
    np.testing.assert_allclose(
        to_np(mae.decoder.decoder_pos_embed)[0], official_sincos(64, 8, cls_token=True), atol=1e-6
    )
    assert not mae.encoder.pos_embed.trainable and not mae.decoder.decoder_pos_embed.trainable
    # tokens are N(0, 0.02)
    assert 0.005 < float(np.std(to_np(mae.encoder.cls_token))) < 0.05


def test_attention_maps_on_request_do_not_change_outputs(rng):
    mae = tiny_mae()
    x = rng.random((2, 32, 32, 3)).astype("float32")
    tokens = mae.encoder.embed(x)
    plain = to_np(mae.encoder.forward_tokens(tokens))
    out, maps = mae.encoder.forward_tokens(tokens, return_attention=True)
    np.testing.assert_allclose(to_np(out), plain, atol=1e-5)
    assert len(maps) == 2 and tuple(maps[0].shape) == (2, 2, 17, 17)
    ids = np.tile(np.arange(16), (2, 1))
    dec = mae.decoder(mae.encoder.forward_tokens(tokens), ids, return_attention=True)
    assert len(dec["attention"]) == 1 and tuple(dec["attention"][0].shape) == (2, 2, 17, 17)


@pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="counts the executed matmuls with PyTorch's FlopCounterMode"
)
@pytest.mark.parametrize("method", ["mae", "lcmae", "ae"])
def test_benchmark_flops_match_the_executed_matmuls(method):
    """tools/benchmark.py's model FLOPs (its MFU figure) equal the matmul
    FLOPs our models execute in a forward pass, counted by PyTorch (the
    16-bit policy takes the explicit attention path, whose products the
    counter sees; PyTorch's fused CPU kernel is not in its registry)."""
    import sys

    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import benchmark

    c = benchmark.CONFIGS["test"]
    saved = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = benchmark.build_model(method, c)
        x = np.random.default_rng(0).random((3, c["image"], c["image"], 3)).astype("float32")
        model(x)  # built, so the count below is one forward only
        with FlopCounterMode(display=False) as counter:
            model(x, training=True)
    finally:
        keras.config.set_dtype_policy(saved)
    assert counter.get_total_flops() == 3 * benchmark.forward_flops_per_image(c, method)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch keeps .grad tensors between steps")
def test_previous_gradients_are_freed_before_the_forward():
    """Keras' PyTorch train_step clears gradients only after the forward, so
    the last step's would sit next to this step's activations; ours frees
    them first (MAE, LC-MAE, AutoEncoder and ViTClassifier)."""
    from keras_lcmae import LCMAE, AutoEncoder
    from keras_lcmae.classifier import ViTClassifier

    def encoder():
        return ViTEncoder(image_size=32, patch_size=8, num_channels=3, hidden_dim=32, depth=1, num_heads=2)

    def decoder():
        return TransformerDecoder(hidden_dim=32, depth=1, num_heads=2)

    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
    labels = np.array([0, 1, 0, 1])
    for model, data in (
        (MAE(encoder(), decoder(), seed=0), (x,)),
        (LCMAE(encoder(), decoder(), seed=0), (x,)),
        (AutoEncoder(encoder(), decoder()), (x,)),
        (ViTClassifier(encoder(), num_classes=2), (x, labels)),
    ):
        loss = None if len(data) == 1 else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=loss)
        seen = []
        call = model.call

        def spy(*args, model=model, call=call, seen=seen, **kwargs):
            seen.append(sum(v.value.grad is not None for v in model.trainable_variables))
            return call(*args, **kwargs)

        model.call = spy
        model.train_on_batch(*data)
        assert any(v.value.grad is not None for v in model.trainable_variables)  # Keras leaves them after a step
        seen.clear()
        model.train_on_batch(*data)
        assert seen and not any(seen), (type(model).__name__, seen)


@pytest.mark.parametrize("kind", ["mae", "lcmae", "ae_gaussian", "mae_conv", "classifier"])
def test_a_training_step_runs_the_model_once_and_leaves_nothing_unbuilt(kind):
    """Blocks run their sublayers by ``call``, past Keras' ``__call__``, which
    is what marks a layer built; one unbuilt layer (drop path once was) makes
    Keras' train_on_batch and fit re-run the whole model symbolically at
    every step (on PyTorch a second full forward). After a step every layer
    is built, and on PyTorch (eager steps) the model's ``call`` ran once."""
    from keras_lcmae import LCMAE, AutoEncoder, ConvDecoder, GaussianAverageDecoder
    from keras_lcmae.classifier import ViTClassifier

    encoder = ViTEncoder(
        image_size=32, patch_size=8, num_channels=3, hidden_dim=32, depth=2, num_heads=2, drop_path_rate=0.1
    )
    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
    data, loss = (x,), None
    if kind == "mae":
        model = MAE(encoder, TransformerDecoder(hidden_dim=32, depth=1, num_heads=2), seed=0)
    elif kind == "lcmae":
        model = LCMAE(encoder, TransformerDecoder(hidden_dim=32, depth=1, num_heads=2), projector_dim=16, seed=0)
    elif kind == "ae_gaussian":
        model = AutoEncoder(encoder, GaussianAverageDecoder(hidden_dim=32))
    elif kind == "mae_conv":
        model = MAE(encoder, ConvDecoder(hidden_dim=32), seed=0)
    else:
        model = ViTClassifier(encoder, num_classes=2)
        data, loss = (x, np.array([0, 1, 0, 1])), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=loss)
    model.train_on_batch(*data)
    unbuilt = [layer.path for layer in model._flatten_layers(include_self=True) if not layer.built]
    assert unbuilt == []
    if keras.backend.backend() == "torch":
        calls = []
        call = model.call

        def spy(*args, **kwargs):
            calls.append(1)
            return call(*args, **kwargs)

        model.call = spy
        model.train_on_batch(*data)
        assert len(calls) == 1
