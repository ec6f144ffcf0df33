"""The per-backend speed paths of ``keras_lcmae.backend``: the switch and its
environment override, and each speed path against the plain Keras path it
replaces (the switch off), on the backends where it applies."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lcmae import backend
from keras_lcmae.backend import blocks, torch_optim
from keras_lcmae.optim import LARS, AdamW, LayerDecayAdamW, ReleasesGradients, WarmupCosine
from tests.helpers import gradients, to_np

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
only_torch = pytest.mark.skipif(BACKEND != "torch", reason="a PyTorch speed path")


@pytest.fixture(autouse=True)
def _switch_from_environment():
    previous = backend.set_fast_paths(None)
    yield
    backend.set_fast_paths(previous)


# ---------------------------------------------------------------------------
# the switch
# ---------------------------------------------------------------------------


def _switch_in_subprocess(value):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(backend.ENV_VAR, None)
    if value is not None:
        env[backend.ENV_VAR] = value
    code = "from keras_lcmae import backend; print(backend.use_fast_paths())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("value", "expected"), [(None, "True"), ("0", "False"), ("off", "False"), ("FALSE", "False"), ("1", "True")]
)
def test_environment_variable_sets_the_switch(value, expected):
    assert _switch_in_subprocess(value) == expected


def test_set_fast_paths_and_context_manager(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "0")
    assert backend.use_fast_paths() is False
    with backend.fast_paths(True):
        assert backend.use_fast_paths() is True
        with backend.fast_paths(False):
            assert backend.use_fast_paths() is False
        assert backend.use_fast_paths() is True
    assert backend.use_fast_paths() is False  # back to the environment
    monkeypatch.delenv(backend.ENV_VAR)
    assert backend.use_fast_paths() is True
    assert backend.set_fast_paths(False) is None
    assert backend.set_fast_paths(None) is False
    with pytest.raises(ValueError, match="`enabled`"):
        backend.set_fast_paths("no")


def test_tf_is_tensorflow():
    tf = backend.tf()
    assert tf.__name__ == "tensorflow" and hasattr(tf, "distribute")


# ---------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the wide GELU is TensorFlow's 16-bit speed path")
def test_tf_bf16_gelu_equals_keras_gelu():
    x0 = np.concatenate([np.linspace(-6, 6, 481), [-30.0, 0.0, 30.0]]).astype("float32")
    w = np.linspace(0.5, 1.5, x0.size).astype("float32")
    results = {}
    for fast in (True, False):
        holder = keras.Model()
        holder.v = keras.Variable(x0, dtype="bfloat16")
        with backend.fast_paths(fast):
            y = to_np(keras.ops.cast(blocks.exact_gelu(holder.v.value), "float32"))
            (g,) = gradients(
                holder,
                lambda h=holder: keras.ops.sum(keras.ops.cast(blocks.exact_gelu(h.v.value), "float32") * w),
            )
        results[fast] = y, np.asarray(g.astype("float32"))
    (y_fast, g_fast), (y_plain, g_plain) = results[True], results[False]
    assert not np.array_equal(y_fast, y_plain)  # the two paths do differ (rounding)
    scale = np.abs(y_plain).max()
    np.testing.assert_allclose(y_fast, y_plain, rtol=2**-6, atol=2**-7 * scale / 30)
    np.testing.assert_allclose(g_fast, g_plain, rtol=2**-6, atol=2**-7)


@only_torch
def test_torch_cpu_bf16_explicit_attention_equals_fused():
    from keras_lcmae.layers import Attention

    attn = Attention(32, 4, dtype="mixed_bfloat16")
    x = np.random.default_rng(0).normal(size=(2, 7, 32)).astype("float32")
    attn(x)
    q = keras.ops.cast(keras.ops.convert_to_tensor(x[:, :, :8].reshape(2, 7, 1, 8)), "bfloat16")
    out = {}
    for fast in (True, False):
        with backend.fast_paths(fast):
            assert blocks.fused_attention_is_fast(q) is not fast
            y = attn(x)
            grads = gradients(
                _Holder(attn), lambda: keras.ops.sum(keras.ops.square(keras.ops.cast(attn(x), "float32")))
            )
        out[fast] = to_np(keras.ops.cast(y, "float32")), [np.asarray(g, "float32") for g in grads]
    scale = np.abs(out[False][0]).max()
    assert not np.array_equal(out[True][0], out[False][0])  # another kernel ran
    np.testing.assert_allclose(out[True][0], out[False][0], atol=2**-6 * scale)
    assert len(out[True][1]) == 4  # qkv and proj kernels and biases
    for g_fast, g_plain in zip(out[True][1], out[False][1]):
        np.testing.assert_allclose(g_fast, g_plain, atol=2**-5 * np.abs(g_plain).max())


class _Holder(keras.Model):
    """A model whose trainable variables are one layer's (for helpers.gradients)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer


@pytest.mark.skipif(BACKEND != "jax", reason="the gradient fusion break is JAX/CPU's speed path")
def test_jax_fusion_break_equals_plain_graph():
    import jax

    from keras_lcmae.layers import Block, run_blocks

    block_list = [Block(32, 2, name=f"b{i}") for i in range(3)]
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype("float32")
    for b in block_list:
        b.build((None, None, 32))

    def loss(t):
        return jax.numpy.sum(jax.numpy.square(run_blocks(block_list, t)[0]))

    grads, hlo = {}, {}
    for fast in (True, False):
        with backend.fast_paths(fast):
            assert blocks.needs_gradient_fusion_break() is fast
            grad = jax.jit(jax.grad(loss))
            hlo[fast] = grad.lower(x).compile().as_text()
            grads[fast] = np.asarray(grad(x))
    assert "conditional" in hlo[True] and "conditional" not in hlo[False]
    np.testing.assert_allclose(grads[True], grads[False], rtol=1e-5, atol=1e-5 * np.abs(grads[False]).max())


