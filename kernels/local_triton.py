"""CLEAR local attention on the block-sparse Triton core (pattern ``"local"``).

Image tokens are cut into spatial tiles (``tiling.build_tile_layout``); the
block table is derived analytically from each tile's bounding box of valid
coordinates.  With ``D2 = max_sq_dist(radius)`` (integer squared distances
``<= D2`` are visible):

* image query tile -> image key tile: visited iff the nearest distance between
  the two boxes is within the circle (``sum(gap**2) <= D2``); *full* (no
  element mask) iff the farthest pair of corners is (``sum(far**2) <= D2``)
  and the key tile has no padding slot.  Only boundary tiles run the kernel's
  ``MODE_CIRCLE`` element test;
* every query tile -> text key blocks: visited (full unless padded);
* text query blocks -> every image key block (full unless padded);
* pooled tokens (``kx``/``vx``) are *extra* key blocks after the sequence:
  visited by image query tiles only (full unless padded).
"""
from __future__ import annotations

import torch

from .blocksparse import MODE_CIRCLE, BlockPlan, register_planner, sparse_attention, tables_from_matrix
from .patterns import max_sq_dist
from .tiling import _BIG, EXTRA, PAD, build_tile_layout

__all__ = ["local_plan", "local_triton", "encode", "block_tables"]


def encode(grid, text_len, text_first, n_pooled):
    """The planner's integer key of one geometry."""
    return [int(grid[0]), int(grid[1]), int(text_len), int(bool(text_first)), int(n_pooled)]


def block_tables(lo, hi, klo, khi, d2):
    """``(visit, full)`` bool ``[nQ, nK]`` between query boxes ``lo/hi`` ``[nQ, 2]`` and key boxes
    ``klo/khi`` ``[nK, 2]`` (inclusive integer coordinates) for a circle of max squared distance ``d2``."""
    gap = torch.clamp(torch.maximum(klo[None] - hi[:, None], lo[:, None] - khi[None]), min=0)
    far = torch.maximum(hi[:, None] - klo[None], khi[None] - lo[:, None])
    visit = (gap * gap).sum(-1) <= d2
    full = visit & ((far * far).sum(-1) <= d2)
    return visit, full


@register_planner("local")
def local_plan(ints, floats, block, device):
    h, w, text_len, text_first, n_pooled = ints
    (radius,) = floats
    d2 = max_sq_dist(radius)
    device = torch.device(device)
    layout = build_tile_layout((h, w), (1, 1), block, text_len, bool(text_first), device)
    nb, ni = layout.n_blocks, layout.n_img_blocks
    nx = -(-n_pooled // block)
    dense = layout.blk_dense
    visit = torch.zeros(nb, nb + nx, dtype=torch.bool)
    full = torch.zeros(nb, nb + nx, dtype=torch.bool)
    # image tiles -> image tiles: the circle, from tile bounding boxes
    v_ii, f_ii = block_tables(layout.blk_lo, layout.blk_hi, layout.blk_lo, layout.blk_hi, d2)
    visit[:ni, :ni] = v_ii
    full[:ni, :ni] = f_ii & dense[None, :ni]
    # text keys: visible to every query; text queries: every image and text key
    visit[:, ni:nb] = True
    visit[ni:, :nb] = True
    full[:, ni:nb] = dense[None, ni:]
    full[ni:, :nb] = dense[None, :]
    # pooled (extra) keys: image queries only
    x_dense = torch.arange(nx) < n_pooled // block
    visit[:ni, nb:] = True
    full[:ni, nb:] = x_dense[None]
    tables = tables_from_matrix(visit, full, device)
    x_flag = torch.where(torch.arange(nx * block) < n_pooled, EXTRA, PAD).to(torch.int32).to(device)
    kflag = torch.cat([layout.flag, x_flag])
    kpos = torch.cat([layout.real, torch.full((nx * block, 3), _BIG, dtype=torch.int32, device=device)])
    plan = BlockPlan(*tables, qflag=layout.flag, kflag=kflag, qlo=layout.real, qhi=layout.real, kpos=kpos,
                     mode=MODE_CIRCLE, ndim=2, block=block, r2=d2 + 0.5)
    return layout, plan


def local_triton(q, k, v, grid, radius, text_len, text_first, kx, vx, scale, block=None):
    """Local attention on the Triton block-sparse core; ``kx``/``vx``: pooled tokens ``[B, P, H, D]`` or None."""
    n_pooled = 0 if kx is None else kx.shape[1]
    if kx is not None:
        kx, vx = kx.to(k.dtype), vx.to(v.dtype)
    return sparse_attention(q, k, v, "local", encode(grid, text_len, text_first, n_pooled), (float(radius),),
                            scale=scale, kx=kx, vx=vx, block=block)

