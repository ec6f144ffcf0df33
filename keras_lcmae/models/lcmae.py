"""LC-MAE (Yue et al., 2023): MAE on two masks of each image with a
projector and two local contrastive losses."""

import keras
from keras import ops

from keras_lcmae.losses import contrastive_terms, normalize_patches, reconstruction_loss
from keras_lcmae.models.base import unpack_inputs
from keras_lcmae.models.mae import MAE
from keras_lcmae.ops import patchify, take_tokens

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
            raise ValueError(f"Unknown LC-MAE setting {loss_weights!r}; choose one of a-g (Table 1 of the paper).")
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
        masking: as :class:`MAE`; with :class:`~keras_lcmae.masking.SelfGuidedMasking`
            the partition is computed once per image and both views mask the
            **same** cluster first, with independent noise (their hints, the
            order inside each level and so the masks differ).
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

    >>> import numpy as np
    >>> from keras_lcmae import TransformerDecoder, ViTEncoder
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
        **kwargs,
    ):
        kwargs.setdefault("name", "lcmae")
        super().__init__(
            encoder, decoder, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, seed=seed, masking=masking, **kwargs
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
