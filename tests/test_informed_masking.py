"""Self-guided informed masking: exact counts, the intended cluster, hints, the
epoch switch inside compiled training, serialization and the recipe flags."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_lcmae import LCMAE, MAE, TransformerDecoder, ViTEncoder
from keras_lcmae.callbacks import InformedMaskingSchedule, pretrain_callbacks
from keras_lcmae.clustering import bipartition
from keras_lcmae.masking import (
    RandomMasking,
    SelfGuidedMasking,
    informed_masking,
    informed_noise,
    num_hints,
    num_visible,
    random_masking,
)
from tests.helpers import assert_config_mirrors_init, to_np


def np_informed_mask(assignments, ratio, hint_ratio, u):
    """The documented rule re-derived in numpy: hints = the H cluster patches
    with the smallest u; then visible = first K of (hints, non-cluster by u,
    cluster by u)."""
    b, n = assignments.shape
    keep = int(n * (1 - ratio))
    h_req = int(round(hint_ratio * (n - keep)))
    masks = np.ones((b, n))
    hints = np.zeros((b, n), bool)
    for r in range(b):
        c = assignments[r] == 1
        h = min(h_req, c.sum(), keep)
        cl = np.where(c)[0]
        hint_ids = cl[np.argsort(u[r, cl], kind="stable")[:h]]
        hints[r, hint_ids] = True
        level = np.where(hints[r], 0, np.where(c, 2, 1))
        order = np.lexsort((u[r], level))
        masks[r, order[:keep]] = 0
    return masks, hints


def expected_counts(n, ratio, hint_ratio, size):
    keep = num_visible(n, ratio)
    m = n - keep
    h = min(num_hints(n, ratio, hint_ratio), size, keep)
    return keep, m, h


@pytest.mark.parametrize(
    "n,ratio,hint_ratio",
    [(16, 0.75, 0.0), (16, 0.5, 0.2), (49, 0.75, 0.05), (64, 0.9, 0.1), (64, 0.3, 0.25), (50, 0.55, 0.05)],
)
def test_exact_ratio_cluster_first_and_hints(rng, n, ratio, hint_ratio):
    b = 40
    # cluster sizes from 0 to n: smaller and larger than the masked budget
    sizes = np.linspace(0, n, b).astype(int)
    assignments = np.zeros((b, n), "int32")
    for r, s in enumerate(sizes):
        assignments[r, rng.permutation(n)[:s]] = 1
    u = rng.random((b, n)).astype("float32")
    x = rng.normal(size=(b, n, 4)).astype("float32")
    out = informed_masking(x, ratio, assignments, hint_ratio=hint_ratio, noise=u)
    mask = to_np(out["mask"])
    ref_mask, ref_hints = np_informed_mask(assignments, ratio, hint_ratio, u)
    np.testing.assert_array_equal(mask, ref_mask)
    for r, s in enumerate(sizes):
        keep, m, h = expected_counts(n, ratio, hint_ratio, s)
        c = assignments[r] == 1
        assert mask[r].sum() == m  # exact ratio, always
        assert mask[r][c].sum() == min(m, s - h)  # the cluster is masked first, minus the hints
        assert (1 - mask[r][c]).sum() == max(h, s - m)  # visible cluster patches: hints or the excess
        assert ref_hints[r].sum() == h and (mask[r][ref_hints[r]] == 0).all()  # hints: visible, from the cluster
        if s - h <= m:
            assert (mask[r][c & ~ref_hints[r]] == 1).all()
    # official semantics of the outputs
    ids_restore = to_np(out["ids_restore"])
    keep = num_visible(n, ratio)
    np.testing.assert_array_equal(mask, (ids_restore >= keep).astype("float32"))
    np.testing.assert_array_equal(to_np(out["x_masked"]), np.take_along_axis(x, to_np(out["ids_keep"])[..., None], 1))


def test_hints_and_order_are_random_per_row():
    n, b = 64, 32
    assignments = np.zeros((b, n), "int32")
    assignments[:, :20] = 1  # same cluster everywhere, smaller than the budget of 48
    out = informed_masking(
        np.zeros((b, n, 2), "float32"), 0.75, assignments, hint_ratio=0.1, seed=keras.random.SeedGenerator(1)
    )
    mask = to_np(out["mask"])
    h = num_hints(n, 0.75, 0.1)
    assert h == 5
    np.testing.assert_array_equal((1 - mask[:, :20]).sum(1), h)  # exactly the hints stay visible
    np.testing.assert_array_equal(mask[:, 20:].sum(1), 48 - 15)  # the rest of the budget is filled at random
    assert len({tuple(row) for row in mask}) == b


def test_informed_noise_validates():
    a = np.zeros((2, 16), "int32")
    with pytest.raises(ValueError, match="hint_ratio"):
        informed_noise(a, 0.75, hint_ratio=1.0)
    with pytest.raises(ValueError, match="noise must have shape"):
        informed_noise(a, 0.75, noise=np.zeros((2, 15), "float32"))
    with pytest.raises(ValueError, match="mask_ratio"):
        informed_noise(a, 1.2)


def tiny(cls=MAE, depth=1, **kwargs):
    encoder = ViTEncoder.from_preset("vit_test", depth=depth)  # 32 px, patch 8: 16 patches
    if cls is LCMAE:
        kwargs.setdefault("projector_dim", 16)
    return cls(encoder, TransformerDecoder(hidden_dim=32, depth=1, num_heads=2), **kwargs)


def images(rng, b=4):
    return rng.random((b, 32, 32, 3)).astype("float32")


def assignments_of(model, x):
    return to_np(bipartition(model.masking.guide_features(model, model.encoder.embed(x))))


def test_switch_in_call_random_before_informed_after(rng):
    x = images(rng, 6)
    guided = tiny(depth=2, masking=SelfGuidedMasking(informed_start_epoch=3, hint_ratio=0.1, guide_layer=0), seed=7)
    plain = tiny(depth=2, seed=7)
    assert float(to_np(guided.informed_active)) == 0.0 and plain.informed_active is None
    # before the switch: exactly the official random mask of the same draw
    m_guided = to_np(guided(x, training=False)["mask"])
    np.testing.assert_array_equal(m_guided, to_np(plain(x, training=False)["mask"]))
    reference = random_masking(np.zeros((6, 16, 1), "float32"), 0.75, seed=keras.random.SeedGenerator(7))
    np.testing.assert_array_equal(m_guided, to_np(reference["mask"]))
    # after: the cluster of the guide features is masked first, minus the hints
    guided.informed_active.assign(1.0)
    mask = to_np(guided(x, training=True)["mask"])
    a = assignments_of(guided, x)
    for r in range(len(x)):
        keep, m, h = expected_counts(16, 0.75, 0.1, int(a[r].sum()))
        assert mask[r].sum() == m
        assert mask[r][a[r] == 1].sum() == min(m, a[r].sum() - h)
    assert not np.array_equal(mask, m_guided)
    # explicit noise still gives official random masking
    noise = rng.random((6, 16)).astype("float32")
    np.testing.assert_array_equal(
        to_np(guided(x, noise=noise)["mask"]),
        to_np(random_masking(np.zeros((6, 16, 1), "float32"), 0.75, noise=noise)["mask"]),
    )


def test_guide_layer_picks_the_block(rng):
    x = images(rng, 2)
    model = tiny(depth=2, masking=SelfGuidedMasking(guide_layer=0))
    tokens = model.encoder.embed(x)
    enc = model.encoder
    cls = ops.broadcast_to(enc.cls_token + enc.pos_embed[:, :1, :], (2, 1, enc.hidden_dim))
    expected = enc.blocks[0](ops.concatenate([cls, tokens], axis=1), training=False)[:, 1:]
    np.testing.assert_allclose(to_np(model.masking.guide_features(model, tokens)), to_np(expected), atol=1e-5)
    model.masking.guide_layer = "decoder"
    latent = enc.forward_tokens(tokens, training=False)
    ids = np.tile(np.arange(16, dtype="int32")[None], (2, 1))
    expected = model.decoder(latent, ids, training=False)["hidden"]
    np.testing.assert_allclose(to_np(model.masking.guide_features(model, tokens)), to_np(expected), atol=1e-5)


def test_lcmae_views_mask_the_same_cluster_independently(rng):
    x = images(rng, 3)
    model = tiny(LCMAE, masking=SelfGuidedMasking(hint_ratio=0.1, guide_layer="decoder"), seed=2)
    mask = to_np(model(x, training=True)["mask"])
    a = np.concatenate([assignments_of(model, x)] * 2)
    for r in range(6):
        keep, m, h = expected_counts(16, 0.75, 0.1, int(a[r].sum()))
        assert mask[r].sum() == m and mask[r][a[r] == 1].sum() == min(m, a[r].sum() - h)
    assert not np.array_equal(mask[:3], mask[3:])


class _ActiveProbe(MAE):
    """Reports the switch as seen by the compiled train step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active_tracker = keras.metrics.Mean(name="active")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        self.active_tracker.update_state(ops.convert_to_tensor(self.informed_active))
        return super().compute_loss(x, y, y_pred, sample_weight, training)


