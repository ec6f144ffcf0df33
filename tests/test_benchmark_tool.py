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


def _table_rows(text, config):
    """The rows of ``config``'s markdown table in ``text``, as lists of cells."""
    section = text.split(f"### {config}:")[1].split("\n### ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in rows[0]]
    return [dict(zip(head, (c.strip() for c in row))) for row in rows[1:]]


@pytest.mark.slow
def test_benchmark_suite_reports_methods_pipeline_ratios_and_markdown(tmp_path):
    """``--suite smoke`` end to end: PyTorch float32/bf16 with HF's ViTMAE in
    one section, TensorFlow with the input pipeline and the AdamW update in
    another; the JSON records, the ratios, and the markdown tables built from
    them (each cell the figure of its own section's record)."""
    out = tmp_path / "speed.md"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "benchmark.py"),
        "--suite",
        "smoke",
        "--batch",
        "4",
        "--peak_tflops",
        "0.5",
        "--markdown",
        str(out),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
    assert not [l for l in lines if "error" in l], lines
    records = [r for r in lines if "median_step_s" in r]
    runs = {r["method"]: r for r in records if r["backend"] in ("tensorflow", "pipeline")}
    assert set(runs) == {"mae", "lcmae", "ae", "pipeline", "update_keras_adamw", "update_ours_adamw"}, lines
    updates = {m: runs.pop(m) for m in ("update_keras_adamw", "update_ours_adamw")}
    assert all(u["images_per_s"] is None and u["median_step_s"] > 0 and u["steps_timed"] == 2 for u in updates.values())
    for r in records:
        if r["method"].startswith("update_"):
            continue
        assert r["images_per_s"] > 0 and r["steps_timed"] == 2 and r["rounds"] == 1 and r["peak_rss_mb"] > 0
        assert r["batch"] == 4 and r["images_per_s"] == pytest.approx(4 / r["median_step_s"], rel=1e-2)
        assert r["device"].startswith("cpu: ") and r["peak_device_mb"] is None
    for method in ("mae", "lcmae", "ae"):  # model FLOPs, achieved TFLOP/s and MFU against --peak_tflops
        r = runs[method]
        assert r["flops_per_image"] == benchmark.train_flops_per_image(benchmark.CONFIGS["test"], method) > 0
        assert r["tflops"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e12, rel=1e-2)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5, rel=1e-2)
    assert runs["mae"]["flops_per_image"] < runs["lcmae"]["flops_per_image"] < 2 * runs["mae"]["flops_per_image"]
    assert runs["mae"]["flops_per_image"] < runs["ae"]["flops_per_image"]
    assert runs["pipeline"]["flops_per_image"] is None and runs["pipeline"]["mfu"] is None
    ratios = {(r["ratio"], r.get("backend"), r.get("dtype")): r["value"] for r in lines if "ratio" in r}
    tf = ("tensorflow", "float32")
    assert ratios[("lcmae_step/mae_step", *tf)] == pytest.approx(
        runs["lcmae"]["median_step_s"] / runs["mae"]["median_step_s"], rel=1e-2
    )
    assert ratios[("mae_step/ae_step", *tf)] == pytest.approx(
        runs["mae"]["median_step_s"] / runs["ae"]["median_step_s"], rel=1e-2
    )
    assert ratios[("keras AdamW update/ours", "tensorflow", None)] == pytest.approx(
        updates["update_keras_adamw"]["median_step_s"] / updates["update_ours_adamw"]["median_step_s"], rel=1e-2
    )
    fastest = max(runs[m]["images_per_s"] for m in ("mae", "lcmae", "ae"))  # the pipeline's section: TensorFlow only
    pipe_ratio = ratios[("pipeline/fastest model images_per_s", None, None)]
    assert pipe_ratio == pytest.approx(runs["pipeline"]["images_per_s"] / fastest, rel=1e-2)
    torch_mae = {r["dtype"]: r for r in records if r["backend"] == "torch" and r["method"] == "mae"}
    hf = {r["dtype"]: r for r in records if r["backend"] == "hf_torch"}
    assert set(torch_mae) == set(hf) == {"float32", "bfloat16"}
    assert all(r["optimizer"] == "torch.optim.AdamW (fused)" for r in hf.values())  # transformers' Trainer default
    # ours with the recipes' malloc settings (on glibc), HF with glibc's own
    assert all(r["allocator"] == "default" for r in hf.values())
    assert {r["allocator"] for r in records if r["backend"] != "hf_torch"} <= {"tuned", "default (not glibc's malloc)"}
    for dtype in hf:
        assert ratios[("ours/hf_torch images_per_s (same dtype)", "torch", dtype)] == pytest.approx(
            torch_mae[dtype]["images_per_s"] / hf[dtype]["images_per_s"], rel=1e-2
        )

    text = out.read_text()
    assert "cpu: " in text and "--suite smoke" in text and "torch 2." in text and "keras 3." in text
    assert "Jobs that failed" not in text
    rows = _table_rows(text, "test")
    by = {(r["backend"], r["dtype"]): r for r in rows}
    hf_label = "HF ViTMAE (transformers, PyTorch eager, torch.optim.AdamW (fused), default malloc)"
    assert set(by) == {
        ("torch", "float32"),
        ("torch", "bfloat16"),
        ("tensorflow", "float32"),
        (hf_label, "float32"),
        (hf_label, "bfloat16 autocast"),
    }
    row = by[("tensorflow", "float32")]
    assert float(row["MAE images/s"]) == pytest.approx(runs["mae"]["images_per_s"], rel=1e-3)
    assert float(row["LC-MAE/MAE step"]) == pytest.approx(ratios[("lcmae_step/mae_step", *tf)], abs=1e-3)
    assert float(row["MAE MFU"].rstrip("%")) == pytest.approx(100 * runs["mae"]["mfu"], abs=0.06)
    assert row["ours/HF"] == "" and row["HF ViTMAE images/s, same run and dtype"] == ""  # HF ran in the other section
    for dtype in ("float32", "bfloat16"):
        row = by[("torch", dtype)]
        assert float(row["HF ViTMAE images/s, same run and dtype"]) == pytest.approx(
            hf[dtype]["images_per_s"], rel=1e-3
        )
        assert float(row["ours/HF"].rstrip("x")) == pytest.approx(
            ratios[("ours/hf_torch images_per_s (same dtype)", "torch", dtype)], abs=1e-3
        )
    pipe_model = next(r["model"] for r in lines if r.get("ratio") == "pipeline/fastest model images_per_s")
    assert pipe_model.split()[0] in ("mae", "lcmae", "ae") and pipe_model.split()[1] == "tensorflow"
    assert f"**{pipe_ratio:.3g}x** the fastest model of its run ({pipe_model})." in text
    assert (
        "Run 1: best ours / best HF ViTMAE" in text
        and "Run 2: one AdamW update of the MAE parameters (tensorflow)" in text
    )
    assert {r["run"] for r in rows if r["backend"] == "tensorflow"} == {"2"} and {
        r["run"] for r in rows if r["backend"] != "tensorflow"
    } == {"1"}


