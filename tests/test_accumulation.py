"""Gradient accumulation, ``accum_steps=K`` on the project's optimizers
(:class:`keras_lcmae.optim.AccumulatesGradients`, official MAE's ``--accum_iter``).

K micro-batches (one ``fit`` batch each) make one update with the mean of
their K gradients; ``optimizer.iterations`` counts updates and the lr schedule
is read at it. Here K = 2.

How two runs are compared (:func:`assert_same_state`): per variable,
``max|a - b| / max|a| < 1e-5`` for the trainable weights and for the
optimizer's moments (Adam's ``m`` and ``v``, LARS' momentum). float32 sums a
batch of 2b in another order than two batches of b; the worst seen on the
three backends (CPU) is 4.5e-6 for weights (zero-initialised biases under Adam,
whose step ``m / sqrt(v)`` magnifies the rounding of small gradient entries)
and 1.4e-6 for moments. The moments are linear (``m``) or quadratic (``v``) in
the gradient, so a wrong accumulated gradient shows there even at the first
update, where the warmup's lr is 0 and no weight moves.
"""

import keras
import numpy as np
import pytest

from keras_lcmae import LCMAE, MAE, TransformerDecoder, ViTClassifier, ViTEncoder
from keras_lcmae.optim import LARS, AdamW, LayerDecayAdamW, WarmupCosine, adamw, finetune_adamw
from tests.helpers import to_np

K = 2
RTOL = 1e-5
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
NUM_PATCHES = 16  # vit_test: 32 px, patches of 8
NUM_VISIBLE = 4  # of 16 at mask ratio 0.75
FEATURE_DIM = 32
MICRO_BATCH = {"mae": 2, "finetune": 2, "probe": 8}
OPTIMIZERS = ("adamw", "lars", "layer_decay")


def schedule(peak):
    """lr ``0, peak/2, peak, 0.93 peak`` at updates 0, 1, 2, 3: an lr read at
    the micro-batch count (1, 3, ... instead of 0, 1, ...) shows at once."""
    return WarmupCosine(peak, warmup_steps=2, total_steps=8)


def make_optimizer(name, model, accum_steps, learning_rate=None):
    """The recipes' optimizers: ``adamw()`` (pretraining), LARS (probe) with
    L2 decay > 0 (so that its step depends on the gradient's scale, not only
    on its direction), ``finetune_adamw()`` (LayerDecayAdamW without layer
    multipliers for a model without an encoder)."""
    if name == "adamw":
        return adamw(model, learning_rate or schedule(1e-3), accum_steps=accum_steps)
    if name == "lars":
        return LARS(learning_rate or schedule(1.0), weight_decay=1e-2, accum_steps=accum_steps)
    if hasattr(model, "encoder"):
        return finetune_adamw(model, learning_rate or schedule(1e-3), layer_decay=0.75, accum_steps=accum_steps)
    return LayerDecayAdamW(learning_rate or schedule(1e-3), weight_decay=0.05, accum_steps=accum_steps)


def probe_head(dim=FEATURE_DIM, num_classes=10):
    """The linear probe on cached features: BatchNorm without affine, then
    the linear layer (``head_model`` of recipes/linprobe.py, the head of
    ``ViTClassifier(linear_probe=True)``)."""
    inputs = keras.Input((dim,))
    x = keras.layers.BatchNormalization(center=False, scale=False, epsilon=1e-6, momentum=0.9, name="head_norm")(inputs)
    x = keras.layers.Dense(num_classes, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01), name="head")(x)
    return keras.Model(inputs, x)


def build_model(kind):
    if kind == "probe":
        return probe_head()
    encoder = ViTEncoder.from_preset("vit_test")  # no drop path
    if kind == "mae":
        return MAE(encoder, TransformerDecoder(hidden_dim=32, depth=1, num_heads=2), mask_ratio=0.75)
    if kind == "lcmae":
        return LCMAE(encoder, TransformerDecoder(hidden_dim=32, depth=1, num_heads=2), projector_dim=64)
    return ViTClassifier(encoder, num_classes=10, pool="avg")  # finetuning, no augmentation


def twins(build, compile_kwargs, accum_steps):
    """One model per entry of ``accum_steps``, all with the first one's initial
    weights, compiled with ``compile_kwargs(model, accum_steps)``."""
    models = []
    for k in accum_steps:
        model = build()
        if models:
            model.set_weights(models[0].get_weights())
        model.compile(**compile_kwargs(model, k))
        models.append(model)
    return models


