"""tools/study.py: the verdict rules against hand-computed numbers, the
runner's reuse / failure / sharing, every study end to end in its smoke
profile (a few steps per run), a rerun that reuses every run and rewrites
the same page, and the GPU plan."""

import json
import os
import re
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.tf_only]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import studies  # noqa: E402
import study  # noqa: E402
from studies import report  # noqa: E402
from studies.runner import Input, Run, RunFailed, Runner  # noqa: E402
from studies.scale import Scale  # noqa: E402


# --------------------------------------------------------------------------- rules
def test_pooled_std_and_compare_are_a_pooled_t_test():
    groups = [[0.80, 0.82, 0.81], [0.70, 0.74], [0.5]]
    pooled = np.sqrt((2 * np.var(groups[0], ddof=1) + 1 * np.var(groups[1], ddof=1)) / 3)
    spread = report.pooled_std(groups)
    assert spread.value == pytest.approx(pooled) and spread.dof == 3
    assert report.pooled_std([[1.0], [2.0]]) is None
    c = report.compare(groups[0], groups[2], spread)
    assert c["diff"] == pytest.approx(np.mean(groups[0]) - 0.5)
    assert c["margin"] == pytest.approx(3.182 * pooled * np.sqrt(1 / 3 + 1))  # t(0.975, 3 dof)
    assert c["exceeds"]
    # the one-sample version on differences within runs
    d = report.per_seed([0.02, 0.04, 0.03])
    assert d["margin"] == pytest.approx(4.303 * np.std([0.02, 0.04, 0.03], ddof=1) / np.sqrt(3))
    assert d["exceeds"] and report.per_seed([0.5])["margin"] is None


def test_t_quantiles():
    assert report.t_quantile(1) == 12.706 and report.t_quantile(8) == 2.306
    assert report.t_quantile(13) == 2.179  # rounded down to a tabulated dof: conservative
    assert 1.96 <= report.t_quantile(500) < 2.0


def _spread(value, dof=4):
    return report.Spread(value, dof)


@pytest.mark.parametrize(
    "a,b,spread,sign,verdict",
    [
        ([0.9, 0.9], [0.8, 0.8], _spread(0.01), 1, report.REPRODUCED),
        ([0.9, 0.9], [0.8, 0.8], _spread(0.01), -1, report.CONTRADICTED),
        ([0.81, 0.81], [0.80, 0.80], _spread(0.05), 1, report.NOT_AT_SCALE),
        ([0.9], [0.8], None, 1, report.NOT_AT_SCALE),  # no seed spread: no claim either way
    ],
)
def test_directional_verdict(a, b, spread, sign, verdict):
    assert report.directional_verdict(report.compare(a, b, spread), sign) == verdict


def test_equivalence_verdict_needs_a_gain_and_a_tight_margin():
    gain = report.compare([0.9, 0.9], [0.7, 0.7], _spread(0.01))
    no_gain = report.compare([0.71, 0.7], [0.7, 0.7], _spread(0.05))
    close = report.compare([0.9, 0.9], [0.895, 0.9], _spread(0.01))
    loose = report.compare([0.9, 0.9], [0.895, 0.9], _spread(0.1))  # margin over half the gain
    far = report.compare([0.9, 0.9], [0.8, 0.8], _spread(0.01))
    assert report.equivalence_verdict(close, gain) == report.REPRODUCED
    assert report.equivalence_verdict(far, gain) == report.CONTRADICTED
    assert report.equivalence_verdict(close, no_gain) == report.NOT_AT_SCALE
    assert report.equivalence_verdict(loose, gain) == report.NOT_AT_SCALE


def test_spearman_matches_the_rank_correlation():
    x, y = [0.3, 0.45, 0.6, 0.75, 0.9], [1.0, 3.0, 2.0, 5.0, 4.0]
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert report.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert report.spearman([1, 2, 3], [3, 3, 3]) == 0.0
    assert report.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share their mean rank


def test_a_finding_takes_only_the_three_verdicts():
    with pytest.raises(ValueError, match="verdict must be one of"):
        report.Finding("x", "y", "z", "maybe")


# --------------------------------------------------------------------------- runner
def _script(tmp_path, body):
    path = tmp_path / "fake_recipe.py"
    path.write_text(
        "import json, os, sys\n"
        "args = dict(a[2:].split('=', 1) for a in sys.argv[1:] if '=' in a)\n"
        "os.makedirs(args['output_dir'], exist_ok=True)\n" + body
    )
    return str(path)


