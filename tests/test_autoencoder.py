"""AutoEncoder(k), the no-masking baseline of the LC-MAE paper (Sec. 4.2, Table 3, Fig. 7)."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lcmae import AutoEncoder, ViTEncoder, build_decoder
from keras_lcmae.callbacks import ReconstructionImages
from keras_lcmae.losses import reconstruction_loss
from keras_lcmae.ops import patchify
from tests.helpers import assert_all_gradients, assert_config_mirrors_init, to_np

P = 4  # 32 px images -> 8 x 8 grid
GRID = 8


def tiny_ae(block_size=None, kind="transformer", **kwargs):
    encoder = ViTEncoder(image_size=32, patch_size=P, num_channels=3, hidden_dim=32, depth=1, num_heads=2)
    extra = dict(depth=1, num_heads=2) if kind == "transformer" else {}
    return AutoEncoder(encoder, build_decoder(kind, hidden_dim=32, **extra), block_size=block_size, **kwargs)


def numpy_block(image, token, k):
    """The k x k block centred on ``token``'s patch, zero outside the image,
    and its validity mask, flattened (row, col, channel)."""
    r = (k - P) // 2
    padded = np.pad(image, ((r, r), (r, r), (0, 0)))
    valid = np.pad(np.ones_like(image), ((r, r), (r, r), (0, 0)))
    i, j = divmod(token, GRID)
    crop = (slice(i * P, i * P + k), slice(j * P, j * P + k))
    return padded[crop].reshape(-1), valid[crop].reshape(-1)


@pytest.mark.parametrize("k", [P, 3 * P, P + 2])  # k = p, k = 3p, and r = 1 (not a multiple of p)
def test_block_targets_equal_numpy_crops(k, rng):
    ae = tiny_ae(k)
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    targets, valid = ae.block_targets(images)
    targets, valid = to_np(targets), to_np(valid)
    assert targets.shape == (2, GRID * GRID, k * k * 3) and valid.shape == (GRID * GRID, k * k * 3)
    for token in (0, GRID - 1, 3 * GRID + 4, GRID * GRID - 1):  # corners, a border and a centre token
        for b in range(2):
            block, ok = numpy_block(images[b], token, k)
            np.testing.assert_array_equal(targets[b, token], block)
            np.testing.assert_array_equal(valid[token], ok)
    if k == P:
        np.testing.assert_array_equal(targets, to_np(patchify(images, P)))
        assert valid.min() == 1
    else:
        assert valid[0].sum() < valid.shape[1] and valid[3 * GRID + 4].min() == 1


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_ae_p_loss_is_mae_loss_on_all_tokens(norm_pix_loss, rng):
    ae = tiny_ae(P, norm_pix_loss=norm_pix_loss)
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    pred = rng.normal(size=(2, GRID * GRID, P * P * 3)).astype("float32")
    expected = reconstruction_loss(pred, patchify(images, P), np.ones((2, GRID * GRID)), norm_pix_loss)
    np.testing.assert_allclose(float(to_np(ae.forward_loss(images, pred))), float(to_np(expected)), rtol=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_ae_loss_matches_numpy_and_ignores_padding(norm_pix_loss, rng):
    k = 3 * P
    ae = tiny_ae(k, norm_pix_loss=norm_pix_loss)
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    targets = np.zeros((2, GRID * GRID, k * k * 3))
    valid = np.zeros((GRID * GRID, k * k * 3))
    for b in range(2):
        for t in range(GRID * GRID):
            targets[b, t], valid[t] = numpy_block(images[b], t, k)
    if norm_pix_loss:
        for b in range(2):
            for t in range(GRID * GRID):
                v = valid[t] == 1
                x = targets[b, t, v]
                targets[b, t, v] = (x - x.mean()) / np.sqrt(x.var(ddof=1) + 1e-6)
    pred = rng.normal(size=targets.shape).astype("float32")
    sq = (pred - targets) ** 2 * valid[None]
    expected = sq.sum() / (2 * valid.sum())
    np.testing.assert_allclose(float(to_np(ae.forward_loss(images, pred))), expected, rtol=1e-4)
    perfect = np.where(valid[None] == 1, targets, 123.0).astype("float32")  # garbage in the padding
    assert float(to_np(ae.forward_loss(images, perfect))) == pytest.approx(0.0, abs=1e-6)


def test_block_size_validation():
    with pytest.raises(ValueError, match="block_size.*>= patch_size=4"):
        tiny_ae(2)
    with pytest.raises(ValueError, match="even"):
        tiny_ae(7)
    with pytest.raises(ValueError, match="block_size"):
        tiny_ae(8.5)
    assert tiny_ae(None).block_size == P


@pytest.mark.parametrize("kind", ["transformer", "conv", "gaussian"])
def test_ae_outputs_gradients_fit_and_save(kind, tmp_path, rng):
    k = 3 * P
    ae = tiny_ae(k, kind)
    images = rng.random((4, 32, 32, 3)).astype("float32")
    out = ae(images)
    assert tuple(out["pred"].shape) == (4, GRID * GRID, k * k * 3)
    assert tuple(out["latent"].shape) == (4, 1 + GRID * GRID, 32)  # the encoder saw every patch
    np.testing.assert_array_equal(to_np(out["mask"]), 1.0)
    np.testing.assert_array_equal(to_np(out["ids_restore"]), np.tile(np.arange(GRID * GRID), (4, 1)))
    # No position is masked, so no decoder ever inserts its mask token.
    assert_all_gradients(
        ae, lambda: ae.compute_loss(images, y_pred=ae(images, training=True)), allow_zero=("mask_token",)
    )
    ae.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = ae.fit(images, batch_size=4, epochs=1, verbose=0)
    assert sorted(history.history) == ["loss", "loss_mae"] and np.isfinite(history.history["loss"][0])
    clone = assert_config_mirrors_init(ae)
    assert clone.block_size == k and "mask_ratio" not in ae.get_config()
    path = os.path.join(tmp_path, "ae.keras")
    ae.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, AutoEncoder) and loaded.block_size == k
    np.testing.assert_allclose(to_np(loaded(images)["pred"]), to_np(ae(images)["pred"]), atol=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_reconstruct_takes_the_centre_of_each_block(norm_pix_loss, rng):
    k = P + 4
    ae = tiny_ae(k, "conv", norm_pix_loss=norm_pix_loss)
    images = rng.random((2, 32, 32, 3)).astype("float32")
    recon, mask = ae.reconstruct(images)
    recon, mask = to_np(recon), to_np(mask)
    pred = to_np(ae(images)["pred"]).reshape(2, GRID * GRID, k, k, 3)
    for b, t in ((0, 0), (1, 3 * GRID + 5)):
        block = pred[b, t]
        if norm_pix_loss:
            target, ok = numpy_block(images[b], t, k)
            x = target[ok == 1]
            block = block * np.sqrt(x.var(ddof=1) + 1e-6) + x.mean()
        i, j = divmod(t, GRID)
        np.testing.assert_allclose(
            recon[b, i * P : (i + 1) * P, j * P : (j + 1) * P], block[2 : 2 + P, 2 : 2 + P], atol=1e-4
        )
    assert np.all(mask == 1)
    callback = ReconstructionImages("unused", images, mean=(0.5,) * 3, std=(0.5,) * 3)
    callback.set_model(ae)
    assert callback.grid().shape == (1, 2 * 32, 3 * 32, 3)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--data=fashion_mnist",
    "--image_size=32",
    "--patch_size=8",
    "--model=vit_test",
    "--decoder_hidden_dim=32",
    "--decoder_depth=1",
    "--decoder_num_heads=2",
    "--projector_dim=64",
    "--batch_size=16",
    "--epochs=1",
    "--steps_per_epoch=2",
    "--dry_run",
]


def run_recipe(*flags):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "recipes", "pretrain.py"), *TINY, *flags],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.tf_only
@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,config_check",
    [
        (
            ["--method=ae", "--block_size=24", "--decoder=gaussian", "--decoder_sigma=1.5"],
            lambda c: c["block_size"] == 24 and c["decoder"]["config"]["sigma"] == 1.5,
        ),
        (
            ["--method=lcmae", "--decoder=conv", "--decoder_kernel_size=3"],
            lambda c: c["decoder"]["config"]["kernel_size"] == 3 and c["decoder"]["class_name"] == "ConvDecoder",
        ),
    ],
    ids=["ae_gaussian", "lcmae_conv"],
)
def test_recipe_dry_run_with_decoders_and_ae(flags, config_check, tmp_path):
    import json

    result = run_recipe(*flags, f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.load(open(os.path.join(tmp_path, "model_config.json")))["config"]
    assert config_check(config), config


@pytest.mark.tf_only
@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--method=ae", "--block_size=11"], "--block_size=11"),
        (["--method=mae", "--block_size=24"], "--block_size applies to --method=ae"),
        (["--decoder=conv", "--decoder_kernel_size=4"], "--decoder_kernel_size"),
        (["--decoder=gaussian", "--decoder_sigma=0"], "--decoder_sigma"),
    ],
)
def test_recipe_bad_decoder_and_ae_flags(flags, message, tmp_path):
    result = run_recipe(*flags, f"--output_dir={tmp_path / 'never'}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
