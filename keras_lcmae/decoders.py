"""MAE decoders: they turn the encoded visible tokens back into one
prediction per patch.

Every decoder takes ``latent`` ``(B, 1 + K, D_enc)`` (``[CLS]`` first, visible
tokens in shuffled order) and ``ids_restore`` ``(B, N)`` and returns a dict with
``pred`` ``(B, N, output_dim)`` and ``hidden`` ``(B, N, width)``, the features
the prediction head reads (LC-MAE can project either).

The geometry (``grid_size``, ``input_dim``, ``output_dim``) may be left out:
the MAE model that owns the decoder fills it in from its encoder.

Three decoders (LC-MAE paper, Table 2): :class:`TransformerDecoder` (the
official MAE one), :class:`GaussianAverageDecoder` (non-parametric weighted
average + one MLP block) and :class:`ConvDecoder` (one 5x5 convolution on the
token grid); :func:`build_decoder` picks one by name.
"""

import keras
import numpy as np
from keras import ops

from keras_lcmae.layers import (
    LAYER_NORM_EPSILON,
    Block,
    add_sincos_table,
    add_token,
    exact_gelu,
    layer_norm,
    run_blocks,
)
from keras_lcmae.ops import take_tokens, to_2tuple


class _Decoder(keras.layers.Layer):
    """Shared geometry handling of the decoders."""

    def __init__(self, grid_size=None, input_dim=None, output_dim=None, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = None if grid_size is None else to_2tuple(grid_size, "grid_size")
        self.input_dim = None if input_dim is None else int(input_dim)
        self.output_dim = None if output_dim is None else int(output_dim)

    @property
    def num_patches(self):
        return self.grid_size[0] * self.grid_size[1]

    def configure(self, grid_size, input_dim, output_dim):
        """Sets the geometry from the owning model (checks it if already set)
        and builds the decoder."""
        wanted = {"grid_size": to_2tuple(grid_size), "input_dim": int(input_dim), "output_dim": int(output_dim)}
        for key, value in wanted.items():
            current = getattr(self, key)
            if current is not None and current != value:
                raise ValueError(
                    f"{type(self).__name__} was built with {key}={current}, but the encoder needs "
                    f"{key}={value}; leave {key} unset to take it from the encoder."
                )
            setattr(self, key, value)
        if not self.built:
            self.build((None, None, self.input_dim))

    def _check_geometry(self):
        if None in (self.grid_size, self.input_dim, self.output_dim):
            raise ValueError(
                f"{type(self).__name__} needs grid_size, input_dim and output_dim; pass them, or "
                "give the decoder to an MAE/LCMAE model, which sets them from its encoder."
            )

    def unshuffle(self, x, mask_token, ids_restore):
        """``x`` ``(B, 1+K, W)`` -> ``(B, 1+N, W)``: visible tokens back at their
        positions, the shared mask token everywhere else, ``[CLS]`` first."""
        b = ops.shape(x)[0]
        n = ids_restore.shape[1]
        k = x.shape[1] - 1
        fill = ops.broadcast_to(ops.cast(mask_token, x.dtype), (b, n - k, x.shape[-1]))
        tokens = take_tokens(ops.concatenate([x[:, 1:], fill], axis=1), ids_restore)
        return ops.concatenate([x[:, :1], tokens], axis=1)

    def get_config(self):
        config = super().get_config()
        config.update(grid_size=self.grid_size, input_dim=self.input_dim, output_dim=self.output_dim)
        return config


@keras.saving.register_keras_serializable(package="keras_lcmae")
class TransformerDecoder(_Decoder):
    """The official MAE decoder: ``decoder_embed``, one shared mask token,
    unshuffle, fixed sin-cos positions, Transformer blocks, ``decoder_norm``
    and the linear ``decoder_pred`` head.

    Args:
        hidden_dim, depth, num_heads, mlp_ratio: decoder sizes (MAE: 512, 8,
            16, 4; LC-MAE's paper runs use depth 2).
        grid_size, input_dim, output_dim: geometry, taken from the encoder
            when left out.

    Example:
    >>> decoder = TransformerDecoder(hidden_dim=32, depth=1, num_heads=2,
    ...                              grid_size=4, input_dim=32, output_dim=192)
    >>> latent = np.zeros((2, 5, 32), "float32")
    >>> ids_restore = np.tile(np.arange(16), (2, 1))
    >>> tuple(decoder(latent, ids_restore)["pred"].shape)
    (2, 16, 192)
    """

    def __init__(
        self,
        hidden_dim=512,
        depth=8,
        num_heads=16,
        mlp_ratio=4.0,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        grid_size=None,
        input_dim=None,
        output_dim=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "decoder")
        super().__init__(grid_size, input_dim, output_dim, **kwargs)
        if hidden_dim % num_heads:
            raise ValueError(f"decoder hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}.")
        if hidden_dim % 4:
            raise ValueError(f"decoder hidden_dim={hidden_dim} must be divisible by 4 (sin-cos table).")
        self.hidden_dim = int(hidden_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.decoder_embed = keras.layers.Dense(self.hidden_dim, name="decoder_embed")
        self.blocks = [
            Block(
                self.hidden_dim,
                self.num_heads,
                self.mlp_ratio,
                True,
                0.0,
                self.layer_norm_epsilon,
                name=f"decoder_blocks_{i}",
            )
            for i in range(self.depth)
        ]
        self.decoder_norm = layer_norm("decoder_norm", self.layer_norm_epsilon)
        self.decoder_pred = None
        if None not in (self.grid_size, self.input_dim, self.output_dim):
            self.build((None, None, self.input_dim))

    def build(self, input_shape=None):
        self._check_geometry()
        w = self.hidden_dim
        self.decoder_embed.build((None, None, self.input_dim))
        self.mask_token = add_token(self, "mask_token", w)
        self.decoder_pos_embed = add_sincos_table(self, "decoder_pos_embed", w, self.grid_size)
        for block in self.blocks:
            block.build((None, None, w))
        self.decoder_norm.build((None, None, w))
        self.decoder_pred = keras.layers.Dense(self.output_dim, name="decoder_pred")
        self.decoder_pred.build((None, None, w))
        self.built = True

    def call(self, latent, ids_restore, training=None, return_attention=False):
        x = self.decoder_embed(latent)
        x = self.unshuffle(x, self.mask_token, ids_restore)
        x = x + ops.cast(self.decoder_pos_embed, x.dtype)
        x, attentions = run_blocks(self.blocks, x, training, return_attention)
        hidden = self.decoder_norm(x)[:, 1:]
        out = {"pred": self.decoder_pred(hidden), "hidden": hidden}
        if return_attention:
            out["attention"] = attentions
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


def gaussian_kernel(grid_size, sigma=1.0, window=5):
    """Dense ``(N, N)`` numpy kernel of the weighted-average decoder.

    Entry ``[i, j]`` is ``exp(-d_ij^2 / (2 sigma^2))`` where ``d_ij`` is the
    distance in patches between grid positions ``i`` and ``j`` (row-major
    numbering, as :func:`keras_lcmae.ops.patchify`), when ``j`` lies in the
    ``window x window`` square centred on ``i``; zero elsewhere. Rows are not
    normalised (that happens per image, over the visible neighbours only).

    Example:
    >>> k = gaussian_kernel(4, sigma=1.0, window=3)
    >>> k.shape, float(k[0, 0]), float(k[0, 2])
    ((16, 16), 1.0, 0.0)
    """
    rows, cols = to_2tuple(grid_size, "grid_size")
    r, c = np.divmod(np.arange(rows * cols), cols)
    dr = r[:, None] - r[None, :]
    dc = c[:, None] - c[None, :]
    half = window // 2
    inside = (np.abs(dr) <= half) & (np.abs(dc) <= half)
    kernel = np.exp(-(dr**2 + dc**2) / (2.0 * float(sigma) ** 2))
    return np.where(inside, kernel, 0.0).astype("float32")


def _visible_count(latent, ids_restore):
    k = latent.shape[1] - 1
    if k is None:
        raise ValueError("The decoder needs a static number of visible tokens (latent.shape[1]).")
    return k


@keras.saving.register_keras_serializable(package="keras_lcmae")
class GaussianAverageDecoder(_Decoder):
    """Non-parametric weighted-average decoder of the LC-MAE paper (Sec. 4.1,
    Table 2, "Weighted Average"): every position takes the Gaussian-weighted
    mean of the **visible** tokens around it, then one MLP block predicts
    the pixels.

    Steps: ``decoder_embed`` (Dense) on the visible tokens (``[CLS]`` is
    dropped); for each position ``i`` of the grid,
    ``e_i = sum_j w_ij z_j`` over the visible tokens ``j`` inside the
    ``window x window`` square centred on ``i``, with
    ``w_ij ∝ exp(-d_ij^2 / (2 sigma^2))`` (``d`` in patches) renormalised to
    sum to 1 over the visible neighbours present. This is done for **every**
    position, visible ones included (a visible token averages itself, with the
    largest weight, and its visible neighbours), so the decoder treats all
    positions alike. A position with no visible token in its window receives
    the learned ``mask_token`` instead. The fixed 2-D sin-cos positions are
    then added (the average itself is translation invariant; this tells the
    MLP where it is, as the Transformer decoder's table does), followed by a
    pre-norm residual MLP block (exact GELU, LayerNorm eps 1e-6),
    ``decoder_norm`` and the linear ``decoder_pred``.

    The average is one batched matmul with the dense ``(N, N)`` Gaussian
    kernel (a numpy constant, zero outside the window) times the visibility
    mask, row-normalised; see :meth:`neighbour_weights`.

    The decoder has no attention: ``return_attention=True`` returns
    ``attention`` as an empty list.

    Args:
        hidden_dim: decoder width (divisible by 4 for the sin-cos table).
        sigma: Gaussian std in patches (paper: 1).
        window: odd side of the averaging square in patches (paper: about 5).
        mlp_ratio: hidden size of the MLP block relative to ``hidden_dim``.
        grid_size, input_dim, output_dim: geometry, taken from the encoder
            when left out.

    Example:
    >>> decoder = GaussianAverageDecoder(hidden_dim=32, grid_size=4,
    ...                                  input_dim=32, output_dim=192)
    >>> latent = np.zeros((2, 5, 32), "float32")
    >>> ids_restore = np.tile(np.arange(16), (2, 1))
    >>> tuple(decoder(latent, ids_restore)["pred"].shape)
    (2, 16, 192)
    """

    def __init__(
        self,
        hidden_dim=512,
        sigma=1.0,
        window=5,
        mlp_ratio=4.0,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        grid_size=None,
        input_dim=None,
        output_dim=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "decoder")
        super().__init__(grid_size, input_dim, output_dim, **kwargs)
        if int(hidden_dim) < 4 or int(hidden_dim) % 4:
            raise ValueError(f"decoder hidden_dim={hidden_dim} must be a positive multiple of 4 (sin-cos table).")
        if not float(sigma) > 0:
            raise ValueError(f"sigma must be > 0 (in patches; the paper uses 1.0), got {sigma!r}.")
        if int(window) < 1 or int(window) % 2 == 0:
            raise ValueError(f"window must be a positive odd number of patches (paper: 5), got {window!r}.")
        if not float(mlp_ratio) > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}.")
        self.hidden_dim = int(hidden_dim)
        self.sigma = float(sigma)
        self.window = int(window)
        self.mlp_ratio = float(mlp_ratio)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.mlp_dim = int(self.hidden_dim * self.mlp_ratio)
        self.decoder_embed = keras.layers.Dense(self.hidden_dim, name="decoder_embed")
        self.mlp_norm = layer_norm("mlp_norm", self.layer_norm_epsilon)
        self.fc1 = keras.layers.Dense(self.mlp_dim, name="fc1")
        self.fc2 = keras.layers.Dense(self.hidden_dim, name="fc2")
        self.decoder_norm = layer_norm("decoder_norm", self.layer_norm_epsilon)
        self.decoder_pred = None
        self._kernel = None
        if None not in (self.grid_size, self.input_dim, self.output_dim):
            self.build((None, None, self.input_dim))

    def build(self, input_shape=None):
        self._check_geometry()
        w = self.hidden_dim
        self.decoder_embed.build((None, None, self.input_dim))
        self.mask_token = add_token(self, "mask_token", w)
        self.decoder_pos_embed = add_sincos_table(self, "decoder_pos_embed", w, self.grid_size)
        self.mlp_norm.build((None, None, w))
        self.fc1.build((None, None, w))
        self.fc2.build((None, None, self.mlp_dim))
        self.decoder_norm.build((None, None, w))
        self.decoder_pred = keras.layers.Dense(self.output_dim, name="decoder_pred")
        self.decoder_pred.build((None, None, w))
        self._kernel = gaussian_kernel(self.grid_size, self.sigma, self.window)
        self.built = True

    def neighbour_weights(self, mask, dtype="float32"):
        """Averaging weights ``(B, N, N)`` for a mask ``(B, N)`` (1 = masked,
        the MAE convention): row ``i`` holds the weights position ``i`` gives
        to each position ``j``; they sum to 1 over the visible ``j`` in the
        window and are 0 on masked and out-of-window ``j``. A row with no
        visible neighbour is all zeros (that position gets the mask token)."""
        self._check_geometry()
        if self._kernel is None:
            self._kernel = gaussian_kernel(self.grid_size, self.sigma, self.window)
        visible = 1.0 - ops.cast(mask, dtype)
        w = ops.convert_to_tensor(self._kernel, dtype)[None] * ops.expand_dims(visible, 1)
        total = ops.sum(w, axis=-1, keepdims=True)
        return w / ops.maximum(total, 1e-12)

    def call(self, latent, ids_restore, training=None, return_attention=False):
        k = _visible_count(latent, ids_restore)
        x = self.decoder_embed(latent)
        zero = ops.zeros((1, 1, self.hidden_dim), x.dtype)
        tokens = self.unshuffle(x, zero, ids_restore)[:, 1:]  # visible embeddings, 0 at masked positions
        mask = ops.cast(ops.greater_equal(ids_restore, k), x.dtype)
        weights = self.neighbour_weights(mask, x.dtype)
        has_neighbour = ops.cast(ops.sum(weights, axis=-1, keepdims=True) > 0.5, x.dtype)
        x = ops.matmul(weights, tokens) + (1.0 - has_neighbour) * ops.cast(self.mask_token, x.dtype)
        x = x + ops.cast(self.decoder_pos_embed[:, 1:], x.dtype)
        h = self.fc2(exact_gelu(self.fc1(self.mlp_norm(x))))
        hidden = self.decoder_norm(x + h)
        out = {"pred": self.decoder_pred(hidden), "hidden": hidden}
        if return_attention:
            out["attention"] = []
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            sigma=self.sigma,
            window=self.window,
            mlp_ratio=self.mlp_ratio,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


@keras.saving.register_keras_serializable(package="keras_lcmae")
class ConvDecoder(_Decoder):
    """Single convolution decoder of the LC-MAE paper (Sec. 4.1, Table 2,
    "Conv Layer": "a convolutional layer with a kernel size of 5 as the
    decoder").

    Steps: ``decoder_embed``, unshuffle with the shared learned mask token,
    fixed 2-D sin-cos positions, drop ``[CLS]``, reshape to the
    ``(rows, cols)`` token grid, **one** ``Conv2D(hidden_dim, kernel_size,
    padding="same")`` over it (zero padding at the grid border), then
    ``decoder_norm`` (LayerNorm eps 1e-6) and the linear ``decoder_pred``.
    Each prediction thus sees only the ``kernel_size x kernel_size``
    neighbourhood of its token.

    The decoder has no attention: ``return_attention=True`` returns
    ``attention`` as an empty list.

    Args:
        hidden_dim: decoder width (embedding and conv output channels;
            divisible by 4 for the sin-cos table).
        kernel_size: odd side of the conv kernel in patches (paper: 5).
        grid_size, input_dim, output_dim: geometry, taken from the encoder
            when left out.

    Example:
    >>> decoder = ConvDecoder(hidden_dim=32, kernel_size=5, grid_size=4,
    ...                       input_dim=32, output_dim=192)
    >>> latent = np.zeros((2, 5, 32), "float32")
    >>> ids_restore = np.tile(np.arange(16), (2, 1))
    >>> tuple(decoder(latent, ids_restore)["hidden"].shape)
    (2, 16, 32)
    """

    def __init__(
        self,
        hidden_dim=512,
        kernel_size=5,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        grid_size=None,
        input_dim=None,
        output_dim=None,
        **kwargs,
    ):
        kwargs.setdefault("name", "decoder")
        super().__init__(grid_size, input_dim, output_dim, **kwargs)
        if int(hidden_dim) < 4 or int(hidden_dim) % 4:
            raise ValueError(f"decoder hidden_dim={hidden_dim} must be a positive multiple of 4 (sin-cos table).")
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError(
                f"kernel_size must be a positive odd number (a kernel centred on its token; paper: 5), "
                f"got {kernel_size!r}."
            )
        self.hidden_dim = int(hidden_dim)
        self.kernel_size = int(kernel_size)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.decoder_embed = keras.layers.Dense(self.hidden_dim, name="decoder_embed")
        self.conv = keras.layers.Conv2D(
            self.hidden_dim, self.kernel_size, padding="same", data_format="channels_last", name="decoder_conv"
        )
        self.decoder_norm = layer_norm("decoder_norm", self.layer_norm_epsilon)
        self.decoder_pred = None
        if None not in (self.grid_size, self.input_dim, self.output_dim):
            self.build((None, None, self.input_dim))

    def build(self, input_shape=None):
        self._check_geometry()
        w = self.hidden_dim
        rows, cols = self.grid_size
        self.decoder_embed.build((None, None, self.input_dim))
        self.mask_token = add_token(self, "mask_token", w)
        self.decoder_pos_embed = add_sincos_table(self, "decoder_pos_embed", w, self.grid_size)
        self.conv.build((None, rows, cols, w))
        self.decoder_norm.build((None, None, w))
        self.decoder_pred = keras.layers.Dense(self.output_dim, name="decoder_pred")
        self.decoder_pred.build((None, None, w))
        self.built = True

    def call(self, latent, ids_restore, training=None, return_attention=False):
        rows, cols = self.grid_size
        x = self.decoder_embed(latent)
        x = self.unshuffle(x, self.mask_token, ids_restore)
        x = (x + ops.cast(self.decoder_pos_embed, x.dtype))[:, 1:]
        x = self.conv(ops.reshape(x, (-1, rows, cols, self.hidden_dim)))
        hidden = self.decoder_norm(ops.reshape(x, (-1, rows * cols, self.hidden_dim)))
        out = {"pred": self.decoder_pred(hidden), "hidden": hidden}
        if return_attention:
            out["attention"] = []
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            kernel_size=self.kernel_size,
            layer_norm_epsilon=self.layer_norm_epsilon,
        )
        return config


DECODERS = {
    "transformer": TransformerDecoder,
    "gaussian": GaussianAverageDecoder,
    "conv": ConvDecoder,
}


def build_decoder(kind, **kwargs):
    """Builds a decoder by name: ``"transformer"`` (:class:`TransformerDecoder`),
    ``"gaussian"`` (:class:`GaussianAverageDecoder`) or ``"conv"``
    (:class:`ConvDecoder`); keyword arguments go to its constructor.

    Example:
    >>> build_decoder("conv", hidden_dim=32, kernel_size=5).kernel_size
    5
    """
    if kind not in DECODERS:
        raise ValueError(f"Unknown decoder kind {kind!r}; choose one of {sorted(DECODERS)}.")
    return DECODERS[kind](**kwargs)
