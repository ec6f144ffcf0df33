"""Self-guided MAE Figs. 3, 4 and 6: MAE clusters patches early in training.

It also measures the default start of informed masking
(``SelfGuidedMasking(informed_start_epoch=None)``): the fraction of the run
after which the cluster gap has formed.
"""

from studies import base, report

NAME = "early_clustering"
TITLE = "MAE learns patch clustering early"
SOURCE = "Self-guided MAE (Shin et al. 2024), Figs. 3, 4 and 6"
SUMMARY = (
    "MAE pretrained for a longer schedule than the other studies (cpu: 12 epochs of 100 steps) with a "
    "whole-model checkpoint after every epoch. On every checkpoint, per encoder layer on all patches of "
    "the same test images: mu_intra - mu_inter of the layer's bipartition (cosine similarity of the "
    "patch features, Fig. 3a) and the KL divergence of its token relations (attention rows) from "
    "those of the last checkpoint (Fig. 3b); per decoder layer, the exploitation rates of visible and "
    "mask tokens by the outputs at masked positions (Fig. 4); and on the last checkpoint the NMI "
    "of query and key positions per layer (Fig. 6)."
)
# (epochs, checkpoint every) of the run; an epoch is the profile's steps_per_epoch (cpu: 100 steps)
SCHEDULE = {"cpu": (12, 1), "gpu": (100, 5)}
SMOKE_SCHEDULE = (3, 1)
# a layer's clustering has formed at the first checkpoint whose gap reaches this share of its maximum
FORMED_SHARE = 0.9


def schedule(scale):
    return SMOKE_SCHEDULE if scale.smoke else SCHEDULE[scale.name]


def pretrain(scale, seed):
    """The checkpointed MAE run of ``seed`` (shared with the self_guided study)."""
    epochs, every = schedule(scale)
    return scale.pretrain(f"mae_{epochs}ep", seed, method="mae", epochs=epochs, save_every=every)


def plan(scale):
    runs = [pretrain(scale, s) for s in range(scale.seeds)]
    analyses = []
    for run in runs:
        label = run.name[len("pretrain_") :]
        analyses.append(
            {
                "clustering": scale.analyze("early-clustering", run, label, path="checkpoints"),
                "exploitation": scale.analyze("exploitation-rate", run, label, path="checkpoints"),
                "nmi": scale.analyze("attention-nmi", run, label),
            }
        )
    return runs, analyses


def runs(scale):
    pre, analyses = plan(scale)
    out = []
    for run, a in zip(pre, analyses):
        out += [run, a["clustering"], a["exploitation"], a["nmi"]]
    return base.unique(out)


def by_layer(rows, part, metric):
    """``{layer: [(epoch, value), ...]}`` of ``part``'s rows, by epoch."""
    out = {}
    for r in rows:
        if r["part"] == part:
            out.setdefault(int(r["layer"]), []).append((int(r["epoch"]), float(r[metric])))
    return {k: sorted(v) for k, v in sorted(out.items())}


def formed_epoch(curve, share=FORMED_SHARE):
    """The first epoch whose value reaches ``share`` of the curve's maximum
    (the last epoch when the maximum is not positive)."""
    top = max(v for _, v in curve)
    return next((e for e, v in curve if v >= share * top), curve[-1][0]) if top > 0 else curve[-1][0]


