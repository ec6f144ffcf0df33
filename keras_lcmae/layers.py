"""Building blocks of the ViT encoder and the Transformer decoder.

The blocks mirror the official MAE (timm) ones: pre-norm, a fused ``qkv``
projection with bias, exact (erf) GELU in an MLP of ratio 4, LayerNorm with
``epsilon=1e-6``, xavier-uniform linear kernels and zero biases.
"""

import keras
from keras import ops

from keras_lcmae.backend import blocks as _fast
from keras_lcmae.backend.blocks import (  # noqa: F401  (public here: the blocks' speed paths)
    exact_gelu,
    fused_attention_is_fast,
    gradient_fusion_break,
    needs_gradient_fusion_break,
)
from keras_lcmae.ops import patchify, to_2tuple

LAYER_NORM_EPSILON = 1e-6


def _dense(units, name, use_bias=True, dtype=None):
    return keras.layers.Dense(
        units,
        use_bias=use_bias,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        name=name,
        dtype=dtype,
    )


def layer_norm(name, epsilon=LAYER_NORM_EPSILON, dtype=None):
    """LayerNorm with the MAE epsilon (Keras' default of 1e-3 is not MAE's)."""
    return keras.layers.LayerNormalization(epsilon=epsilon, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package="keras_lcmae")
class PatchEmbed(keras.layers.Layer):
    """Linear patch embedding: ``patchify`` then one matrix product.

    This is the official strided convolution written as a linear layer on the
    patch vectors; its kernel ``(p*p*C, D)`` is the conv weight ``(D, C, p, p)``
    transposed to ``(p, p, C, D)`` and flattened.

    Example:
    >>> import numpy as np
    >>> layer = PatchEmbed(patch_size=8, hidden_dim=32)
    >>> tuple(layer(np.zeros((2, 32, 32, 3), "float32")).shape)
    (2, 16, 32)
    """

    def __init__(self, patch_size, hidden_dim, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.hidden_dim = int(hidden_dim)
        self.proj = _dense(self.hidden_dim, "proj")

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("PatchEmbed needs a known channel count in its input shape.")
        self.proj.build((None, None, self.patch_size * self.patch_size * channels))
        self.built = True

    def call(self, images):
        return self.proj(patchify(ops.cast(images, self.compute_dtype), self.patch_size))

    def get_config(self):
        config = super().get_config()
        config.update(patch_size=self.patch_size, hidden_dim=self.hidden_dim)
        return config


@keras.saving.register_keras_serializable(package="keras_lcmae")
class DropPath(keras.layers.Layer):
    """Stochastic depth: drops the whole residual branch per sample while
    training, scaling the kept ones by ``1 / (1 - rate)``."""

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}.")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        noise = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype)
        return x * ops.floor(keep + noise) / keep

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config


@keras.saving.register_keras_serializable(package="keras_lcmae")
class Attention(keras.layers.Layer):
    """Multi-head self-attention with a fused ``qkv`` projection.

    The ``qkv`` kernel's output axis splits into thirds ``q | k | v``, each
    head a contiguous slice of ``hidden_dim / num_heads`` (the official
    layout). The default path calls ``keras.ops.dot_product_attention`` (the
    backend's fused kernel where it has one) unless ``fused_attention_is_fast``
    says the explicit path is faster (PyTorch's CPU kernel in 16-bit);
    ``return_attention=True`` takes the explicit path (softmax in float32) and
    also returns the ``(B, heads, T, T)`` attention weights, so asking for them
    never slows the default path.

    Example:
    >>> import numpy as np
    >>> attn = Attention(hidden_dim=32, num_heads=4)
    >>> y, a = attn(np.zeros((2, 5, 32), "float32"), return_attention=True)
    >>> tuple(y.shape), tuple(a.shape)
    ((2, 5, 32), (2, 4, 5, 5))
    """

    def __init__(self, hidden_dim, num_heads, qkv_bias=True, **kwargs):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}.")
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.qkv_bias = bool(qkv_bias)
        self.head_dim = self.hidden_dim // self.num_heads
        # sublayers share this layer's dtype policy: ``call`` runs them by
        # their ``call`` inside this layer's autocast scope (Block.call says why)
        self.qkv = _dense(3 * self.hidden_dim, "qkv", use_bias=self.qkv_bias, dtype=self.dtype_policy)
        self.proj = _dense(self.hidden_dim, "proj", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.qkv.build((None, None, self.hidden_dim))
        self.proj.build((None, None, self.hidden_dim))
        self.built = True

    def call(self, x, return_attention=False):
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        qkv = ops.reshape(self.qkv.call(x), (b, t, 3, self.num_heads, self.head_dim))
        # one unstack, not three slices: the gradient is one stack of the
        # three, where each slice's gradient would write a zero-filled copy
        # of the whole qkv tensor and add them up
        q, k, v = ops.unstack(qkv, 3, axis=2)  # (B, T, H, Dh)
        if not return_attention and fused_attention_is_fast(q):
            out = ops.dot_product_attention(q, k, v)
            return self.proj.call(ops.reshape(out, (b, t, self.hidden_dim)))
        q = ops.transpose(q, (0, 2, 1, 3))
        k = ops.transpose(k, (0, 2, 1, 3))
        v = ops.transpose(v, (0, 2, 1, 3))
        if return_attention:  # the weights in float32, for analysis
            logits = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) * (self.head_dim**-0.5)
            attn = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        else:  # the speed path: scale the (smaller) queries; PyTorch's 16-bit CPU softmax accumulates in float32
            attn = ops.softmax(
                ops.matmul(q * ops.cast(self.head_dim**-0.5, q.dtype), ops.transpose(k, (0, 1, 3, 2))), axis=-1
            )
        out = ops.matmul(ops.cast(attn, v.dtype), v)  # (B, H, T, Dh)
        out = self.proj.call(ops.reshape(ops.transpose(out, (0, 2, 1, 3)), (b, t, self.hidden_dim)))
        return (out, attn) if return_attention else out

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, num_heads=self.num_heads, qkv_bias=self.qkv_bias)
        return config


