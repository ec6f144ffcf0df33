"""keras_lcmae.analysis (LC-MAE Sec. 4 metrics), tools/analyze.py and
tools/mask_ratio_sweep.py."""

import csv
import importlib.util
import os
import shutil
import sys

import keras
import numpy as np
import pytest

from keras_lcmae import LCMAE, MAE, TransformerDecoder, ViTEncoder
from keras_lcmae.analysis import (
    attention_distance,
    attention_similarity,
    decoder_layers,
    encoder_layers,
    mean_pairwise_distance,
    pairwise_patch_distances,
    patch_centers,
    resize_token_grid,
    semantic_similarity,
    shared_noise,
    similarity_weights,
)
from keras_lcmae.analysis.metrics import attention_vectors, similarity_from_sums
from tests.helpers import to_np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_mae(cls=MAE, patch_size=8, channels=3, **kwargs):
    encoder = ViTEncoder(
        image_size=32, patch_size=patch_size, num_channels=channels, hidden_dim=32, depth=2, num_heads=2
    )
    decoder = TransformerDecoder(hidden_dim=32, depth=2, num_heads=2)
    return cls(encoder, decoder, mask_ratio=0.75, seed=0, **kwargs)


# --------------------------------------------------------------------------- metrics, analytic
def test_patch_centres_and_distances_in_pixels():
    c = patch_centers((2, 3), 4)
    assert c.tolist() == [[2, 2], [2, 6], [2, 10], [6, 2], [6, 6], [6, 10]]
    d = pairwise_patch_distances((2, 3), 4)
    assert d[0, 5] == pytest.approx(np.hypot(4, 8))
    sub = pairwise_patch_distances((2, 3), 4, positions=np.array([[5, 0]]))
    assert sub[0, 0, 1] == pytest.approx(np.hypot(4, 8)) and sub[0, 0, 0] == 0


def test_self_attention_has_distance_zero():
    b, h, n = 2, 3, 16
    a = np.zeros((b, h, 1 + n, 1 + n))
    a[:, :, np.arange(1 + n), np.arange(1 + n)] = 1.0
    assert np.allclose(attention_distance(a, (4, 4), 8), 0.0)


def test_uniform_attention_gives_mean_pairwise_distance():
    grid, p = (4, 4), 8
    n = 16
    a = np.full((2, 2, 1 + n, 1 + n), 1.0 / (1 + n))  # uniform, some mass on [CLS]
    centres = np.array([[(r + 0.5) * p, (c + 0.5) * p] for r in range(4) for c in range(4)])
    expected = np.mean(np.linalg.norm(centres[:, None] - centres[None], axis=-1))
    assert np.allclose(attention_distance(a, grid, p), expected)
    assert mean_pairwise_distance(grid, p) == pytest.approx(expected)


def test_cls_mass_is_removed_not_counted_as_zero_distance():
    n = 4
    a = np.zeros((1, 1, 1 + n, 1 + n))
    a[0, 0, 1:, 0] = 0.9  # most weight on [CLS]
    a[0, 0, 1, 4] = a[0, 0, 4, 1] = 0.1  # corners of a 2x2 grid look at each other
    a[0, 0, 2, 3] = a[0, 0, 3, 2] = 0.1
    a[0, 0, 0, 0] = 1.0
    # every query's remaining weight is on a diagonal neighbour: sqrt(2) * p
    assert attention_distance(a, (2, 2), 4)[0] == pytest.approx(np.sqrt(2) * 4)


def test_distance_with_visible_positions_and_query_mask():
    # two tokens that are patches 0 and 15 of a 4x4 grid, each attending to the other
    a = np.zeros((1, 1, 3, 3))
    a[0, 0, 0, 0] = 1
    a[0, 0, 1, 2] = a[0, 0, 2, 1] = 1
    d = attention_distance(a, (4, 4), 8, positions=np.array([[0, 15]]))
    assert d[0] == pytest.approx(np.hypot(24, 24))
    b = np.zeros((1, 1, 17, 17))
    b[0, 0, :, 0] = 1
    b[0, 0, 1, 1] = 1  # patch 0 looks at itself
    b[0, 0, 2:, 1] = 1  # every other patch looks at patch 0
    qmask = np.zeros((1, 16))
    qmask[0, 0] = 1
    assert attention_distance(b, (4, 4), 8, query_mask=qmask)[0] == 0
    with pytest.raises(ValueError, match="positions"):
        attention_distance(a, (4, 4), 8)