def report_page(scale, results, page, figure_path):
    from keras_lcmae.masking import AUTO_START_FRACTION

    pre, analyses = plan(scale)
    epochs, every = schedule(scale)
    steps = int(pre[0].flag("steps_per_epoch") or 0)
    seeds = len(pre)
    clustering = [results.csv_rows(a["clustering"], "early_clustering") for a in analyses]
    exploitation = [results.csv_rows(a["exploitation"], "exploitation_rate") for a in analyses]
    nmi = [results.csv_rows(a["nmi"], "attention_nmi") for a in analyses]
    gaps = [by_layer(rows, "encoder", "cluster_gap") for rows in clustering]
    kls = [by_layer(rows, "encoder", "token_kl") for rows in clustering]
    depth = len(gaps[0])
    last = depth
    checkpoints = [e for e, _ in gaps[0][last]]

    rows = []
    for i, epoch in enumerate(checkpoints):
        rows.append(
            [
                epoch,
                *[report.mean_std([g[layer][i][1] for g in gaps], scale=1.0, digits=3) for layer in gaps[0]],
                *[report.mean_std([k[layer][i][1] for k in kls], scale=1.0, digits=3) for layer in kls[0]],
            ]
        )
    per_epoch = f"{steps} steps" if steps else "one pass over the data"
    page.section(
        "Cluster gap and token relations over training",
        report.table(["Epoch", *[f"gap L{layer}" for layer in gaps[0]], *[f"KL L{layer}" for layer in kls[0]]], rows)
        + f"\n\nMean ± std over {seeds} seeds (count in brackets); an epoch is {per_epoch}; "
        f"{scale.analyze_flags['num_images']} test images; gap = mu_intra - mu_inter of the layer's "
        "bipartition (cosine similarity); KL = KL(last checkpoint || this one) of the attention rows.",
    )

    # Fig. 3a: the gap widens
    first_last = report.per_seed([g[last][-1][1] - g[last][0][1] for g in gaps])
    peak = [max(v for _, v in g[last]) for g in gaps]
    page.finding(
        "MAE widens the cluster gap mu_intra - mu_inter during training (Fig. 3a)",
        "the gap grows over training",
        f"last encoder layer, last checkpoint minus first {report.diff_text(first_last, scale=1.0, unit='', digits=3)}"
        f"; it peaks at {report.mean_std(peak, scale=1.0, digits=3)} at epoch "
        + ", ".join(str(max(g[last], key=lambda ev: ev[1])[0]) for g in gaps)
        + f" (per seed) and falls back to {report.mean_std([g[last][-1][1] for g in gaps], scale=1.0, digits=3)}"
        " by the end",
        report.directional_verdict(first_last),
    )
    # Fig. 3b: token relations converge early: most of the KL drop within the first quarter of the run
    quarter = max(1, epochs // 4)

    def early_share(curve):
        start = curve[0][1]
        at_quarter = next(v for e, v in curve if e >= quarter)
        return (start - at_quarter) / start if start > 0 else 0.0

    shares = [report.mean([early_share(k[layer]) for layer in k]) for k in kls]
    linear = (quarter - checkpoints[0]) / (checkpoints[-1] - checkpoints[0]) if checkpoints[-1] > checkpoints[0] else 0
    early = report.per_seed([s - linear for s in shares])
    page.finding(
        "Token relations converge drastically at early epochs (Fig. 3b)",
        "most of the KL to the converged relations is gone early",
        f"share of the KL drop done by epoch {quarter} of {epochs}, averaged over layers: "
        f"{report.mean_std(shares, digits=0)} %, against {100 * linear:.0f} % for a steady decline: "
        f"{report.diff_text(early)}",
        report.directional_verdict(early),
    )
    # Fig. 4: exploitation of mask tokens grows
    rates = [by_layer(rows, "decoder", "mask") for rows in exploitation]
    visible = [by_layer(rows, "decoder", "visible") for rows in exploitation]
    per_token = [by_layer(rows, "decoder", "mask_per_token") for rows in exploitation]
    dec_layers = list(rates[0])
    grow = report.per_seed([report.mean([r[layer][-1][1] - r[layer][0][1] for layer in r]) for r in rates])
    page.finding(
        "The decoder comes to exploit the mask tokens more as training goes on (Fig. 4)",
        "R_M->O grows and overtakes R_V->O after about 1/8 of training",
        f"R_M->O, last checkpoint minus first, mean over decoder layers {report.diff_text(grow, scale=1.0, unit='', digits=3)}"
        f"; at the last checkpoint R_M->O {report.mean_std([report.mean([r[l][-1][1] for l in r]) for r in rates], scale=1.0, digits=3)}"
        f" vs R_V->O {report.mean_std([report.mean([v[l][-1][1] for l in v]) for v in visible], scale=1.0, digits=3)}"
        f", per mask token {report.mean_std([report.mean([p[l][-1][1] for l in p]) for p in per_token], scale=1.0, digits=2)}"
        " of uniform attention (R_M->O > R_V->O here only because 75 % of the keys are mask tokens)",
        report.directional_verdict(grow),
    )
    # Fig. 6: NMI through the layers
    enc_nmi = [[float(r["nmi"]) for r in rows if r["part"] == "encoder"] for rows in nmi]
    dec_nmi = [[float(r["nmi"]) for r in rows if r["part"] == "decoder"] for rows in nmi]
    drop = report.per_seed([e[-1] - report.mean(d) for e, d in zip(enc_nmi, dec_nmi)])
    page.finding(
        "Attention NMI is higher at the end of the encoder than in the decoder (Fig. 6)",
        "NMI rises through the encoder, then falls in the decoder",
        f"last encoder layer minus mean decoder layer {report.diff_text(drop, scale=1.0, unit='', digits=3)}; "
        "encoder layers "
        + ", ".join(f"{report.mean([e[i] for e in enc_nmi]):.3f}" for i in range(len(enc_nmi[0])))
        + "; decoder layers "
        + ", ".join(f"{report.mean([d[i] for d in dec_nmi]):.3f}" for i in range(len(dec_nmi[0]))),
        report.directional_verdict(drop),
    )

    formed = [formed_epoch(g[last]) for g in gaps]
    fractions = [e / epochs for e in formed]
    page.section(
        "When informed masking starts by default",
        f"The last encoder layer's gap first reaches {100 * FORMED_SHARE:.0f} % of its maximum at epoch "
        + ", ".join(str(e) for e in formed)
        + f" of {epochs} (per seed): {report.mean_std(fractions, digits=0)} % of the run. "
        f"`SelfGuidedMasking(informed_start_epoch=None)` starts informed masks after "
        f"`AUTO_START_FRACTION` = {100 * AUTO_START_FRACTION:.0f} % of the epochs of the `fit` call "
        f"({'within' if min(fractions) <= AUTO_START_FRACTION <= max(fractions) else 'outside'} the range "
        "measured here).",
    )

    from studies import plots

    plots.curves(
        figure_path,
        [
            (
                "cluster gap, last encoder layer (Fig. 3a)",
                "mu_intra - mu_inter",
                {f"seed {i}": [v for _, v in g[last]] for i, g in enumerate(gaps)},
                checkpoints,
            ),
            (
                "token-relation KL to the last checkpoint (Fig. 3b)",
                "KL, mean of the seeds",
                {
                    f"layer {layer}": [report.mean([k[layer][i][1] for k in kls]) for i in range(len(checkpoints))]
                    for layer in kls[0]
                },
                checkpoints,
            ),
            (
                "exploitation rates (Fig. 4)",
                "share of a masked output's attention",
                {
                    **{
                        f"mask, layer {l}": [report.mean([r[l][i][1] for r in rates]) for i in range(len(checkpoints))]
                        for l in dec_layers
                    },
                    **{
                        f"visible, layer {l}": [
                            report.mean([v[l][i][1] for v in visible]) for i in range(len(checkpoints))
                        ]
                        for l in dec_layers
                    },
                },
                checkpoints,
            ),
        ],
        xlabel="epoch",
    )
    page.figure(
        figure_path.rsplit("/", 1)[-1],
        "Over the checkpoints of the run: the cluster gap per seed, the token-relation KL per encoder layer, "
        "and the exploitation rates per decoder layer (means of the seeds).",
    )
