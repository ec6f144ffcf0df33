"""GaussianAverageDecoder and ConvDecoder (LC-MAE paper Sec. 4.1, Table 2)."""

import os

import keras
import numpy as np
import pytest

from keras_lcmae import LCMAE, MAE, ConvDecoder, GaussianAverageDecoder, TransformerDecoder, ViTEncoder, build_decoder
from keras_lcmae.decoders import gaussian_kernel
from tests.helpers import assert_all_gradients, assert_config_mirrors_init, to_np

GRID = 8  # 32 px images, patch 4
W = 32


def tiny_encoder():
    return ViTEncoder(image_size=32, patch_size=4, num_channels=3, hidden_dim=32, depth=1, num_heads=2)


def make(kind, **kwargs):
    return build_decoder(kind, hidden_dim=W, grid_size=GRID, input_dim=W, output_dim=48, **kwargs)


def visible_first_noise(batch, n=GRID * GRID):
    """Noise that keeps positions 0..K-1 (the top rows of the grid)."""
    return np.tile(np.arange(n, dtype="float32") / n, (batch, 1))


def latent_and_restore(rng, visible, batch=1):
    """``latent`` ``(B, 1+K, W)`` and ``ids_restore`` putting the visible
    tokens at the sorted positions ``visible``."""
    n = GRID * GRID
    visible = np.asarray(visible)
    masked = np.setdiff1d(np.arange(n), visible)
    ids_shuffle = np.concatenate([visible, masked])
    ids_restore = np.tile(np.argsort(ids_shuffle), (batch, 1)).astype("int32")
    latent = rng.normal(size=(batch, 1 + len(visible), W)).astype("float32")
    return latent, ids_restore


def numpy_gaussian(rows, cols, sigma, window):
    n = rows * cols
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            (ri, ci), (rj, cj) = divmod(i, cols), divmod(j, cols)
            if abs(ri - rj) <= window // 2 and abs(ci - cj) <= window // 2:
                out[i, j] = np.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sigma**2))
    return out


def test_gaussian_kernel_matches_numpy():
    np.testing.assert_allclose(gaussian_kernel((3, 5), 1.3, 3), numpy_gaussian(3, 5, 1.3, 3), rtol=1e-6)
    np.testing.assert_allclose(gaussian_kernel(6, 1.0, 5), numpy_gaussian(6, 6, 1.0, 5), rtol=1e-6)


def test_neighbour_weights_average_visible_neighbours_only(rng):
    decoder = make("gaussian", sigma=1.0, window=5)
    mask = (rng.random((3, GRID * GRID)) < 0.75).astype("float32")
    mask[2] = 1.0
    mask[2, 0] = 0.0  # one visible token in the corner: most rows have no neighbour
    weights = to_np(decoder.neighbour_weights(mask))
    kernel = numpy_gaussian(GRID, GRID, 1.0, 5)
    for b in range(3):
        raw = kernel * (1 - mask[b])[None, :]
        total = raw.sum(1, keepdims=True)
        expected = np.where(total > 0, raw / np.maximum(total, 1e-30), 0.0)
        np.testing.assert_allclose(weights[b], expected, atol=1e-6)
        has = total[:, 0] > 0
        np.testing.assert_allclose(weights[b][has].sum(1), 1.0, atol=1e-5)
        assert np.all(weights[b][:, mask[b] == 1] == 0)  # masked sources
        assert np.all(weights[b][kernel == 0] == 0)  # outside the 5x5 window
    assert weights[2][0, 0] == pytest.approx(1.0)
    assert weights[2][GRID * GRID - 1].sum() == 0  # far corner: no visible neighbour


