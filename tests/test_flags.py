"""Every number and choice flag of every recipe refuses a bad value when the
flags are parsed, with one line naming the flag; checks after parsing (flags
that do not fit together, missing files) end in one line too."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.tf_only]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")

# Number flags any value of which is valid.
ANY_VALUE = {"seed"}
# Bad values of string flags, on top of what the parsers' types and bounds give.
BAD_STRINGS = {"setting": ["ab", "", "h", "a,b"]}

# Run in a fresh interpreter per recipe: imports the recipe (its flags), then
# parses each bad value alone and records what absl said.
CHILD = r"""
import importlib, json, math, sys
sys.path.insert(0, ".")
from absl import flags
module = importlib.import_module("recipes." + sys.argv[1])
FLAGS = flags.FLAGS
any_value, bad_strings = json.loads(sys.argv[2]), json.loads(sys.argv[3])
cases, unbounded = [], []
for flag in FLAGS.get_key_flags_for_module(module):
    parser, name = flag.parser, flag.name
    bad = []
    if isinstance(parser, (flags.IntegerParser, flags.FloatParser)):
        lo, hi = parser.lower_bound, parser.upper_bound
        if lo is None and hi is None and name not in any_value:
            unbounded.append(name)
        step = 1 if isinstance(parser, flags.IntegerParser) else 0.5
        bad += [lo - step] if lo is not None else []
        bad += [hi + step] if hi is not None else []
        bad += ["nan", "inf"] if isinstance(parser, flags.FloatParser) else []
        bad += ["x"]
    elif isinstance(parser, flags.EnumParser):
        bad += ["bogus", ""]
    bad += bad_strings.get(name, [])
    for value in bad:
        FLAGS.unparse_flags()
        try:
            FLAGS(["prog", f"--{name}={value}"])
            said = None
        except flags.Error as e:
            said = str(e)
        cases.append([name, str(value), said])
print(json.dumps({"cases": cases, "unbounded": unbounded}))
"""


@pytest.mark.parametrize("recipe", ["pretrain", "finetune", "linprobe"])
def test_every_bad_flag_value_is_refused_naming_the_flag(recipe):
    proc = subprocess.run([sys.executable, "-c", CHILD, recipe, json.dumps(sorted(ANY_VALUE)), json.dumps(BAD_STRINGS)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["unbounded"], f"number flags with no range: {result['unbounded']}"
    cases = result["cases"]
    assert len(cases) >= 40, len(cases)
    accepted = [(name, value) for name, value, said in cases if said is None]
    assert not accepted, f"bad values the parse accepted: {accepted}"
    for name, value, said in cases:
        assert f"--{name}={value}" in said and "\n" not in said.strip(), (name, value, said)
    if recipe == "pretrain":
        named = {name for name, _, _ in cases}
        assert {"setting", "mask_ratio", "blr", "batch_size", "decoder", "strategy", "w_in"} <= named


def run(script, *args):
    return subprocess.run([sys.executable, f"recipes/{script}", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("pretrain.py", ["--setting=ab"], "flag --setting=ab: must be one of the LC-MAE settings a-g"),
        ("pretrain.py", ["--setting="], "flag --setting=: must be one of the LC-MAE settings a-g"),
        ("pretrain.py", ["--blr=nan"], "flag --blr=nan: must be a finite number"),
        # after parsing: flags that do not fit together, a missing file
        ("pretrain.py", ["--w_mae=0", "--w_cross=0", "--w_in=0"], "--setting/--w_mae/--w_cross/--w_in: loss_weights"),
        ("finetune.py", ["--encoder=/no/such/encoder.keras"], "--encoder: '/no/such/encoder.keras' does not exist"),
        ("linprobe.py", ["--batch_size=10", "--accum_steps=4"], "--batch_size=10 is not divisible by --accum_steps=4"),
    ],
)
def test_a_bad_flag_is_one_line(script, args, message, tmp_path):
    proc = run(script, *args, f"--output_dir={tmp_path / 'never'}")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "absl::InitializeLog" not in line]
    errors = [line for line in lines if line.startswith("FATAL Flags")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "flags:" not in proc.stderr  # no usage text above it
    assert not os.path.exists(tmp_path / "never")