def _rec(method, backend, dtype, step, batch=8, jit="off", config="c"):
    return {
        "config": config,
        "method": method,
        "backend": backend,
        "jit": jit,
        "dtype": dtype,
        "batch": batch,
        "median_step_s": step,
        "images_per_s": batch / step,
    }


def test_ratios_pair_like_with_like_and_best_with_best():
    results = [
        _rec("mae", "hf_torch", "float32", 0.4),
        _rec("mae", "hf_torch", "bfloat16", 0.5),
        _rec("mae", "torch", "float32", 0.5),
        _rec("mae", "torch", "bfloat16", 0.25),
        _rec("lcmae", "torch", "bfloat16", 0.45),
        _rec("ae", "torch", "bfloat16", 1.0),
        _rec("mae", "jax", "float32", 0.8, jit="on"),
        _rec("pipeline", "pipeline", "float32", 0.1),
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
    records = [
        dict(base, step_s=[1.0, 3.0], peak_rss_mb=10.0),
        dict(base, dtype="bfloat16", step_s=[0.5], peak_rss_mb=5.0),
        dict(base, step_s=[2.0, 4.0], peak_rss_mb=12.0),
    ]  # round 2 of the first
    got = {r["dtype"]: r for r in benchmark.pool(records, 2)}
    f32 = got["float32"]
    assert f32["median_step_s"] == 2.5 and f32["steps_timed"] == 4 and f32["rounds"] == 2
    assert f32["images_per_s"] == pytest.approx(8 / 2.5) and f32["peak_rss_mb"] == 12.0 and "step_s" not in f32
    assert got["bfloat16"]["median_step_s"] == 0.5 and got["bfloat16"]["steps_timed"] == 1
    update = benchmark.pool([dict(base, method="update_ours_adamw", batch=None, step_s=[0.1], peak_rss_mb=1.0)], 1)[0]
    assert update["images_per_s"] is None


@pytest.mark.parametrize("name", ["test", "tiny32", "base224"])
def test_forward_flops_match_hf_vitmae_flop_counter(name):
    """The analytic MAE forward FLOPs equal PyTorch's FlopCounterMode count of
    transformers' ViTMAE (an independent implementation) on the same config,
    less HF's prediction of the [CLS] token (it predicts it, then drops it)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    c = benchmark.CONFIGS[name]
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(benchmark.hf_config(c, attn_implementation="eager")).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.rand(2, 3, c["image"], c["image"]))
    per_image = counter.get_total_flops() // 2
    cls_prediction = 2 * c["dec_width"] * c["patch"] ** 2 * 3
    assert benchmark.forward_flops_per_image(c, "mae") == per_image - cls_prediction
    assert benchmark.train_flops_per_image(c, "mae") == 3 * benchmark.forward_flops_per_image(c, "mae")
    assert benchmark.train_flops_per_image(c, "pipeline") is None


def test_peak_table_and_mfu():
    peak = benchmark.peak_tflops_for
    assert peak("gpu: NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert peak("gpu: NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak("gpu: NVIDIA H100 NVL", "bfloat16") == 835.5
    assert peak("gpu: NVIDIA H200", "bfloat16") == 989.4
    assert peak("gpu: NVIDIA A100-SXM4-40GB", "bfloat16") == 312.0
    assert peak("gpu: NVIDIA L40S", "bfloat16") == 362.05 and peak("gpu: NVIDIA L4", "bfloat16") == 121.0
    assert peak("gpu: NVIDIA A10", "bfloat16") == 125.0 and peak("gpu: NVIDIA A10G", "bfloat16") is None
    assert peak("gpu: NVIDIA H100 80GB HBM3", "float32") is None  # TF32 or not: unknown
    assert peak("cpu: AMD EPYC (2 cores)", "bfloat16") is None
    assert peak("cpu: AMD EPYC (2 cores)", "float32", override=2.5) == 2.5
    rec = benchmark.with_rates({"batch": 8, "flops_per_image": 1e12, "peak_tflops": 100.0}, [0.5, 0.4, 0.2])
    assert rec["median_step_s"] == 0.4 and rec["images_per_s"] == 20.0
    assert rec["tflops"] == pytest.approx(20.0) and rec["mfu"] == pytest.approx(0.2)
    rec = benchmark.with_rates({"batch": None, "flops_per_image": None, "peak_tflops": None}, [0.1])
    assert rec["images_per_s"] is None and rec["tflops"] is None and rec["mfu"] is None


def test_device_and_memory_reads_each_backends_gpu(monkeypatch):
    """The GPU branches, with each library's device queries stubbed (CI has
    no GPU): the name and peak memory come from the backend's own API."""
    import types

    import jax
    import tensorflow as tf
    import torch

    assert benchmark.device_and_memory("torch") == (benchmark.cpu_name(), None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 3 * 2**30)
    for backend in ("torch", "hf_torch"):
        assert benchmark.device_and_memory(backend) == ("gpu: NVIDIA H100 80GB HBM3", 3072.0)
    gpu = types.SimpleNamespace(
        platform="gpu", device_kind="NVIDIA H200", memory_stats=lambda: {"peak_bytes_in_use": 2**29}
    )
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])
    assert benchmark.device_and_memory("jax") == ("gpu: NVIDIA H200", 512.0)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    monkeypatch.setattr(
        tf.config.experimental, "get_device_details", lambda d: {"device_name": "NVIDIA A100-SXM4-80GB"}
    )
    monkeypatch.setattr(tf.config.experimental, "get_memory_info", lambda d: {"current": 1, "peak": 2**20})
    assert benchmark.device_and_memory("tensorflow") == ("gpu: NVIDIA A100-SXM4-80GB", 1.0)
    assert benchmark.peak_tflops_for(benchmark.device_and_memory("tensorflow")[0], "bfloat16") == 312.0


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--batch", "0"], "--batch"),
        (["--peak_tflops", "-1"], "--peak_tflops"),
        (["--configs", "tiny32,huge"], "--configs: unknown huge"),
        (["--suite", "cpu", "--configs", "test"], "--suite cpu sets --configs"),
        (["--suite", "gpu", "--steps", "3", "--reference"], "--suite gpu sets --reference, --steps"),
        (["--suite", "fast"], "flag --suite=fast: value should be one of"),
        (["--rounds", "0"], "--rounds must be a positive"),
        (["mae"], "unexpected arguments: mae"),
    ],
)
def test_bad_flags_are_named(flags, named):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1 and named in result.stderr and "Traceback" not in result.stderr