def test_fit_switches_mid_run(rng):
    encoder = ViTEncoder.from_preset("vit_test", depth=1)
    model = _ActiveProbe(
        encoder,
        TransformerDecoder(hidden_dim=32, depth=1, num_heads=2),
        masking=SelfGuidedMasking(informed_start_epoch=1),
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seen.append(float(to_np(model.informed_active)))
    )
    history = model.fit(
        images(rng, 8), batch_size=4, epochs=2, verbose=0, callbacks=[InformedMaskingSchedule(), record]
    )
    assert seen == [0.0, 1.0]
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["active"] == [0.0, 1.0]  # the compiled step read the new value


def test_schedule_needs_a_self_guided_model(rng):
    model = tiny()
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="SelfGuidedMasking"):
        model.fit(images(rng), batch_size=4, epochs=1, verbose=0, callbacks=[InformedMaskingSchedule()])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(masking="smart"), "masking must be a strategy"),
        (dict(hint_ratio=1.0), "hint_ratio"),
        (dict(guide_layer=5), "guide_layer"),
        (dict(guide_layer="encoder"), "guide_layer"),
        (dict(informed_start_epoch=-1), "informed_start_epoch"),
        (dict(informed_start_epoch=1.5), "informed_start_epoch"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        if "masking" in kwargs:
            tiny(**kwargs)
        else:
            tiny(masking=SelfGuidedMasking(**kwargs))


def test_a_strategy_belongs_to_one_model():
    strategy = SelfGuidedMasking()
    tiny(masking=strategy)
    with pytest.raises(ValueError, match="another model"):
        tiny(masking=strategy)


def test_legacy_arguments_warn_and_build_the_strategy():
    with pytest.warns(DeprecationWarning, match="SelfGuidedMasking"):
        model = tiny(masking="self_guided", informed_start_epoch=2, hint_ratio=0.1, guide_layer=0)
    assert model.masking == SelfGuidedMasking(informed_start_epoch=2, hint_ratio=0.1, guide_layer=0)
    assert float(to_np(model.informed_active)) == 0.0
    with pytest.raises(ValueError, match="only apply to masking='self_guided'"):
        tiny(masking=RandomMasking(), hint_ratio=0.1)


def test_old_configs_load_as_strategies():
    """A config written when the self-guided arguments were the model's own."""
    config = tiny(MAE).get_config()
    config.update(masking="self_guided", informed_start_epoch=3, hint_ratio=0.2, guide_layer=0)
    model = MAE.from_config(config)
    assert model.masking == SelfGuidedMasking(informed_start_epoch=3, hint_ratio=0.2, guide_layer=0)
    config.update(masking="random")
    assert MAE.from_config(config).masking == RandomMasking()


def test_config_and_keras_round_trip(rng, tmp_path):
    cls = LCMAE
    assert_config_mirrors_init(tiny(MAE, masking=SelfGuidedMasking(guide_layer=-1)))
    model = tiny(cls, masking=SelfGuidedMasking(informed_start_epoch=2, hint_ratio=0.1, guide_layer="decoder"), seed=3)
    clone = assert_config_mirrors_init(model)
    assert clone.masking == SelfGuidedMasking(informed_start_epoch=2, hint_ratio=0.1, guide_layer="decoder")
    assert clone.masking is not model.masking
    model.informed_active.assign(1.0)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.masking, SelfGuidedMasking) and float(to_np(loaded.informed_active)) == 1.0
    x = images(rng, 2)
    noise = rng.random((2, 2, 16)).astype("float32")
    np.testing.assert_allclose(to_np(loaded(x, noise=noise)["pred"]), to_np(model(x, noise=noise)["pred"]), atol=1e-5)
    assert_config_mirrors_init(tiny(MAE))  # the default random models too
    assert_config_mirrors_init(tiny(LCMAE))