def images(rng, n):
    return rng.normal(size=(n, 32, 32, 3)).astype("float32")


def iterations(model):
    return int(to_np(model.optimizer.iterations))


def slots(optimizer, suffixes=("_momentum", "_velocity")):
    """The optimizer's moments, in the order of the trained variables."""
    return [v for v in optimizer.variables if v.path.endswith(suffixes)]


def comparable(variable):
    """Entries of ``variable`` compared after an update: all but the key
    third of an attention layer's fused ``qkv`` bias (``q | k | v``).

    That bias's gradient is zero in exact arithmetic (``softmax(q . (k + c))``
    does not depend on ``c``: ``q . c`` shifts a whole row of logits), so in
    float32 it is rounding noise that differs between a batch of 2b and two of
    b, and Adam's step ``m / sqrt(v)`` turns that noise into moves of up to
    the lr. Its moments are compared with the others (they are negligible)."""
    keep = np.ones(variable.shape, bool)
    if variable.path.endswith("qkv/bias"):
        d = variable.shape[0] // 3
        keep[d : 2 * d] = False
    return keep


def rel_err(want, got):
    """``max|want - got| / max|want|`` (the plain difference when ``want`` is 0)."""
    want, got = np.asarray(want, "float64"), np.asarray(got, "float64")
    diff = float(np.max(np.abs(want - got)))
    scale = float(np.max(np.abs(want)))
    return diff / scale if scale > 0 else diff


def assert_same_state(reference, model, when):
    for a, b in zip(reference.trainable_variables, model.trainable_variables):
        keep = comparable(a)
        err = rel_err(to_np(a)[keep], to_np(b)[keep])
        assert err < RTOL, f"{a.path} {when}: weights differ by {err:.1e} (relative)"
    slots_a, slots_b = slots(reference.optimizer), slots(model.optimizer)
    assert len(slots_a) == len(slots_b) > 0
    for a, b in zip(slots_a, slots_b):
        err = rel_err(to_np(a), to_np(b))
        assert err < RTOL, f"{a.path} {when}: optimizer moments differ by {err:.1e} (relative)"


def reset(model, weights):
    """Back to ``weights`` with a fresh optimizer state (no moments, step 0)."""
    model.set_weights(weights)
    for v in model.optimizer.variables:
        if v.path.endswith(("_momentum", "_velocity", "_accumulator", "/iteration")):
            v.assign(np.zeros(v.shape, v.dtype))


# ---------------------------------------------------------------------------
# K micro-batches of b == one batch of K * b
# ---------------------------------------------------------------------------


def update_data(kind, rng):
    """``(x, y)`` of one update: 2b examples, micro-batch 1 the first b rows."""
    b = MICRO_BATCH[kind]
    if kind == "probe":
        # The non-affine BatchNorm normalises each micro-batch by its own
        # statistics. Micro-batch 2 holds micro-batch 1's features in another
        # order (with other labels), so both micro-batches and their union have
        # the same per-feature mean and variance, and accumulation is exact.
        first = rng.normal(size=(b, FEATURE_DIM)).astype("float32")
        return np.concatenate([first, first[rng.permutation(b)]]), rng.integers(0, 10, size=2 * b)
    x = np.concatenate([images(rng, b), images(rng, b)])
    if kind == "mae":  # fixed masks: micro-batch i gets its own noise rows
        return {"images": x, "noise": rng.uniform(size=(2 * b, NUM_PATCHES)).astype("float32")}, None
    return x, rng.permutation(10)[: 2 * b]


# Each model with its recipe's optimizer, and the cheap probe with all three,
# run on every backend; the other pairings (the same optimizer code on bigger
# models) run once, in the PyTorch pass.
EVERY_BACKEND = {
    ("mae", "adamw"),
    ("finetune", "layer_decay"),
    ("probe", "adamw"),
    ("probe", "lars"),
    ("probe", "layer_decay"),
}
CASES = [
    pytest.param(kind, opt, marks=() if (kind, opt) in EVERY_BACKEND else pytest.mark.torch_pass)
    for kind in ("mae", "finetune", "probe")
    for opt in OPTIMIZERS
]


