import os

import keras
import numpy as np
import pytest

from keras_lcmae import LCMAE, SETTINGS, TransformerDecoder, ViTEncoder
from keras_lcmae.models import resolve_loss_weights
from keras_lcmae.ops import patchify
from tests.helpers import assert_config_mirrors_init, gradients, to_np
from tests.test_losses import np_cross_view, np_in_view


def tiny_lcmae(**kwargs):
    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=3, hidden_dim=32, depth=2, num_heads=2)
    kwargs.setdefault("projector_dim", 48)
    return LCMAE(encoder, TransformerDecoder(hidden_dim=32, depth=1, num_heads=2), seed=3, **kwargs)


def test_two_independent_views_in_one_pass(rng):
    model = tiny_lcmae()
    x = rng.random((3, 32, 32, 3)).astype("float32")
    out = model(x)
    assert tuple(out["pred"].shape) == (6, 16, 192)
    assert tuple(out["features"].shape) == (6, 12, 192)  # masked positions only
    assert tuple(model.project(out["features"]).shape) == (6, 12, 48)
    mask = to_np(out["mask"])
    ids_masked = to_np(out["ids_masked"])
    np.testing.assert_array_equal(np.take_along_axis(mask, ids_masked, 1), 1.0)
    assert not np.array_equal(mask[:3], mask[3:]), "the two views must be masked independently"
    np.testing.assert_array_equal(mask.sum(1), 12)
    n1, n2 = rng.random((3, 16)).astype("float32"), rng.random((3, 16)).astype("float32")
    a = model(x, noise=(n1, n2))
    b = model(x, noise=np.concatenate([n1, n2]))
    np.testing.assert_array_equal(to_np(a["mask"]), to_np(b["mask"]))
    expected = (np.argsort(np.argsort(n2, 1), 1) >= 4).astype("float32")
    np.testing.assert_array_equal(to_np(a["mask"])[3:], expected)
    # Each view is exactly an MAE forward of that view.
    from keras_lcmae import MAE

    mae = MAE(model.encoder, model.decoder, norm_pix_loss=True)
    single = mae(x, noise=n2)
    np.testing.assert_allclose(to_np(a["pred"])[3:], to_np(single["pred"]), atol=1e-5)
    with pytest.raises(ValueError, match="two views"):
        model(x, noise=n1)