def test_markdown_report_keeps_each_sections_ratios():
    """Two sections time the same setting: the report gives each its own row,
    with the ratio of its own run, and the best/best line of the section
    that ran HF; a config without records gets no table."""

    def section(step, ref_step):
        results = [
            dict(
                _rec("mae", "torch", "bfloat16", step, config="tiny32"),
                tflops=0.25,
                mfu=None,
                peak_rss_mb=900.0,
                device="cpu: X (2 cores)",
                version="keras 3 (torch)",
            ),
            dict(
                _rec("ae", "torch", "bfloat16", 2 * step, config="tiny32"), peak_rss_mb=950.0, device="cpu: X (2 cores)"
            ),
            dict(
                _rec("mae", "hf_torch", "bfloat16", ref_step, config="tiny32"),
                peak_rss_mb=800.0,
                device="cpu: X (2 cores)",
                version="torch 2",
            ),
        ]
        return results, benchmark.ratios(results)

    failed = {
        "config": "tiny32",
        "method": "mae",
        "backend": "jax",
        "jit": "auto",
        "error": ["ModuleNotFoundError: jax"],
    }
    text = benchmark.markdown_report(
        [section(0.5, 1.0), section(0.25, 1.0)],
        command="python tools/benchmark.py --x",
        when="2026-01-01 00:00 UTC",
        failures=[failed],
    )
    assert "### Jobs that failed\n\n- tiny32 mae jax jit=auto: ModuleNotFoundError: jax" in text
    assert "Measured 2026-01-01 00:00 UTC on cpu: X (2 cores)." in text and "`python tools/benchmark.py --x`" in text
    assert "### tiny32: ViT 192x12 (3 heads), 32 px, patch 4, decoder 128x2 (4 heads), batch 8" in text
    assert text.startswith("## 2026-01-01 — benchmark, cpu: X (2 cores), commit ")
    assert "### base224" not in text and "MAE MFU" not in text
    rows = [r for r in _table_rows(text, "tiny32") if r["backend"] == "torch"]
    assert [(r["MAE images/s"], r["AE images/s"], r["LC-MAE images/s"]) for r in rows] == [
        ("16", "8", ""),
        ("32", "16", ""),
    ]
    assert [r["ours/HF"] for r in rows] == ["2.000x", "4.000x"] and [r["MAE/AE step"] for r in rows] == ["0.500"] * 2
    assert [r["peak RSS MB"] for r in rows] == ["950", "950"]
    assert [r["run"] for r in rows] == ["1", "2"]
    assert (
        text.count("Run 1: best ours / best HF ViTMAE **2.000x**") == 1
        and text.count("Run 2: best ours / best HF ViTMAE **4.000x**") == 1
    )


