"""LARS and layer-wise lr decay against numpy re-derivations of the official
MAE optimisers (``util/lars.py``; ``util/lr_decay.py`` param groups applied by
``torch.optim.AdamW``)."""

import keras
import numpy as np
import pytest

from keras_lcmae import ViTClassifier, ViTEncoder
from keras_lcmae.optim import (
    LARS,
    LayerDecayAdamW,
    WarmupCosine,
    finetune_adamw,
    layer_decay_multipliers,
)
from tests.helpers import to_np


def tiny_encoder(**kwargs):
    kwargs = dict(dict(image_size=32, patch_size=8, hidden_dim=32, depth=2, num_heads=2), **kwargs)
    return ViTEncoder(**kwargs)


def hand_layer_id(path, depth):
    """Layer id read off a path by hand: the BEiT/MAE rule."""
    parts = path.split("/")
    if parts[1] in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if parts[1].startswith("blocks_"):
        return int(parts[1].split("_")[1]) + 1
    return depth + 1


# ---------------------------------------------------------------------------
# layer-wise lr decay
# ---------------------------------------------------------------------------


def test_layer_decay_multipliers_by_hand():
    model = ViTClassifier(tiny_encoder(), num_classes=3, pool="avg")
    got = layer_decay_multipliers(model, 0.5)
    # depth 2: patch embed / cls / pos -> 0.5**3, block 0 -> 0.5**2, block 1 -> 0.5, the rest -> 1.
    expected_by_id = {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}
    assert set(got) == {v.path for v in model.weights}
    for v in model.weights:
        assert got[v.path] == expected_by_id[hand_layer_id(v.path, 2)], v.path
    assert got["vit_encoder/patch_embed/proj/kernel"] == 0.125
    assert got["vit_encoder/cls_token"] == 0.125
    assert got["vit_encoder/blocks_0/attn/qkv/kernel"] == 0.25
    assert got["vit_encoder/blocks_1/fc2/bias"] == 0.5
    assert got["vit_encoder/norm/gamma"] == 1.0
    assert got["vit_classifier/fc_norm/beta"] == 1.0
    assert got["vit_classifier/head/kernel"] == 1.0
    assert sorted(set(got.values())) == [0.125, 0.25, 0.5, 1.0]


def test_layer_decay_multipliers_do_not_depend_on_names():
    """Block membership comes from the layer objects, so renamed models work."""
    encoder = tiny_encoder(name="backbone")
    got = layer_decay_multipliers(encoder, 0.75)
    assert got["backbone/blocks_0/fc1/kernel"] == pytest.approx(0.75**2)
    assert got["backbone/patch_embed/proj/bias"] == pytest.approx(0.75**3)
    assert got["backbone/norm/beta"] == 1.0


def test_layer_decay_bad_input():
    with pytest.raises(ValueError, match="ViTEncoder"):
        layer_decay_multipliers(keras.Sequential([keras.layers.Dense(2)]), 0.5)
    for bad in (0.0, -0.5, 1.5, "0.7", True):
        with pytest.raises(ValueError, match="layer_decay"):
            layer_decay_multipliers(tiny_encoder(), bad)
    model = ViTClassifier(tiny_encoder(), num_classes=3)
    other = ViTClassifier(tiny_encoder(name="other"), num_classes=3)
    opt = LayerDecayAdamW(1e-3, lr_multipliers=layer_decay_multipliers(other, 0.5))
    with pytest.raises(ValueError, match="No learning-rate multiplier.*vit_encoder/cls_token"):
        opt.build(model.trainable_variables)