@pytest.mark.parametrize("kind, optimizer", CASES)
def test_micro_batches_make_the_big_batch_update(kind, optimizer):
    """From the same weights, K=2 micro-batches of b make the update of one
    batch of 2b: weights and moments after one and after two updates. MAE:
    fixed masks at one mask ratio, so its loss is a plain mean over images."""

    def compile_kwargs(model, k):
        return dict(optimizer=make_optimizer(optimizer, model, k), loss=None if kind == "mae" else LOSS)

    big, accumulated = twins(lambda: build_model(kind), compile_kwargs, (1, K))
    b = MICRO_BATCH[kind]
    rng = np.random.default_rng(1)
    for update in (1, 2):
        before = [to_np(v) for v in big.trainable_variables]
        x, y = update_data(kind, rng)
        big.fit(x, y, batch_size=K * b, shuffle=False, verbose=0)
        accumulated.fit(x, y, batch_size=b, shuffle=False, verbose=0)
        assert iterations(big) == iterations(accumulated) == update
        assert_same_state(big, accumulated, f"after update {update}")
    # the second update (lr peak/2) moves the weights far beyond the tolerance
    assert max(rel_err(w, to_np(v)) for w, v in zip(before, big.trainable_variables)) > 100 * RTOL


# ---------------------------------------------------------------------------
# Losses normalised per batch: the mean of the micro-batch gradients
# ---------------------------------------------------------------------------


def co_masked(noise):
    """Per image, the positions masked in both views (what ``L_cross``
    averages over), from LC-MAE noise ``(B, 2, N)``."""
    masked = np.argsort(np.argsort(noise, axis=-1), axis=-1) >= NUM_VISIBLE
    return (masked[:, 0] & masked[:, 1]).sum(-1)


def test_lcmae_update_is_the_mean_of_micro_batch_gradients():
    """``L_cross`` is a mean over the positions masked in both views, a count
    that differs between micro-batches, so two micro-batches are not one batch
    of 2b. Accumulation then does what official MAE's ``--accum_iter`` does
    (each micro-batch loss divided by K): one update with the mean of the
    micro-batch gradients.

    Reference: an ``accum_steps=1`` model; after one AdamW step from a fresh
    state its first moment is ``(1 - beta_1) g``, which gives each micro-batch
    gradient ``g_i`` and the big batch's ``g``. The accumulating model's
    moments after its update must be those of ``(g_1 + g_2) / 2``: they and
    the step count are all that the (otherwise separately tested) AdamW step
    reads. Its weights are not compared: one Adam step from zero moments is
    about ``lr * sign(g)``, so the rounding of the many near-zero gradient
    entries (the reference computes them in other sums) would dominate."""
    b = 2
    accumulated, single = twins(
        lambda: build_model("lcmae"), lambda model, k: dict(optimizer=make_optimizer("adamw", model, k, 1e-3)), (K, 1)
    )
    rng = np.random.default_rng(2)
    x = images(rng, 2 * b)
    noise = rng.uniform(size=(2 * b, 2, NUM_PATCHES)).astype("float32")  # per image and view
    counts = co_masked(noise)
    assert counts[:b].sum() != counts[b:].sum(), counts
    start = single.get_weights()
    accumulated.fit({"images": x, "noise": noise}, batch_size=b, shuffle=False, verbose=0)
    assert iterations(accumulated) == 1

    beta_1, beta_2 = single.optimizer.beta_1, single.optimizer.beta_2

    def gradient(rows):
        reset(single, start)
        single.fit({"images": x[rows], "noise": noise[rows]}, batch_size=len(x[rows]), shuffle=False, verbose=0)
        return [to_np(m) / (1.0 - beta_1) for m in slots(single.optimizer, "_momentum")]

    g1, g2, g_big = gradient(slice(0, b)), gradient(slice(b, 2 * b)), gradient(slice(0, 2 * b))
    mean = [(p + q) / 2 for p, q in zip(g1, g2)]
    first, second = slots(accumulated.optimizer, "_momentum"), slots(accumulated.optimizer, "_velocity")
    assert len(first) == len(second) == len(mean) == len(accumulated.trainable_variables)
    for g, m, v in zip(mean, first, second):
        assert rel_err((1.0 - beta_1) * g, to_np(m)) < RTOL, m.path
        assert rel_err((1.0 - beta_2) * g**2, to_np(v)) < RTOL, v.path
    assert max(rel_err(m, g) for m, g in zip(mean, g_big)) > 1e-3  # the two rules differ measurably
    assert max(rel_err((1.0 - beta_1) * g, to_np(m)) for g, m in zip(g_big, first)) > 1e-3