def _cli_defaults(**given):
    """The command line's flags as ``main`` parses them with none given, then ``given``."""
    import argparse

    flags = dict(
        configs="tiny32",
        methods="mae,lcmae",
        backends="tensorflow,jax,torch",
        jit="auto",
        dtype="float32",
        reference=False,
        pipeline=False,
        optimizer=False,
        rounds=1,
        warmup=3,
        steps=10,
        batch=None,
        peak_tflops=None,
        pipeline_images=None,
        reference_optimizer="fused",
        allocator="tuned",
        reference_allocator="default",
    )
    return argparse.Namespace(**dict(flags, **given))


def test_suites_plan_the_readme_figures():
    """The cpu suite's sections give every row the README's table needs; the
    gpu suite times ViT-B/16 in bf16 at a GPU batch against HF; --batch
    given on the command line wins over a section's."""
    defaults = _cli_defaults()
    jobs = set()
    for spec in benchmark.SUITES["cpu"]:
        jobs |= set(benchmark.section_jobs(benchmark.section_plan(defaults, spec)))
    for need in [
        ("tiny32", "mae", "hf_torch", "off", "bfloat16"),
        ("tiny32", "mae,lcmae,ae", "torch", "auto", "bfloat16"),
        ("tiny32", "mae,lcmae,ae", "tensorflow", "on", "float32"),
        ("tiny32", "mae,lcmae,ae", "jax", "auto", "float32"),
        ("base224", "mae,lcmae,ae", "torch", "auto", "bfloat16"),
        ("base224", "mae", "hf_torch", "off", "float32"),
        ("base224", "mae", "tensorflow", "off", "bfloat16"),
        ("base224", "mae", "jax", "auto", "bfloat16"),
        ("base224", "pipeline", "pipeline", "off", "float32"),
        ("base224", "optimizer", "torch", "auto", "float32"),
    ]:
        assert need in jobs, need
    assert not any(j[1] == "optimizer" and j[2] != "torch" for j in jobs)
    # against HF, our MAE runs alone in its process, as HF's does
    assert all(spec["methods"] == "mae" for spec in benchmark.SUITES["cpu"] if spec.get("reference"))
    # a ratio between processes (ours/HF, pipeline/model) pools alternating rounds, so a slow spell hits both sides
    assert all(
        spec.get("rounds", 1) >= 2 for spec in benchmark.SUITES["cpu"] if spec.get("reference") or spec.get("pipeline")
    )
    gpu = [benchmark.section_plan(defaults, spec) for spec in benchmark.SUITES["gpu"]]
    assert gpu[0].configs == "base224" and gpu[0].dtype == "bfloat16" and gpu[0].reference and gpu[0].batch == 64
    assert benchmark.section_plan(_cli_defaults(batch=16), benchmark.SUITES["gpu"][0]).batch == 16


