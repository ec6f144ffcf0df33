"""Per-layer attention weights and features of MAE / LC-MAE models.

These helpers re-run the model's own stages (``encoder.embed``,
``encoder.forward_tokens``, ``model.forward_encoder`` and the decoder's
sub-layers) in inference mode and keep what the analysis needs; the tests
check that they reproduce the model's normal forward pass.

Conventions:

* **Encoder** analyses run the encoder on **all** patches by default (mask
  ratio 0, the way a finetuned encoder sees images and the way the paper
  measures attention distance). Pass ``ids_keep`` ``(B, K)`` to run it on a
  subset of patches instead (a pretraining-style visible set); the returned
  ``positions`` then hold each token's true patch index.
* **Decoder** analyses run the whole MAE under a given ``noise`` ``(B, N)``
  (the same convention as ``MAE.call``); :func:`shared_noise` gives one
  mask for all images (LC-MAE Eq. 7 needs that).
* Features of layer ``l`` are the residual stream after block ``l`` (patch
  tokens only, ``[CLS]`` dropped, before the final LayerNorm).
"""

import numpy as np
from keras import ops

from keras_lcmae.decoders import TransformerDecoder
from keras_lcmae.encoder import find_encoder
from keras_lcmae.ops import take_tokens


def shared_noise(num_images, num_patches, seed=0):
    """``(B, N)`` float32 masking noise with the **same** row for every image,
    so ``random_masking`` removes the same positions everywhere."""
    row = np.random.default_rng(seed).random(num_patches).astype("float32")
    return np.tile(row[None], (num_images, 1))


def encoder_layers(model, images, ids_keep=None):
    """Runs the encoder of ``model`` (a :class:`ViTEncoder`, or a model with
    one as ``.encoder``) block by block.

    Args:
        model: encoder or MAE / LC-MAE model.
        images: ``(B, H, W, C)`` normalised images.
        ids_keep: optional ``(B, K)`` patch indices to encode (all patches
            when omitted).

    Returns a dict: ``attention``, a list (one per block) of ``(B, H, 1+K,
    1+K)`` numpy arrays; ``features``, a list of ``(B, K, D)`` block outputs
    (patch tokens); ``output`` ``(B, 1+K, D)``, the encoder's result (after
    the final norm, equal to ``encoder.forward_tokens``); ``positions``
    ``(B, K)`` patch index of each token.

    Example:
    >>> from keras_lcmae import ViTEncoder
    >>> enc = ViTEncoder.from_preset("vit_test")
    >>> out = encoder_layers(enc, np.zeros((2, 32, 32, 3), "float32"))
    >>> len(out["attention"]), out["attention"][0].shape
    (2, (2, 2, 17, 17))
    """
    encoder = find_encoder(model, "The analysis")
    x = encoder.embed(ops.convert_to_tensor(np.asarray(images, "float32")))
    b = x.shape[0]
    if ids_keep is None:
        positions = np.tile(np.arange(encoder.num_patches)[None], (b, 1))
    else:
        positions = np.asarray(ops.convert_to_numpy(ids_keep)).astype("int32")
        x = take_tokens(x, ops.convert_to_tensor(positions))
    out = encoder.forward_intermediates(x, indices=range(encoder.depth), training=False, return_attention=True)
    attention = [np.asarray(ops.convert_to_numpy(a)) for a in out["attention"]]
    features = [np.asarray(ops.convert_to_numpy(f[:, 1:])) for f in out["intermediates"]]
    x = out["output"]
    return {
        "attention": attention,
        "features": features,
        "output": np.asarray(ops.convert_to_numpy(x)),
        "positions": positions,
    }