def probe_gradients(features, labels, kernel, bias):
    """Softmax cross-entropy gradients of the probe head (BatchNorm over
    ``features``, biased variance, eps 1e-6; then ``z @ kernel + bias``), float64."""
    f = features.astype("float64")
    z = (f - f.mean(0)) / np.sqrt(f.var(0) + 1e-6)
    logits = z @ kernel + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    p /= len(labels)
    return z.T @ p, p.sum(0)


def test_probe_batchnorm_normalises_each_micro_batch():
    """The probe's BatchNorm sees one micro-batch at a time (as the official
    linear probe with ``--accum_iter``), so with micro-batches of different
    statistics the update is LARS on the mean of the per-micro-batch
    gradients, each normalised by its own mean and variance: checked against
    numpy, and against the (measurably different) big-batch normalisation."""
    b, lr, trust = 8, 1.0, 0.1  # a large trust ratio: the kernel's step is 10% of its norm
    model = probe_head()
    model.compile(LARS(lr, trust_coefficient=trust, accum_steps=K), LOSS)
    kernel, bias = (to_np(v).astype("float64") for v in (model.get_layer("head").kernel, model.get_layer("head").bias))
    rng = np.random.default_rng(3)
    features = np.concatenate([rng.normal(size=(b, FEATURE_DIM)), 3.0 * rng.normal(size=(b, FEATURE_DIM)) + 1.0])
    features = features.astype("float32")
    labels = rng.integers(0, 10, size=2 * b)
    model.fit(features, labels, batch_size=b, shuffle=False, verbose=0)
    got = [to_np(v) for v in (model.get_layer("head").kernel, model.get_layer("head").bias)]

    def lars_step(g_kernel, g_bias):  # first step, momentum buffer empty, no decay
        return [kernel - lr * trust * np.linalg.norm(kernel) / np.linalg.norm(g_kernel) * g_kernel, bias - lr * g_bias]

    micro = [probe_gradients(features[s], labels[s], kernel, bias) for s in (slice(0, b), slice(b, 2 * b))]
    per_micro_batch = lars_step(*[(p + q) / 2 for p, q in zip(*micro)])
    whole_batch = lars_step(*probe_gradients(features, labels, kernel, bias))
    for start, want, have in zip((kernel, bias), per_micro_batch, got):
        assert rel_err(want, have) < RTOL
        assert rel_err(want - start, have - start) < 1e-4  # the step itself, not only the weights
    steps_off = [rel_err(other - start, have - start) for start, other, have in zip((kernel, bias), whole_batch, got)]
    assert max(steps_off) > 1e-2, steps_off


# ---------------------------------------------------------------------------
# The schedule and the step count are in updates
# ---------------------------------------------------------------------------


