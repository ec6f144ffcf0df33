"""Self-guided MAE against MAE at the same budget (Shin et al. 2024, Tables 2,
3 and III), with the masks it makes."""

import shutil

from studies import base, early_clustering, report

NAME = "self_guided"
TITLE = "Self-guided MAE against MAE"
SOURCE = "Self-guided MAE (Shin et al. 2024), Tables 2, 3 and III, Figs. 1 and 5"
SUMMARY = (
    "MAE with self-guided informed masks (`--masking=self_guided`: the bipartition of the last encoder "
    "block's features of all patches, the side found to be the object masked first in the order of the "
    "similarity score, 5 % of the masked budget given back as hints) against MAE with random masks, on "
    "the schedule of the early_clustering study (whose MAE runs it shares). Informed masks start once "
    "the clustering has formed (the default, `AUTO_START_FRACTION` of the run) or from the first step, "
    "with similarity or random hints. Judged by the linear probe and kNN on cached features, by the "
    "reconstruction MSE of the masked patches under the same random masks for every model, and by how "
    "much of the Fashion-MNIST object (the patches with a pixel above 10 % of white) the informed masks "
    "cover."
)


def sg(scale, label, seeds, **flags):
    epochs, _ = early_clustering.schedule(scale)
    return [
        scale.pretrain(
            f"sgmae_{label}_{epochs}ep",
            s,
            method="mae",
            masking="self_guided",
            epochs=epochs,
            save_every=epochs,
            **flags,
        )
        for s in seeds
    ]


def start_epoch(scale):
    """The default start for the study's schedule, written into the flags so
    that a change of the library's constant gives new runs."""
    from keras_lcmae.masking import SelfGuidedMasking

    epochs, _ = early_clustering.schedule(scale)
    return SelfGuidedMasking().start_epoch(epochs)


def plan(scale):
    seeds, few = range(scale.seeds), range(scale.few_seeds)
    start = start_epoch(scale)
    pretrains = {
        "mae": [early_clustering.pretrain(scale, s) for s in seeds],
        "sg": sg(scale, "sim", seeds, informed_start_epoch=start, hint_strategy="similarity"),
        "sg_random_hints": sg(scale, "rnd", few, informed_start_epoch=start, hint_strategy="random"),
        "sg_from_start": sg(scale, "sim0", few, informed_start_epoch=0, hint_strategy="similarity"),
    }
    groups, evals = {}, {}
    for key, runs in pretrains.items():
        groups[key] = base.Group(key, runs, [scale.linprobe(r, int(r.flag("seed"))) for r in runs])
        evals[key] = [
            {
                "reconstruction": scale.analyze(
                    "reconstruction", r, r.name[len("pretrain_") :], num_images=RECON_IMAGES, rows=4
                ),
                "masks": scale.analyze("informed-masks", r, r.name[len("pretrain_") :], num_images=RECON_IMAGES, rows=6)
                if key != "mae"
                else None,
            }
            for r in runs
        ]
    return groups, evals


RECON_IMAGES = 256


def runs(scale):
    groups, evals = plan(scale)
    out = []
    for key in ("mae", "sg", "sg_random_hints", "sg_from_start"):
        out += groups[key].runs()
        for e in evals[key]:
            out += [r for r in e.values() if r is not None]
    return base.unique(out)


NAMES = {
    "mae": "MAE (random masks)",
    "sg": "SG-MAE, similarity hints",
    "sg_random_hints": "SG-MAE, random hints",
    "sg_from_start": "SG-MAE, informed from step 0",
}


