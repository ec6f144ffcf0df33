"""The training objectives, as pure ``keras.ops`` functions.

Shapes follow the official MAE: ``pred`` and ``target`` are ``(B, N, P)`` per
patch vectors, ``mask`` is ``(B, N)`` with 1 where a patch was removed.
All losses are computed in float32 whatever the compute dtype.
"""

from keras import ops

from keras_lcmae.distribute import global_mean
from keras_lcmae.ops import take_tokens


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
    patches of the whole batch, as the official implementation does (under
    ``tf.distribute``: of the global batch, see
    :func:`keras_lcmae.distribute.global_mean`).

    Args:
        pred: ``(B, N, P)`` decoder predictions.
        target: ``(B, N, P)`` patchified images (``keras_lcmae.ops.patchify``).
        mask: ``(B, N)``, 1 = masked (the loss only counts these).
        norm_pix_loss: normalise the target per patch first.

    Returns:
        float32 scalar.

    Example:
    >>> import numpy as np
    >>> pred = np.zeros((2, 16, 48), "float32")
    >>> target = np.ones((2, 16, 48), "float32")
    >>> target[:, 8:] = 3.0                    # squared error 1 on patches 0-7, 9 on 8-15
    >>> mask = np.zeros((2, 16), "float32")
    >>> mask[:, :8] = 1.0                      # only patches 0-7 were removed: only they count
    >>> float(reconstruction_loss(pred, target, mask, norm_pix_loss=False))
    1.0
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
    return global_mean(ops.sum(per_patch * mask), ops.sum(mask))


def _inv_norms(x, axis=-1, eps=1e-12):
    """``1 / max(||x||, eps)``, the factor ``torch.nn.functional.normalize``
    divides by: an all-zero vector then has cosine 0 with anything.

    Written as ``rsqrt(max(|x|^2, eps^2))`` and used as a factor, so the
    gradient stays finite (zero) at an all-zero vector: ``max(sqrt(.), eps)``
    gives ``0 * inf`` in the sqrt's derivative, and dividing by the product of
    two clamped norms gives ``0 / 0`` in the quotient's derivative (its square,
    1e-48, underflows in float32)."""
    return _inv_norms_of_squares(ops.sum(ops.square(x), axis=axis), eps)


def _inv_norms_of_squares(sq, eps=1e-12):
    """:func:`_inv_norms` from the squared norms ``sq``."""
    return ops.rsqrt(ops.maximum(sq, eps * eps))


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
    >>> import numpy as np
    >>> v = np.random.default_rng(0).random((2, 16, 8)).astype("float32")
    >>> m = np.ones((2, 16), "float32")
    >>> abs(float(cross_view_loss(v, v, m, m))) < 1e-6     # aligned views
    True
    >>> round(float(cross_view_loss(v, -v, m, m)), 4)      # opposite views: 1 - (-1)
    2.0
    """
    for name, t in (("v1", v1), ("v2", v2)):
        _check_rank(name, t, 3)
    for name, t in (("mask1", mask1), ("mask2", mask2)):
        _check_rank(name, t, 2)
    _check_same(("v1", "v2"), (v1, v2), (0, 1, 2))
    _check_same(("v1", "mask1", "mask2"), (v1, mask1, mask2), (0, 1))
    v1, v2 = ops.cast(v1, "float32"), ops.cast(v2, "float32")
    both = ops.cast(mask1, "float32") * ops.cast(mask2, "float32")
    # cos from the dot product and the two norms: no normalised copy of the
    # (B, N, d) tensors is made.
    cos = ops.sum(v1 * v2, axis=-1) * (_inv_norms(v1) * _inv_norms(v2))
    return global_mean(ops.sum(both * (1.0 - cos)), ops.sum(both))


def cosine_matrix(x):
    """``(B, N, d)`` -> ``(B, N, N)`` pairwise cosine similarities, from the
    Gram matrix and the norms (the ``(B, N, d)`` input is read twice, not
    normalised)."""
    x = ops.cast(x, "float32")
    inv = _inv_norms(x)
    gram = ops.matmul(x, ops.transpose(x, (0, 2, 1)))
    return gram * (inv[:, :, None] * inv[:, None, :])


def in_view_loss(v, x, mask):
    """LC-MAE in-view loss (Eq. 6).

    ``sum_b sum_{i != j} m_bi m_bj |cos(v_bi, v_bj) - cos(x_bi, x_bj)|`` divided
    by the number of ordered masked pairs ``i != j`` in the batch: the
    similarity structure of the outputs at masked positions must follow that
    of the input patches. For two views, concatenate them on the batch axis
    (each image has the same number of masked pairs in each view, so this is
    the mean of the two views' losses). Passing only the masked tokens with an
    all-ones mask gives the same value for less work.

    Args:
        v: ``(B, N, d)`` projector outputs.
        x: ``(B, N, P)`` input patches (as fed to the network, or normalised
            per patch). An all-zero patch has cosine 0 with every patch.
        mask: ``(B, N)``, 1 = masked.

    Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).random((2, 16, 48)).astype("float32")
    >>> m = np.ones((2, 16), "float32")
    >>> float(in_view_loss(x, x, m)) < 1e-6            # same similarity structure
    True
    >>> float(in_view_loss(3.0 * x[..., :8], x[..., :8], m)) < 1e-6   # cosines ignore the scale
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
    return global_mean(ops.sum(pairs * diff), ops.sum(pairs))


