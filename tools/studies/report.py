"""Numbers to verdicts, and verdicts to a results page.

The comparison rule, used by every study: two groups of runs (seeds) differ
when the difference of their means exceeds ``t * s * sqrt(1/n_a + 1/n_b)``,
where ``s`` is the per-run spread over seeds pooled over every group of the
study that has two or more seeds (so a group with one seed still gets an
honest error bar) and ``t`` the two-sided 95 % Student-t quantile for the
degrees of freedom of that pooled spread: a pooled two-sample t-test. A
difference measured within each run is tested against its own spread over
seeds (a one-sample t-test). A finding whose predicted direction shows
beyond that margin is **reproduced**, one whose opposite shows beyond it is
**contradicted**, anything within it is **not at this scale** (the numbers
are given either way).
"""

import json
import math
import os

REPRODUCED = "reproduced"
NOT_AT_SCALE = "not at this scale"
CONTRADICTED = "contradicted"
VERDICTS = (REPRODUCED, NOT_AT_SCALE, CONTRADICTED)


# --------------------------------------------------------------------------- numbers
def mean(values):
    return sum(values) / len(values)


def std(values):
    """Sample standard deviation (n - 1); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# two-sided 95 % quantiles of Student's t by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T975_TAIL = ((12, 2.179), (15, 2.131), (20, 2.086), (30, 2.042), (60, 2.0), (120, 1.98))


def t_quantile(dof):
    """The two-sided 95 % Student-t quantile for ``dof`` degrees of freedom
    (rounded down to the nearest tabulated ``dof`` beyond 10: conservative)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1, got {dof}")
    if dof in _T975:
        return _T975[dof]
    value = _T975[10]
    for d, t in _T975_TAIL:
        if dof >= d:
            value = t
    return value if dof < 1000 else 1.96


class Spread:
    """A per-run spread over seeds and its degrees of freedom."""

    def __init__(self, value, dof):
        self.value, self.dof = value, dof


def pooled_std(groups):
    """The per-run spread pooled over the groups with two or more values,
    ``sqrt(sum((n_i - 1) s_i^2) / sum(n_i - 1))``, as a :class:`Spread` with
    ``sum(n_i - 1)`` degrees of freedom; None when no group has two."""
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    if dof == 0:
        return None
    return Spread(math.sqrt(sum((len(g) - 1) * std(g) ** 2 for g in groups if len(g) > 1) / dof), dof)


def compare(a, b, spread):
    """``mean(a) - mean(b)`` and its margin, the 95 % t-quantile times the
    standard error under the per-run ``spread`` (a :class:`Spread`):
    ``{"diff", "margin", "exceeds"}``."""
    diff = mean(a) - mean(b)
    margin = None
    if spread is not None:
        margin = t_quantile(spread.dof) * spread.value * math.sqrt(1 / len(a) + 1 / len(b))
    return {"diff": diff, "margin": margin, "exceeds": margin is not None and abs(diff) > margin}


def per_seed(differences):
    """A comparison made within each seed (``differences``: one value per
    seed, e.g. layer 1 minus the rest): their mean, against the 95 %
    t-quantile times its standard error over seeds; no margin with one seed."""
    n = len(differences)
    diff = mean(differences)
    margin = t_quantile(n - 1) * std(differences) / math.sqrt(n) if n > 1 else None
    return {"diff": diff, "margin": margin, "exceeds": margin is not None and abs(diff) > margin}


def directional_verdict(comparison, expected_sign=1):
    """The verdict on a finding that predicts ``sign(mean(a) - mean(b)) ==
    expected_sign``."""
    if not comparison["exceeds"]:
        return NOT_AT_SCALE
    return REPRODUCED if comparison["diff"] * expected_sign > 0 else CONTRADICTED


def equivalence_verdict(comparison, gain):
    """The verdict on "b does about as well as a" (``comparison``: a - b):
    contradicted when ``a`` is better beyond the margin; reproduced when it
    is not and the test could have told, i.e. the ``gain`` the comparison is
    about (pretraining vs none) is itself beyond its margin and the
    comparison's margin is under half of that gain; else not at this scale."""
    if comparison["exceeds"] and comparison["diff"] > 0:
        return CONTRADICTED
    if not gain["exceeds"] or gain["diff"] <= 0 or comparison["margin"] >= gain["diff"] / 2:
        return NOT_AT_SCALE
    return REPRODUCED


def spearman(x, y):
    """Spearman's rank correlation (ties get their mean rank)."""

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = mean(rx), mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else 0.0


# --------------------------------------------------------------------------- text
def pct(value, digits=1):
    return f"{100 * value:.{digits}f}"


def mean_std(values, scale=100.0, digits=1):
    """``"78.1 ± 0.4 (3)"`` for several values (percent by default), the
    value alone for one."""
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * mean(values):.{digits}f} ± {scale * std(values):.{digits}f} ({len(values)})"


def diff_text(comparison, scale=100.0, unit=" pt", digits=1):
    """``"+1.2 pt (margin ±0.8)"``."""
    margin = comparison["margin"]
    margin_text = f"margin ±{scale * margin:.{digits}f}" if margin is not None else "one seed: no margin"
    return f"{scale * comparison['diff']:+.{digits}f}{unit} ({margin_text})"


