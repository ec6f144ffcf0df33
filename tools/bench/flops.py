"""Model FLOPs of a training step, and the rates a record's step times give."""

import statistics

from bench.plan import FINETUNE_CLASSES, finetune_accum_steps


def forward_flops_per_image(c, method, mask_ratio=0.75, mlp_ratio=4):
    """Matmul FLOPs (two per multiply-add) of one image's forward pass through
    the network: the patch embedding of every patch, the encoder on ``[CLS]``
    + the visible tokens (all tokens for ``ae``), the decoder embedding, the
    decoder on ``[CLS]`` + every position, and the prediction head on the
    patch positions. Per block: the qkv, output and two MLP projections and
    the two attention products (``QK^T`` and ``AV``). LC-MAE embeds the
    patches once and runs the rest for each of its two views; its projector
    and loss matmuls are not counted (they are the loss's, and
    under 1 % of the network's at these sizes). Finetuning: the patch
    embedding and the encoder on all ``1 + N`` tokens, and the head.
    Elementwise work (norms, softmax, GELU) is not counted, as is usual for
    model FLOPs."""
    from keras_lcmae.masking import num_visible

    n = (c["image"] // c["patch"]) ** 2
    pix = c["patch"] ** 2 * 3

    def blocks(depth, tokens, width):
        dense = 2 * tokens * width * width * (3 + 1 + 2 * mlp_ratio)
        return depth * (dense + 4 * tokens * tokens * width)

    if finetune_accum_steps(method):
        return 2 * n * pix * c["width"] + blocks(c["depth"], 1 + n, c["width"]) + 2 * c["width"] * FINETUNE_CLASSES

    encoded = 1 + (n if method == "ae" else num_visible(n, mask_ratio))
    view = blocks(c["depth"], encoded, c["width"])
    view += 2 * encoded * c["width"] * c["dec_width"]
    view += blocks(c["dec_depth"], 1 + n, c["dec_width"])
    view += 2 * n * c["dec_width"] * pix  # AE(p): the block is the patch
    # LC-MAE embeds the patches once and runs the rest for each view
    return 2 * n * pix * c["width"] + view * (2 if method == "lcmae" else 1)


def train_flops_per_image(c, method):
    """Model FLOPs of one training step per image: 3 x the forward matmul
    FLOPs (the backward does two matmuls per forward one), the convention of
    model-FLOP utilisation (MFU)."""
    trained = method in ("mae", "lcmae", "ae") or finetune_accum_steps(method)
    return 3 * forward_flops_per_image(c, method) if trained else None


def with_rates(rec, times):
    """``rec`` with what its step times give: the median step, images/s, the
    achieved TFLOP/s of model FLOPs and, where the device's peak is known,
    the model-FLOP utilisation ``mfu``."""
    median = statistics.median(times)
    rec = dict(rec, median_step_s=round(median, 5))
    batch, flops, peak = rec.get("batch"), rec.get("flops_per_image"), rec.get("peak_tflops")
    rec["images_per_s"] = round(batch / median, 2) if batch else None
    tflops = flops * batch / median / 1e12 if batch and flops else None
    rec["tflops"] = float(f"{tflops:.4g}") if tflops is not None else None
    rec["mfu"] = float(f"{tflops / peak:.4g}") if tflops is not None and peak else None
    return rec
