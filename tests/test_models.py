import os

import keras
import numpy as np
import pytest

from keras_lcmae import MAE, TransformerDecoder, ViTEncoder
from keras_lcmae.layers import Attention, Block, DropPath, PatchEmbed
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


@pytest.mark.parametrize(
    "layer,inputs",
    [
        (PatchEmbed(8, 32), np.zeros((2, 32, 32, 3), "float32")),
        (Attention(32, 4), np.zeros((2, 5, 32), "float32")),
        (Block(32, 4, drop_path=0.1), np.zeros((2, 5, 32), "float32")),
        (DropPath(0.2, seed=1), np.zeros((2, 5, 32), "float32")),
    ],
    ids=["PatchEmbed", "Attention", "Block", "DropPath"],
)
def test_layer_config_round_trip(layer, inputs):
    out = layer(inputs)
    clone = assert_config_mirrors_init(layer)
    assert tuple(clone(inputs).shape) == tuple(out.shape)


def test_model_configs_mirror_init():
    mae = tiny_mae(mask_ratio=0.6, norm_pix_loss=False)
    assert_config_mirrors_init(mae.encoder)
    assert_config_mirrors_init(mae.decoder)
    clone = assert_config_mirrors_init(mae)
    assert clone.mask_ratio == 0.6 and clone.norm_pix_loss is False


def test_attention_weights_on_request_match_fused_path(rng):
    attn = Attention(32, 4)
    x = rng.normal(size=(2, 7, 32)).astype("float32")
    fused = to_np(attn(x))
    explicit, weights = attn(x, return_attention=True)
    np.testing.assert_allclose(to_np(explicit), fused, atol=1e-5)
    np.testing.assert_allclose(to_np(weights).sum(-1), 1.0, atol=1e-5)


def test_16bit_attention_path_matches_numpy(rng):
    """In bfloat16 the default path is the fused kernel, except on PyTorch's
    CPU where the explicit 16-bit path runs (its fused backward is slow
    there); either way the output is numpy's attention to bf16 accuracy."""
    from keras_lcmae.layers import fused_attention_is_fast

    attn = Attention(32, 4, dtype="mixed_bfloat16")
    x = rng.normal(size=(2, 7, 32)).astype("float32")
    y = to_np(attn(x)).astype("float64")
    q_probe = keras.ops.cast(keras.ops.convert_to_tensor(x[:, :, :8].reshape(2, 7, 1, 8)), "bfloat16")
    assert fused_attention_is_fast(q_probe) == (keras.backend.backend() != "torch")
    assert fused_attention_is_fast(keras.ops.convert_to_tensor(x.reshape(2, 7, 4, 8)))  # float32: always fused
    w = {v.path.split("/")[-2] + "/" + v.path.split("/")[-1]: to_np(v).astype("float64") for v in attn.weights}
    qkv = (x @ w["qkv/kernel"] + w["qkv/bias"]).reshape(2, 7, 3, 4, 8).transpose(2, 0, 3, 1, 4)
    logits = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) / np.sqrt(8)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p @ qkv[2]).transpose(0, 2, 1, 3).reshape(2, 7, 32) @ w["proj/kernel"] + w["proj/bias"]
    np.testing.assert_allclose(y, out, atol=0.06 * np.abs(out).max())
    assert np.abs(y - out).max() > 0  # computed in bf16, not silently in float32


def _jax_encoder_grad(depth, fusion_break, x):
    """The compiled gradient of a tiny ViT encoder's token stack on JAX, and
    the op count of its largest fusion."""
    import re

    import jax

    from keras_lcmae import layers as layers_module

    keras.utils.set_random_seed(0)  # the same weights for the same depth
    encoder = ViTEncoder(image_size=16, patch_size=4, hidden_dim=32, depth=depth, num_heads=2)
    encoder.build((None, 16, 16, 3))
    variables = encoder.trainable_variables

    def loss(values, tokens):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return jax.numpy.mean(jax.numpy.square(encoder.forward_tokens(tokens, training=True)))

    saved = layers_module.needs_gradient_fusion_break
    layers_module.needs_gradient_fusion_break = lambda: fusion_break
    try:
        grad = jax.jit(jax.grad(loss))
        values = [v.value for v in variables]
        hlo = grad.lower(values, x).compile().as_text()
        grads = [np.asarray(g) for g in grad(values, x)]
    finally:
        layers_module.needs_gradient_fusion_break = saved
    fusions = re.split(r"\n(?=\S.*\{\n)", hlo)
    largest = max(len(re.findall(r"= \S+ [\w-]+\(", c)) for c in fusions if c.startswith("%fused"))
    return grads, largest


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA:CPU fusion workaround of the JAX backend")
def test_jax_cpu_gradient_fusion_break(rng):
    """On JAX/CPU each block's input passes a gradient fusion break: without it
    XLA:CPU duplicates the residual-gradient chain of all blocks into every
    consumer (the largest fusion grows with depth: quadratic backward work);
    with it the largest fusion stays the same size at depth 2 and 6, and the
    gradients are those of the plain graph."""
    from keras_lcmae.layers import gradient_fusion_break, needs_gradient_fusion_break

    assert needs_gradient_fusion_break()  # the suite runs JAX on the CPU
    x = rng.normal(size=(2, 5, 32)).astype("float32")
    _, largest2 = _jax_encoder_grad(2, True, x)
    g6, largest6 = _jax_encoder_grad(6, True, x)
    _, plain2 = _jax_encoder_grad(2, False, x)
    plain6_grads, plain6 = _jax_encoder_grad(6, False, x)
    assert largest6 == largest2
    assert plain6 > plain2 + 40  # the pathology the break removes
    scale = max(np.abs(b).max() for b in plain6_grads)  # float32 sums in another order
    for a, b in zip(g6, plain6_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)

    import jax

    # the cotangent passes unchanged, NaN and inf included (never zeroed)
    cot = np.array([np.nan, np.inf, -np.inf, 2.0], "float32")
    _, vjp = jax.vjp(gradient_fusion_break, np.ones(4, "float32"))
    np.testing.assert_array_equal(np.asarray(vjp(cot)[0]), cot)
    np.testing.assert_array_equal(np.asarray(jax.jit(vjp)(cot[::-1])[0]), cot[::-1])


