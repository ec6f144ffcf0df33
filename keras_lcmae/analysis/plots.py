"""Figures of the analysis tools (matplotlib, Agg backend: no display needed).

Each function draws one figure in the style of the LC-MAE paper and saves it
as a PNG at ``path``.
"""

import numpy as np

from keras_lcmae.ops import to_2tuple


def _pyplot():
    import matplotlib  # optional; the backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi=110, palette=False):
    """Saves ``fig`` as a PNG; ``palette``: 256 adaptive colours, a third of
    the bytes for pictures of photos."""
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    if palette:
        from PIL import Image

        with Image.open(path) as image:
            small = image.convert("RGB").quantize(colors=256)
        small.save(path, optimize=True)
    return path


def _show(ax, image, **kwargs):
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1, **kwargs)
    else:
        ax.imshow(image, **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def attention_distance_figure(
    parts, path, title="Mean attention distance", uniform=None, ylabel="attention distance (px)"
):
    """Fig. 5 / A.1 style: per layer, one dot per head and the head mean.

    ``parts`` maps a name (``"encoder"``, ``"decoder"``) to a ``(layers,
    heads)`` array of distances in pixels; one panel per part. ``uniform``
    (the distance of uniform attention) is drawn as a dashed line.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(parts), figsize=(4.2 * len(parts), 3.4), squeeze=False)
    for ax, (name, per_head) in zip(axes[0], parts.items()):
        per_head = np.asarray(per_head)
        layers = np.arange(1, per_head.shape[0] + 1)
        for h in range(per_head.shape[1]):
            ax.scatter(layers, per_head[:, h], s=14, alpha=0.6, label="heads" if h == 0 else None)
        ax.plot(layers, per_head.mean(axis=1), "k-o", ms=4, label="mean")
        ax.set_xlabel(f"{name} layer")
        ax.set_ylabel(ylabel)
        ax.set_xticks(layers)
        if uniform:
            ax.axhline(uniform, color="grey", ls="--", lw=1, label="uniform attention")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{title}: {name}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def layer_curve_figure(values, path, ylabel, title):
    """Fig. 2 / Fig. 3 style: one value per decoder layer, as bars."""
    plt = _pyplot()
    values = np.asarray(values, "float64")
    layers = np.arange(1, len(values) + 1)
    fig, ax = plt.subplots(figsize=(3.2 + 0.4 * len(values), 3.2))
    ax.bar(layers, values, color="tab:blue")
    for x, v in zip(layers, values):
        ax.text(x, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(layers)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.set_ylim(min(0.0, float(values.min()) * 1.1), max(1.0, float(values.max()) * 1.1))
    ax.set_title(title)
    return _save(fig, path)


def attention_maps_figure(pixels, masked, maps, cls_weights, queries, grid_size, patch_size, path):
    """Fig. 4 / B.1 style grid. One row per image: input, masked input, then
    per decoder layer the head-averaged attention of the query over the
    patches (upsampled to pixels; a red circle marks the query) with the
    weight on ``[CLS]`` written in the corner.

    Args:
        pixels, masked: ``(R, H, W, C)`` images in [0, 1].
        maps: ``(R, L, N)`` attention over patches per row and layer.
        cls_weights: ``(R, L)`` attention on ``[CLS]``.
        queries: ``(R,)`` query patch index per row.
    """
    plt = _pyplot()
    rows, cols = to_2tuple(grid_size)
    r_count, l_count = maps.shape[:2]
    fig, axes = plt.subplots(r_count, 2 + l_count, figsize=(1.7 * (2 + l_count), 1.8 * r_count), squeeze=False)
    for r in range(r_count):
        qy, qx = divmod(int(queries[r]), cols)
        centre = ((qx + 0.5) * patch_size - 0.5, (qy + 0.5) * patch_size - 0.5)
        _show(axes[r, 0], pixels[r])
        _show(axes[r, 1], masked[r])
        for ax in axes[r, :2]:
            ax.add_patch(plt.Circle(centre, patch_size * 0.45, color="red", fill=False, lw=1.5))
        for l in range(l_count):
            ax = axes[r, 2 + l]
            m = maps[r, l].reshape(rows, cols)
            ax.imshow(np.kron(m, np.ones((patch_size, patch_size))), cmap="viridis")
            ax.add_patch(plt.Circle(centre, patch_size * 0.45, color="red", fill=False, lw=1.5))
            ax.text(
                0.5,
                0.5,
                f"cls {cls_weights[r, l]:.2f}",
                color="white",
                fontsize=6,
                va="top",
                transform=ax.transData,
                bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0),
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"dec layer {l + 1}", fontsize=8)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=8)
            axes[r, 1].set_title("masked", fontsize=8)
    return _save(fig, path)


def image_columns_figure(columns, titles, path):
    """A grid with one row per image and one column per entry of
    ``columns`` (each ``(R, H, W, C)`` in [0, 1])."""
    plt = _pyplot()
    r_count = len(columns[0])
    fig, axes = plt.subplots(r_count, len(columns), figsize=(1.6 * len(columns), 1.6 * r_count), squeeze=False)
    for c, (images, title) in enumerate(zip(columns, titles)):
        for r in range(r_count):
            _show(axes[r, c], images[r])
        axes[0, c].set_title(title, fontsize=8)
    return _save(fig, path)


def cluster_maps_figure(pixels, assignments, grid_size, patch_size, path, layer_names):
    """Bipartition overlays: one row per image, a column per layer; cluster 1
    tinted red, cluster 0 blue, over the (grey) image.

    ``assignments`` ``(L, R, N)`` in {0, 1}."""
    plt = _pyplot()
    rows, cols = to_2tuple(grid_size)
    l_count, r_count = assignments.shape[:2]
    fig, axes = plt.subplots(r_count, 1 + l_count, figsize=(1.6 * (1 + l_count), 1.6 * r_count), squeeze=False)
    for r in range(r_count):
        _show(axes[r, 0], pixels[r])
        grey = pixels[r].mean(axis=-1)
        for l in range(l_count):
            a = np.kron(assignments[l, r].reshape(rows, cols), np.ones((patch_size, patch_size)))
            colour = np.stack([a, np.zeros_like(a), 1 - a], axis=-1)
            _show(axes[r, 1 + l], np.clip(0.55 * grey[..., None] + 0.45 * colour, 0.0, 1.0))
            if r == 0:
                axes[r, 1 + l].set_title(layer_names[l], fontsize=7)
        if r == 0:
            axes[r, 0].set_title("input", fontsize=8)
    return _save(fig, path)


def clustering_curves_figure(table, path):
    """sigma_F, sigma_s and the intra-inter gap per layer (encoder layers,
    then decoder layers), one panel each. ``table``: list of dicts with
    ``part``, ``layer`` and the three metrics."""
    plt = _pyplot()
    names = ("feature_variance", "similarity_variance", "cluster_gap")
    labels = [f"{row['part'][0]}{row['layer']}" for row in table]
    x = np.arange(len(table))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    n_enc = sum(row["part"] == "encoder" for row in table)
    for ax, name in zip(axes, names):
        ax.plot(x, [row[name] for row in table], "-o", ms=4)
        if 0 < n_enc < len(table):
            ax.axvline(n_enc - 0.5, color="red", ls=":")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(name)
    return _save(fig, path)


def sweep_figure(curves, path, uniform=None):
    """Fig. 6 style: encoder attention distance per layer, one line per mask
    ratio. ``curves`` maps the ratio to a ``(layers,)`` array; ``uniform``
    (the distance of uniform attention) is drawn as a dashed line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for ratio in sorted(curves):
        values = np.asarray(curves[ratio])
        ax.plot(np.arange(1, len(values) + 1), values, "-o", ms=4, label=f"mask ratio {ratio:g}")
    if uniform:
        ax.axhline(uniform, color="grey", ls="--", lw=1, label="uniform attention")
    ax.set_xticks(np.arange(1, max(len(v) for v in curves.values()) + 1))
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("mean attention distance (px)")
    ax.set_ylim(bottom=0)
    ax.set_title("Attention distance vs mask ratio")
    ax.legend(fontsize=7)
    return _save(fig, path)


def epoch_curves_figure(rows, metrics, path):
    """Self-guided MAE Fig. 3/4 style: one panel per metric, its value over
    the epochs of a run, one line per (part, layer). ``rows``: dicts with
    ``epoch``, ``part``, ``layer`` and the metrics; ``metrics`` maps a
    metric name to its axis label."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.3), squeeze=False)
    lines = sorted({(r["part"], r["layer"]) for r in rows}, key=lambda k: (k[0] != "encoder", k[1]))
    for ax, (name, label) in zip(axes[0], metrics.items()):
        for part, layer in lines:
            pts = sorted((r["epoch"] or 0, r[name]) for r in rows if (r["part"], r["layer"]) == (part, layer))
            ax.plot([e for e, _ in pts], [v for _, v in pts], "-o", ms=3, label=f"{part} {layer}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _patch_overlay(ax, grid_size, patch_size, values, color, alpha):
    rows, cols = to_2tuple(grid_size, "grid_size")
    overlay = np.zeros((rows * patch_size, cols * patch_size, 4))
    grid = np.asarray(values, "float64").reshape(rows, cols)
    cell = np.kron(grid, np.ones((patch_size, patch_size)))
    overlay[..., :3] = color
    overlay[..., 3] = cell * alpha
    ax.imshow(overlay)


def informed_masks_figure(pixels, objects, random_masks, informed_masks, grid_size, patch_size, path):
    """Self-guided MAE Fig. 5 style, one row per image: input | the side of
    the split found to be the object (red) | a random mask | the informed
    mask (masked patches dark; the object's visible patches in green: the
    hints, and the patches beyond the masked budget when the object is
    larger)."""
    plt = _pyplot()
    n = len(pixels)
    fig, axes = plt.subplots(n, 4, figsize=(6.4, 1.7 * n), squeeze=False)
    for r in range(n):
        img = np.asarray(pixels[r])
        for c in range(4):
            _show(axes[r, c], img)
        _patch_overlay(axes[r, 1], grid_size, patch_size, objects[r], (1.0, 0.1, 0.1), 0.55)
        _patch_overlay(axes[r, 2], grid_size, patch_size, random_masks[r], (0.05, 0.05, 0.2), 0.85)
        _patch_overlay(axes[r, 3], grid_size, patch_size, informed_masks[r], (0.05, 0.05, 0.2), 0.85)
        hints = np.asarray(objects[r]) * (1 - np.asarray(informed_masks[r]))
        _patch_overlay(axes[r, 3], grid_size, patch_size, hints, (0.1, 0.9, 0.1), 0.6)
    for c, title in enumerate(["input", "object (found)", "random mask", "informed mask"]):
        axes[0, c].set_title(title, fontsize=8)
    return _save(fig, path, dpi=80, palette=True)
