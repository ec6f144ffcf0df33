"""MAE (He et al., 2022): masked patches reconstructed from the visible ones."""

import warnings

import keras
from keras import ops

from keras_lcmae.losses import patch_stats, reconstruction_loss
from keras_lcmae.masking import SelfGuidedMasking, get_masking, num_visible
from keras_lcmae.models.base import ReconstructionModel, as_encoder
from keras_lcmae.ops import patchify, unpatchify

# Arguments of self-guided masking that MAE and LCMAE took directly before
# masking became a strategy object; still read from old configs.
LEGACY_MASKING_ARGS = ("informed_start_epoch", "hint_ratio", "guide_layer")


def masking_from_legacy(masking, kwargs, warn=True):
    """``masking`` with the legacy self-guided arguments popped from
    ``kwargs`` folded in: a :class:`SelfGuidedMasking` for
    ``masking="self_guided"``; dropped for ``"random"`` (where they did
    nothing)."""
    legacy = {k: kwargs.pop(k) for k in LEGACY_MASKING_ARGS if k in kwargs}
    if not legacy:
        return masking
    if warn:
        warnings.warn(
            f"Passing {', '.join(sorted(legacy))} to the model is deprecated; pass "
            f"masking=SelfGuidedMasking({', '.join(f'{k}=...' for k in sorted(legacy))}).",
            DeprecationWarning,
            stacklevel=3,
        )
    if masking == "self_guided":  # the defaults of the time: informed from the first step, random hints
        return SelfGuidedMasking(**{"informed_start_epoch": 0, "hint_strategy": "random", **legacy})
    if masking == "random" or masking is None:
        return masking
    raise ValueError(f"{', '.join(sorted(legacy))} only apply to masking='self_guided', got masking={masking!r}.")


