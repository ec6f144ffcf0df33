"""AE(k), the no-masking baseline of the LC-MAE paper (Sec. 4.2, Table 3,
Fig. 7): every token predicts the k x k pixel block around its patch."""

import keras
import numpy as np
from keras import ops

from keras_lcmae.losses import block_reconstruction_loss, block_stats
from keras_lcmae.models.base import ReconstructionModel, as_encoder
from keras_lcmae.ops import identity_ids, unpatchify


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
class AutoEncoder(ReconstructionModel):
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

    >>> from keras_lcmae import TransformerDecoder, ViTEncoder
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
        encoder = as_encoder(encoder)
        p = encoder.patch_size
        k = p if block_size is None else block_size
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < p or (k - p) % 2:
            raise ValueError(
                f"block_size must be an integer >= patch_size={p} with block_size - patch_size even "
                f"(so the block is centred on its patch), got {block_size!r}; e.g. block_size={3 * p}."
            )
        k = int(k)
        super().__init__(encoder, decoder, k * k * encoder.num_channels, norm_pix_loss=norm_pix_loss, **kwargs)
        self.block_size = k
        self._indices, self._valid = block_indices(encoder.image_size, p, k)
        self.built = True

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
        ids = identity_ids(x)
        return latent, ops.ones_like(ids, dtype="float32"), ids

    def forward_loss(self, images, pred, mask=None):
        """The block loss; ``mask`` is ignored (every token is a target), so
        the shared ``compute_loss`` serves unchanged."""
        targets, valid = self.block_targets(images)
        return block_reconstruction_loss(pred, targets, valid, self.norm_pix_loss)

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
        config.update(block_size=self.block_size)
        return config
