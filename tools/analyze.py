#!/usr/bin/env python
r"""The LC-MAE paper's analyses (Sec. 4, Figs. 2-6, A.1, B.1) on a checkpoint.

Each subcommand writes ``<output_dir>/<name>.csv`` and ``<name>.png``:

    attention-distance    encoder (all patches) and decoder attention distance per layer (Fig. 5/6/A.1)
    attention-similarity  S^attn of Eq. 7 per decoder layer, one mask shared by all images (Fig. 2)
    semantic-similarity   S^sim of Eq. 8 per decoder layer against a --reference model (Fig. 3)
    attention-maps        input | masked | attention of masked queries per decoder layer (Fig. 4/B.1)
    reconstruction        input | masked | reconstruction (model.reconstruct)
    clusters              sigma_F, sigma_s, intra-inter gap per layer + bipartition maps (Self-guided MAE)
    early-clustering      mu_intra - mu_inter and token-relation KL to the last checkpoint, per encoder
                          layer over a run's checkpoints (Self-guided MAE Fig. 3)
    token-relation-kl     KL of token relations (attention) of --checkpoint against --final, per layer
    exploitation-rate     decoder exploitation rates of visible vs mask tokens per layer (Self-guided MAE
                          Fig. 4); a checkpoints folder gives one row per epoch
    attention-nmi         NMI of query and key positions per encoder/decoder layer (Self-guided MAE Fig. 6)
    informed-masks        input | random mask | informed mask with the object found (Self-guided MAE Fig. 5)

    python tools/analyze.py attention-distance --checkpoint=runs/demo_cpu/pretrain/checkpoints/epoch_006.keras \
        --data=fashion_mnist --num_images=64 --output_dir=runs/analysis

``--checkpoint`` is a whole MAE / LC-MAE ``.keras`` model (the recipe's
``checkpoints/epoch_NNN.keras``) or an ``encoder.keras``; with an encoder only
``attention-distance`` (encoder part), ``clusters``, ``attention-nmi`` and
``token-relation-kl`` (encoder layers) apply. ``early-clustering`` and
``exploitation-rate`` also take a run's ``checkpoints/`` folder (every
``epoch_NNN.keras`` in it, in order).
"""

import csv
import json
import os
import sys
import types

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # tools/cli.py, importable once tools/ is on the path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DECODER_ONLY = (
    "attention-similarity",
    "semantic-similarity",
    "attention-maps",
    "reconstruction",
    "exploitation-rate",
    "informed-masks",
)
OVER_CHECKPOINTS = ("early-clustering", "exploitation-rate")
FOREGROUND_THRESHOLD = 0.1  # Fashion-MNIST: a patch with a pixel above 10 % of white is part of the object


class UsageError(ValueError):
    """Bad input from the command line (reported without a traceback)."""


# --------------------------------------------------------------------------- helpers
def write_csv(path, rows):
    if not rows:
        raise UsageError("nothing to write: no layer was analysed.")
    fields = list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def batches(n, size):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def random_noise(num_images, num_patches, seed):
    """Per-image masking noise (a different mask for every image)."""
    return np.random.default_rng(seed + 1).random((num_images, num_patches)).astype("float32")


def with_mask_ratio(model, ratio):
    if ratio is not None:
        from keras_lcmae.masking import num_visible

        try:
            num_visible(model.encoder.num_patches, ratio)
        except ValueError as e:
            raise UsageError(f"--mask_ratio: {e}") from None
        model.mask_ratio = float(ratio)
    return model


def masked_ids(mask_row):
    return np.flatnonzero(np.asarray(mask_row) > 0.5)


def checkpoint_files(path, folder_ok):
    """``[(epoch or None, file)]``: the ``.keras`` file itself, or with
    ``folder_ok`` every ``epoch_NNN.keras`` of a folder by epoch."""
    if not os.path.isdir(path):
        return [(epoch_of(path), path)]
    if not folder_ok:
        raise UsageError(f"--checkpoint {path!r} is a folder; this analysis takes one .keras file.")
    files = sorted(
        (epoch_of(name), os.path.join(path, name))
        for name in os.listdir(path)
        if name.endswith(".keras") and epoch_of(name) is not None
    )
    if not files:
        raise UsageError(f"--checkpoint folder {path!r} holds no epoch_NNN.keras checkpoint.")
    return files


def epoch_of(path):
    """``NNN`` of ``.../epoch_NNN.keras``, else ``None``."""
    name = os.path.basename(str(path))
    digits = name[len("epoch_") : -len(".keras")]
    return int(digits) if name.startswith("epoch_") and name.endswith(".keras") and digits.isdigit() else None


