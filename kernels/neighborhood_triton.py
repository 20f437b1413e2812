"""Neighborhood attention on the block-sparse Triton core.

The plan is derived analytically from the window rule of
``neighborhood_ref.axis_window_start``: per query slot the inclusive window
box in dilation-group coordinates; per query tile the union (blocks to visit)
and intersection (blocks that need no element mask) of its queries' boxes,
compared with every key tile's coordinate range.  Plans are cached per
geometry and device.
"""
from __future__ import annotations

import torch

from .blocksparse import MODE_BOX, BlockPlan, register_planner, sparse_attention, tables_from_matrix
from .patterns import axis_window_start
from .tiling import _BIG, IMAGE, build_tile_layout


def _window_boxes(layout, kernel_size, stride):
    """Per slot inclusive window bounds [Sp, 3] in group coordinates (pads/text: empty box; axes beyond
    the grid's: unbounded)."""
    nd = len(layout.grid)
    real = layout.real.to("cpu").long()
    img = layout.flag.to("cpu") == IMAGE
    lo = torch.full((real.shape[0], 3), _BIG, dtype=torch.int64)
    hi = torch.full((real.shape[0], 3), -_BIG, dtype=torch.int64)
    for a in range(nd):
        n, k, d, s = layout.grid[a], kernel_size[a], layout.dilation[a], stride[a]
        start, length = axis_window_start(n, k, d, s)
        c = real[img, a]
        st = (start[c] - c % d) // d
        lo[img, a] = st
        hi[img, a] = st + length[c] - 1
    # axes the grid does not have: unbounded (the kernel tests all three axes)
    lo[img, nd:] = -_BIG
    hi[img, nd:] = _BIG
    return lo, hi


def _encode(grid, kernel_size, dilation, stride, text_len, text_first):
    return [len(grid), *grid, *kernel_size, *dilation, *stride, int(text_len), int(text_first)]


@register_planner("neighborhood")
def neighborhood_plan(ints, floats, block, device):
    nd = ints[0]
    grid, kernel_size, dilation, stride = (tuple(ints[1 + i * nd:1 + (i + 1) * nd]) for i in range(4))
    text_len, text_first = ints[1 + 4 * nd], bool(ints[2 + 4 * nd])
    device = torch.device(device)
    layout = build_tile_layout(grid, dilation, block, text_len, text_first, device)
    lo, hi = _window_boxes(layout, kernel_size, stride)
    flag = layout.flag.to("cpu")
    nb, ni = layout.n_blocks, layout.n_img_blocks
    img = (flag == IMAGE).reshape(nb, block)[:ni, :, None]
    lo_b = lo.reshape(nb, block, 3)[:ni, :, :nd]
    hi_b = hi.reshape(nb, block, 3)[:ni, :, :nd]
    union_lo = torch.where(img, lo_b, _BIG).amin(1)
    union_hi = torch.where(img, hi_b, -_BIG).amax(1)
    inter_lo = torch.where(img, lo_b, -_BIG).amax(1)
    inter_hi = torch.where(img, hi_b, _BIG).amin(1)
    klo, khi = layout.blk_lo, layout.blk_hi  # [ni, nd]
    same = layout.blk_sub[:, None] == layout.blk_sub[None, :]
    visit_ii = same & ((klo[None] <= union_hi[:, None]) & (khi[None] >= union_lo[:, None])).all(-1)
    full_ii = visit_ii & ((klo[None] >= inter_lo[:, None]) & (khi[None] <= inter_hi[:, None])).all(-1)
    full_ii &= layout.blk_dense[None, :ni]
    visit = torch.ones(nb, nb, dtype=torch.bool)
    visit[:ni, :ni] = visit_ii
    full = visit & layout.blk_dense[None, :]
    full[:ni, :ni] = full_ii
    tables = tables_from_matrix(visit, full, device)
    lo3 = lo.clamp(-_BIG, _BIG).to(torch.int32).to(device)
    hi3 = hi.clamp(-_BIG, _BIG).to(torch.int32).to(device)
    plan = BlockPlan(*tables, qflag=layout.flag, kflag=layout.flag, qlo=lo3, qhi=hi3, kpos=layout.coords,
                     mode=MODE_BOX, ndim=nd, block=block)
    return layout, plan


def neighborhood_triton(q, k, v, grid, kernel_size, dilation, stride, text_len, text_first, scale, block=None):
    """Neighborhood attention on the Triton block-sparse core (arguments as the reference)."""
    ints = _encode(grid, kernel_size, dilation, stride, text_len, text_first)
    return sparse_attention(q, k, v, "neighborhood", ints, scale=scale, block=block)
