"""tools/benchmark.py end to end at smoke size: every method, the input
pipeline on a JPEG folder, and the ratios it prints (TensorFlow pass only)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.tf_only]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402


@pytest.mark.slow
def test_benchmark_reports_methods_pipeline_and_ratios():
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--configs", "test", "--methods", "mae,lcmae,ae",
           "--backends", "tensorflow", "--pipeline", "--pipeline_images", "24", "--warmup", "1", "--steps", "2", "--optimizer"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
    runs = {r["method"]: r for r in lines if "median_step_s" in r}
    assert set(runs) == {"mae", "lcmae", "ae", "pipeline", "update_keras_adamw", "update_ours_adamw"}, lines
    updates = {m: runs.pop(m) for m in ("update_keras_adamw", "update_ours_adamw")}
    assert all(u["images_per_s"] is None and u["median_step_s"] > 0 and u["steps_timed"] == 2 for u in updates.values())
    for r in runs.values():
        assert r["images_per_s"] > 0 and r["steps_timed"] == 2 and r["rounds"] == 1 and r["peak_rss_mb"] > 0
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_step_s"], rel=1e-2)
    ratios = {r["ratio"]: r["value"] for r in lines if "ratio" in r}
    assert ratios["lcmae_step/mae_step"] == pytest.approx(runs["lcmae"]["median_step_s"] / runs["mae"]["median_step_s"], rel=1e-2)
    assert ratios["mae_step/ae_step"] == pytest.approx(runs["mae"]["median_step_s"] / runs["ae"]["median_step_s"], rel=1e-2)
    assert ratios["keras AdamW update/ours"] == pytest.approx(
        updates["update_keras_adamw"]["median_step_s"] / updates["update_ours_adamw"]["median_step_s"], rel=1e-2)
    fastest = max(runs[m]["images_per_s"] for m in ("mae", "lcmae", "ae"))
    assert ratios["pipeline/fastest model images_per_s"] == pytest.approx(runs["pipeline"]["images_per_s"] / fastest, rel=1e-2)


def _rec(method, backend, dtype, step, batch=8, jit="off", config="c"):
    return {"config": config, "method": method, "backend": backend, "jit": jit, "dtype": dtype, "batch": batch,
            "median_step_s": step, "images_per_s": batch / step}


def test_ratios_pair_like_with_like_and_best_with_best():
    results = [
        _rec("mae", "hf_torch", "float32", 0.4), _rec("mae", "hf_torch", "bfloat16", 0.5),
        _rec("mae", "torch", "float32", 0.5), _rec("mae", "torch", "bfloat16", 0.25),
        _rec("lcmae", "torch", "bfloat16", 0.45), _rec("ae", "torch", "bfloat16", 1.0),
        _rec("mae", "jax", "float32", 0.8, jit="on"), _rec("pipeline", "pipeline", "float32", 0.1),
    ]
    got = {(r["ratio"], r.get("backend"), r.get("dtype")): r for r in benchmark.ratios(results)}
    assert got[("lcmae_step/mae_step", "torch", "bfloat16")]["value"] == pytest.approx(1.8)
    assert got[("mae_step/ae_step", "torch", "bfloat16")]["value"] == pytest.approx(0.25)
    assert ("lcmae_step/mae_step", "torch", "float32") not in got  # no LC-MAE at float32
    same = "ours/hf_torch images_per_s (same dtype)"
    assert got[(same, "torch", "float32")]["value"] == pytest.approx(0.8)  # 0.4 / 0.5
    assert got[(same, "torch", "bfloat16")]["value"] == pytest.approx(2.0)  # 0.5 / 0.25
    assert got[(same, "jax", "float32")]["value"] == pytest.approx(0.5)
    best = got[("best ours/best hf_torch images_per_s", None, None)]
    # ours' best is torch bf16 (0.25 s), HF's best is its float32 (0.4 s)
    assert best["value"] == pytest.approx(1.6) and best["hf_torch"] == "float32" and "bfloat16" in best["ours"]
    pipe = got[("pipeline/fastest model images_per_s", None, None)]
    assert pipe["value"] == pytest.approx(2.5) and pipe["model"].startswith("mae torch")


def test_rounds_pool_their_steps():
    base = dict(config="c", method="mae", backend="torch", jit="auto", dtype="float32", batch=8)
    records = [dict(base, step_s=[1.0, 3.0], peak_rss_mb=10.0), dict(base, dtype="bfloat16", step_s=[0.5], peak_rss_mb=5.0),
               dict(base, step_s=[2.0, 4.0], peak_rss_mb=12.0)]  # round 2 of the first
    got = {r["dtype"]: r for r in benchmark.pool(records, 2)}
    f32 = got["float32"]
    assert f32["median_step_s"] == 2.5 and f32["steps_timed"] == 4 and f32["rounds"] == 2
    assert f32["images_per_s"] == pytest.approx(8 / 2.5) and f32["peak_rss_mb"] == 12.0 and "step_s" not in f32
    assert got["bfloat16"]["median_step_s"] == 0.5 and got["bfloat16"]["steps_timed"] == 1
    update = benchmark.pool([dict(base, method="update_ours_adamw", batch=None, step_s=[0.1], peak_rss_mb=1.0)], 1)[0]
    assert update["images_per_s"] is None
