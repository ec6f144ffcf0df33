"""Masking strategies.

``random_masking`` follows the official MAE exactly: per-sample noise
``~ U(0, 1)``, ``ids_shuffle = argsort(noise)``, the first
``int(N * (1 - mask_ratio))`` shuffled positions stay visible,
``ids_restore = argsort(ids_shuffle)`` and the binary mask is 1 where a patch
is removed. Passing the same ``noise`` as another implementation gives the
same mask.
"""

import keras
from keras import ops

from keras_lcmae.distribute import replica_uniform
from keras_lcmae.ops import take_tokens


def num_visible(num_patches, mask_ratio):
    """``int(N * (1 - mask_ratio))``, the official count of visible patches,
    with a clear error when the ratio is out of range or leaves no visible or
    no masked patch.

    Example:
    >>> num_visible(196, 0.75)
    49
    """
    try:
        ratio = float(mask_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"mask_ratio must be a number in (0, 1), got {mask_ratio!r}.") from None
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio!r}.")
    keep = int(num_patches * (1 - ratio))
    if keep < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches} "
            f"(int({num_patches} * (1 - {mask_ratio})) = 0); lower the ratio or use smaller patches."
        )
    if keep >= num_patches:
        raise ValueError(
            f"mask_ratio={mask_ratio} masks no patch out of {num_patches}; raise the ratio."
        )
    return keep


def random_masking(x, mask_ratio, noise=None, seed=None):
    """Per-sample random masking by argsort of uniform noise (official MAE).

    Args:
        x: ``(B, N, D)`` patch tokens.
        mask_ratio: fraction of patches to remove, in (0, 1).
        noise: optional ``(B, N)`` noise; the ``len_keep`` positions with the
            smallest noise stay visible. Drawn from ``U(0, 1)`` when omitted.
        seed: an int or ``keras.random.SeedGenerator`` used to draw noise.

    Returns:
        dict with ``x_masked`` ``(B, K, D)`` (visible tokens, in shuffled
        order), ``mask`` ``(B, N)`` float (1 = removed), ``ids_restore``
        ``(B, N)`` int32, ``ids_keep`` ``(B, K)`` int32 and ``ids_masked``
        ``(B, N - K)`` int32 (the removed positions, in shuffled order), where
        ``K = int(N * (1 - mask_ratio))``.

    Example:
    >>> x = keras.random.normal((2, 16, 8))
    >>> out = random_masking(x, 0.75, seed=0)
    >>> tuple(out["x_masked"].shape), tuple(out["mask"].shape)
    ((2, 4, 8), (2, 16))
    """
    n = x.shape[1]
    len_keep = num_visible(n, mask_ratio)
    if noise is None:
        noise = replica_uniform(ops.shape(x)[:2], seed)  # distinct per tf.distribute replica
    elif tuple(noise.shape[1:]) != (n,):
        raise ValueError(
            f"noise must have shape (batch, {n}) to mask {n} patches, got {tuple(noise.shape)}."
        )
    ids_shuffle = ops.cast(ops.argsort(noise, axis=1), "int32")
    ids_restore = ops.cast(ops.argsort(ids_shuffle, axis=1), "int32")
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = take_tokens(x, ids_keep)
    # Position i is kept iff its rank in the shuffle is < len_keep; this equals
    # the official "ones, zero the first len_keep, unshuffle" construction.
    mask = ops.cast(ops.greater_equal(ids_restore, len_keep), "float32")
    return {
        "x_masked": x_masked,
        "mask": mask,
        "ids_restore": ids_restore,
        "ids_keep": ids_keep,
        "ids_masked": ids_shuffle[:, len_keep:],
    }