def test_attention_similarity_identical_and_different_maps():
    rng = np.random.default_rng(0)
    a = rng.random((1, 2, 17, 17))
    a /= a.sum(-1, keepdims=True)
    same = np.repeat(a, 4, axis=0)
    assert attention_similarity(same, [1, 5, 9]) == pytest.approx(1.0)
    b = rng.random((4, 2, 17, 17))
    # independent numpy re-derivation of Eq. 7 (ordered pairs, cls column dropped)
    rows = b[:, :, 1 + np.array([1, 5, 9]), 1:].reshape(4, -1)
    cos = [
        rows[i] @ rows[j] / np.linalg.norm(rows[i]) / np.linalg.norm(rows[j])
        for i in range(4)
        for j in range(4)
        if i != j
    ]
    assert attention_similarity(b, [1, 5, 9]) == pytest.approx(np.mean(cos))
    rows_cls = b[:, :, 1 + np.array([1, 5, 9]), :].reshape(4, -1)
    cos = [
        rows_cls[i] @ rows_cls[j] / np.linalg.norm(rows_cls[i]) / np.linalg.norm(rows_cls[j])
        for i in range(4)
        for j in range(4)
        if i != j
    ]
    assert attention_similarity(b, [1, 5, 9], include_cls=True) == pytest.approx(np.mean(cos))
    # accumulating over batches gives the same value
    u = attention_vectors(b, [1, 5, 9])
    assert similarity_from_sums(u[:2].sum(0) + u[2:].sum(0), 4) == pytest.approx(attention_similarity(b, [1, 5, 9]))
    with pytest.raises(ValueError, match="at least 2 images"):
        attention_similarity(b[:1], [1])


def test_semantic_similarity():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(3, 16, 8))
    assert semantic_similarity(f, f) == pytest.approx(1.0)
    # invariant to the width and to any rotation of the feature space
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert semantic_similarity(f, f @ q) == pytest.approx(1.0)
    g = rng.normal(size=(3, 16, 5))
    w1, w2 = similarity_weights(f), similarity_weights(g)
    expected = np.mean([np.sum(w1[i] * w2[i]) / np.linalg.norm(w1[i]) / np.linalg.norm(w2[i]) for i in range(3)])
    assert semantic_similarity(f, g) == pytest.approx(expected)
    assert semantic_similarity(f, g) < 0.99
    mm = similarity_weights(g, "minmax")
    assert mm.min() == pytest.approx(0.0) and mm.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="resample"):
        semantic_similarity(f, g[:, :4])


def test_token_relation_kl_is_zero_for_identical_attention_and_matches_the_formula():
    from keras_lcmae.analysis import token_relation_kl

    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(6), size=(2, 3, 6))
    assert token_relation_kl(a, a) == 0.0
    # two patch tokens after [CLS]: reference rows (0.5, 0.5), checkpoint rows (0.9, 0.1) once [CLS] is dropped
    ref = np.zeros((1, 1, 3, 3))
    ref[0, 0, :, 0] = 0.2  # [CLS] column: removed and the rows renormalised
    ref[0, 0, :, 1:] = 0.4
    cur = np.zeros((1, 1, 3, 3))
    cur[0, 0, :, 1:] = [0.9, 0.1]
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert token_relation_kl(cur, ref) == pytest.approx(expected, rel=1e-9)
    assert token_relation_kl(cur, ref, per_head=True).shape == (1,)
    with pytest.raises(ValueError, match="same shape"):
        token_relation_kl(a, a[:, :2])


