"""Patch-level clustering of token features (Self-guided MAE, Shin et al. 2024).

Everything here takes per-image token features ``(B, N, D)`` (numpy arrays or
backend tensors; ``keras.ops`` only, so it runs on TensorFlow, JAX and
PyTorch and inside compiled steps) and works on the **cosine** geometry of the
tokens: features are l2-normalised first (with a tiny epsilon, so an all-zero
token has similarity 0 to everything).

* :func:`token_similarity` -- the pairwise similarity matrix ``M`` ``(B, N, N)``.
* :func:`bipartition` -- a deterministic 2-way split of each image's patches,
  ``(B, N)`` int32 in ``{0, 1}``.
* :func:`main_object` -- which side of a split is the main object (the
  boundary prior, see there), and :func:`object_scores` -- the similarity
  score against the object's mean patch: together the masking order of
  self-guided informed masks.
* :func:`feature_variance` (sigma_F), :func:`similarity_variance` (sigma_s) and
  :func:`cluster_gap` (mu_intra - mu_inter): the metrics of Table 1 and
  Figure 3a of the paper. Each returns **one value per image**, shape ``(B,)``;
  take ``ops.mean`` for the batch figure.

Example:
>>> import numpy as np
>>> u = np.eye(4, dtype="float32")[0]
>>> feats = np.stack([u] * 6 + [-u] * 10)[None]          # (1, 16, 4)
>>> np.asarray(bipartition(feats))[0].tolist()            # doctest: +NORMALIZE_WHITESPACE
[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
>>> round(float(cluster_gap(feats, bipartition(feats))[0]), 4)
2.0
"""

from keras import ops

from keras_lcmae.ops import to_2tuple

EPSILON = 1e-6


def _check_features(features, name="features"):
    features = ops.convert_to_tensor(features)
    if len(features.shape) != 3:
        raise ValueError(
            f"{name} must be per-image token features of shape (batch, tokens, dim), got shape "
            f"{tuple(features.shape)}; drop the [CLS] token and add a batch axis if needed."
        )
    if features.shape[1] is not None and features.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 tokens per image to compare them, got {features.shape[1]}.")
    # similarities in float32, whatever the input (ints, float64 numpy, bf16 under mixed precision)
    return ops.cast(features, "float32")


def l2_normalize(features):
    """Each token divided by its l2 norm (``+ 1e-6``): ``(B, N, D)``."""
    features = _check_features(features)
    return features / (ops.sqrt(ops.sum(ops.square(features), axis=-1, keepdims=True)) + EPSILON)


def token_similarity(features):
    """Cosine similarity of every pair of tokens, ``(B, N, N)`` (the paper's
    pairwise similarity matrix ``M``; 1 on the diagonal for non-zero tokens).

    Example:
    >>> import numpy as np
    >>> m = token_similarity(np.array([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]]))
    >>> np.round(np.asarray(m)[0], 3).tolist()
    [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]]
    """
    f = l2_normalize(features)
    return ops.matmul(f, ops.transpose(f, (0, 2, 1)))


def mean_token_similarity(features):
    """The paper's "similarity score": cosine similarity between each token and
    the image's mean (l2-normalised) token, ``(B, N)``."""
    f = l2_normalize(features)
    mean = ops.mean(f, axis=1, keepdims=True)
    mean = mean / (ops.sqrt(ops.sum(ops.square(mean), axis=-1, keepdims=True)) + EPSILON)
    return ops.sum(f * mean, axis=-1)


def _masked_mean(values, weights, axis):
    return ops.sum(values * weights, axis=axis) / ops.maximum(ops.sum(weights, axis=axis), 1.0)


