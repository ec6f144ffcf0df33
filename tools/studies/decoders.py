"""LC-MAE Table 2: decoders without attention do nearly as well."""

from studies import base, report

NAME = "decoders"
TITLE = "Decoders: transformer, Gaussian weighted average, convolution"
SOURCE = "LC-MAE paper, Table 2 and Sec. 4.1"
SUMMARY = (
    "MAE pretrained with its transformer decoder, with the non-parametric Gaussian weighted average "
    "+ MLP, and with one convolution, each judged by finetuning (the paper's measure), a linear probe "
    "and a kNN. The paper's sigma = 1 patch and 5 x 5 kernel cover 5/14 of its 14 x 14 patch grid; "
    "on this 8 x 8 grid the same share is sigma = 0.6 patch and a 3 x 3 kernel, used here (sigma = 1 "
    "and 5 x 5 would reach across most of the image and test a far less local decoder)."
)
DECODERS = {
    "transformer": ("Transformer", 82.9, {}),
    "gaussian": ("Weighted average", 82.5, dict(decoder="gaussian", decoder_sigma=0.6)),
    "conv": ("Conv layer", 82.9, dict(decoder="conv", decoder_kernel_size=3)),
}


def plan(scale):
    groups = {}
    for key, (_, _, flags) in DECODERS.items():
        label = "mae" if key == "transformer" else f"mae_{key}"
        seeds = range(scale.seeds) if key == "transformer" else range(scale.few_seeds)
        groups[key] = base.evaluated(scale, label, seeds, method="mae", **flags)
    groups["random"] = base.random_init(scale, range(scale.seeds))
    return groups


def runs(scale):
    return base.group_runs(plan(scale))


def report_page(scale, results, page, figure_path):
    groups = plan(scale)
    ft, lp, knn = results.accuracies(groups)
    spread = report.pooled_std(list(ft.values()))
    keys = [*DECODERS, "random"]
    rows = [
        [
            DECODERS[k][0] if k in DECODERS else "random init",
            DECODERS[k][1] if k in DECODERS else 78.6,
            report.mean_std(ft[k]),
            report.mean_std(lp[k]),
            report.mean_std(knn[k]),
        ]
        for k in keys
    ]
    page.section(
        "Results",
        report.table(["Decoder", "Paper FT %", "FT top-1 %", "LP top-1 %", "kNN top-1 %"], rows)
        + "\n\nMean ± std over seeds (count in brackets). The transformer decoder is the profile's "
        f"({scale.pretrain_flags['decoder_depth']} blocks, {scale.pretrain_flags['decoder_hidden_dim']} wide); "
        "the weighted average and the convolution have the same width.",
    )
    gain = report.compare(ft["transformer"], ft["random"], spread)
    page.finding(
        "MAE pretraining helps finetuning (the premise of the comparison)",
        "+4.3 pt (82.9 vs 78.6)",
        "transformer - random " + report.diff_text(gain),
        report.directional_verdict(gain),
    )
    for key, paper in (("gaussian", "-0.4"), ("conv", "+0.0")):
        comparison = report.compare(ft["transformer"], ft[key], spread)
        shown = report.compare(ft[key], ft["transformer"], spread)
        page.finding(
            f"A {DECODERS[key][0].lower()} decoder finetunes about as well as the transformer",
            f"{paper} pt",
            f"{key} - transformer " + report.diff_text(shown),
            report.equivalence_verdict(comparison, gain),
        )

    from studies import plots

    plots.bars(
        figure_path,
        ["transf.", "w. avg", "conv", "rand"],
        [
            ("finetune top-1 %", [ft[k] for k in keys]),
            ("linear probe top-1 %", [lp[k] for k in keys]),
            ("kNN top-1 %", [knn[k] for k in keys]),
        ],
        paper=("finetune %", [DECODERS[k][1] if k in DECODERS else 78.6 for k in keys]),
    )
    page.figure(
        figure_path.rsplit("/", 1)[-1],
        "Accuracy per decoder (bars: mean, dots: seeds); right: the paper's finetune.",
    )
