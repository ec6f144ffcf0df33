#!/usr/bin/env python
"""The LC-MAE paper's findings, rerun at a scale you can afford, each
ending in a results page with a verdict per finding.

    python tools/study.py settings                 # Table 1 on 2 CPU cores (--scale=cpu)
    python tools/study.py decoders --smoke         # every run cut to a few steps: checks the machinery
    python tools/study.py all --scale=gpu --dry_run  # the plan for one GPU, with the expected hours

Studies: settings (Table 1), autoencoder (Table 3), decoders (Table 2),
decoder_analysis (Figs. 2-3), mask_ratio (Fig. 6), single_image (Table A.1),
or ``all``. Each is a list of runs of ``recipes/pretrain.py``,
``linprobe.py``, ``finetune.py`` and ``tools/analyze.py`` with fixed
seeds, each in its own folder under ``--runs_dir`` (named after the run
and a hash of its flags). A finished run is reused (``--noreuse``: run it
again), so an interrupted study resumes where it stopped, studies share the
runs they have in common, and a rerun of a finished study rewrites the same
page. The page goes to ``--results_dir/<study>.md`` (with its figure and a
JSON summary), and ``--results_dir/README.md`` is rewritten with every
finding so far. ``--smoke`` writes under ``<runs_dir>/smoke`` by default,
never over the committed pages. See docs/studies.md.
"""

import os
import sys
import time

from absl import flags

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import cli  # noqa: E402  (tools/cli.py, importable once tools/ is on the path)
import studies  # noqa: E402
from studies import report  # noqa: E402
from studies.base import Results  # noqa: E402
from studies.runner import ROOT, RunFailed, Runner  # noqa: E402
from studies.scale import PROFILES, Scale  # noqa: E402

FLAGS = cli.new_flags()
flags.DEFINE_enum("scale", "cpu", list(PROFILES), "Profile: model size, schedules and seeds.", flag_values=FLAGS)
flags.DEFINE_bool("smoke", False, "A few steps per run: checks that the study runs end to end.", flag_values=FLAGS)
flags.DEFINE_bool("reuse", True, "Reuse finished runs (--noreuse: run every run again).", flag_values=FLAGS)
flags.DEFINE_bool("dry_run", False, "Print the runs and the expected hours; run nothing.", flag_values=FLAGS)
flags.DEFINE_string(
    "runs_dir", None, "Run folders (default: runs/studies/<scale>, runs/studies/smoke with --smoke).", flag_values=FLAGS
)
flags.DEFINE_string(
    "results_dir",
    None,
    "Pages, figures and the index (default: docs/results; <runs_dir>/results with --smoke).",
    flag_values=FLAGS,
)


def command_line(name):
    """The command a page names: the study at its scale."""
    parts = ["python tools/study.py", name]
    if FLAGS.scale != "cpu":
        parts.append(f"--scale={FLAGS.scale}")
    if FLAGS.smoke:
        parts.append("--smoke")
    return " ".join(parts)


def dry_run(names, scale, runner):
    """Prints each study's runs (done or to do) and the expected hours of
    those to do; the total counts a run that studies share once."""
    everything = {}
    for name in names:
        planned = studies.load(name).runs(scale)
        todo = [r for r in planned if runner.finished(r) is None]
        everything.update((r.key, r) for r in todo)
        print(f"{name}: {len(planned)} runs, {len(todo)} to run, about {scale.estimated_hours(todo):.1f} h")
        for run in planned:
            state = "todo" if run in todo else "done"
            print(f"  [{state}] {' '.join(runner.command(run)[1:])}")
    print(
        f"total: {len(everything)} runs, about {scale.estimated_hours(everything.values()):.1f} h on one "
        f"{'accelerator' if scale.name == 'gpu' else 'machine'} (an estimate from the model FLOPs at "
        f"{scale.speed['tflops']:g} TFLOP/s and at least {1000 * scale.speed['min_step_s']:g} ms a step, "
        "not a measurement)"
    )


def run_study(name, scale, runner, results_dir):
    study = studies.load(name)
    start = time.time()
    results = Results(runner)
    records = [results.record(run) for run in study.runs(scale)]
    page = report.Page(name, study.TITLE, study.SOURCE, study.SUMMARY)
    study.report_page(scale, results, page, os.path.join(results_dir, f"{name}.png"))
    path = report.write_page(page, results_dir, command_line(name), scale, records)
    report.write_index(results_dir, studies.ORDER)
    print(f"[study] {name}: {path} ({len(runner.ran)} runs run, {time.time() - start:.0f} s)", file=sys.stderr)
    for finding in page.findings:
        print(f"  {finding.verdict:>17}: {finding.claim} ({finding.measured})", file=sys.stderr)
    return path


def main(argv=None):
    """Runs the study; ``argv``: the command-line arguments (default
    ``sys.argv[1:]``). Returns the exit status."""
    rest = cli.parse(FLAGS, argv, __doc__)
    if len(rest) != 1:
        cli.fail(f"name one study: one of {', '.join(studies.ORDER)} or all (got {' '.join(rest) or 'none'}).")
    names = list(studies.ORDER) if rest[0] == "all" else [rest[0]]
    if names[0] not in studies.ORDER:
        cli.fail(f"unknown study {rest[0]!r}; choose one of {', '.join(studies.ORDER)} or all.")
    scale = Scale(FLAGS.scale, smoke=FLAGS.smoke)
    runs_dir = FLAGS.runs_dir or os.path.join(ROOT, "runs", "studies", "smoke" if FLAGS.smoke else FLAGS.scale)
    results_dir = FLAGS.results_dir or (
        os.path.join(runs_dir, "results") if FLAGS.smoke else os.path.join(ROOT, "docs", "results")
    )
    runner = Runner(runs_dir, reuse=FLAGS.reuse)
    if FLAGS.dry_run:
        dry_run(names, scale, runner)
        return 0
    for name in names:
        try:
            run_study(name, scale, runner, results_dir)
        except RunFailed as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
