import argparse
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_lcmae import MAE, TransformerDecoder, ViTEncoder
from keras_lcmae.convert import (
    encoder_from_official_state_dict,
    export,
    export_official_state_dict,
    load_official_state_dict,
    load_pretrained,
    mae_from_official_state_dict,
    read_state_dict,
)
from keras_lcmae.errors import ArgumentError
from tests.helpers import to_np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_mae(channels=3):
    encoder = ViTEncoder(image_size=32, patch_size=8, num_channels=channels, hidden_dim=32, depth=2, num_heads=2)
    return MAE(encoder, TransformerDecoder(hidden_dim=32, depth=1, num_heads=4), seed=0)


def test_export_import_round_trip(rng):
    mae = tiny_mae()
    state = export_official_state_dict(mae)
    assert state["patch_embed.proj.weight"].shape == (32, 3, 8, 8)
    assert state["blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert state["decoder_pred.weight"].shape == (192, 32)
    copy = mae_from_official_state_dict(state, num_heads=2, decoder_num_heads=4)
    assert copy.encoder.depth == 2 and copy.decoder.depth == 1 and copy.encoder.image_size == (32, 32)
    x = rng.random((2, 32, 32, 3)).astype("float32")
    noise = rng.random((2, 16)).astype("float32")
    np.testing.assert_array_equal(to_np(copy(x, noise=noise)["pred"]), to_np(mae(x, noise=noise)["pred"]))


def test_patch_kernel_layout_is_the_conv(rng):
    """The converted conv weight applied as a strided convolution (numpy)
    equals our patch embedding."""
    mae = tiny_mae()
    w = export_official_state_dict(mae)["patch_embed.proj.weight"]  # (D, C, p, p)
    b = export_official_state_dict(mae)["patch_embed.proj.bias"]
    x = rng.random((1, 32, 32, 3)).astype("float32")
    patch = x[0, 8:16, 16:24, :]  # grid row 1, col 2 -> patch index 6
    conv = np.einsum("dcij,ijc->d", w, patch) + b
    ours = to_np(mae.encoder.patch_embed(x))[0, 6]
    np.testing.assert_allclose(ours, conv, atol=1e-5)


def test_own_position_table_wins(rng):
    mae = tiny_mae()
    state = export_official_state_dict(mae)
    state["pos_embed"] = rng.normal(size=state["pos_embed"].shape).astype("float32")
    copy = mae_from_official_state_dict(state, num_heads=2, decoder_num_heads=4)
    np.testing.assert_array_equal(to_np(copy.encoder.pos_embed), state["pos_embed"])


def test_encoder_only_and_finetuned_checkpoints(rng):
    mae = tiny_mae()
    state = export_official_state_dict(mae)
    x = rng.random((2, 32, 32, 3)).astype("float32")
    # A full pretraining checkpoint into an encoder: decoder keys skipped.
    encoder = ViTEncoder(image_size=32, patch_size=8, hidden_dim=32, depth=2, num_heads=2)
    report = load_official_state_dict(encoder, state)
    assert "decoder_pred.weight" in report["skipped"] and "mask_token" in report["skipped"]
    np.testing.assert_allclose(to_np(encoder(x)), to_np(mae.encoder(x)), atol=1e-6)
    # A finetuned (global pool) checkpoint: no decoder, no `norm`, has fc_norm + head.
    finetuned = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token", "norm."))}
    finetuned["fc_norm.weight"] = np.ones(32, "float32")
    finetuned["fc_norm.bias"] = np.zeros(32, "float32")
    finetuned["head.weight"] = np.zeros((10, 32), "float32")
    finetuned["head.bias"] = np.zeros(10, "float32")
    enc = encoder_from_official_state_dict(finetuned, num_heads=2)
    assert enc.final_norm is False
    assert tuple(enc(x).shape) == (2, 17, 32)


def test_bad_state_dicts_are_named(rng):
    mae = tiny_mae()
    state = export_official_state_dict(mae)
    missing = dict(state)
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\]"):
        load_official_state_dict(tiny_mae(), missing)
    extra = dict(state, **{"blocks.7.attn.qkv.weight": np.zeros((96, 32), "float32")})
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.7.attn.qkv.weight'\]"):
        load_official_state_dict(tiny_mae(), extra)
    load_official_state_dict(tiny_mae(), extra, strict=False)
    bad = dict(state, **{"blocks.0.attn.proj.weight": np.zeros((32, 16), "float32")})
    with pytest.raises(
        ValueError, match=r"blocks.0.attn.proj.weight: checkpoint shape \(32, 16\), model expects \(32, 32\)"
    ):
        load_official_state_dict(tiny_mae(), bad)
    with pytest.raises(ValueError, match="3-channel images .* num_channels=1"):
        load_official_state_dict(tiny_mae(channels=1), state)
    with pytest.raises(ValueError, match="mapping"):
        load_official_state_dict(tiny_mae(), [1, 2])


