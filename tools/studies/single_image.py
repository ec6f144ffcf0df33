"""LC-MAE Table A.1: MAE pretrained on a single image still helps finetuning."""

from studies import base, report
from studies.scale import FULL_TRAIN

NAME = "single_image"
TITLE = "Pretraining on a single image"
SOURCE = "LC-MAE paper, Table A.1 and App. A"
SUMMARY = (
    "MAE pretrained on one image (the first Fashion-MNIST training image, an ankle boot, seen through "
    "fresh random crops and flips at every step) for the same number of steps as on the whole training "
    "set, against the whole set and against no pretraining, judged by finetuning."
)
PAPER = {"random": 78.6, "single": 81.8, "full": 82.9}


def plan(scale):
    steps = {}
    if "steps_per_epoch" not in scale.pretrain_flags:  # one image makes no epoch: as many steps as the full run
        steps = dict(steps_per_epoch=FULL_TRAIN // scale.pretrain_flags["batch_size"])
    return {
        "single": base.evaluated(
            scale, "mae_1img", range(scale.few_seeds), linprobe=False, method="mae", train_limit=1, **steps
        ),
        "full": base.evaluated(scale, "mae", range(scale.seeds), linprobe=False, method="mae"),
        "random": base.random_init(scale, range(scale.seeds), linprobe=False),
    }


def runs(scale):
    groups = plan(scale)
    return base.unique([r for key in ("random", "single", "full") for r in groups[key].runs()])


def report_page(scale, results, page, figure_path):
    groups = plan(scale)
    ft = {k: results.top1(g, "finetune") for k, g in groups.items()}
    spread = report.pooled_std(list(ft.values()))
    names = {"random": "random init", "single": "1 image", "full": "all 60,000 images"}
    rows = [[names[k], PAPER[k], report.mean_std(ft[k])] for k in ("random", "single", "full")]
    page.section(
        "Results",
        report.table(["Pretraining images", "Paper FT %", "FT top-1 %"], rows)
        + "\n\nMean ± std over seeds (count in brackets). The paper pretrained its single image for 5 epochs "
        "and ImageNet for 100; here both get the profile's number of steps.",
    )
    single = report.compare(ft["single"], ft["random"], spread)
    page.finding(
        "Pretraining on one image beats random init",
        f"{PAPER['single'] - PAPER['random']:+.1f} pt",
        "1 image - random " + report.diff_text(single),
        report.directional_verdict(single),
    )
    full = report.compare(ft["full"], ft["single"], spread)
    page.finding(
        "The whole dataset beats one image",
        f"{PAPER['full'] - PAPER['single']:+.1f} pt",
        "all - 1 image " + report.diff_text(full),
        report.directional_verdict(full),
    )

    from studies import plots

    keys = ("random", "single", "full")
    plots.bars(
        figure_path,
        ["random", "1 image", "all"],
        [("finetune top-1 %", [ft[k] for k in keys])],
        paper=("finetune %", [PAPER[k] for k in keys]),
    )
    page.figure(figure_path.rsplit("/", 1)[-1], "Finetune accuracy by pretraining data (bars: mean, dots: seeds).")
