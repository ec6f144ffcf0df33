"""The README and docs/ as a user reads them: every fenced command runs as
written (the cheap ones for real: recipes with ``--dry_run``, the analyses on
a tiny checkpoint; the costly ones have every flag checked against the
script's ``--help``), the README's Python runs at tiny size, every link and
picture exists and every picture is redrawn by a documented command, the
README stays a short guide, and no text names how the work was organised."""

import glob
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.tf_only]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
# Scripts a documented command may name without running here: the main job and
# the test suite (CI runs both), sweeps and benchmarks (minutes to hours); their
# flags are checked against --help instead.
RUN_FOR_REAL = ("recipes/pretrain.py", "recipes/finetune.py", "recipes/linprobe.py", "tools/analyze.py")
NOT_RUN = ("bash tools/install.sh", "tensorboard ")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def fenced_blocks(text):
    """``(language, body)`` of each fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)


def shell_commands(text):
    """The commands of a page's ``bash`` blocks: continuations joined,
    comments dropped, ``&&`` chains split, ``NAME=value`` lines substituted
    into the lines after them."""
    out = []
    for lang, body in fenced_blocks(text):
        if lang not in ("bash", "sh", "shell"):
            continue
        variables = {}
        for line in re.sub(r"[ \t]*\\\n\s*", " ", body).splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if not line:
                continue
            assign = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
            if assign:
                variables[assign.group(1)] = assign.group(2)
                continue
            for name, value in variables.items():
                line = line.replace("$" + name, value)
            out += [part.strip() for part in line.split("&&")]
    return out


def all_commands():
    found = []
    for page in PAGES:
        for command in shell_commands(_read(page)):
            found.append(pytest.param(command, id=f"{os.path.basename(page)}: {command[:70]}"))
    return found


def _script_and_args(command):
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # KERAS_BACKEND=torch python ...
        words.pop(0)
    assert words[0] == "python", f"a documented command the docs test does not know: {command!r}"
    return words[1], words[2:]


def _flag_names(args):
    names = []
    for a in args:
        if a.startswith("--"):
            names.append(a[2:].split("=", 1)[0])
    return names


_HELP = {}


def _help(script):
    if script not in _HELP:
        proc = subprocess.run(
            [sys.executable, script, "--helpfull" if script.startswith("recipes/") else "--help"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        # absl's --helpfull exits 1 after printing; argparse's --help exits 0
        assert proc.returncode in (0, 1) and "--" in proc.stdout, (
            f"{script} --help failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
        _HELP[script] = proc.stdout + proc.stderr
    return _HELP[script]


def _check_flags_against_help(script, args):
    text = _help(script)
    for name in _flag_names(args):
        bare = name[2:] if name.startswith("no") and f"--{name}" not in text else name
        assert re.search(rf"--(\[no\])?{re.escape(bare)}\b", text), f"{script} has no flag --{name} (its --help)"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, small_folder):
    """A whole tiny LC-MAE model and its encoder (32 px, RGB), saved as the
    recipes save them, and a small image folder with train/ and val/."""
    import keras

    from keras_lcmae import LCMAE, TransformerDecoder, ViTEncoder

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("docs")
    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=3, hidden_dim=32, depth=2, num_heads=2)
    model = LCMAE(encoder, TransformerDecoder(hidden_dim=32, depth=2, num_heads=2), projector_dim=16)
    model(np.zeros((1, 32, 32, 3), "float32"))
    paths = {"model": str(folder / "model.keras"), "encoder": str(folder / "encoder.keras"), "folder": small_folder}
    model.save(paths["model"])
    encoder.save(paths["encoder"])
    return paths


def _flagfile_value(path, name):
    value = None
    for line in _read(os.path.join(ROOT, path)).splitlines():
        if line.startswith(f"--{name}="):
            value = line.split("=", 1)[1].strip()
    return value


def _tiny_overrides(script, args, tiny, out):
    """The documented arguments with paths that do not exist here replaced by
    the tiny files or the offline data, the output sent to ``out``, and, for
    a recipe, ``--dry_run`` at 32 px."""
    fixed, data = [], None
    for a in args:
        name, _, value = a.partition("=")
        if name == "--flagfile":
            data = _flagfile_value(value, "data") or data
        if name in ("--checkpoint", "--encoder", "--architecture_of", "--reference") and value.endswith(".keras"):
            kind = "encoder" if value.endswith("encoder.keras") or name != "--checkpoint" else "model"
            a = f"{name}={tiny[kind]}"
        elif name == "--data":
            data = value
            continue
        elif name == "--output_dir":
            continue
        fixed.append(a)
    if data and data != "fashion_mnist" and not os.path.exists(os.path.join(ROOT, data)):
        data = tiny["folder"] if script != "recipes/pretrain.py" else os.path.join(tiny["folder"], "train")
    if data:
        fixed.append(f"--data={data}")
    fixed.append(f"--output_dir={out}")
    if script.startswith("recipes/"):
        fixed += ["--dry_run", "--image_size=32"]
        if script != "recipes/pretrain.py" and not any(a.startswith("--encoder=") for a in fixed):
            fixed.append(f"--encoder={tiny['encoder']}")
    else:
        fixed += ["--num_images=8"]
    return fixed


@pytest.mark.parametrize("command", all_commands())
def test_documented_command_runs(command, tiny_files, tmp_path):
    if command.startswith(NOT_RUN):
        assert os.path.exists(os.path.join(ROOT, "tools", "install.sh"))
        return
    script, args = _script_and_args(command)
    assert os.path.exists(os.path.join(ROOT, script)), f"{command!r}: no {script}"
    for a in args:
        if a.startswith("--flagfile="):
            assert os.path.exists(os.path.join(ROOT, a.split("=", 1)[1])), f"{command!r}: no flagfile {a}"
    if script not in RUN_FOR_REAL:
        _check_flags_against_help(script, args)
        return
    argv = _tiny_overrides(script, args, tiny_files, str(tmp_path / "out"))
    proc = subprocess.run(
        [sys.executable, script, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{command!r} as {argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if script == "tools/analyze.py":
        produced = os.path.join(tmp_path, "out", args[0].replace("-", "_") + ".png")
        assert os.path.getsize(produced) > 1000, f"{command!r} drew no picture"


def test_readme_is_a_short_guide():
    text = _read(README)
    assert len(text.splitlines()) <= 250
    lines = [line.strip() for lang, body in fenced_blocks(text) if lang == "bash" for line in body.splitlines()]
    assert "bash tools/install.sh && python recipes/demo.py" in lines
    assert "bash tools/install.sh && python tools/run_tests.py" in lines
    ci = _read(os.path.join(ROOT, ".ci", "run"))
    assert "bash tools/install.sh && python tools/run_tests.py" in ci, "CI must run the README's test command"


def test_links_and_pictures_exist_and_pictures_are_redrawn_by_documented_commands():
    drawn = set()
    for page in PAGES:
        for command in shell_commands(_read(page)):
            words = command.split()
            if words[:2] == ["python", "tools/analyze.py"] and "--output_dir=docs/images" in words:
                drawn.add(os.path.join(ROOT, "docs", "images", words[2].replace("-", "_") + ".png"))
    pictures = set()
    for page in PAGES:
        text = _read(page)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            assert os.path.exists(path), f"{os.path.relpath(page, ROOT)} links to missing {target}"
            if path.endswith(".png"):
                pictures.add(path)
                assert os.path.getsize(path) < 300_000, f"{target} is not a small picture"
    readme_pictures = {
        p for p in pictures if re.search(r"!\[[^\]]*\]\(" + re.escape(os.path.relpath(p, ROOT)), _read(README))
    }
    assert len(readme_pictures) >= 2, "the README shows a reconstruction grid and an analysis figure"
    assert readme_pictures <= drawn, f"pictures no documented command redraws: {sorted(readme_pictures - drawn)}"


def test_readme_python_runs_at_tiny_size(tmp_path, monkeypatch):
    """The README's Python blocks, in order in one namespace, with ViT-B
    swapped for the test size and the user's data for tiny arrays."""
    import keras

    swaps = [
        (r'from_preset\("vit_base"[^)]*\)', 'from_preset("vit_test")'),
        (r"hidden_dim=512, depth=\d+, num_heads=16", "hidden_dim=32, depth=1, num_heads=2"),
        (r"projector_dim=1024", "projector_dim=16"),
        (r"num_classes=1000", "num_classes=10"),
        (r"warmup_steps=40 \* 312, total_steps=400 \* 312", "warmup_steps=2, total_steps=10"),
        (r"epochs=10", "epochs=1"),
        (r"num_heads=12\)", "num_heads=2)"),
    ]
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    namespace = {"images": rng.normal(size=(4, 32, 32, 3)).astype("float32"), "labels": np.arange(4) % 10}
    namespace["dataset"] = namespace["images"]
    blocks = [body for lang, body in fenced_blocks(_read(README)) if lang == "python"]
    assert len(blocks) >= 3
    keras.utils.set_random_seed(0)
    for body in blocks:
        for pattern, new in swaps:
            body = re.sub(pattern, new, body)
        exec(compile(body, "README.md", "exec"), namespace)
    assert os.path.exists(tmp_path / "encoder.keras")
    np.testing.assert_allclose(  # the checkpoint route: exported and read back
        keras.ops.convert_to_numpy(namespace["encoder"](namespace["images"])),
        keras.ops.convert_to_numpy(namespace["model"].encoder(namespace["images"])),
        atol=1e-5,
    )
    assert namespace["model"].count_params() > 0