@pytest.mark.parametrize("choice, fused", [("fused", True), ("plain", None)])
def test_reference_trains_with_the_adamw_its_users_get(monkeypatch, choice, fused):
    """HF's ViTMAE is trained with transformers' Trainer default
    (``adamw_torch_fused`` on torch >= 2.8) unless ``--reference_optimizer
    plain`` asks for torch.optim.AdamW's own default; the optimizer steps."""
    import argparse

    import torch

    made = []
    real = torch.optim.AdamW

    class Recording(real):
        def __init__(self, params, **kwargs):
            made.append(self)
            self.kwargs = kwargs
            super().__init__(params, **kwargs)
            self.steps = 0

        def step(self, *a, **k):
            self.steps += 1
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    args = argparse.Namespace(config="test", batch=2, dtype="float32", reference_optimizer=choice, warmup=1, steps=1)
    times, batch = benchmark.reference_worker(args)
    assert batch == 2 and len(times) == 1 and times[0] > 0
    assert len(made) == 1 and made[0].kwargs["fused"] is fused
    assert made[0].kwargs["betas"] == (0.9, 0.95) and made[0].kwargs["weight_decay"] == 0.05
    assert made[0].steps == 2  # one warm-up step, one timed


def test_reference_optimizer_flag_is_checked_and_reaches_a_suites_sections():
    given = _cli_defaults(reference_optimizer="plain")
    assert all(benchmark.section_plan(given, spec).reference_optimizer == "plain" for spec in benchmark.SUITES["cpu"])
    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--reference_optimizer", "sgd"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "flag --reference_optimizer=sgd: value should be one of" in bad.stderr


@pytest.mark.slow
def test_optimizer_job_on_torch_times_keras_ours_and_both_torch_adamws():
    """The PyTorch ``--optimizer`` job: Keras' AdamW, the recipe's, and
    torch.optim.AdamW both as its own default and fused, each a positive
    per-update time; the report names all four."""
    records = benchmark.spawn("test", "optimizer", "torch", "auto", "float32", 1, 2)
    times = {r["method"]: r["median_step_s"] for r in records}
    assert set(times) == {
        "update_keras_adamw",
        "update_ours_adamw",
        "update_torch_adamw",
        "update_torch_adamw_fused",
    }, records
    assert all(t > 0 for t in times.values())
    text = benchmark.markdown_report([(records, benchmark.ratios(records))], command="x")
    assert (
        f"torch.optim.AdamW {times['update_torch_adamw']:.3g} s (fused: {times['update_torch_adamw_fused']:.3g} s)"
        in text
    )