def test_gaussian_decoder_forward_matches_explicit_computation(rng):
    decoder = make("gaussian", sigma=1.0, window=5)
    visible = np.arange(16)  # rows 0-1 visible: rows 4-7 have no visible token within 2 rows
    latent, ids_restore = latent_and_restore(rng, visible)
    out = decoder(latent, ids_restore)

    embed = to_np(decoder.decoder_embed(latent))[0, 1:]  # (K, W)
    tokens = np.zeros((GRID * GRID, W), "float32")
    tokens[visible] = embed
    mask = np.ones(GRID * GRID, "float32")
    mask[visible] = 0
    kernel = numpy_gaussian(GRID, GRID, 1.0, 5) * (1 - mask)[None]
    total = kernel.sum(1, keepdims=True)
    x = (kernel / np.maximum(total, 1e-30)) @ tokens
    x = np.where(total > 0, x, to_np(decoder.mask_token)[0])  # fallback: the learned mask token
    x = keras.ops.convert_to_tensor((x + to_np(decoder.decoder_pos_embed)[0, 1:]).astype("float32")[None])
    h = decoder.fc2(keras.activations.gelu(decoder.fc1(decoder.mlp_norm(x)), approximate=False))
    hidden = decoder.decoder_norm(x + h)
    np.testing.assert_allclose(to_np(out["hidden"]), to_np(hidden), atol=1e-4)
    np.testing.assert_allclose(to_np(out["pred"]), to_np(decoder.decoder_pred(hidden)), atol=1e-4)
    assert (total[:, 0] == 0).sum() == 32  # the fallback was exercised (rows 4-7)


def test_gaussian_fallback_position_ignores_the_latent(rng):
    decoder = make("gaussian")
    latent, ids_restore = latent_and_restore(rng, np.arange(16))
    a = to_np(decoder(latent, ids_restore)["pred"])
    b = to_np(decoder(latent * 3.0 + 1.0, ids_restore)["pred"])
    np.testing.assert_allclose(a[0, 40:], b[0, 40:], atol=1e-5)  # rows 5-7: mask token + positions only
    assert np.abs(a[0, :16] - b[0, :16]).max() > 1e-3


def numpy_conv_decoder(decoder, latent, ids_restore):
    """ConvDecoder's forward pass, written out in numpy with explicit loops."""
    k = latent.shape[1] - 1
    wts = {v.path.split("/", 1)[1]: to_np(v) for v in decoder.weights}
    x = latent[0] @ wts["decoder_embed/kernel"] + wts["decoder_embed/bias"]
    full = np.concatenate([x[1:], np.repeat(wts["mask_token"][0], GRID * GRID - k, 0)])
    tokens = full[ids_restore[0]] + wts["decoder_pos_embed"][0, 1:]
    grid = np.pad(tokens.reshape(GRID, GRID, W), ((2, 2), (2, 2), (0, 0)))
    kern = wts["decoder_conv/kernel"]  # (5, 5, W, W)
    conv = np.zeros((GRID, GRID, W))
    for i in range(GRID):
        for j in range(GRID):
            conv[i, j] = np.einsum("abc,abcd->d", grid[i : i + 5, j : j + 5], kern) + wts["decoder_conv/bias"]
    h = conv.reshape(GRID * GRID, W)
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mu) / np.sqrt(var + 1e-6) * wts["decoder_norm/gamma"] + wts["decoder_norm/beta"]
    return h @ wts["decoder_pred/kernel"] + wts["decoder_pred/bias"]


def test_conv_decoder_matches_explicit_convolution(rng):
    decoder = make("conv", kernel_size=5)
    latent, ids_restore = latent_and_restore(rng, rng.choice(GRID * GRID, 16, replace=False))
    pred = to_np(decoder(latent, ids_restore)["pred"])[0]
    np.testing.assert_allclose(pred, numpy_conv_decoder(decoder, latent, ids_restore), atol=1e-4)


def test_conv_decoder_is_local(rng):
    decoder = make("conv", kernel_size=5)
    visible = np.arange(0, GRID * GRID, 4)  # 16 visible, spread over the grid
    latent, ids_restore = latent_and_restore(rng, visible)
    base = to_np(decoder(latent, ids_restore)["pred"])[0]
    changed = latent.copy()
    changed[0, 1 + np.where(visible == 0)[0][0]] += 5.0  # the token at grid (0, 0)
    out = to_np(decoder(changed, ids_restore)["pred"])[0]
    assert np.abs(out[2 * GRID + 2] - base[2 * GRID + 2]).max() > 1e-3  # (2, 2): inside its 5x5 window
    np.testing.assert_allclose(out[3 * GRID + 3], base[3 * GRID + 3], atol=1e-6)  # (3, 3): outside
    np.testing.assert_allclose(out[7 * GRID + 7], base[7 * GRID + 7], atol=1e-6)


