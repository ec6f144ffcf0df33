"""The LC-MAE paper's analysis metrics (Sec. 4), as pure numpy functions.

Every function takes arrays (numpy or backend tensors, converted with
``keras.ops.convert_to_numpy``) and returns numpy values; none has state.

Token layout: a sequence is ``[CLS]`` followed by patch tokens. Patch ``i``
of a ``(rows, cols)`` grid (row-major, as :func:`keras_lcmae.ops.patchify`)
has its centre at pixel ``((c + 0.5) p, (r + 0.5) p)`` with
``r, c = divmod(i, cols)`` and ``p`` the patch size.

* :func:`attention_distance` -- the mean attention distance of Dosovitskiy
  et al. (ViT, Fig. 7), used in LC-MAE Fig. 5/6/A.1.
* :func:`attention_similarity` -- ``S^attn_l`` of LC-MAE Eq. 7.
* :func:`similarity_weights` and :func:`semantic_similarity` --
  ``W`` and ``S^sim_l`` of LC-MAE Eq. 8.
* :func:`clustering_metrics` -- sigma_F, sigma_s and the intra-inter gap of
  Self-guided MAE, computed by :mod:`keras_lcmae.clustering`.
* :func:`token_relation_kl`, :func:`exploitation_rates` and
  :func:`attention_nmi` -- Self-guided MAE's Figs. 3b, 4 and 6.
"""

import keras
import numpy as np

from keras_lcmae import clustering
from keras_lcmae.ops import to_2tuple

_TINY = 1e-12


def _np(x, dtype="float64"):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=dtype)


def patch_centers(grid_size, patch_size):
    """Pixel coordinates ``(N, 2)`` as ``(y, x)`` of the patch centres of a
    ``(rows, cols)`` grid of ``patch_size``-pixel patches, row-major.

    Example:
    >>> patch_centers((2, 2), 4).tolist()
    [[2.0, 2.0], [2.0, 6.0], [6.0, 2.0], [6.0, 6.0]]
    """
    rows, cols = to_2tuple(grid_size, "grid_size")
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack([(r + 0.5) * patch_size, (c + 0.5) * patch_size], axis=-1).astype("float64")


def pairwise_patch_distances(grid_size, patch_size, positions=None):
    """Euclidean pixel distances between patch centres.

    Args:
        grid_size: ``(rows, cols)``.
        patch_size: patch side in pixels.
        positions: optional ``(B, K)`` patch indices of the tokens of each
            sequence (e.g. ``ids_keep`` of a masked encoder); all ``N``
            patches in order when omitted.

    Returns ``(N, N)`` without ``positions``, else ``(B, K, K)``.
    """
    centers = patch_centers(grid_size, patch_size)
    if positions is None:
        diff = centers[:, None] - centers[None, :]
        return np.sqrt(np.sum(diff**2, axis=-1))
    pos = np.asarray(keras.ops.convert_to_numpy(positions)).astype("int64")
    if pos.ndim != 2:
        raise ValueError(f"positions must be (batch, tokens) patch indices, got shape {pos.shape}.")
    n = centers.shape[0]
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise ValueError(
            f"positions must index the {n} patches of a {tuple(grid_size)} grid, got values "
            f"in [{pos.min()}, {pos.max()}]."
        )
    c = centers[pos]  # (B, K, 2)
    return np.sqrt(np.sum((c[:, :, None] - c[:, None, :]) ** 2, axis=-1))


def patch_attention(attention, has_cls=True):
    """Attention among patch tokens only: drops the ``[CLS]`` query row and
    key column (when ``has_cls``) and renormalises each remaining row to sum
    to 1 over the patches, ``(B, H, K, K)``.

    This is the [CLS] convention of every distance below: the question asked
    is *how far away, among the patches, a patch looks*; the weight a query
    puts on [CLS] (which has no position) is removed, not counted as distance
    0. (Keeping it unnormalised would make a head that parks mass on [CLS]
    look more local than it is.)
    """
    a = _np(attention)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attention must be (batch, heads, tokens, tokens), got shape {a.shape}.")
    if has_cls:
        if a.shape[-1] < 2:
            raise ValueError("attention with a [CLS] token needs at least one patch token too.")
        a = a[:, :, 1:, 1:]
    return a / np.maximum(a.sum(axis=-1, keepdims=True), _TINY)


