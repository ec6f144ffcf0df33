"""keras_lcmae.memory: the per-device memory estimate of a training step, its
formula, and the estimate against a step measured on the CPU (PyTorch)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lcmae import LARS, LCMAE, MAE, AutoEncoder, TransformerDecoder, ViTClassifier, ViTEncoder, memory, optim
from keras_lcmae.decoders import ConvDecoder, GaussianAverageDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the formula is arithmetic on the sizes (backend given explicitly): run it once
formula = pytest.mark.tf_only


def _encoder(**kw):
    return ViTEncoder(**dict(dict(image_size=64, patch_size=8, hidden_dim=64, depth=2, num_heads=2), **kw))


def _est(**kw):
    kw.setdefault("backend", "torch")
    kw.setdefault("compute_dtype", "float32")
    return memory.estimate_training_memory(**kw)


VIT_B = dict(image_size=224, patch_size=16, hidden_dim=768, depth=12, num_heads=12)


@formula
def test_estimate_has_the_documented_keys_and_total():
    est = _est(job="mae", batch_size=8, **VIT_B)
    assert tuple(est) == memory.ESTIMATE_KEYS
    assert all(isinstance(v, int) and v >= 0 for v in est.values())
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


@formula
@pytest.mark.parametrize("job", memory.JOBS)
def test_activations_scale_linearly_in_the_micro_batch(job):
    one = _est(job=job, batch_size=16, **VIT_B)
    two = _est(job=job, batch_size=48, **VIT_B)
    assert two["activations"] == pytest.approx(3 * one["activations"], rel=1e-6)
    for key in ("parameters", "gradients", "optimizer_state", "accumulators"):
        assert two[key] == one[key]


@formula
@pytest.mark.parametrize("job", memory.JOBS)
def test_accumulation_adds_exactly_one_float32_copy_of_the_trained_weights(job):
    geometry = memory.Geometry(job=job, **VIT_B)
    trainable = memory.count_params(geometry)[0]
    k1 = _est(model=geometry, batch_size=32)
    k4 = _est(model=geometry, batch_size=32, accum_steps=4)
    assert k1["accumulators"] == 0 and k4["accumulators"] == 4 * trainable == k1["gradients"]
    assert k4["total"] - k1["total"] == 4 * trainable
    assert _est(model=geometry, batch_size=32, accum_steps=2)["accumulators"] == k4["accumulators"]  # one copy, any K


@formula
def test_probe_keeps_a_fraction_of_finetunings_activations_and_trains_the_head_only():
    finetune = _est(job="finetune", batch_size=64, **VIT_B)
    probe = _est(job="linprobe", batch_size=64, **VIT_B)
    assert probe["activations"] < finetune["activations"] / 10  # one block's working set, no backward through 12
    head = 768 * 1000 + 1000
    assert probe["gradients"] == 4 * head and probe["optimizer_state"] == 4 * head  # LARS: one slot
    assert probe["parameters"] == finetune["parameters"] + 4 * 2 * 768  # + BatchNorm's moving statistics


@formula
def test_block_formula_constants():
    b, t, d, h = 2, 10, 64, 4
    # PyTorch float32, fused attention: 17 D-wide float32 tensors a token, LayerNorm statistics, log-sum-exp
    assert memory.block_activation_bytes(b, t, d, h, 4.0, 4, 0, "torch") == b * t * (17 * d * 4 + 16 + 4 * h)
    # explicit attention: the probabilities, no log-sum-exp
    assert (
        memory.block_activation_bytes(b, t, d, h, 4.0, 4, 1, "torch") == b * t * (17 * d * 4 + 16) + b * h * t * t * 4
    )
    # JAX / TensorFlow: 28 D-wide tensors, exponentials and probabilities
    for backend in ("jax", "tensorflow"):
        assert (
            memory.block_activation_bytes(b, t, d, h, 4.0, 4, 2, backend)
            == b * t * (28 * d * 4 + 32) + 2 * b * h * t * t * 4
        )
    # bf16: LayerNorm's inputs stay float32, the rest halves
    assert (
        memory.block_activation_bytes(b, t, d, h, 4.0, 2, 1, "torch")
        == b * t * (15 * d * 2 + 2 * d * 4 + 16) + b * h * t * t * 2
    )
    assert memory.block_constants("torch", 2.0) == (11.0, 2, 16)


@formula
def test_attention_constant_follows_the_backends_path():
    assert memory.attention_constant("auto", "torch", 4) == 0
    assert memory.attention_constant("auto", "torch", 2, on_cpu=True) == 1  # fused_attention_is_fast: explicit
    assert memory.attention_constant("auto", "torch", 2, on_cpu=False) == 0
    assert memory.attention_constant("auto", "jax", 4) == memory.attention_constant("auto", "tensorflow", 2) == 2
    assert memory.attention_constant("fused", "jax") == 0 and memory.attention_constant("explicit", "torch") == 1
    assert memory.attention_constant(1.5, "torch") == 1.5
    with pytest.raises(ValueError, match="attention must be"):
        memory.attention_constant("flash", "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        memory.attention_constant("auto", "numpy")
    # the T^2 term grows with the sequence: ViT-B/16 at 448 px keeps far more with an explicit softmax
    fused = _est(job="finetune", batch_size=8, attention="fused", **dict(VIT_B, image_size=448))
    explicit = _est(job="finetune", batch_size=8, attention="explicit", **dict(VIT_B, image_size=448))
    t, h = 1 + 28 * 28, 12
    assert explicit["activations"] - fused["activations"] == 12 * (8 * h * t * t * 4 - 8 * t * 4 * h)


@formula
def test_lcmae_runs_two_views_through_encoder_and_decoder_and_embeds_once():
    geometry = memory.Geometry(job="mae", **VIT_B, decoder_depth=2)
    mae = memory.activation_breakdown(geometry, 8)
    lc = memory.activation_breakdown(memory.Geometry(job="lcmae", **VIT_B, decoder_depth=2), 8)
    for part in ("encoder_blocks", "encoder_norm", "decoder", "decoder_norm", "prediction"):
        assert lc[part] == 2 * mae[part], part
    assert lc["patch_embed"] == mae["patch_embed"] and lc["contrastive"] > 0 and "contrastive" not in mae
    # the encoder sees 1 + 49 tokens of 196 at mask ratio 0.75, AE all 197
    ae = memory.activation_breakdown(memory.Geometry(job="ae", **VIT_B, decoder_depth=2), 8)
    per_token = memory.block_activation_bytes(8, 1, 768, 12) * 12
    assert mae["encoder_blocks"] == 50 * per_token and ae["encoder_blocks"] == 197 * per_token


@formula
def test_mixed_precision_halves_activations_but_not_weights():
    f32 = _est(job="finetune", batch_size=32, **VIT_B)
    bf16 = _est(job="finetune", batch_size=32, compute_dtype="mixed_bfloat16", attention="fused", **VIT_B)
    assert bf16["parameters"] == f32["parameters"] and bf16["optimizer_state"] == f32["optimizer_state"]
    assert 0.5 < bf16["activations"] / f32["activations"] < 0.65  # LayerNorm stays float32
    parts = memory.activation_breakdown(memory.Geometry(job="finetune", **VIT_B), 32, 2, 0)
    assert parts["weight_copies"] == 2 * memory.count_params(memory.Geometry(job="finetune", **VIT_B))[0]
    assert memory.dtype_bytes(keras.DTypePolicy("mixed_float16")) == memory.dtype_bytes("bf16") == 2
    assert memory.dtype_bytes("float32") == memory.dtype_bytes(4) == 4
    with pytest.raises(ValueError, match="Unknown compute dtype"):
        memory.dtype_bytes("int8")


@formula
def test_vit_b_counts_match_the_published_models():
    # timm's vit_base_patch16_224 (1000 classes): 86,567,656 weights
    assert memory.count_params(memory.Geometry(job="finetune", **VIT_B)) == (86_567_656, 86_567_656)
    # MAE ViT-B/16 with the 512 x 8 decoder (transformers' ViTMAEForPreTraining, as the official model):
    # 111,907,840 weights, of which the two sin-cos tables (197 x 768 + 197 x 512) are fixed
    trainable, total = memory.count_params(memory.Geometry(job="mae", **VIT_B))
    assert total == 111_907_840 and trainable == total - 197 * (768 + 512)


def _models():
    return {
        "mae": MAE(_encoder(), TransformerDecoder(32, 2, 2)),
        "lcmae": LCMAE(_encoder(), TransformerDecoder(32, 1, 2), projector_dim=128),
        "lcmae_hidden": LCMAE(_encoder(), TransformerDecoder(32, 1, 2), projector_dim=16, projector_input="hidden"),
        "ae": AutoEncoder(_encoder(), TransformerDecoder(32, 1, 2), block_size=16),
        "gaussian": MAE(_encoder(), GaussianAverageDecoder(32)),
        "conv": MAE(_encoder(), ConvDecoder(32, kernel_size=3)),
        "finetune_avg": ViTClassifier(_encoder(), 10, pool="avg"),
        "finetune_cls": ViTClassifier(_encoder(), 10, pool="cls"),
        "probe_cls": ViTClassifier(_encoder(), 10, linear_probe=True),
        "probe_avg": ViTClassifier(_encoder(), 10, pool="avg", linear_probe=True),
    }


@formula
def test_counts_from_the_sizes_equal_the_built_models():
    """The analytic weight counts (used when planning without a model) equal
    what Keras builds, for every model kind and decoder; and the estimate
    from the model equals the one from its sizes alone."""
    for name, model in _models().items():
        g = memory.model_geometry(model)
        sizes = memory.Geometry(
            **{k: v for k, v in vars(g).items() if k not in ("trainable_params", "total_params", "param_bytes")}
        )
        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
        assert memory.count_params(sizes) == (trainable, model.count_params()), name
        assert (g.trainable_params, g.total_params, g.param_bytes) == (trainable, model.count_params(), 4), name
        assert _est(model=model, batch_size=4) == _est(model=sizes, batch_size=4), name
    g = memory.model_geometry(_models()["lcmae"])
    assert (g.job, g.decoder_depth, g.projector_dim, g.output_dim, g.image_size) == ("lcmae", 1, 128, 192, (64, 64))
    assert memory.model_geometry(_models()["ae"]).output_dim == 16 * 16 * 3


@formula
def test_optimizer_slots_and_accumulation_come_from_the_compiled_model():
    model = ViTClassifier(_encoder(), 10, pool="avg")
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    model.compile(optimizer=optim.finetune_adamw(model, 1e-3), loss="sparse_categorical_crossentropy")
    est = _est(model=model, batch_size=4)
    assert est["optimizer_state"] == 2 * 4 * trainable and est["accumulators"] == 0
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, gradient_accumulation_steps=4), loss="mse")
    assert _est(model=model, batch_size=4)["accumulators"] == 4 * trainable
    assert memory.optimizer_slots(LARS(0.1)) == memory.optimizer_slots("lars") == 1
    assert memory.optimizer_slots(keras.optimizers.SGD(0.1)) == 0
    assert memory.optimizer_slots(keras.optimizers.SGD(0.1, momentum=0.9)) == 1
    assert memory.optimizer_slots(keras.optimizers.Adam(amsgrad=True)) == 3
    assert memory.optimizer_slots(optim.AdamW(1e-3)) == memory.optimizer_slots(3 - 1) == 2

    class WithAccum:  # this package's optimizers take accum_steps=K
        accum_steps = 8

    assert memory.optimizer_accum_steps(WithAccum()) == 8 and memory.optimizer_accum_steps(LARS(0.1)) == 1
    with pytest.raises(ValueError, match="Unknown optimizer"):
        memory.optimizer_slots("adafactor9")


@formula
def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="job must be one of"):
        memory.Geometry(job="pretrain")
    with pytest.raises(ValueError, match="needs job="):
        memory.estimate_training_memory(_encoder(), 4)
    with pytest.raises(ValueError, match="batch_size"):
        _est(job="mae", batch_size=0)
    with pytest.raises(ValueError, match="accum_steps"):
        _est(job="mae", batch_size=2, accum_steps=0)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        memory.Geometry(job="finetune", image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="job="):
        memory.estimate_training_memory(batch_size=2)
    with pytest.raises(ValueError, match="reads MAE"):
        memory.estimate_training_memory(keras.Sequential([keras.layers.Dense(2)]), 2)
    # a bare encoder with a job is fine
    enc = _encoder()
    est = memory.estimate_training_memory(enc, 4, job="finetune", backend="torch", compute_dtype=4)
    same = _est(
        job="finetune", batch_size=4, image_size=64, patch_size=8, hidden_dim=64, depth=2, num_heads=2, compute_dtype=4
    )
    assert est["activations"] == same["activations"] > 0  # the encoder's sizes were read


@formula
def test_fits_keeps_the_headroom_and_format_bytes_reads_well():
    gib = 2**30
    assert memory.fits({"total": int(0.9 * 80 * gib)}, 80) and not memory.fits({"total": int(0.9 * 80 * gib) + 1}, 80)
    assert memory.fits(79 * gib, 80, headroom=0.0) and not memory.fits(79 * gib, 80)
    with pytest.raises(ValueError, match="headroom"):
        memory.fits(1, 80, headroom=1.0)
    with pytest.raises(ValueError, match="device_memory_gb"):
        memory.fits(1, 0)
    assert memory.format_bytes(512) == "512 B" and memory.format_bytes(1536) == "1.5 KiB"
    assert memory.format_bytes(3 * gib) == "3 GiB" and memory.format_bytes(5 * 2**40) == "5 TiB"
    est = {
        "parameters": 3 * 2**20,
        "gradients": 2**20,
        "optimizer_state": 0,
        "accumulators": 0,
        "activations": 2 * gib,
        "total": 2 * gib + 4 * 2**20,
    }
    assert memory.summarize(est) == "total 2 GiB: activations 2 GiB, parameters 3 MiB, gradients 1 MiB"
    # ViT-B/16 finetuning at micro-batch 64, bf16 with fused attention: fits an 80 GB H100, not a 16 GB card at 512
    vit_b = _est(job="finetune", batch_size=64, compute_dtype="mixed_bfloat16", attention="fused", **VIT_B)
    assert 2 * gib < vit_b["total"] < 8 * gib and memory.fits(vit_b, 80)
    assert not memory.fits(_est(job="finetune", batch_size=512, compute_dtype="mixed_bfloat16", **VIT_B), 16)


# One process: per job, the bytes the autograd graph saves (listed by
# saved_tensors_hooks, weights excluded) and the measured step peak
# (memory.measure_step_memory), with the estimate's activations and
# activations + gradients. ViT 192 x 4, 64 px, patch 8, batch 32.
MEASURE = r"""
import json, sys
import numpy as np, keras, torch
from keras_lcmae import memory
if not memory.return_freed_memory():
    print(json.dumps({"skip": "malloc is not glibc's"})); sys.exit(0)