@pytest.mark.parametrize("kind", ["gaussian", "conv"])
def test_decoder_interface_and_config(kind, rng):
    decoder = make(kind)
    latent, ids_restore = latent_and_restore(rng, np.arange(16), batch=2)
    out = decoder(latent, ids_restore, return_attention=True)
    assert tuple(out["pred"].shape) == (2, 64, 48)
    assert tuple(out["hidden"].shape) == (2, 64, decoder.hidden_dim)
    assert out["attention"] == []
    clone = assert_config_mirrors_init(decoder)
    assert tuple(clone(latent, ids_restore)["pred"].shape) == (2, 64, 48)


def test_build_decoder_and_argument_errors():
    assert isinstance(build_decoder("transformer", hidden_dim=32, depth=1, num_heads=2), TransformerDecoder)
    assert isinstance(build_decoder("gaussian", hidden_dim=32), GaussianAverageDecoder)
    assert isinstance(build_decoder("conv", hidden_dim=32), ConvDecoder)
    with pytest.raises(ValueError, match="Unknown decoder kind 'mlp'.*conv"):
        build_decoder("mlp")
    with pytest.raises(ValueError, match="sigma"):
        GaussianAverageDecoder(32, sigma=0.0)
    with pytest.raises(ValueError, match="window"):
        GaussianAverageDecoder(32, window=4)
    with pytest.raises(ValueError, match="kernel_size"):
        ConvDecoder(32, kernel_size=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        ConvDecoder(30)


def build_model(kind, model):
    decoder = build_decoder(kind, hidden_dim=W)
    if model == "mae":
        return MAE(tiny_encoder(), decoder, seed=1)
    return LCMAE(tiny_encoder(), decoder, projector_dim=16, projector_input=model.split("_")[1], seed=1)


def model_noise(model, batch):
    noise = visible_first_noise(batch)
    if model != "mae":
        noise = np.stack([noise, noise[:, ::-1].copy()], 1)  # (B, 2, N): two different views
    return noise


@pytest.mark.parametrize("kind", ["gaussian", "conv"])
@pytest.mark.parametrize("model", ["mae", "lcmae_pred", "lcmae_hidden"])
def test_decoders_in_mae_and_lcmae(kind, model):
    m = build_model(kind, model)
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    out = m(images, noise=model_noise(model, 2))
    rows = 2 if model == "mae" else 4
    assert tuple(out["pred"].shape) == (rows, 64, 48)
    if model == "lcmae_hidden":
        assert tuple(out["features"].shape) == (4, 48, W)  # the decoder width, via decoder.hidden_dim
    assert np.isfinite(float(to_np(m.compute_loss(images, y_pred=out))))


@pytest.mark.parametrize("kind", ["gaussian", "conv"])
def test_decoders_gradients_fit_and_save(kind, tmp_path):
    m = build_model(kind, "lcmae_hidden")
    images = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
    noise = model_noise("lcmae", 4)
    # The fixed noise leaves rows 4-7 of view 1 without visible neighbours, so
    # the Gaussian decoder's mask token also receives a gradient.
    assert_all_gradients(m, lambda: m.compute_loss(images, y_pred=m(images, noise=noise, training=True)))
    m.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = m.fit(images, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and "loss_mae" in history.history
    clone = assert_config_mirrors_init(m)
    assert type(clone.decoder) is type(m.decoder)
    path = os.path.join(tmp_path, "model.keras")
    m.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.decoder) is type(m.decoder)
    np.testing.assert_allclose(
        to_np(loaded(images, noise=noise)["pred"]), to_np(m(images, noise=noise)["pred"]), atol=1e-5
    )