@pytest.mark.tf_only
def test_pretrain_callbacks_add_the_schedule_only_when_self_guided(tmp_path):
    from keras_lcmae.optim import WarmupCosine

    schedule = WarmupCosine(1e-3, 1, 10)
    kinds = lambda m: [type(c).__name__ for c in pretrain_callbacks(str(tmp_path), m, schedule, 4)]  # noqa: E731
    assert "InformedMaskingSchedule" in kinds(tiny(masking=SelfGuidedMasking()))
    assert "InformedMaskingSchedule" not in kinds(tiny())


@pytest.mark.tf_only
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--masking=self_guided", "--hint_ratio=1.5"], "--hint_ratio"),
        (["--masking=self_guided", "--informed_start_epoch=5", "--epochs=5"], "--informed_start_epoch"),
        (["--masking=self_guided", "--guide_layer=7"], "--guide_layer"),
        (["--masking=self_guided", "--guide_layer=last"], "--guide_layer"),
    ],
)
def test_recipe_flags_validated(flags, message):
    import sys

    from absl import app
    from absl import flags as absl_flags

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))
    import pretrain

    base = ["pretrain", "--data=fashion_mnist", "--image_size=32", "--patch_size=8", "--model=vit_test"]
    pretrain.FLAGS.unparse_flags()
    try:
        with pytest.raises((app.UsageError, absl_flags.IllegalFlagValueError), match=message):
            pretrain.FLAGS(base + flags)  # ranges are checked as the flags are parsed, the rest after
            pretrain.validate_flags()
        pretrain.FLAGS.unparse_flags()
        pretrain.FLAGS(
            base + ["--masking=self_guided", "--guide_layer=decoder", "--epochs=3", "--informed_start_epoch=1"]
        )
        pretrain.validate_flags()  # a valid combination passes
    finally:
        pretrain.FLAGS.unparse_flags()