def report_page(scale, results, page, figure_path):
    groups, evals = plan(scale)
    keys = list(NAMES)
    lp = {k: results.top1(g, "linprobe") for k, g in groups.items()}
    knn = {k: results.knn(g) for k, g in groups.items()}
    mse = {k: [results.record(e["reconstruction"])["result"]["summary"]["masked_mse"] for e in evals[k]] for k in keys}
    cover = {k: [results.record(e["masks"])["result"]["summary"] for e in evals[k]] for k in keys if k != "mae"}
    start = start_epoch(scale)
    epochs, _ = early_clustering.schedule(scale)
    rows = []
    for k in keys:
        inf = [c["foreground_share_informed"] for c in cover[k]] if k in cover else None
        rnd = [c["foreground_share_random"] for c in cover[k]] if k in cover else None
        rows.append(
            [
                NAMES[k],
                report.mean_std(lp[k]),
                report.mean_std(knn[k]),
                report.mean_std(mse[k], scale=1.0, digits=4),
                report.mean_std(inf) if inf else "-",
                report.mean_std(rnd) if rnd else "-",
            ]
        )
    page.section(
        "Results",
        report.table(
            [
                "Pretraining",
                "Linear probe %",
                "kNN %",
                "Masked MSE",
                "Object share of informed masks %",
                "Object share of random masks %",
            ],
            rows,
        )
        + f"\n\nMean ± std over seeds (count in brackets). {epochs} epochs of the profile's steps; informed "
        f"masks from epoch {start} (the default start) or from epoch 0. Masked MSE: the reconstruction "
        f"error of the masked patches in normalised-image units, {RECON_IMAGES} test images, the same random "
        "masks for every model (so SG-MAE is scored on masks it did not train on, and with the norm-pix "
        "loss each reconstructed patch gets its true mean and spread back). Object share: the fraction of the masked patches that hold part of the "
        "Fashion-MNIST object, for the model's own informed masks at the end of training and for random "
        "masks of the same images.",
    )

    def versus(claim, paper, values, a, b, label, sign=1, scale=100.0, unit=" pt", digits=1):
        c = report.compare(values[a], values[b], report.pooled_std(list(values.values())))
        measured = f"{label} " + report.diff_text(c, scale=scale, unit=unit, digits=digits)
        page.finding(claim, paper, measured, report.directional_verdict(c, expected_sign=sign))

    versus(
        "Self-guided MAE probes above MAE at the same budget (Table 2)",
        "higher linear probing top-1",
        lp,
        "sg",
        "mae",
        "SG-MAE - MAE",
    )
    versus(
        "Self-guided MAE features are better for kNN than MAE's",
        "better representations (Table 2)",
        knn,
        "sg",
        "mae",
        "SG-MAE - MAE",
    )
    versus(
        "Self-guided MAE (with hints) reconstructs better than MAE (Table III)",
        "lower reconstruction MSE",
        mse,
        "sg",
        "mae",
        "SG-MAE - MAE",
        sign=-1,
        scale=1.0,
        unit="",
        digits=4,
    )
    gain = report.per_seed([x["foreground_share_informed"] - x["foreground_share_random"] for x in cover["sg"]])
    page.finding(
        "Informed masks cover the main object (Figs. 1 and 5)",
        "the mask falls on the object",
        "share of object patches among the masked ones, informed minus random " + report.diff_text(gain),
        report.directional_verdict(gain),
    )
    versus(
        "Similarity-score hints beat random hints (Table 3)",
        "similarity hints probe higher",
        lp,
        "sg",
        "sg_random_hints",
        "similarity - random hints",
    )
    versus(
        "Informed masks help once the clustering has formed, not from the first step (Sec. 4)",
        "informed masks built on the clustering MAE learns early",
        lp,
        "sg",
        "sg_from_start",
        f"start at epoch {start} - start at epoch 0",
    )

    from studies import plots

    labels = ["MAE", "SG sim", "SG rnd", "SG @0"]
    plots.bars(
        figure_path, labels, [("linear probe top-1 %", [lp[k] for k in keys]), ("kNN top-1 %", [knn[k] for k in keys])]
    )
    page.figure(figure_path.rsplit("/", 1)[-1], "Linear probe and kNN accuracy (bars: mean, dots: seeds).")
    masks_name = figure_path[: -len(".png")] + "_masks.png"
    shutil.copyfile(results.runner.path(evals["sg"][0]["masks"], "informed_masks.png"), masks_name)
    page.figure(
        masks_name.rsplit("/", 1)[-1],
        "The informed masks of the seed-0 SG-MAE at the end of training (Fig. 5 at this scale): input, the "
        "side of the split found to be the object (red), a random mask and the informed mask (masked "
        "patches dark; visible object patches green).",
    )