def test_bad_load_leaves_weights_untouched():
    mae = tiny_mae()
    before = [to_np(v).copy() for v in mae.weights]
    state = {k: v + 1 for k, v in export_official_state_dict(mae).items()}
    del state["norm.bias"]
    with pytest.raises(ValueError):
        load_official_state_dict(mae, state)
    for a, v in zip(before, mae.weights):
        np.testing.assert_array_equal(a, to_np(v))


def _run_tool(*args):
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_mae_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.tf_only
def test_tool_converts_npz_and_pth(tmp_path, rng):
    torch = pytest.importorskip("torch")
    mae = tiny_mae()
    state = export_official_state_dict(mae)
    npz = os.path.join(tmp_path, "ckpt.npz")
    np.savez(npz, **state)
    pth = os.path.join(tmp_path, "ckpt.pth")
    # laid out as the official main_pretrain.py saves: model, optimizer state,
    # epoch, loss-scaler state and the run's argparse.Namespace
    params = {k: torch.tensor(v) for k, v in state.items()}
    weight = torch.nn.Parameter(params["cls_token"].clone())
    adam = torch.optim.AdamW([weight])
    weight.sum().backward()
    adam.step()  # the state then holds step counts and moment tensors, as a real run's
    run_args = argparse.Namespace(batch_size=64, model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True)
    torch.save(
        {"model": params, "optimizer": adam.state_dict(), "epoch": 3, "scaler": {"scale": 65536.0}, "args": run_args},
        pth,
    )
    x = rng.random((2, 32, 32, 3)).astype("float32")
    noise = rng.random((2, 16)).astype("float32")
    for src in (npz, pth):
        out = os.path.join(tmp_path, os.path.basename(src) + ".keras")
        result = _run_tool("--input", src, "--output", out, "--num_heads", "2", "--decoder_num_heads", "4")
        assert result.returncode == 0, result.stderr[-2000:]
        loaded = keras.saving.load_model(out, safe_mode=True)
        np.testing.assert_allclose(to_np(loaded(x, noise=noise)["pred"]), to_np(mae(x, noise=noise)["pred"]), atol=1e-6)
    enc_out = os.path.join(tmp_path, "enc.keras")
    assert _run_tool("--input", npz, "--output", enc_out, "--num_heads", "2", "--encoder_only").returncode == 0
    assert isinstance(keras.saving.load_model(enc_out), ViTEncoder)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.tf_only
def test_tool_refuses_code_in_checkpoints(tmp_path):
    torch = pytest.importorskip("torch")
    pth = os.path.join(tmp_path, "evil.pth")
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "payload": _Payload()}, pth)
    result = _run_tool("--input", pth, "--output", os.path.join(tmp_path, "x.keras"), "--num_heads", "2")
    assert result.returncode == 2
    assert "weights-only" in result.stderr and "pwned" not in result.stdout
    missing = _run_tool("--input", os.path.join(tmp_path, "none.npz"), "--output", "x.keras")
    assert missing.returncode == 2 and "no such file" in missing.stderr


