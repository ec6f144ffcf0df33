"""recipes/pretrain.py end to end on real Fashion-MNIST (TensorFlow backend)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import read_hparams

pytestmark = [pytest.mark.tf_only, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--data=fashion_mnist",
    "--image_size=32",
    "--patch_size=8",
    "--model=vit_test",
    "--method=lcmae",
    "--decoder_depth=1",
    "--decoder_hidden_dim=32",
    "--decoder_num_heads=2",
    "--projector_dim=64",
    "--batch_size=16",
    "--epochs=2",
    "--steps_per_epoch=3",
    "--blr=1e-3",
    "--warmup_epochs=1",
]


def run(*flags):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "pretrain.py"), *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def read_scalars_and_images(folder):
    import tensorflow as tf

    tags = set()
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if "tfevents" in f:
                for event in tf.compat.v1.train.summary_iterator(os.path.join(dirpath, f)):
                    for value in event.summary.value:
                        tags.add(value.tag)
    return tags


def test_train_limit_pretrains_on_the_first_images(tmp_path):
    out = tmp_path / "one"
    result = run(*TINY, "--train_limit=1", "--epochs=1", "--monitor_every=0", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["steps"] == 3 and math.isfinite(final["loss"])
    with open(out / "plan.json") as f:
        assert json.load(f)["images"] == 1  # one image, repeated with fresh augmentations for every step
    bad = run(*TINY, "--train_limit=0", f"--output_dir={tmp_path / 'bad'}")
    assert bad.returncode != 0 and "--train_limit" in bad.stderr


def test_short_run_writes_everything(tmp_path):
    out = os.path.join(tmp_path, "run")
    result = run(*TINY, f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["epochs_run"] == 2
    assert 0.3 < final["knn_top1"] <= 1 and 0.3 < final["linprobe_top1"] <= 1  # 10 classes: chance is 0.1
    assert 0.2 < final["online_probe_top1"] <= 1  # a head trained online for 6 steps of 64 images
    for key in (
        "loss",
        "loss_mae",
        "loss_cross",
        "loss_in",
        "v_std",
        "lr",
        "images_per_s",
        "knn_top1",
        "linprobe_top1",
        "online_probe_top1",
        "online_probe_train_top1",
    ):
        assert key in final, key
    for name in ("flags.txt", "model_config.json", "metrics.json", "encoder.keras", "checkpoints/epoch_002.keras"):
        assert os.path.exists(os.path.join(out, name)), name
    derived = json.load(open(os.path.join(out, "metrics.json")))["derived"]
    assert derived["lr"] == pytest.approx(1e-3 * 16 / 256) and derived["warmup_steps"] == 3
    tags = read_scalars_and_images(os.path.join(out, "tensorboard"))
    for tag in (
        "epoch_loss",
        "epoch_loss_mae",
        "epoch_loss_cross",
        "epoch_loss_in",
        "epoch_v_std",
        "epoch_lr",
        "epoch_images_per_s",
        "epoch_knn_top1",
        "epoch_linprobe_top1",
        "epoch_online_probe_top1",
        "reconstruction",
    ):
        assert tag in tags, (tag, sorted(tags))
    # the HParams dashboard: the flags in the session start, the final figures as final/ scalars of that session
    hparams, scalars, _ = read_hparams(os.path.join(out, "tensorboard"))
    assert hparams["recipe"] == "pretrain" and hparams["method"] == "lcmae" and hparams["loss_weights"] == "a"
    assert hparams["mask_ratio"] == 0.75 and hparams["decoder"] == "transformer" and hparams["model"] == "vit_test"
    assert hparams["batch_size"] == 16 and hparams["blr"] == 1e-3 and hparams["accum_steps"] == 1
    assert hparams["keep_freed_memory"] is True and hparams["output_dir"] == out
    assert (
        "w_mae" not in hparams and "setting" not in hparams and "verbosity" not in hparams
    )  # unset flags and absl's own are left out
    for key in ("loss", "loss_cross", "knn_top1", "online_probe_top1", "epochs_run", "steps"):
        assert scalars[f"final/{key}"] == pytest.approx(final[key]), key
    import keras

    import keras_lcmae  # noqa: F401 - registers the classes for loading

    encoder = keras.saving.load_model(os.path.join(out, "encoder.keras"))
    assert encoder.num_channels == 1 and encoder.image_size == (32, 32)


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--image_size=30", "--image_size/--patch_size"),
        ("--mask_ratio=1.2", "--mask_ratio"),
        ("--model=vit_gigantic", "--model"),
        ("--loss_weights=z", "--loss_weights"),
        ("--data=/no/such/folder", "--data"),
        ("--data={empty}", "--data"),
        ("--strategy=data_parallel", "--strategy=data_parallel"),  # JAX only; this run is TensorFlow
        ("--strategy=mirrored --host_devices=2 --batch_size=15", "--batch_size=15"),
        ("--strategy=multiworker", "TF_CONFIG"),
        ("--accum_steps=3", "--accum_steps=3"),  # 16 images do not split into 3 micro-batches
        ("--accum_steps=0", "flag --accum_steps=0: 0 is not a positive integer"),
        ("--strategy=mirrored --host_devices=2 --accum_steps=4 --batch_size=12", "x --accum_steps=4 = 8"),
        ("--log_every=-1", "--log_every"),
    ],
)
def test_bad_flags_fail_before_training(flag, message, tmp_path):
    (tmp_path / "empty").mkdir()
    flags = flag.replace("{empty}", str(tmp_path / "empty")).split()
    result = run(*TINY, *flags, f"--output_dir={tmp_path / 'never'}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_mirrored_recipe_on_two_host_devices(tmp_path):
    out = os.path.join(tmp_path, "run")
    result = run(*TINY, "--strategy=mirrored", "--host_devices=2", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout.split("\n")[0])["plan"]
    assert plan["replicas"] == 2 and plan["per_replica_batch"] == 8
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["steps"] == 6 and math.isfinite(final["loss"])


@pytest.mark.parametrize("config", ["demo_cpu.flags"])
def test_configs_build(config, tmp_path):
    """The demo flagfile parses and builds its model (nothing trained; the
    ViT-B/16 configs: tests/test_recipes_at_scale.py)."""
    path = os.path.join(ROOT, "recipes", "configs", config)
    head = open(path).read().splitlines()[:2]
    assert head[0].startswith("#") and f"--flagfile=recipes/configs/{config}" in "\n".join(head)
    result = run(f"--flagfile={path}", "--data=fashion_mnist", "--dry_run", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    flags = dict(
        (line.lstrip("-") + "=").split("=")[:2] for line in open(path).read().splitlines() if line.startswith("--")
    )
    if flags.get("model") == "vit_base":
        assert info["encoder_params"] == 85_798_656  # ViT-B/16 at 224 without a head (as HF ViTModel without pooler)
    batch = int(flags["batch_size"])
    assert info["lr"] == pytest.approx(float(flags["blr"]) * batch / 256)


def test_patch_size_defaults_to_the_presets(tmp_path):
    """Without --patch_size the --model preset decides (vit_test: 8; ViT-H: 14
    as official MAE's ViT-H/14; the others 16)."""
    flags = [f for f in TINY if not f.startswith("--patch_size")]
    result = run(*flags, "--dry_run", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["patch_size"] == 8
    result = run(*flags, "--patch_size=4", "--dry_run", f"--output_dir={tmp_path}")
    assert json.loads(result.stdout.strip().splitlines()[-1])["patch_size"] == 4


def _backup_step(folder, steps_per_epoch):
    meta = os.path.join(folder, "training_metadata.json")
    try:
        with open(meta) as f:
            m = json.load(f)
    except (OSError, ValueError):  # not written yet, or being written
        return None
    return m["epoch"] * steps_per_epoch + m["batch"] + 1


def test_sigkill_mid_epoch_then_rerun_resumes(tmp_path):
    """SIGKILL a run mid-epoch, rerun the same command: training resumes from
    the last step backup (at most one backup interval lost), runs exactly the
    planned number of steps and follows the same lr schedule."""
    steps, epochs, every = 8, 3, 3
    out = os.path.join(tmp_path, "run")
    flags = [
        *TINY,
        f"--epochs={epochs}",
        f"--steps_per_epoch={steps}",
        f"--backup_every={every}",
        f"--output_dir={out}",
    ]
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, os.path.join(ROOT, "recipes", "pretrain.py"), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    backup = os.path.join(out, "backup")
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            step = _backup_step(backup, steps)
            if step is not None and step > steps:  # a backup inside the second epoch
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-epoch"
    saved = _backup_step(backup, steps)
    assert saved is not None and saved % steps != 0  # the kill left a mid-epoch backup

    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(l) for l in result.stdout.splitlines() if l.startswith("{")]
    resumed = next(l["resumed"] for l in lines if "resumed" in l)
    # the newest backup, or the one before it if the kill hit a write
    assert saved - every <= resumed["step"] <= saved and resumed["step"] > steps
    assert resumed["epoch"] == resumed["step"] // steps
    final = lines[-1]
    assert final["steps"] == steps * epochs
    # lr at each resumed epoch end = the schedule at the optimizer step then, computed here
    peak, warmup, total = 1e-3 * 16 / 256, steps, steps * epochs

    def lr(t):
        if t < warmup:
            return peak * t / warmup
        return 0.5 * peak * (1 + math.cos(math.pi * min((t - warmup) / (total - warmup), 1.0)))

    history = json.load(open(os.path.join(out, "metrics.json")))["history"]
    ends = [min(resumed["step"] + steps * (k + 1), total) for k in range(epochs - resumed["epoch"])]
    assert final["epochs_run"] == len(ends) == len(history["lr"])
    assert history["lr"] == pytest.approx([lr(t) for t in ends], abs=1e-9)
    assert not os.path.exists(backup)  # a finished run removes its backup
    hparams, scalars, starts = read_hparams(os.path.join(out, "tensorboard"))
    assert starts == 2 and hparams["backup_every"] == every  # each process wrote its session start, the same
    assert scalars["final/steps"] == steps * epochs


def test_bf16_on_a_cpu_without_it_warns_and_the_allocator_is_reported(tmp_path):
    """--mixed_precision=bf16 logs the slow-CPU warning exactly when this
    machine's CPU lacks native bf16 (the TensorFlow backend computes on the
    CPU here); the run's derived figures say whether freed memory is kept,
    which --nokeep_freed_memory turns off."""
    from keras_lcmae.cpu import cpu_precision_warning

    result = run(*TINY, "--mixed_precision=bf16", "--dry_run", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = cpu_precision_warning("mixed_bfloat16")  # this process runs TensorFlow too (tf_only)
    assert (
        "--mixed_precision=bf16: dtype policy 'mixed_bfloat16' computes in bfloat16 on a CPU without native"
        in result.stderr
    ) == (expected is not None)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["freed_memory_kept"] is _glibc()
    result = run(*TINY, "--nokeep_freed_memory", "--dry_run", f"--output_dir={tmp_path}")
    assert result.returncode == 0 and "computes in bfloat16" not in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["freed_memory_kept"] is False


def _glibc():
    import platform

    return platform.libc_ver()[0] == "glibc"
