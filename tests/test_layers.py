"""Tests of keras_lcmae/layers.py: the Transformer building blocks (patch
embedding, attention, block, drop path), exact GELU and JAX's gradient
fusion break."""

import keras
import numpy as np
import pytest

from keras_lcmae import ViTEncoder
from keras_lcmae.layers import Attention, Block, DropPath, PatchEmbed
from tests.helpers import assert_config_mirrors_init, check_layer, to_np


@pytest.mark.parametrize(
    "factory,input_shape",
    [
        (lambda: PatchEmbed(8, 32), (2, 32, 32, 3)),
        (lambda: Attention(32, 4, qkv_bias=False), (2, 5, 32)),
        (lambda: Block(32, 4, mlp_ratio=2.0, drop_path=0.1, layer_norm_epsilon=1e-5), (2, 5, 32)),
        (lambda: DropPath(0.2, seed=1), (4, 5, 32)),
    ],
    ids=["PatchEmbed", "Attention", "Block", "DropPath"],
)
def test_public_layers_pass_the_common_layer_checks(factory, input_shape, tmp_path):
    """Symbolic and eager calls agree on the shape, one fit step trains, a
    .keras round trip computes the same outputs, the config mirrors __init__."""
    check_layer(factory, input_shape, tmp_path)


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


def test_block_sublayers_follow_the_blocks_own_dtype_policy(policy):
    """A Block runs its sublayers by their ``call`` inside its own autocast
    scope, so they must share its policy: a float32 block under a global
    mixed_bfloat16 policy computes in float32 (the float32 result to
    round-off), a default one in bf16 (visibly not)."""
    from keras_lcmae.layers import Block

    x = np.random.default_rng(2).normal(size=(2, 5, 32)).astype("float32")
    reference = Block(32, 4)
    want = keras.ops.convert_to_numpy(reference(x))
    policy("mixed_bfloat16")
    for dtype, close in (("float32", True), (None, False)):
        block = Block(32, 4, dtype=dtype)
        block.build((None, None, 32))
        block.set_weights(reference.get_weights())
        got = block(x)
        sub = {layer.dtype_policy.name for layer in (block.norm1, block.attn, block.attn.qkv, block.fc1, block.fc2)}
        assert sub == {block.dtype_policy.name}
        assert keras.backend.standardize_dtype(got.dtype) == ("float32" if close else "bfloat16")
        err = np.abs(keras.ops.convert_to_numpy(keras.ops.cast(got, "float32")) - want).max()
        assert (err < 1e-5) if close else (err > 1e-3), (dtype, err)
