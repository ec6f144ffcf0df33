#!/usr/bin/env python
"""Runs the test suite once per Keras backend (TensorFlow, JAX, PyTorch).

Keras fixes its backend at import, so each backend gets its own pytest
process. Backend-independent tests (marker ``tf_only``: numpy, tf.data,
files, subprocess tools) run once, in the TensorFlow pass; training-dynamics
studies whose per-backend numerics other tests already cover (marker
``torch_pass``) run once, in the PyTorch pass, the fastest here.

    python tools/run_tests.py                 # all three backends
    python tools/run_tests.py --backends jax  # one backend
    python tools/run_tests.py --workers 1     # one pytest process per pass
    python tools/run_tests.py -- -k masking   # extra pytest arguments

Each pass spreads its tests over ``--workers`` pytest processes
(pytest-xdist; default: one per CPU core, at most 4). The tests use tiny
models, so most of their time is single-threaded Python, tracing and
compiling, so a pass on two cores takes about half as long with two workers.
Each worker gets an equal share of the cores through ``OMP_NUM_THREADS``
unless the caller set it: a PyTorch worker with more OpenMP threads than its
share of the cores runs slower than with one.

Ends with one line ``N passed, N failed, N skipped`` over all passes and
exits non-zero if any pass failed.
"""

import os
import re
import subprocess
import sys
import time

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # tools/cli.py, importable once tools/ is on the path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax", "torch")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|error|errors|deselected)")


def default_workers():
    return max(1, min(4, os.cpu_count() or 1))


def parse_backends(text):
    """``--backends``: the backends named, in order; None if any is unknown
    or none is given."""
    backends = [b.strip() for b in text.split(",") if b.strip()]
    return backends if backends and set(backends) <= set(BACKENDS) else None


FLAGS = cli.new_flags()
flags.DEFINE_string("backends", ",".join(BACKENDS), "Comma list of the backends to run a pass on.", flag_values=FLAGS)
flags.register_validator(
    "backends",
    lambda v: parse_backends(v) is not None,
    "takes a comma list of tensorflow, jax, torch",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "workers",
    default_workers(),
    "pytest processes per pass (pytest-xdist); 1 runs each pass in one process (default: one per CPU core, at most 4).",
    lower_bound=1,
    flag_values=FLAGS,
)


def have_xdist():
    try:
        import xdist  # noqa: F401
    except ImportError:
        return False
    return True


def pass_command(backend, extra, workers):
    """The pytest command line and environment of one backend's pass."""
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--durations=15"]
    if backend == "tensorflow":
        cmd += ["-m", "not torch_pass"]
    elif backend == "torch":
        cmd += ["-m", "not tf_only"]
    else:
        cmd += ["-m", "not tf_only and not torch_pass"]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    if workers > 1:
        cmd += ["-n", str(workers)]
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    cmd += extra
    return cmd, env


def run(backend, extra, workers):
    cmd, env = pass_command(backend, extra, workers)
    print(f"=== KERAS_BACKEND={backend}: {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if COUNT.search(line):
            last = line
    proc.wait()
    counts = {k: 0 for k in ("passed", "failed", "skipped")}
    for n, kind in COUNT.findall(last):
        kind = "failed" if kind.startswith("error") else kind
        if kind in counts:
            counts[kind] += int(n)
    if proc.returncode not in (0,) and counts["failed"] == 0:
        counts["failed"] += 1  # a crash or collection error counts as a failure
    print(f"=== {backend}: {counts} in {time.time() - start:.0f}s (exit {proc.returncode})", flush=True)
    return counts, proc.returncode


def main(argv=None):
    """``python tools/run_tests.py [--backends B,..] [--workers N] [-- PYTEST_ARGS]``."""
    pytest_args = cli.parse(FLAGS, argv, __doc__)
    backends = parse_backends(FLAGS.backends)
    workers = FLAGS.workers
    if workers > 1 and not have_xdist():
        print("=== pytest-xdist is not installed (pip install -e '.[test]'): one process per pass", flush=True)
        workers = 1
    total = {"passed": 0, "failed": 0, "skipped": 0}
    ok = True
    for backend in backends:
        counts, code = run(backend, pytest_args, workers)
        for k in total:
            total[k] += counts[k]
        ok = ok and code == 0
    print(f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    sys.exit(0 if ok and total["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
