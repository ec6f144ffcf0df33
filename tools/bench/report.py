"""From worker records to results: rounds pooled, the ratios of a run, and
the markdown report written into ``docs/benchmarks.md``."""

import os
import subprocess
import time

from bench import ROOT
from bench.flops import with_rates
from bench.plan import CONFIGS, finetune_accum_steps


def pool(records, rounds):
    """One record per (config, method, backend, jit, dtype): the step times
    of its ``rounds`` worker records pooled, the median, images/s, TFLOP/s
    and MFU taken over all of them, the largest peak RSS and device memory."""
    pooled = {}
    for rec in records:
        key = tuple(rec[k] for k in ("config", "method", "backend", "jit", "dtype"))
        if key in pooled:
            pooled[key]["step_s"] = pooled[key]["step_s"] + rec["step_s"]
            for mem in ("peak_rss_mb", "peak_device_mb"):
                values = [v for v in (pooled[key].get(mem), rec.get(mem)) if v is not None]
                pooled[key][mem] = max(values) if values else None
        else:
            pooled[key] = dict(rec)
    results = []
    for rec in pooled.values():
        steps = rec.pop("step_s")
        rec = with_rates(rec, steps)
        rec.update(steps_timed=len(steps), rounds=rounds)
        results.append(rec)
    return results


def ratios(results):
    """The ratios the issue's targets are stated in, each from figures of
    this run: LC-MAE/MAE and MAE/AE step time, pipeline/fastest model
    images/s, ours/HF images/s at the same dtype, best/best (ours over
    all backends, jit and dtype settings against the faster of HF's float32
    and bfloat16 autocast), and the cost of gradient accumulation in
    finetuning: the K-step cycle's time per micro-batch over the plain
    step's, with the peak memories' difference (MB, each K in its own
    process)."""
    ok = [r for r in results if "median_step_s" in r]
    same = ("config", "backend", "jit", "dtype")
    out = []
    for num, den, name in (("lcmae", "mae", "lcmae_step/mae_step"), ("mae", "ae", "mae_step/ae_step")):
        for r in ok:
            for d in ok:
                if r["method"] == num and d["method"] == den and all(r[k] == d[k] for k in same):
                    out.append(
                        {
                            "ratio": name,
                            **{k: r[k] for k in same},
                            "value": round(r["median_step_s"] / d["median_step_s"], 3),
                        }
                    )
    for r in ok:
        if r["method"] == "update_keras_adamw":
            for o in ok:
                if o["method"] == "update_ours_adamw" and o["config"] == r["config"] and o["backend"] == r["backend"]:
                    out.append(
                        {
                            "ratio": "keras AdamW update/ours",
                            "config": r["config"],
                            "backend": r["backend"],
                            "value": round(r["median_step_s"] / o["median_step_s"], 3),
                        }
                    )
    for p in [r for r in ok if r["method"] == "pipeline"]:
        models = [m for m in ok if m["config"] == p["config"] and m["method"] in ("mae", "lcmae", "ae")]
        if models:
            best = max(models, key=lambda m: m["images_per_s"])
            out.append(
                {
                    "ratio": "pipeline/fastest model images_per_s",
                    "config": p["config"],
                    "model": f"{best['method']} {best['backend']} jit={best['jit']} {best['dtype']}",
                    "value": round(p["images_per_s"] / best["images_per_s"], 3),
                }
            )
    refs = [r for r in ok if r["backend"] == "hf_torch"]
    ours = [m for m in ok if m["method"] == "mae" and m["backend"] not in ("hf_torch", "pipeline")]
    for ref in refs:
        for m in ours:
            if m["config"] == ref["config"] and m["dtype"] == ref["dtype"]:
                out.append(
                    {
                        "ratio": "ours/hf_torch images_per_s (same dtype)",
                        **{k: m[k] for k in same},
                        "value": round(m["images_per_s"] / ref["images_per_s"], 3),
                    }
                )
    for config in dict.fromkeys(r["config"] for r in refs):
        cr = [r for r in refs if r["config"] == config]
        co = [m for m in ours if m["config"] == config]
        if cr and co:
            ref, best = max(cr, key=lambda r: r["images_per_s"]), max(co, key=lambda m: m["images_per_s"])
            out.append(
                {
                    "ratio": "best ours/best hf_torch images_per_s",
                    "config": config,
                    "ours": f"{best['backend']} jit={best['jit']} {best['dtype']}",
                    "hf_torch": ref["dtype"],
                    "value": round(best["images_per_s"] / ref["images_per_s"], 3),
                }
            )
    for r in ok:
        k = finetune_accum_steps(r["method"])
        if not k or k == 1:
            continue
        for d in ok:
            if d["method"] == "finetune" and all(r[key] == d[key] for key in same):
                rec = {
                    "ratio": f"{r['method']}_step/finetune_step",
                    **{key: r[key] for key in same},
                    "accum_steps": k,
                    "value": round(r["median_step_s"] / d["median_step_s"], 3),
                }
                for mem in ("peak_rss_mb", "peak_device_mb", "estimated_mb"):
                    if r.get(mem) is not None and d.get(mem) is not None:
                        rec[f"{mem}_added"] = round(r[mem] - d[mem], 1)
                out.append(rec)
    return out