@keras.saving.register_keras_serializable(package="keras_lcmae")
class MAE(ReconstructionModel):
    """Masked Autoencoder (He et al., 2022).

    The encoder sees only the visible patches; the decoder fills the removed
    ones with a shared mask token and predicts their pixels; the loss is the
    per-patch MSE on the removed patches (normalised targets by default).

    Args:
        encoder: a :class:`ViTEncoder` (or a preset name).
        decoder: a decoder from ``keras_lcmae.decoders``; the MAE default
            ``TransformerDecoder(512, depth=8, heads=16)`` when omitted. Its
            geometry is set from the encoder.
        mask_ratio: fraction of patches removed per image (0.75).
        norm_pix_loss: reconstruct per-patch normalised pixels (official
            default for the reported results).
        seed: seed of the masking noise.
        masking: the masking strategy: :class:`keras_lcmae.masking.RandomMasking`
            (official MAE; ``"random"``, the default) or
            :class:`keras_lcmae.masking.SelfGuidedMasking` (Self-guided MAE,
            Shin et al. 2024; ``"self_guided"`` gives its defaults). Explicit
            ``noise`` always gives official random masking.

    Calling the model returns a dict: ``pred`` ``(B, N, p*p*C)``, ``mask``
    ``(B, N)`` (1 = removed), ``ids_restore`` ``(B, N)``, ``latent``
    ``(B, 1+K, D)``. Pass ``noise`` ``(B, N)`` to fix the mask.

    Example:
    >>> import numpy as np
    >>> from keras_lcmae import TransformerDecoder, ViTEncoder
    >>> mae = MAE(ViTEncoder.from_preset("vit_test"),
    ...           TransformerDecoder(hidden_dim=32, depth=1, num_heads=2))
    >>> out = mae(np.zeros((2, 32, 32, 3), "float32"))
    >>> tuple(out["pred"].shape), tuple(out["latent"].shape)   # 16 patches of 8x8x3; [CLS] + 4 visible
    ((2, 16, 192), (2, 5, 32))
    >>> mae.compile(optimizer=keras.optimizers.AdamW(1e-3))
    >>> history = mae.fit(np.random.rand(8, 32, 32, 3), batch_size=4, verbose=0)
    >>> sorted(history.history)
    ['loss', 'loss_mae']
    """

    def __init__(
        self, encoder, decoder=None, mask_ratio=0.75, norm_pix_loss=True, seed=None, masking="random", **kwargs
    ):
        kwargs.setdefault("name", "mae")
        masking = get_masking(masking_from_legacy(masking, kwargs))
        encoder = as_encoder(encoder)
        super().__init__(encoder, decoder, encoder.patch_dim, norm_pix_loss=norm_pix_loss, **kwargs)
        num_visible(self.encoder.num_patches, mask_ratio)
        self.mask_ratio = float(mask_ratio)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        masking.build(self)
        self.masking = masking
        self.built = True

    @property
    def informed_active(self):
        """The self-guided masking's on/off variable (``None`` for random masking)."""
        return getattr(self.masking, "informed_active", None)

    def fit(self, *args, callbacks=None, **kwargs):
        """As ``keras.Model.fit``. With :class:`~keras_lcmae.masking.SelfGuidedMasking`
        an :class:`~keras_lcmae.callbacks.InformedMaskingSchedule` is added
        when ``callbacks`` holds none, so informed masks start at the
        strategy's epoch (its default start needs the run's ``epochs``)."""
        if isinstance(self.masking, SelfGuidedMasking):
            from keras_lcmae.callbacks import InformedMaskingSchedule

            callbacks = list(callbacks or [])
            if not any(isinstance(c, InformedMaskingSchedule) for c in callbacks):
                callbacks.insert(0, InformedMaskingSchedule())  # before the callbacks that read it
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def apply_masking(self, x, noise=None, guide_tokens=None, views=1):
        """Masks tokens ``x`` ``(B, N, D)`` with the model's strategy (official
        :func:`~keras_lcmae.masking.random_masking` whenever ``noise`` is
        given); returns its dict (``x_masked``, ``mask``, ``ids_restore``,
        ``ids_keep``, ``ids_masked``)."""
        return self.masking(self, x, noise=noise, guide_tokens=guide_tokens, views=views)

    def forward_encoder(self, images, noise=None, training=None):
        """Returns ``latent (B, 1+K, D)``, ``mask (B, N)``, ``ids_restore (B, N)``."""
        x = self.encoder.embed(images)
        masked = self.apply_masking(x, noise)
        latent = self.encoder.forward_tokens(masked["x_masked"], training=training)
        return latent, masked["mask"], masked["ids_restore"]

    def forward_loss(self, images, pred, mask):
        return reconstruction_loss(pred, patchify(images, self.encoder.patch_size), mask, self.norm_pix_loss)

    def reconstruct(self, images, noise=None):
        """Images rebuilt from the visible patches plus the predictions (the
        usual MAE picture): ``(reconstruction, mask_as_image)``. Predicted
        patches are un-normalised with the true patch statistics when the
        model predicts normalised pixels."""
        out = self(images, noise=noise, training=False)
        b = ops.shape(images)[0]  # LC-MAE returns two views: show the first
        target = ops.cast(patchify(images, self.encoder.patch_size), "float32")
        pred = ops.cast(out["pred"][:b], "float32")
        if self.norm_pix_loss:
            mean, std = patch_stats(target)
            pred = pred * std + mean
        m = ops.expand_dims(out["mask"][:b], -1)
        mixed = target * (1 - m) + pred * m
        grid = self.encoder.grid_size
        p = self.encoder.patch_size
        return unpatchify(mixed, p, grid), unpatchify(ops.broadcast_to(m, ops.shape(target)), p, grid)

    def get_config(self):
        config = super().get_config()
        config.update(
            mask_ratio=self.mask_ratio,
            seed=self.seed,
            masking=keras.saving.serialize_keras_object(self.masking),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["masking"] = masking_from_legacy(config.get("masking", "random"), config, warn=False)
        return super().from_config(config)