def collapse_std(v, mask=None):
    """Collapse indicator of projector outputs ``v`` ``(..., d)``: the spread of
    the l2-normalised vectors across tokens, ``sqrt(mean_k Var_t[v_t / |v_t|]_k)``
    (the root-mean-square over dimensions of the per-dimension standard
    deviation). About ``1/sqrt(d)`` when the vectors point everywhere, 0 when
    every token maps to the same direction. With ``mask`` only masked tokens
    count. No gradient flows through it.

    It is computed from ``sum_k Var_k = E|u|^2 - |E u|^2`` with ``u = v/|v|``,
    so the ``(T, d)`` tensor is read twice and never normalised.

    Example:
    >>> import numpy as np
    >>> spread = np.eye(4, dtype="float32")[None]          # 4 tokens, 4 directions
    >>> round(float(collapse_std(spread)), 4), float(collapse_std(np.ones((1, 4, 4), "float32")))
    (0.433, 0.0)
    """
    v = ops.stop_gradient(ops.cast(v, "float32"))
    d = v.shape[-1]
    flat = ops.reshape(v, (-1, d))
    inv = _inv_norms(flat)
    if mask is None:
        w = ops.ones_like(inv)
    else:
        w = ops.reshape(ops.cast(mask, "float32"), (-1,))
    count = ops.maximum(ops.sum(w), 1.0)
    unit_sq = ops.sum(ops.square(flat), axis=-1) * ops.square(inv)  # 1, or 0 for a zero vector
    mean_unit = ops.matmul((w * inv)[None, :], flat)[0] / count
    total_var = ops.sum(w * unit_sq) / count - ops.sum(ops.square(mean_unit))
    return ops.sqrt(ops.maximum(total_var, 0.0) / d)


def contrastive_terms(features, x, ids_masked, ids_restore, num_visible, projector_kernel=None, projector_bias=None):
    """``L_cross``, ``L_in`` and the collapse indicator of LC-MAE from the
    masked tokens of two views stacked on the batch axis.

    ``v = features @ kernel + bias`` is the linear projector. When its input
    is narrower than its output, ``v`` is never materialised: every quantity
    the losses need is an inner product ``v_s . v_t = f~_s A f~_t`` with
    ``f~ = [f, 1]`` and ``A = W~ W~^T`` (``W~`` = kernel with the bias as an
    extra row), so the work is done in the narrow space. The results equal
    :func:`cross_view_loss`, :func:`in_view_loss` and :func:`collapse_std` on
    the full outputs (tests check it); autodiff gives the same gradients.

    Args:
        features: ``(2B, M, F)`` projector inputs at the ``M`` masked
            positions of each view, rows ``[:B]`` view 1, ``[B:]`` view 2,
            in the order of ``ids_masked``; or, with ``projector_kernel``
            left out, the projector outputs ``v`` themselves.
        x: ``(2B, M, P)`` input patches at the same positions.
        ids_masked: ``(2B, M)`` positions of those tokens.
        ids_restore: ``(2B, N)`` from the masking (rank of each position in
            the shuffle; a position is masked iff its rank >= ``num_visible``).
        num_visible: ``K``, visible tokens per view.
        projector_kernel, projector_bias: ``(F, d)`` and ``(d,)``.

    Returns:
        dict with ``cross``, ``in`` and ``v_std`` (float32 scalars).
    """
    f = ops.cast(features, "float32")
    if projector_kernel is None:
        d = f.shape[-1]
        fa = f
    else:
        w = ops.cast(projector_kernel, "float32")
        d = w.shape[-1]
        if projector_bias is not None:
            w = ops.concatenate([w, ops.cast(projector_bias, "float32")[None, :]], axis=0)
            f = ops.concatenate([f, ops.ones_like(f[..., :1])], axis=-1)
        fa = ops.matmul(f, ops.matmul(w, ops.transpose(w)))  # f~ A
    sq = ops.maximum(ops.sum(fa * f, axis=-1), 0.0)  # |v|^2, (2B, M)
    inv = _inv_norms_of_squares(sq)  # 1 / max(|v|, 1e-12)

    # L_in: every pair of listed tokens is a pair of masked positions.
    m = f.shape[1]
    cos_v = ops.matmul(fa, ops.transpose(f, (0, 2, 1))) * (inv[:, :, None] * inv[:, None, :])
    off_diag = (1.0 - ops.eye(m, dtype="float32"))[None]
    diff = ops.abs(cos_v - cosine_matrix(x)) * off_diag
    batch2 = ops.shape(f)[0]
    l_in = global_mean(ops.sum(diff), ops.cast(batch2, "float32") * m * (m - 1))

    # L_cross: pair each view-1 token with the same position in view 2, if masked there.
    b = batch2 // 2
    rank2 = ops.take_along_axis(ids_restore[b:], ids_masked[:b], axis=1) - num_visible
    co_masked = ops.cast(rank2 >= 0, "float32")
    j = ops.maximum(rank2, 0)
    f2 = take_tokens(f[b:], j)
    inv2 = ops.take_along_axis(inv[b:], j, axis=1)
    cos_x = ops.sum(fa[:b] * f2, axis=-1) * (inv[:b] * inv2)
    # the co-masked count differs between replicas: normalise by the global one
    l_cross = global_mean(ops.sum(co_masked * (1.0 - cos_x)), ops.sum(co_masked))

    # v_std = sqrt((E|u|^2 - |E u|^2) / d), u = v/|v|, from the same inner products.
    fs, fas, invs, sqs = (ops.stop_gradient(t) for t in (f, fa, inv, sq))
    count = ops.cast(batch2 * m, "float32")
    mean_f = ops.sum(fs * invs[..., None], axis=(0, 1)) / count
    mean_fa = ops.sum(fas * invs[..., None], axis=(0, 1)) / count
    total_var = ops.sum(sqs * ops.square(invs)) / count - ops.sum(mean_f * mean_fa)
    v_std = ops.sqrt(ops.maximum(total_var, 0.0) / d)
    return {"cross": l_cross, "in": l_in, "v_std": v_std}


