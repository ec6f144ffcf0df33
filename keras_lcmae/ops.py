"""Tensor helpers shared by the models: patchify, sin-cos tables, gathers.

Everything here speaks ``keras.ops`` (or plain numpy for constant tables), so it
runs unchanged on the TensorFlow, JAX and PyTorch backends.

Conventions (the official MAE ones):

* images are NHWC, ``(B, H, W, C)``;
* a patch vector is laid out as ``(row-in-patch, col-in-patch, channel)``, and
  patches are numbered row-major over the ``(H/p, W/p)`` grid;
* position tables carry a leading all-zero row for the ``[CLS]`` token.
"""

import numpy as np
from keras import ops


def to_2tuple(value, name="value"):
    """Returns ``(value, value)`` for an int, or the pair given."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"`{name}` must be an int or a pair of ints, got {value!r}.")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def grid_shape(image_size, patch_size):
    """The ``(rows, cols)`` patch grid of an image, with a clear error when the
    image size is not a multiple of the patch size.

    Example:
    >>> grid_shape(224, 16)
    (14, 14)
    """
    h, w = to_2tuple(image_size, "image_size")
    ph, pw = to_2tuple(patch_size, "patch_size")
    if ph != pw:
        raise ValueError(f"Only square patches are supported, got patch_size={patch_size!r}.")
    if ph <= 0 or h <= 0 or w <= 0:
        raise ValueError(
            f"image_size and patch_size must be positive, got image_size={image_size!r}, patch_size={patch_size!r}."
        )
    if h % ph or w % pw:
        raise ValueError(
            f"image size {h}x{w} is not divisible by patch size {ph}: every side of the "
            f"image must be a multiple of the patch size (e.g. image_size={(h // ph) * ph or ph})."
        )
    return h // ph, w // pw


def patchify(images, patch_size):
    """Cuts NHWC images into flattened, non-overlapping patches.

    Args:
        images: ``(B, H, W, C)`` tensor; H and W multiples of ``patch_size``.
        patch_size: side of a square patch, ``p``.

    Returns:
        ``(B, N, p*p*C)`` with ``N = (H/p)*(W/p)``, each vector ordered
        ``(row-in-patch, col-in-patch, channel)`` exactly as the official MAE
        ``patchify`` (which does the same on NCHW input).

    Example:
    >>> x = np.zeros((2, 32, 32, 3), "float32")
    >>> tuple(patchify(x, 8).shape)
    (2, 16, 192)
    """
    shape = images.shape
    if len(shape) != 4:
        raise ValueError(f"patchify expects NHWC images of rank 4, got shape {tuple(shape)}.")
    h, w, c = shape[1], shape[2], shape[3]
    gh, gw = grid_shape((h, w), patch_size)
    p = int(patch_size)
    x = ops.reshape(images, (-1, gh, p, gw, p, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, gh * gw, p * p * c))


def unpatchify(patches, patch_size, grid_size=None):
    """Inverse of :func:`patchify`.

    Args:
        patches: ``(B, N, p*p*C)``.
        patch_size: ``p``.
        grid_size: ``(rows, cols)`` of the patch grid; square by default.

    Returns:
        ``(B, rows*p, cols*p, C)`` images.

    Example:
    >>> x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    >>> patches = patchify(x, 8)
    >>> np.array_equal(ops.convert_to_numpy(unpatchify(patches, 8)), x)
    True
    >>> tuple(unpatchify(patches[:, :8], 8, grid_size=(2, 4)).shape)    # the top half
    (2, 16, 32, 3)
    """
    n, dim = patches.shape[1], patches.shape[2]
    p = int(patch_size)
    if grid_size is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid_size=(rows, cols).")
        grid_size = (side, side)
    gh, gw = to_2tuple(grid_size, "grid_size")
    if gh * gw != n:
        raise ValueError(f"grid_size {gh}x{gw} does not hold {n} patches.")
    if dim % (p * p):
        raise ValueError(f"patch vectors of length {dim} are not p*p*C for patch_size={p}.")
    c = dim // (p * p)
    x = ops.reshape(patches, (-1, gh, gw, p, p, c))
    x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
    return ops.reshape(x, (-1, gh * p, gw * p, c))


def get_1d_sincos_pos_embed(embed_dim, positions):
    """``(M, embed_dim)`` sin-cos embedding of the given positions (numpy).

    The first half of each vector holds ``sin(pos * omega)``, the second half
    ``cos(pos * omega)``, with ``omega_k = 10000^(-k / (embed_dim/2))``.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {embed_dim}.")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Fixed 2-D sin-cos position table, laid out as the official MAE one.

    Half of each vector embeds the column (width) coordinate and the second
    half the row coordinate (the official meshgrid puts width first). Rows of
    the table follow the row-major patch order of :func:`patchify`.

    Args:
        embed_dim: width of the table; a multiple of 4.
        grid_size: int (square grid) or ``(rows, cols)``.
        cls_token: prepend an all-zero row for the ``[CLS]`` token.

    Returns:
        float32 numpy array ``(rows*cols [+1], embed_dim)``.

    Example:
    >>> get_2d_sincos_pos_embed(64, 4, cls_token=True).shape
    (17, 64)
    """
    if embed_dim % 4:
        raise ValueError(f"The 2-D sin-cos position table needs a width divisible by 4, got {embed_dim}.")
    gh, gw = to_2tuple(grid_size, "grid_size")
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
    emb = np.concatenate(
        [get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)],
        axis=1,
    )
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb.astype("float32")


def _bicubic_weights(n_in, n_out, a=-0.75):
    """``(n_out, n_in)`` matrix of 1-D bicubic resampling as
    ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``:
    source coordinate ``(i + 0.5) * n_in / n_out - 0.5``, Keys' cubic with
    ``a = -0.75``, taps outside the input clamped to its border, no
    antialiasing."""
    w = np.zeros((n_out, n_in), np.float64)
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src)
    t = src - base

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    taps = (far(t + 1), near(t), near(1 - t), far(2 - t))
    for k, coeff in enumerate(taps):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
        np.add.at(w, (np.arange(n_out), idx), coeff)
    return w


def resize_pos_embed(table, old_grid, new_grid, num_extra_tokens=1):
    """Resamples a position table to another patch grid, as official MAE's
    finetuning does when the resolution changes: the leading
    ``num_extra_tokens`` rows (``[CLS]``) are kept and the grid part is
    resized bicubically (PyTorch's ``interpolate(mode="bicubic",
    align_corners=False)``) as a ``(rows, cols)`` image per channel.

    Args:
        table: ``(1, extra + rows*cols, D)`` or ``(extra + rows*cols, D)``.
        old_grid, new_grid: ``(rows, cols)`` (or an int for a square grid).

    Returns:
        float32 numpy array with the input's rank, ``extra + new rows*cols`` rows.

    Example:
    >>> resize_pos_embed(get_2d_sincos_pos_embed(16, 4, cls_token=True), 4, 6).shape
    (37, 16)
    """
    table = np.asarray(table, np.float64)
    batched = table.ndim == 3
    t = table[0] if batched else table
    (oh, ow), (nh, nw) = to_2tuple(old_grid, "old_grid"), to_2tuple(new_grid, "new_grid")
    if t.ndim != 2 or t.shape[0] != num_extra_tokens + oh * ow:
        raise ValueError(
            f"A position table of shape {tuple(table.shape)} does not hold {num_extra_tokens} extra rows plus a "
            f"{oh}x{ow} grid."
        )
    extra, grid = t[:num_extra_tokens], t[num_extra_tokens:].reshape(oh, ow, -1)
    if (oh, ow) != (nh, nw):
        grid = np.einsum("ri,ijd,cj->rcd", _bicubic_weights(oh, nh), grid, _bicubic_weights(ow, nw))
    out = np.concatenate([extra, grid.reshape(nh * nw, -1)], axis=0).astype("float32")
    return out[None] if batched else out


def identity_ids(x):
    """``(B, N)`` int32 positions ``0 .. N-1`` for tokens ``x (B, N, D)``: the
    ``ids_restore`` of an unmasked, unshuffled sequence.

    Example:
    >>> ops.convert_to_numpy(identity_ids(np.zeros((2, 3, 4), "float32"))).tolist()
    [[0, 1, 2], [0, 1, 2]]
    """
    return ops.arange(x.shape[1], dtype="int32")[None] + ops.zeros_like(x[:, :, 0], dtype="int32")


def take_tokens(x, ids):
    """Gathers tokens along axis 1: ``x (B, N, D)``, ``ids (B, K)`` -> ``(B, K, D)``.

    Written as one row gather on the flattened ``(B*N, D)`` tensor: every
    backend does that natively (``tf.gather``, ``jnp.take``,
    ``index_select``), whereas ``take_along_axis`` with broadcast indices
    becomes a per-element gather behind two transposes on TensorFlow.
    """
    b = ops.shape(x)[0]
    n, d = x.shape[1], x.shape[2]
    k = ids.shape[1]
    offsets = ops.expand_dims(ops.arange(b, dtype="int32") * n, -1)
    rows = ops.reshape(ops.cast(ids, "int32") + offsets, (-1,))
    return ops.reshape(ops.take(ops.reshape(x, (-1, d)), rows, axis=0), (b, k, d))