class Context:
    """Loaded model, images and output paths of one run."""

    def __init__(self, args):
        from keras_lcmae.analysis import inputs

        self.args = args
        self.checkpoints = checkpoint_files(args.checkpoint, args.command in OVER_CHECKPOINTS)
        try:
            self.model, self.kind = inputs.load_checkpoint(self.checkpoints[-1][1])
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        if args.command in DECODER_ONLY and self.kind != "mae":
            raise UsageError(
                f"`{args.command}` analyses the decoder, but --checkpoint {args.checkpoint!r} holds only an "
                "encoder; pass a whole MAE/LC-MAE model (recipes/pretrain.py writes them to "
                "<output_dir>/checkpoints/epoch_NNN.keras)."
            )
        self.encoder = self.model if self.kind == "encoder" else self.model.encoder
        if self.kind == "mae":
            with_mask_ratio(self.model, args.mask_ratio)
        self.images, self.mean, self.std = inputs.load_images(
            args.data,
            self.encoder.image_size,
            self.encoder.num_channels,
            args.num_images,
            args.seed,
            resize=not args.no_resize,
        )
        os.makedirs(args.output_dir, exist_ok=True)
        self.grid = self.encoder.grid_size
        self.p = self.encoder.patch_size

    def path(self, suffix):
        return os.path.join(self.args.output_dir, self.args.command.replace("-", "_") + suffix)

    def pixels(self, images):
        from keras_lcmae.analysis.inputs import to_pixels

        return to_pixels(images, self.mean, self.std)

    def decoder_check(self):
        from keras_lcmae.decoders import TransformerDecoder

        if not isinstance(self.model.decoder, TransformerDecoder):
            raise UsageError(
                f"`{self.args.command}` needs decoder attention/blocks; this model's decoder is a "
                f"{type(self.model.decoder).__name__}."
            )


# --------------------------------------------------------------------------- subcommands
def cmd_attention_distance(ctx):
    from keras_lcmae.analysis import attention_distance, decoder_layers, encoder_layers
    from keras_lcmae.analysis.plots import attention_distance_figure

    n = len(ctx.images)
    bs = ctx.args.batch_size
    enc_sum = dec_sum = dec_masked_sum = None
    noise = random_noise(n, ctx.encoder.num_patches, ctx.args.seed)
    ids_keep_all = None
    if ctx.args.encoder_mask_ratio > 0:
        from keras_lcmae.masking import num_visible

        keep = num_visible(ctx.encoder.num_patches, ctx.args.encoder_mask_ratio)
        ids_keep_all = np.argsort(noise, axis=1)[:, :keep]
    decoder = ctx.kind == "mae" and _has_transformer_decoder(ctx.model)
    for sl in batches(n, bs):
        x = ctx.images[sl]
        m = len(x)
        out = encoder_layers(ctx.encoder, x, None if ids_keep_all is None else ids_keep_all[sl])
        per = np.stack([attention_distance(a, ctx.grid, ctx.p, positions=out["positions"]) for a in out["attention"]])
        enc_sum = per * m if enc_sum is None else enc_sum + per * m
        if decoder:
            dec = decoder_layers(ctx.model, x, noise[sl])
            per = np.stack([attention_distance(a, ctx.grid, ctx.p) for a in dec["attention"]])
            per_m = np.stack([attention_distance(a, ctx.grid, ctx.p, query_mask=dec["mask"]) for a in dec["attention"]])
            dec_sum = per * m if dec_sum is None else dec_sum + per * m
            dec_masked_sum = per_m * m if dec_masked_sum is None else dec_masked_sum + per_m * m
    parts = {"encoder": enc_sum / n}
    if decoder:
        parts["decoder"] = dec_sum / n
    rows = []
    for part, per_head in parts.items():
        for l, heads in enumerate(per_head):
            rows.append(
                {
                    "part": part,
                    "layer": l + 1,
                    "distance_px": float(heads.mean()),
                    "head_min_px": float(heads.min()),
                    "head_max_px": float(heads.max()),
                    "masked_query_distance_px": float(dec_masked_sum[l].mean() / n) if part == "decoder" else "",
                }
            )
    title = "attention distance"
    if ctx.args.encoder_mask_ratio > 0:
        title += f" (encoder on visible tokens, r={ctx.args.encoder_mask_ratio:g})"
    from keras_lcmae.analysis import mean_pairwise_distance

    attention_distance_figure(parts, ctx.path(".png"), title=title, uniform=mean_pairwise_distance(ctx.grid, ctx.p))
    return write_csv(ctx.path(".csv"), rows)


def _has_transformer_decoder(model):
    from keras_lcmae.decoders import TransformerDecoder

    return isinstance(getattr(model, "decoder", None), TransformerDecoder)