def test_blocks_take_the_plain_path_when_off():
    x = keras.ops.convert_to_tensor(np.linspace(-3, 3, 12, dtype="float32").reshape(3, 4))
    with backend.fast_paths(False):
        assert blocks.fused_attention_is_fast(x) and not blocks.needs_gradient_fusion_break()
        np.testing.assert_array_equal(to_np(blocks.exact_gelu(x)), to_np(keras.activations.gelu(x, approximate=False)))
        np.testing.assert_array_equal(to_np(blocks.gradient_fusion_break(x)), to_np(x))


# ---------------------------------------------------------------------------
# optimizers (PyTorch kernels)
# ---------------------------------------------------------------------------


def _variables(rng):
    shapes = [(6, 5), (5,), (3, 4, 2), (2,)]
    return [keras.Variable(rng.normal(size=s).astype("float32"), name=f"w{i}") for i, s in enumerate(shapes)]


def _run(make_optimizer, fast, steps=4, accum_steps=1, monkeypatch=None, fused=True):
    """Weights and slots after ``steps`` updates (of ``accum_steps`` micro-batches)."""
    rng = np.random.default_rng(0)
    variables = _variables(rng)
    grads = [[rng.normal(size=v.shape).astype("float32") for v in variables] for _ in range(steps * accum_steps)]
    opt = make_optimizer(variables, accum_steps)
    with backend.fast_paths(fast):
        if monkeypatch is not None and not fused:
            monkeypatch.setattr(torch_optim, "fused_adamw_usable", lambda variables: False)
        for g in grads:
            opt.apply([keras.ops.convert_to_tensor(a) for a in g], variables)
    return [to_np(v) for v in variables], [to_np(v) for v in opt.variables]


def _adamw(variables, accum_steps):
    opt = AdamW(
        WarmupCosine(0.05, 2, 10), weight_decay=0.1, beta_2=0.95, epsilon=0.05, exclude_1d=True, accum_steps=accum_steps
    )
    opt.build(variables)
    return opt


def _layer_decay(variables, accum_steps):
    multipliers = {v.path: 0.5**i for i, v in enumerate(variables)}
    return LayerDecayAdamW(
        WarmupCosine(0.05, 2, 10),
        weight_decay=0.1,
        epsilon=0.05,
        lr_multipliers=multipliers,
        no_weight_decay=[variables[2].path],
        accum_steps=accum_steps,
    )


def _lars(variables, accum_steps):
    return LARS(0.1, weight_decay=0.01, accum_steps=accum_steps)


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    (wa, sa), (wb, sb) = a, b
    assert len(sa) == len(sb)
    for x, y in zip(wa + sa, wb + sb):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@only_torch
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_torch_adamw_equals_keras_update(fused, monkeypatch):
    calls = []
    original = torch_optim.fused_adamw_groups if fused else torch_optim.foreach_keras_adam
    name = "fused_adamw_groups" if fused else "foreach_keras_adam"
    monkeypatch.setattr(torch_optim, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    fast = _run(_adamw, True, monkeypatch=monkeypatch, fused=fused)
    assert len(calls) == 4  # the kernel made every update
    plain = _run(_adamw, False)
    assert len(calls) == 4  # and none with the switch off
    _assert_same(fast, plain)
    start = [to_np(v) for v in _variables(np.random.default_rng(0))]
    assert all(np.abs(a - b).max() > 1e-3 for a, b in zip(fast[0], start))


@only_torch
def test_torch_layer_decay_adamw_equals_keras_update(monkeypatch):
    calls = []
    original = torch_optim.fused_adamw_groups
    monkeypatch.setattr(torch_optim, "fused_adamw_groups", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast = _run(_layer_decay, True)
    assert len(calls) == 4
    _assert_same(fast, _run(_layer_decay, False))
    assert len(calls) == 4


@only_torch
@pytest.mark.parametrize("make", [_adamw, _layer_decay, _lars], ids=["adamw", "layer_decay_adamw", "lars"])
def test_torch_eager_accumulation_equals_masked_update(make, monkeypatch):
    calls = []
    original = torch_optim.accumulate
    monkeypatch.setattr(torch_optim, "accumulate", lambda *a, **k: calls.append(1) or original(*a, **k))
    fast = _run(make, True, steps=3, accum_steps=3)
    assert len(calls) == 6  # two of every three micro-batches only accumulate
    plain = _run(make, False, steps=3, accum_steps=3)
    assert len(calls) == 6
    _assert_same(fast, plain)


# ---------------------------------------------------------------------------
# models: PyTorch frees gradients before the forward pass
# ---------------------------------------------------------------------------


class _Net(ReleasesGradients, keras.Sequential):
    def call(self, *args, **kwargs):
        if keras.backend.backend() == "torch":
            self.grads_at_forward.append(any(v.value.grad is not None for v in self.trainable_variables))
        return super().call(*args, **kwargs)


@only_torch
def test_torch_releases_gradients_before_the_forward_pass():
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = x.sum(-1, keepdims=True)
    weights = {}
    for fast in (True, False):
        keras.utils.set_random_seed(0)
        net = _Net([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
        net.grads_at_forward = []
        net.compile(keras.optimizers.SGD(0.1), "mse")
        with backend.fast_paths(fast):
            for _ in range(3):
                net.train_on_batch(x, y)
        # Keras' own step clears gradients only after the forward pass
        assert net.grads_at_forward[-3:] == ([False] * 3 if fast else [False, True, True])
        weights[fast] = [to_np(w) for w in net.weights]
    for a, b in zip(weights[True], weights[False]):
        np.testing.assert_array_equal(a, b)
