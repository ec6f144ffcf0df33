"""recipes/linprobe.py and recipes/finetune.py end to end on real
Fashion-MNIST (TensorFlow backend), and their bad-input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import read_hparams

pytestmark = [pytest.mark.tf_only, pytest.mark.slow]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEOMETRY = ["--image_size=32", "--patch_size=8"]
QUICK = ["--data=fashion_mnist", *GEOMETRY, "--train_limit=2000", "--batch_size=128", "--warmup_epochs=0"]


def run(script, *flags):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", script), *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def final_line(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cache", [True, False])
def test_linprobe_trains_the_head_only(encoder_file, tmp_path, cache):
    out = str(tmp_path / "lp")
    # LARS moves each weight matrix by ~lr * 0.001 of its norm per step: a large lr for a short run
    flags = [*QUICK, f"--encoder={encoder_file}", "--blr=50", f"--output_dir={out}"]
    final = final_line(
        run(
            "linprobe.py",
            *flags,
            *(
                ["--cache_features", "--epochs=10"]
                if cache
                else ["--nocache_features", "--epochs=2", "--steps_per_epoch=3"]
            ),
        )
    )
    # the recipe itself fails if the encoder moved; on cached features the probe learns (chance: 0.1)
    assert 0 < final["top5"] <= 1 and final["best_top1"] >= final["top1"]
    if cache:  # the cached features also give the kNN score (chance: 0.1)
        assert final["top1"] > 0.4 and final["knn_k"] == 20 and 0.3 < final["knn_top1"] <= 1
    else:
        assert "knn_top1" not in final
    assert os.path.exists(os.path.join(out, "metrics.json")) and os.path.exists(os.path.join(out, "best.keras"))
    hparams, scalars, _ = read_hparams(os.path.join(out, "tensorboard"))
    assert hparams["recipe"] == "linprobe" and hparams["cache_features"] is cache and hparams["blr"] == 50
    assert scalars["final/top1"] == pytest.approx(final["top1"]) and scalars["final/steps"] == final["steps"]


def test_finetune_updates_the_encoder_and_keeps_the_best(encoder_file, tmp_path):
    import keras

    import keras_lcmae  # noqa: F401 - registers the classes for loading

    out = str(tmp_path / "ft")
    final = final_line(
        run(
            "finetune.py",
            *QUICK,
            f"--encoder={encoder_file}",
            "--epochs=2",
            "--steps_per_epoch=4",
            "--blr=1e-3",
            "--randaug_magnitude=0",
            f"--output_dir={out}",
        )
    )
    assert 0 <= final["top1"] <= 1 and final["best_top1"] >= final["top1"]
    # the HParams dashboard: the flags in the session start, the final figures as final/ scalars of that session
    hparams, scalars, _ = read_hparams(os.path.join(out, "tensorboard"))
    assert hparams["recipe"] == "finetune" and hparams["encoder"] == encoder_file and hparams["epochs"] == 2
    assert hparams["layer_decay"] == 0.65 and hparams["randaug_magnitude"] == 0 and hparams["pool"] == "avg"
    assert hparams["data"] == "fashion_mnist" and hparams["train_limit"] == 2000
    for key in ("top1", "top5", "best_top1", "loss", "steps"):
        assert scalars[f"final/{key}"] == pytest.approx(final[key]), key
    best = keras.saving.load_model(final["best_checkpoint"])
    start = keras.saving.load_model(encoder_file)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(start.get_weights(), best.encoder.get_weights()))
    assert moved > 1e-5


def test_random_baseline_copies_the_architecture(encoder_file, tmp_path):
    final = final_line(
        run(
            "linprobe.py",
            *QUICK,
            "--encoder=random",
            f"--architecture_of={encoder_file}",
            "--epochs=1",
            "--cache_features",
            f"--output_dir={tmp_path}",
        )
    )
    assert final["encoder"] == "random"


@pytest.fixture
def unlabelled_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        os.makedirs(tmp_path / "flat" / split)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / "flat" / split / f"{i}.png")
    return str(tmp_path / "flat")


@pytest.mark.parametrize("script", ["linprobe.py", "finetune.py"])
@pytest.mark.parametrize("case", ["other_architecture", "other_geometry", "num_classes", "no_labels", "missing"])
def test_bad_input_is_a_clear_error(script, case, encoder_file, unlabelled_folder, tmp_path):
    import keras

    flags = list(QUICK)
    if case == "other_architecture":  # a .keras file that is not a ViT encoder
        other = str(tmp_path / "dense.keras")
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(other)
        flags += [f"--encoder={other}"]
        expected = "not a ViTEncoder"
    elif case == "other_geometry":  # encoder with 8-px patches, asked for 36-px images
        flags += [f"--encoder={encoder_file}", "--image_size=36"]
        expected = "image_size"
    elif case == "num_classes":
        flags += [f"--encoder={encoder_file}", "--num_classes=5"]
        expected = "--num_classes=5"
    elif case == "no_labels":
        flags += [f"--encoder={encoder_file}", f"--data={unlabelled_folder}", "--num_channels=3"]
        expected = "labels are missing"
    else:
        flags += ["--encoder=/no/such/encoder.keras"]
        expected = "--encoder"
    result = run(script, *flags, "--epochs=1", f"--output_dir={tmp_path / 'never'}")
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def _probe(encoder, splits):
    from keras_lcmae.evaluation import extract_features, linear_probe_accuracy

    (bx, by), (qx, qy) = splits
    f, _ = extract_features(encoder, bx, pool="cls")
    g, _ = extract_features(encoder, qx, pool="cls")
    return linear_probe_accuracy(f, by, g, qy, 10)


def test_pretraining_beats_the_random_encoder_across_seeds():
    """Real Fashion-MNIST, tiny scale: 100 LC-MAE steps (ViT 64x2, patch 4,
    batch 64) lift the linear probe of the [CLS] feature above the same
    encoder at its random initialisation, on average over five seeds, and no
    seed falls clearly below it.

    One seed's gain is noisy: 100 steps move the probe by +1.5 points on
    average with a spread of about one point between seeds, and last-bit
    changes (the thread count, an op's float32 rounding) are amplified by
    the training into another draw of that spread. Seeds 0-4 read +1.65,
    +2.0, +1.25, +1.25, +3.35 points (mean +1.9) with one intra-op thread,
    as ``tools/run_tests.py`` runs it on two cores, and +1.3, +1.5, +0.1,
    +1.45, +1.75 with two. A bar on each seed (this test's earlier form,
    > +0.5 for each of seeds 0-2) failed on the second draw; the mean of
    five spreads sqrt(5) times less. With the encoder frozen every gain is
    0.0 and the test fails, as it does for a pretraining that harms the
    encoder."""
    import keras

    from keras_lcmae import LCMAE, TransformerDecoder, ViTEncoder, data, optim

    mean, std = data.FASHION_MNIST_MEAN, data.FASHION_MNIST_STD
    splits = []
    for split, n in (("train", 3000), ("test", 2000)):
        images, labels = data.load_fashion_mnist(split, limit=n)
        ds = data.labelled_dataset(
            data.array_dataset(images[..., None], labels), 1000, 32, mean, std, train=False, crop_pct=1.0
        )
        batches = [(x.numpy(), y.numpy()) for x, y in ds]
        splits.append((np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])))
    images, labels = data.load_fashion_mnist("train")
    gains = []
    for seed in range(5):
        keras.utils.clear_session()
        keras.utils.set_random_seed(seed)
        encoder = ViTEncoder(image_size=32, patch_size=4, num_channels=1, hidden_dim=64, depth=2, num_heads=4)
        before = _probe(encoder, splits)
        model = LCMAE(encoder, TransformerDecoder(64, 1, 4), projector_dim=64, loss_weights="a", seed=seed)
        ds = data.batched_pretrain_dataset(data.array_dataset(images, labels), 64, 32, mean, std, seed=seed)
        schedule = optim.WarmupCosine(optim.scaled_lr(3e-3, 64), 100, 100)
        model.compile(optimizer=optim.adamw(model, schedule, 0.05))
        model.fit(ds, epochs=1, steps_per_epoch=100, verbose=0)
        gains.append(_probe(encoder, splits) - before)
    assert np.mean(gains) > 0.005 and min(gains) > -0.01, gains