def test_runner_reuses_a_finished_run_and_reruns_a_changed_one(tmp_path):
    counter = tmp_path / "count"
    script = _script(
        tmp_path,
        f"open({str(counter)!r}, 'a').write('x')\n"
        "open(os.path.join(args['output_dir'], 'out.txt'), 'w').write(args['value'])\n"
        "print(json.dumps({'top1': float(args['value'])}))\n",
    )
    first = Run("fake", script, ("--value=0.5",))
    runner = Runner(tmp_path / "runs")
    assert runner.result(first)["result"] == {"top1": 0.5}
    assert Runner(tmp_path / "runs").result(first)["result"] == {"top1": 0.5}  # a new process reuses it
    assert counter.read_text() == "x"
    changed = Run("fake", script, ("--value=0.25",))
    assert changed.key != first.key
    assert Runner(tmp_path / "runs").result(changed)["result"] == {"top1": 0.25}
    assert Runner(tmp_path / "runs", reuse=False).result(first)["result"] == {"top1": 0.5}
    assert counter.read_text() == "xxx"
    # a run reading another run's file: the path is filled in, the key follows the input's
    reader = _script(
        tmp_path,
        "print(json.dumps({'read': open(args['source']).read()}))\n",
    )
    dependent = Run("reader", reader, ("--source={src}",), (Input("src", changed, "out.txt"),))
    assert Runner(tmp_path / "runs").result(dependent)["result"] == {"read": "0.25"}
    assert Run("reader", reader, ("--source={src}",), (Input("src", first, "out.txt"),)).key != dependent.key


def test_a_failed_run_names_its_log_and_leaves_no_record(tmp_path):
    script = _script(tmp_path, "sys.exit('bad flag')\n")
    runner = Runner(tmp_path / "runs")
    run = Run("broken", script, ())
    with pytest.raises(RunFailed, match=r"run broken failed \(exit 1\); its output is in .*log.txt"):
        runner.result(run)
    assert runner.finished(run) is None
    assert "bad flag" in open(runner.path(run, "log.txt")).read()