def cmd_attention_similarity(ctx):
    from keras_lcmae.analysis import decoder_layers, shared_noise
    from keras_lcmae.analysis.metrics import attention_vectors, similarity_from_sums
    from keras_lcmae.analysis.plots import layer_curve_figure

    ctx.decoder_check()
    n = len(ctx.images)
    if n < 2:
        raise UsageError("attention-similarity compares images pairwise: --num_images must be at least 2.")
    noise = shared_noise(n, ctx.encoder.num_patches, ctx.args.seed)
    sums, query_ids = None, None
    for sl in batches(n, ctx.args.batch_size):
        dec = decoder_layers(ctx.model, ctx.images[sl], noise[sl])
        query_ids = masked_ids(dec["mask"][0])
        vecs = [attention_vectors(a, query_ids, include_cls=ctx.args.include_cls).sum(0) for a in dec["attention"]]
        sums = vecs if sums is None else [s + v for s, v in zip(sums, vecs)]
    values = [similarity_from_sums(s, n) for s in sums]
    rows = [
        {
            "layer": l + 1,
            "s_attn": v,
            "num_images": n,
            "masked_queries": len(query_ids),
            "include_cls": int(ctx.args.include_cls),
        }
        for l, v in enumerate(values)
    ]
    layer_curve_figure(
        values, ctx.path(".png"), "attention similarity $S^{attn}$", f"Eq. 7: {n} images, one shared mask"
    )
    return write_csv(ctx.path(".csv"), rows)


def cmd_semantic_similarity(ctx):
    from keras_lcmae.analysis import decoder_layers, reference_features, resize_token_grid, semantic_similarity
    from keras_lcmae.analysis.plots import layer_curve_figure

    ctx.decoder_check()
    reference = load_reference(ctx.args.reference, ctx.args.reference_num_heads)
    n = len(ctx.images)
    noise = random_noise(n, ctx.encoder.num_patches, ctx.args.seed)
    sums = None
    for sl in batches(n, ctx.args.batch_size):
        x = ctx.images[sl]
        try:
            ref, ref_grid = reference_features(reference, x)
        except ValueError as e:
            raise UsageError(f"--reference {ctx.args.reference!r}: {e}") from None
        if tuple(ref_grid) != tuple(ctx.grid):
            ref = resize_token_grid(ref, ref_grid, ctx.grid)
        dec = decoder_layers(ctx.model, x, noise[sl])
        vals = np.array(
            [semantic_similarity(ref, f, ctx.args.normalization, per_image=True).sum() for f in dec["features"]]
        )
        sums = vals if sums is None else sums + vals
    values = sums / n
    rows = [
        {
            "layer": l + 1,
            "s_sim": float(v),
            "num_images": n,
            "reference_grid": f"{ref_grid[0]}x{ref_grid[1]}",
            "normalization": ctx.args.normalization,
        }
        for l, v in enumerate(values)
    ]
    layer_curve_figure(
        values, ctx.path(".png"), "semantic similarity $S^{sim}$", f"Eq. 8 vs {os.path.basename(ctx.args.reference)}"
    )
    return write_csv(ctx.path(".csv"), rows)


def load_reference(path, num_heads=None):
    """The reference model of Eq. 8: any ``.keras`` model giving per-patch
    features, or a ViT checkpoint in any format
    :func:`keras_lcmae.convert.load_pretrained` reads (an official / timm
    ``.pth``, ``.safetensors`` or ``.npz``, a Hugging Face or keras-hub
    folder), as its ``ViTEncoder``: a DINO / DINOv2 ViT on disk fills the
    paper's role."""
    import keras

    import keras_lcmae  # noqa: F401  (registers the package's classes)
    from keras_lcmae.convert import load_pretrained
    from keras_lcmae.errors import ArgumentError

    if not os.path.exists(path):
        raise UsageError(f"--reference: no file at {path!r}.")
    if not str(path).endswith(".keras"):
        try:
            return load_pretrained(path, num_heads=num_heads, encoder_only=True)
        except ArgumentError as e:
            flag = "--reference_num_heads" if e.argument == "num_heads" else "--reference"
            raise UsageError(f"{flag}: {e.detail}") from None
        except ValueError as e:
            raise UsageError(f"--reference {path!r}: {e}") from None
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # Keras' loader raises many kinds, none of them meant for a user
        raise UsageError(f"--reference: cannot load {path!r} as a Keras model: {e}") from None


def pick_queries(mask_row, grid, requested):
    rows, cols = grid
    masked = masked_ids(mask_row)
    if requested:
        bad = [q for q in requested if q not in set(masked.tolist())]
        if bad:
            raise UsageError(
                f"--query {bad} are not masked under this --seed's mask; masked patches are {masked.tolist()}."
            )
        return list(requested)
    r, c = np.divmod(masked, cols)
    picks = []
    for target in (((rows - 1) / 2, (cols - 1) / 2), ((rows - 1) / 4, (cols - 1) / 4)):
        order = np.argsort((r - target[0]) ** 2 + (c - target[1]) ** 2, kind="stable")
        for i in order:
            if int(masked[i]) not in picks:
                picks.append(int(masked[i]))
                break
    return picks