# -- checkpoint files: export, read_state_dict, load_pretrained ---------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pth"])
def test_export_then_load_pretrained_gives_the_same_model(tmp_path, rng, suffix):
    """MAE -> official-layout file -> MAE: same prediction and loss for the same noise."""
    if suffix == ".pth":
        pytest.importorskip("torch")
    mae = tiny_mae()
    path = export(mae, os.path.join(tmp_path, "sub", "mae" + suffix))
    assert sorted(read_state_dict(path)) == sorted(export_official_state_dict(mae))
    copy = load_pretrained(path, num_heads=2, decoder_num_heads=4)
    assert isinstance(copy, MAE) and copy.get_config()["decoder"] == mae.get_config()["decoder"]
    x = rng.random((2, 32, 32, 3)).astype("float32")
    noise = rng.random((2, 16)).astype("float32")
    ours, theirs = mae(x, noise=noise), copy(x, noise=noise)
    np.testing.assert_allclose(to_np(theirs["pred"]), to_np(ours["pred"]), atol=1e-5)
    loss = lambda m, out: float(to_np(m.forward_loss(x, out["pred"], out["mask"])))  # noqa: E731
    assert abs(loss(copy, theirs) - loss(mae, ours)) < 1e-5
    encoder = load_pretrained(path, num_heads=2, encoder_only=True)
    np.testing.assert_allclose(to_np(encoder(x)), to_np(mae.encoder(x)), atol=1e-5)


@pytest.mark.tf_only
def test_exported_files_have_the_official_layout(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    mae = tiny_mae()
    state = export_official_state_dict(mae)
    tensors = load_file(export(mae, os.path.join(tmp_path, "m.safetensors")))  # what timm reads
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: v.shape for k, v in state.items()}
    ckpt = torch.load(export(mae, os.path.join(tmp_path, "m.pth")), weights_only=True)  # official scripts: ["model"]
    np.testing.assert_array_equal(ckpt["model"]["decoder_pred.weight"].numpy(), state["decoder_pred.weight"])
    encoder_only = read_state_dict(export(mae.encoder, os.path.join(tmp_path, "e.safetensors")))
    assert "cls_token" in encoder_only and not any(k.startswith("decoder") for k in encoder_only)


@pytest.mark.tf_only
def test_checkpoint_files_refuse_code_and_name_the_problem(tmp_path):
    torch = pytest.importorskip("torch")
    marker = os.path.join(tmp_path, "ran")

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (marker,))

    evil = os.path.join(tmp_path, "evil.pth")
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "payload": Payload()}, evil)
    with pytest.raises(ArgumentError, match="weights-only") as info:
        read_state_dict(evil)
    assert info.value.argument == "path" and not os.path.exists(marker)
    with pytest.raises(ArgumentError, match="no such file"):
        load_pretrained(os.path.join(tmp_path, "none.safetensors"))
    with pytest.raises(ArgumentError, match="unknown checkpoint type"):
        read_state_dict(__file__)
    np.savez(os.path.join(tmp_path, "other.npz"), weight=np.zeros(3, "float32"))
    with pytest.raises(ArgumentError, match=r"no 'cls_token'.*\['weight'\]"):
        load_pretrained(os.path.join(tmp_path, "other.npz"))
    with pytest.raises(ArgumentError, match="must end in one of"):
        export(tiny_mae(), os.path.join(tmp_path, "m.h5"))
    np.savez(os.path.join(tmp_path, "odd.npz"), **export_official_state_dict(tiny_mae()))
    with pytest.raises(ArgumentError, match="num_heads"):  # width 32 is no standard ViT
        load_pretrained(os.path.join(tmp_path, "odd.npz"))


@pytest.mark.tf_only
def test_tool_exports_the_official_layout(tmp_path):
    mae = tiny_mae()
    src = os.path.join(tmp_path, "mae.keras")
    mae.save(src)
    out = os.path.join(tmp_path, "mae.safetensors")
    result = _run_tool("--input", src, "--output", out)
    assert result.returncode == 0, result.stderr[-2000:]
    state = read_state_dict(out)
    for key, value in export_official_state_dict(mae).items():
        np.testing.assert_array_equal(state[key], value)
    bad = _run_tool("--input", os.path.join(tmp_path, "none.pth"), "--output", out)
    assert bad.returncode == 2 and "--input: no such file" in bad.stderr