METHOD_NAMES = {"mae": "MAE", "lcmae": "LC-MAE", "ae": "AE"}


def describe_config(name, batch=None):
    """One line naming a config's sizes, e.g. for a table's heading."""
    c = dict(CONFIGS[name])
    return (
        f"{name}: ViT {c['width']}x{c['depth']} ({c['heads']} heads), {c['image']} px, patch {c['patch']}, "
        f"decoder {c['dec_width']}x{c['dec_depth']} ({c['dec_heads']} heads), batch {batch or c['batch']}"
    )


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def finetune_notes(run, records, found):
    """Markdown lines of the finetune records of one run and config: per
    (backend, jit, dtype), each K's images/s and peak memory, and with K > 1
    the step and memory against K = 1 (from ``found``, the run's ratios)."""
    lines = []
    tuned = [r for r in records if finetune_accum_steps(r["method"])]
    for key in dict.fromkeys((r["backend"], r["jit"], r["dtype"]) for r in tuned):
        recs = sorted(
            (r for r in tuned if (r["backend"], r["jit"], r["dtype"]) == key),
            key=lambda r: finetune_accum_steps(r["method"]),
        )
        parts = []
        for r in recs:
            k = finetune_accum_steps(r["method"])
            mem = f"peak RSS {_fmt(r.get('peak_rss_mb'), '.0f')} MB"
            if r.get("peak_device_mb") is not None:
                mem += f", peak device {r['peak_device_mb']:.0f} MB"
            if r.get("estimated_mb") is not None:
                mem += f", estimated {r['estimated_mb']:.0f} MB"
            part = f"K={k} {_fmt(r['images_per_s'], '.4g')} images/s ({mem})"
            q = next(
                (
                    q
                    for q in found
                    if q["ratio"] == f"{r['method']}_step/finetune_step"
                    and (q["backend"], q["jit"], q["dtype"]) == key
                    and q.get("config") == r["config"]
                ),
                None,
            )
            if q:
                added = q.get("peak_device_mb_added", q.get("peak_rss_mb_added"))
                part += f", step **{q['value']:.3f}x** K=1's" + (f", {added:+.0f} MB" if added is not None else "")
            parts.append(part)
        backend, jit, dtype = key
        lines.append(
            f"- Run {run}: finetune (ViTClassifier, avg pool, finetune_adamw; micro-batch {recs[0]['batch']}, "
            f"{backend} jit={jit} {dtype}): " + "; ".join(parts) + "."
        )
    return lines