def cmd_attention_maps(ctx):
    from keras_lcmae.analysis import decoder_layers, pairwise_patch_distances, shared_noise
    from keras_lcmae.analysis.plots import attention_maps_figure

    ctx.decoder_check()
    count = min(ctx.args.rows, len(ctx.images))
    x = ctx.images[:count]
    noise = shared_noise(count, ctx.encoder.num_patches, ctx.args.seed)
    dec = decoder_layers(ctx.model, x, noise)
    queries = pick_queries(dec["mask"][0], ctx.grid, ctx.args.query)
    pixels = ctx.pixels(x)
    dist = pairwise_patch_distances(ctx.grid, ctx.p)
    mask_img = np.kron(dec["mask"].reshape(count, *ctx.grid), np.ones((ctx.p, ctx.p)))[..., None]
    masked = pixels * (1 - mask_img) + 0.5 * mask_img
    att = [a.mean(axis=1) for a in dec["attention"]]  # (R, 1+N, 1+N), heads averaged
    maps, cls_w, qs, rows, fig_pixels, fig_masked = [], [], [], [], [], []
    for q in queries:
        for i in range(count):
            maps.append(np.stack([a[i, 1 + q, 1:] for a in att]))
            cls_w.append(np.array([a[i, 1 + q, 0] for a in att]))
            qs.append(q)
            fig_pixels.append(pixels[i])
            fig_masked.append(masked[i])
            for l, a in enumerate(dec["attention"]):
                row = a[i, :, 1 + q, :]  # (heads, 1+N): this query, every head
                w = row[:, 1:] / np.maximum(row[:, 1:].sum(-1, keepdims=True), 1e-12)
                rows.append(
                    {
                        "image": i,
                        "query_patch": q,
                        "layer": l + 1,
                        "cls_weight": float(row[:, 0].mean()),
                        "self_weight": float(row[:, 1 + q].mean()),
                        "distance_px": float((w * dist[q]).sum(-1).mean()),
                    }
                )
    attention_maps_figure(
        np.stack(fig_pixels),
        np.stack(fig_masked),
        np.stack(maps),
        np.stack(cls_w),
        np.array(qs),
        ctx.grid,
        ctx.p,
        ctx.path(".png"),
    )
    return write_csv(ctx.path(".csv"), rows)


def cmd_reconstruction(ctx):
    import keras

    from keras_lcmae.analysis.plots import image_columns_figure

    count = len(ctx.images)
    x = ctx.images
    noise = random_noise(count, ctx.encoder.num_patches, ctx.args.seed)
    parts = [ctx.model.reconstruct(x[sl], noise=noise[sl]) for sl in batches(count, ctx.args.batch_size)]
    recon = np.concatenate([keras.ops.convert_to_numpy(r) for r, _ in parts])
    mask = np.concatenate([keras.ops.convert_to_numpy(m) for _, m in parts])
    pixels = ctx.pixels(x)
    masked = pixels * (1 - mask) + 0.5 * mask
    rows = []
    for i in range(count):
        m = mask[i] > 0.5
        rows.append(
            {
                "image": i,
                "masked_fraction": float(m.mean()),
                "masked_mse": float(np.mean((recon[i] - x[i])[m] ** 2)) if m.any() else 0.0,
            }
        )
    shown = slice(0, min(ctx.args.rows, count))
    image_columns_figure(
        [pixels[shown], masked[shown], ctx.pixels(recon[shown])],
        ["input", "masked", "reconstruction"],
        ctx.path(".png"),
    )
    ctx.summary = {"masked_mse": float(np.mean([r["masked_mse"] for r in rows]))}
    return write_csv(ctx.path(".csv"), rows)


def cmd_clusters(ctx):
    from keras_lcmae.analysis import clustering_metrics, decoder_layers, encoder_layers
    from keras_lcmae.analysis.plots import cluster_maps_figure, clustering_curves_figure

    n = len(ctx.images)
    noise = random_noise(n, ctx.encoder.num_patches, ctx.args.seed)
    decoder = ctx.kind == "mae" and _has_transformer_decoder(ctx.model)
    totals, maps = {}, {}
    count = min(ctx.args.rows, n)
    for sl in batches(n, ctx.args.batch_size):
        x = ctx.images[sl]
        layers = [("encoder", f) for f in encoder_layers(ctx.encoder, x)["features"]]
        if decoder:
            layers += [("decoder", f) for f in decoder_layers(ctx.model, x, noise[sl])["features"]]
        seen = {"encoder": 0, "decoder": 0}
        for part, feats in layers:
            seen[part] += 1
            key = (part, seen[part])
            values, assign = clustering_metrics(feats)
            acc = totals.setdefault(key, dict.fromkeys(values, 0.0))
            for k, v in values.items():
                acc[k] += v * len(x)
            if sl.start == 0:
                maps[key] = assign[:count]
    rows = [
        {"part": part, "layer": layer, **{k: v / n for k, v in acc.items()}} for (part, layer), acc in totals.items()
    ]
    keys = list(maps)
    if len(keys) > ctx.args.max_map_layers:
        keys = [keys[i] for i in np.unique(np.linspace(0, len(keys) - 1, ctx.args.max_map_layers).round().astype(int))]
    cluster_maps_figure(
        ctx.pixels(ctx.images[:count]),
        np.stack([maps[k] for k in keys]),
        ctx.grid,
        ctx.p,
        ctx.path(".png"),
        [f"{p[:3]} {l}" for p, l in keys],
    )
    clustering_curves_figure(rows, ctx.path("_curves.png"))
    return write_csv(ctx.path(".csv"), rows)