def test_exploitation_rates_of_a_constructed_attention():
    from keras_lcmae.analysis import exploitation_rates

    # [CLS] + 4 patches; patches 0 and 3 are masked. Masked queries put 0.3 on the visible
    # patches and 0.7 on the mask tokens (and 0.5 on [CLS], removed); visible queries do not count.
    a = np.zeros((2, 2, 5, 5))
    for q in (1, 4):
        a[:, :, q, 0] = 0.5
        a[:, :, q, [2, 3]] = 0.15
        a[:, :, q, [1, 4]] = 0.35
    a[:, :, [0, 2, 3], 1] = 1.0
    mask = np.array([[1, 0, 0, 1]] * 2)
    r = exploitation_rates(a, mask)
    assert r["visible"] == pytest.approx(0.3) and r["mask"] == pytest.approx(0.7)
    assert r["visible_per_token"] == pytest.approx(0.6) and r["mask_per_token"] == pytest.approx(1.4)
    uniform = exploitation_rates(np.full((1, 1, 5, 5), 0.2), np.array([[1, 1, 1, 0]]))
    assert uniform["mask_per_token"] == pytest.approx(1.0) and uniform["visible_per_token"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both masked and visible"):
        exploitation_rates(a, np.ones((2, 4)))


def test_attention_nmi_of_constructed_attention():
    from keras_lcmae.analysis import attention_nmi

    k = 4
    eye = np.zeros((1, 1, k + 1, k + 1))
    eye[0, 0, np.arange(k + 1), np.arange(k + 1)] = 1
    assert attention_nmi(eye) == pytest.approx(1.0)
    assert attention_nmi(np.full((1, 1, k + 1, k + 1), 1 / (k + 1))) == pytest.approx(0.0, abs=1e-12)
    # two groups of two patches, each query uniform over its own group: I = log 2, H(Q) = H(K) = log 4
    block = np.zeros((1, 1, k + 1, k + 1))
    block[0, 0, 0, 1:] = 0.25
    block[0, 0, 1:3, 1:3] = 0.5
    block[0, 0, 3:5, 3:5] = 0.5
    assert attention_nmi(block) == pytest.approx(np.log(2) / np.log(4))
    # every query on one key: H(K) = 0, NMI 0
    one = np.zeros((1, 1, k + 1, k + 1))
    one[0, 0, :, 2] = 1
    assert attention_nmi(one) == 0.0
    assert attention_nmi(np.concatenate([eye, block], axis=1), per_head=True) == pytest.approx([1.0, 0.5])


def test_resize_token_grid_nearest():
    f = np.arange(16.0).reshape(1, 16, 1)  # 4x4
    down = resize_token_grid(f, (4, 4), (2, 2))[0, :, 0]
    assert down.tolist() == [5.0, 7.0, 13.0, 15.0]  # source patch under each destination centre
    up = resize_token_grid(down.reshape(1, 4, 1), (2, 2), (4, 4))[0, :, 0].reshape(4, 4)
    assert up[0].tolist() == [5, 5, 7, 7] and up[3].tolist() == [13, 13, 15, 15]


# --------------------------------------------------------------------------- extraction vs forward
def test_encoder_layers_match_forward(fmnist):
    model = tiny_mae()
    images = fmnist[0][:3]
    out = encoder_layers(model, images)
    expected = to_np(model.encoder(images))
    np.testing.assert_allclose(out["output"], expected, atol=1e-5)
    _, attn = model.encoder.forward_tokens(model.encoder.embed(images), return_attention=True)
    assert len(out["attention"]) == 2
    for a, b in zip(out["attention"], attn):
        np.testing.assert_allclose(a, to_np(b), atol=1e-6)
        assert a.shape == (3, 2, 17, 17)
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
    # visible subset with true positions == the MAE's own masked encoder pass
    noise = np.random.default_rng(0).random((3, 16)).astype("float32")
    latent, _, _ = model.forward_encoder(images, noise)
    ids_keep = np.argsort(noise, axis=1)[:, :4]
    sub = encoder_layers(model, images, ids_keep)
    np.testing.assert_allclose(sub["output"], to_np(latent), atol=1e-5)
    assert sub["positions"].tolist() == ids_keep.tolist()
    d = np.stack([attention_distance(a, (4, 4), 8, positions=sub["positions"]) for a in sub["attention"]])
    assert np.all(d >= 0) and np.all(d <= np.hypot(24, 24) + 1e-6)


@pytest.mark.parametrize("cls", [MAE, LCMAE])
def test_decoder_layers_match_forward(fmnist, cls):
    model = tiny_mae(cls)
    images = fmnist[0][:3]
    noise = shared_noise(3, 16, seed=1)
    out = decoder_layers(model, images, noise)
    ref_noise = (noise, noise) if cls is LCMAE else noise
    expected = model(images, noise=ref_noise, training=False)
    np.testing.assert_allclose(out["pred"], to_np(expected["pred"])[:3], atol=1e-4)
    np.testing.assert_array_equal(out["mask"], to_np(expected["mask"])[:3])
    latent, _, ids_restore = model.forward_encoder(images, noise)
    direct = model.decoder(latent, ids_restore, return_attention=True)
    for a, b in zip(out["attention"], direct["attention"]):
        np.testing.assert_allclose(a, to_np(b), atol=1e-6)
    assert [f.shape for f in out["features"]] == [(3, 16, 32)] * 2
    assert (out["mask"] == out["mask"][0]).all()  # one shared mask
    s = [attention_similarity(a, np.flatnonzero(out["mask"][0])) for a in out["attention"]]
    assert all(0.0 < v <= 1.0 + 1e-9 for v in s)
    # semantic similarity of the model against itself is 1
    assert semantic_similarity(out["features"][1], out["features"][1]) == pytest.approx(1.0)


def test_decoder_layers_rejects_an_encoder():
    with pytest.raises(ValueError, match="encoder analyses"):
        decoder_layers(ViTEncoder.from_preset("vit_test"), np.zeros((1, 32, 32, 3), "float32"), np.zeros((1, 16)))


def test_clustering_metrics_use_the_clustering_module(fmnist):
    from keras_lcmae import clustering
    from keras_lcmae.analysis import clustering_metrics

    feats = encoder_layers(tiny_mae(), fmnist[0][:4])["features"][-1]
    values, assign = clustering_metrics(feats)
    assert assign.shape == (4, 16) and set(np.unique(assign)) <= {0, 1}
    np.testing.assert_array_equal(assign, to_np(clustering.bipartition(feats)))
    assert values["feature_variance"] == pytest.approx(
        float(np.mean(to_np(clustering.feature_variance(feats)))), rel=1e-5
    )
    assert all(np.isfinite(v) for v in values.values())


# --------------------------------------------------------------------------- tools, end to end
def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _check_png(path, min_side=100):
    from PIL import Image

    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        w, h = img.size
        assert min_side <= w <= 4000 and min_side <= h <= 4000, (path, img.size)
        assert np.asarray(img.convert("L")).std() > 1  # not a blank picture


def test_inputs_errors_name_the_argument(tmp_path):
    from PIL import Image

    from keras_lcmae.analysis import inputs
    from keras_lcmae.errors import ArgumentError

    cases = [
        (lambda: inputs.load_images("fashion_mnist", 32, 1, 0), "num_images", "must be at least 1"),
        (lambda: inputs.load_images(str(tmp_path / "none"), 32, 1, 2), "source", "'fashion_mnist' or an existing"),
        (lambda: inputs.load_checkpoint(__file__), "path", "must be a .keras file"),
    ]
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "a.png")
    cases.append((lambda: inputs.load_images(str(folder), 32, 1, 1, resize=False), "resize", "40x40 but the model"))
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    cases.append((lambda: inputs.load_checkpoint(str(tmp_path / "bad.keras")), "path", "cannot load"))
    for call, argument, detail in cases:
        with pytest.raises(ArgumentError) as error:
            call()
        assert error.value.argument == argument and detail in str(error.value) and "--" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="^path: no file at"):
        inputs.load_checkpoint(str(tmp_path / "missing.keras"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, fmnist):
    """A tiny MAE trained a few steps on Fashion-MNIST, saved whole and as an
    encoder, plus a second encoder (patch 4, another grid) as a reference."""
    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("analysis_ckpt")
    images = fmnist[0][:32, :, :, :1]
    model = tiny_mae(channels=1)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=False)
    model.fit(images, batch_size=16, epochs=1, verbose=0)
    paths = {
        "mae": str(folder / "mae.keras"),
        "encoder": str(folder / "encoder.keras"),
        "reference": str(folder / "reference.keras"),
    }
    model.save(paths["mae"])
    model.encoder.save(paths["encoder"])
    ViTEncoder(image_size=32, patch_size=4, num_channels=1, hidden_dim=32, depth=1, num_heads=2).save(
        paths["reference"]
    )
    return paths


