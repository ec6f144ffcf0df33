"""LC-MAE Fig. 6: the encoder's attention distance grows with the mask ratio."""

from studies import base, report

NAME = "mask_ratio"
TITLE = "Mask ratio and attention distance"
SOURCE = "LC-MAE paper, Fig. 6 and Sec. 4.2"
SUMMARY = (
    "MAE pretrained at mask ratios 0.3 to 0.9; for each encoder, the mean attention distance per layer "
    "(the attention-weighted distance in pixels between query and key patches, on all patches of "
    "held-out images: the encoder's effective receptive field)."
)
RATIOS = (0.3, 0.45, 0.6, 0.75, 0.9)


def plan(scale):
    models = {}
    for ratio in RATIOS:
        seeds = range(scale.seeds) if ratio == 0.75 else range(scale.few_seeds)
        label = "mae" if ratio == 0.75 else f"mae_r{ratio:g}"
        extra = {} if ratio == 0.75 else dict(mask_ratio=ratio)
        models[ratio] = [scale.pretrain(label, s, method="mae", **extra) for s in seeds]
    analyses = {
        ratio: [scale.analyze("attention-distance", m, m.name[len("pretrain_") :], path="encoder.keras") for m in runs_]
        for ratio, runs_ in models.items()
    }
    return models, analyses


def runs(scale):
    models, analyses = plan(scale)
    out = []
    for ratio in RATIOS:
        out += models[ratio] + analyses[ratio]
    return base.unique(out)


def report_page(scale, results, page, figure_path):
    models, analyses = plan(scale)
    # distance[ratio][seed][layer]
    distance = {
        ratio: [
            [float(r["distance_px"]) for r in results.csv_rows(a, "attention_distance") if r["part"] == "encoder"]
            for a in analyses[ratio]
        ]
        for ratio in RATIOS
    }
    depth = len(distance[RATIOS[0]][0])
    from keras_lcmae.analysis import mean_pairwise_distance

    patch = scale.encoder["patch_size"]
    grid = 32 // patch
    uniform = mean_pairwise_distance((grid, grid), patch)
    layer_mean = {
        ratio: [report.mean([s[layer] for s in distance[ratio]]) for layer in range(depth)] for ratio in RATIOS
    }
    overall = {ratio: [report.mean(s) for s in distance[ratio]] for ratio in RATIOS}
    spread = report.pooled_std(list(overall.values()))
    rows = [
        [f"{ratio:g}", *[f"{v:.2f}" for v in layer_mean[ratio]], report.mean_std(overall[ratio], scale=1.0, digits=2)]
        for ratio in RATIOS
    ]
    page.section(
        "Results",
        report.table(["Mask ratio", *[f"layer {i + 1} px" for i in range(depth)], "all layers px"], rows)
        + f"\n\nMean attention distance in pixels on 32-px images ({scale.analyze_flags['num_images']} test "
        "images, all patches, heads averaged), mean over seeds; the last column gives mean ± std over seeds. "
        f"Uniform attention over the {grid} x {grid} patches would give {uniform:.2f} px: the closer a layer "
        "is to it, the less local its attention.",
    )
    lo, hi = RATIOS[0], RATIOS[-1]
    growth = report.compare(overall[hi], overall[lo], spread)
    rho = report.spearman(RATIOS, [report.mean(overall[r]) for r in RATIOS])
    verdict = report.directional_verdict(growth)
    if verdict == report.REPRODUCED and rho < 0.8:
        verdict = report.NOT_AT_SCALE
    page.finding(
        "A larger mask ratio gives a larger attention distance",
        "monotone rise from 0.3 to 0.9",
        f"{hi:g} - {lo:g}: {report.diff_text(growth, scale=1.0, unit=' px', digits=2)}; "
        f"Spearman rho(ratio, distance) {rho:+.2f}; uniform attention {uniform:.2f} px",
        verdict,
    )
    # per seed: how much more the last layer's distance grows from lo to hi than the first layer's
    seeds = min(len(distance[lo]), len(distance[hi]))
    deeper = [
        (distance[hi][s][-1] - distance[lo][s][-1]) - (distance[hi][s][0] - distance[lo][s][0]) for s in range(seeds)
    ]
    margin = 2 * report.std(deeper) / len(deeper) ** 0.5 if len(deeper) > 1 else None
    comparison = {
        "diff": report.mean(deeper),
        "margin": margin,
        "exceeds": margin is not None and abs(report.mean(deeper)) > margin,
    }
    page.finding(
        "The effect is larger in the deeper layers",
        "the curves spread apart with depth",
        f"growth {lo:g} -> {hi:g} in layer {depth} minus that in layer 1: "
        + report.diff_text(comparison, scale=1.0, unit=" px", digits=2),
        report.directional_verdict(comparison),
    )

    from studies import plots

    plots.curves(
        figure_path,
        [("encoder attention distance", "distance (px)", {f"r={r:g}": layer_mean[r] for r in RATIOS}, None)],
        xlabel="encoder layer",
        hline=(uniform, "uniform attention"),
    )
    page.figure(
        figure_path.rsplit("/", 1)[-1],
        "Mean attention distance per encoder layer, one line per mask ratio; dashed: uniform attention.",
    )