# --------------------------------------------------------------------------- studies
def _fake_recipes(monkeypatch):
    """Replaces the recipes the runner starts by a stand-in that writes what
    each one writes (files, CSV columns, the final JSON line) with made-up
    numbers, so every study's plan, runner and page run in seconds. The
    real recipes run in the tests below, and their outputs are checked in
    their own tests (test_eval_recipes, test_pretrain_recipe, test_analysis)."""
    import hashlib
    import random
    import subprocess
    import types

    real_run = subprocess.run

    def fake(cmd, **kwargs):
        script = os.path.relpath(cmd[1], ROOT) if len(cmd) > 1 and os.path.isabs(cmd[1]) else ""
        if script not in ("recipes/pretrain.py", "recipes/linprobe.py", "recipes/finetune.py", "tools/analyze.py"):
            return real_run(cmd, **kwargs)
        args = dict(a[2:].split("=", 1) for a in cmd[2:] if a.startswith("--") and "=" in a)
        out = args["output_dir"]
        os.makedirs(out, exist_ok=True)
        rng = random.Random(hashlib.sha1(" ".join(cmd[2:]).encode()).hexdigest())
        if script == "recipes/pretrain.py":
            os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
            epochs, every = int(args["epochs"]), int(args.get("save_every", 1))
            saved = sorted({*range(every, epochs + 1, every), epochs})
            for name in ("encoder.keras", *(f"checkpoints/epoch_{e:03d}.keras" for e in saved)):
                open(os.path.join(out, name), "w").close()
            collapsed = args.get("loss_weights") == "c"
            result = {"loss": rng.random(), "v_std": 0.001 if collapsed else 0.1 + 0.01 * rng.random()}
        elif script == "tools/analyze.py":
            command = cmd[2]
            checkpoint = args["checkpoint"]
            epochs = (
                sorted(int(n[6:9]) for n in os.listdir(checkpoint) if n.startswith("epoch_"))
                if os.path.isdir(checkpoint)
                else [1]
            )
            summary = {
                "reconstruction": {"masked_mse": 0.3 + 0.01 * rng.random()},
                "informed-masks": {
                    "found_object_share_informed": 0.6 + 0.01 * rng.random(),
                    "found_object_share_random": 0.5,
                    "foreground_share_informed": 0.65 + 0.01 * rng.random(),
                    "foreground_share_random": 0.53,
                },
            }.get(command)
            rows = {
                "early-clustering": (
                    "epoch,part,layer,feature_variance,similarity_variance,cluster_gap,token_kl",
                    [
                        f"{e},encoder,{i},0.01,0.1,{0.1 * e + rng.random() / 100},{1 / e - 1 / epochs[-1]}"
                        for e in epochs
                        for i in (1, 2)
                    ],
                ),
                "exploitation-rate": (
                    "epoch,part,layer,visible,mask,visible_per_token,mask_per_token",
                    [f"{e},decoder,{i},0.3,0.7,1.2,0.93" for e in epochs for i in (1, 2)],
                ),
                "attention-nmi": (
                    "part,layer,nmi",
                    [f"{p},{i},{0.05 + 0.01 * rng.random()}" for p in ("encoder", "decoder") for i in (1, 2)],
                ),
                "reconstruction": ("image,masked_fraction,masked_mse", ["0,0.75,0.3"]),
                "informed-masks": ("image,object_patches", ["0,20"]),
                "attention-similarity": (
                    "layer,s_attn",
                    [f"{i},{0.9 - 0.1 * i + 0.01 * rng.random()}" for i in (1, 2, 3)],
                ),
                "semantic-similarity": (
                    "layer,s_sim",
                    [f"{i},{0.5 + 0.1 * i + 0.01 * rng.random()}" for i in (1, 2, 3)],
                ),
                "attention-distance": (
                    "part,layer,distance_px",
                    [f"encoder,{i},{10 + i + rng.random()}" for i in (1, 2)],
                ),
                "attention-maps": ("image,query", ["0,1"]),
            }[command]
            name = command.replace("-", "_")
            with open(os.path.join(out, f"{name}.csv"), "w") as f:
                f.write("\n".join([rows[0], *rows[1]]) + "\n")
            with open(os.path.join(out, f"{name}.png"), "wb") as f:
                f.write(bytes(rng.randrange(256) for _ in range(2000)))
            result = {"command": command, **({"summary": summary} if summary else {})}
        else:
            open(os.path.join(out, "best.keras"), "w").close()
            result = {"top1": 0.7 + 0.05 * rng.random()}
            if args.get("knn_k") and "--cache_features" in cmd:
                result["knn_top1"] = 0.6 + 0.05 * rng.random()
        return types.SimpleNamespace(returncode=0, stdout=json.dumps(result) + "\n")

    monkeypatch.setattr(subprocess, "run", fake)


@pytest.mark.parametrize("name", studies.ORDER)
def test_every_study_plans_runs_and_writes_its_page(name, tmp_path, monkeypatch):
    """The smoke profile of every study through the runner and its page,
    with the recipes stood in for (see _fake_recipes)."""
    _fake_recipes(monkeypatch)
    results = tmp_path / "results"
    assert study.main([name, "--smoke", f"--runs_dir={tmp_path / 'runs'}", f"--results_dir={results}"]) == 0
    page = (results / f"{name}.md").read_text()
    summary = json.loads((results / f"{name}.json").read_text())
    assert summary["study"] == name and summary["scale"] == "cpu (smoke)"
    assert summary["findings"], "a study states at least one finding"
    for finding in summary["findings"]:
        assert finding["verdict"] in report.VERDICTS
        assert f"| {finding['claim']} |" in page
    assert f"`python tools/study.py {name} --smoke`" in page
    assert "**Machine:**" in page and "keras_lcmae" in page
    for image in re.findall(r"^!\[[^\]]*\]\(([^)\s]+)\)", page, re.M):
        assert (results / image).stat().st_size > 1000
    assert f"({name}.md)" in (results / "README.md").read_text()
    if name == "settings":  # the stand-in collapses (c) only
        assert "| Cross-view loss alone, setting (c), collapses | collapse |" in page
        assert summary["findings"][0]["verdict"] == report.REPRODUCED


