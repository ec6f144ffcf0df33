"""Speed paths of the Transformer blocks (:mod:`keras_lcmae.layers`).

Each function gives the plain Keras computation when
:func:`keras_lcmae.backend.use_fast_paths` is off, and on the backends where
no speed path applies.
"""

import functools

import keras

from keras_lcmae.backend import tf as backend_tf
from keras_lcmae.backend import use_fast_paths

_16BIT = ("bfloat16", "float16")


def fused_attention_is_fast(q):
    """Whether ``keras.ops.dot_product_attention`` is the fast path for ``q``.

    It is everywhere except PyTorch on the CPU in 16-bit: there the fused
    ``scaled_dot_product_attention`` forward and backward in bf16 ran several
    times slower than in float32 and than the explicit
    matmul-softmax-matmul, so the explicit path is taken
    (``docs/benchmarks.md``; ``tools/benchmark.py`` times whole steps with
    the path this function picks). True whenever the speed paths are off.
    """
    if not use_fast_paths():
        return True
    if keras.backend.backend() != "torch" or keras.backend.standardize_dtype(q.dtype) not in _16BIT:
        return True
    return getattr(getattr(q, "device", None), "type", None) != "cpu"


@functools.cache
def _tf_wide_gelu():
    tf = backend_tf()

    @tf.custom_gradient
    def gelu(x):
        xw = tf.cast(x, tf.float32)  # computed in float32, rounded once (as PyTorch's bf16 GELU)
        cdf = 0.5 * tf.math.erfc(xw * -0.7071067811865476)  # Phi(x)

        def grad(dy):
            pdf = tf.exp(-0.5 * tf.square(xw)) * 0.3989422804014327  # phi(x)
            return tf.cast(tf.cast(dy, tf.float32) * (cdf + xw * pdf), x.dtype)

        return tf.cast(xw * cdf, x.dtype), grad

    return gelu


def exact_gelu(x):
    """The exact (erf) GELU, ``x * Phi(x)`` (``keras.activations.gelu`` with
    ``approximate=False``).

    Speed path: on TensorFlow with 16-bit inputs, a custom gradient computed
    in float32 that reuses the forward's ``Phi(x)``. TensorFlow's own
    ``gelu`` runs its ``erfc`` in bf16, several times its float32 time, and
    differentiates the composite op by op. float32 keeps TensorFlow's
    ``gelu``, so float32 training is bit-identical to it; PyTorch has a fused
    kernel and XLA fuses the chain under JAX, so they keep Keras' ``gelu``.
    """
    if (
        use_fast_paths()
        and keras.backend.backend() == "tensorflow"
        and keras.backend.standardize_dtype(x.dtype) in _16BIT
    ):
        return _tf_wide_gelu()(x)
    return keras.activations.gelu(x, approximate=False)


@functools.cache
def jax_fusion_break():
    """An identity for JAX whose backward passes the cotangent through a
    ``lax.cond`` whose predicate is always true but not foldable.

    Why: XLA:CPU fuses the chain of residual-stream gradient additions of all
    blocks into every consumer, duplicating it, so the backward of a stack of
    ``L`` blocks does O(L^2) elementwise work (the fusions of the compiled
    gradient grow with depth; ``tests/test_models.py`` checks it). A
    conditional is a boundary no fusion crosses, so each block's cotangent is
    materialised once. ``jax.lax.optimization_barrier`` does not help:
    XLA:CPU removes it before fusion. The predicate ``(e == e) | (e != e)``
    is true for every float including NaN and inf, so the cotangent always
    passes unchanged.
    """
    import jax

    @jax.custom_vjp
    def fusion_break(x):
        return x

    def fwd(x):
        return x, None

    def bwd(_, g):
        e = g.reshape(-1)[0]
        return (jax.lax.cond((e == e) | (e != e), lambda t: t, jax.numpy.zeros_like, g),)

    fusion_break.defvjp(fwd, bwd)
    return fusion_break


def needs_gradient_fusion_break():
    """True on JAX with the CPU platform while the speed paths are on (see
    :func:`jax_fusion_break`); GPUs and TPUs keep the plain graph (a
    conditional there costs a device-to-host read of the predicate)."""
    if not use_fast_paths() or keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


def gradient_fusion_break(x):
    """Identity in value and gradient; on JAX/CPU it stops XLA from fusing
    gradient chains across this point (:func:`jax_fusion_break`)."""
    return jax_fusion_break()(x) if needs_gradient_fusion_break() else x