@pytest.mark.tf_only
def test_hf_folders_name_what_they_cannot_place(tmp_path):
    from keras_lcmae.convert import hf_to_official

    with pytest.raises(ArgumentError, match=r"no known ViT/ViTMAE layout: \['vit.encoder.layer.0.adapter.weight'\]"):
        hf_to_official(
            {"vit.embeddings.cls_token": np.zeros((1, 1, 4)), "vit.encoder.layer.0.adapter.weight": np.zeros(2)}
        )
    with pytest.raises(ArgumentError, match="attention.attention.query"):  # q without k and v
        hf_to_official({"vit.encoder.layer.0.attention.attention.query.weight": np.zeros((4, 4))})
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(ArgumentError, match="without a config.json"):
        load_pretrained(str(folder))
    (folder / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ArgumentError, match="no model.safetensors"):
        load_pretrained(str(folder))
    np.savez(folder / "x.npz", a=np.zeros(1))
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(1, "float32")}, str(folder / "model.safetensors"))
    with pytest.raises(ArgumentError, match="'bert' model"):
        load_pretrained(str(folder))


# -- keras-hub ---------------------------------------------------------------------


def _perturbed_encoder(**kwargs):
    encoder = ViTEncoder(image_size=32, patch_size=8, hidden_dim=32, depth=2, num_heads=2, **kwargs)
    gen = np.random.default_rng(3)
    for v in encoder.weights:  # LayerNorms off 1/0, the table off sin-cos
        v.assign(to_np(v) + 0.1 * gen.normal(size=v.shape).astype("float32"))
    return encoder


def test_keras_hub_round_trip_keeps_the_outputs(tmp_path, rng):
    pytest.importorskip("keras_hub")
    from keras_lcmae.convert import from_keras_hub, to_keras_hub

    encoder = _perturbed_encoder(layer_norm_epsilon=1e-5, mlp_ratio=2.0)
    x = rng.random((2, 32, 32, 3)).astype("float32")
    backbone = to_keras_hub(encoder)
    assert type(backbone).__name__ == "ViTBackbone"
    np.testing.assert_allclose(to_np(backbone(x)), to_np(encoder(x)), atol=1e-5)
    back = from_keras_hub(backbone)
    assert back.pos_embed_trainable and back.layer_norm_epsilon == 1e-5 and back.mlp_ratio == 2.0
    np.testing.assert_allclose(to_np(back(x)), to_np(encoder(x)), atol=1e-5)
    backbone.save_to_preset(str(tmp_path / "preset"))  # a keras-hub preset folder loads through load_pretrained
    np.testing.assert_allclose(to_np(load_pretrained(str(tmp_path / "preset"))(x)), to_np(encoder(x)), atol=1e-5)


@pytest.mark.tf_only
def test_keras_hub_says_what_does_not_carry_over():
    keras_hub = pytest.importorskip("keras_hub")
    from keras_lcmae.convert import from_keras_hub, to_keras_hub

    with pytest.raises(ArgumentError, match="final_norm=False"):
        to_keras_hub(ViTEncoder(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=2, final_norm=False))
    with pytest.raises(ArgumentError, match="qkv_bias=False"):
        to_keras_hub(ViTEncoder(image_size=32, patch_size=8, hidden_dim=32, depth=1, num_heads=2, qkv_bias=False))
    plain = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3),
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        use_class_token=False,
    )
    with pytest.raises(ArgumentError, match="use_class_token"):
        from_keras_hub(plain)


def test_load_pretrained_resamples_the_table_or_says_why_not(tmp_path):
    from keras_lcmae import rebuild_encoder

    mae = tiny_mae()
    path = export(mae, os.path.join(tmp_path, "mae.safetensors"))
    encoder = load_pretrained(path, num_heads=2, encoder_only=True, image_size=64, patch_size=8)
    assert tuple(encoder.image_size) == (64, 64)
    expected = rebuild_encoder(mae.encoder, image_size=64)  # the finetuning resampler
    np.testing.assert_allclose(to_np(encoder.pos_embed), to_np(expected.pos_embed), atol=1e-6)
    with pytest.raises(ArgumentError, match="8-px patches, not 16") as info:
        load_pretrained(path, num_heads=2, patch_size=16)
    assert info.value.argument == "patch_size"
    with pytest.raises(ArgumentError, match="encoder_only=True"):
        load_pretrained(path, num_heads=2, decoder_num_heads=4, image_size=64)