def bipartition(features, iterations=3):
    """Splits each image's tokens into two clusters; ``(B, N)`` int32 in {0, 1}.

    Method (deterministic, no eigensolver, identical on every backend):

    1. **Similarity-score split.** ``s_i = cos(f_i, mean_j f_j)`` on
       l2-normalised tokens (the paper's similarity between each patch and the
       average patch); token ``i`` starts in cluster 1 iff ``s_i >=`` the
       per-image mean of ``s``.
    2. **Refinement**: ``iterations`` rounds of spherical 2-means seeded by that
       split: each cluster's centroid is the mean of its normalised tokens, and
       each token joins the cluster whose centroid it is more cosine-similar to
       (ties go to cluster 1). ``iterations=0`` keeps the plain threshold split.
    3. **Labelling.** Cluster **1** is the cluster whose tokens are, on average,
       *more* similar to the mean token -- the dominant cluster that the mean
       patch represents (in MAE features usually the main object when it
       fills most of the image, the background otherwise). When one cluster is
       empty (e.g. all tokens identical) every token is labelled 1.

    Args:
        features: ``(B, N, D)`` token features (no ``[CLS]``).
        iterations: 2-means refinement rounds (>= 0).

    Example:
    >>> import numpy as np
    >>> a, b = np.eye(3, dtype="float32")[:2]
    >>> feats = np.stack([a, a, b, a, b, b, b, b])[None]
    >>> np.asarray(bipartition(feats))[0].tolist()
    [0, 0, 1, 0, 1, 1, 1, 1]
    """
    if int(iterations) < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations!r}.")
    f = l2_normalize(features)
    score = mean_token_similarity(f)
    ones = ops.cast(ops.greater_equal(score, ops.mean(score, axis=1, keepdims=True)), "float32")
    for _ in range(int(iterations)):
        w1 = ops.expand_dims(ones, -1)
        c1 = ops.sum(f * w1, axis=1, keepdims=True)
        c0 = ops.sum(f * (1.0 - w1), axis=1, keepdims=True)
        # unnormalised centroid sums: the cosine to a centroid only needs its direction
        c1 = c1 / (ops.sqrt(ops.sum(ops.square(c1), axis=-1, keepdims=True)) + EPSILON)
        c0 = c0 / (ops.sqrt(ops.sum(ops.square(c0), axis=-1, keepdims=True)) + EPSILON)
        s1 = ops.sum(f * c1, axis=-1)
        s0 = ops.sum(f * c0, axis=-1)
        ones = ops.cast(ops.greater_equal(s1, s0), "float32")
    count1 = ops.sum(ones, axis=1)
    count0 = ops.sum(1.0 - ones, axis=1)
    mean1 = _masked_mean(score, ones, axis=1)
    mean0 = _masked_mean(score, 1.0 - ones, axis=1)
    swap = ops.logical_or(ops.equal(count1, 0.0), ops.logical_and(ops.greater(count0, 0.0), ops.less(mean1, mean0)))
    ones = ops.where(ops.expand_dims(swap, -1), 1.0 - ones, ones)
    return ops.cast(ones, "int32")


def border_patches(grid_size):
    """``(N,)`` float32: 1 for the patches on the outer ring of a
    ``(rows, cols)`` grid (row-major), 0 inside.

    Example:
    >>> import numpy as np
    >>> np.asarray(border_patches((3, 3))).reshape(3, 3).astype(int).tolist()
    [[1, 1, 1], [1, 0, 1], [1, 1, 1]]
    """
    rows, cols = to_2tuple(grid_size, "grid_size")
    r = ops.arange(rows * cols) // cols
    c = ops.arange(rows * cols) % cols
    ring = ops.logical_or(
        ops.logical_or(ops.equal(r, 0), ops.equal(r, rows - 1)), ops.logical_or(ops.equal(c, 0), ops.equal(c, cols - 1))
    )
    return ops.cast(ring, "float32")


