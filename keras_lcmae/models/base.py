"""What MAE, LC-MAE and AE(k) share: an encoder and a decoder trained from
``compute_loss`` to reconstruct pixels.

The training objective lives in ``compute_loss``, the one code path Keras runs
on TensorFlow, JAX and PyTorch, so ``model.compile()`` then
``model.fit(images)`` is all a user needs. The dataset may yield images,
``(images, labels)`` (labels are ignored) or ``{"images": ..., "noise": ...}``.
"""

import keras
from keras import ops

from keras_lcmae.decoders import TransformerDecoder
from keras_lcmae.distribute import scale_loss_for_replicas, step_logs
from keras_lcmae.encoder import ViTEncoder
from keras_lcmae.optim import CompilesFromConfig, ReleasesGradients, adamw


def as_encoder(encoder):
    """A :class:`ViTEncoder` from an encoder, a preset name or a serialized dict."""
    if isinstance(encoder, dict):
        encoder = keras.saving.deserialize_keras_object(encoder)
    elif isinstance(encoder, str):
        encoder = ViTEncoder.from_preset(encoder)
    if not isinstance(encoder, ViTEncoder):
        raise ValueError(f"`encoder` must be a ViTEncoder or a preset name, got {type(encoder).__name__}.")
    return encoder


def as_decoder(decoder):
    """A decoder from a decoder, ``None`` (MAE's default
    ``TransformerDecoder``) or a serialized dict."""
    if decoder is None:
        return TransformerDecoder()
    if isinstance(decoder, dict):
        return keras.saving.deserialize_keras_object(decoder)
    return decoder


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


class ReconstructionModel(ReleasesGradients, CompilesFromConfig, keras.Model):
    """An encoder, a decoder predicting ``output_dim`` values per token, and
    a reconstruction loss.

    Subclasses define :meth:`forward_encoder` (tokens the decoder sees, the
    mask and ``ids_restore``), :meth:`forward_loss` and their ``get_config``;
    this class holds the decoder geometry, ``call``, ``compute_loss`` with
    its ``loss_mae`` metric, the compile defaults and (de)serialisation of the
    encoder and decoder.

    Args:
        encoder: a :class:`ViTEncoder` (or a preset name).
        decoder: a decoder from ``keras_lcmae.decoders`` (``None``: MAE's
            ``TransformerDecoder(512, depth=8, heads=16)``). Its geometry is
            set from the encoder and ``output_dim``.
        output_dim: values predicted per token.
        norm_pix_loss: reconstruct normalised pixels.
    """

    # compile()'s default: the official base lr (blr 1.5e-4, the lr at batch 256)
    DEFAULT_LEARNING_RATE = 1.5e-4

    def __init__(self, encoder, decoder, output_dim, norm_pix_loss=True, **kwargs):
        super().__init__(**kwargs)
        self.encoder = as_encoder(encoder)
        decoder = as_decoder(decoder)
        decoder.configure(self.encoder.grid_size, self.encoder.hidden_dim, int(output_dim))
        self.decoder = decoder
        self._output_dim = int(output_dim)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.loss_mae_tracker = keras.metrics.Mean(name="loss_mae")

    def compile(self, optimizer="auto", **kwargs):
        """As ``keras.Model.compile``; the loss is the model's own (no
        ``loss`` to pass). ``optimizer="auto"`` (the default) or ``None``
        gives the pretraining recipe's optimizer: :func:`keras_lcmae.optim.adamw`
        (AdamW, betas 0.9/0.95, weight decay 0.05 on every parameter of rank
        >= 2, none on biases and norms) at a constant learning rate of
        ``DEFAULT_LEARNING_RATE`` (1.5e-4, the official base lr, i.e. its lr
        at batch 256; ``recipes/pretrain.py`` scales it by ``batch / 256``
        and adds warmup and cosine decay). Any other optimizer is used as
        given, e.g. ``adamw(model, WarmupCosine(...))``.

        >>> from keras_lcmae import MAE, ViTEncoder
        >>> mae = MAE(ViTEncoder.from_preset("vit_test"))
        >>> mae.compile()
        >>> type(mae.optimizer).__name__, mae.optimizer.beta_2, mae.optimizer.weight_decay
        ('AdamW', 0.95, 0.05)
        >>> mae.compile(optimizer="sgd")
        >>> type(mae.optimizer).__name__
        'SGD'
        """
        if optimizer is None or (isinstance(optimizer, str) and optimizer == "auto"):
            optimizer = adamw(self, self.DEFAULT_LEARNING_RATE)
        super().compile(optimizer=optimizer, **kwargs)

    def decoder_output_dim(self):
        """Values predicted per token."""
        return self._output_dim

    def forward_encoder(self, images, noise=None, training=None):
        """Returns ``latent (B, 1+K, D)``, ``mask (B, N)``, ``ids_restore (B, N)``."""
        raise NotImplementedError

    def forward_decoder(self, latent, ids_restore, training=None):
        """Returns the decoder dict: ``pred (B, N, P)`` and ``hidden``."""
        return self.decoder(latent, ids_restore, training=training)

    def forward_loss(self, images, pred, mask):
        raise NotImplementedError

    def call(self, inputs, noise=None, training=None):
        images, noise = unpack_inputs(inputs, noise)
        latent, mask, ids_restore = self.forward_encoder(images, noise, training=training)
        decoded = self.forward_decoder(latent, ids_restore, training=training)
        return {"pred": decoded["pred"], "mask": mask, "ids_restore": ids_restore, "latent": latent}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        images, _ = unpack_inputs(x)
        loss = self.forward_loss(images, y_pred["pred"], y_pred["mask"])
        self.loss_mae_tracker.update_state(loss)
        return self._finalize_loss(loss)

    def get_metrics_result(self):
        # (works around a Keras multi-worker reduction bug; see distribute.step_logs)
        return step_logs(super().get_metrics_result())

    def _finalize_loss(self, loss):
        """Adds layer regularisation losses and scales for ``tf.distribute``
        replicas (what Keras' default ``compute_loss`` does)."""
        if self.losses:
            loss = loss + ops.sum(ops.stack([ops.cast(l, "float32") for l in self.losses]))
        return scale_loss_for_replicas(loss)

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            decoder=keras.saving.serialize_keras_object(self.decoder),
            norm_pix_loss=self.norm_pix_loss,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("encoder", "decoder"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
