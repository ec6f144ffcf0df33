"""MAE and its variants as self-training Keras models.

The training objective lives in ``compute_loss``, the one code path Keras runs
on TensorFlow, JAX and PyTorch, so ``model.compile(optimizer)`` then
``model.fit(images)`` is all a user needs. The dataset may yield images,
``(images, labels)`` (labels are ignored) or ``{"images": ..., "noise": ...}``.
"""

import inspect

import keras
import numpy as np
from keras import ops

from keras_lcmae.clustering import bipartition
from keras_lcmae.decoders import TransformerDecoder
from keras_lcmae.distribute import replica_uniform, scale_loss_for_replicas, step_logs
from keras_lcmae.encoder import ViTEncoder
from keras_lcmae.losses import (
    block_reconstruction_loss,
    block_stats,
    contrastive_terms,
    normalize_patches,
    patch_stats,
    reconstruction_loss,
)
from keras_lcmae.masking import informed_noise, num_hints, num_visible, random_masking
from keras_lcmae.ops import patchify, take_tokens, unpatchify
from keras_lcmae.optim import CompilesFromConfig, ReleasesGradients


def _as_layer(obj, default_cls):
    if isinstance(obj, dict):
        return keras.saving.deserialize_keras_object(obj)
    if isinstance(obj, str):
        return default_cls.from_preset(obj)
    return obj