def decoder_layers(model, images, noise):
    """Runs an MAE / LC-MAE model (one view) under ``noise`` and returns the
    decoder's per-layer attention and features.

    Args:
        model: an ``MAE`` or ``LCMAE`` with a :class:`TransformerDecoder`.
        images: ``(B, H, W, C)`` normalised images.
        noise: ``(B, N)`` masking noise (see :func:`shared_noise`).

    Returns a dict of numpy arrays: ``attention`` (list of ``(B, heads,
    1+N, 1+N)``, tokens in patch order after unshuffling, ``[CLS]`` first),
    ``features`` (list of ``(B, N, W)`` block outputs), ``pred`` ``(B, N,
    p*p*C)`` (equal to the model's ``pred``), ``mask`` ``(B, N)`` (1 =
    removed) and ``ids_restore``.

    Example:
    >>> from keras_lcmae import MAE, ViTEncoder
    >>> mae = MAE(ViTEncoder.from_preset("vit_test"), TransformerDecoder(hidden_dim=32, depth=1, num_heads=2))
    >>> out = decoder_layers(mae, np.zeros((2, 32, 32, 3), "float32"), shared_noise(2, 16))
    >>> out["attention"][0].shape, out["features"][0].shape, out["pred"].shape
    ((2, 2, 17, 17), (2, 16, 32), (2, 16, 192))
    >>> out["mask"].sum(axis=1).tolist(), bool((out["mask"][0] == out["mask"][1]).all())   # 12 removed, same mask
    ([12.0, 12.0], True)
    """
    decoder = getattr(model, "decoder", None)
    if not hasattr(model, "forward_encoder") or decoder is None:
        raise ValueError(
            f"Decoder analyses need a whole MAE/LC-MAE model (a .keras file from model.save or the "
            f"recipe's checkpoints/epoch_NNN.keras), got a {type(model).__name__}; an encoder.keras "
            "only supports the encoder analyses."
        )
    if not isinstance(decoder, TransformerDecoder):
        raise ValueError(
            f"Decoder attention needs a TransformerDecoder; this model's decoder is a "
            f"{type(decoder).__name__}, which has no attention layers."
        )
    images = ops.convert_to_tensor(np.asarray(images, "float32"))
    noise = ops.convert_to_tensor(np.asarray(noise, "float32"))
    latent, mask, ids_restore = model.forward_encoder(images, noise, training=False)
    x = decoder.decoder_embed(latent)
    x = decoder.unshuffle(x, decoder.mask_token, ids_restore)
    x = x + ops.cast(decoder.decoder_pos_embed, x.dtype)
    attention, features = [], []
    for block in decoder.blocks:
        x, attn = block(x, training=False, return_attention=True)
        attention.append(np.asarray(ops.convert_to_numpy(attn)))
        features.append(np.asarray(ops.convert_to_numpy(x[:, 1:])))
    pred = decoder.decoder_pred(decoder.decoder_norm(x)[:, 1:])
    return {
        "attention": attention,
        "features": features,
        "pred": np.asarray(ops.convert_to_numpy(pred)),
        "mask": np.asarray(ops.convert_to_numpy(mask)),
        "ids_restore": np.asarray(ops.convert_to_numpy(ids_restore)),
    }


def reference_features(model, images):
    """Per-patch features of a reference model (the role DINO plays in Eq. 8)
    and their grid: ``((B, n, D) numpy, (rows, cols))``.

    * a :class:`ViTEncoder` (or a model with one as ``.encoder``): its output
      tokens on all patches, ``[CLS]`` dropped;
    * any other Keras model: a ``(B, h, w, D)`` output is a feature map on an
      ``h x w`` grid; a ``(B, T, D)`` output is ``T`` tokens on a square grid,
      or ``[CLS]`` + a square grid when ``T - 1`` is a square.

    Images are fed as they are (same normalisation as the analysed model); a
    reference built for another image size or channel count raises its own
    shape error (see the tool's message).
    """
    try:
        encoder = find_encoder(model, "The analysis")
    except ValueError:
        encoder = None
    if encoder is not None:
        out = encoder(ops.convert_to_tensor(np.asarray(images, "float32")), training=False)
        return np.asarray(ops.convert_to_numpy(out))[:, 1:], encoder.grid_size
    out = model(ops.convert_to_tensor(np.asarray(images, "float32")), training=False)
    if isinstance(out, dict):
        raise ValueError(
            f"The reference model returns a dict ({sorted(out)}); pass a model whose output is a "
            "(B, h, w, D) feature map or (B, T, D) tokens."
        )
    out = np.asarray(ops.convert_to_numpy(out))
    if out.ndim == 4:
        return out.reshape(out.shape[0], -1, out.shape[-1]), (out.shape[1], out.shape[2])
    if out.ndim == 3:
        t = out.shape[1]
        for drop in (0, 1):
            side = int(round(np.sqrt(t - drop)))
            if side * side == t - drop and side > 0:
                return out[:, drop:], (side, side)
    raise ValueError(
        f"Cannot read per-patch features from a reference output of shape {out.shape}: expected "
        "(B, h, w, D) or (B, T, D) with T (or T - 1, after a [CLS]) a square number of patches."
    )