@pytest.mark.tf_only
def test_analyze_every_subcommand(checkpoints, tmp_path):
    analyze = _load_tool("analyze")
    out = str(tmp_path)
    common = [
        f"--checkpoint={checkpoints['mae']}",
        "--num_images=6",
        f"--output_dir={out}",
        "--seed=1",
        "--batch_size=4",
    ]
    diagonal = np.hypot(32, 32)

    analyze.main(["attention-distance", *common])
    rows = _read(os.path.join(out, "attention_distance.csv"))
    assert [(r["part"], int(r["layer"])) for r in rows] == [
        ("encoder", 1),
        ("encoder", 2),
        ("decoder", 1),
        ("decoder", 2),
    ]
    for r in rows:
        d = float(r["distance_px"])
        assert 0 <= float(r["head_min_px"]) <= d <= float(r["head_max_px"]) <= diagonal
    assert all(0 < float(r["masked_query_distance_px"]) < diagonal for r in rows if r["part"] == "decoder")

    analyze.main(["attention-similarity", *common])
    rows = _read(os.path.join(out, "attention_similarity.csv"))
    assert len(rows) == 2 and all(0 < float(r["s_attn"]) <= 1 for r in rows)
    assert {int(r["masked_queries"]) for r in rows} == {12} and {int(r["num_images"]) for r in rows} == {6}

    analyze.main(["semantic-similarity", *common, f"--reference={checkpoints['reference']}"])
    rows = _read(os.path.join(out, "semantic_similarity.csv"))
    assert len(rows) == 2 and all(-1 <= float(r["s_sim"]) <= 1 for r in rows)
    assert rows[0]["reference_grid"] == "8x8"
    # the same reference as an official-layout checkpoint gives the same figures
    from keras_lcmae.convert import export

    reference = keras.saving.load_model(checkpoints["reference"])
    export(reference, os.path.join(out, "reference.safetensors"))
    analyze.main(
        ["semantic-similarity", *common, f"--reference={out}/reference.safetensors", "--reference_num_heads=2"]
    )
    assert _read(os.path.join(out, "semantic_similarity.csv")) == rows

    analyze.main(["attention-maps", *common, "--rows=2"])
    rows = _read(os.path.join(out, "attention_maps.csv"))
    assert len(rows) == 2 * 2 * 2  # 2 query positions x 2 images x 2 layers
    assert all(0 <= float(r["cls_weight"]) <= 1 and 0 <= float(r["distance_px"]) <= diagonal for r in rows)

    result = analyze.main(["reconstruction", *common, "--rows=3"])
    rows = _read(os.path.join(out, "reconstruction.csv"))  # every analysed image; the picture shows --rows
    assert result["summary"]["masked_mse"] == pytest.approx(np.mean([float(r["masked_mse"]) for r in rows]), rel=1e-4)
    assert len(rows) == 6 and all(
        float(r["masked_fraction"]) == 0.75 and np.isfinite(float(r["masked_mse"])) for r in rows
    )

    analyze.main(["clusters", *common, "--rows=3"])
    rows = _read(os.path.join(out, "clusters.csv"))
    assert [r["part"] for r in rows] == ["encoder", "encoder", "decoder", "decoder"]
    for r in rows:
        assert 0 <= float(r["feature_variance"]) <= 1 / 32 + 1e-6
        assert 0 <= float(r["similarity_variance"]) <= 1
        assert -2 <= float(r["cluster_gap"]) <= 2

    for name in (
        "attention_distance",
        "attention_similarity",
        "semantic_similarity",
        "attention_maps",
        "reconstruction",
        "clusters",
        "clusters_curves",
    ):
        _check_png(os.path.join(out, f"{name}.png"))

    # Self-guided MAE's analyses: a folder of checkpoints, identical ones give KL 0
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for epoch in (1, 2):
        shutil.copyfile(checkpoints["mae"], folder / f"epoch_{epoch:03d}.keras")
    analyze.main(["early-clustering", *common, f"--checkpoint={folder}"])
    rows = _read(os.path.join(out, "early_clustering.csv"))
    assert [(int(r["epoch"]), int(r["layer"])) for r in rows] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(float(r["token_kl"]) == 0 and -2 <= float(r["cluster_gap"]) <= 2 for r in rows)
    analyze.main(["exploitation-rate", *common, f"--checkpoint={folder}"])
    rows = _read(os.path.join(out, "exploitation_rate.csv"))
    assert len(rows) == 4 and all(float(r["visible"]) + float(r["mask"]) == pytest.approx(1.0, abs=1e-5) for r in rows)
    analyze.main(["token-relation-kl", *common, f"--final={checkpoints['mae']}"])
    rows = _read(os.path.join(out, "token_relation_kl.csv"))
    assert [r["part"] for r in rows] == ["encoder", "encoder", "decoder", "decoder"]
    assert all(float(r["token_kl"]) == 0 for r in rows)
    untrained = str(tmp_path / "untrained.keras")
    tiny_mae(channels=1).save(untrained)
    analyze.main(["token-relation-kl", *common, f"--final={untrained}"])
    assert all(float(r["token_kl"]) > 0 for r in _read(os.path.join(out, "token_relation_kl.csv")))
    analyze.main(["attention-nmi", *common])
    rows = _read(os.path.join(out, "attention_nmi.csv"))
    assert len(rows) == 4 and all(0 <= float(r["nmi"]) <= 1 for r in rows)
    result = analyze.main(["informed-masks", *common, "--rows=2"])
    rows = _read(os.path.join(out, "informed_masks.csv"))
    assert len(rows) == 6 and all(int(r["masked"]) == 12 for r in rows)
    assert 0 <= result["summary"]["foreground_share_informed"] <= 1
    for name in ("early_clustering", "exploitation_rate", "token_relation_kl", "attention_nmi", "informed_masks"):
        _check_png(os.path.join(out, f"{name}.png"))
    with pytest.raises(SystemExit):
        analyze.main(["attention-nmi", f"--checkpoint={folder}", f"--output_dir={out}"])

    # an encoder.keras is enough for the encoder analyses
    enc_out = str(tmp_path / "enc")
    analyze.main(
        [
            "attention-distance",
            f"--checkpoint={checkpoints['encoder']}",
            "--num_images=4",
            f"--output_dir={enc_out}",
            "--encoder_mask_ratio=0.5",
        ]
    )
    rows = _read(os.path.join(enc_out, "attention_distance.csv"))
    assert [r["part"] for r in rows] == ["encoder", "encoder"]