def load_model(ctx, path, what="--checkpoint"):
    """A checkpoint of the same geometry as ``ctx``'s, with its mask ratio."""
    from keras_lcmae.analysis import inputs

    try:
        model, kind = inputs.load_checkpoint(path)
    except FileNotFoundError as e:
        raise UsageError(f"{what}: {e}") from None
    encoder = model if kind == "encoder" else model.encoder
    if (encoder.grid_size, encoder.patch_size, encoder.num_channels) != (ctx.grid, ctx.p, ctx.encoder.num_channels):
        raise UsageError(
            f"{what} {path!r} has a {encoder.grid_size} grid of {encoder.patch_size}-px patches and "
            f"{encoder.num_channels} channels; the analysed model has {ctx.grid}, {ctx.p} px, "
            f"{ctx.encoder.num_channels}: compare checkpoints of one model."
        )
    if kind == "mae":
        with_mask_ratio(model, ctx.args.mask_ratio)
    return model, kind


def layer_outputs(model, kind, images, noise, batch_size, decoder=True):
    """Per layer, over all images: ``{("encoder", l): {"features", "attention"}}``
    for the encoder on all patches, and the decoder layers under ``noise``
    (with ``"mask"``) when ``decoder`` and the model has a Transformer decoder."""
    from keras_lcmae.analysis import decoder_layers, encoder_layers

    out = {}
    for sl in batches(len(images), batch_size):
        enc = encoder_layers(model, images[sl])
        parts = [("encoder", enc["features"], enc["attention"], None)]
        if decoder and kind == "mae" and _has_transformer_decoder(model):
            dec = decoder_layers(model, images[sl], noise[sl])
            parts.append(("decoder", dec["features"], dec["attention"], dec["mask"]))
        for part, feats, attns, mask in parts:
            for l, (f, a) in enumerate(zip(feats, attns)):
                slot = out.setdefault((part, l + 1), {"features": [], "attention": [], "mask": []})
                slot["features"].append(f)
                slot["attention"].append(a)
                if mask is not None:
                    slot["mask"].append(mask)
    return {k: {name: np.concatenate(v) if v else None for name, v in slot.items()} for k, slot in out.items()}


def cmd_early_clustering(ctx):
    from keras_lcmae.analysis import clustering_metrics, token_relation_kl
    from keras_lcmae.analysis.plots import epoch_curves_figure

    final = layer_outputs(ctx.model, ctx.kind, ctx.images, None, ctx.args.batch_size, decoder=False)
    rows = []
    for epoch, path in ctx.checkpoints:
        model, kind = (ctx.model, ctx.kind) if path == ctx.checkpoints[-1][1] else load_model(ctx, path)
        layers = (
            final if model is ctx.model else layer_outputs(model, kind, ctx.images, None, ctx.args.batch_size, False)
        )
        if set(layers) != set(final):
            raise UsageError(
                f"{path!r} has {len(layers)} encoder layers and the last checkpoint {len(final)}: the folder must "
                "hold the checkpoints of one run."
            )
        for (part, layer), out in layers.items():
            values, _ = clustering_metrics(out["features"])
            kl = token_relation_kl(out["attention"], final[(part, layer)]["attention"])
            rows.append({"epoch": epoch, "part": part, "layer": layer, **values, "token_kl": kl})
    epoch_curves_figure(
        rows,
        {"cluster_gap": "$\\mu_{intra} - \\mu_{inter}$", "token_kl": "KL(last || epoch) of token relations"},
        ctx.path(".png"),
    )
    return write_csv(ctx.path(".csv"), rows)


