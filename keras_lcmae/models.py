"""MAE and its variants as self-training Keras models.

The training objective lives in ``compute_loss``, the one code path Keras runs
on TensorFlow, JAX and PyTorch, so ``model.compile(optimizer)`` then
``model.fit(images)`` is all a user needs. The dataset may yield images,
``(images, labels)`` (labels are ignored) or ``{"images": ..., "noise": ...}``.
"""

import keras
from keras import ops

from keras_lcmae.decoders import TransformerDecoder
from keras_lcmae.encoder import ViTEncoder
from keras_lcmae.losses import reconstruction_loss
from keras_lcmae.masking import num_visible, random_masking
from keras_lcmae.ops import patchify, unpatchify


def _as_layer(obj, default_cls):
    if isinstance(obj, dict):
        return keras.saving.deserialize_keras_object(obj)
    if isinstance(obj, str):
        return default_cls.from_preset(obj)
    return obj


def unpack_inputs(inputs, noise=None):
    """Images and optional noise from what ``fit`` or a user passes."""
    if isinstance(inputs, dict):
        if "images" not in inputs:
            raise ValueError(
                f"A dict input needs an 'images' entry (and optionally 'noise'); got keys {sorted(inputs)}."
            )
        return inputs["images"], inputs.get("noise", noise)
    if isinstance(inputs, (list, tuple)):
        return inputs[0], noise
    return inputs, noise


@keras.saving.register_keras_serializable(package="keras_lcmae")
class MAE(keras.Model):
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

    Calling the model returns a dict: ``pred`` ``(B, N, p*p*C)``, ``mask``
    ``(B, N)`` (1 = removed), ``ids_restore`` ``(B, N)``, ``latent``
    ``(B, 1+K, D)``. Pass ``noise`` ``(B, N)`` to fix the mask.

    Example:
    >>> mae = MAE(ViTEncoder.from_preset("vit_test"),
    ...           TransformerDecoder(hidden_dim=32, depth=1, num_heads=2))
    >>> mae.compile(optimizer=keras.optimizers.AdamW(1e-3))
    >>> history = mae.fit(np.random.rand(8, 32, 32, 3), batch_size=4, verbose=0)
    >>> "loss_mae" in history.history
    True
    """

    def __init__(self, encoder, decoder=None, mask_ratio=0.75, norm_pix_loss=True, seed=None, **kwargs):
        kwargs.setdefault("name", "mae")
        super().__init__(**kwargs)
        self.encoder = _as_layer(encoder, ViTEncoder)
        if not isinstance(self.encoder, ViTEncoder):
            raise ValueError(f"`encoder` must be a ViTEncoder or a preset name, got {type(encoder).__name__}.")
        decoder = _as_layer(decoder, TransformerDecoder) if decoder is not None else TransformerDecoder()
        decoder.configure(self.encoder.grid_size, self.encoder.hidden_dim, self.decoder_output_dim())
        self.decoder = decoder
        num_visible(self.encoder.num_patches, mask_ratio)
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_mae_tracker = keras.metrics.Mean(name="loss_mae")
        self.built = True

    def decoder_output_dim(self):
        """Values predicted per token: one patch, ``p*p*C``."""
        return self.encoder.patch_dim

    # -- the official MAE stages -------------------------------------------------
    def random_masking(self, x, noise=None):
        return random_masking(x, self.mask_ratio, noise=noise, seed=self.seed_generator)

    def forward_encoder(self, images, noise=None, training=None):
        """Returns ``latent (B, 1+K, D)``, ``mask (B, N)``, ``ids_restore (B, N)``."""
        x = self.encoder.embed(images)
        masked = self.random_masking(x, noise)
        latent = self.encoder.forward_tokens(masked["x_masked"], training=training)
        return latent, masked["mask"], masked["ids_restore"]

    def forward_decoder(self, latent, ids_restore, training=None):
        """Returns the decoder dict: ``pred (B, N, P)`` and ``hidden``."""
        return self.decoder(latent, ids_restore, training=training)

    def forward_loss(self, images, pred, mask):
        return reconstruction_loss(pred, patchify(images, self.encoder.patch_size), mask, self.norm_pix_loss)

    def call(self, inputs, noise=None, training=None):
        images, noise = unpack_inputs(inputs, noise)
        latent, mask, ids_restore = self.forward_encoder(images, noise, training=training)
        decoded = self.forward_decoder(latent, ids_restore, training=training)
        return {"pred": decoded["pred"], "mask": mask, "ids_restore": ids_restore, "latent": latent}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        images, _ = unpack_inputs(x)
        loss = self.forward_loss(images, y_pred["pred"], y_pred["mask"])
        self.loss_mae_tracker.update_state(loss)
        return self._add_regularization(loss)

    def _add_regularization(self, loss):
        if self.losses:
            loss = loss + ops.sum(ops.stack([ops.cast(l, "float32") for l in self.losses]))
        return loss

    def reconstruct(self, images, noise=None):
        """Images rebuilt from the visible patches plus the predictions (the
        usual MAE picture): ``(reconstruction, mask_as_image)``. Predicted
        patches are un-normalised with the true patch statistics when the
        model predicts normalised pixels."""
        out = self(images, noise=noise, training=False)
        target = ops.cast(patchify(images, self.encoder.patch_size), "float32")
        pred = ops.cast(out["pred"], "float32")
        if self.norm_pix_loss:
            mean = ops.mean(target, axis=-1, keepdims=True)
            std = ops.sqrt(ops.sum(ops.square(target - mean), -1, keepdims=True) / (target.shape[-1] - 1) + 1e-6)
            pred = pred * std + mean
        m = ops.expand_dims(out["mask"], -1)
        mixed = target * (1 - m) + pred * m
        grid = self.encoder.grid_size
        p = self.encoder.patch_size
        return unpatchify(mixed, p, grid), unpatchify(ops.broadcast_to(m, ops.shape(target)), p, grid)

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            decoder=keras.saving.serialize_keras_object(self.decoder),
            mask_ratio=self.mask_ratio,
            norm_pix_loss=self.norm_pix_loss,
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("encoder", "decoder"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
