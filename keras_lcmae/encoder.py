"""The ViT encoder of MAE / LC-MAE."""

import keras
import numpy as np
from keras import ops

from keras_lcmae.layers import (
    LAYER_NORM_EPSILON,
    Block,
    PatchEmbed,
    add_sincos_table,
    add_token,
    layer_norm,
    run_blocks,
    validate_image_shape,
)
from keras_lcmae.ops import grid_shape, to_2tuple

# Widths, depths and heads of the standard ViTs (Dosovitskiy et al.; DeiT for
# tiny/small). Patches are 16 px unless a preset says otherwise: ViT-H uses 14,
# as official MAE's ViT-H/14. `vit_test` is a toy size for unit tests and CPU demos.
PRESETS = {
    "vit_test": dict(hidden_dim=32, depth=2, num_heads=2, image_size=32, patch_size=8),
    "vit_tiny": dict(hidden_dim=192, depth=12, num_heads=3),
    "vit_small": dict(hidden_dim=384, depth=12, num_heads=6),
    "vit_base": dict(hidden_dim=768, depth=12, num_heads=12),
    "vit_large": dict(hidden_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(hidden_dim=1280, depth=32, num_heads=16, patch_size=14),
}


def preset_kwargs(name, **overrides):
    """The constructor arguments of a named preset, updated by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"Unknown encoder preset {name!r}; choose one of {sorted(PRESETS)}.")
    kwargs = dict(PRESETS[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


# How the tokens of an image become one feature vector: the [CLS] token or
# the mean of the patch tokens.
POOLS = ("cls", "avg")


def check_pool(pool):
    """``pool`` itself if it is one of :data:`POOLS`; a clear error otherwise."""
    if pool not in POOLS:
        raise ValueError(f"`pool` must be one of {POOLS}, got {pool!r}.")
    return pool


def find_encoder(model, who="This function"):
    """The :class:`ViTEncoder` itself, or the one a model holds as
    ``.encoder`` (MAE, LCMAE, ViTClassifier); a clear error otherwise.

    Example:
    >>> encoder = ViTEncoder.from_preset("vit_test")
    >>> find_encoder(encoder) is encoder
    True
    """
    if isinstance(model, ViTEncoder):
        return model
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, ViTEncoder):
        return encoder
    raise ValueError(
        f"{who} needs a ViTEncoder or a model with one as `.encoder` (MAE, LCMAE, ViTClassifier), "
        f"got {type(model).__name__}."
    )


@keras.saving.register_keras_serializable(package="keras_lcmae")
class ViTEncoder(keras.Model):
    """Vision Transformer encoder with a ``[CLS]`` token and fixed 2-D sin-cos
    positions, as in the official MAE.

    Called on images it encodes every patch and returns all tokens
    ``(B, 1 + N, hidden_dim)`` (``[CLS]`` first). MAE models use the two halves
    separately: :meth:`embed` (patch embedding plus positions) before masking,
    and :meth:`forward_tokens` (``[CLS]``, blocks, final norm) on the visible
    tokens.

    Args:
        image_size: int or ``(height, width)``; a multiple of ``patch_size``.
        patch_size: side of the square patches (any size, 16 by default).
        num_channels: channels of the input images.
        hidden_dim, depth, num_heads, mlp_ratio, qkv_bias: Transformer sizes.
        drop_path_rate: stochastic depth, increasing linearly to this rate
            over the blocks (0 for pretraining, 0.1 for ViT-B finetuning).
        layer_norm_epsilon: 1e-6 as the official models.
        final_norm: apply the last LayerNorm (official finetuned checkpoints
            with global pooling have none: their ``fc_norm`` is the head's).
        pos_embed_trainable: train the position table. Off for pretraining
            (MAE's table is fixed); :class:`~keras_lcmae.ViTClassifier` turns
            it on for finetuning, where the official model (timm's ViT)
            learns it, starting from the pretrained table.

    Example:
    >>> encoder = ViTEncoder.from_preset("vit_test")
    >>> tuple(encoder(np.zeros((2, 32, 32, 3), "float32")).shape)
    (2, 17, 32)
    """

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        num_channels=3,
        hidden_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        layer_norm_epsilon=LAYER_NORM_EPSILON,
        final_norm=True,
        pos_embed_trainable=False,
        **kwargs,
    ):
        kwargs.setdefault("name", "vit_encoder")
        super().__init__(**kwargs)
        image_size = to_2tuple(image_size, "image_size")
        self.grid_size = grid_shape(image_size, patch_size)
        for name, value in (
            ("num_channels", num_channels),
            ("hidden_dim", hidden_dim),
            ("depth", depth),
            ("num_heads", num_heads),
        ):
            if int(value) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}.")
        if hidden_dim % 4:
            raise ValueError(f"hidden_dim={hidden_dim} must be divisible by 4 for the 2-D sin-cos position table.")
        self.image_size = image_size
        self.patch_size = int(patch_size)
        self.num_channels = int(num_channels)
        self.hidden_dim = int(hidden_dim)
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.drop_path_rate = float(drop_path_rate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.final_norm = bool(final_norm)
        self.pos_embed_trainable = bool(pos_embed_trainable)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_dim = self.patch_size * self.patch_size * self.num_channels

        self.patch_embed = PatchEmbed(self.patch_size, self.hidden_dim, name="patch_embed")
        rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth > 1 else [self.drop_path_rate]
        self.blocks = [
            Block(
                self.hidden_dim,
                self.num_heads,
                self.mlp_ratio,
                self.qkv_bias,
                drop_path=float(rates[i]),
                layer_norm_epsilon=self.layer_norm_epsilon,
                name=f"blocks_{i}",
            )
            for i in range(self.depth)
        ]
        self.norm = layer_norm("norm", self.layer_norm_epsilon) if self.final_norm else None
        self.build()

    def build(self, input_shape=None):
        if self.built:
            return
        d = self.hidden_dim
        self.cls_token = add_token(self, "cls_token", d)
        self.pos_embed = add_sincos_table(self, "pos_embed", d, self.grid_size, trainable=self.pos_embed_trainable)
        self.patch_embed.build((None, *self.image_size, self.num_channels))
        for block in self.blocks:
            block.build((None, None, d))
        if self.norm is not None:
            self.norm.build((None, None, d))
        self.built = True

    @classmethod
    def from_preset(cls, name, **kwargs):
        """Builds a named size (``vit_test``, ``vit_tiny``, ``vit_small``,
        ``vit_base``, ``vit_large``, ``vit_huge``); keyword arguments override
        the preset (e.g. ``image_size=32, patch_size=4``)."""
        return cls(**preset_kwargs(name, **kwargs))

    def embed(self, images):
        """Patch tokens with their positions, no ``[CLS]``: ``(B, N, D)``."""
        validate_image_shape(images.shape, self.image_size, self.num_channels, "ViTEncoder")
        x = self.patch_embed(images)
        return x + ops.cast(self.pos_embed[:, 1:, :], x.dtype)

    def prepend_cls(self, x):
        """``[CLS]`` (with its position) prepended to tokens ``(B, K, D)``."""
        cls = ops.cast(self.cls_token + self.pos_embed[:, :1, :], x.dtype)
        return ops.concatenate([ops.broadcast_to(cls, (ops.shape(x)[0], 1, self.hidden_dim)), x], axis=1)

    def forward_intermediates(
        self, x, indices=None, training=None, norm=True, stop_early=False, return_attention=False
    ):
        """The encoder's token pass, with what happens on the way on request.

        Every caller that runs the blocks (training, the classifier's pooling,
        the self-guided masking's guide pass, the analyses) goes through this
        method.

        Args:
            x: tokens from :meth:`embed`, ``(B, K, D)``: all patches or a
                visible subset, without ``[CLS]``.
            indices: block indices (negative ones count from the end) whose
                outputs to return, or ``None`` for none.
            training: as for Keras layers.
            norm: apply the final norm (if the encoder has one) to ``output``.
            stop_early: run the blocks only up to the last of ``indices``;
                ``output`` is then that block's output, without the norm.
            return_attention: also return each block's attention weights.

        Returns a dict: ``output`` ``(B, 1+K, D)``; ``intermediates``, the
        outputs of the blocks in ``indices`` (residual stream, ``[CLS]``
        first, before the final norm), in the order asked; ``attention``, the
        ``(B, heads, 1+K, 1+K)`` weights of every block run (empty unless
        asked).

        Example:
        >>> enc = ViTEncoder.from_preset("vit_test")
        >>> tokens = enc.embed(np.zeros((2, 32, 32, 3), "float32"))
        >>> out = enc.forward_intermediates(tokens, indices=[0, -1], return_attention=True)
        >>> [tuple(t.shape) for t in out["intermediates"]], len(out["attention"])
        ([(2, 17, 32), (2, 17, 32)], 2)
        """
        depth = len(self.blocks)
        wanted = []
        for i in [] if indices is None else list(indices):
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -depth <= i < depth:
                raise ValueError(f"indices must be block indices in [-{depth}, {depth}), got {indices!r}.")
            wanted.append(int(i) % depth)
        if stop_early and not wanted:
            raise ValueError("stop_early needs the indices of the blocks to return.")
        x = self.prepend_cls(x)
        kept, attention, start = {}, [], 0
        for end in sorted(set(wanted)):
            x, attn = run_blocks(self.blocks[start : end + 1], x, training, return_attention)
            attention.extend(attn)
            kept[end], start = x, end + 1
        if not stop_early:
            x, attn = run_blocks(self.blocks[start:], x, training, return_attention)
            attention.extend(attn)
            if norm and self.norm is not None:
                x = self.norm(x)
        return {"output": x, "intermediates": [kept[i] for i in wanted], "attention": attention}

    def forward_tokens(self, x, training=None, return_attention=False):
        """Prepends ``[CLS]`` to tokens from :meth:`embed` (all of them or a
        visible subset) and runs the blocks and final norm
        (:meth:`forward_intermediates` without intermediates).

        Returns ``(B, 1 + K, D)``, and with ``return_attention=True`` also the
        list of per-block attention weights ``(B, heads, 1+K, 1+K)``.
        """
        out = self.forward_intermediates(x, training=training, return_attention=return_attention)
        return (out["output"], out["attention"]) if return_attention else out["output"]

    def call(self, images, training=None):
        return self.forward_tokens(self.embed(images), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_dim=self.hidden_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            drop_path_rate=self.drop_path_rate,
            layer_norm_epsilon=self.layer_norm_epsilon,
            final_norm=self.final_norm,
            pos_embed_trainable=self.pos_embed_trainable,
        )
        return config
