"""The recipes' shared run machinery end to end (TensorFlow backend unless
said): preemption and resume of finetuning and the probe, the hostile inputs
that must end in one line and a non-zero exit, a diverged run, TFRecord
data for evaluation, step-level TensorBoard scalars, the paper configs'
dry-run plans."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import read_hparams

pytestmark = [pytest.mark.tf_only, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "recipes", "configs")
EVAL = [
    "--data=fashion_mnist",
    "--image_size=32",
    "--patch_size=8",
    "--train_limit=512",
    "--val_limit=256",
    "--warmup_epochs=1",
]
FINETUNE = [
    *EVAL,
    "--batch_size=32",
    "--blr=1e-3",
    "--randaug_magnitude=0",
    "--mixup_alpha=0",
    "--cutmix_alpha=0",
    "--reprob=0",
    "--drop_path_rate=0",
]
PROBE = [*EVAL, "--batch_size=64", "--blr=20", "--nocache_features"]
PRETRAIN = [
    "--data=fashion_mnist",
    "--image_size=32",
    "--patch_size=8",
    "--model=vit_test",
    "--method=mae",
    "--decoder_depth=1",
    "--decoder_hidden_dim=32",
    "--decoder_num_heads=2",
    "--batch_size=16",
    "--epochs=2",
    "--steps_per_epoch=3",
    "--blr=1e-3",
    "--warmup_epochs=1",
    "--monitor_every=0",
]


def command(script, *flags):
    return [sys.executable, os.path.join(ROOT, "recipes", script), *flags]


def env(**extra):
    return dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", **extra)


def run(script, *flags, **extra):
    return subprocess.run(
        command(script, *flags), capture_output=True, text=True, env=env(**extra), cwd=ROOT, timeout=600
    )


def json_lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def one_line_error(result, *expected):
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-2000:]


def _backup_step(folder, micro_per_epoch, accum):
    try:
        with open(os.path.join(folder, "training_metadata.json")) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return (m["epoch"] * micro_per_epoch + m["batch"] + 1) // accum


@pytest.mark.parametrize("script", ["finetune.py", "linprobe.py"])
def test_sigkill_then_rerun_resumes_with_accumulation(script, encoder_file, tmp_path):
    """SIGKILL mid-run, rerun the same command: it resumes from its backup,
    ends at exactly epochs x steps updates, continues the lr schedule and
    keeps best.keras the best of both processes (with --accum_steps=2, so
    updates, not micro-batches, are counted; the newest backup is then
    damaged, so the rerun falls back to the older generation)."""
    steps, epochs, every, accum = 4, 3, 2, 2
    out = str(tmp_path / "run")
    base = FINETUNE if script == "finetune.py" else PROBE
    flags = [
        *base,
        f"--encoder={encoder_file}",
        f"--epochs={epochs}",
        f"--steps_per_epoch={steps}",
        f"--backup_every={every}",
        f"--accum_steps={accum}",
        f"--output_dir={out}",
    ]
    proc = subprocess.Popen(
        command(script, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=ROOT
    )
    backup = os.path.join(out, "backup")
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            step = _backup_step(backup, steps * accum, accum)
            if step is not None and step > steps and os.path.exists(os.path.join(out, "best.keras")):
                break  # a backup in the second epoch, after the first epoch's best.keras
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = _backup_step(backup, steps * accum, accum)
    assert saved is not None and saved > steps
    with open(os.path.join(out, "best.keras.best.json")) as f:
        best_before = json.load(f)["value"]
    with open(os.path.join(backup, "training_metadata.json"), "w") as f:
        f.write("{ truncated")  # a kill in the middle of writing the newest backup

    result = run(script, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training_metadata.json" in result.stderr  # the warning names the damaged file
    lines = json_lines(result.stdout)
    resumed = next(line["resumed"] for line in lines if "resumed" in line)
    assert resumed["step"] <= saved and resumed["step"] % every == 0
    final = lines[-1]
    assert final["steps"] == steps * epochs
    history = json.load(open(os.path.join(out, "metrics.json")))["history"]
    peak, total = json.load(open(os.path.join(out, "plan.json")))["lr"], steps * epochs
    ends, t = [], resumed["step"]  # each resumed epoch replays whole; the run stops at exactly `total`
    while t < total:
        t = min(t + steps, total)
        ends.append(t)
    lr = [0.5 * peak * (1 + np.cos(np.pi * (t - steps) / (total - steps))) for t in ends]
    assert history["lr"][-len(lr) :] == pytest.approx(lr, rel=1e-6, abs=1e-9)  # float32 schedule
    with open(os.path.join(out, "best.keras.best.json")) as f:
        best = json.load(f)["value"]
    assert best == pytest.approx(max([best_before, *history["val_top1"]]))
    assert not os.path.exists(backup)


def test_diverged_run_exits_nonzero_and_writes_no_nan_encoder(tmp_path):
    out = str(tmp_path / "run")
    result = run("pretrain.py", *PRETRAIN, "--blr=1e12", "--warmup_epochs=0", f"--output_dir={out}")
    one_line_error(result, "training diverged", "step")
    assert not os.path.exists(os.path.join(out, "encoder.keras"))  # no finished checkpoint before: none


def test_diverged_finetune_exits_nonzero(encoder_file, tmp_path):
    result = run(
        "finetune.py",
        *FINETUNE,
        f"--encoder={encoder_file}",
        "--blr=1e15",
        "--warmup_epochs=0",
        "--epochs=1",
        "--steps_per_epoch=4",
        f"--output_dir={tmp_path / 'ft'}",
    )
    one_line_error(result, "training diverged")


@pytest.fixture
def corrupt_folders(tmp_path):
    """An image folder (flat, for pretraining) and a train/val class-folder
    tree whose every file is corrupt."""
    flat = tmp_path / "corrupt"
    flat.mkdir()
    for i in range(3):
        (flat / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg " * 3)
    tree = tmp_path / "corrupt_tree"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tree / split / c).mkdir(parents=True)
            (tree / split / c / "x.png").write_bytes(b"garbage")
    return str(flat), str(tree)


@pytest.fixture
def bad_tfrecord(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "bad.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        feature = {
            "img": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"])),
            "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        }
        w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return path


@pytest.mark.parametrize(
    "script,case",
    [
        # the checks live in recipes/common.py and keras_lcmae/data.py, shared by the three recipes; finetune and
        # linprobe read labelled data through the same function, so each case runs on pretraining and one of them
        ("pretrain.py", "corrupt_folder"),
        ("finetune.py", "corrupt_folder"),
        ("pretrain.py", "bad_tfrecord"),
        ("linprobe.py", "bad_tfrecord"),
        ("pretrain.py", "output_is_file"),
        ("finetune.py", "output_under_file"),
        ("linprobe.py", "output_not_writable"),
    ],
)
def test_hostile_inputs_fail_before_training_in_one_line(
    script, case, corrupt_folders, bad_tfrecord, encoder_file, tmp_path
):
    flags = (
        list(PRETRAIN)
        if script == "pretrain.py"
        else [*(FINETUNE if script == "finetune.py" else PROBE), f"--encoder={encoder_file}", "--epochs=1"]
    )
    out = str(tmp_path / "out")
    if case == "corrupt_folder":
        flags += [f"--data={corrupt_folders[0] if script == 'pretrain.py' else corrupt_folders[1]}", "--num_channels=1"]
        expected = ["--data", "can be decoded"]
    elif case == "bad_tfrecord":
        flags += [f"--data={bad_tfrecord}", "--num_channels=1"]
        if script != "pretrain.py":
            flags += [f"--val_data={bad_tfrecord}", "--num_classes=10"]
        expected = ["--data", "'img'"]
    elif case == "output_is_file":
        open(out, "w").close()
        expected = ["--output_dir", "is a file"]
    elif case == "output_under_file":
        open(out, "w").close()
        out = os.path.join(out, "run")
        expected = ["--output_dir", "is a file"]
    else:
        out = "/proc/keras_lcmae_run"  # writable by nobody, root included
        expected = ["--output_dir", "cannot write"]
    one_line_error(run(script, *flags, f"--output_dir={out}"), *expected)


def test_linprobe_refuses_an_unsafe_keras_file_in_one_line(tmp_path):
    """A .keras file holding a Lambda (code Keras' safe mode will not run)."""
    import keras

    path = str(tmp_path / "lambda.keras")
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(path)
    result = run("linprobe.py", *PROBE, f"--encoder={path}", f"--output_dir={tmp_path / 'never'}")
    one_line_error(result, f"--encoder={path}: cannot load an encoder from it")
    assert len([line for line in result.stderr.splitlines() if "cannot load an encoder" in line]) == 1


def test_finetune_reads_tfrecords_and_logs_steps(encoder_file, tmp_path):
    """TFRecord train/val globs as data, and --log_every=2 step scalars
    (loss, top1, lr) in TensorBoard at updates 2, 4, 6."""
    import tensorflow as tf

    from keras_lcmae.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test", limit=96)
    for split, (lo, hi) in (("train", (0, 64)), ("val", (64, 96))):
        with tf.io.TFRecordWriter(str(tmp_path / f"{split}-00000.tfrecord")) as w:
            for image, label in zip(images[lo:hi], labels[lo:hi]):
                png = tf.io.encode_png(image[..., None]).numpy()
                feature = {
                    "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                }
                w.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    out = str(tmp_path / "ft")
    flags = [f for f in FINETUNE if not f.startswith(("--data", "--train_limit", "--val_limit"))]
    result = run(
        "finetune.py",
        *flags,
        f"--data={tmp_path}/train-*.tfrecord",
        f"--val_data={tmp_path}/val-*",
        "--num_classes=10",
        "--num_channels=1",
        f"--encoder={encoder_file}",
        "--batch_size=16",
        "--epochs=2",
        "--log_every=2",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json_lines(result.stdout)[0]["plan"]
    assert plan["images"] == 64 and plan["steps_per_epoch"] == 4
    final = json_lines(result.stdout)[-1]
    assert final["steps"] == 8
    steps = {}
    for dirpath, _, files in os.walk(os.path.join(out, "tensorboard", "steps")):
        for f in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(dirpath, f)):
                for value in event.summary.value:
                    steps.setdefault(value.tag, []).append(event.step)
    for tag in ("step/loss", "step/top1", "step/lr"):
        assert sorted(steps[tag]) == [2, 4, 6, 8], (tag, steps)


@pytest.mark.parametrize(
    "script,config",
    [
        ("pretrain.py", "mae_vitb16_in1k.flags"),
        ("pretrain.py", "mae_vitb16_dec8_in1k.flags"),
        ("pretrain.py", "lcmae_vitb16_in1k.flags"),
        ("finetune.py", "finetune_vitb16_in1k.flags"),
        ("linprobe.py", "linprobe_vitb16_in1k.flags"),
    ],
)
def test_paper_configs_print_their_plan(script, config, small_folder, tmp_path):
    """Each ViT-B/16 config dry-runs on a CPU on a small folder and prints
    the plan: effective batch, devices, micro-batch, accumulation, memory."""
    path = os.path.join(CONFIGS, config)
    head = open(path).read().splitlines()[:3]
    assert f"--flagfile=recipes/configs/{config}" in "\n".join(head)
    data = os.path.join(small_folder, "train") if script == "pretrain.py" else small_folder
    result = run(
        script, f"--flagfile={path}", f"--data={data}", "--dry_run", "--device_memory_gb=1", f"--output_dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json_lines(result.stdout)[-1]
    assert plan["dry_run"] is True
    flags = dict(
        (line.lstrip("-") + "=").split("=")[:2] for line in open(path).read().splitlines() if line.startswith("--")
    )
    assert plan["effective_batch"] == int(flags["batch_size"]) and plan["accum_steps"] == int(flags["accum_steps"])
    assert plan["replicas"] == 1  # one CPU here: MirroredStrategy over the one device
    assert plan["per_device_micro_batch"] == int(flags["batch_size"]) // int(flags["accum_steps"])
    assert plan["lr"] == pytest.approx(float(flags["blr"]) * int(flags["batch_size"]) / 256)
    assert plan["memory_total_gb"] > plan["memory_parameters_gb"] > 0
    if script == "pretrain.py":
        assert plan["encoder_params"] == 85_798_656  # ViT-B/16 at 224 without a head (as HF ViTModel without pooler)
    # one CPU "device" carrying all 8 GPUs' micro-batches does not fit 1 GB: the warning names the flag
    assert plan["fits_device_memory"] is False and "raise --accum_steps" in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "tensorboard"))  # a dry run is no HParams session


def test_multi_worker_finetune_two_processes(encoder_file, tmp_path):
    """Two workers on 127.0.0.1 (TF_CONFIG) finetune together and end with
    identical weights; the chief writes the run folder, the other worker
    workers/worker_1."""
    import socket

    import keras

    import keras_lcmae  # noqa: F401 - registers the classes for loading

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    out = str(tmp_path / "run")
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(
            subprocess.Popen(
                command(
                    "finetune.py",
                    *FINETUNE,
                    f"--encoder={encoder_file}",
                    "--epochs=1",
                    "--steps_per_epoch=3",
                    "--strategy=multiworker",
                    f"--output_dir={out}",
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env(TF_CONFIG=tf_config),
                cwd=ROOT,
            )
        )
    finals = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        finals.append(json_lines(stdout)[-1])
    assert [f["steps"] for f in finals] == [3, 3]
    assert finals[0]["loss"] == pytest.approx(finals[1]["loss"], rel=1e-6)
    paths = [os.path.join(out, "last.keras"), os.path.join(out, "workers", "worker_1", "last.keras")]
    a, b = (keras.saving.load_model(p) for p in paths)
    start = keras.saving.load_model(encoder_file)
    assert max(float(np.abs(x - y).max()) for x, y in zip(start.get_weights(), a.encoder.get_weights())) > 1e-6
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights()))
    assert diff < 1e-6
    # one HParams session, the chief's: the other worker writes none
    assert read_hparams(os.path.join(out, "tensorboard"))[0]["strategy"] == "multiworker"
    worker_board = os.path.join(out, "workers", "worker_1", "tensorboard")
    assert not os.path.isdir(worker_board) or read_hparams(worker_board)[2] == 0