def main_object(features, assignments, grid_size):
    """Relabels a 2-way split so that **1 is the main object**, ``(B, N)`` int32.

    Rule (the boundary prior of unsupervised object discovery: the
    background surrounds the object):

    1. For each side, its *border share*: the fraction of its patches that
       lie on the outer ring of the grid (:func:`border_patches`).
    2. The side with the **smaller** border share is the object. This
       compares fractions, not counts, so it does not depend on which side
       is larger.
    3. Equal shares (e.g. a grid with no interior, or both sides touching
       the border alike) fall back to the side whose patches have the
       **lower** mean similarity score (:func:`mean_token_similarity`): the
       patches least correlated with the rest of the image, LOST's
       low-degree criterion (a patch's degree in the cosine graph is
       proportional to its similarity score).
    4. When one side is empty every patch is labelled 1.

    Args:
        features: ``(B, N, D)`` token features (no ``[CLS]``).
        assignments: ``(B, N)`` cluster ids in {0, 1}, e.g. :func:`bipartition`.
        grid_size: ``(rows, cols)`` of the patch grid, ``rows * cols = N``.

    Example:
    >>> import numpy as np
    >>> f = np.zeros((1, 16, 2), "float32"); f[..., 0] = 1.0
    >>> inner = [5, 6, 9, 10]; f[0, inner] = [0.0, 1.0]         # a 2x2 object in a 4x4 image
    >>> a = np.zeros((1, 16), "int32"); a[0, [i for i in range(16) if i not in inner]] = 1  # object labelled 0
    >>> np.flatnonzero(np.asarray(main_object(f, a, (4, 4)))[0]).tolist()
    [5, 6, 9, 10]
    """
    f = _check_features(features)
    a = ops.cast(ops.convert_to_tensor(assignments), "float32")
    if len(a.shape) != 2:
        raise ValueError(f"assignments must have shape (batch, tokens), got {tuple(a.shape)}.")
    rows, cols = to_2tuple(grid_size, "grid_size")
    n = f.shape[1]
    if n is not None and rows * cols != n:
        raise ValueError(f"grid_size {(rows, cols)} has {rows * cols} patches but the features have {n} tokens.")
    ring = border_patches((rows, cols))[None]
    ring1 = ops.sum(ring * a, axis=1)
    ring0 = ops.sum(ring * (1.0 - a), axis=1)
    score = mean_token_similarity(f)
    score1 = _masked_mean(score, a, axis=1)
    score0 = _masked_mean(score, 1.0 - a, axis=1)
    count1 = ops.sum(a, axis=1)
    count0 = ops.sum(1.0 - a, axis=1)
    # share0 < share1 as ring0 / count0 < ring1 / count1, cross-multiplied: exact integers in float32
    left, right = ring0 * count1, ring1 * count0
    zero_is_object = ops.where(ops.equal(left, right), ops.less(score0, score1), ops.less(left, right))
    swap = ops.logical_and(zero_is_object, ops.logical_and(ops.greater(count0, 0.0), ops.greater(count1, 0.0)))
    swap = ops.logical_or(swap, ops.equal(count1, 0.0))
    return ops.cast(ops.where(ops.expand_dims(swap, -1), 1.0 - a, a), "int32")


def object_scores(features, objects):
    """The similarity score taken against the **object's** mean patch,
    ``(B, N)`` float32 in [-1, 1]: ``cos(f_i, mean of the l2-normalised
    f_j with objects_j == 1)``. Higher means more object-like; informed
    masking masks in this order inside each side of the split, and
    similarity hints are drawn with weights ``(1 + score) / 2``.

    The paper's similarity score compares each patch with the mean patch of
    the **whole image** (:func:`mean_token_similarity`). That mean is pulled
    towards whichever side is larger or more uniform, so it does not tell
    object from background by itself (on Fashion-MNIST the blank background
    sits nearest to it); the mean patch of the side found to be the object
    keeps the score's form and points at the object. With no object patch
    (an empty side) the whole image's mean patch is used.

    Example:
    >>> import numpy as np
    >>> f = np.array([[[1.0, 0.0]] * 3 + [[0.6, 0.8]]], "float32")   # the odd patch out is the object
    >>> [round(float(v), 2) for v in np.asarray(object_scores(f, np.array([[0, 0, 0, 1]])))[0]]
    [0.6, 0.6, 0.6, 1.0]
    """
    f = l2_normalize(features)
    o = ops.cast(ops.convert_to_tensor(objects), "float32")
    if len(o.shape) != 2:
        raise ValueError(f"objects must have shape (batch, tokens), got {tuple(o.shape)}.")
    weights = ops.where(ops.greater(ops.sum(o, axis=1, keepdims=True), 0.0), o, ops.ones_like(o))
    center = ops.sum(f * ops.expand_dims(weights, -1), axis=1, keepdims=True)
    center = center / (ops.sqrt(ops.sum(ops.square(center), axis=-1, keepdims=True)) + EPSILON)
    return ops.sum(f * center, axis=-1)