PROCESS_WORDS = re.compile(r"\b(stop|issue) ?#?[0-9]+\b|\bsession", re.I)


# the command-line programs (recipes/common.py and tools/cli.py are modules they import)
SCRIPTS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "recipes", "*.py")) + glob.glob(os.path.join(ROOT, "tools", "*.py"))
    if os.path.basename(p) not in ("common.py", "cli.py")
)
ANALYSES = (
    "attention-distance",
    "attention-similarity",
    "semantic-similarity",
    "attention-maps",
    "reconstruction",
    "clusters",
)
# a shell line continuation that a docstring swallowed: "... --method=lcmae         --loss_weights=a"
MANGLED = re.compile(r"\S {3,}--\w")


@pytest.mark.parametrize("command", SCRIPTS + [f"tools/analyze.py {name}" for name in ANALYSES])
def test_help_reads_cleanly(command):
    proc = subprocess.run(
        [sys.executable, *command.split(), "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # absl's --help exits 1, argparse's 0
    text = proc.stdout
    assert "--help" in text or "--helpfull" in text, text[:500]
    bad = [line for line in text.splitlines() if MANGLED.search(line)]
    assert not bad, f"{command} --help joins continued lines: {bad}"
    assert "Traceback" not in text + proc.stderr


def test_each_recipe_help_names_its_flagfiles():
    expected = {
        "pretrain": ["demo_cpu", "lcmae_vitb16_in1k", "mae_vitb16_dec8_in1k", "mae_vitb16_in1k"],
        "linprobe": ["linprobe_demo_cpu", "linprobe_vitb16_in1k"],
        "finetune": ["finetune_demo_cpu", "finetune_vitb16_in1k"],
    }
    named = set()
    for recipe, names in expected.items():
        text = subprocess.run(
            [sys.executable, f"recipes/{recipe}.py", "--help"],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
        doc = text.split("\nflags:\n")[0]  # the part above the flag list
        listed = re.search(r"Flagfiles in recipes/configs/.*?: (.*?)\.\n", doc, re.S)
        assert listed, f"recipes/{recipe}.py --help names no flagfiles:\n{doc}"
        found = sorted(n.strip()[: -len(".flags")] for n in " ".join(listed.group(1).split()).split(","))
        assert found == names, (recipe, found)
        named.update(found)
    on_disk = {
        os.path.basename(p)[: -len(".flags")] for p in glob.glob(os.path.join(ROOT, "recipes", "configs", "*.flags"))
    }
    assert on_disk == named, f"flagfiles no recipe's --help names: {sorted(on_disk - named)}"


def test_no_text_names_how_the_work_was_organised():
    """Code, comments and docs speak to users: no "stop N", "issue N" or
    "session" outside tests (dates and commits name measurements)."""
    proc = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    hits = []
    for name in proc.stdout.splitlines():
        if name.startswith("tests/") or not os.path.isfile(os.path.join(ROOT, name)):
            continue
        try:
            text = _read(os.path.join(ROOT, name))
        except UnicodeDecodeError:
            continue
        hits += [
            f"{name}:{i}: {line.strip()[:100]}"
            for i, line in enumerate(text.splitlines(), 1)
            if PROCESS_WORDS.search(line)
        ]
    assert not hits, "\n".join(hits)


def test_the_docs_harness_can_fail():
    """The command extraction sees continuations, variables and chains, so a
    renamed flag in any of them would reach the checks above."""
    page = (
        "```bash\nX=a.keras\npython tools/analyze.py reconstruction \\\n    --checkpoint=$X  # note\n"
        "bash tools/install.sh && python recipes/demo.py\n```\n"
    )
    assert shell_commands(page) == [
        "python tools/analyze.py reconstruction --checkpoint=a.keras",
        "bash tools/install.sh",
        "python recipes/demo.py",
    ]
    with pytest.raises(AssertionError, match="no flag --no_such_flag"):
        _check_flags_against_help("tools/mask_ratio_sweep.py", ["--no_such_flag=1"])
