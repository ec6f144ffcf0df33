"""What the studies share: groups of seeded runs, reading their results."""

import csv


class Group:
    """Runs of one configuration over seeds: ``pretrain[i]``, and its
    ``linprobe[i]`` / ``finetune[i]`` when evaluated (None for a random
    encoder's group, which has no pretraining)."""

    def __init__(self, label, pretrain=(), linprobe=(), finetune=()):
        self.label = label
        self.pretrain, self.linprobe, self.finetune = list(pretrain), list(linprobe), list(finetune)

    def runs(self):
        out = []
        for i in range(max(len(self.pretrain), len(self.linprobe), len(self.finetune))):
            for part in (self.pretrain, self.linprobe, self.finetune):
                if i < len(part):
                    out.append(part[i])
        return out


def evaluated(scale, label, seeds, linprobe=True, finetune=True, **pretrain_flags):
    """A :class:`Group`: ``pretrain_flags`` pretrained under each seed in
    ``seeds``, each encoder judged by the linear probe (+ kNN) and the short
    finetune of the profile, with the same seed."""
    pre = [scale.pretrain(label, s, **pretrain_flags) for s in seeds]
    return Group(
        label,
        pre,
        [scale.linprobe(p, s) for p, s in zip(pre, seeds)] if linprobe else (),
        [scale.finetune(p, s) for p, s in zip(pre, seeds)] if finetune else (),
    )


def random_init(scale, seeds, linprobe=True):
    """The baseline :class:`Group`: a random encoder of the profile's
    architecture under the same protocols and seeds."""
    return Group(
        "random init",
        (),
        [scale.linprobe(None, s) for s in seeds] if linprobe else (),
        [scale.finetune(None, s) for s in seeds],
    )


def group_runs(groups):
    r"""Every run of the :class:`Group`\ s (a dict), each once, in order."""
    return unique(run for group in groups.values() for run in group.runs())


def unique(runs):
    """``runs`` without repeats (by key), first occurrence first."""
    seen, out = set(), []
    for run in runs:
        if run.key not in seen:
            seen.add(run.key)
            out.append(run)
    return out


class Results:
    """The finished runs of a study, read through its :class:`Runner`."""

    def __init__(self, runner):
        self.runner = runner

    def record(self, run):
        return self.runner.result(run)

    def value(self, run, key):
        return float(self.record(run)["result"][key])

    def values(self, runs, key):
        return [self.value(r, key) for r in runs]

    def top1(self, group, protocol):
        return self.values(getattr(group, protocol), "top1")

    def knn(self, group):
        return self.values(group.linprobe, "knn_top1")

    def accuracies(self, groups):
        """``(finetune, linprobe, knn)``: top-1 per seed of each group (a
        dict of :class:`Group`), keyed as ``groups``."""
        return (
            {k: self.top1(g, "finetune") for k, g in groups.items()},
            {k: self.top1(g, "linprobe") for k, g in groups.items()},
            {k: self.knn(g) for k, g in groups.items()},
        )

    def csv_rows(self, run, name):
        """The rows of ``<name>.csv`` that an analysis run wrote."""
        with open(self.runner.path(run, f"{name}.csv"), newline="") as f:
            return list(csv.DictReader(f))
