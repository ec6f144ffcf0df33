"""The training objectives, as pure ``keras.ops`` functions.

Shapes follow the official MAE: ``pred`` and ``target`` are ``(B, N, P)`` per
patch vectors, ``mask`` is ``(B, N)`` with 1 where a patch was removed.
All losses are computed in float32 whatever the compute dtype.
"""

from keras import ops


def _check_rank(name, tensor, rank):
    if len(tensor.shape) != rank:
        raise ValueError(f"`{name}` must have rank {rank}, got shape {tuple(tensor.shape)}.")


def _check_same(names, tensors, axes):
    shapes = [tuple(t.shape) for t in tensors]
    for axis in axes:
        dims = {s[axis] for s in shapes if s[axis] is not None}
        if len(dims) > 1:
            described = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
            raise ValueError(f"Shape mismatch on axis {axis}: {described}.")


def normalize_patches(target, eps=1e-6):
    """Per-patch normalisation of the MAE ``norm_pix_loss`` target:
    ``(t - mean) / sqrt(var + eps)`` with the **unbiased** variance
    (``torch.var``'s default, which the official code uses)."""
    target = ops.cast(target, "float32")
    p = target.shape[-1]
    if p is not None and p < 2:
        raise ValueError("norm_pix_loss needs patch vectors of length >= 2 (unbiased variance).")
    mean = ops.mean(target, axis=-1, keepdims=True)
    centred = target - mean
    var = ops.sum(ops.square(centred), axis=-1, keepdims=True) / (p - 1)
    return centred / ops.sqrt(var + eps)


def reconstruction_loss(pred, target, mask, norm_pix_loss=True):
    """MAE loss: per-patch mean squared error, averaged over masked patches.

    ``sum_b,i mask_bi * mean_k (pred_bik - t_bik)^2 / sum_b,i mask_bi``, where
    ``t`` is ``target`` or, with ``norm_pix_loss``, ``target`` normalised per
    patch (see :func:`normalize_patches`). The division is over the masked
    patches of the whole batch, as the official implementation does.

    Args:
        pred: ``(B, N, P)`` decoder predictions.
        target: ``(B, N, P)`` patchified images (``keras_lcmae.ops.patchify``).
        mask: ``(B, N)``, 1 = masked (the loss only counts these).
        norm_pix_loss: normalise the target per patch first.

    Returns:
        float32 scalar.

    Example:
    >>> t = np.random.rand(2, 16, 48).astype("float32")
    >>> m = np.ones((2, 16), "float32")
    >>> float(reconstruction_loss(t, t, m, norm_pix_loss=False))
    0.0
    """
    _check_rank("pred", pred, 3)
    _check_rank("target", target, 3)
    _check_rank("mask", mask, 2)
    _check_same(("pred", "target"), (pred, target), (0, 1, 2))
    _check_same(("pred", "mask"), (pred, mask), (0, 1))
    pred = ops.cast(pred, "float32")
    target = normalize_patches(target) if norm_pix_loss else ops.cast(target, "float32")
    mask = ops.cast(mask, "float32")
    per_patch = ops.mean(ops.square(pred - target), axis=-1)
    return ops.sum(per_patch * mask) / ops.maximum(ops.sum(mask), 1.0)