def block_stats(target, valid, eps=1e-6):
    """Per-token ``mean`` and ``sqrt(var + eps)`` of ``target`` ``(B, N, P)``
    over the entries where ``valid`` (broadcastable to it, 1 = real pixel) is
    set, with the **unbiased** variance (as :func:`patch_stats`, which it equals
    when every entry is valid)."""
    target = ops.cast(target, "float32")
    valid = ops.cast(valid, "float32") * ops.ones_like(target)
    count = ops.sum(valid, axis=-1, keepdims=True)
    mean = ops.sum(target * valid, axis=-1, keepdims=True) / ops.maximum(count, 1.0)
    var = ops.sum(valid * ops.square(target - mean), axis=-1, keepdims=True) / ops.maximum(count - 1.0, 1.0)
    return mean, ops.sqrt(var + eps)


def block_reconstruction_loss(pred, target, valid, norm_pix_loss=True):
    """AutoEncoder(k) loss: squared error averaged over the **valid** entries
    of every token's target block (entries that fall in the zero padding
    outside the image do not count).

    ``sum valid * (pred - t)^2 / sum valid`` over the whole batch, where ``t``
    is ``target`` or, with ``norm_pix_loss``, ``target`` normalised per token
    by the mean and unbiased variance of its valid entries (eps 1e-6, see
    :func:`block_stats`). With every entry valid this equals
    :func:`reconstruction_loss` with every patch masked.

    Args:
        pred: ``(B, N, P)`` predictions.
        target: ``(B, N, P)`` target blocks.
        valid: ``(N, P)`` or ``(B, N, P)``, 1 where the target is a real pixel.
        norm_pix_loss: normalise each target block first.

    Example:
    >>> import numpy as np
    >>> target = np.ones((2, 4, 12), "float32")
    >>> valid = np.ones((4, 12), "float32")
    >>> valid[:, 6:] = 0.0                       # half of each block lies in the padding
    >>> pred = np.where(valid > 0, 1.0, 5.0)[None].repeat(2, 0)   # wrong only in the padding
    >>> float(block_reconstruction_loss(pred, target, valid, norm_pix_loss=False))
    0.0
    """
    _check_rank("pred", pred, 3)
    _check_rank("target", target, 3)
    _check_same(("pred", "target"), (pred, target), (0, 1, 2))
    pred = ops.cast(pred, "float32")
    if norm_pix_loss:
        mean, std = block_stats(target, valid)
        target = (ops.cast(target, "float32") - mean) / std
    valid = ops.cast(valid, "float32") * ops.ones_like(pred)
    return global_mean(ops.sum(valid * ops.square(pred - ops.cast(target, "float32"))), ops.sum(valid))
