"""An independent reference of the official MAE: transformers' ViTMAE (PyTorch),
randomly initialised, every LayerNorm/bias/token perturbed away from 1/0 and the
official sin-cos tables (numpy re-derivation, ``tests/test_ops.py``) written into
its position embeddings (transformers 5.x leaves them at zero)."""

import numpy as np

from tests.test_ops import official_sincos


def build_hf_mae(
    image_size=32,
    patch_size=8,
    num_channels=3,
    hidden=32,
    depth=2,
    heads=2,
    dec_hidden=32,
    dec_depth=2,
    dec_heads=4,
    mlp_ratio=4,
    norm_pix_loss=True,
    mask_ratio=0.75,
    seed=0,
):
    import torch
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=hidden * mlp_ratio,
        decoder_hidden_size=dec_hidden,
        decoder_num_hidden_layers=dec_depth,
        decoder_num_attention_heads=dec_heads,
        decoder_intermediate_size=dec_hidden * mlp_ratio,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = ViTMAEForPreTraining(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    grid = image_size // patch_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "position_embeddings" in name or "decoder_pos_embed" in name:
                continue
            if param.ndim == 1 or "token" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
            elif "fc1" in name:
                # Larger pre-activations make exact-vs-tanh GELU differences visible.
                param.mul_(4.0)
        model.vit.embeddings.position_embeddings.copy_(
            torch.tensor(official_sincos(hidden, grid, cls_token=True), dtype=torch.float32)[None]
        )
        model.decoder.decoder_pos_embed.copy_(
            torch.tensor(official_sincos(dec_hidden, grid, cls_token=True), dtype=torch.float32)[None]
        )
    return model


def hf_to_official(model):
    """transformers ViTMAE state dict -> official facebookresearch/mae key layout."""
    sd = {k: v.detach().numpy().astype("float32") for k, v in model.state_dict().items()}
    out = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "decoder_embed.weight": sd["decoder.decoder_embed.weight"],
        "decoder_embed.bias": sd["decoder.decoder_embed.bias"],
        "mask_token": sd["decoder.mask_token"],
        "decoder_pos_embed": sd["decoder.decoder_pos_embed"],
        "decoder_norm.weight": sd["decoder.decoder_norm.weight"],
        "decoder_norm.bias": sd["decoder.decoder_norm.bias"],
        "decoder_pred.weight": sd["decoder.decoder_pred.weight"],
        "decoder_pred.bias": sd["decoder.decoder_pred.bias"],
    }
    for src, dst, n in (
        ("vit.layers", "blocks", model.config.num_hidden_layers),
        ("decoder.decoder_layers", "decoder_blocks", model.config.decoder_num_hidden_layers),
    ):
        for i in range(n):
            s, d = f"{src}.{i}", f"{dst}.{i}"
            a = f"{s}.attention"
            out[f"{d}.attn.qkv.weight"] = np.concatenate([sd[f"{a}.{x}_proj.weight"] for x in "qkv"], 0)
            out[f"{d}.attn.qkv.bias"] = np.concatenate([sd[f"{a}.{x}_proj.bias"] for x in "qkv"], 0)
            out[f"{d}.attn.proj.weight"] = sd[f"{a}.o_proj.weight"]
            out[f"{d}.attn.proj.bias"] = sd[f"{a}.o_proj.bias"]
            for ours, theirs in (
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                out[f"{d}.{ours}.weight"] = sd[f"{s}.{theirs}.weight"]
                out[f"{d}.{ours}.bias"] = sd[f"{s}.{theirs}.bias"]
    return out


def hf_forward(model, images_nhwc, noise):
    import torch

    with torch.no_grad():
        out = model(
            pixel_values=torch.tensor(images_nhwc.transpose(0, 3, 1, 2)),
            noise=torch.tensor(noise),
            output_hidden_states=False,
        )
        latent = model.vit(
            pixel_values=torch.tensor(images_nhwc.transpose(0, 3, 1, 2)), noise=torch.tensor(noise)
        ).last_hidden_state
    return {
        "pred": out.logits.numpy(),
        "mask": out.mask.numpy(),
        "ids_restore": out.ids_restore.numpy(),
        "latent": latent.numpy(),
        "loss": float(out.loss),
    }
