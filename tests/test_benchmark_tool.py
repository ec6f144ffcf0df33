"""tools/benchmark.py end to end at smoke size: every method, the input
pipeline on a JPEG folder, and the ratios it prints (TensorFlow pass only)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.tf_only, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_reports_methods_pipeline_and_ratios():
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--configs", "test", "--methods", "mae,lcmae,ae",
           "--backends", "tensorflow", "--pipeline", "--pipeline_images", "24", "--warmup", "1", "--steps", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
    runs = {r["method"]: r for r in lines if "median_step_s" in r}
    assert set(runs) == {"mae", "lcmae", "ae", "pipeline"}, lines
    for r in runs.values():
        assert r["images_per_s"] > 0 and r["steps_timed"] == 2 and r["peak_rss_mb"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_step_s"], rel=1e-2)
    ratios = {r["ratio"]: r["value"] for r in lines if "ratio" in r}
    assert ratios["lcmae_step/mae_step"] == pytest.approx(runs["lcmae"]["median_step_s"] / runs["mae"]["median_step_s"], rel=1e-2)
    assert ratios["mae_step/ae_step"] == pytest.approx(runs["mae"]["median_step_s"] / runs["ae"]["median_step_s"], rel=1e-2)
    fastest = max(runs[m]["images_per_s"] for m in ("mae", "lcmae", "ae"))
    assert ratios["pipeline/fastest model images_per_s"] == pytest.approx(runs["pipeline"]["images_per_s"] / fastest, rel=1e-2)
