"""Self-guided informed masking: exact counts, the intended cluster, hints, the
epoch switch inside compiled training, serialization and the recipe flags."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_lcmae import LCMAE, MAE, TransformerDecoder, ViTEncoder
from keras_lcmae.callbacks import InformedMaskingSchedule, pretrain_callbacks
from keras_lcmae.clustering import bipartition, main_object, object_scores
from keras_lcmae.masking import (
    AUTO_START_FRACTION,
    RandomMasking,
    SelfGuidedMasking,
    informed_masking,
    informed_noise,
    num_hints,
    num_visible,
    random_masking,
)
from tests.helpers import assert_config_mirrors_init, to_np


def np_hint_keys(scores, u):
    """Similarity hints, re-derived: the Efraimidis-Spirakis keys log(u) / w,
    w = clip((1 + score) / 2, 1e-3, 1); the largest keys are the hints."""
    w = np.clip((1.0 + scores.astype("float64")) / 2.0, 1e-3, 1.0)
    return np.log(np.maximum(u.astype("float64"), 1e-12)) / w


def np_informed_mask(assignments, ratio, hint_ratio, u, scores=None, strategy="random"):
    """The documented rule re-derived in numpy: hints = H cluster patches
    (random: the smallest u; similarity: the largest keys of np_hint_keys);
    then visible = first K of (hints, non-cluster, cluster), each level in
    ascending order of scores + 1e-6 u (of u without scores). Returns the
    masks, the hints and the rows whose hint draw has a float near-tie at
    its cut (where float32 and float64 may disagree)."""
    b, n = assignments.shape
    keep = int(n * (1 - ratio))
    h_req = int(round(hint_ratio * (n - keep)))
    masks = np.ones((b, n))
    hints = np.zeros((b, n), bool)
    near_tie = np.zeros(b, bool)
    for r in range(b):
        c = assignments[r] == 1
        h = min(h_req, c.sum(), keep)
        cl = np.where(c)[0]
        key = -u[r].astype("float64") if strategy == "random" else np_hint_keys(scores[r], u[r])
        ranked = cl[np.argsort(-key[cl], kind="stable")]
        hints[r, ranked[:h]] = True
        if strategy == "similarity" and 0 < h < len(ranked):
            a, z = key[ranked[h - 1]], key[ranked[h]]
            near_tie[r] = abs(a - z) <= 1e-4 * max(1.0, abs(a))
        level = np.where(hints[r], 0, np.where(c, 2, 1))
        within = u[r] if scores is None else scores[r].astype("float32") + np.float32(1e-6) * u[r].astype("float32")
        order = np.lexsort((within, level))
        masks[r, order[:keep]] = 0
    return masks, hints, near_tie


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
    ref_mask, ref_hints, _ = np_informed_mask(assignments, ratio, hint_ratio, u)
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
    """The side masked first: the object of the split of the guide features."""
    return to_np(model.masking.plan(model, model.encoder.embed(x))[0])


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
    model = tiny(
        LCMAE, masking=SelfGuidedMasking(informed_start_epoch=0, hint_ratio=0.1, guide_layer="decoder"), seed=2
    )
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
    assert model.masking == SelfGuidedMasking(
        informed_start_epoch=2, hint_ratio=0.1, guide_layer=0, hint_strategy="random"
    )  # the defaults of the time: random hints
    assert float(to_np(model.informed_active)) == 0.0
    with pytest.warns(DeprecationWarning):
        assert tiny(masking="self_guided", hint_ratio=0.1).masking.informed_start_epoch == 0
    with pytest.raises(ValueError, match="only apply to masking='self_guided'"):
        tiny(masking=RandomMasking(), hint_ratio=0.1)


def test_old_configs_load_as_strategies():
    """A config written when the self-guided arguments were the model's own."""
    config = tiny(MAE).get_config()
    config.update(masking="self_guided", informed_start_epoch=3, hint_ratio=0.2, guide_layer=0)
    model = MAE.from_config(config)
    assert model.masking == SelfGuidedMasking(
        informed_start_epoch=3, hint_ratio=0.2, guide_layer=0, hint_strategy="random"
    )
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
        (["--masking=self_guided", "--epochs=1"], "--informed_start_epoch: the default start"),
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