def attention_distance(attention, grid_size, patch_size, positions=None, has_cls=True, query_mask=None):
    """Mean attention distance in pixels, per head, ``(H,)``.

    For one layer's attention ``a`` ``(B, H, T, T)`` over a sequence of
    ``[CLS]`` + ``K`` patch tokens::

        a'_qk   = a_qk / sum_k' a_qk'           (patch rows/columns only, see
                                                 :func:`patch_attention`)
        d_bhq   = sum_k a'_bhqk * ||c(q) - c(k)||_2     (pixels between centres)
        dist_h  = mean over images b and queries q of d_bhq

    ``c(i)`` is the pixel centre of the patch at sequence position ``i``:
    ``positions[b, i]`` when given (a masked encoder's visible tokens with
    their true places, ``ids_keep``), else token ``i`` is patch ``i``
    (an encoder run on all patches, or a decoder's unshuffled ``1 + N``
    sequence). Average the result over heads for the layer's value.

    Args:
        attention: ``(B, H, T, T)`` weights (rows sum to 1).
        grid_size: ``(rows, cols)`` of the patch grid.
        patch_size: patch side in pixels.
        positions: optional ``(B, K)`` patch index of each patch token.
        has_cls: whether token 0 is ``[CLS]`` (dropped, rows renormalised).
        query_mask: optional ``(B, K)`` 0/1 weights restricting the average
            to some queries (e.g. the decoder's masked positions).

    Example:
    >>> a = np.zeros((1, 1, 5, 5)); a[0, 0, np.arange(5), np.arange(5)] = 1
    >>> attention_distance(a, (2, 2), 4).tolist()   # attends only to itself
    [0.0]
    """
    a = patch_attention(attention, has_cls)
    b, _, k, _ = a.shape
    if positions is None:
        rows, cols = to_2tuple(grid_size, "grid_size")
        if k != rows * cols:
            raise ValueError(
                f"attention has {k} patch tokens but the grid {rows}x{cols} has {rows * cols}; pass "
                "`positions` (the patch index of each token) for a subset of patches."
            )
        dist = pairwise_patch_distances(grid_size, patch_size)[None]
    else:
        dist = pairwise_patch_distances(grid_size, patch_size, positions)
        if dist.shape != (b, k, k):
            raise ValueError(f"positions give {dist.shape[1]} tokens per image, attention has {k}.")
    per_query = np.einsum("bhqk,bqk->bhq", a, dist)
    if query_mask is None:
        return per_query.mean(axis=(0, 2))
    w = _np(query_mask)
    if w.shape != (b, k):
        raise ValueError(f"query_mask must be (batch, patch tokens) = {(b, k)}, got {w.shape}.")
    if w.sum() <= 0:
        raise ValueError("query_mask selects no query.")
    return np.einsum("bhq,bq->h", per_query, w) / w.sum()


def mean_pairwise_distance(grid_size, patch_size):
    """Mean centre-to-centre pixel distance over all ordered patch pairs
    (self pairs included): the attention distance of uniform attention."""
    return float(pairwise_patch_distances(grid_size, patch_size).mean())


def attention_similarity(attention, query_ids, include_cls=False, has_cls=True):
    """``S^attn_l`` of LC-MAE Eq. 7 for one decoder layer.

    All images must share **one** mask. With ``A_i`` the attention rows of
    the ``k`` masked positions of image ``i`` (``k x h x n``, flattened)::

        S^attn = sum_{i != j} cos(A_i, A_j) / (|I| (|I| - 1))

    Args:
        attention: ``(B, H, T, T)`` decoder attention, ``T = 1 + N``
            (``[CLS]`` first) when ``has_cls``.
        query_ids: ``(k,)`` patch indices of the shared masked positions
            (0-based over the ``N`` patches).
        include_cls: keep the key column of ``[CLS]`` in ``A_i``. Default
            ``False``: Eq. 7 defines ``n`` as the number of patches, so
            ``A_i`` holds the raw weights on the ``N`` patch keys (not
            renormalised). ``True`` keeps all ``1 + N`` keys (the
            visualisations of Fig. 4 show that column).
        has_cls: whether token 0 is ``[CLS]``.

    Returns a float in ``[-1, 1]`` (in ``[0, 1]`` for attention weights).

    Example:
    >>> a = np.random.default_rng(0).random((1, 2, 5, 5))
    >>> round(attention_similarity(np.repeat(a, 3, axis=0), [0, 2]), 6)
    1.0
    """
    units = attention_vectors(attention, query_ids, include_cls, has_cls)
    if units.shape[0] < 2:
        raise ValueError("attention similarity compares images pairwise: pass at least 2 images.")
    return similarity_from_sums(units.sum(axis=0), units.shape[0])