def markdown_report(sections, command, when=None, failures=(), note=None, title=None, commit=None):
    """Markdown tables of the figures of ``sections`` (a list of
    ``(results, ratios)``, one per section, as :func:`run_section` returns),
    one table per config, naming the machine, the versions and the command.
    A row is one (backend, jit_compile, dtype) setting of one section; its
    ratio columns come from that section's run only (LC-MAE/MAE and MAE/AE
    step, ours/HF at the same dtype), as do the lines under each table
    (best ours/best HF, input pipeline/fastest model, one AdamW update).
    ``failures`` (error records of jobs that did not finish) are listed at
    the end, so a missing row is never silent. The text is one section whose
    heading names the date, ``title`` (e.g. the suite), the machine and the
    commit, for :func:`add_markdown_section`."""
    when = when or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    everything = [r for results, _ in sections for r in results]
    devices = sorted({r["device"] for r in everything if r.get("device")})
    versions = sorted({r["version"] for r in everything if r.get("version")})
    device = "; ".join(devices) or "an unknown device"
    title = f"## {when.split()[0]} — {title or 'benchmark'}, {device}, commit {commit or git_commit()}"
    lines = [
        title,
        "",
        f"Measured {when} on {device}.",
        "",
        f"Versions: {'; '.join(versions)}.",
        "",
        f"Command: `{command}`",
        "",
        "Images/s = batch / median step time (timed steps after warm-up, pooled over rounds). A run is one "
        "section of the plan (its own processes and rounds); every ratio is taken within one run, and the "
        "methods of a row share one process, steps interleaved. Peak RSS: the row's largest process.",
        "",
    ]
    if note:
        lines += [note, ""]
    configs = list(dict.fromkeys(r["config"] for r in everything))
    for config in configs:
        rows, notes = [], []
        has_mfu = any(r.get("mfu") is not None for r in everything if r["config"] == config)
        for run, (results, found) in enumerate(sections, 1):
            here = [r for r in results if r["config"] == config]

            def ratio(name, found=found, config=config, **keys):
                for q in found:
                    if q["ratio"] == name and q.get("config") == config and all(q.get(k) == v for k, v in keys.items()):
                        return q["value"]
                return None

            refs = {r["dtype"]: r for r in here if r["backend"] == "hf_torch"}
            settings = list(
                dict.fromkeys(
                    (r["backend"], r["jit"], r["dtype"])
                    for r in here
                    if r["method"] in METHOD_NAMES and r["backend"] != "hf_torch"
                )
            )
            for backend, jit, dtype in settings:
                by = {
                    r["method"]: r
                    for r in here
                    if (r["backend"], r["jit"], r["dtype"]) == (backend, jit, dtype)
                    and not finetune_accum_steps(r["method"])
                }  # finetune: lines of its own below
                mae_rec = by.get("mae", {})
                ref = refs.get(dtype)
                keys = dict(backend=backend, jit=jit, dtype=dtype)
                cells = [run, backend, jit, dtype] + [
                    _fmt(by[m]["images_per_s"] if m in by else None, ".4g") for m in METHOD_NAMES
                ]
                cells.append(_fmt(mae_rec.get("tflops"), ".3g"))
                if has_mfu:
                    cells.append(_fmt(mae_rec.get("mfu"), ".1%"))
                same = ratio("ours/hf_torch images_per_s (same dtype)", **keys)
                cells += [
                    _fmt(ratio("lcmae_step/mae_step", **keys), ".3f"),
                    _fmt(ratio("mae_step/ae_step", **keys), ".3f"),
                    _fmt(ref["images_per_s"] if ref else None, ".4g"),
                    f"{same:.3f}x" if same else "",
                    _fmt(max(r["peak_rss_mb"] for r in by.values()), ".0f"),
                ]
                rows.append(cells)
            for dtype, ref in refs.items():
                label = f"HF ViTMAE (transformers, PyTorch eager, {ref.get('optimizer', 'torch.optim.AdamW')}"
                label += f", {ref['allocator']} malloc)" if ref.get("allocator") else ")"
                cells = [
                    run,
                    label,
                    "",
                    dtype + (" autocast" if dtype == "bfloat16" else ""),
                    _fmt(ref["images_per_s"], ".4g"),
                    "",
                    "",
                    _fmt(ref.get("tflops"), ".3g"),
                ]
                if has_mfu:
                    cells.append(_fmt(ref.get("mfu"), ".1%"))
                rows.append(cells + ["", "", "", "", _fmt(ref.get("peak_rss_mb"), ".0f")])
            notes += finetune_notes(run, here, found)
            for q in found:
                if q.get("config") != config:
                    continue
                if q["ratio"] == "best ours/best hf_torch images_per_s":
                    notes.append(
                        f"- Run {run}: best ours / best HF ViTMAE **{q['value']:.3f}x** (ours: {q['ours']}; HF: {q['hf_torch']})."
                    )
                elif q["ratio"] == "pipeline/fastest model images_per_s":
                    pipe = next(r for r in here if r["method"] == "pipeline")
                    notes.append(
                        f"- Run {run}: input pipeline (JPEG folder, pretraining transform) {pipe['images_per_s']:.4g} images/s, "
                        f"**{q['value']:.3g}x** the fastest model of its run ({q['model']})."
                    )
                elif q["ratio"] == "keras AdamW update/ours":
                    ups = {
                        r["method"]: r["median_step_s"]
                        for r in here
                        if r["backend"] == q["backend"] and r["method"].startswith("update_")
                    }
                    torch_part = (
                        f", torch.optim.AdamW {ups['update_torch_adamw']:.3g} s" if "update_torch_adamw" in ups else ""
                    )
                    if "update_torch_adamw_fused" in ups:
                        torch_part += f" (fused: {ups['update_torch_adamw_fused']:.3g} s)"
                    notes.append(
                        f"- Run {run}: one AdamW update of the MAE parameters ({q['backend']}): Keras' "
                        f"{ups['update_keras_adamw']:.3g} s, the recipe's {ups['update_ours_adamw']:.3g} s"
                        f"{torch_part} (Keras/recipe {q['value']:.3g}x)."
                    )
        batch = next((r["batch"] for r in everything if r["config"] == config and r.get("batch")), None)
        lines += [f"### {describe_config(config, batch)}", ""]
        if rows:
            head = (
                ["run", "backend", "jit_compile", "dtype"]
                + [f"{n} images/s" for n in METHOD_NAMES.values()]
                + ["MAE TFLOP/s"]
                + (["MAE MFU"] if has_mfu else [])
                + ["LC-MAE/MAE step", "MAE/AE step", "HF ViTMAE images/s, same run and dtype", "ours/HF", "peak RSS MB"]
            )
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in rows]
            lines.append("")
        if notes:
            lines += notes + [""]
    if failures:
        lines += ["### Jobs that failed", ""]
        lines += [
            f"- {f.get('config')} {f.get('method')} {f.get('backend')} jit={f.get('jit')}: "
            f"{' '.join(f.get('error') or ['no output'])}"
            for f in failures
        ]
        lines.append("")
    return "\n".join(lines)


RESULTS_MARKER = (
    "<!-- results: newest first; tools/benchmark.py --markdown docs/benchmarks.md "
    "inserts new sections below this line -->"
)


def git_commit():
    """The short hash of the checkout's HEAD, with ``+changes`` when the work
    tree differs from it; ``unknown`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty else "")


def add_markdown_section(path, section):
    """Adds one dated section (as :func:`markdown_report` writes) to the
    markdown file ``path``, newest first: right under :data:`RESULTS_MARKER`
    when the file has it (``docs/benchmarks.md``), at the top of any other
    existing file, or as a new file with a title and the marker."""
    section = section.strip() + "\n"
    if not os.path.exists(path):
        text = f"# Benchmarks\n\n{RESULTS_MARKER}\n\n{section}"
    else:
        with open(path) as f:
            old = f.read()
        at = old.find(RESULTS_MARKER)
        if at >= 0:
            end = old.index("\n", at) + 1 if "\n" in old[at:] else len(old)
            rest = old[end:].lstrip("\n")
            text = old[:end] + "\n" + section + ("\n" + rest if rest else "")
        else:
            text = section + "\n" + old
    with open(path, "w") as f:
        f.write(text)
