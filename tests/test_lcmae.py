import os

import keras
import numpy as np
import pytest

from keras_lcmae import LCMAE, SETTINGS, TransformerDecoder, ViTEncoder
from keras_lcmae.losses import collapse_std, contrastive_terms, cross_view_loss, in_view_loss
from keras_lcmae.masking import random_masking
from keras_lcmae.models import resolve_loss_weights
from keras_lcmae.ops import patchify
from tests.helpers import assert_config_mirrors_init, gradients, to_np


def np_cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def np_cross_view(v1, v2, m1, m2):
    """Eq. 5 with batch normalisation, by explicit loops."""
    total, count = 0.0, 0
    for b in range(v1.shape[0]):
        for i in range(v1.shape[1]):
            if m1[b, i] and m2[b, i]:
                total += 1 - np_cos(v1[b, i], v2[b, i])
                count += 1
    return total / max(count, 1)


def np_in_view(v, x, m):
    """Eq. 6 with batch normalisation, by explicit loops over ordered pairs."""
    total, count = 0.0, 0
    for b in range(v.shape[0]):
        for i in range(v.shape[1]):
            for j in range(v.shape[1]):
                if i != j and m[b, i] and m[b, j]:
                    total += abs(np_cos(v[b, i], v[b, j]) - np_cos(x[b, i], x[b, j]))
                    count += 1
    return total / max(count, 1)


def realistic_masks(rng, b, n, ratio=0.75):
    dummy = np.zeros((b, n, 1), "float32")
    return to_np(random_masking(dummy, ratio, noise=rng.random((b, n)).astype("float32"))["mask"])


def tiny_lcmae(**kwargs):
    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=3, hidden_dim=32, depth=2, num_heads=2)
    kwargs.setdefault("projector_dim", 48)
    return LCMAE(encoder, TransformerDecoder(hidden_dim=32, depth=1, num_heads=2), seed=3, **kwargs)


def test_cross_view_matches_numpy(rng):
    v1 = rng.normal(size=(3, 16, 24)).astype("float32")
    v2 = rng.normal(size=(3, 16, 24)).astype("float32")
    m1, m2 = realistic_masks(rng, 3, 16), realistic_masks(rng, 3, 16)
    assert 0 < (m1 * m2).sum() < m1.sum()
    np.testing.assert_allclose(float(to_np(cross_view_loss(v1, v2, m1, m2))), np_cross_view(v1, v2, m1, m2), rtol=1e-5)


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (49, 0.75), (36, 0.5)])
def test_in_view_matches_numpy(rng, n, ratio):
    v = rng.normal(size=(2, n, 24)).astype("float32")
    x = rng.random((2, n, 12)).astype("float32")
    x[0, 3] = 0.0  # an all-black patch: cosine 0, never NaN
    m = realistic_masks(rng, 2, n, ratio)
    ours = float(to_np(in_view_loss(v, x, m)))
    assert np.isfinite(ours)
    np.testing.assert_allclose(ours, np_in_view(v, x, m), rtol=1e-5)


def test_identical_views_give_zero_cross_loss(rng):
    v = rng.normal(size=(2, 16, 8)).astype("float32")
    m = realistic_masks(rng, 2, 16)
    assert abs(float(to_np(cross_view_loss(v, v, m, m)))) < 1e-6


def test_constant_projector_collapses_cross_but_not_in_view(rng):
    x = rng.random((2, 16, 48)).astype("float32") - 0.5
    m1, m2 = realistic_masks(rng, 2, 16), realistic_masks(rng, 2, 16)
    const = np.broadcast_to(rng.normal(size=(1, 1, 8)), (2, 16, 8)).astype("float32")
    spread = rng.normal(size=(2, 16, 8)).astype("float32")
    assert abs(float(to_np(cross_view_loss(const, const, m1, m2)))) < 1e-6
    collapsed_in = float(to_np(in_view_loss(const, x, m1)))
    # cos(v_i, v_j) = 1 for all pairs: L_in = mean |1 - cos(x_i, x_j)|, large.
    assert collapsed_in > 0.8
    assert collapsed_in > 1.5 * float(to_np(in_view_loss(spread, x, m1)))
    assert float(to_np(collapse_std(const))) < 1e-3
    assert float(to_np(collapse_std(spread))) > 0.2
    # v following the input similarity structure exactly gives L_in = 0.
    assert float(to_np(in_view_loss(x, x, m1))) < 1e-6