@pytest.mark.parametrize("projector_dim", [48, 512], ids=["explicit_v", "through_WWt"])
def test_total_loss_is_weighted_sum_of_numpy_terms(rng, projector_dim):
    model = tiny_lcmae(loss_weights=(0.5, 2.0, 3.0), projector_dim=projector_dim)
    x = rng.random((2, 32, 32, 3)).astype("float32")
    noise = (rng.random((2, 16)).astype("float32"), rng.random((2, 16)).astype("float32"))
    out = model(x, noise=noise, training=False)
    v_all, m_all = model.project_all(x, noise=noise)
    v, m = to_np(v_all), to_np(out["mask"])
    np.testing.assert_array_equal(to_np(m_all), m)
    v_masked = np.take_along_axis(v, to_np(out["ids_masked"])[..., None], 1)
    np.testing.assert_allclose(v_masked, to_np(model.project(out["features"])), atol=1e-5)
    patches = to_np(patchify(x, 8))
    p2 = np.concatenate([patches, patches])
    mean, var = p2.mean(-1, keepdims=True), p2.var(-1, ddof=1, keepdims=True)
    target = (p2 - mean) / np.sqrt(var + 1e-6)
    l_mae = (((to_np(out["pred"]) - target) ** 2).mean(-1) * m).sum() / m.sum()
    l_cross = np_cross_view(v[:2], v[2:], m[:2], m[2:])
    l_in = np_in_view(v, p2, m)
    terms = {k: float(to_np(t)) for k, t in model.lcmae_losses(x, out).items()}
    np.testing.assert_allclose(terms["cross"], l_cross, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(terms["in"], l_in, rtol=1e-4)
    u = v_masked.reshape(-1, projector_dim)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    np.testing.assert_allclose(terms["v_std"], np.sqrt(u.var(0).mean()), rtol=1e-3)
    total = float(to_np(model.compute_loss(x=x, y_pred=out)))
    np.testing.assert_allclose(total, 0.5 * l_mae + 2.0 * l_cross + 3.0 * l_in, rtol=1e-4)


@pytest.mark.parametrize("weights", [(1, 0, 0), (0, 1, 0), (0, 0, 1)], ids=["mae", "cross", "in"])
def test_each_loss_alone_reaches_the_encoder(rng, weights):
    model = tiny_lcmae(loss_weights=weights)
    x = rng.random((2, 32, 32, 3)).astype("float32")

    def loss_fn():
        return model.compute_loss(x=x, y_pred=model(x, training=True))

    grads = dict(zip([v.path for v in model.trainable_variables], gradients(model, loss_fn)))
    encoder_grads = [g for path, g in grads.items() if path.startswith(model.encoder.name)]
    assert encoder_grads and all(np.all(np.isfinite(g)) for g in encoder_grads)
    assert sum(float(np.abs(g).sum()) for g in encoder_grads) > 0
    qkv = [g for path, g in grads.items() if "blocks_0/attn/qkv/kernel" in path and path.startswith(model.encoder.name)]
    assert np.abs(qkv[0]).max() > 0
    proj = [g for path, g in grads.items() if "projector" in path]
    assert (np.abs(proj[0]).max() > 0) == (weights != (1, 0, 0))


def test_settings_and_bad_weights():
    assert resolve_loss_weights("a") == {"mae": 1.0, "cross": 1.0, "in": 1.0}
    assert resolve_loss_weights("(c)") == {"mae": 0.0, "cross": 1.0, "in": 0.0}
    assert resolve_loss_weights({"in": 0.5}) == {"mae": 1.0, "cross": 1.0, "in": 0.5}
    assert set(SETTINGS) == set("abcdefg")
    assert SETTINGS["g"] == (0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="Unknown LC-MAE setting 'h'"):
        resolve_loss_weights("h")
    with pytest.raises(ValueError, match="not all zero"):
        resolve_loss_weights((0, 0, 0))
    with pytest.raises(ValueError, match="unknown"):
        resolve_loss_weights({"mse": 1})
    with pytest.raises(ValueError, match="projector_input"):
        tiny_lcmae(projector_input="latent")


def test_fit_reports_every_term_and_round_trips(tmp_path, fmnist):
    images, _ = fmnist
    model = tiny_lcmae(projector_input="hidden", in_view_target="norm_pixels", loss_weights="e")
    clone = assert_config_mirrors_init(model)
    assert clone.loss_weights == {"mae": 1.0, "cross": 1.0, "in": 0.0}
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    history = model.fit(images[:32], batch_size=8, epochs=2, verbose=0)
    for key in ("loss", "loss_mae", "loss_cross", "loss_in", "v_std"):
        assert key in history.history and np.all(np.isfinite(history.history[key])), key
    # the reported total is the weighted sum of the reported terms
    h = history.history
    np.testing.assert_allclose(h["loss"][-1], h["loss_mae"][-1] + h["loss_cross"][-1], rtol=1e-4)
    path = os.path.join(tmp_path, "lcmae.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    noise = np.random.default_rng(0).random((4, 16)).astype("float32")
    a, b = loaded(images[:2], noise=noise), model(images[:2], noise=noise)
    np.testing.assert_array_equal(to_np(loaded.project(a["features"])), to_np(model.project(b["features"])))
    enc_path = os.path.join(tmp_path, "encoder.keras")
    model.encoder.save(enc_path)
    np.testing.assert_allclose(
        to_np(keras.saving.load_model(enc_path)(images[:2])), to_np(model.encoder(images[:2])), atol=1e-6
    )


@pytest.mark.slow
@pytest.mark.torch_pass  # the losses' numerics are checked per backend above; the dynamics once
def test_cross_view_alone_collapses_on_real_images():
    """Table 1 (c): cross-view loss alone collapses; (a), (b), (e) do not.
    Tiny scale: 80 steps of batch 16 on real Fashion-MNIST, same seed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "collapse_study", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "collapse_study.py")
    )
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    from keras_lcmae.data import fashion_mnist_for_vit

    images, _ = fashion_mnist_for_vit("train", image_size=32, channels=1, limit=1000)
    images = (images - 0.286) / 0.353
    results = {s: study.run_setting(s, images, steps=80, batch_size=16, lr=1e-3, seed=0) for s in "abce"}
    start = results["c"]["v_std_start"]
    assert results["c"]["v_std_end"] < 0.3 * start, results["c"]
    assert results["c"]["v_std_end"] < 0.03, results["c"]
    for s in "abe":
        assert results[s]["v_std_end"] > 0.06, results[s]


def test_per_sample_two_view_noise(rng):
    model = tiny_lcmae()
    x = rng.random((3, 32, 32, 3)).astype("float32")
    n1, n2 = rng.random((3, 16)).astype("float32"), rng.random((3, 16)).astype("float32")
    a = model(x, noise=(n1, n2))
    b = model({"images": x, "noise": np.stack([n1, n2], axis=1)})
    np.testing.assert_array_equal(to_np(a["mask"]), to_np(b["mask"]))
    with pytest.raises(ValueError, match=r"\(B, 2, N\)"):
        model(x, noise=np.zeros((3, 3, 16), "float32"))