def cmd_token_relation_kl(ctx):
    from keras_lcmae.analysis import token_relation_kl
    from keras_lcmae.analysis.plots import attention_distance_figure

    final, final_kind = load_model(ctx, ctx.args.final, "--final")
    noise = random_noise(len(ctx.images), ctx.encoder.num_patches, ctx.args.seed)
    both = ctx.kind == "mae" and final_kind == "mae"
    mine = layer_outputs(ctx.model, ctx.kind, ctx.images, noise, ctx.args.batch_size, decoder=both)
    theirs = layer_outputs(final, final_kind, ctx.images, noise, ctx.args.batch_size, decoder=both)
    if set(mine) != set(theirs):
        raise UsageError(
            f"--checkpoint has layers {sorted(mine)} and --final {sorted(theirs)}: compare checkpoints of one model."
        )
    rows, parts = [], {}
    for key in sorted(mine, key=lambda k: (k[0] != "encoder", k[1])):
        per_head = token_relation_kl(mine[key]["attention"], theirs[key]["attention"], per_head=True)
        rows.append({"part": key[0], "layer": key[1], "token_kl": float(per_head.mean())})
        parts.setdefault(key[0], []).append(per_head)
    attention_distance_figure(
        {k: np.stack(v) for k, v in parts.items()}, ctx.path(".png"), title="KL(final || checkpoint)", ylabel="KL"
    )
    return write_csv(ctx.path(".csv"), rows)


def cmd_exploitation_rate(ctx):
    from keras_lcmae.analysis import decoder_layers, exploitation_rates
    from keras_lcmae.analysis.plots import epoch_curves_figure

    ctx.decoder_check()
    noise = random_noise(len(ctx.images), ctx.encoder.num_patches, ctx.args.seed)
    rows = []
    for epoch, path in ctx.checkpoints:
        model = ctx.model if path == ctx.checkpoints[-1][1] else load_model(ctx, path)[0]
        attn, masks = None, []
        for sl in batches(len(ctx.images), ctx.args.batch_size):
            dec = decoder_layers(model, ctx.images[sl], noise[sl])
            attn = (
                [a for a in dec["attention"]]
                if attn is None
                else [np.concatenate([x, a]) for x, a in zip(attn, dec["attention"])]
            )
            masks.append(dec["mask"])
        mask = np.concatenate(masks)
        for l, a in enumerate(attn):
            rows.append({"epoch": epoch, "part": "decoder", "layer": l + 1, **exploitation_rates(a, mask)})
    epoch_curves_figure(
        rows,
        {
            "visible": "$R_{V \\to O}$ (visible)",
            "mask": "$R_{M \\to O}$ (mask tokens)",
            "mask_per_token": "mask tokens, per token (uniform = 1)",
        },
        ctx.path(".png"),
    )
    return write_csv(ctx.path(".csv"), rows)


def cmd_attention_nmi(ctx):
    from keras_lcmae.analysis import attention_nmi
    from keras_lcmae.analysis.plots import attention_distance_figure

    noise = random_noise(len(ctx.images), ctx.encoder.num_patches, ctx.args.seed)
    layers = layer_outputs(ctx.model, ctx.kind, ctx.images, noise, ctx.args.batch_size)
    rows, parts = [], {}
    for (part, layer), out in sorted(layers.items(), key=lambda kv: (kv[0][0] != "encoder", kv[0][1])):
        per_head = attention_nmi(out["attention"], per_head=True)
        rows.append({"part": part, "layer": layer, "nmi": float(per_head.mean())})
        parts.setdefault(part, []).append(per_head)
    attention_distance_figure(
        {k: np.stack(v) for k, v in parts.items()}, ctx.path(".png"), title="Attention NMI", ylabel="NMI"
    )
    return write_csv(ctx.path(".csv"), rows)


def cmd_informed_masks(ctx):
    import keras

    from keras_lcmae.analysis.plots import informed_masks_figure
    from keras_lcmae.masking import SelfGuidedMasking, informed_noise, random_masking

    model = ctx.model
    strategy = (
        model.masking
        if isinstance(model.masking, SelfGuidedMasking)
        else SelfGuidedMasking(
            guide_layer=ctx.args.guide_layer if ctx.args.guide_layer == "decoder" else int(ctx.args.guide_layer),
            hint_ratio=ctx.args.hint_ratio,
            hint_strategy=ctx.args.hint_strategy,
        )
    )
    count = len(ctx.images)
    x = ctx.images
    planned = [strategy.plan(model, model.encoder.embed(x[sl])) for sl in batches(count, ctx.args.batch_size)]
    objects = np.concatenate([keras.ops.convert_to_numpy(o) for o, _ in planned])
    scores = np.concatenate([keras.ops.convert_to_numpy(sc) for _, sc in planned])
    u = random_noise(count, ctx.encoder.num_patches, ctx.args.seed)
    rnd = keras.ops.convert_to_numpy(
        random_masking(np.zeros((count, ctx.encoder.num_patches, 1), "float32"), model.mask_ratio, noise=u)["mask"]
    )
    noise = informed_noise(
        objects, model.mask_ratio, strategy.hint_ratio, noise=u, scores=scores, hint_strategy=strategy.hint_strategy
    )
    inf = keras.ops.convert_to_numpy(
        random_masking(np.zeros((count, ctx.encoder.num_patches, 1), "float32"), model.mask_ratio, noise=noise)["mask"]
    )
    pixels = ctx.pixels(x)
    shown = min(ctx.args.rows, count)
    informed_masks_figure(pixels[:shown], objects, rnd, inf, ctx.grid, ctx.p, ctx.path(".png"))
    rows = [
        {
            "image": i,
            "object_patches": int(objects[i].sum()),
            "masked": int(inf[i].sum()),
            "found_object_share_informed": float((objects[i] * inf[i]).sum() / inf[i].sum()),
            "found_object_share_random": float((objects[i] * rnd[i]).sum() / rnd[i].sum()),
        }
        for i in range(count)
    ]
    if ctx.args.data == "fashion_mnist":
        fg = foreground_patches(pixels, ctx.p)
        for i, row in enumerate(rows):
            row["foreground_patches"] = int(fg[i].sum())
            row["foreground_share_informed"] = float((fg[i] * inf[i]).sum() / inf[i].sum())
            row["foreground_share_random"] = float((fg[i] * rnd[i]).sum() / rnd[i].sum())
    ctx.summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if "share" in k}
    return write_csv(ctx.path(".csv"), rows)


