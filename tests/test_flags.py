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
BAD_STRINGS = {
    "setting": ["ab", "", "h", "a,b"],
    "loss_weights": ["ab", "", "h", "a,b", "1,1", "1,1,1,1", "1,-1,0", "0,0,0", "1,nan,0", "x,1,1"],
}

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
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, recipe, json.dumps(sorted(ANY_VALUE)), json.dumps(BAD_STRINGS)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
        assert {
            "loss_weights",
            "setting",
            "mask_ratio",
            "blr",
            "batch_size",
            "decoder",
            "strategy",
            "w_in",
            "decoder_hidden_dim",
            "decoder_width",
            "num_channels",
            "channels",
        } <= named


def run(script, *args):
    return subprocess.run(
        [sys.executable, f"recipes/{script}", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("pretrain.py", ["--setting=ab"], "flag --setting=ab: must be one of the LC-MAE settings a-g"),
        ("pretrain.py", ["--setting="], "flag --setting=: must be one of the LC-MAE settings a-g"),
        ("pretrain.py", ["--blr=nan"], "flag --blr=nan: must be a finite number"),
        # after parsing: flags that do not fit together, a missing file
        ("pretrain.py", ["--loss_weights=1,,0"], "flag --loss_weights=1,,0: must be one of the LC-MAE settings"),
        (
            "pretrain.py",
            ["--w_mae=0", "--w_cross=0", "--w_in=0"],
            "--loss_weights/--w_mae/--w_cross/--w_in: loss_weights",
        ),
        # a deprecated name and its new one, given different values
        (
            "pretrain.py",
            ["--decoder_width=64", "--decoder_hidden_dim=32"],
            "--decoder_width=64 and --decoder_hidden_dim=32 disagree",
        ),
        ("pretrain.py", ["--setting=b", "--loss_weights=c"], "--setting=b and --loss_weights=c disagree"),
        (
            "finetune.py",
            ["--drop_path=0.2", "--drop_path_rate=0.1"],
            "--drop_path=0.2 and --drop_path_rate=0.1 disagree",
        ),
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


# --------------------------------------------------------------------------- flag names and deprecated aliases
TINY_PRETRAIN = [
    "--data=fashion_mnist",
    "--image_size=32",
    "--patch_size=8",
    "--model=vit_test",
    "--hidden_dim=32",
    "--depth=2",
    "--num_heads=2",
    "--decoder_depth=1",
    "--projector_dim=16",
    "--batch_size=8",
    "--steps_per_epoch=1",
    "--epochs=1",
    "--monitor_every=0",
    "--dry_run",
]


def _dry_run_config(script, args, out):
    proc = run(script, *args, f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "model_config.json")) as f:
        config = json.load(f)["config"]
    with open(os.path.join(out, "flags.txt")) as f:
        written = f.read()
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING: --")]
    return config, written, warnings


def test_new_flag_names_set_the_constructor_arguments_and_old_names_still_work_with_a_warning(tmp_path):
    new = ["--num_channels=3", "--decoder_hidden_dim=24", "--decoder_num_heads=3", "--loss_weights=0.5,0.25,0.125"]
    old = [
        "--channels=3",
        "--decoder_width=24",
        "--decoder_heads=3",
        "--setting=a",
        "--w_mae=0.5",
        "--w_cross=0.25",
        "--w_in=0.125",
    ]
    config, written, warnings = _dry_run_config("pretrain.py", TINY_PRETRAIN + new, tmp_path / "new")
    assert not warnings
    assert config["encoder"]["config"]["num_channels"] == 3
    decoder = config["decoder"]["config"]
    assert (decoder["hidden_dim"], decoder["num_heads"]) == (24, 3)
    assert config["loss_weights"] == {"mae": 0.5, "cross": 0.25, "in": 0.125}

    old_config, old_written, warnings = _dry_run_config("pretrain.py", TINY_PRETRAIN + old, tmp_path / "old")
    assert old_config == config
    assert warnings == [
        f"WARNING: --{o} is deprecated; use --{n}"
        for o, n in (
            ("channels", "num_channels"),
            ("decoder_width", "decoder_hidden_dim"),
            ("decoder_heads", "decoder_num_heads"),
            ("setting", "loss_weights"),
            ("w_mae", "loss_weights"),
            ("w_cross", "loss_weights"),
            ("w_in", "loss_weights"),
        )
    ]
    # flags.txt names a renamed flag once, by its new name
    assert "--decoder_hidden_dim=24" in old_written and "--decoder_width" not in old_written
    assert "--setting" not in old_written and "--loss_weights=a" in old_written


def test_the_command_line_overrides_a_flagfile_under_either_name(tmp_path):
    flagfile = tmp_path / "base.flags"
    flagfile.write_text("--decoder_hidden_dim=40\n--decoder_heads=5\n")
    config, _, warnings = _dry_run_config(
        "pretrain.py",
        TINY_PRETRAIN + [f"--flagfile={flagfile}", "--decoder_width=24", "--decoder_num_heads=3"],
        tmp_path / "run",
    )
    assert (config["decoder"]["config"]["hidden_dim"], config["decoder"]["config"]["num_heads"]) == (24, 3)
    assert warnings == [
        "WARNING: --decoder_width is deprecated; use --decoder_hidden_dim",
        "WARNING: --decoder_heads is deprecated; use --decoder_num_heads",
    ]


def test_loss_weights_takes_a_setting_letter(tmp_path):
    from keras_lcmae.models import resolve_loss_weights

    config, _, _ = _dry_run_config("pretrain.py", TINY_PRETRAIN + ["--loss_weights=e"], tmp_path)
    assert config["loss_weights"] == resolve_loss_weights("e") != resolve_loss_weights("a")


def test_finetune_flags_named_after_their_arguments(tmp_path):
    tiny = [
        "--data=fashion_mnist",
        "--encoder=random",
        "--model=vit_test",
        "--image_size=32",
        "--patch_size=8",
        "--hidden_dim=32",
        "--depth=2",
        "--num_heads=2",
        "--train_limit=32",
        "--val_limit=16",
        "--batch_size=16",
        "--epochs=1",
        "--dry_run",
    ]
    config, _, warnings = _dry_run_config("finetune.py", tiny + ["--drop_path_rate=0.3"], tmp_path / "new")
    assert config["encoder"]["config"]["drop_path_rate"] == 0.3 and not warnings
    config, _, warnings = _dry_run_config("finetune.py", tiny + ["--drop_path=0.3"], tmp_path / "old")
    assert config["encoder"]["config"]["drop_path_rate"] == 0.3
    assert warnings == ["WARNING: --drop_path is deprecated; use --drop_path_rate"]


# --------------------------------------------------------------------------- library errors as flag errors
def _run_in_process(main, monkeypatch, capsys):
    """``common.run(main)`` in this process; (exit code, stderr)."""
    sys.path.insert(0, ROOT)
    from recipes import common

    monkeypatch.setattr(sys, "argv", ["recipe"])
    with pytest.raises(SystemExit) as exc:
        common.run(main)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argument,flag",
    [
        ("data", "--data"),
        ("val_data", "--val_data"),
        ("root", "--data"),
        ("pattern_or_files", "--data"),
        ("path", "--encoder"),
    ],
)
def test_a_library_argument_error_is_a_one_line_flag_error(argument, flag, monkeypatch, capsys):
    from keras_lcmae.errors import ArgumentError

    def main(argv):
        raise ArgumentError(argument, "no image files under '/tmp/x'.")

    code, err = _run_in_process(main, monkeypatch, capsys)
    assert code == 1
    assert err.strip().splitlines() == [f"FATAL Flags error: flag {flag}: no image files under '/tmp/x'."]


def test_a_call_site_names_the_flag_that_feeds_the_argument(monkeypatch, capsys):
    from keras_lcmae.errors import ArgumentError
    from recipes import common

    def main(argv):
        with common.arguments_from(pattern_or_files="val_data"):
            raise ArgumentError("pattern_or_files", "no TFRecord files match 'val-*'.")

    code, err = _run_in_process(main, monkeypatch, capsys)
    assert code == 1 and err.strip() == "FATAL Flags error: flag --val_data: no TFRecord files match 'val-*'."


def test_other_errors_are_not_turned_into_flag_errors(monkeypatch, capsys):
    def main(argv):
        raise ValueError("a bug")

    sys.path.insert(0, ROOT)
    from recipes import common

    monkeypatch.setattr(sys, "argv", ["recipe"])
    with pytest.raises(ValueError, match="a bug"):
        common.run(main)
