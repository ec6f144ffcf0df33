"""The studies' figures: bars with the seeds shown, and curves per layer."""

import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(path, labels, panels, paper=None, paper_title="paper"):
    """One panel per metric: a bar per group at the mean, its seeds as dots,
    the standard deviation as an error bar. ``panels``: ``[(title, [values
    of group 0, values of group 1, ...]), ...]`` (fractions, shown in %);
    ``paper``: ``(title, [value or None per group])`` in %, drawn as an extra
    panel so the two can be read side by side."""
    from studies.report import mean, std

    plt = _pyplot()
    count = len(panels) + (1 if paper else 0)
    fig, axes = plt.subplots(1, count, figsize=(3.2 * count, 3.2), squeeze=False)
    x = list(range(len(labels)))
    for ax, (title, groups) in zip(axes[0], panels):
        means = [100 * mean(g) if g else float("nan") for g in groups]
        errors = [100 * std(g) if g else 0.0 for g in groups]
        ax.bar(x, means, yerr=errors, color="#8fb8de", capsize=3)
        for i, g in enumerate(groups):
            ax.plot([i] * len(g), [100 * v for v in g], "k.", markersize=4)
        finite = [m for m in means if m == m]
        if finite:
            low, high = min(finite), max(finite)
            pad = max(1.0, 0.6 * (high - low))
            ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x, labels, fontsize=8, rotation=30 if max(len(s) for s in labels) > 6 else 0)
    if paper:
        ax = axes[0][-1]
        title, values = paper
        ax.bar(x, [v if v is not None else float("nan") for v in values], color="#d9a66b")
        finite = [v for v in values if v is not None]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 2), min(100.0, max(finite) + 2))
        ax.set_title(f"{paper_title}: {title}", fontsize=9)
        ax.set_xticks(x, labels, fontsize=8, rotation=30 if max(len(s) for s in labels) > 6 else 0)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def curves(path, panels, xlabel="layer", hline=None):
    """Line panels: ``[(title, ylabel, {label: [y per x]}, xs or None), ...]``
    (x runs from 1 when ``xs`` is None); ``hline``: ``(y, label)`` drawn
    dashed in every panel (a reference value)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.2), squeeze=False)
    for ax, (title, ylabel, lines, xs) in zip(axes[0], panels):
        for label, ys in lines.items():
            ax.plot(xs or list(range(1, len(ys) + 1)), ys, marker="o", markersize=3, label=str(label))
        if hline is not None:
            ax.axhline(hline[0], color="gray", linestyle="--", linewidth=1, label=hline[1])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        if len(lines) > 1 or hline is not None:
            ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