def table(header, rows):
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Finding:
    """One claim of the paper, what this project measured, and the verdict."""

    def __init__(self, claim, paper, measured, verdict):
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        self.claim, self.paper, self.measured, self.verdict = claim, paper, measured, verdict

    def as_dict(self):
        return dict(claim=self.claim, paper=self.paper, measured=self.measured, verdict=self.verdict)


class Page:
    """A study's results page. Everything on it comes from the runs' records,
    so writing it again from the same runs gives the same bytes."""

    def __init__(self, study, title, source, summary):
        self.study, self.title, self.source, self.summary = study, title, source, summary
        self.sections = []  # (heading, markdown)
        self.findings = []
        self.figures = []  # (file name, caption)

    def section(self, heading, text):
        self.sections.append((heading, text))

    def finding(self, claim, paper, measured, verdict):
        self.findings.append(Finding(claim, paper, measured, verdict))

    def figure(self, name, caption):
        self.figures.append((name, caption))

    def markdown(self, command, scale, records):
        envs = {json.dumps(r["environment"], sort_keys=True): r["environment"] for r in records}
        seconds = sum(r["seconds"] for r in records)
        dates = sorted({r["finished"] for r in records})
        lines = [f"# {self.title}", "", f"*{self.source}.* {self.summary}", ""]
        lines += [
            f"- **Command:** `{command}`",
            f"- **Scale:** {scale.label}: {describe(scale)}",
            f"- **Runs:** {len(records)}, {seconds / 60:.1f} min in all (the sum of their wall times, "
            "slowed by whatever else ran on the machine at the time; finished "
            f"{dates[0] if dates else '-'}{' to ' + dates[-1] if len(dates) > 1 else ''})",
        ]
        for env in envs.values():
            versions = ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items()))
            lines.append(
                f"- **Machine:** {env['machine']}; keras_lcmae {env['commit']}, "
                f"backend {env['backend']}, Python {env['python']}, {versions}"
            )
        lines += ["", "## Findings", ""]
        lines.append(
            table(
                ["Finding", "Paper", "This project", "Verdict"],
                [[f.claim, f.paper, f.measured, f"**{f.verdict}**"] for f in self.findings],
            )
        )
        lines += ["", RULE, ""]
        for heading, text in self.sections:
            lines += [f"## {heading}", "", text.rstrip(), ""]
        for name, caption in self.figures:
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
        return "\n".join(lines).rstrip() + "\n"

    def summary_record(self, command, scale):
        return dict(
            study=self.study,
            title=self.title,
            command=command,
            scale=scale.label,
            findings=[f.as_dict() for f in self.findings],
        )


RULE = (
    "Verdicts: two groups of runs differ when their means differ by more than the margin of a 95 % "
    "t-test: the t-quantile times the standard error given by the spread over seeds (pooled over "
    "the study's groups with two or more seeds; for a difference measured within each run, its own "
    "spread over seeds). *Reproduced*: the paper's direction shows beyond that margin; "
    "*contradicted*: the opposite does; *not at this scale*: within it. A claim that two do about "
    "as well is judged only where pretraining itself beats random init and the margin is under half "
    "of that gain. Each number is from the runs listed under Runs."
)


def describe(scale):
    e, p = scale.encoder, scale.pretrain_flags
    steps = p.get("steps_per_epoch")
    schedule = f"{p['epochs']} x {steps} steps" if steps else f"{p['epochs']} epochs"
    return (
        f"ViT {e['hidden_dim']} wide x {e['depth']} deep ({e['num_heads']} heads), {e['patch_size']}-px patches "
        f"on 32-px Fashion-MNIST; pretraining {schedule} of batch {p['batch_size']}; "
        f"linear probe + kNN on {scale.linprobe_flags.get('train_limit', 'all')} training images, "
        f"finetune {scale.finetune_flags['epochs']} x {scale.finetune_flags.get('steps_per_epoch', 'full')} "
        f"steps of batch {scale.finetune_flags['batch_size']}; {scale.seeds} seeds where seeds are compared"
    )


def write_page(page, results_dir, command, scale, records):
    """``<results_dir>/<study>.md`` and ``<study>.json`` (the findings, for
    the index); returns the Markdown path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{page.study}.md")
    with open(path, "w") as f:
        f.write(page.markdown(command, scale, records))
    with open(os.path.join(results_dir, f"{page.study}.json"), "w") as f:
        json.dump(page.summary_record(command, scale), f, indent=1)
        f.write("\n")
    return path


def write_index(results_dir, order):
    """``<results_dir>/README.md``: every finding of every study whose page
    exists, paper vs this project, linked to its page."""
    rows, missing = [], []
    for study in order:
        try:
            with open(os.path.join(results_dir, f"{study}.json")) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            missing.append(study)
            continue
        for finding in summary["findings"]:
            rows.append(
                [
                    f"[{summary['title']}]({study}.md)",
                    finding["claim"],
                    finding["paper"],
                    finding["measured"],
                    f"**{finding['verdict']}**",
                ]
            )
    lines = [
        "# The paper's findings at small scale",
        "",
        "Each finding of the LC-MAE paper, next to what this project measures when it reruns the "
        "experiment at a scale a laptop-class machine affords (`python tools/study.py NAME`, see "
        "[docs/studies.md](../studies.md)). A verdict of *not at this scale* means the effect is "
        "within the spread over seeds here, not that the paper is wrong.",
        "",
        table(["Study", "Finding", "Paper", "This project", "Verdict"], rows),
    ]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(f"`{m}`" for m in missing) + "."]
    path = os.path.join(results_dir, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
