import numpy as np
import pytest

from keras_lcmae.ops import get_2d_sincos_pos_embed, grid_shape, patchify, resize_pos_embed, unpatchify
from tests.helpers import to_np


def official_patchify_nchw(imgs, p):
    """The official MAE patchify, re-derived in numpy on NCHW input."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = np.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def official_sincos(embed_dim, grid_size, cls_token=False):
    """get_2d_sincos_pos_embed of the official repository, re-derived in numpy."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("shape,p", [((2, 32, 32, 3), 8), ((3, 16, 24, 1), 4), ((1, 12, 12, 4), 6)])
def test_patchify_matches_official_layout(rng, shape, p):
    x = rng.normal(size=shape).astype("float32")
    ours = to_np(patchify(x, p))
    # The official code is square-only; its einsum extends to rectangles as is.
    ref = official_patchify_nchw(x.transpose(0, 3, 1, 2), p)
    np.testing.assert_array_equal(ours, ref)
    back = to_np(unpatchify(ours, p, grid_size=(shape[1] // p, shape[2] // p)))
    np.testing.assert_array_equal(back, x)


def test_patch_vector_order_is_row_col_channel():
    img = np.arange(4 * 4 * 2, dtype="float32").reshape(1, 4, 4, 2)
    patch0 = to_np(patchify(img, 2))[0, 0]
    expected = [img[0, r, c, ch] for r in range(2) for c in range(2) for ch in range(2)]
    np.testing.assert_array_equal(patch0, expected)


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible by patch size 8"):
        patchify(np.zeros((1, 30, 32, 3), "float32"), 8)
    with pytest.raises(ValueError, match="not divisible"):
        grid_shape(225, 16)


@pytest.mark.parametrize("dim,grid", [(32, 4), (64, 7), (768, 14)])
def test_sincos_table_is_official(dim, grid):
    np.testing.assert_allclose(
        get_2d_sincos_pos_embed(dim, grid, cls_token=True), official_sincos(dim, grid, cls_token=True), atol=1e-6
    )


def test_sincos_width_first_half():
    table = get_2d_sincos_pos_embed(16, (2, 3))
    # Patches 0 and 3 share a column (0), differ in row: first half equal.
    np.testing.assert_allclose(table[0, :8], table[3, :8])
    assert not np.allclose(table[0, 8:], table[3, 8:])


def test_sincos_matches_transformers_layout():
    torch = pytest.importorskip("torch")
    vit_mae = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    from transformers import ViTMAEConfig

    config = ViTMAEConfig(image_size=32, patch_size=4, hidden_size=64, num_channels=3)
    emb = vit_mae.ViTMAEEmbeddings(config)
    with torch.no_grad():
        emb.initialize_weights()
    np.testing.assert_allclose(
        emb.position_embeddings.detach().numpy()[0], get_2d_sincos_pos_embed(64, 8, cls_token=True), atol=1e-5
    )


def test_sincos_rejects_bad_width():
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(30, 4)


@pytest.mark.parametrize("old,new", [((4, 4), (6, 6)), ((14, 14), (16, 16)), ((7, 5), (3, 8)), ((4, 4), (4, 4))])
def test_resize_pos_embed_is_torch_bicubic(rng, old, new):
    """The official finetuning resamples the table with
    ``F.interpolate(mode="bicubic", align_corners=False)``, ``[CLS]`` kept."""
    torch = pytest.importorskip("torch")
    d = 8
    table = rng.normal(size=(1, 1 + old[0] * old[1], d)).astype("float32")
    grid = torch.tensor(table[0, 1:]).reshape(1, *old, d).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid.double(), size=new, mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(-1, d).numpy()
    got = resize_pos_embed(table, old, new)
    assert got.shape == (1, 1 + new[0] * new[1], d) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0, 0], table[0, 0])
    np.testing.assert_allclose(got[0, 1:], want, atol=1e-5)
    with pytest.raises(ValueError, match="does not hold 1 extra rows plus a 3x3 grid"):
        resize_pos_embed(table, 3, 5)