@pytest.mark.tf_only
def test_analyze_clear_errors(checkpoints, tmp_path, capsys):
    analyze = _load_tool("analyze")
    out = f"--output_dir={tmp_path}"
    cases = [
        (["attention-maps", f"--checkpoint={checkpoints['encoder']}", out], "only an encoder"),
        (["attention-distance", f"--checkpoint={tmp_path}/missing.keras", out], "no file at"),
        (
            ["attention-distance", f"--checkpoint={checkpoints['mae']}", "--data=/no/such/folder", out],
            "fashion_mnist' or an existing image folder",
        ),
        (["attention-maps", f"--checkpoint={checkpoints['mae']}", "--query=999", out, "--num_images=2"], "not masked"),
        (
            ["semantic-similarity", f"--checkpoint={checkpoints['mae']}", f"--reference={tmp_path}/none.keras", out],
            "--reference: no file",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            analyze.main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    # an image folder of the wrong size with --no_resize
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(folder / "a.png")
    with pytest.raises(SystemExit):
        analyze.main(["reconstruction", f"--checkpoint={checkpoints['mae']}", f"--data={folder}", "--no_resize", out])
    assert "40x40 but the model takes 32x32" in capsys.readouterr().err
    # a reference with a different image size is reported as such
    ViTEncoder(image_size=64, patch_size=8, num_channels=1, hidden_dim=32, depth=1, num_heads=2).save(
        str(tmp_path / "ref64.keras")
    )
    with pytest.raises(SystemExit):
        analyze.main(
            [
                "semantic-similarity",
                f"--checkpoint={checkpoints['mae']}",
                f"--reference={tmp_path}/ref64.keras",
                out,
                "--num_images=2",
            ]
        )
    assert "64x64" in capsys.readouterr().err


@pytest.mark.tf_only
@pytest.mark.slow  # two recipes/pretrain.py subprocesses (~10-20 s each on 2 free cores)
def test_mask_ratio_sweep_tool(tmp_path):
    sweep = _load_tool("mask_ratio_sweep")
    out = str(tmp_path / "sweep")
    tiny = [
        "--data=fashion_mnist",
        "--image_size=32",
        "--patch_size=8",
        "--model=vit_test",
        "--hidden_dim=32",
        "--depth=2",
        "--num_heads=2",
        "--decoder_depth=1",
        "--decoder_hidden_dim=32",
        "--decoder_num_heads=2",
        "--batch_size=8",
        "--warmup_epochs=0",
        "--jit_compile=false",
    ]
    code = sweep.main(
        [
            "--mask_ratios=0.5,0.75",
            "--epochs=1",
            "--steps_per_epoch=1",
            f"--output_dir={out}",
            "--num_images=4",
            *[f"--pretrain_flag={f}" for f in tiny],
        ]
    )
    assert code == 0
    rows = _read(os.path.join(out, "mask_ratio_sweep.csv"))
    assert [(float(r["mask_ratio"]), int(r["layer"])) for r in rows] == [(0.5, 1), (0.5, 2), (0.75, 1), (0.75, 2)]
    assert all(0 < float(r["distance_px"]) < np.hypot(32, 32) for r in rows)
    assert os.path.exists(os.path.join(out, "mask_0.5", "encoder.keras"))
    _check_png(os.path.join(out, "mask_ratio_sweep.png"))
    # the run really used the ratio
    with open(os.path.join(out, "mask_0.75", "flags.txt")) as f:
        assert "--mask_ratio=0.75" in f.read()
    with pytest.raises(SystemExit):
        sweep.main(["--mask_ratios=0.5,1.5", f"--output_dir={out}"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.tf_only
def test_export_photos_makes_a_folder_the_tools_read(tmp_path):
    from keras_lcmae.analysis import inputs

    export_photos = _load_tool("export_photos")
    n = export_photos.main([f"--output_dir={tmp_path / 'photos'}", "--crops=1"])
    assert n == 2 * len(export_photos.PHOTOS)
    assert sorted(os.listdir(tmp_path / "photos")) == sorted(export_photos.PHOTOS)
    images, _, _ = inputs.load_images(str(tmp_path / "photos"), 64, 3, 5, seed=0)
    assert images.shape == (5, 64, 64, 3) and np.isfinite(images).all()