def foreground_patches(pixels, patch_size, threshold=FOREGROUND_THRESHOLD):
    """``(B, N)`` 0/1: the patches holding any pixel brighter than
    ``threshold`` (in [0, 1]) -- the object of a Fashion-MNIST image, whose
    background is black."""
    import keras

    from keras_lcmae.ops import patchify

    patches = keras.ops.convert_to_numpy(patchify(np.asarray(pixels, "float32"), patch_size))
    return (patches.max(axis=-1) > threshold).astype("float32")


COMMANDS = {
    "attention-distance": cmd_attention_distance,
    "attention-similarity": cmd_attention_similarity,
    "semantic-similarity": cmd_semantic_similarity,
    "attention-maps": cmd_attention_maps,
    "reconstruction": cmd_reconstruction,
    "clusters": cmd_clusters,
    "early-clustering": cmd_early_clustering,
    "token-relation-kl": cmd_token_relation_kl,
    "exploitation-rate": cmd_exploitation_rate,
    "attention-nmi": cmd_attention_nmi,
    "informed-masks": cmd_informed_masks,
}


def define_common_flags(fv):
    """The flags every subcommand takes."""
    flags.DEFINE_string(
        "checkpoint", None, "MAE/LC-MAE .keras model (checkpoints/epoch_NNN.keras) or an encoder.keras.", flag_values=fv
    )
    flags.mark_flag_as_required("checkpoint", flag_values=fv)
    flags.DEFINE_string("data", "fashion_mnist", "fashion_mnist (test split) or an image folder.", flag_values=fv)
    flags.DEFINE_integer("num_images", 32, "Images analysed (seeded random choice).", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("output_dir", "runs/analysis", "Where the CSV and PNG go.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the image choice and the masks.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("mask_ratio", None, "Decoder analyses: mask ratio (default: the model's own).", flag_values=fv)
    flags.DEFINE_bool(
        "no_resize", False, "Require images of the model's size instead of resizing + centre-cropping.", flag_values=fv
    )


def define_rows_flag(default, help_text):
    return lambda fv: flags.DEFINE_integer("rows", default, help_text, lower_bound=1, flag_values=fv)


def _attention_distance_flags(fv):
    flags.DEFINE_float(
        "encoder_mask_ratio",
        0.0,
        "0: encoder on all patches (default); r>0: on the visible tokens of a random mask.",
        lower_bound=0,
        upper_bound=1,
        flag_values=fv,
    )


def _attention_similarity_flags(fv):
    flags.DEFINE_bool("include_cls", False, "Keep the [CLS] key column in A_i.", flag_values=fv)


def _semantic_similarity_flags(fv):
    flags.DEFINE_string(
        "reference",
        None,
        "A .keras model giving per-patch features (DINO's role), or a ViT checkpoint: official/timm .pth, "
        ".safetensors, .npz, a Hugging Face or keras-hub folder.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "reference_num_heads",
        None,
        "Heads of a --reference checkpoint that is not .keras (shapes cannot tell; default: the standard ViT "
        "count for its width).",
        lower_bound=1,
        flag_values=fv,
    )
    flags.mark_flag_as_required("reference", flag_values=fv)
    flags.DEFINE_enum(
        "normalization",
        "cosine",
        ["cosine", "minmax"],
        "W: the cosine matrix itself, or min-max rescaled to [0, 1].",
        flag_values=fv,
    )


def _attention_maps_flags(fv):
    define_rows_flag(2, "Images per query position.")(fv)
    flags.DEFINE_list(
        "query", None, "Comma-separated masked patch indices (default: near centre, near a corner).", flag_values=fv
    )
    flags.register_validator(
        "query",
        lambda v: v is None or all(q.lstrip("-").isdigit() for q in v),
        "must be comma-separated patch indices",
        flag_values=fv,
    )


def _clusters_flags(fv):
    define_rows_flag(6, "Images shown in the cluster maps.")(fv)
    flags.DEFINE_integer(
        "max_map_layers", 8, "At most this many layers in the maps figure.", lower_bound=1, flag_values=fv
    )


def _token_relation_kl_flags(fv):
    flags.DEFINE_string(
        "final", None, "The reference (converged) checkpoint the relations are compared to.", flag_values=fv
    )
    flags.mark_flag_as_required("final", flag_values=fv)


def _informed_masks_flags(fv):
    define_rows_flag(8, "Images shown.")(fv)
    flags.DEFINE_string(
        "guide_layer", "-1", "For a model trained with random masks: encoder block index or 'decoder'.", flag_values=fv
    )
    flags.DEFINE_float("hint_ratio", 0.05, "For a model trained with random masks: hint ratio.", flag_values=fv)
    flags.DEFINE_enum(
        "hint_strategy",
        "similarity",
        ["similarity", "random"],
        "For a model trained with random masks.",
        flag_values=fv,
    )


def _no_flags(fv):
    pass


# subcommand -> (what it is, its own flags on top of define_common_flags)
SUBCOMMANDS = {
    "attention-distance": ("Fig. 5/6/A.1 attention distance.", _attention_distance_flags),
    "attention-similarity": ("Eq. 7 / Fig. 2.", _attention_similarity_flags),
    "semantic-similarity": ("Eq. 8 / Fig. 3.", _semantic_similarity_flags),
    "attention-maps": ("Fig. 4/B.1 attention maps.", _attention_maps_flags),
    "reconstruction": ("input | masked | reconstruction.", define_rows_flag(8, "Images shown.")),
    "clusters": ("sigma_F, sigma_s, gap + bipartition maps.", _clusters_flags),
    "early-clustering": ("Self-guided MAE Fig. 3: gap and token-relation KL over checkpoints.", _no_flags),
    "token-relation-kl": ("KL of token relations against --final, per layer.", _token_relation_kl_flags),
    "exploitation-rate": ("Self-guided MAE Fig. 4: decoder exploitation rates.", _no_flags),
    "attention-nmi": ("Self-guided MAE Fig. 6: attention NMI per layer.", _no_flags),
    "informed-masks": ("Self-guided MAE Fig. 5: random vs informed masks.", _informed_masks_flags),
}


def subcommand_flags(name):
    """The flags of one subcommand, on a ``FlagValues`` of their own (each
    subcommand has its own flags and defaults)."""
    fv = cli.new_flags()
    define_common_flags(fv)
    SUBCOMMANDS[name][1](fv)
    return fv


FLAGS = {name: subcommand_flags(name) for name in SUBCOMMANDS}


def usage():
    """``--help``: the docstring, then each subcommand's flags."""
    parts = [
        __doc__.strip(),
        "usage: python tools/analyze.py SUBCOMMAND --checkpoint=PATH [flags] (SUBCOMMAND --help: its flags)",
    ]
    for name, (what, _) in SUBCOMMANDS.items():
        parts.append(f"{name}: {what}\n{FLAGS[name].get_help(include_special_flags=False)}")
    return "\n\n".join(parts) + "\n"


def parse_args(argv):
    """``(subcommand, flag values as attributes)`` from the command-line
    arguments ``argv`` (default ``sys.argv[1:]``): the subcommand first, then
    its flags. A bad command line ends in one line (:func:`cli.fail`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in cli.HELP:
        if argv:
            print(usage(), flush=True)
            sys.exit(0)
        cli.fail(f"a subcommand is needed: one of {', '.join(SUBCOMMANDS)}.")
    command = argv[0]
    if command not in SUBCOMMANDS:
        cli.fail(f"unknown subcommand {command!r}; choose one of {', '.join(SUBCOMMANDS)}.")
    fv = FLAGS[command]
    extra = cli.parse(fv, argv[1:], f"{__doc__.splitlines()[0]}\n\n{command}: {SUBCOMMANDS[command][0]}")
    if extra:
        cli.fail(f"unexpected arguments: {' '.join(extra)}")
    values = fv.flag_values_dict()
    if values.get("query") is not None:
        values["query"] = [int(q) for q in values["query"]]
    return types.SimpleNamespace(**values, command=command)


def main(argv=None):
    """Runs one subcommand; ``argv``: the command-line arguments (default
    ``sys.argv[1:]``). Returns ``{"command", "csv", "png"}``."""
    args = parse_args(argv)
    try:
        ctx = Context(args)
        csv_path = COMMANDS[args.command](ctx)
    except (UsageError, ValueError) as e:
        cli.fail(str(e))
    result = {"command": args.command, "csv": csv_path, "png": ctx.path(".png")}
    if getattr(ctx, "summary", None):
        result["summary"] = ctx.summary
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