@keras.saving.register_keras_serializable(package="keras_lcmae")
class Block(keras.layers.Layer):
    """Pre-norm Transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``.

    Example:
    >>> import numpy as np
    >>> block = Block(hidden_dim=32, num_heads=4)
    >>> tuple(block(np.zeros((2, 5, 32), "float32")).shape)
    (2, 5, 32)
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path=0.0,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = int(hidden_dim)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.drop_path = float(drop_path)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.mlp_dim = int(self.hidden_dim * self.mlp_ratio)
        policy = self.dtype_policy  # shared by the sublayers, which call() runs directly
        self.norm1 = layer_norm("norm1", self.layer_norm_epsilon, dtype=policy)
        self.attn = Attention(self.hidden_dim, self.num_heads, self.qkv_bias, name="attn", dtype=policy)
        self.norm2 = layer_norm("norm2", self.layer_norm_epsilon, dtype=policy)
        self.fc1 = _dense(self.mlp_dim, "fc1", dtype=policy)
        self.fc2 = _dense(self.hidden_dim, "fc2", dtype=policy)
        self.drop_path_layer = DropPath(self.drop_path, name="drop_path", dtype=policy)

    def build(self, input_shape):
        shape = (None, None, self.hidden_dim)
        # every sublayer, drop path too: ``call`` never runs them through
        # ``__call__`` (which would mark them built), and one unbuilt layer
        # makes Keras' train_on_batch/fit re-run the model symbolically, on
        # PyTorch a second full forward pass, at every step
        for layer in (self.norm1, self.attn, self.norm2, self.fc1, self.drop_path_layer):
            layer.build(shape)
        self.fc2.build((None, None, self.mlp_dim))
        self.built = True

    def call(self, x, training=None, return_attention=False):
        # The sublayers run by their ``call``, inside this block's ``__call__``
        # (which casts the input and opens the mixed-precision autocast scope
        # that casts their variables): the same operations and results, bit
        # for bit, without Keras' per-call bookkeeping (docs/benchmarks.md).
        h = self.norm1.call(x)
        if return_attention:
            h, attn = self.attn.call(h, return_attention=True)
        else:
            h = self.attn.call(h)
        x = x + self.drop_path_layer.call(h, training=training)
        h = self.fc2.call(exact_gelu(self.fc1.call(self.norm2.call(x))))
        x = x + self.drop_path_layer.call(h, training=training)
        return (x, attn) if return_attention else x

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_path=self.drop_path,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


def validate_image_shape(shape, image_size, num_channels, who):
    """Raises a clear error when NHWC input does not fit a model's fixed size."""
    if len(shape) != 4:
        raise ValueError(f"{who} expects NHWC images of rank 4, got shape {tuple(shape)}.")
    h, w = to_2tuple(image_size)
    if shape[-1] is not None and shape[-1] != num_channels:
        raise ValueError(
            f"{who} was built for {num_channels}-channel images but got {shape[-1]} channels "
            f"(input shape {tuple(shape)})."
        )
    if (shape[1] is not None and shape[1] != h) or (shape[2] is not None and shape[2] != w):
        raise ValueError(
            f"{who} was built for {h}x{w} images but got {shape[1]}x{shape[2]} "
            f"(input shape {tuple(shape)}); resize the images or build the model with "
            f"image_size=({shape[1]}, {shape[2]})."
        )


def run_blocks(blocks, x, training=None, return_attention=False):
    """Runs Transformer blocks in order; returns ``(x, attentions)`` where
    ``attentions`` lists each block's ``(B, heads, T, T)`` weights when asked
    (else it is empty). On JAX/CPU each block's input passes
    :func:`gradient_fusion_break` (a faster backward there; see
    :func:`keras_lcmae.backend.blocks.jax_fusion_break`)."""
    attentions = []
    fusion_break = _fast.jax_fusion_break() if needs_gradient_fusion_break() else None
    for block in blocks:
        if fusion_break is not None:
            x = fusion_break(x)
        if return_attention:
            x, attn = block(x, training=training, return_attention=True)
            attentions.append(attn)
        else:
            x = block(x, training=training)
    return x, attentions


def add_token(layer, name, dim):
    """A learned ``(1, 1, dim)`` token initialised N(0, 0.02) (official MAE)."""
    return layer.add_weight(shape=(1, 1, dim), initializer=keras.initializers.RandomNormal(stddev=0.02), name=name)


def add_sincos_table(layer, name, dim, grid_size, trainable=False):
    """A ``(1, 1 + rows*cols, dim)`` 2-D sin-cos table with the zero ``[CLS]``
    row, fixed (non-trainable) unless ``trainable``; a loaded checkpoint
    overwrites it."""
    from keras_lcmae.ops import get_2d_sincos_pos_embed

    rows, cols = grid_size
    table = layer.add_weight(shape=(1, rows * cols + 1, dim), initializer="zeros", trainable=bool(trainable), name=name)
    table.assign(get_2d_sincos_pos_embed(dim, grid_size, cls_token=True)[None])
    return table
