"""diffaccel.pattern: the keys a query attends to, read off a method's own op, equal the reference masks."""
import math

import numpy as np
import pytest
import torch

from diffaccel.kernels.local_ref import local_mask, pooled_grid
from diffaccel.kernels.moba_ref import block_partition, moba_mask, moba_select
from diffaccel.kernels.neighborhood_ref import neighborhood_mask
from diffaccel.ops import neighborhood_params
from diffaccel.pattern import NoPatternProbe, attention_core, capture_self_attention, visible_keys


def _row(mask, qi, text_len, text_first, n_img):
    """Image and text parts of row ``qi`` (an image query index) of a joint ``[S, S(+extra)]`` mask."""
    r = qi + (text_len if text_first else 0)
    row = mask[r]
    img = row[text_len:text_len + n_img] if text_first else row[:n_img]
    txt = row[:text_len] if text_first else row[n_img:n_img + text_len]
    return img.numpy(), txt.numpy()


@pytest.mark.parametrize("grid,options,text_len,text_first", [
    ((16, 16), dict(kernel_size=5), 20, True),
    ((12, 10), dict(kernel_size=(5, 3), dilation=(2, 1), stride=(1, 3)), 0, True),
    ((9, 11), dict(kernel_size=4, stride=4), 7, False),
])
def test_neighborhood_probe_equals_reference_mask(grid, options, text_len, text_first):
    core = attention_core("neighborhood", options, "flux")
    _, ks, dil, st = neighborhood_params(grid, options["kernel_size"], options.get("dilation", 1),
                                         options.get("stride", 1))
    ref = neighborhood_mask(grid, ks, dil, st, text_len, text_first)
    n = math.prod(grid)
    for query in [(0, 0), (grid[0] // 2, grid[1] // 2), (grid[0] - 1, 1), (3, grid[1] - 1)]:
        vis = visible_keys(core, grid, query, text_len=text_len, text_first=text_first, chunk=64)
        img, txt = _row(ref, int(np.ravel_multi_index(query, grid)), text_len, text_first, n)
        np.testing.assert_array_equal(vis.image[0].reshape(-1), img)
        np.testing.assert_array_equal(vis.text[0], txt)
        assert vis.extra.tolist() == [0]


def test_neighborhood_video_grid():
    grid = (4, 6, 6)
    core = attention_core("neighborhood", dict(kernel_size=(3, 3, 5)), "wan")
    ref = neighborhood_mask(grid, (3, 3, 5), (1, 1, 1), (1, 1, 1))
    vis = visible_keys(core, grid, (3, 0, 5), chunk=32)
    np.testing.assert_array_equal(vis.image[0].reshape(-1), ref[int(np.ravel_multi_index((3, 0, 5), grid))].numpy())


@pytest.mark.parametrize("radius,down_factor", [(3, None), (2.5, 4), (4, 3)])
def test_clear_probe_equals_reference_and_counts_pooled_tokens(radius, down_factor):
    grid, text_len = (10, 13), 5
    core = attention_core("clear", dict(radius=radius, down_factor=down_factor), "flux")
    n_pooled = math.prod(pooled_grid(grid, down_factor))
    ref = local_mask(grid, radius, text_len, True, n_pooled)
    for query in [(0, 0), (5, 6), (9, 12)]:
        vis = visible_keys(core, grid, query, text_len=text_len)
        img, txt = _row(ref, int(np.ravel_multi_index(query, grid)), text_len, True, math.prod(grid))
        np.testing.assert_array_equal(vis.image[0].reshape(-1), img)
        np.testing.assert_array_equal(vis.text[0], txt)
        assert vis.extra.tolist() == [n_pooled]


@pytest.mark.parametrize("options", [dict(block=(4, 4), topk=3), dict(block=(3, 5), threshold=0.4),
                                     dict(block=(4, 4), topk=2, selection="head")])
def test_moba_probe_with_real_qk_equals_reference_selection(options):
    """MoBA selects from the data: the probe scales q (exact in floating point), which keeps the gate's ranking."""
    grid, text_len, heads = (12, 12), 6, 3
    g = torch.Generator().manual_seed(0)
    S = text_len + math.prod(grid)
    q = torch.randn(S, heads, 16, generator=g)
    k = torch.randn(S, heads, 16, generator=g)
    core = attention_core("moba", options, "flux")
    part = block_partition(grid, options["block"])
    sel = moba_select(q[None], k[None], grid, options["block"], options.get("topk"), options.get("threshold"),
                      options.get("selection", "query"), text_len, True)
    ref = moba_mask(sel, part, text_len, True)[0]  # [H, S, S]
    for query in [(0, 0), (7, 4), (11, 11)]:
        vis = visible_keys(core, grid, query, text_len=text_len, q=q, k=k, chunk=64)
        qi = int(np.ravel_multi_index(query, grid))
        for h in range(heads):
            img, txt = _row(ref[h], qi, text_len, True, math.prod(grid))
            np.testing.assert_array_equal(vis.image[h].reshape(-1), img)
            assert txt.all() and vis.text[h].all()
    assert 0 < vis.share.mean() < 1


def test_moba_cycles_partitions_by_layer():
    opts = dict(partitions=[(4, 4), (2, 8)], topk=1)
    grid = (8, 8)
    first = visible_keys(attention_core("moba", opts, "flux", layer=0), grid, (0, 0), q=torch.randn(64, 1, 8),
                         k=torch.randn(64, 1, 8))
    second = visible_keys(attention_core("moba", opts, "flux", layer=1), grid, (0, 0), q=torch.randn(64, 1, 8),
                          k=torch.randn(64, 1, 8))
    assert first.image[0].sum() == 16 and first.image[0][:4, :4].all()  # topk=1: the own block only
    assert second.image[0].sum() == 16 and second.image[0][:2, :8].all()


@pytest.mark.parametrize("method,family,options", [("dense", "flux", None), ("linfusion", "unet", {})])
def test_full_patterns_see_every_key(method, family, options):
    vis = visible_keys(attention_core(method, options, family), (6, 7), (2, 3))
    assert vis.image.all()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="kernel_size"):
        attention_core("neighborhood", dict(kernel_size="abc"), "flux")
    with pytest.raises(ValueError, match="unknown option"):
        attention_core("neighborhood", dict(kernel_size=3, nonsense=1), "flux")
    with pytest.raises(ValueError, match="does not support 'flux'"):
        attention_core("linfusion", {}, "flux")
    with pytest.raises(ValueError, match="dense .* takes no options"):
        attention_core("dense", dict(kernel_size=3), "flux")
    core = attention_core("neighborhood", dict(kernel_size=3), "flux")
    with pytest.raises(ValueError, match="query"):
        visible_keys(core, (4, 4), (4, 0))
    with pytest.raises(NoPatternProbe, match="exceed"):
        visible_keys(core, (200, 200), (0, 0))


def test_capture_self_attention_records_the_first_layer_and_stops():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    h = w = 4
    axes = (torch.zeros(1), torch.arange(h).float(), torch.arange(w).float())
    ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    kwargs = dict(hidden_states=torch.randn(1, h * w, 4), encoder_hidden_states=torch.randn(1, 3, 16),
                  pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]),
                  img_ids=ids.reshape(-1, 3).float(), txt_ids=torch.zeros(3, 3), return_dict=False)
    seen = []
    model.transformer_blocks[1].register_forward_pre_hook(lambda *a: seen.append(1))
    q, k = capture_self_attention(model, (), kwargs, n_tokens=3 + h * w)
    assert q.shape == k.shape == (1, 3 + h * w, 2, 8)
    assert not seen  # stopped inside the first block
    assert capture_self_attention(model, (), kwargs, n_tokens=7) is None  # no layer with 7 tokens
