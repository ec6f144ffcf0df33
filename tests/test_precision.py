"""Mixed precision (bf16; fp16 with loss scaling) and XLA compilation give the
float32 / eager losses, and train."""

import keras
import numpy as np
import pytest

from keras_lcmae import LCMAE, MAE, TransformerDecoder, ViTEncoder
from tests.conftest import BACKEND

IMAGES = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
NOISE = np.random.default_rng(1).random((4, 2, 16)).astype("float32")


def make(method):
    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=3, hidden_dim=32, depth=2, num_heads=2)
    decoder = TransformerDecoder(32, 1, 2)
    if method == "mae":
        return MAE(encoder, decoder, seed=0)
    return LCMAE(encoder, decoder, projector_dim=64, loss_weights="a", seed=0)


def inputs(method):
    return {"images": IMAGES, "noise": NOISE[:, 0] if method == "mae" else NOISE}


def loss_of(model, method):
    x = inputs(method)
    out = model(x, training=False)
    return float(keras.ops.convert_to_numpy(model.compute_loss(x=x, y_pred=out)))


@pytest.mark.parametrize("method", ["mae", "lcmae"])
@pytest.mark.parametrize("name,rel", [("mixed_bfloat16", 0.05), ("mixed_float16", 0.01)])
def test_mixed_precision_matches_float32_and_trains(method, name, rel, policy):
    reference = make(method)
    expected = loss_of(reference, method)
    policy(name)
    model = make(method)
    model.set_weights(reference.get_weights())
    assert model.encoder.blocks[0].attn.qkv.compute_dtype == name.split("_")[1]
    assert all(w.dtype == "float32" for w in model.trainable_weights)  # float32 master weights
    assert loss_of(model, method) == pytest.approx(expected, rel=rel)
    if name == "mixed_float16" and BACKEND == "jax" and keras.distribution.list_devices()[0].startswith("cpu"):
        pytest.skip("XLA:CPU has no float16 matmul with float32 accumulation (F16_F16_F32); fp16 is for GPUs")
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    if name == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(inputs(method), batch_size=4, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    before = reference.get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(before, model.get_weights())) > 1e-4


@pytest.mark.skipif(BACKEND != "tensorflow", reason="jit_compile=True is XLA on TensorFlow (JAX always compiles)")
@pytest.mark.parametrize("method", ["mae", "lcmae"])
def test_xla_matches_graph_mode(method):
    results = []
    init = None
    for jit in (False, True):
        model = make(method)
        if init is None:
            init = model.get_weights()
        model.set_weights(init)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
        history = model.fit(inputs(method), batch_size=4, epochs=2, verbose=0, shuffle=False)
        results.append((history.history["loss"], model.get_weights()))
    (l1, w1), (l2, w2) = results
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    assert max(np.abs(a - b).max() for a, b in zip(w1, w2)) < 1e-5


@pytest.mark.parametrize("job", ["finetune", "linprobe"])
def test_bf16_finetune_and_probe_match_float32_and_train(job, policy):
    """The evaluation recipes' models and optimizers (layer-decay AdamW for
    finetuning, LARS for the frozen-encoder probe, both accumulating two
    micro-batches) under mixed_bfloat16: first loss within 5 % of float32,
    float32 master weights, finite training that moves the weights."""
    from keras_lcmae import LARS, ViTClassifier, finetune_adamw
    from keras_lcmae.optim import WarmupCosine

    labels = np.arange(4) % 3

    def build():
        keras.utils.set_random_seed(0)
        encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=3, hidden_dim=32, depth=2, num_heads=2)
        model = ViTClassifier(encoder, 3, pool="avg" if job == "finetune" else "cls", linear_probe=job == "linprobe")
        schedule = WarmupCosine(1e-3 if job == "finetune" else 5.0, 0, 10)
        opt = finetune_adamw(model, schedule, accum_steps=2) if job == "finetune" else LARS(schedule, accum_steps=2)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def first_loss(model):
        logits = model(IMAGES, training=False)
        return float(keras.ops.convert_to_numpy(model.loss(labels, keras.ops.cast(logits, "float32"))))

    reference = build()
    expected = first_loss(reference)
    policy("mixed_bfloat16")
    model = build()
    model.set_weights(reference.get_weights())
    assert model.encoder.blocks[0].attn.qkv.compute_dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in model.trainable_weights)
    assert first_loss(model) == pytest.approx(expected, rel=0.05)
    before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    history = model.fit(IMAGES, labels, batch_size=2, epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 2  # 4 micro-batches, 2 updates
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert max(float(np.abs(a - b).max()) for a, b in zip(before, after)) > 1e-5