def test_allocator_flags_reach_a_suites_sections_and_the_workers_malloc():
    """``--allocator`` / ``--reference_allocator`` go into every section and
    every worker; ``tune_allocator`` applies keras_lcmae.cpu's settings
    without importing Keras (the HF worker stays Keras-free)."""
    given = _cli_defaults(allocator="default", reference_allocator="tuned")
    plans = [benchmark.section_plan(given, spec) for spec in benchmark.SUITES["cpu"]]
    assert all(p.allocator == "default" and p.reference_allocator == "tuned" for p in plans)
    bad = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--allocator", "jemalloc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "flag --allocator=jemalloc: value should be one of" in bad.stderr
    probe = (
        "import json, sys; sys.path.insert(0, 'tools'); import benchmark; print(json.dumps(["
        "benchmark.tune_allocator('default'), benchmark.tune_allocator('tuned'), 'keras' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    default, tuned, keras_loaded = json.loads(out.stdout.splitlines()[-1])
    assert default == "default" and tuned in ("tuned", "default (not glibc's malloc)") and keras_loaded is False


def test_cpu_name_names_the_widest_matrix_isa(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu fma avx2\n\n"
        "processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu fma avx2\n"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert benchmark.cpu_name(str(path)) == f"cpu: AMD EPYC ({cores} cores, avx2)"
    path.write_text("model name\t: Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert benchmark.cpu_name(str(path)) == f"cpu: Xeon ({cores} cores, amx_bf16)"
    path.write_text("model name\t: EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n")
    assert benchmark.cpu_name(str(path)) == f"cpu: EPYC 9B14 ({cores} cores, avx512_bf16)"
    assert benchmark.cpu_name(str(tmp_path / "missing")) == f"cpu: unknown ({cores} cores)"


def test_cpu_suite_times_float32_only_on_a_cpu_that_emulates_bf16(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("flags\t\t: fpu avx2 fma\n")
    assert benchmark.cpu_has_native_bf16(str(path)) is False
    path.write_text("flags\t\t: avx2 avx512f avx512_bf16\n")
    assert benchmark.cpu_has_native_bf16(str(path)) is True
    assert benchmark.cpu_has_native_bf16(str(tmp_path / "missing")) is None
    full, none = benchmark.suite_specs("cpu", True)
    assert none is None and full == benchmark.SUITES["cpu"] and any("bfloat16" in s.get("dtype", "") for s in full)
    assert benchmark.suite_specs("cpu", None) == (full, None)  # unknown CPU: the whole suite
    cut, note = benchmark.suite_specs("cpu", False)
    assert "bfloat16 left out" in note and len(cut) == len(full)
    for old, new in zip(full, cut):
        assert new == (dict(old, dtype="float32") if "bfloat16" in old.get("dtype", "") else old)
    assert benchmark.suite_specs("gpu", False) == (benchmark.SUITES["gpu"], None)  # a GPU computes there
    text = benchmark.markdown_report([], command="x", note=note)
    assert note in text


# -- the finetune job: ViTClassifier steps with and without gradient accumulation


def test_finetune_jobs_run_each_accumulation_in_its_own_process():
    """``finetune`` becomes one job per ``--accum_steps`` K (its peak memory
    its own); the pretraining methods keep sharing one process."""
    plan = benchmark.section_plan(
        _cli_defaults(methods="mae,finetune,lcmae", backends="torch", dtype="float32,bfloat16")
    )
    assert plan.accum_steps == "1,4"
    assert benchmark.section_jobs(plan) == [
        ("tiny32", "mae,lcmae", "torch", "auto", "float32"),
        ("tiny32", "finetune", "torch", "auto", "float32"),
        ("tiny32", "finetune_k4", "torch", "auto", "float32"),
        ("tiny32", "mae,lcmae", "torch", "auto", "bfloat16"),
        ("tiny32", "finetune", "torch", "auto", "bfloat16"),
        ("tiny32", "finetune_k4", "torch", "auto", "bfloat16"),
    ]
    plan = benchmark.section_plan(_cli_defaults(methods="finetune", backends="jax", accum_steps="8,1,8"))
    assert benchmark.section_jobs(plan) == [
        ("tiny32", "finetune_k8", "jax", "auto", "float32"),
        ("tiny32", "finetune", "jax", "auto", "float32"),
    ]
    assert [benchmark.finetune_accum_steps(m) for m in ("finetune", "finetune_k4", "mae", "finetune_x")] == [
        1,
        4,
        None,
        None,
    ]
    # the suites plan no finetune jobs: their figures stay as they were
    for specs in benchmark.SUITES.values():
        for spec in specs:
            assert not any(
                benchmark.finetune_accum_steps(j[1])
                for j in benchmark.section_jobs(benchmark.section_plan(_cli_defaults(), spec))
            )


@pytest.mark.parametrize("name", ["test", "tiny32", "base224"])
def test_finetune_flops_match_hf_vit_flop_counter(name):
    """The finetune job's forward FLOPs (patch embedding, encoder on all
    1 + N tokens, a 1000-class head) equal PyTorch's FlopCounterMode count of
    transformers' ViTForImageClassification of the same sizes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from torch.utils.flop_counter import FlopCounterMode

    c = benchmark.CONFIGS[name]
    config = transformers.ViTConfig(
        image_size=c["image"],
        patch_size=c["patch"],
        num_channels=3,
        hidden_size=c["width"],
        num_hidden_layers=c["depth"],
        num_attention_heads=c["heads"],
        intermediate_size=4 * c["width"],
        num_labels=benchmark.FINETUNE_CLASSES,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.rand(2, 3, c["image"], c["image"]))
    assert benchmark.forward_flops_per_image(c, "finetune") == counter.get_total_flops() // 2
    for method in ("finetune", "finetune_k4"):
        assert benchmark.train_flops_per_image(c, method) == 3 * benchmark.forward_flops_per_image(c, "finetune")


def test_finetune_ratios_and_markdown_lines():
    """K = 4 against K = 1 of the same setting: the step ratio and the added
    peak memory, and the report's line (no table row: the table's columns are
    the pretraining methods')."""
    base = dict(device="cpu: X (2 cores)", version="keras 3 (torch)")
    results = [
        dict(
            _rec("finetune", "torch", "float32", 0.5, batch=64, config="tiny32"),
            peak_rss_mb=1000.0,
            estimated_mb=700.0,
            accum_steps=1,
            **base,
        ),
        dict(
            _rec("finetune_k4", "torch", "float32", 0.6, batch=64, config="tiny32"),
            peak_rss_mb=1021.0,
            estimated_mb=721.0,
            accum_steps=4,
            **base,
        ),
        dict(_rec("finetune", "jax", "float32", 1.0, batch=64, config="tiny32"), peak_rss_mb=900.0, **base),
    ]
    found = benchmark.ratios(results)
    assert found == [
        {
            "ratio": "finetune_k4_step/finetune_step",
            "config": "tiny32",
            "backend": "torch",
            "jit": "off",
            "dtype": "float32",
            "accum_steps": 4,
            "value": 1.2,
            "peak_rss_mb_added": 21.0,
            "estimated_mb_added": 21.0,
        }
    ]
    text = benchmark.markdown_report([(results, found)], command="x")
    assert (
        "- Run 1: finetune (ViTClassifier, avg pool, finetune_adamw; micro-batch 64, torch jit=off float32): "
        "K=1 128 images/s (peak RSS 1000 MB, estimated 700 MB); K=4 106.7 images/s (peak RSS 1021 MB, "
        "estimated 721 MB), step **1.200x** K=1's, +21 MB."
    ) in text
    assert "micro-batch 64, jax jit=off float32): K=1 64 images/s (peak RSS 900 MB)." in text
    assert "| run |" not in text  # no pretraining rows, so no table


def test_accum_steps_flag_is_checked():
    for bad in ("0", "1,x", "4,"):
        out = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--accum_steps", bad],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert out.returncode == 1 and "--accum_steps takes a comma list" in out.stderr, (bad, out.stderr[-500:])


@pytest.mark.slow
def test_finetune_job_times_plain_and_accumulated_steps(tmp_path):
    """``--methods finetune`` end to end on PyTorch at smoke size: K = 1 and
    K = 2 at the same micro-batch, each with images/s, FLOPs, peak RSS and
    the memory estimate (K = 2 adds the float32 accumulators), the ratio
    record, and the report's line."""
    out = tmp_path / "speed.md"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "benchmark.py"),
        "--configs",
        "test",
        "--methods",
        "finetune",
        "--backends",
        "torch",
        "--accum_steps",
        "1,2",
        "--batch",
        "4",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--markdown",
        str(out),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
    assert not [l for l in lines if "error" in l], lines
    recs = {r["method"]: r for r in lines if "median_step_s" in r}
    assert set(recs) == {"finetune", "finetune_k2"}, lines
    c = benchmark.CONFIGS["test"]
    for method, k in (("finetune", 1), ("finetune_k2", 2)):
        r = recs[method]
        assert r["accum_steps"] == k and r["batch"] == 4 and r["steps_timed"] == 2 and r["peak_rss_mb"] > 0
        assert r["images_per_s"] == pytest.approx(4 / r["median_step_s"], rel=1e-2)
        assert r["flops_per_image"] == benchmark.train_flops_per_image(c, "finetune") > 0
    # one float32 accumulator per trained weight: the ViTClassifier of the test config with a 1000-class head
    added = recs["finetune_k2"]["estimated_mb"] - recs["finetune"]["estimated_mb"]
    from keras_lcmae import memory

    g = memory.Geometry(
        job="finetune",
        image_size=c["image"],
        patch_size=c["patch"],
        hidden_dim=c["width"],
        depth=c["depth"],
        num_heads=c["heads"],
        num_classes=benchmark.FINETUNE_CLASSES,
        pool="avg",
    )
    trained = memory.count_params(g)[0]
    assert added == pytest.approx(4 * trained / 2**20, abs=0.15)
    ratio = next(l for l in lines if l.get("ratio") == "finetune_k2_step/finetune_step")
    assert ratio["value"] == pytest.approx(
        recs["finetune_k2"]["median_step_s"] / recs["finetune"]["median_step_s"], rel=1e-2
    )
    assert ratio["peak_rss_mb_added"] == pytest.approx(
        recs["finetune_k2"]["peak_rss_mb"] - recs["finetune"]["peak_rss_mb"], abs=0.11
    )
    text = out.read_text()
    assert "finetune (ViTClassifier, avg pool, finetune_adamw; micro-batch 4, torch jit=auto float32): K=1 " in text
    assert "K=2 " in text and "Jobs that failed" not in text


def test_markdown_sections_go_newest_first_under_the_marker(tmp_path):
    """``--markdown FILE`` adds a dated section: under the results marker of
    docs/benchmarks.md (older results stay below it, the text above stays),
    at the top of another existing file, or into a new file with the marker."""

    def report(day):
        return benchmark.markdown_report(
            [], command="x", when=f"2026-01-0{day} 00:00 UTC", title="cpu suite", commit="abc1234"
        )

    new = tmp_path / "new.md"
    benchmark.add_markdown_section(str(new), report(1))
    benchmark.add_markdown_section(str(new), report(2))
    text = new.read_text()
    assert text.startswith("# Benchmarks\n\n" + benchmark.RESULTS_MARKER)
    assert text.index("## 2026-01-02 — cpu suite, an unknown device, commit abc1234") < text.index("## 2026-01-01")
    docs = tmp_path / "benchmarks.md"
    docs.write_text(
        "# Benchmarks\n\nHow to measure.\n\n" + benchmark.RESULTS_MARKER + "\n\n## 2025-12-31 — old\n\nold rows\n"
    )
    benchmark.add_markdown_section(str(docs), report(3))
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nHow to measure.\n\n" + benchmark.RESULTS_MARKER + "\n\n## 2026-01-03")
    assert text.index("## 2026-01-03") < text.index("## 2025-12-31 — old\n\nold rows") and text.count("old rows") == 1
    other = tmp_path / "speed.md"
    other.write_text("## earlier\n")
    benchmark.add_markdown_section(str(other), report(4))
    assert other.read_text().startswith("## 2026-01-04") and other.read_text().endswith("## earlier\n")
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        assert benchmark.RESULTS_MARKER in f.read()


def test_git_commit_names_the_checkout():
    import re
    import shutil

    commit = benchmark.git_commit()
    if shutil.which("git") and os.path.exists(os.path.join(ROOT, ".git")):
        assert re.fullmatch(r"[0-9a-f]{7,}(\+changes)?", commit), commit
    else:
        assert commit == "unknown"