def numpy_layer_decay_adamw(params, grads_per_step, scales, decays, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """``torch.optim.AdamW`` on param groups with lr ``lr * scale`` (official
    ``lr_sched.adjust_learning_rate``), float64."""
    p = {k: v.astype("float64") for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    s = {k: np.zeros_like(v) for k, v in p.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        for k in p:
            lr_k = lr * scales[k]
            g = grads[k].astype("float64")
            if decays[k]:
                p[k] = p[k] * (1 - lr_k * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            s[k] = b2 * s[k] + (1 - b2) * g * g
            denom = np.sqrt(s[k]) / np.sqrt(1 - b2**t) + eps
            p[k] = p[k] - lr_k / (1 - b1**t) * m[k] / denom
    return p


def test_layer_decay_adamw_steps_match_numpy(rng):
    model = ViTClassifier(tiny_encoder(), num_classes=3, pool="avg")
    lr, wd = 1e-2, 0.1
    opt = finetune_adamw(model, lr, weight_decay=wd, layer_decay=0.5)
    variables = model.trainable_variables
    params = {v.path: to_np(v).copy() for v in variables}
    scales = {v.path: 0.5 ** (3 - hand_layer_id(v.path, 2)) for v in variables}
    # Official no-decay list: 1-D parameters, the [CLS] token and the position table (trained when finetuning).
    assert "vit_encoder/pos_embed" in params
    decays = {v.path: len(v.shape) > 1 and not v.path.endswith(("cls_token", "pos_embed")) for v in variables}
    steps = [{k: rng.normal(size=p.shape).astype("float32") for k, p in params.items()} for _ in range(2)]
    for grads in steps:
        opt.apply([keras.ops.convert_to_tensor(grads[v.path]) for v in variables], variables)
    want = numpy_layer_decay_adamw(params, steps, scales, decays, lr, wd)
    for v in variables:
        np.testing.assert_allclose(
            to_np(v) - params[v.path], want[v.path] - params[v.path], rtol=1e-4, atol=1e-7, err_msg=v.path
        )
    # Block 0 moved by the 0.25-scaled amount, not the head's.
    qkv = "vit_encoder/blocks_0/attn/qkv/kernel"
    unscaled = numpy_layer_decay_adamw(params, steps, {k: 1.0 for k in scales}, decays, lr, wd)
    moved = np.abs(to_np(model.encoder.blocks[0].attn.qkv.kernel) - params[qkv]).mean()
    assert moved == pytest.approx(np.abs(want[qkv] - params[qkv]).mean(), rel=1e-4)
    assert moved < 0.3 * np.abs(unscaled[qkv] - params[qkv]).mean()
    # The cls token (2-D but on the official no-decay list) was not decayed.
    cls = "vit_encoder/cls_token"
    decayed = numpy_layer_decay_adamw(params, steps, scales, dict(decays, **{cls: True}), lr, wd)
    assert not np.allclose(decayed[cls], want[cls], rtol=0, atol=1e-7)


def test_numpy_reference_is_torch_adamw_param_groups(rng):
    """The re-derivation above is what the official param groups do in torch."""
    torch = pytest.importorskip("torch")
    params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))}
    steps = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
    scales, decays = {"w": 0.3, "b": 0.7}, {"w": True, "b": False}
    tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    groups = [
        {"params": [tensors[k]], "lr": 0.05 * scales[k], "weight_decay": 0.2 if decays[k] else 0.0} for k in params
    ]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
    for grads in steps:
        for k, t in tensors.items():
            t.grad = torch.tensor(grads[k], dtype=torch.float64)
        opt.step()
    want = numpy_layer_decay_adamw(params, steps, scales, decays, 0.05, 0.2)
    for k in params:
        np.testing.assert_allclose(tensors[k].detach().numpy(), want[k], rtol=1e-12)


def test_layer_decay_scales_take_effect_in_fit(rng):
    """Through ``model.fit`` (each backend's compiled train step): Adam's first
    step moves every weight by ``lr * multiplier * g / (|g| + epsilon)``, i.e.
    ``lr * multiplier`` with an epsilon far below the (tiny, head init 2e-5)
    gradients; no decay here."""
    model = ViTClassifier(tiny_encoder(), num_classes=3, pool="avg")
    lr = 1e-3
    model.compile(
        optimizer=finetune_adamw(model, lr, weight_decay=0.0, layer_decay=0.5, epsilon=1e-20),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = {v.path: to_np(v).copy() for v in model.trainable_variables}
    x = rng.random((4, 32, 32, 3)).astype("float32")
    model.fit(x, np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
    for v in model.trainable_variables:
        step = np.abs(to_np(v) - before[v.path]) / lr
        want = 0.5 ** (3 - hand_layer_id(v.path, 2))
        assert np.median(step) == pytest.approx(want, rel=1e-3), v.path


def test_layer_decay_adamw_config_round_trip():
    opt = LayerDecayAdamW(
        WarmupCosine(1e-3, 2, 10), weight_decay=0.05, lr_multipliers={"a/b": 0.5}, no_weight_decay=["a/c"]
    )
    clone = LayerDecayAdamW.from_config(opt.get_config())
    assert clone.lr_multipliers == {"a/b": 0.5} and clone.no_weight_decay == ["a/c"]
    assert clone.weight_decay == 0.05 and clone.epsilon == 1e-8
    assert isinstance(clone._learning_rate, WarmupCosine)
    with pytest.raises(ValueError, match="lr_multipliers"):
        LayerDecayAdamW(lr_multipliers=[0.5])
    with pytest.raises(ValueError, match="weight_decay"):
        LayerDecayAdamW(weight_decay=-1.0)


# ---------------------------------------------------------------------------
# LARS
# ---------------------------------------------------------------------------


def numpy_lars(params, grads_per_step, lrs, wd, momentum, eta):
    """The official ``util/lars.py`` step, re-derived in float64."""
    p = {k: v.astype("float64") for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    for lr, grads in zip(lrs, grads_per_step):
        for k in p:
            d = grads[k].astype("float64")
            if p[k].ndim > 1:
                d = d + wd * p[k]
                pn, dn = np.linalg.norm(p[k]), np.linalg.norm(d)
                d = d * (eta * pn / dn if pn > 0 and dn > 0 else 1.0)
            mu[k] = momentum * mu[k] + d
            p[k] = p[k] - lr * mu[k]
    return p


@pytest.mark.parametrize("schedule", [False, True], ids=["constant_lr", "schedule"])
def test_lars_two_steps_match_numpy(rng, schedule):
    params = {
        "kernel": rng.normal(size=(5, 4)).astype("float32"),
        "bias": rng.normal(size=(4,)).astype("float32"),
        "zeros": np.zeros((3, 2), "float32"),  # |p| = 0: trust ratio 1
    }
    variables = [keras.Variable(v, name=k) for k, v in params.items()]
    steps = [{k: rng.normal(size=v.shape).astype("float32") for k, v in params.items()} for _ in range(2)]
    wd, momentum, eta = 0.1, 0.9, 0.02
    if schedule:
        lr = WarmupCosine(1.0, warmup_steps=0, total_steps=4)
        lrs = [1.0, 0.5 * (1 + np.cos(np.pi / 4))]
    else:
        lr, lrs = 0.5, [0.5, 0.5]
    opt = LARS(lr, weight_decay=wd, momentum=momentum, trust_coefficient=eta)
    for i, grads in enumerate(steps):
        opt.apply([keras.ops.convert_to_tensor(grads[v.name]) for v in variables], variables)
        want = numpy_lars(params, steps[: i + 1], lrs[: i + 1], wd, momentum, eta)
        for v in variables:
            np.testing.assert_allclose(
                to_np(v) - params[v.name],
                want[v.name] - params[v.name],
                rtol=1e-4,
                atol=1e-7,
                err_msg=f"{v.name} step {i}",
            )
    # The 2-D update is trust-scaled (tiny), the 1-D one plain momentum SGD.
    assert np.abs(to_np(variables[0]) - params["kernel"]).max() < 0.1
    np.testing.assert_allclose(
        to_np(variables[1]),
        params["bias"] - lrs[1] * (momentum * steps[0]["bias"] + steps[1]["bias"]) - lrs[0] * steps[0]["bias"],
        rtol=1e-5,
    )


def test_lars_defaults_config_and_errors():
    opt = LARS()
    assert (opt.weight_decay, opt.momentum, opt.trust_coefficient) == (0.0, 0.9, 0.001)
    clone = LARS.from_config(LARS(2.0, weight_decay=1e-4, momentum=0.8, trust_coefficient=0.01).get_config())
    assert (clone.weight_decay, clone.momentum, clone.trust_coefficient) == (1e-4, 0.8, 0.01)
    with pytest.raises(ValueError, match="momentum"):
        LARS(momentum=1.0)
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS(trust_coefficient=-1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        LARS(weight_decay=None)


# ---------------------------------------------------------------------------
# pretraining AdamW (keras_lcmae.optim.AdamW: Keras' update, fused on PyTorch)
# ---------------------------------------------------------------------------


def numpy_keras_adamw(params, grads_per_step, decayed, lrs, wd, b1=0.9, b2=0.95, eps=1e-7):
    """Keras' AdamW written out: decoupled decay, then the update with eps
    added to sqrt(v) and the bias corrections folded into the step size."""
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        for k in p:
            if decayed[k]:
                p[k] *= 1 - lr * wd
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v2[k] = b2 * v2[k] + (1 - b2) * grads[k] ** 2
            p[k] -= alpha * m[k] / (np.sqrt(v2[k]) + eps)
    return p


@pytest.mark.parametrize("path", ["default", "foreach"])
def test_pretrain_adamw_matches_numpy_and_keras(rng, path, monkeypatch):
    """Five steps of the recipe's AdamW (warmup-cosine lr, 1-D parameters not
    decayed) equal the numpy re-derivation and ``keras.optimizers.AdamW``. On
    PyTorch ``default`` is the fused CPU kernel and ``foreach`` forces the
    in-place foreach path the other devices take."""
    from keras_lcmae.optim import AdamW, adamw, decay_exclusions

    if path == "foreach":
        if keras.backend.backend() != "torch":
            pytest.skip("the foreach path is PyTorch's")
        from keras_lcmae.backend import torch_optim

        monkeypatch.setattr(torch_optim, "fused_adamw_usable", lambda variables: False)
    model = ViTEncoder(image_size=16, patch_size=8, hidden_dim=8, depth=1, num_heads=2)
    model(np.zeros((1, 16, 16, 3), "float32"))
    variables = model.trainable_variables
    start = {v.path: to_np(v).copy() for v in variables}
    excluded = {v.path for v in decay_exclusions(model)}
    assert excluded and all(len(v.shape) <= 1 for v in variables if v.path in excluded)
    schedule = WarmupCosine(1e-2, 2, 10)
    steps = [{v.path: rng.normal(scale=0.1, size=v.shape).astype("float32") for v in variables} for _ in range(5)]
    opt = adamw(model, schedule, weight_decay=0.1)
    assert isinstance(opt, AdamW)
    opt.epsilon = 0.05  # large against the gradients, so where eps enters shows
    for grads in steps:
        opt.apply([keras.ops.convert_to_tensor(grads[v.path]) for v in variables], variables)
    lrs = [float(to_np(schedule(t))) for t in range(5)]
    want = numpy_keras_adamw(start, steps, {k: k not in excluded for k in start}, lrs, 0.1, eps=0.05)
    for v in variables:
        np.testing.assert_allclose(to_np(v), want[v.path], rtol=2e-5, atol=2e-6, err_msg=v.path)
    # and Keras' own AdamW from the same start
    for v in variables:
        v.assign(start[v.path])
    ref = keras.optimizers.AdamW(schedule, weight_decay=0.1, beta_1=0.9, beta_2=0.95, epsilon=0.05)
    ref.exclude_from_weight_decay(var_list=decay_exclusions(model))
    for grads in steps:
        ref.apply([keras.ops.convert_to_tensor(grads[v.path]) for v in variables], variables)
    for v in variables:
        np.testing.assert_allclose(to_np(v), want[v.path], rtol=2e-5, atol=2e-6, err_msg=v.path)


def test_pretrain_adamw_config_round_trip():
    from keras_lcmae.optim import AdamW

    opt = AdamW(WarmupCosine(1e-3, 2, 10), weight_decay=0.05, beta_2=0.95)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is AdamW and again.beta_2 == 0.95 and again.weight_decay == 0.05
