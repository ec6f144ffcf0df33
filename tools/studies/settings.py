"""LC-MAE Table 1: the loss settings (a)-(g), with the collapse of (c)."""

import itertools

from studies import base, report

NAME = "settings"
TITLE = "Loss settings (a)-(g)"
SOURCE = "LC-MAE paper, Table 1 and Sec. 3"
SUMMARY = (
    "LC-MAE pretrained under each combination of its three losses (L_MAE, L_cross, L_in), each encoder "
    "judged by finetuning (the paper's measure), a linear probe and a kNN; `v_std` is the collapse "
    "indicator (the std of the l2-normalised projector outputs across tokens: about 1/sqrt(d) when "
    "healthy, 0 when collapsed), read from the last pretraining epoch."
)
SETTINGS = "abcdefg"
WEIGHTS = {
    "a": "MAE + cross + in",
    "b": "MAE only",
    "c": "cross",
    "d": "in",
    "e": "MAE + cross",
    "f": "MAE + in",
    "g": "cross + in",
}
PAPER_FT = {"a": 83.0, "b": 82.9, "c": None, "d": 82.2, "e": 83.1, "f": 82.8, "g": 82.5}
SEEDED = "abe"  # the settings run under every seed of the profile
COLLAPSED = 0.25  # v_std below this fraction of 1/sqrt(d) counts as collapsed


def plan(scale):
    groups = {}
    for s in SETTINGS:
        seeds = range(scale.seeds) if s in SEEDED else range(1)
        groups[s] = base.evaluated(scale, f"lcmae_{s}", seeds, method="lcmae", loss_weights=s)
    groups["random"] = base.random_init(scale, range(scale.seeds))
    return groups


def runs(scale):
    return base.group_runs(plan(scale))


def report_page(scale, results, page, figure_path):
    groups = plan(scale)
    ft, lp, knn = results.accuracies(groups)
    vstd = {s: results.values(groups[s].pretrain, "v_std") for s in SETTINGS}
    healthy = 1 / scale.pretrain_flags["projector_dim"] ** 0.5
    collapsed = {s: report.mean(v) < COLLAPSED * healthy for s, v in vstd.items()}
    spread = {
        "finetune": report.pooled_std(list(ft.values())),
        "linprobe": report.pooled_std(list(lp.values())),
        "knn": report.pooled_std(list(knn.values())),
    }

    rows = []
    for k in [*SETTINGS, "random"]:
        rows.append(
            [
                f"({k})" if k in SETTINGS else k,
                WEIGHTS.get(k, "-"),
                PAPER_FT.get(k) or ("collapse" if k == "c" else "78.6" if k == "random" else "-"),
                report.mean_std(ft[k]),
                report.mean_std(lp[k]),
                report.mean_std(knn[k]),
                (report.mean_std(vstd[k], scale=1.0, digits=4) + (" (collapsed)" if collapsed[k] else ""))
                if k in SETTINGS
                else "-",
            ]
        )
    page.section(
        "Results",
        report.table(["Setting", "Losses", "Paper FT %", "FT top-1 %", "LP top-1 %", "kNN top-1 %", "v_std"], rows)
        + f"\n\nMean ± std over seeds (count in brackets). Healthy `v_std` is about 1/sqrt({scale.pretrain_flags['projector_dim']}) "
        f"= {healthy:.4f}; below {COLLAPSED:g} of that counts as collapsed. Random init: the same encoder "
        "architecture, not pretrained, under the same protocols (the paper's 78.6 is its ImageNet finetune).",
    )

    def cmp(metric, a, b):
        values = {"finetune": ft, "linprobe": lp, "knn": knn}[metric]
        return report.compare(values[a], values[b], spread[metric])

    # ---- findings
    c = vstd["c"]
    others = [s for s in SETTINGS if s != "c"]
    if collapsed["c"]:
        verdict = report.REPRODUCED if not any(collapsed[s] for s in others) else report.NOT_AT_SCALE
    else:
        verdict = report.NOT_AT_SCALE
    page.finding(
        "Cross-view loss alone, setting (c), collapses",
        "collapse",
        f"v_std (c) {report.mean(c):.4f} vs healthy {healthy:.4f}; lowest other setting "
        f"{min(report.mean(vstd[s]) for s in others):.4f}",
        verdict,
    )
    guarded = ("e", "g")
    page.finding(
        "The reconstruction loss (e) or the in-view loss (g) prevents it",
        "no collapse in (e), (g)",
        "; ".join(f"v_std ({s}) {report.mean(vstd[s]):.4f}" for s in guarded),
        report.CONTRADICTED
        if any(collapsed[s] for s in guarded)
        else (report.REPRODUCED if collapsed["c"] else report.NOT_AT_SCALE),
    )
    for claim, a, b, paper in (
        ("LC-MAE (a) improves slightly on MAE (b)", "a", "b", "+0.1"),
        ("The reconstruction loss helps: (a) vs (g)", "a", "g", "+0.5"),
        ("The reconstruction loss helps: (f) vs (d)", "f", "d", "+0.6"),
        ("The cross-view loss helps: (g) vs (d)", "g", "d", "+0.3"),
        ("The cross-view loss helps: (a) vs (f)", "a", "f", "+0.2"),
        ("The in-view loss costs a little: (e) vs (a)", "e", "a", "+0.1"),
        ("Without reconstruction (g) still beats random init", "g", "random", "+3.9"),
    ):
        comparison = cmp("finetune", a, b)
        page.finding(
            f"{claim} (FT)", f"{paper} pt", report.diff_text(comparison), report.directional_verdict(comparison)
        )

    # ---- which differences exceed the seed spread
    lines = []
    for metric, label in (("finetune", "FT"), ("linprobe", "LP"), ("knn", "kNN")):
        beyond = []
        for a, b in itertools.combinations([*SETTINGS, "random"], 2):
            comparison = cmp(metric, a, b)
            if comparison["exceeds"]:
                hi, lo = (a, b) if comparison["diff"] > 0 else (b, a)
                beyond.append(f"{_name(hi)} > {_name(lo)} by {100 * abs(comparison['diff']):.1f}")
        spread_text = f"{100 * spread[metric].value:.2f} pt" if spread[metric] is not None else "unknown"
        lines.append(
            f"- **{label}** (per-run spread over seeds {spread_text}): "
            + ("; ".join(beyond) if beyond else "no difference exceeds the margin")
            + "."
        )
    page.section(
        "Differences beyond the seed spread",
        "Every pair of settings whose difference exceeds the margin, per metric. Exploratory: with "
        f"{len(SETTINGS) + 1} groups there are {(len(SETTINGS) + 1) * len(SETTINGS) // 2} pairs per metric, so at a 5 % "
        "level about one pair in twenty crosses the margin by chance.\n\n" + "\n".join(lines),
    )

    from studies import plots

    labels = [f"({s})" for s in SETTINGS] + ["rand"]
    keys = [*SETTINGS, "random"]
    plots.bars(
        figure_path,
        labels,
        [
            ("finetune top-1 %", [ft[k] for k in keys]),
            ("linear probe top-1 %", [lp[k] for k in keys]),
            ("kNN top-1 %", [knn[k] for k in keys]),
        ],
        paper=("finetune %", [PAPER_FT.get(k) for k in SETTINGS] + [78.6]),
    )
    page.figure(
        figure_path.rsplit("/", 1)[-1],
        "Finetune, linear probe and kNN accuracy per setting (bars: mean, dots: seeds); right: the paper's finetune.",
    )


def _name(key):
    return f"({key})" if key in SETTINGS else key
