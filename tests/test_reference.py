"""Our MAE against an independent official-semantics reference (transformers'
ViTMAE), for the same weights, images and noise, on the current backend."""

import numpy as np
import pytest

from keras_lcmae.convert import export_official_state_dict, mae_from_official_state_dict
from tests.helpers import to_np

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.reference import build_hf_mae, hf_forward, hf_to_official

CASES = {
    "rgb_normpix": dict(image_size=32, patch_size=8, num_channels=3, hidden=32, heads=2, dec_hidden=32, dec_heads=4),
    "grey_raw_p4": dict(
        image_size=32,
        patch_size=4,
        num_channels=1,
        hidden=48,
        heads=3,
        dec_hidden=64,
        dec_heads=2,
        dec_depth=1,
        norm_pix_loss=False,
        mask_ratio=0.6,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_loss_match_official(case, rng):
    kw = CASES[case]
    hf = build_hf_mae(**kw)
    state = hf_to_official(hf)
    mae = mae_from_official_state_dict(
        state,
        num_heads=kw["heads"],
        decoder_num_heads=kw["dec_heads"],
        norm_pix_loss=kw.get("norm_pix_loss", True),
        mask_ratio=kw.get("mask_ratio", 0.75),
    )
    n = (kw["image_size"] // kw["patch_size"]) ** 2
    images = rng.normal(size=(4, kw["image_size"], kw["image_size"], kw["num_channels"])).astype("float32")
    noise = rng.random((4, n)).astype("float32")
    ref = hf_forward(hf, images, noise)
    ours = mae(images, noise=noise, training=False)
    np.testing.assert_array_equal(to_np(ours["mask"]), ref["mask"])
    np.testing.assert_array_equal(to_np(ours["ids_restore"]), ref["ids_restore"])
    np.testing.assert_allclose(to_np(ours["latent"]), ref["latent"], atol=1e-4)
    np.testing.assert_allclose(to_np(ours["pred"]), ref["pred"], atol=1e-4)
    loss = float(to_np(mae.forward_loss(images, ours["pred"], ours["mask"])))
    np.testing.assert_allclose(loss, ref["loss"], atol=1e-5, rtol=0)
    # The loss Keras trains on is the same number.
    keras_loss = float(to_np(mae.compute_loss(x=images, y_pred=ours)))
    np.testing.assert_allclose(keras_loss, ref["loss"], atol=1e-5, rtol=0)
    # Export gives back the official arrays.
    exported = export_official_state_dict(mae)
    assert set(exported) == set(state)
    for key in state:
        np.testing.assert_array_equal(exported[key], state[key], err_msg=key)


def test_full_token_encoder_matches_official(rng):
    """ViTEncoder on all patches (downstream use) = the reference encoder with
    nothing masked and identity shuffle."""
    import torch
    from transformers import ViTMAEModel

    from keras_lcmae.convert import encoder_from_official_state_dict

    hf = build_hf_mae()
    state = hf_to_official(hf)
    encoder = encoder_from_official_state_dict(state, num_heads=2)
    hf.config.mask_ratio = 0.0
    vit = ViTMAEModel(hf.config).eval()
    vit.load_state_dict(hf.vit.state_dict())
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    noise = np.tile(np.arange(16, dtype="float32"), (2, 1))
    with torch.no_grad():
        ref = vit(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)), noise=torch.tensor(noise)).last_hidden_state
    np.testing.assert_allclose(to_np(encoder(images)), ref.numpy(), atol=1e-4)


# -- Hugging Face folders, as save_pretrained writes them --------------------------


def test_package_hf_mapping_equals_the_reference_mapping():
    """keras_lcmae.convert.hf_to_official (both transformers naming schemes)
    against this file's independent mapping of the in-memory names."""
    from keras_lcmae.convert import hf_to_official as package_mapping

    hf = build_hf_mae()
    theirs = hf_to_official(hf)
    ours = package_mapping({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_vitmae_folder_loads_into_mae_with_the_reference_outputs(tmp_path, rng):
    from keras_lcmae import MAE
    from keras_lcmae.convert import load_pretrained, read_state_dict

    hf = build_hf_mae(norm_pix_loss=True, mask_ratio=0.75)
    hf.save_pretrained(tmp_path)
    assert any("attention.attention.query" in k for k in read_state_dict(str(tmp_path / "model.safetensors")))
    mae = load_pretrained(str(tmp_path))
    assert isinstance(mae, MAE) and mae.norm_pix_loss and mae.encoder.layer_norm_epsilon == 1e-6
    images = rng.normal(size=(3, 32, 32, 3)).astype("float32")
    noise = rng.random((3, 16)).astype("float32")
    ref = hf_forward(hf, images, noise)
    ours = mae(images, noise=noise, training=False)
    np.testing.assert_array_equal(to_np(ours["mask"]), ref["mask"])
    np.testing.assert_allclose(to_np(ours["pred"]), ref["pred"], atol=1e-4)
    loss = float(to_np(mae.forward_loss(images, ours["pred"], ours["mask"])))
    np.testing.assert_allclose(loss, ref["loss"], atol=1e-5, rtol=0)
    encoder = load_pretrained(str(tmp_path), encoder_only=True)
    np.testing.assert_allclose(to_np(encoder(images)), to_np(mae.encoder(images)), atol=1e-5)


@pytest.mark.parametrize("head", [False, True], ids=["ViTModel", "ViTForImageClassification"])
def test_vit_folder_loads_into_vit_encoder(tmp_path, rng, head):
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    from keras_lcmae import ViTEncoder
    from keras_lcmae.convert import load_pretrained

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = (ViTForImageClassification(config) if head else ViTModel(config)).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim == 1 or "token" in name or "position" in name:
                param.add_(0.2 * torch.randn(param.shape))  # LayerNorms, biases, tokens off 1/0
    hf.save_pretrained(tmp_path)
    encoder = load_pretrained(str(tmp_path))
    assert isinstance(encoder, ViTEncoder) and encoder.layer_norm_epsilon == config.layer_norm_eps
    images = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    vit = hf.vit if head else hf
    with torch.no_grad():
        expected = vit(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    np.testing.assert_allclose(to_np(encoder(images)), expected, atol=1e-4)