def _is_whole(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer()


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
class MAE(ReleasesGradients, CompilesFromConfig, keras.Model):
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
        masking: ``"random"`` (official MAE, the default) or ``"self_guided"``
            (Self-guided MAE, Shin et al. 2024): from ``informed_start_epoch``
            on, each image's patches are bi-partitioned
            (:func:`keras_lcmae.clustering.bipartition`) on the model's own
            features of **all** patches, and cluster 1 is masked first, with
            ``hint_ratio`` of the masked budget given back as visible hints
            (:func:`keras_lcmae.masking.informed_noise`). Explicit ``noise``
            always gives official random masking.
        informed_start_epoch: first epoch (0-based) with informed masks;
            random masks before it. The switch is the non-trainable variable
            ``informed_active``, set at each epoch start by
            :class:`keras_lcmae.callbacks.InformedMaskingSchedule` (without that
            callback the variable keeps its initial value: 1 iff
            ``informed_start_epoch == 0``).
        hint_ratio: fraction of the masked patches given back as hints, in [0, 1).
        guide_layer: features guiding the partition: an encoder block index
            (``-1``, the default, is the last block; its output before the
            final norm) or ``"decoder"`` (the decoder's last hidden features
            with nothing masked). They are computed on all ``N`` patches in
            inference mode under ``stop_gradient``: one extra forward pass
            (encoder up to that block, or encoder + decoder) per step with no
            backward, about ``1/(1 - mask_ratio)`` times the cost of the
            visible-token encoder pass. ``masking="random"`` does none of it.

    Calling the model returns a dict: ``pred`` ``(B, N, p*p*C)``, ``mask``
    ``(B, N)`` (1 = removed), ``ids_restore`` ``(B, N)``, ``latent``
    ``(B, 1+K, D)``. Pass ``noise`` ``(B, N)`` to fix the mask.

    Example:
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

    MASKINGS = ("random", "self_guided")
    # compile()'s default: the official base lr (blr 1.5e-4, the lr at batch 256)
    DEFAULT_LEARNING_RATE = 1.5e-4

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

        >>> mae = MAE(ViTEncoder.from_preset("vit_test"))
        >>> mae.compile()
        >>> type(mae.optimizer).__name__, mae.optimizer.beta_2, mae.optimizer.weight_decay
        ('AdamW', 0.95, 0.05)
        >>> mae.compile(optimizer="sgd")
        >>> type(mae.optimizer).__name__
        'SGD'
        """
        if optimizer is None or (isinstance(optimizer, str) and optimizer == "auto"):
            from keras_lcmae.optim import adamw  # noqa: PLC0415

            optimizer = adamw(self, self.DEFAULT_LEARNING_RATE)
        super().compile(optimizer=optimizer, **kwargs)

    def __init__(self, encoder, decoder=None, mask_ratio=0.75, norm_pix_loss=True, seed=None, masking="random",
                 informed_start_epoch=0, hint_ratio=0.05, guide_layer=-1, **kwargs):
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
        self._configure_masking(masking, informed_start_epoch, hint_ratio, guide_layer)
        self.loss_mae_tracker = keras.metrics.Mean(name="loss_mae")
        self.built = True

    def _configure_masking(self, masking, informed_start_epoch, hint_ratio, guide_layer):
        if masking not in self.MASKINGS:
            raise ValueError(f"masking must be one of {self.MASKINGS}, got {masking!r}.")
        if not _is_whole(informed_start_epoch) or informed_start_epoch < 0:
            raise ValueError(
                f"informed_start_epoch must be an integer >= 0 (the first epoch with informed masks), "
                f"got {informed_start_epoch!r}."
            )
        num_hints(self.encoder.num_patches, self.mask_ratio, hint_ratio)  # validates hint_ratio
        depth = self.encoder.depth
        if guide_layer != "decoder" and (
            isinstance(guide_layer, bool) or not isinstance(guide_layer, int) or not -depth <= guide_layer < depth
        ):
            raise ValueError(
                f"guide_layer must be an encoder block index in [-{depth}, {depth}) (-1: last block) or "
                f"'decoder', got {guide_layer!r}."
            )
        self.masking = masking
        self.informed_start_epoch = int(informed_start_epoch)
        self.hint_ratio = float(hint_ratio)
        self.guide_layer = guide_layer
        self.informed_active = None
        if masking == "self_guided":
            self.informed_active = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(1.0 if self.informed_start_epoch == 0 else 0.0),
                trainable=False,
                name="informed_active",
            )

    def decoder_output_dim(self):
        """Values predicted per token: one patch, ``p*p*C``."""
        return self.encoder.patch_dim

    # -- the official MAE stages -------------------------------------------------
    def random_masking(self, x, noise=None):
        return random_masking(x, self.mask_ratio, noise=noise, seed=self.seed_generator)

    def guide_features(self, tokens):
        """Features of **all** patches that guide the informed mask,
        ``(B, N, F)``: ``tokens`` from ``encoder.embed`` through the encoder
        up to block ``guide_layer`` (or the whole encoder and the decoder with
        nothing masked when ``guide_layer="decoder"``), in inference mode,
        without gradient."""
        x = ops.stop_gradient(tokens)
        if self.guide_layer == "decoder":
            latent = self.encoder.forward_tokens(x, training=False)
            n = self.encoder.num_patches
            ids = ops.arange(n, dtype="int32")[None] + ops.zeros_like(x[:, :, 0], dtype="int32")
            features = self.decoder(latent, ids, training=False)["hidden"]
        else:
            enc = self.encoder
            cls = ops.cast(enc.cls_token + enc.pos_embed[:, :1, :], x.dtype)
            x = ops.concatenate([ops.broadcast_to(cls, (ops.shape(x)[0], 1, enc.hidden_dim)), x], axis=1)
            for block in enc.blocks[: self.guide_layer % enc.depth + 1]:
                x = block(x, training=False)
            features = x[:, 1:]
        return ops.stop_gradient(features)

    def apply_masking(self, x, noise=None, guide_tokens=None, views=1):
        """The model's masking of tokens ``x`` ``(B, N, D)``: official
        :func:`random_masking` when ``masking="random"`` or ``noise`` is given;
        otherwise self-guided informed masking blended by ``informed_active``
        (0: exactly the random mask of the same draw; 1: informed). For
        ``views > 1`` (LC-MAE) ``x`` stacks ``views`` copies of
        ``guide_tokens`` on the batch axis: the partition is computed once
        and shared, the noise is independent per row."""
        if self.masking == "random" or noise is not None:
            return self.random_masking(x, noise)
        u = replica_uniform(ops.shape(x)[:2], self.seed_generator)
        assignments = bipartition(self.guide_features(x if guide_tokens is None else guide_tokens))
        if views > 1:
            assignments = ops.concatenate([assignments] * views, axis=0)
        informed = informed_noise(assignments, self.mask_ratio, self.hint_ratio, noise=u)
        active = ops.greater(ops.convert_to_tensor(self.informed_active), 0.5)
        return random_masking(x, self.mask_ratio, noise=ops.where(active, informed, u))

    def forward_encoder(self, images, noise=None, training=None):
        """Returns ``latent (B, 1+K, D)``, ``mask (B, N)``, ``ids_restore (B, N)``."""
        x = self.encoder.embed(images)
        masked = self.apply_masking(x, noise)
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
            encoder=keras.saving.serialize_keras_object(self.encoder),
            decoder=keras.saving.serialize_keras_object(self.decoder),
            mask_ratio=self.mask_ratio,
            norm_pix_loss=self.norm_pix_loss,
            seed=self.seed,
            masking=self.masking,
            informed_start_epoch=self.informed_start_epoch,
            hint_ratio=self.hint_ratio,
            guide_layer=self.guide_layer,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("encoder", "decoder"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


# Loss weights (w_mae, w_cross, w_in) of the settings (a)-(g) in Table 1 of the
# LC-MAE paper, with the finetuning accuracy it reports for each.
SETTINGS = {
    "a": (1.0, 1.0, 1.0),  # LC-MAE, all three losses: 83.0
    "b": (1.0, 0.0, 0.0),  # reconstruction only (MAE): 82.9
    "c": (0.0, 1.0, 0.0),  # cross-view only: collapses
    "d": (0.0, 0.0, 1.0),  # in-view only: 82.2
    "e": (1.0, 1.0, 0.0),  # 83.1
    "f": (1.0, 0.0, 1.0),  # 82.8
    "g": (0.0, 1.0, 1.0),  # contrastive only: 82.5
}


def resolve_loss_weights(loss_weights):
    """``{"mae", "cross", "in"}`` weights from a setting letter ``"a"``-``"g"``,
    a 3-sequence or a dict (missing entries default to 1)."""
    if loss_weights is None:
        loss_weights = "a"
    if isinstance(loss_weights, str):
        key = loss_weights.strip().lower().strip("()")
        if key not in SETTINGS:
            raise ValueError(
                f"Unknown LC-MAE setting {loss_weights!r}; choose one of a-g (Table 1 of the paper)."
            )
        loss_weights = SETTINGS[key]
    if isinstance(loss_weights, dict):
        unknown = set(loss_weights) - {"mae", "cross", "in"}
        if unknown:
            raise ValueError(f"loss_weights keys must be 'mae', 'cross', 'in'; got unknown {sorted(unknown)}.")
        weights = {k: float(loss_weights.get(k, 1.0)) for k in ("mae", "cross", "in")}
    else:
        values = list(loss_weights)
        if len(values) != 3:
            raise ValueError(f"loss_weights needs 3 values (mae, cross, in), got {loss_weights!r}.")
        weights = dict(zip(("mae", "cross", "in"), map(float, values)))
    if any(w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"loss_weights must be non-negative and not all zero, got {weights}.")
    return weights


@keras.saving.register_keras_serializable(package="keras_lcmae")
class LCMAE(MAE):
    """Local Contrastive MAE (Yue et al., 2023, Sec. 3.3).

    Each image is masked twice, independently; both views go through encoder
    and decoder in **one** batched pass (``2B`` rows: view 1 then view 2). A
    linear projector maps the decoder output to ``v = p(h(x, m))`` and the
    model trains on ``w_mae L_MAE + w_cross L_cross + w_in L_in``:

    * ``L_MAE``: the MAE reconstruction loss over both views;
    * ``L_cross`` (Eq. 5): ``1 - cos(v1_i, v2_i)`` at positions masked in both
      views;
    * ``L_in`` (Eq. 6): ``|cos(v_i, v_j) - cos(x_i, x_j)|`` over ordered pairs
      of masked positions of each view.

    Args:
        encoder, decoder, mask_ratio, norm_pix_loss, seed: as :class:`MAE`.
        masking, informed_start_epoch, hint_ratio, guide_layer: as
            :class:`MAE`; with ``"self_guided"`` the partition is computed once
            per image and both views mask the **same** cluster first, with
            independent noise (their hints, the order inside each level and
            so the masks differ).
        projector_dim: output width of the projector (paper: 1024).
        loss_weights: a setting of Table 1 (``"a"``-``"g"``; ``"a"`` = all
            three losses, the default), or ``(w_mae, w_cross, w_in)``, or a dict.
        projector_input: ``"pred"`` (default) projects the decoder's per-patch
            prediction ``h(x, m)`` exactly as the paper writes ``v = p(h(x, m))``;
            ``"hidden"`` projects the decoder's last hidden features instead.
        in_view_target: ``"pixels"`` (default) compares with the cosine of the
            input patches as fed to the network; ``"norm_pixels"`` normalises
            each patch first (cosine becomes Pearson correlation).

    Reports ``loss``, ``loss_mae``, ``loss_cross``, ``loss_in`` and ``v_std``
    (the collapse indicator: std of the l2-normalised projector outputs across
    tokens, about ``1/sqrt(projector_dim)`` when healthy, 0 when collapsed).

    Example:
    Training is as for :class:`MAE` (``compile``, then ``fit`` on images);
    here the forward pass and the loss terms one step computes:

    >>> model = LCMAE(ViTEncoder.from_preset("vit_test"),
    ...               TransformerDecoder(hidden_dim=32, depth=1, num_heads=2),
    ...               projector_dim=64, loss_weights="a")
    >>> x = np.random.rand(1, 32, 32, 3).astype("float32")
    >>> out = model(x)                  # two views of the image: row 0 and row 1
    >>> tuple(out["pred"].shape), tuple(out["features"].shape)   # features at the 12 masked positions
    ((2, 16, 192), (2, 12, 192))
    >>> terms = model.lcmae_losses(x, out)
    >>> sorted(terms)                   # fit reports them as loss_mae, loss_cross, loss_in, v_std
    ['cross', 'in', 'mae', 'v_std']
    """

    PROJECTOR_INPUTS = ("pred", "hidden")
    IN_VIEW_TARGETS = ("pixels", "norm_pixels")

    def __init__(
        self,
        encoder,
        decoder=None,
        projector_dim=1024,
        loss_weights="a",
        projector_input="pred",
        in_view_target="pixels",
        mask_ratio=0.75,
        norm_pix_loss=True,
        seed=None,
        masking="random",
        informed_start_epoch=0,
        hint_ratio=0.05,
        guide_layer=-1,
        **kwargs,
    ):
        kwargs.setdefault("name", "lcmae")
        super().__init__(
            encoder, decoder, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, seed=seed, masking=masking,
            informed_start_epoch=informed_start_epoch, hint_ratio=hint_ratio, guide_layer=guide_layer, **kwargs,
        )
        if projector_input not in self.PROJECTOR_INPUTS:
            raise ValueError(f"projector_input must be one of {self.PROJECTOR_INPUTS}, got {projector_input!r}.")
        if in_view_target not in self.IN_VIEW_TARGETS:
            raise ValueError(f"in_view_target must be one of {self.IN_VIEW_TARGETS}, got {in_view_target!r}.")
        if int(projector_dim) < 1:
            raise ValueError(f"projector_dim must be a positive integer, got {projector_dim!r}.")
        self.projector_dim = int(projector_dim)
        self.loss_weights = resolve_loss_weights(loss_weights)
        self.projector_input = projector_input
        self.in_view_target = in_view_target
        self.projector = keras.layers.Dense(self.projector_dim, name="projector")
        in_dim = self.decoder_output_dim() if projector_input == "pred" else self.decoder.hidden_dim
        self.projector.build((None, None, in_dim))
        self.loss_cross_tracker = keras.metrics.Mean(name="loss_cross")
        self.loss_in_tracker = keras.metrics.Mean(name="loss_in")
        self.v_std_tracker = keras.metrics.Mean(name="v_std")

    @staticmethod
    def _two_view_noise(noise, batch):
        if noise is None:
            return None
        if isinstance(noise, (list, tuple)):
            if len(noise) != 2:
                raise ValueError("noise for LCMAE is a pair (noise_view1, noise_view2) or a (2B, N) array.")
            return ops.concatenate([ops.convert_to_tensor(n) for n in noise], axis=0)
        if len(noise.shape) == 3:  # (B, 2, N): per sample, safe to split across replicas
            if noise.shape[1] != 2:
                raise ValueError(f"per-sample LCMAE noise must be (B, 2, N), got {tuple(noise.shape)}.")
            return ops.concatenate([noise[:, 0], noise[:, 1]], axis=0)
        if batch is not None and noise.shape[0] is not None and noise.shape[0] != 2 * batch:
            raise ValueError(
                f"LCMAE needs noise for two views: shape (2*{batch}, N), (B, 2, N) or a pair of (B, N); "
                f"got {tuple(noise.shape)}."
            )
        return noise

    def call(self, inputs, noise=None, training=None):
        """Returns the two views stacked on the batch axis (rows ``[:B]`` view 1,
        ``[B:]`` view 2): ``pred``, ``mask``, ``ids_restore``, ``latent``,
        ``ids_masked`` ``(2B, M)`` (the ``M = N - K`` masked positions, the only
        ones the contrastive losses read) and ``features`` ``(2B, M, F)``, the
        projector inputs there. ``model.project(out["features"])`` gives
        ``v``; :meth:`project_all` gives ``v`` at every position."""
        masked, latent, decoded, features = self._forward_views(inputs, noise, training)
        return {
            "pred": decoded["pred"],
            "mask": masked["mask"],
            "ids_restore": masked["ids_restore"],
            "latent": latent,
            "ids_masked": masked["ids_masked"],
            "features": take_tokens(features, masked["ids_masked"]),
        }

    def _forward_views(self, inputs, noise, training):
        images, noise = unpack_inputs(inputs, noise)
        noise = self._two_view_noise(noise, images.shape[0])
        tokens = self.encoder.embed(images)  # patch embedding once for both views
        masked = self.apply_masking(ops.concatenate([tokens, tokens], axis=0), noise, guide_tokens=tokens, views=2)
        latent = self.encoder.forward_tokens(masked["x_masked"], training=training)
        decoded = self.forward_decoder(latent, masked["ids_restore"], training=training)
        features = decoded["pred"] if self.projector_input == "pred" else decoded["hidden"]
        return masked, latent, decoded, features

    def project(self, features):
        """The projector ``p``: ``v = p(features)``."""
        return self.projector(features)

    def project_all(self, images, noise=None):
        """Projector outputs at **every** position of both views,
        ``(2B, N, projector_dim)``, and the two views' ``mask`` ``(2B, N)``."""
        masked, _, _, features = self._forward_views(images, noise, training=False)
        return self.projector(features), masked["mask"]

    def lcmae_losses(self, images, outputs):
        """The three loss terms and the collapse indicator (``v_std``) for the
        ``outputs`` of :meth:`call` on ``images``.

        The contrastive terms come from :func:`keras_lcmae.losses.contrastive_terms`
        on the masked tokens; when the projector widens its input (the default:
        ``p*p*C`` or the decoder width into 1024), its outputs are never
        materialised and the cosines are computed through ``W W^T``. The values
        equal Eq. 5 and Eq. 6 on the full ``(2B, N, d)`` outputs.
        """
        patches = patchify(images, self.encoder.patch_size)
        patches2 = ops.concatenate([patches, patches], axis=0)
        mask, ids_masked = outputs["mask"], outputs["ids_masked"]
        l_mae = reconstruction_loss(outputs["pred"], patches2, mask, self.norm_pix_loss)
        x = normalize_patches(patches2) if self.in_view_target == "norm_pixels" else patches2
        features = outputs["features"]
        num_visible_ = mask.shape[1] - ids_masked.shape[1]
        if features.shape[-1] + 1 < self.projector_dim:
            kernel, bias = self.projector.kernel, self.projector.bias
        else:
            features, kernel, bias = self.projector(features), None, None
        terms = contrastive_terms(
            features, take_tokens(x, ids_masked), ids_masked, outputs["ids_restore"], num_visible_, kernel, bias
        )
        terms["mae"] = l_mae
        return terms

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        images, _ = unpack_inputs(x)
        terms = self.lcmae_losses(images, y_pred)
        w = self.loss_weights
        total = w["mae"] * terms["mae"] + w["cross"] * terms["cross"] + w["in"] * terms["in"]
        self.loss_mae_tracker.update_state(terms["mae"])
        self.loss_cross_tracker.update_state(terms["cross"])
        self.loss_in_tracker.update_state(terms["in"])
        self.v_std_tracker.update_state(terms["v_std"])
        return self._finalize_loss(total)

    def reconstruct(self, images, noise=None):
        """Reconstruction of view 1 (see :meth:`MAE.reconstruct`)."""
        if noise is not None:
            noise = (noise, noise)
        return super().reconstruct(images, noise=noise)

    def get_config(self):
        config = super().get_config()
        config.update(
            projector_dim=self.projector_dim,
            loss_weights=dict(self.loss_weights),
            projector_input=self.projector_input,
            in_view_target=self.in_view_target,
        )
        return config


# -- AutoEncoder(k): the no-masking baseline of Sec. 4.2 (Table 3, Fig. 7) -------


def block_indices(image_size, patch_size, block_size):
    """Numpy constants of the AutoEncoder(k) targets.

    The image is padded by ``r = (k - p) / 2`` pixels on every side; token
    ``(i, j)`` reads the ``k x k`` block of the padded image whose top-left
    pixel is ``(i*p, j*p)``, i.e. the block centred on its patch.

    Returns:
        ``indices`` ``(N, k*k)`` int32 into the padded image flattened as
        ``(H + 2r) * (W + 2r)`` pixels (row-major), block pixels row-major;
        ``valid`` ``(N, k*k)`` float32, 1 where the pixel lies inside the
        original image, 0 in the padding.

    Example:
    >>> idx, valid = block_indices(32, 8, 16)
    >>> idx.shape, float(valid[0].sum()), float(valid[9].sum())
    ((16, 256), 144.0, 256.0)
    """
    h, w = (int(s) for s in (image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)))
    p, k = int(patch_size), int(block_size)
    r = (k - p) // 2
    rows, cols = h // p, w // p
    padded_w = w + 2 * r
    gi, gj = np.divmod(np.arange(rows * cols), cols)
    di, dj = np.divmod(np.arange(k * k), k)
    y = gi[:, None] * p + di[None, :]  # padded coordinates
    x = gj[:, None] * p + dj[None, :]
    indices = (y * padded_w + x).astype("int32")
    valid = ((y >= r) & (y < h + r) & (x >= r) & (x < w + r)).astype("float32")
    return indices, valid