PLAIN = {
    "adamw": lambda lr, k: AdamW(lr, weight_decay=0.0, accum_steps=k),
    "lars": lambda lr, k: LARS(lr, momentum=0.0, accum_steps=k),
    "layer_decay": lambda lr, k: LayerDecayAdamW(lr, weight_decay=0.0, accum_steps=k),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_schedule_and_iterations_count_updates(name):
    """K=2 for 3 updates (6 micro-batches): after each micro-batch,
    ``iterations`` is micro-batches // K and ``learning_rate`` (the next
    update's) is the schedule at it. A bias trained on ``|bias - 100|`` has the
    gradient -1 on every micro-batch, which Adam normalises to 1 and LARS
    without momentum keeps, so each update moves it by its own lr: after u
    updates it is ``s(0) + ... + s(u - 1)``, the lr each update really used."""
    s = schedule(0.1)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(PLAIN[name](s, K), "mean_absolute_error")
    log = []

    class Log(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            lr, bias = self.model.optimizer.learning_rate, self.model.layers[0].bias
            log.append((iterations(self.model), float(to_np(lr)), float(to_np(bias)[0])))

    b = 2
    model.fit(
        np.zeros((6 * b, 1), "float32"),
        np.full((6 * b, 1), 100.0, "float32"),
        batch_size=b,
        shuffle=False,
        verbose=0,
        callbacks=[Log()],
    )
    steps = [entry[0] for entry in log]
    assert steps == [1 // K, 2 // K, 3 // K, 4 // K, 5 // K, 6 // K] == [0, 1, 1, 2, 2, 3]
    lr = [float(to_np(s(u))) for u in range(4)]
    np.testing.assert_allclose([entry[1] for entry in log], [lr[u] for u in steps], rtol=1e-6)
    assert lr[1] != lr[3]  # the lr after each update differs from the one at the micro-batch count
    walked = np.cumsum([0.0] + lr)
    # rtol 1e-4: Adam's bias correction 1 - beta_2**t, in float32, is off by ~3e-5 at t = 2 (0.999**2 rounded)
    np.testing.assert_allclose([entry[2] for entry in log], [walked[u] for u in steps], rtol=1e-4, atol=1e-9)


# ---------------------------------------------------------------------------
# Configuration and resuming
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_accum_steps_serialises_and_is_validated(name):
    opt = PLAIN[name](schedule(1e-3), 3)
    config = opt.get_config()
    assert config["accum_steps"] == 3
    assert type(opt).from_config(config).accum_steps == 3
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(clone) is type(opt) and clone.accum_steps == 3
    assert type(opt)().accum_steps == 1
    for bad in (0, -2, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="accum_steps"):
            PLAIN[name](1e-3, bad)


def test_recipe_helpers_pass_accum_steps():
    model = ViTClassifier(ViTEncoder.from_preset("vit_test"), num_classes=10, pool="avg")
    assert adamw(model, 1e-3, accum_steps=4).accum_steps == 4
    assert finetune_adamw(model, 1e-3, accum_steps=4).accum_steps == 4
    assert adamw(model, 1e-3).accum_steps == finetune_adamw(model, 1e-3).accum_steps == 1


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_mid_cycle(name, tmp_path):
    """A run stopped after micro-batch 1 of a cycle: ``save_weights`` keeps
    the optimizer's variables, the accumulators and the micro-batch count among
    them (what ``BackupAndRestore`` saves and restores), so a fresh model that
    loads them and goes on makes the same updates as an uninterrupted run."""
    b = 4

    def mlp():
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])

    def compile_kwargs(model, k):
        return dict(optimizer=make_optimizer(name, model, k, schedule(0.1)), loss=LOSS)

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(4 * b, 6)).astype("float32"), rng.integers(0, 3, size=4 * b)
    straight, interrupted = twins(mlp, compile_kwargs, (K, K))
    straight.fit(x, y, batch_size=b, shuffle=False, verbose=0)  # 4 micro-batches, 2 updates
    interrupted.fit(x[:b], y[:b], batch_size=b, verbose=0)  # half a cycle
    assert iterations(interrupted) == 0
    path = str(tmp_path / "mid_cycle.weights.h5")
    interrupted.save_weights(path)

    resumed = mlp()  # other initial weights: everything comes from the file
    resumed.compile(**compile_kwargs(resumed, K))
    resumed.optimizer.build(resumed.trainable_variables)  # as BackupAndRestore does before loading
    resumed.load_weights(path)
    resumed.fit(x[b:], y[b:], batch_size=b, shuffle=False, verbose=0)  # micro-batches 2, 3, 4
    assert iterations(resumed) == iterations(straight) == 2
    assert_same_state(straight, resumed, "after resuming")


@pytest.mark.parametrize("accum_steps", [1, 2])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_apply_takes_numpy_gradients(name, accum_steps):
    """``optimizer.apply`` with numpy gradients (as a user may call it) on
    every backend, the PyTorch fused kernels included."""
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    grads = [np.ones((4, 3), "float32"), np.ones(3, "float32")]
    before = [keras.ops.convert_to_numpy(w) for w in dense.trainable_weights]
    opt = make_optimizer(name, dense, accum_steps, learning_rate=0.1)
    for _ in range(accum_steps):
        opt.apply(grads, dense.trainable_weights)
    after = [keras.ops.convert_to_numpy(w) for w in dense.trainable_weights]
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 1
    assert max(float(np.abs(a - b).max()) for a, b in zip(before, after)) > 0
