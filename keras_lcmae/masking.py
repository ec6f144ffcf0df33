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


def num_hints(num_patches, mask_ratio, hint_ratio):
    """Hint tokens requested per image: ``round(hint_ratio * M)`` with
    ``M = N - int(N * (1 - mask_ratio))`` the masked budget.

    Example:
    >>> num_hints(64, 0.75, 0.05)
    2
    """
    try:
        ratio = float(hint_ratio)
    except (TypeError, ValueError):
        raise ValueError(f"hint_ratio must be a number in [0, 1), got {hint_ratio!r}.") from None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"hint_ratio must lie in [0, 1) (a fraction of the masked patches), got {hint_ratio!r}.")
    masked = num_patches - num_visible(num_patches, mask_ratio)
    return int(round(ratio * masked))


def _ranks(values):
    """Rank of each entry along axis 1 (0 = smallest), int32 ``(B, N)``."""
    return ops.cast(ops.argsort(ops.argsort(values, axis=1), axis=1), "int32")


def informed_noise(assignments, mask_ratio, hint_ratio=0.05, noise=None, seed=None):
    """Noise that makes :func:`random_masking` produce a self-guided informed
    mask (Self-guided MAE, Shin et al. 2024): the patches of cluster **1** in
    ``assignments`` are masked first.

    With ``N`` patches, ``K = int(N * (1 - mask_ratio))`` visible, ``M = N - K``
    masked, ``C`` the cluster's size in the image and
    ``H = min(round(hint_ratio * M), C, K)`` hints:

    * ``H`` cluster patches, drawn at random, are **hints**: always visible;
    * the other ``C - H`` cluster patches are masked first, in random order;
      if they exceed ``M``, the excess stays visible at random; if they fall
      short, the rest of the budget is filled with random non-cluster patches;
    * so every row has exactly ``K`` visible patches, ``min(M, C - H)`` masked
      cluster patches and ``max(H, C - M)`` visible cluster patches (hints only
      make a difference when the cluster would otherwise be (almost) fully
      masked; the cap ``K`` keeps the count exact when the cluster is huge).

    The noise is built from one uniform draw ``u`` per patch as
    ``level + rank(u) / N`` with level 0 for hints, 1 for non-cluster patches
    and 2 for the other cluster patches: sorting it keeps the hints first and
    the cluster last, and ``u`` orders patches within each level. No
    data-dependent Python control flow: it compiles on every backend.

    Args:
        assignments: ``(B, N)`` cluster ids in {0, 1} (e.g.
            :func:`keras_lcmae.clustering.bipartition`); 1 = mask first.
        mask_ratio: fraction of patches removed, in (0, 1).
        hint_ratio: fraction of the masked budget ``M`` given back as visible
            hint patches of the cluster, in [0, 1).
        noise: optional ``(B, N)`` uniform noise ``u``; drawn when omitted.
        seed: int or ``keras.random.SeedGenerator`` to draw ``u``.

    Returns:
        ``(B, N)`` float32 noise in ``[0, 3)``.

    Example:
    >>> import numpy as np
    >>> a = np.array([[1] * 4 + [0] * 12])
    >>> m = random_masking(np.zeros((1, 16, 2)), 0.5, noise=informed_noise(a, 0.5, 0.0, seed=0))["mask"]
    >>> np.asarray(m)[0, :4].tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    n = assignments.shape[1]
    keep = num_visible(n, mask_ratio)
    hints = num_hints(n, mask_ratio, hint_ratio)
    assignments = ops.convert_to_tensor(assignments)
    if noise is None:
        noise = replica_uniform(ops.shape(assignments)[:2], seed)
    elif tuple(noise.shape[1:]) != (n,):
        raise ValueError(f"noise must have shape (batch, {n}) to match the assignments, got {tuple(noise.shape)}.")
    in_cluster = ops.cast(ops.equal(ops.cast(assignments, "int32"), 1), "float32")
    u = ops.cast(_ranks(noise), "float32") / float(n)  # in [0, 1), ties broken, any input scale
    # rank of each cluster patch among the cluster (non-cluster patches sort after)
    cluster_rank = _ranks(u + 2.0 * (1.0 - in_cluster))
    size = ops.cast(ops.sum(in_cluster, axis=1, keepdims=True), "int32")
    h = ops.minimum(ops.minimum(size, keep), hints)
    hint = ops.logical_and(ops.greater(in_cluster, 0.5), ops.less(cluster_rank, h))
    level = ops.where(hint, 0.0, 1.0 + in_cluster)
    return level + u


def informed_masking(x, mask_ratio, assignments, hint_ratio=0.05, noise=None, seed=None):
    """Self-guided informed masking: :func:`random_masking` with the noise of
    :func:`informed_noise`, so ``ids_restore``/``ids_keep``/``mask`` keep the
    official semantics and exactly ``int(N * (1 - mask_ratio))`` patches stay
    visible.

    Example:
    >>> import numpy as np
    >>> x = np.zeros((2, 16, 8), "float32")
    >>> a = np.array([[1] * 6 + [0] * 10] * 2)
    >>> out = informed_masking(x, 0.75, a, hint_ratio=0.0, seed=0)
    >>> float(np.asarray(out["mask"])[:, :6].min())
    1.0
    """
    noise = informed_noise(assignments, mask_ratio, hint_ratio, noise=noise, seed=seed)
    return random_masking(x, mask_ratio, noise=noise)