def test_every_planned_flag_is_a_flag_of_its_recipe():
    """Each flag of every run of every study, in every profile, is one its
    script defines (the recipes' --helpfull, analyze.py's --help of the
    subcommand), so a renamed flag fails here and not after an hour."""
    import subprocess

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    helps = {}
    for scale in (Scale("cpu"), Scale("gpu"), Scale("cpu", smoke=True)):
        for name in studies.ORDER:
            for run in studies.load(name).runs(scale):
                what = (run.script, run.flags[0] if run.script == "tools/analyze.py" else None)
                if what not in helps:
                    args = [what[1], "--help"] if what[1] else ["--helpfull"]
                    proc = subprocess.run(
                        [sys.executable, run.script, *args], cwd=ROOT, env=env, capture_output=True, text=True
                    )
                    helps[what] = proc.stdout + proc.stderr
                for flag in (*run.flags, run.output_flag):
                    if flag.startswith("--"):
                        bare = flag[2:].split("=")[0]
                        bare = bare[2:] if bare.startswith("no") and f"--{bare}" not in helps[what] else bare
                        assert re.search(rf"--(\[no\])?{re.escape(bare)}\b", helps[what]), (name, run.script, flag)


@pytest.mark.slow
def test_a_study_runs_the_real_recipes_and_a_rerun_writes_the_same_page(tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    args = ["single_image", "--smoke", f"--runs_dir={runs}", f"--results_dir={results}"]
    assert study.main(args) == 0
    page = (results / "single_image.md").read_bytes()
    figure = (results / "single_image.png").read_bytes()
    records = {p: p.stat().st_mtime_ns for p in runs.glob("*/study_run.json")}
    assert len(records) == len(studies.load("single_image").runs(Scale("cpu", smoke=True)))
    for p in records:  # the real recipes' final lines, read back
        record = json.loads(p.read_text())
        assert record["result"]["steps"] >= 1 and record["environment"]["backend"]
    assert study.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/study_run.json")} == records
    assert (results / "single_image.md").read_bytes() == page
    assert (results / "single_image.png").read_bytes() == figure


@pytest.mark.slow
def test_a_study_reads_the_real_analyses(tmp_path):
    results = tmp_path / "results"
    assert study.main(["decoder_analysis", "--smoke", f"--runs_dir={tmp_path}", f"--results_dir={results}"]) == 0
    page = (results / "decoder_analysis.md").read_text()
    rows = [line for line in page.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == Scale("cpu", smoke=True).decoder_analysis_depth  # a row per decoder layer
    assert (results / "decoder_analysis_maps.png").stat().st_size > 1000


def test_the_gpu_plan_states_the_hours(tmp_path, capsys):
    assert study.main(["all", "--scale=gpu", "--dry_run", f"--runs_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    for name in studies.ORDER:
        assert f"{name}: " in out
    total = [line for line in out.splitlines() if line.startswith("total:")]
    assert total and " h on one accelerator" in total[0]
    hours = float(total[0].split("about ")[1].split(" h")[0])
    assert 1 < hours < 100
    assert "--model=vit_tiny" in out and "--epochs=100" in out
    assert not list(tmp_path.iterdir()), "a dry run runs nothing"


@pytest.mark.parametrize(
    "args,message",
    [
        (["bogus"], "unknown study 'bogus'"),
        ([], "name one study"),
        (["settings", "--scale=tpu"], "flag --scale=tpu"),
    ],
)
def test_a_bad_command_line_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_the_committed_results_pages_are_whole():
    """docs/results/ holds a page, a summary and the figures of every study at
    the cpu scale, and the index lists every finding of every page."""
    results = os.path.join(ROOT, "docs", "results")
    index = open(os.path.join(results, "README.md"), encoding="utf-8").read()
    assert "Not run yet" not in index
    for name in studies.ORDER:
        page = open(os.path.join(results, f"{name}.md"), encoding="utf-8").read()
        with open(os.path.join(results, f"{name}.json")) as f:
            summary = json.load(f)
        assert summary["scale"] == "cpu" and summary["command"] == f"python tools/study.py {name}"
        assert f"`python tools/study.py {name}`" in page and "**Machine:**" in page
        for finding in summary["findings"]:
            assert finding["verdict"] in report.VERDICTS
            assert f"| {finding['claim']} |" in page and finding["claim"] in index
        images = re.findall(r"^!\[[^\]]*\]\(([^)\s]+)\)", page, re.M)
        assert images, f"{name}.md shows no figure"
        for image in images:
            size = os.path.getsize(os.path.join(results, image))
            assert 1000 < size < 300_000, image
