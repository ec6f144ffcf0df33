"""The command line of the tools in tools/ (absl flags through tools/cli.py):
one-line errors naming the flag with exit status 2, --help listing the
flags, several tools loaded in one process, each call parsed from the
defaults."""

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.tf_only]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"cli_test_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "tool,args,message",
    [
        ("collapse_study.py", ["--settings=a,h"], "flag --settings=a,h: must be a comma list of LC-MAE settings a-g"),
        ("collapse_study.py", ["--steps", "0"], "flag --steps=0: 0 is not a positive integer"),
        ("mask_ratio_sweep.py", ["--mask_ratios=0.5,1.5"], "flag --mask_ratios=0.5,1.5: must be a comma list"),
        ("mask_ratio_sweep.py", ["--flagfile=/no/such.flags"], "flag --flagfile=/no/such.flags: no such file"),
        ("analyze.py", ["bogus"], "unknown subcommand 'bogus'"),
        ("analyze.py", ["reconstruction", "--reference=x.keras"], "Unknown command line flag 'reference'"),
        ("analyze.py", ["clusters", "--checkpoint=x.keras", "--num_images=0"], "flag --num_images=0"),
        ("convert_mae_checkpoint.py", [], "--input and --output are required"),
    ],
)
def test_a_bad_tool_flag_is_one_line(tool, args, message):
    proc = subprocess.run(
        [sys.executable, os.path.join("tools", tool), *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("FATAL Flags error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "tool,flag",
    [
        ("collapse_study.py", "--settings"),
        ("mask_ratio_sweep.py", "--mask_ratios"),
        ("analyze.py", "--encoder_mask_ratio"),
    ],
)
def test_help_lists_the_flags(tool, flag):
    proc = subprocess.run(
        [sys.executable, os.path.join("tools", tool), "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and flag in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_tools_share_flag_names_in_one_process_and_each_call_starts_from_the_defaults():
    analyze, sweep = _load_tool("analyze"), _load_tool("mask_ratio_sweep")  # both define --output_dir, --data
    args = analyze.parse_args(["attention-maps", "--checkpoint=m.keras", "--query=3,5", "--output_dir=o"])
    assert (args.command, args.rows, args.query, args.output_dir) == ("attention-maps", 2, [3, 5], "o")
    args = analyze.parse_args(["reconstruction", "--checkpoint=m.keras"])
    assert (args.rows, args.output_dir, args.no_resize) == (8, "runs/analysis", False)  # its own default
    assert not hasattr(args, "query")
    sweep.cli.parse(
        sweep.FLAGS,
        [
            "--flagfile",
            os.path.join(ROOT, "recipes", "configs", "demo_cpu.flags"),
            "--pretrain_flag=--batch_size=8",
            "--pretrain_flag=--epochs=1",
            "--reuse",
        ],
        "",
    )
    assert sweep.FLAGS.pretrain_flag == ["--batch_size=8", "--epochs=1"] and sweep.FLAGS.reuse
    sweep.cli.parse(sweep.FLAGS, [], "")
    assert sweep.FLAGS.pretrain_flag == [] and not sweep.FLAGS.reuse
    assert sweep.parse_ratios(sweep.FLAGS.mask_ratios) == [0.3, 0.45, 0.6, 0.75, 0.9]