# -- the masking order and the hints ------------------------------------------------


@pytest.mark.parametrize("strategy", ["random", "similarity"])
@pytest.mark.parametrize("n,ratio,hint_ratio", [(16, 0.75, 0.2), (64, 0.75, 0.05), (64, 0.6, 0.25), (49, 0.9, 0.1)])
def test_scored_order_and_hints_match_numpy(rng, strategy, n, ratio, hint_ratio):
    b = 48
    sizes = np.linspace(0, n, b).astype(int)
    assignments = np.zeros((b, n), "int32")
    for r, size in enumerate(sizes):
        assignments[r, rng.permutation(n)[:size]] = 1
    u = rng.random((b, n)).astype("float32")
    scores = rng.uniform(-1, 1, (b, n)).astype("float32")
    scores[:4] = 0.25  # exact ties: broken by u
    out = informed_masking(
        rng.normal(size=(b, n, 3)).astype("float32"),
        ratio,
        assignments,
        hint_ratio=hint_ratio,
        noise=u,
        scores=scores,
        hint_strategy=strategy,
    )
    mask = to_np(out["mask"])
    ref_mask, ref_hints, near_tie = np_informed_mask(assignments, ratio, hint_ratio, u, scores, strategy)
    assert near_tie.sum() <= 2
    np.testing.assert_array_equal(mask[~near_tie], ref_mask[~near_tie])
    keep = num_visible(n, ratio)
    for r, size in enumerate(sizes):
        _, m, h = expected_counts(n, ratio, hint_ratio, size)
        c = assignments[r] == 1
        assert mask[r].sum() == m and mask[r][c].sum() == min(m, size - h)
        if near_tie[r]:
            continue
        # the order: inside each side, every masked patch scores at least as high as every visible one
        for side in (c & ~ref_hints[r], ~c):
            if mask[r][side].all() or not mask[r][side].any():
                continue
            assert scores[r][side][mask[r][side] == 1].min() >= scores[r][side][mask[r][side] == 0].max()
    np.testing.assert_array_equal(mask, (to_np(out["ids_restore"]) >= keep).astype("float32"))


def test_similarity_hints_are_drawn_in_proportion_to_their_weight(rng):
    n, b = 16, 4000
    assignments = np.zeros((b, n), "int32")
    assignments[:, :8] = 1  # 8 cluster patches, masked budget 12: one hint per row at hint_ratio 0.1
    scores = np.tile(np.concatenate([np.linspace(-0.9, 1.0, 8), np.zeros(8)])[None], (b, 1)).astype("float32")
    assert num_hints(n, 0.75, 0.1) == 1
    out = informed_masking(
        np.zeros((b, n, 1), "float32"),
        0.75,
        assignments,
        hint_ratio=0.1,
        seed=keras.random.SeedGenerator(3),
        scores=scores,
        hint_strategy="similarity",
    )
    visible = 1 - to_np(out["mask"])
    np.testing.assert_array_equal(visible[:, :8].sum(1), 1)  # exactly one hint, from the cluster
    w = (1 + scores[0, :8]) / 2
    np.testing.assert_allclose(visible[:, :8].mean(0), w / w.sum(), atol=0.025)


def test_informed_noise_rejects_similarity_hints_without_scores():
    with pytest.raises(ValueError, match="scores"):
        informed_noise(np.zeros((1, 16), "int32"), 0.75, hint_strategy="similarity")
    with pytest.raises(ValueError, match="hint_strategy"):
        informed_noise(np.zeros((1, 16), "int32"), 0.75, hint_strategy="best")
    with pytest.raises(ValueError, match="scores must have shape"):
        informed_noise(np.zeros((1, 16), "int32"), 0.75, scores=np.zeros((1, 15), "float32"))


def np_similarity_score(f):
    f = f / (np.linalg.norm(f, axis=-1, keepdims=True) + 1e-6)
    mean = f.mean(1, keepdims=True)
    mean = mean / (np.linalg.norm(mean, axis=-1, keepdims=True) + 1e-6)
    return (f * mean).sum(-1)