def feature_variance(features):
    """sigma_F per image, ``(B,)``: the variance of the l2-normalised token
    embeddings around their mean, averaged over the feature dimensions::

        f_i = x_i / ||x_i||,   mu = mean_i f_i,
        sigma_F = 1/(N D) * sum_i sum_d (f_id - mu_d)^2   (= (1 - ||mu||^2) / D)

    (population variance over the ``N`` tokens). 0 when all tokens point the
    same way; ``1/D`` at most.

    Example:
    >>> import numpy as np
    >>> round(float(feature_variance(np.array([[[1.0, 0.0], [-1.0, 0.0]]]))[0]), 4)
    0.5
    """
    f = l2_normalize(features)
    mu = ops.mean(f, axis=1, keepdims=True)
    return ops.mean(ops.square(f - mu), axis=(1, 2))


def _off_diagonal(n):
    return 1.0 - ops.eye(n, dtype="float32")


def similarity_variance(features):
    """sigma_s per image, ``(B,)``: the (population) variance of the ``N(N-1)``
    off-diagonal entries of the cosine-similarity matrix ``M`` (the diagonal,
    all ones, is left out). Polarised similarities -- clear patch clusters --
    give a large value.

    Example:
    >>> import numpy as np
    >>> round(float(similarity_variance(np.array([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]]))[0]), 4)
    0.8889
    """
    m = token_similarity(features)
    n = m.shape[1] if m.shape[1] is not None else ops.shape(m)[1]
    off = _off_diagonal(n)[None]
    count = ops.cast(n * (n - 1), "float32")
    mean = ops.sum(m * off, axis=(1, 2)) / count
    dev = (m - mean[:, None, None]) * off
    return ops.sum(ops.square(dev), axis=(1, 2)) / count


def cluster_gap(features, assignments):
    """mu_intra - mu_inter per image, ``(B,)`` (Figure 3a of the paper).

    ``mu_intra`` is the mean cosine similarity over ordered pairs ``i != j``
    in the same cluster (self pairs excluded), ``mu_inter`` over pairs in
    different clusters. A mean over no pair (a singleton/empty cluster, so no
    intra pair or no inter pair) counts as 0.

    Args:
        features: ``(B, N, D)`` token features.
        assignments: ``(B, N)`` cluster ids in {0, 1} (e.g. from
            :func:`bipartition`).

    Example:
    >>> import numpy as np
    >>> feats = np.array([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]]])
    >>> round(float(cluster_gap(feats, np.array([[0, 0, 1, 1]]))[0]), 4)
    2.0
    """
    m = token_similarity(features)
    a = ops.cast(assignments, "float32")
    if tuple(a.shape) != tuple(m.shape[:2]) and None not in a.shape and None not in m.shape:
        raise ValueError(
            f"assignments must have shape (batch, tokens) = {tuple(m.shape[:2])} to match the features, "
            f"got {tuple(a.shape)}."
        )
    n = m.shape[1] if m.shape[1] is not None else ops.shape(m)[1]
    same = a[:, :, None] * a[:, None, :] + (1.0 - a[:, :, None]) * (1.0 - a[:, None, :])
    intra = same * _off_diagonal(n)[None]
    inter = 1.0 - same
    mu_intra = _masked_mean(m, intra, axis=(1, 2))
    mu_inter = _masked_mean(m, inter, axis=(1, 2))
    return mu_intra - mu_inter
