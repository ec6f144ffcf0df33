#!/usr/bin/env python
"""Runs the test suite once per Keras backend (TensorFlow, JAX, PyTorch).

Keras fixes its backend at import, so each backend gets its own pytest
process. Backend-independent tests (marker ``tf_only``: numpy, tf.data,
files, subprocess tools) run once, in the TensorFlow pass; training-dynamics
studies whose per-backend numerics other tests already cover (marker
``torch_pass``) run once, in the PyTorch pass, the fastest here.

    python tools/run_tests.py                 # all three backends
    python tools/run_tests.py --backends jax  # one backend
    python tools/run_tests.py -- -k masking   # extra pytest arguments

Ends with one line ``N passed, N failed, N skipped`` over all passes and
exits non-zero if any pass failed.
"""

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNT = re.compile(r"(\d+) (passed|failed|skipped|error|errors|deselected)")


def run(backend, extra):
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--durations=15"]
    if backend == "tensorflow":
        cmd += ["-m", "not torch_pass"]
    elif backend == "torch":
        cmd += ["-m", "not tf_only"]
    else:
        cmd += ["-m", "not tf_only and not torch_pass"]
    cmd += extra
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    total = {"passed": 0, "failed": 0, "skipped": 0}
    ok = True
    for backend in args.backends.split(","):
        counts, code = run(backend.strip(), args.pytest_args)
        for k in total:
            total[k] += counts[k]
        ok = ok and code == 0
    print(f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    sys.exit(0 if ok and total["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
