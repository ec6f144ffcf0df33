"""MAE decoders: they turn the encoded visible tokens back into one
prediction per patch.

Every decoder takes ``latent`` ``(B, 1 + K, D_enc)`` (``[CLS]`` first, visible
tokens in shuffled order) and ``ids_restore`` ``(B, N)`` and returns a dict with
``pred`` ``(B, N, output_dim)`` and ``hidden`` ``(B, N, width)``, the features
the prediction head reads (LC-MAE can project either).

The geometry (``grid_size``, ``input_dim``, ``output_dim``) may be left out:
the MAE model that owns the decoder fills it in from its encoder.
"""

import keras
from keras import ops

from keras_lcmae.layers import LAYER_NORM_EPSILON, Block, add_sincos_table, add_token, layer_norm, run_blocks
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
            raise ValueError(
                f"decoder hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}."
            )
        if hidden_dim % 4:
            raise ValueError(f"decoder hidden_dim={hidden_dim} must be divisible by 4 (sin-cos table).")
        self.hidden_dim = int(hidden_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.decoder_embed = keras.layers.Dense(self.hidden_dim, name="decoder_embed")
        self.blocks = [
            Block(self.hidden_dim, self.num_heads, self.mlp_ratio, True, 0.0, self.layer_norm_epsilon, name=f"decoder_blocks_{i}")
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
