"""recipes/pretrain.py end to end on real Fashion-MNIST (TensorFlow backend)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.tf_only, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--data=fashion_mnist", "--image_size=32", "--patch_size=8", "--model=vit_test", "--method=lcmae",
    "--decoder_depth=1", "--decoder_width=32", "--decoder_heads=2", "--projector_dim=64", "--batch_size=16",
    "--epochs=2", "--steps_per_epoch=3", "--blr=1e-3", "--warmup_epochs=1",
]


def run(*flags):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "pretrain.py"), *flags],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
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


def test_short_run_writes_everything(tmp_path):
    out = os.path.join(tmp_path, "run")
    result = run(*TINY, f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["epochs_run"] == 2
    for key in ("loss", "loss_mae", "loss_cross", "loss_in", "v_std", "lr", "images_per_s"):
        assert key in final, key
    for name in ("flags.txt", "model_config.json", "metrics.json", "encoder.keras", "checkpoints/epoch_002.keras"):
        assert os.path.exists(os.path.join(out, name)), name
    derived = json.load(open(os.path.join(out, "metrics.json")))["derived"]
    assert derived["lr"] == pytest.approx(1e-3 * 16 / 256) and derived["warmup_steps"] == 3
    tags = read_scalars_and_images(os.path.join(out, "tensorboard"))
    for tag in ("epoch_loss", "epoch_loss_mae", "epoch_loss_cross", "epoch_loss_in", "epoch_v_std", "epoch_lr", "epoch_images_per_s", "reconstruction"):
        assert tag in tags, (tag, sorted(tags))
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
        ("--setting=z", "--setting"),
        ("--data=/no/such/folder", "--data"),
    ],
)
def test_bad_flags_fail_before_training(flag, message):
    result = run(*TINY, flag, "--output_dir=/tmp/never")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