def np_main_object(features, assignments, grid):
    """The boundary-prior rule re-derived: the side with the smaller share of
    its patches on the outer ring; equal shares: the lower mean similarity
    score; an empty side: all ones."""
    rows, cols = grid
    ring = np.zeros((rows, cols), bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    ring = ring.reshape(-1)
    s = np_similarity_score(features.astype("float64"))
    out = np.array(assignments)
    for r in range(len(out)):
        one = out[r] == 1
        if not one.any():
            out[r] = 1
            continue
        if one.all():
            continue
        share1, share0 = ring[one].mean(), ring[~one].mean()
        zero_is_object = s[r][~one].mean() < s[r][one].mean() if abs(share1 - share0) <= 1e-6 else share0 < share1
        if zero_is_object:
            out[r] = 1 - out[r]
    return out


def planted(grid, object_cells, rng, flip=False):
    """Features with an object (direction e0) on ``object_cells`` and the
    background (e1) elsewhere, slightly noisy; the split labels the object 0
    unless ``flip``."""
    n = grid[0] * grid[1]
    f = np.tile(np.eye(4, dtype="float32")[1], (n, 1))
    obj = np.zeros(n, bool)
    obj[object_cells] = True
    f[obj] = np.eye(4, dtype="float32")[0]
    f = f + 0.05 * rng.normal(size=f.shape).astype("float32")
    labels = (~obj if not flip else obj).astype("int32")
    return f[None], labels[None], obj


@pytest.mark.parametrize("flip", [False, True])
def test_main_object_does_not_depend_on_which_side_is_larger(rng, flip):
    grid = (8, 8)
    cells = np.arange(64).reshape(8, 8)
    cases = {
        "small object": cells[3:5, 3:5].reshape(-1),  # 4 of 64
        "large object": cells[1:7, 1:7].reshape(-1),  # 36 of 64: larger than the background
        "tall object": cells[:, 2:7].reshape(-1),  # 40 of 64, touching the top and bottom rows
    }
    for name, object_cells in cases.items():
        f, labels, obj = planted(grid, object_cells, rng, flip)
        found = to_np(main_object(f, labels, grid))[0].astype(bool)
        np.testing.assert_array_equal(found, obj, err_msg=name)
        np.testing.assert_array_equal(to_np(main_object(f, labels, grid)), np_main_object(f, labels, grid))
        # the split the library finds on these features gives the same object
        np.testing.assert_array_equal(to_np(main_object(f, bipartition(f), grid))[0].astype(bool), obj, err_msg=name)
        scores = to_np(object_scores(f, obj[None].astype("int32")))[0]
        assert scores[obj].min() > scores[~obj].max(), name  # the object scores higher


def test_main_object_and_scores_match_numpy(rng):
    grid = (4, 6)
    f = rng.normal(size=(12, 24, 5)).astype("float32")
    a = (rng.random((12, 24)) < 0.4).astype("int32")
    a[0] = 0  # an empty side
    a[1] = 1
    np.testing.assert_array_equal(to_np(main_object(f, a, grid)), np_main_object(f, a, grid))
    # no interior (2 rows): every share ties, the lower similarity score decides
    f2, a2 = f[:, :12], a[:, :12]
    np.testing.assert_array_equal(to_np(main_object(f2, a2, (2, 6))), np_main_object(f2, a2, (2, 6)))
    objects = np_main_object(f, a, grid)
    fn = f.astype("float64") / (np.linalg.norm(f.astype("float64"), axis=-1, keepdims=True) + 1e-6)
    expected = np.zeros(objects.shape)
    for r in range(len(f)):
        w = objects[r] if objects[r].any() else np.ones(objects.shape[1])
        center = (fn[r] * w[:, None]).sum(0)
        expected[r] = fn[r] @ (center / (np.linalg.norm(center) + 1e-6))
    np.testing.assert_allclose(to_np(object_scores(f, objects)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="grid_size"):
        main_object(f, a, (5, 5))


def test_strategy_masks_follow_the_plan(rng):
    """End to end inside the model: the mask equals the numpy rule applied to
    the model's own objects and scores."""
    x = images(rng, 5)
    model = tiny(depth=2, masking=SelfGuidedMasking(informed_start_epoch=0, hint_ratio=0.2, guide_layer=-1), seed=4)
    tokens = model.encoder.embed(x)
    features = to_np(model.masking.guide_features(model, tokens))
    objects = np_main_object(features, to_np(bipartition(features)), model.encoder.grid_size)
    np.testing.assert_array_equal(to_np(model.masking.plan(model, tokens)[0]), objects)
    scores = to_np(model.masking.plan(model, tokens)[1])
    u = rng.random((5, 16)).astype("float32")
    noise = informed_noise(objects, 0.75, 0.2, noise=u, scores=scores, hint_strategy="similarity")
    mask = to_np(random_masking(np.zeros((5, 16, 1), "float32"), 0.75, noise=noise)["mask"])
    ref, _, near_tie = np_informed_mask(objects, 0.75, 0.2, u, scores, "similarity")
    np.testing.assert_array_equal(mask[~near_tie], ref[~near_tie])


def foreground(images, patch):
    b, h, w, _ = images.shape
    p = images[..., 0].reshape(b, h // patch, patch, w // patch, patch).transpose(0, 1, 3, 2, 4)
    return p.reshape(b, -1, patch * patch).max(-1) > 0.1


def test_informed_masks_cover_the_fashion_mnist_object(fmnist):
    """After a short run, the informed masks hold more object patches than
    random masks of the same images, with the object the model finds itself."""
    x, _ = fmnist
    keras.utils.set_random_seed(0)
    encoder = ViTEncoder(image_size=32, patch_size=4, num_channels=3, hidden_dim=32, depth=2, num_heads=2)
    model = MAE(
        encoder,
        TransformerDecoder(hidden_dim=32, depth=1, num_heads=2),
        masking=SelfGuidedMasking(informed_start_epoch=0, hint_ratio=0.05),
        seed=0,
    )
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    model.fit(x, batch_size=40, epochs=1, verbose=0, callbacks=[InformedMaskingSchedule()])
    assert float(to_np(model.informed_active)) == 1.0
    u = np.random.default_rng(1).random((len(x), 64)).astype("float32")
    rnd = to_np(random_masking(np.zeros((len(x), 64, 1), "float32"), 0.75, noise=u)["mask"])
    objects, scores = model.masking.plan(model, model.encoder.embed(x))
    noise = informed_noise(objects, 0.75, 0.05, noise=u, scores=scores, hint_strategy="similarity")
    inf = to_np(random_masking(np.zeros((len(x), 64, 1), "float32"), 0.75, noise=noise)["mask"])
    fg = foreground(x, 4)
    share_informed = (fg * inf).sum(1) / inf.sum(1)
    share_random = (fg * rnd).sum(1) / rnd.sum(1)
    assert share_informed.mean() > share_random.mean() + 0.04, (share_informed.mean(), share_random.mean())
    # the found object is mostly object: the boundary prior picks the right side
    found = to_np(objects).astype(bool)
    assert (fg & found).sum() / found.sum() > 0.85


def test_default_start_waits_for_the_clustering(rng):
    strategy = SelfGuidedMasking()
    assert strategy.informed_start_epoch is None and strategy.hint_strategy == "similarity"
    assert strategy.start_epoch(8) == int(np.ceil(AUTO_START_FRACTION * 8))
    assert strategy.start_epoch(None) is None
    model = tiny(masking=strategy)
    assert float(to_np(model.informed_active)) == 0.0  # random masks until the schedule says so
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seen.append(float(to_np(model.informed_active)))
    )
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    model.fit(images(rng, 4), batch_size=4, epochs=4, verbose=0, callbacks=[record])  # fit adds the schedule
    start = int(np.ceil(AUTO_START_FRACTION * 4))
    assert seen == [0.0] * start + [1.0] * (4 - start)


def test_configs_without_a_hint_strategy_keep_random_hints():
    """Models saved before hint strategies existed were trained with random hints."""
    old = {"informed_start_epoch": 2, "hint_ratio": 0.1, "guide_layer": 0}
    assert SelfGuidedMasking.from_config(old).hint_strategy == "random"
    assert SelfGuidedMasking.from_config(SelfGuidedMasking().get_config()) == SelfGuidedMasking()