def attention_vectors(attention, query_ids, include_cls=False, has_cls=True):
    """The unit vectors ``A_i / ||A_i||`` ``(B, k*h*n')`` of Eq. 7 (see
    :func:`attention_similarity` for ``include_cls``), so that Eq. 7 can be
    accumulated over batches with :func:`similarity_from_sums`."""
    a = _np(attention)
    if a.ndim != 4:
        raise ValueError(f"attention must be (batch, heads, tokens, tokens), got shape {a.shape}.")
    q = np.asarray(query_ids, dtype="int64").reshape(-1)
    offset = 1 if has_cls else 0
    n = a.shape[-1] - offset
    if q.size == 0 or q.min() < 0 or q.max() >= n:
        raise ValueError(f"query_ids must be non-empty patch indices in [0, {n}), got {q.tolist()}.")
    rows = a[:, :, q + offset, :]
    if has_cls and not include_cls:
        rows = rows[..., 1:]
    flat = rows.reshape(a.shape[0], -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), _TINY)


def similarity_from_sums(unit_sum, count):
    """Mean cosine over ordered pairs ``i != j`` of ``count`` unit vectors
    from their sum ``s``: ``sum_{i != j} u_i . u_j = ||s||^2 - count``, so
    the mean is ``(||s||^2 - count) / (count (count - 1))``."""
    count = int(count)
    if count < 2:
        raise ValueError("attention similarity compares images pairwise: pass at least 2 images.")
    s = np.asarray(unit_sum, "float64")
    return float((np.dot(s, s) - count) / (count * (count - 1)))


SIMILARITY_NORMALIZATIONS = ("cosine", "minmax")


