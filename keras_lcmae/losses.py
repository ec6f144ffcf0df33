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


def patch_stats(target, eps=1e-6):
    """Per-patch ``mean`` and ``sqrt(var + eps)`` with the **unbiased** variance
    (``torch.var``'s default, which the official code uses)."""
    target = ops.cast(target, "float32")
    p = target.shape[-1]
    if p is not None and p < 2:
        raise ValueError("norm_pix_loss needs patch vectors of length >= 2 (unbiased variance).")
    mean = ops.mean(target, axis=-1, keepdims=True)
    var = ops.sum(ops.square(target - mean), axis=-1, keepdims=True) / (p - 1)
    return mean, ops.sqrt(var + eps)


def normalize_patches(target, eps=1e-6):
    """Per-patch normalisation of the MAE ``norm_pix_loss`` target:
    ``(t - mean) / sqrt(var + eps)``, unbiased variance (:func:`patch_stats`)."""
    mean, std = patch_stats(target, eps)
    return (ops.cast(target, "float32") - mean) / std


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


def l2_normalize(x, axis=-1, eps=1e-12):
    """``x / max(||x||, eps)`` (as ``torch.nn.functional.normalize``): an all-zero
    vector stays zero, so its cosine with anything is 0."""
    x = ops.cast(x, "float32")
    norm = ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True))
    return x / ops.maximum(norm, eps)


def cross_view_loss(v1, v2, mask1, mask2):
    """LC-MAE cross-view loss (Eq. 5).

    ``sum_b,i m1_bi m2_bi (1 - cos(v1_bi, v2_bi)) / sum_b,i m1_bi m2_bi``: the
    two views of each image are aligned at the positions masked in **both**,
    and the sum over the batch is divided by the number of such positions in
    the batch (0 if there is none, never NaN).

    Args:
        v1, v2: ``(B, N, d)`` projector outputs of view 1 and view 2.
        mask1, mask2: ``(B, N)`` masks of the views, 1 = masked.

    Example:
    >>> v = np.random.rand(2, 16, 8).astype("float32")
    >>> m = np.ones((2, 16), "float32")
    >>> abs(float(cross_view_loss(v, v, m, m))) < 1e-6
    True
    """
    for name, t in (("v1", v1), ("v2", v2)):
        _check_rank(name, t, 3)
    for name, t in (("mask1", mask1), ("mask2", mask2)):
        _check_rank(name, t, 2)
    _check_same(("v1", "v2"), (v1, v2), (0, 1, 2))
    _check_same(("v1", "mask1", "mask2"), (v1, mask1, mask2), (0, 1))
    both = ops.cast(mask1, "float32") * ops.cast(mask2, "float32")
    cos = ops.sum(l2_normalize(v1) * l2_normalize(v2), axis=-1)
    return ops.sum(both * (1.0 - cos)) / ops.maximum(ops.sum(both), 1.0)


def cosine_matrix(x):
    """``(B, N, d)`` -> ``(B, N, N)`` pairwise cosine similarities."""
    xn = l2_normalize(x)
    return ops.matmul(xn, ops.transpose(xn, (0, 2, 1)))


def in_view_loss(v, x, mask):
    """LC-MAE in-view loss (Eq. 6).

    ``sum_b sum_{i != j} m_bi m_bj |cos(v_bi, v_bj) - cos(x_bi, x_bj)|`` divided
    by the number of ordered masked pairs ``i != j`` in the batch: the
    similarity structure of the outputs at masked positions must follow that
    of the input patches. For two views, concatenate them on the batch axis
    (each image has the same number of masked pairs in each view, so this is
    the mean of the two views' losses).

    Args:
        v: ``(B, N, d)`` projector outputs.
        x: ``(B, N, P)`` input patches (as fed to the network, or normalised
            per patch). An all-zero patch has cosine 0 with every patch.
        mask: ``(B, N)``, 1 = masked.

    Example:
    >>> x = np.random.rand(2, 16, 48).astype("float32")
    >>> m = np.ones((2, 16), "float32")
    >>> float(in_view_loss(x, x, m)) < 1e-6
    True
    """
    _check_rank("v", v, 3)
    _check_rank("x", x, 3)
    _check_rank("mask", mask, 2)
    _check_same(("v", "x", "mask"), (v, x, mask), (0, 1))
    m = ops.cast(mask, "float32")
    n = v.shape[1]
    pairs = m[:, :, None] * m[:, None, :] * (1.0 - ops.eye(n, dtype="float32"))[None]
    diff = ops.abs(cosine_matrix(v) - cosine_matrix(x))
    return ops.sum(pairs * diff) / ops.maximum(ops.sum(pairs), 1.0)


def collapse_std(v, mask=None):
    """Collapse indicator: the standard deviation of l2-normalised vectors
    across tokens, averaged over dimensions (≈ 1/sqrt(d) for spread-out
    outputs, 0 when every token maps to the same vector). With ``mask``, only
    masked tokens count."""
    vn = ops.reshape(l2_normalize(v), (-1, v.shape[-1]))
    if mask is None:
        w = ops.ones((ops.shape(vn)[0], 1), "float32")
    else:
        w = ops.reshape(ops.cast(mask, "float32"), (-1, 1))
    count = ops.maximum(ops.sum(w), 1.0)
    mean = ops.sum(vn * w, axis=0) / count
    var = ops.sum(w * ops.square(vn - mean), axis=0) / count
    return ops.mean(ops.sqrt(var))