def test_gradient_fusion_break_is_identity_elsewhere():
    from keras_lcmae.layers import gradient_fusion_break, needs_gradient_fusion_break

    if keras.backend.backend() != "jax":
        assert not needs_gradient_fusion_break()
    x = keras.ops.convert_to_tensor(np.arange(6, dtype="float32").reshape(2, 3))
    np.testing.assert_array_equal(to_np(gradient_fusion_break(x)), to_np(x))


def _gelu_reference(x):
    """float64 GELU x * Phi(x) and its derivative Phi(x) + x * phi(x)."""
    from math import erf, pi, sqrt

    x = np.asarray(x, "float64")
    cdf = 0.5 * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))
    return x * cdf, cdf + x * np.exp(-0.5 * x * x) / sqrt(2.0 * pi)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_exact_gelu_value_and_gradient(dtype):
    from keras_lcmae.layers import exact_gelu
    from tests.helpers import gradients

    x0 = np.concatenate([np.linspace(-6, 6, 481), [-30.0, -8.5, 0.0, 8.5, 30.0]]).astype("float32")
    holder = keras.Model()  # only for helpers.gradients: one trainable variable
    holder.v = keras.Variable(x0, dtype=dtype)
    w = np.linspace(0.5, 1.5, x0.size).astype("float32")  # uneven cotangent, so a gradient term off by a factor shows
    weights = keras.ops.convert_to_tensor(w)
    y = exact_gelu(holder.v.value)
    assert keras.backend.standardize_dtype(y.dtype) == dtype
    (g,) = gradients(holder, lambda: keras.ops.sum(keras.ops.cast(exact_gelu(holder.v.value), "float32") * weights))
    assert str(g.dtype) == dtype
    x = np.asarray(to_np(keras.ops.cast(holder.v.value, "float32")), "float64")  # the input as stored
    ref_y, ref_dy = _gelu_reference(x)
    ref_g = ref_dy * w.astype("float64")
    y = np.asarray(to_np(keras.ops.cast(y, "float32")), "float64")
    g = np.asarray(g.astype("float32"), "float64")
    # atol: a backend may take 1 + erf(x / sqrt 2), which cancels to ~|x| * 2^-24 for negative x
    if dtype == "float32":
        np.testing.assert_allclose(y, ref_y, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(g, ref_g, rtol=2e-6, atol=1e-6)
    elif keras.backend.backend() != "tensorflow":  # the backend's own bf16 gelu (TensorFlow's: ours)
        np.testing.assert_allclose(y, ref_y, rtol=2**-6, atol=2**-10)
        np.testing.assert_allclose(g, ref_g, rtol=2**-6, atol=2**-8)
    else:  # ours: computed in float32, so within one or two bf16 roundings (2^-8 relative) of the exact value
        np.testing.assert_allclose(y, ref_y, rtol=2**-8, atol=1e-12)
        np.testing.assert_allclose(g, ref_g, rtol=2**-7, atol=2**-9)
        import tensorflow as tf  # rounded once: the nearest bf16 to the exact value

        nearest = tf.cast(tf.constant(ref_y, tf.float32), tf.bfloat16).numpy().astype("float64")
        assert np.mean(y == nearest) > 0.99


def test_drop_path_drops_whole_samples():
    layer = DropPath(0.5, seed=0)
    x = np.ones((64, 3, 4), "float32")
    y = to_np(layer(x, training=True))
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    np.testing.assert_array_equal(to_np(layer(x, training=False)), x)


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
    images, labels = fmnist
    mae = tiny_mae()
    mae.compile(optimizer="adam")
    mae.fit(images[:16], labels[:16], batch_size=8, verbose=0)
    result = mae.evaluate(images[:16], batch_size=8, verbose=0, return_dict=True)
    assert result["loss_mae"] > 0


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


def test_fresh_model_position_tables_are_official():
    from tests.test_ops import official_sincos

    mae = MAE(
        ViTEncoder(image_size=32, patch_size=4, hidden_dim=48, depth=1, num_heads=2),
        TransformerDecoder(hidden_dim=64, depth=1, num_heads=2),
    )
    np.testing.assert_allclose(to_np(mae.encoder.pos_embed)[0], official_sincos(48, 8, cls_token=True), atol=1e-6)
    np.testing.assert_allclose(to_np(mae.decoder.decoder_pos_embed)[0], official_sincos(64, 8, cls_token=True), atol=1e-6)
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


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="counts the executed matmuls with PyTorch's FlopCounterMode")
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
    for model, data in ((MAE(encoder(), decoder(), seed=0), (x,)), (LCMAE(encoder(), decoder(), seed=0), (x,)),
                        (AutoEncoder(encoder(), decoder()), (x,)), (ViTClassifier(encoder(), num_classes=2), (x, labels))):
        loss = None if len(data) == 1 else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=loss)
        seen = []
        call = model.call

        def spy(*args, model=model, call=call, **kwargs):
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

    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=3, hidden_dim=32, depth=2, num_heads=2,
                         drop_path_rate=0.1)
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
