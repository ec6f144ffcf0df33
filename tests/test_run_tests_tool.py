"""tools/run_tests.py, the README's test command: how it splits the suite
into backend passes and spreads each over pytest-xdist workers (TensorFlow
pass only)."""

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.tf_only]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import run_tests  # noqa: E402

TOOL = os.path.join(ROOT, "tools", "run_tests.py")


def _marker(cmd):
    return cmd[cmd.index("-m", cmd.index("pytest") + 1) + 1]


def test_each_backend_gets_its_marker_and_the_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run_tests.os, "cpu_count", lambda: 4)
    markers = {b: _marker(run_tests.pass_command(b, [], 1)[0]) for b in ("tensorflow", "jax", "torch")}
    assert markers == {
        "tensorflow": "not torch_pass",
        "jax": "not tf_only and not torch_pass",
        "torch": "not tf_only",
    }
    cmd, env = run_tests.pass_command("torch", ["-k", "masking"], 1)
    assert "-n" not in cmd and "OMP_NUM_THREADS" not in env
    assert env["KERAS_BACKEND"] == "torch" and cmd[-2:] == ["-k", "masking"]
    cmd, env = run_tests.pass_command("jax", ["-x"], 2)
    assert cmd[cmd.index("-n") + 1] == "2" and cmd[-1] == "-x"
    assert env["OMP_NUM_THREADS"] == "2" and env["KERAS_BACKEND"] == "jax"  # 4 cores / 2 workers
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the caller's choice is kept
    assert run_tests.pass_command("torch", [], 2)[1]["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "FATAL Flags error: flag --workers=0: 0 is not a positive integer"),
        (
            ["--backends", "tf,jax"],
            "FATAL Flags error: flag --backends=tf,jax: takes a comma list of tensorflow, jax, torch",
        ),
        (["--backends="], "FATAL Flags error: flag --backends=: takes a comma list"),
        (["--no_such_flag"], "FATAL Flags error: Unknown command line flag 'no_such_flag'"),
    ],
)
def test_bad_arguments_are_named(args, message):
    result = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message), result.stderr  # one line, no usage text


def test_the_readme_command_line_is_read_as_before():
    """Space-separated values, ``--`` before pytest's own arguments; each
    call starts from the defaults."""
    flags = run_tests.FLAGS
    assert run_tests.cli.parse(flags, ["--backends", "jax", "--workers", "1", "--", "-k", "masking"], "") == [
        "-k",
        "masking",
    ]
    assert (flags.backends, flags.workers) == ("jax", 1)
    assert run_tests.cli.parse(flags, [], "") == []
    assert run_tests.parse_backends(flags.backends) == ["tensorflow", "jax", "torch"]
    assert flags.workers == run_tests.default_workers()


def test_help_shows_the_flags():
    result = subprocess.run([sys.executable, TOOL, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0
    assert "--backends" in result.stdout and "--workers" in result.stdout and "-- -k masking" in result.stdout


@pytest.mark.slow
def test_two_workers_run_and_count_a_selection():
    """The real command on a few tests over two xdist workers: the pass line
    and the closing total count what pytest ran."""
    result = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--backends",
            "tensorflow",
            "--workers",
            "2",
            "--",
            "-k",
            "test_patchify_matches_official_layout",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "-n 2" in lines[0]
    total = lines[-1].split(", ")
    passed = int(total[0].split()[0])
    assert passed > 0 and total[1:] == ["0 failed", "0 skipped"], lines[-1]
    assert f"=== tensorflow: {{'passed': {passed}, 'failed': 0, 'skipped': 0}}" in result.stdout