def similarity_weights(features, normalization="cosine"):
    """The similarity weights ``W`` ``(B, n, n)`` of LC-MAE Eq. 8 (after
    CutLER): the cosine similarity of every pair of patch features.

    ``normalization``: ``"cosine"`` (default) returns the cosine matrix of
    l2-normalised features itself, entries in ``[-1, 1]``, diagonal 1 --
    "normalized" read as *computed on normalised features*. ``"minmax"``
    additionally rescales each image's matrix to ``[0, 1]``
    (``(W - min) / (max - min)``), a non-negative affinity as graph-cut
    methods use.

    Example:
    >>> w = similarity_weights(np.array([[[1.0, 0.0], [0.0, 3.0]]]))
    >>> w[0].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    f = _np(features)
    if f.ndim != 3:
        raise ValueError(f"features must be (batch, patches, dim), got shape {f.shape}.")
    if normalization not in SIMILARITY_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {SIMILARITY_NORMALIZATIONS}, got {normalization!r}.")
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), _TINY)
    w = f @ np.transpose(f, (0, 2, 1))
    if normalization == "minmax":
        lo = w.min(axis=(1, 2), keepdims=True)
        hi = w.max(axis=(1, 2), keepdims=True)
        w = (w - lo) / np.maximum(hi - lo, _TINY)
    return w


def resize_token_grid(features, src_grid, dst_grid):
    """Nearest-neighbour resampling of patch features ``(B, Ns, D)`` on a
    ``src_grid`` to ``(B, Nd, D)`` on ``dst_grid``: each destination patch
    takes the source patch under its centre (both grids span the same
    image). Used when the reference model's patch grid differs from the
    analysed model's.

    Example:
    >>> f = np.arange(4.0).reshape(1, 4, 1)        # 2x2 grid
    >>> resize_token_grid(f, (2, 2), (4, 4))[0, :, 0].tolist()[:8]
    [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    """
    f = _np(features, dtype=None)
    sr, sc = to_2tuple(src_grid, "src_grid")
    dr, dc = to_2tuple(dst_grid, "dst_grid")
    if f.ndim != 3 or f.shape[1] != sr * sc:
        raise ValueError(f"features must be (batch, {sr * sc}, dim) for a {sr}x{sc} grid, got {f.shape}.")
    rows = np.minimum(((np.arange(dr) + 0.5) * sr / dr).astype("int64"), sr - 1)
    cols = np.minimum(((np.arange(dc) + 0.5) * sc / dc).astype("int64"), sc - 1)
    index = (rows[:, None] * sc + cols[None, :]).reshape(-1)
    return f[:, index]


def semantic_similarity(reference_features, features, normalization="cosine", per_image=False):
    """``S^sim_l`` of LC-MAE Eq. 8: mean over images of
    ``cos(flatten(W_ref_i), flatten(W_i))``, with ``W`` from
    :func:`similarity_weights` (whole ``n x n`` matrices, diagonal
    included, as the equation has it).

    Both inputs are ``(B, n, D*)`` patch features of the same images on the
    same grid (resample with :func:`resize_token_grid` first if the
    reference grid differs); the feature widths may differ.
    ``per_image=True`` returns the ``(B,)`` cosines instead of their mean.

    Example:
    >>> f = np.random.default_rng(0).normal(size=(2, 4, 8))
    >>> round(semantic_similarity(f, f), 6)
    1.0
    """
    w_ref = similarity_weights(reference_features, normalization)
    w = similarity_weights(features, normalization)
    if w_ref.shape != w.shape:
        raise ValueError(
            f"reference features give {w_ref.shape[0]} images x {w_ref.shape[1]} patches, the analysed "
            f"features {w.shape[0]} x {w.shape[1]}; use the same images and resample the reference grid "
            "(resize_token_grid)."
        )
    a = w_ref.reshape(len(w_ref), -1)
    b = w.reshape(len(w), -1)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), _TINY)
    return cos if per_image else float(cos.mean())


def clustering_metrics(features):
    """Self-guided MAE's clustering statistics of patch features
    ``(B, N, D)``, averaged over images, from :mod:`keras_lcmae.clustering`:
    ``feature_variance`` (sigma_F), ``similarity_variance`` (sigma_s) and
    ``cluster_gap`` (mu_intra - mu_inter of its :func:`bipartition`).
    Returns ``(dict of floats, assignments (B, N))``."""
    f = keras.ops.convert_to_tensor(_np(features, "float32"))
    assignments = clustering.bipartition(f)
    values = {
        "feature_variance": clustering.feature_variance(f),
        "similarity_variance": clustering.similarity_variance(f),
        "cluster_gap": clustering.cluster_gap(f, assignments),
    }
    out = {k: float(np.mean(keras.ops.convert_to_numpy(v))) for k, v in values.items()}
    return out, np.asarray(keras.ops.convert_to_numpy(assignments))


def token_relation_kl(attention, reference_attention, has_cls=True, per_head=False):
    """KL divergence of token relations between two checkpoints for one
    layer (Self-guided MAE, Fig. 3b): how far a layer's attention is from
    the attention of the same layer of a ``reference`` (converged) model on
    the same images::

        P_q = reference attention row of query q,   Q_q = attention row of q
        KL  = mean over images, heads and queries of sum_k P_qk log(P_qk / Q_qk)

    Rows are the patch-to-patch attention of :func:`patch_attention` (the
    ``[CLS]`` query row and key column dropped, rows renormalised).
    ``KL(reference || checkpoint)``: the converged relations are the target
    the earlier ones are measured against. 0 for identical attention;
    weights are clipped at 1e-12 so a zero weight does not give infinity.

    Args:
        attention: ``(B, H, T, T)`` attention of the checkpoint.
        reference_attention: the same shape, of the reference model.
        has_cls: whether token 0 is ``[CLS]``.
        per_head: return ``(H,)`` per-head values instead of the mean.

    Example:
    >>> a = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 3, 5))
    >>> token_relation_kl(a, a)
    0.0
    """
    q = patch_attention(attention, has_cls)
    p = patch_attention(reference_attention, has_cls)
    if p.shape != q.shape:
        raise ValueError(
            f"the two attentions must have the same shape (same images, heads and tokens), got {q.shape} "
            f"and reference {p.shape}."
        )
    p = np.maximum(p, _TINY)
    q = np.maximum(q, _TINY)
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)  # (B, H, K)
    per = kl.mean(axis=(0, 2))
    return per if per_head else float(per.mean())


def exploitation_rates(attention, mask, has_cls=True):
    """Decoder exploitation rates of visible and mask tokens for one layer
    (Self-guided MAE, Fig. 4): how much the outputs at the **masked**
    positions (``O``) draw on the visible tokens ``V`` and on the mask
    tokens ``M``::

        a'      = patch_attention(a)        ([CLS] row/column dropped, rows renormalised)
        R_{V->O} = mean over images, heads and o in O of sum_{k in V} a'_ok
        R_{M->O} = mean over images, heads and o in O of sum_{k in M} a'_ok

    so ``R_{V->O} + R_{M->O} = 1``. Uniform attention gives the token
    shares ``|V|/N`` and ``|M|/N``; the ``*_per_token`` values divide by
    those shares (1 = as much as uniform attention, > 1 = favoured), so a
    75 % mask does not by itself make mask tokens look exploited.

    Args:
        attention: ``(B, H, T, T)`` decoder attention in patch order
            (``[CLS]`` first when ``has_cls``), e.g. :func:`~keras_lcmae.
            analysis.decoder_layers`.
        mask: ``(B, N)`` 1 where the patch was removed (a mask token).

    Returns a dict of floats: ``visible``, ``mask``, ``visible_per_token``,
    ``mask_per_token``.

    Example:
    >>> a = np.zeros((1, 1, 5, 5)); a[0, 0, :, 1:3] = 0.5      # every query looks at patches 0 and 1
    >>> r = exploitation_rates(a, np.array([[0, 0, 1, 1]]))      # patches 0, 1 visible; 2, 3 masked
    >>> r["visible"], r["mask"], r["visible_per_token"]
    (1.0, 0.0, 2.0)
    """
    a = patch_attention(attention, has_cls)
    m = _np(mask)
    b, _, n, _ = a.shape
    if m.shape != (b, n):
        raise ValueError(f"mask must be (batch, patches) = {(b, n)} to match the attention, got {m.shape}.")
    masked = m > 0.5
    if not masked.any() or masked.all():
        raise ValueError("the exploitation rates need both masked and visible patches in the mask.")
    to_mask = np.einsum("bhqk,bk->bhq", a, masked.astype("float64"))  # mass each query puts on mask tokens
    w = masked.astype("float64")[:, None, :]
    r_mask = float((to_mask * w).sum() / (w.sum() * a.shape[1]))
    share_mask = float(masked.mean())
    return {
        "visible": 1.0 - r_mask,
        "mask": r_mask,
        "visible_per_token": (1.0 - r_mask) / (1.0 - share_mask),
        "mask_per_token": r_mask / share_mask,
    }


def attention_nmi(attention, has_cls=True, per_head=False):
    """Normalised mutual information between query and key positions of one
    layer's attention (Self-guided MAE Fig. 6, after Park et al. 2023, "What
    do self-supervised ViTs learn?"): low when every query attends to the
    same keys (a homogeneous attention map), 1 when each query attends to a
    key of its own.

    Per image and head, with ``a'`` the patch attention (:func:`patch_attention`)
    over ``K`` patch tokens and queries taken uniformly::

        p(q, k) = a'_qk / K,   p(k) = mean_q a'_qk
        I(Q; K) = sum_qk p(q, k) log(a'_qk / p(k))
        NMI     = I(Q; K) / sqrt(H(Q) H(K)),   H(Q) = log K,  H(K) = -sum_k p(k) log p(k)

    (the geometric-mean normalisation; 0 when ``H(K) = 0``, i.e. all the
    mass on one key), then averaged over images (and heads).

    Example:
    >>> eye = np.eye(5)[None, None]          # [CLS] + 4 patches, each attends to itself
    >>> round(attention_nmi(eye), 6)
    1.0
    >>> round(attention_nmi(np.full((1, 1, 5, 5), 0.2)), 6)
    0.0
    """
    a = patch_attention(attention, has_cls)
    k = a.shape[-1]
    if k < 2:
        raise ValueError("NMI needs at least 2 patch tokens.")
    pk = a.mean(axis=2)  # (B, H, K)
    logs = np.log(np.maximum(a, _TINY)) - np.log(np.maximum(pk, _TINY))[:, :, None, :]
    mi = np.sum(np.where(a > 0, a * logs, 0.0), axis=(2, 3)) / k
    hk = -np.sum(np.where(pk > 0, pk * np.log(np.maximum(pk, _TINY)), 0.0), axis=-1)
    hq = np.log(k)
    denom = np.sqrt(hq * hk)
    nmi = np.where(denom > _TINY, mi / np.maximum(denom, _TINY), 0.0)
    per = np.clip(nmi, 0.0, 1.0).mean(axis=0)
    return per if per_head else float(per.mean())