def test_collapse_std_matches_numpy(rng):
    v = rng.normal(size=(2, 10, 6)).astype("float32") + 0.5
    m = (rng.random((2, 10)) < 0.6).astype("float32")
    u = v.reshape(-1, 6) / np.linalg.norm(v.reshape(-1, 6), axis=1, keepdims=True)
    np.testing.assert_allclose(float(to_np(collapse_std(v))), np.sqrt(u.var(0).mean()), rtol=1e-4)
    sel = u[m.reshape(-1) == 1]
    np.testing.assert_allclose(float(to_np(collapse_std(v, m))), np.sqrt(sel.var(0).mean()), rtol=1e-4)


def test_no_co_masked_position_is_finite():
    v = np.ones((1, 4, 3), "float32")
    m1 = np.array([[1, 1, 0, 0]], "float32")
    m2 = np.array([[0, 0, 1, 1]], "float32")
    assert float(to_np(cross_view_loss(v, v + 1, m1, m2))) == 0.0
    one = np.array([[1, 0, 0, 0]], "float32")
    assert float(to_np(in_view_loss(v, v, one))) == 0.0


class _Holder(keras.layers.Layer):
    """Variables to differentiate the pure loss functions against."""

    def __init__(self, arrays):
        super().__init__()
        self.vs = [self.add_weight(shape=a.shape, initializer=keras.initializers.Constant(a)) for a in arrays]


def test_zero_projector_output_has_finite_gradients(rng):
    # An all-zero v (zero features with the projector's zero initial bias) has
    # cosine 0 with anything, as torch.nn.functional.normalize gives; its
    # gradient must be finite too: max(sqrt(|v|^2), eps) gave 0 * inf = NaN.
    b, n, k, d = 2, 6, 2, 5
    v = rng.normal(size=(2 * b, n, d)).astype("float32")
    v[0, 1] = 0.0
    v[b, 1] = 0.0  # the same position in view 2, so the zero sits in L_cross too
    x = rng.normal(size=(2 * b, n, 7)).astype("float32")
    shuffle = np.stack([np.r_[0, 2, 1, 3, 4, 5]] * 2 + [rng.permutation(n)] * (2 * b - 2)).astype("int32")
    shuffle[b] = np.r_[2, 1, 0, 3, 4, 5]  # position 1 masked in both views of image 0
    restore = np.argsort(shuffle, axis=1).astype("int32")
    ids_masked = shuffle[:, k:]
    mask = (restore >= k).astype("float32")
    feats = np.take_along_axis(v, ids_masked[..., None], axis=1)
    xm = np.take_along_axis(x, ids_masked[..., None], axis=1)
    kernel = rng.normal(size=(d, 8)).astype("float32")
    holder = _Holder([v, feats, kernel])

    def explicit():
        vv = holder.vs[0]
        return cross_view_loss(vv[:b], vv[b:], mask[:b], mask[b:]) + in_view_loss(vv, x, mask)

    def narrow():  # features narrower than the projector: the inner-product path
        t = contrastive_terms(holder.vs[1], xm, ids_masked, restore, k, holder.vs[2], np.zeros(8, "float32"))
        return t["cross"] + t["in"]

    def given_v():
        t = contrastive_terms(holder.vs[1], xm, ids_masked, restore, k)
        return t["cross"] + t["in"]

    for fn in (explicit, narrow, given_v):
        assert np.isfinite(float(to_np(fn()))), fn.__name__
        grads = [g for g in gradients(holder, fn) if g is not None]
        assert grads and all(np.isfinite(g).all() for g in grads), fn.__name__
    # value: the zero vector has cosine 0 (torch.nn.functional.normalize semantics)
    u = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    both = mask[:b] * mask[b:]
    ref_cross = (both * (1 - (u[:b] * u[b:]).sum(-1))).sum() / both.sum()
    np.testing.assert_allclose(float(to_np(cross_view_loss(v[:b], v[b:], mask[:b], mask[b:]))), ref_cross, rtol=1e-5)


def test_shape_errors_are_named(rng):
    v = rng.normal(size=(2, 16, 8)).astype("float32")
    m = np.ones((2, 16), "float32")
    with pytest.raises(ValueError, match="Shape mismatch"):
        cross_view_loss(v, v[:, :8], m, m)
    with pytest.raises(ValueError, match="`mask` must have rank 2"):
        in_view_loss(v, v, m[None])


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
    np.testing.assert_allclose(to_np(keras.saving.load_model(enc_path)(images[:2])), to_np(model.encoder(images[:2])), atol=1e-6)


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