from keras_lcmae import LCMAE, MAE, TransformerDecoder, ViTClassifier, ViTEncoder, optim
B = 32
rng = np.random.default_rng(0)
x = keras.ops.convert_to_tensor(rng.random((B, 64, 64, 3)).astype("float32"))
y = keras.ops.convert_to_tensor(rng.integers(0, 10, B))
for job in sys.argv[1].split(","):
    keras.utils.set_random_seed(0)
    enc = ViTEncoder(image_size=64, patch_size=8, hidden_dim=192, depth=4, num_heads=3)
    if job in ("finetune", "linprobe"):
        model = ViTClassifier(enc, 10, pool="avg" if job == "finetune" else "cls", linear_probe=job == "linprobe")
        opt = optim.finetune_adamw(model, 1e-4) if job == "finetune" else optim.LARS(0.1)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        labels = y
    else:
        kind, kw = (LCMAE, dict(projector_dim=1024)) if job == "lcmae" else (MAE, {})
        model = kind(enc, TransformerDecoder(128, 2, 4), mask_ratio=0.75, seed=0, **kw)
        model.compile(optimizer=optim.adamw(model, 1e-4))
        labels = None
    est = memory.estimate_training_memory(model, B)
    weights = {v.value.untyped_storage().data_ptr() for v in model.weights}
    saved = {}
    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            saved[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, training=True)
        loss = model.compute_loss(x, labels, out)
    del out, loss
    measured = memory.measure_step_memory(model, x, labels, warmup=2, repeats=2)
    print(json.dumps({"job": job, "saved": sum(saved.values()), "activations": est["activations"],
                      "estimate": est["activations"] + est["gradients"], "measured": measured["step_bytes"],
                      "samples": measured["samples"], "summary": memory.summarize(est)}), flush=True)
    del model
"""


@pytest.mark.torch_pass
@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or bool(os.environ.get("LD_PRELOAD")),
    reason="reads Linux's /proc peak RSS with glibc's malloc",
)
def test_estimate_within_30_percent_of_a_measured_cpu_step():
    """PyTorch on the CPU, float32, in a fresh process: the saved activations
    of finetuning and MAE are the formula's (within 5 %), and the measured
    step peak above the memory held between steps (the weights and the
    optimizer state) is within 30 % of ``activations + gradients``."""
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, "finetune,mae"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if rows and "skip" in rows[0]:
        pytest.skip(rows[0]["skip"])
    assert [r["job"] for r in rows] == ["finetune", "mae"], out.stdout
    for r in rows:
        assert abs(r["activations"] - r["saved"]) / r["saved"] < 0.05, r
        assert abs(r["estimate"] - r["measured"]) / r["measured"] < 0.30, r
        assert max(r["samples"]) - min(r["samples"]) < 0.05 * r["measured"], r  # a stable measurement
