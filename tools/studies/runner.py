"""Runs of the recipes that a study is made of, each in its own folder,
done once: a finished run is found again by its key and reused.

A :class:`Run` is one command line of a recipe (``recipes/pretrain.py``,
``linprobe.py``, ``finetune.py``) or of ``tools/analyze.py``. Its key is a
hash of the script, its flags and the keys of the runs whose files it reads
(:class:`Input`), so two studies that need the same run share it, and a run
whose flags changed is run again in a folder of its own. A finished run
leaves ``study_run.json`` in its folder: the command, the recipe's final JSON
line, its wall time, and the machine and library versions it ran on; a
folder without that file is an unfinished run, and the same command runs in
it again (``recipes/pretrain.py`` resumes from its ``backup/``). Several
study processes may share a runs folder: a run is locked while it runs, and
the second process waits and reuses it.
"""

import dataclasses
import datetime
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

from bench.report import git_commit  # the short commit, "+changes" for a modified checkout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORD = "study_run.json"


@dataclasses.dataclass(frozen=True)
class Input:
    """A file of another run that a run reads: ``{placeholder}`` in the
    run's flags becomes that file's path."""

    placeholder: str
    run: "Run"
    path: str


@dataclasses.dataclass(frozen=True)
class Run:
    """One command: ``python <script> <flags> --output_dir=<its folder>``.

    ``name`` is readable (``pretrain/lcmae_a_s0``); ``flags`` may hold
    ``{placeholder}`` fields that :class:`Input` fills with paths.
    """

    name: str
    script: str
    flags: tuple
    inputs: tuple = ()
    output_flag: str = "--output_dir"

    @property
    def key(self):
        text = json.dumps(
            [self.script, list(self.flags), [(i.placeholder, i.run.key, i.path) for i in self.inputs]],
            sort_keys=True,
        )
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    @property
    def folder_name(self):
        return f"{self.name}-{self.key}"

    def flag(self, name, default=None):
        """The value of ``--name=value`` among the flags (the last one wins)."""
        values = [f.split("=", 1)[1] for f in self.flags if f.startswith(f"--{name}=")]
        return values[-1] if values else default


def machine():
    """The device the recipes compute on: the first GPU's name where
    ``nvidia-smi`` lists one, else the CPU's model and core count."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0 and names:
            return f"gpu: {names[0]}" + (f" (x{len(names)})" if len(names) > 1 else "")
    except (OSError, subprocess.SubprocessError):
        pass
    name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {name} ({cores} cores)"


def keras_backend():
    """The backend the recipes will use: ``KERAS_BACKEND``, else the one in
    ``~/.keras/keras.json``, else TensorFlow (Keras' default)."""
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    path = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "keras.json")
    try:
        with open(path) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def environment():
    """What a run's numbers depend on besides its flags."""
    versions = {}
    for package in ("keras", "tensorflow", "numpy", "jax", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    backend = keras_backend()
    return {
        "machine": machine(),
        "commit": git_commit(),
        "backend": backend,
        "python": platform.python_version(),
        "versions": {k: v for k, v in versions.items() if k in ("keras", "numpy", "tensorflow") or k == backend},
    }


class RunFailed(RuntimeError):
    """A recipe ended with an error; the message names the run and its log."""


class Runner:
    """Runs :class:`Run`\\ s under ``runs_dir`` (``reuse``: a finished run
    is not run again)."""

    def __init__(self, runs_dir, reuse=True, log=None, env=None):
        self.runs_dir = os.path.abspath(runs_dir)
        self.reuse = reuse
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.env = env
        self.ran = []  # names of the runs this runner executed (not reused)
        self._environment = None
        self._done = {}

    def folder(self, run):
        return os.path.join(self.runs_dir, run.folder_name)

    def path(self, run, relative):
        return os.path.join(self.folder(run), relative)

    def command(self, run):
        """The command line, with the input paths filled in."""
        fields = {i.placeholder: self.path(i.run, i.path) for i in run.inputs}
        flags = [f.format(**fields) if fields else f for f in run.flags]
        return [sys.executable, os.path.join(ROOT, run.script), *flags, f"{run.output_flag}={self.folder(run)}"]

    def finished(self, run):
        """The record of a finished run, or None."""
        try:
            with open(self.path(run, RECORD)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def result(self, run):
        """The record of ``run`` (running it, and first the runs it reads,
        unless finished and ``reuse``)."""
        if run.key in self._done:
            return self._done[run.key]
        for source in run.inputs:
            self.result(source.run)
        record = self.finished(run) if self.reuse else None
        if record is None:
            os.makedirs(self.folder(run), exist_ok=True)
            with open(os.path.join(self.folder(run), ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another study process may be running this very run
                record = self.finished(run) if self.reuse else None
                if record is None:
                    record = self._execute(run)
        self._done[run.key] = record
        return record

    def _execute(self, run):
        folder = self.folder(run)
        os.makedirs(folder, exist_ok=True)
        cmd = self.command(run)
        shown = " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) and c.startswith(ROOT) else c for c in cmd[1:])
        self.log(f"[study] run {run.name}: {shown}")
        if self._environment is None:
            self._environment = environment()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(self.env or {}))
        start = time.time()
        with open(os.path.join(folder, "log.txt"), "a") as log:  # an interrupted attempt's log stays above
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env)
            log.write(proc.stdout)
        seconds = time.time() - start
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RunFailed(
                f"run {run.name} failed (exit {proc.returncode}); its output is in {os.path.join(folder, 'log.txt')}"
            )
        record = {
            "name": run.name,
            "key": run.key,
            "script": run.script,
            "flags": list(run.flags),
            "inputs": {i.placeholder: f"{i.run.folder_name}/{i.path}" for i in run.inputs},
            "result": json.loads(lines[-1]),
            "seconds": round(seconds, 1),
            "finished": datetime.date.today().isoformat(),
            "environment": self._environment,
        }
        tmp = os.path.join(folder, RECORD + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(folder, RECORD))
        self.ran.append(run.name)
        self.log(f"[study] done {run.name} in {seconds:.0f} s")
        return record