@keras.saving.register_keras_serializable(package="keras_lcmae")
class AutoEncoder(MAE):
    """AE(k), the no-masking baseline of the LC-MAE paper (Sec. 4.2, Table 3,
    Fig. 7, Appendix A).

    There is no masking: the encoder sees **all** patches, the decoder (any of
    ``keras_lcmae.decoders``; it gets the identity ``ids_restore``, so no mask
    token is inserted) predicts for every token the ``k x k`` pixel block
    centred on that token's patch, ``k*k*C`` values laid out
    ``(row, col, channel)`` as :func:`keras_lcmae.ops.patchify`. ``AE(p)``
    (``block_size == patch_size``) is MAE without masking: its target is
    exactly MAE's target on every token.

    Border handling: the (normalised) image is zero-padded by
    ``r = (k - p) / 2`` pixels; padded pixels are excluded from the loss by a
    per-pixel validity mask. The loss is the squared error averaged over the
    valid pixels of all tokens of the batch; with ``norm_pix_loss`` each target
    block is normalised by the mean and unbiased variance of its valid pixels
    (eps 1e-6), which for ``k = p`` is MAE's per-patch normalisation. The block
    gather indices are a numpy constant built once (:func:`block_indices`) and
    applied with ``keras.ops.take``.

    Args:
        encoder: a :class:`ViTEncoder` (or a preset name).
        decoder: any decoder from ``keras_lcmae.decoders`` (default: MAE's
            ``TransformerDecoder``); its output width is set to ``k*k*C``.
        block_size: ``k``, the side of the predicted block in pixels;
            ``None`` means ``patch_size``. Needs ``k >= patch_size`` and
            ``k - patch_size`` even (so the block is centred).
        norm_pix_loss: normalise each target block (see above).

    Reports ``loss`` and ``loss_mae`` (the reconstruction loss, named as MAE's
    so logs compare). ``call`` returns ``pred`` ``(B, N, k*k*C)``, ``mask``
    ``(B, N)`` of **ones** (every token is a prediction target; nothing is
    hidden from the encoder), the identity ``ids_restore`` and ``latent``
    ``(B, 1+N, D)``; ``noise`` is accepted and ignored.

    Example:
    Training is as for :class:`MAE` (``compile``, then ``fit`` on images):

    >>> ae = AutoEncoder(ViTEncoder.from_preset("vit_test"),
    ...                  TransformerDecoder(hidden_dim=32, depth=1, num_heads=2),
    ...                  block_size=24)
    >>> x = np.random.rand(2, 32, 32, 3).astype("float32")
    >>> out = ae(x)
    >>> tuple(out["pred"].shape), float(keras.ops.min(out["mask"]))   # a 24x24x3 block per token; nothing masked
    ((2, 16, 1728), 1.0)
    >>> recon, _ = ae.reconstruct(x)
    >>> tuple(recon.shape)
    (2, 32, 32, 3)
    """

    def __init__(self, encoder, decoder=None, block_size=None, norm_pix_loss=True, **kwargs):
        kwargs.setdefault("name", "autoencoder")
        enc = _as_layer(encoder, ViTEncoder)
        if not isinstance(enc, ViTEncoder):
            raise ValueError(f"`encoder` must be a ViTEncoder or a preset name, got {type(encoder).__name__}.")
        p = enc.patch_size
        k = p if block_size is None else block_size
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < p or (k - p) % 2:
            raise ValueError(
                f"block_size must be an integer >= patch_size={p} with block_size - patch_size even "
                f"(so the block is centred on its patch), got {block_size!r}; e.g. block_size={3 * p}."
            )
        self._block_size = int(k)
        super().__init__(enc, decoder, norm_pix_loss=norm_pix_loss, **kwargs)
        self.block_size = int(k)
        self._indices, self._valid = block_indices(enc.image_size, p, self.block_size)

    def decoder_output_dim(self):
        """Values predicted per token: one ``k x k`` block, ``k*k*C``."""
        return self._block_size * self._block_size * self.encoder.num_channels

    @property
    def pad(self):
        """``r = (k - p) / 2``, the zero padding around the image."""
        return (self.block_size - self.encoder.patch_size) // 2

    def block_targets(self, images):
        """``(targets (B, N, k*k*C), valid (N, k*k*C))``: each token's ``k x k``
        block of the zero-padded image, and 1 where a value is a real pixel."""
        r, c = self.pad, self.encoder.num_channels
        x = ops.cast(images, "float32")
        x = ops.pad(x, [[0, 0], [r, r], [r, r], [0, 0]])
        x = ops.reshape(x, (-1, x.shape[1] * x.shape[2], c))
        n, kk = self._indices.shape
        blocks = ops.take(x, ops.convert_to_tensor(self._indices.reshape(-1)), axis=1)
        valid = np.repeat(self._valid, c, axis=1)
        return ops.reshape(blocks, (-1, n, kk * c)), ops.convert_to_tensor(valid)

    def forward_encoder(self, images, noise=None, training=None):
        """No masking: ``latent (B, 1+N, D)``, ``mask`` of ones, identity
        ``ids_restore``."""
        x = self.encoder.embed(images)
        latent = self.encoder.forward_tokens(x, training=training)
        n = self.encoder.num_patches
        ids = ops.arange(n, dtype="int32")[None] + ops.zeros_like(x[:, :, 0], dtype="int32")
        return latent, ops.ones_like(ids, dtype="float32"), ids

    def forward_loss(self, images, pred, mask=None):
        """The block loss; ``mask`` is ignored (every token is a target), so
        :meth:`MAE.compute_loss` serves unchanged."""
        targets, valid = self.block_targets(images)
        return block_reconstruction_loss(pred, targets, valid, self.norm_pix_loss)

    def call(self, inputs, noise=None, training=None):
        images, _ = unpack_inputs(inputs, noise)
        latent, mask, ids_restore = self.forward_encoder(images, training=training)
        decoded = self.forward_decoder(latent, ids_restore, training=training)
        return {"pred": decoded["pred"], "mask": mask, "ids_restore": ids_restore, "latent": latent}

    def reconstruct(self, images, noise=None):
        """``(reconstruction, ones)``: each patch is the centre ``p x p`` of its
        token's predicted block (un-normalised with the true block statistics
        when ``norm_pix_loss``); every pixel is predicted, so the mask image is
        all ones. ``noise`` is ignored."""
        pred = ops.cast(self(images, training=False)["pred"], "float32")
        if self.norm_pix_loss:
            targets, valid = self.block_targets(images)
            mean, std = block_stats(targets, valid)
            pred = pred * std + mean
        p, k, r, c = self.encoder.patch_size, self.block_size, self.pad, self.encoder.num_channels
        n = self.encoder.num_patches
        centre = ops.reshape(pred, (-1, n, k, k, c))[:, :, r : r + p, r : r + p, :]
        recon = unpatchify(ops.reshape(centre, (-1, n, p * p * c)), p, self.encoder.grid_size)
        return recon, ops.ones_like(recon)

    def get_config(self):
        config = super().get_config()
        own = set(inspect.signature(AutoEncoder.__init__).parameters)
        for key in set(inspect.signature(MAE.__init__).parameters) - own:
            config.pop(key, None)  # MAE's masking arguments do not apply
        config.update(block_size=self.block_size)
        return config
