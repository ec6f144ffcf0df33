"""LC-MAE Figs. 2-4: the first decoder layers attend by position, the deeper
ones by content."""

import shutil

from studies import base, report

NAME = "decoder_analysis"
TITLE = "What each decoder layer attends to"
SOURCE = "LC-MAE paper, Figs. 2-4 and Sec. 4.1"
SUMMARY = (
    "MAE pretrained with a deep transformer decoder; per decoder layer, the attention similarity S^attn "
    "(Eq. 7: cosine between the attention maps of different images under one shared mask; high = the "
    "layer attends by position) and the semantic similarity S^sim (Eq. 8: cosine between the layer's "
    "patch-similarity matrix and a reference model's; high = the layer groups patches by content). "
    "The paper's reference is DINO; none is available offline, so the reference here is a supervised "
    "ViT of the same size trained from scratch on Fashion-MNIST labels (the finetune protocol on a "
    "random encoder), whose last-layer patch features separate the classes. W is min-max rescaled "
    "(`--normalization=minmax`): the plain cosine matrix of a model this small is close to 1 everywhere."
)


def plan(scale):
    depth = scale.decoder_analysis_depth
    group = base.Group(
        f"decoder depth {depth}",
        [scale.pretrain(f"mae_dec{depth}", s, method="mae", decoder_depth=depth) for s in range(scale.few_seeds)],
    )
    reference = scale.finetune(None, 0)
    analyses = []
    for model in group.pretrain:
        label = model.name[len("pretrain_") :]
        analyses.append(
            {
                "attention": scale.analyze("attention-similarity", model, label),
                "semantic": scale.analyze(
                    "semantic-similarity", model, label, reference=(reference, "best.keras"), normalization="minmax"
                ),
            }
        )
    maps = scale.analyze("attention-maps", group.pretrain[0], group.pretrain[0].name[len("pretrain_") :], rows=2)
    return group, reference, analyses, maps


def runs(scale):
    group, reference, analyses, maps = plan(scale)
    out = [*group.pretrain, reference]
    for a in analyses:
        out += [a["attention"], a["semantic"]]
    return base.unique([*out, maps])


def report_page(scale, results, page, figure_path):
    group, reference, analyses, maps = plan(scale)
    s_attn = [[float(r["s_attn"]) for r in results.csv_rows(a["attention"], "attention_similarity")] for a in analyses]
    s_sim = [[float(r["s_sim"]) for r in results.csv_rows(a["semantic"], "semantic_similarity")] for a in analyses]
    depth = len(s_attn[0])
    ref_top1 = results.value(reference, "top1")
    header = [
        "Layer",
        *[f"S^attn seed {i}" for i in range(len(s_attn))],
        *[f"S^sim seed {i}" for i in range(len(s_sim))],
    ]
    rows = [
        [layer + 1, *[f"{s[layer]:.3f}" for s in s_attn], *[f"{s[layer]:.3f}" for s in s_sim]] for layer in range(depth)
    ]
    page.section(
        "Results",
        report.table(header, rows)
        + f"\n\n{depth} decoder layers; S^attn over {scale.analyze_flags['num_images']} test images under one "
        "shared random mask (masked queries, [CLS] key left out), S^sim over the same number of images "
        f"with random masks. Reference model: a supervised ViT of the profile trained from scratch "
        f"(test top-1 {100 * ref_top1:.1f} %).",
    )
    half = depth // 2
    first = report.per_seed([s[0] - max(s[1:]) for s in s_attn])
    page.finding(
        "S^attn is highest in the first decoder layer",
        "layer 1 highest (about 0.9)",
        "layer 1 minus the highest other layer "
        + report.diff_text(first, scale=1.0, unit="", digits=3)
        + "; highest at layer "
        + ", ".join(str(1 + max(range(depth), key=s.__getitem__)) for s in s_attn)
        + " (per seed)",
        report.directional_verdict(first),
    )
    shallow = report.per_seed([report.mean(s[:2]) - report.mean(s[2:]) for s in s_attn])
    page.finding(
        "The first two decoder layers rely on position more than the rest",
        f"S^attn of layers 1-2 clearly above layers 3-{depth}",
        f"layers 1-2 minus layers 3-{depth} " + report.diff_text(shallow, scale=1.0, unit="", digits=3),
        report.directional_verdict(shallow),
    )
    rhos = [report.spearman(range(depth), s) for s in s_sim]
    deeper = report.per_seed([report.mean(s[half:]) - report.mean(s[:half]) for s in s_sim])
    page.finding(
        "Deeper decoder layers are more semantic: S^sim grows with depth",
        "S^sim low in shallow layers, high in deep ones",
        f"second half of the layers minus first half {report.diff_text(deeper, scale=1.0, unit='', digits=3)}; "
        "Spearman rho(layer, S^sim) " + ", ".join(f"{r:+.2f}" for r in rhos) + " (per seed)",
        report.directional_verdict(deeper),
    )

    from studies import plots

    plots.curves(
        figure_path,
        [
            ("attention similarity (Eq. 7)", "S^attn", {f"seed {i}": s for i, s in enumerate(s_attn)}, None),
            ("semantic similarity (Eq. 8)", "S^sim", {f"seed {i}": s for i, s in enumerate(s_sim)}, None),
        ],
        xlabel="decoder layer",
    )
    page.figure(figure_path.rsplit("/", 1)[-1], "S^attn and S^sim per decoder layer, one line per seed.")
    maps_name = figure_path[: -len(".png")] + "_maps.png"
    shutil.copyfile(results.runner.path(maps, "attention_maps.png"), maps_name)
    page.figure(
        maps_name.rsplit("/", 1)[-1],
        "Fig. 4 at this scale (seed 0): input, masked input, and the attention of one masked query "
        "(marked) in each decoder layer.",
    )
