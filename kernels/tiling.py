"""Token reordering into spatial tiles: the geometry every block-sparse pattern shares.

The image/video grid is cut into its dilation groups (coordinate mod dilation
on each axis), each group into tiles of ``tile`` group coordinates, and every
tile is laid out as one block of ``block`` consecutive *slots* (row-major
inside the tile, padded when the tile is clipped by the border or smaller than
the block).  Text tokens follow as their own blocks.  A query block is then a
2-D/3-D tile and most key blocks it visits are either fully visible or not
visited at all, so element masks are only needed on the boundary of a pattern.

Slot flags: ``IMAGE`` (0), ``TEXT`` (1), ``PAD`` (2), ``EXTRA`` (3, key-only
tokens such as CLEAR's pooled tokens, appended by the pattern).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

IMAGE, TEXT, PAD, EXTRA = 0, 1, 2, 3
_BIG = 1 << 30


def _next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def choose_tile(group_sizes, block):
    """A tile shape (one power of two per axis, product <= block) for the grid.

    Grows spatial axes first (squarish 2-D tiles, e.g. 8x8 or 8x16 for 64/128),
    the temporal axis of a 3-D grid last, never beyond an axis' padded size.
    """
    nd = len(group_sizes)
    tile = [1] * nd
    caps = [_next_pow2(n) for n in group_sizes]
    weight = [4 if (nd == 3 and a == 0) else 1 for a in range(nd)]
    while math.prod(tile) < block:
        cands = [a for a in range(nd) if tile[a] < caps[a]]
        if not cands:
            break
        a = min(cands, key=lambda a: (tile[a] * weight[a], -a))
        tile[a] *= 2
    return tuple(tile)


@dataclass
class TileLayout:
    """Tiled order of one [text; grid] (or [grid; text]) sequence."""

    grid: tuple
    dilation: tuple
    tile: tuple
    block: int
    text_len: int
    text_first: bool
    perm: torch.Tensor  # [Sp] int64: original token index of each slot (pads -> 0)
    inv: torch.Tensor  # [S] int64: slot of each original token
    flag: torch.Tensor  # [Sp] int32: IMAGE / TEXT / PAD
    coords: torch.Tensor  # [Sp, 3] int32: group coordinates of image slots (others _BIG)
    real: torch.Tensor  # [Sp, 3] int32: real grid coordinates of image slots (others _BIG)
    n_img_blocks: int
    n_text_blocks: int
    blk_sub: torch.Tensor  # [n_img_blocks] int64: dilation-group id of each image block
    blk_lo: torch.Tensor  # [n_img_blocks, nd] int64: min group coordinate of valid slots
    blk_hi: torch.Tensor  # [n_img_blocks, nd] int64: max group coordinate of valid slots
    blk_dense: torch.Tensor  # [n_blocks] bool: block has no padding slot

    @property
    def n_blocks(self):
        return self.n_img_blocks + self.n_text_blocks

    @property
    def num_slots(self):
        return self.n_blocks * self.block

    def gather(self, x):
        """[B, S, H, D] -> [B, Sp, H, D] in slot order (pads duplicate token 0)."""
        return x.index_select(1, self.perm)

    def scatter(self, x):
        """[B, Sp, H, D] in slot order -> [B, S, H, D] in token order."""
        return x.index_select(1, self.inv)


def build_tile_layout(grid, dilation, block, text_len, text_first, device, tile=None):
    nd = len(grid)
    img_off = text_len if text_first else 0
    txt_off = 0 if text_first else math.prod(grid)
    group_max = [(n + d - 1) // d for n, d in zip(grid, dilation)]
    if tile is None:
        tile = choose_tile(group_max, block)
    if math.prod(tile) > block:
        raise ValueError(f"tile {tile} holds more than block={block} tokens")
    local = torch.tensor(list(itertools.product(*[range(t) for t in tile])), dtype=torch.int64).reshape(-1, nd)
    g = torch.tensor(grid, dtype=torch.int64)
    strides = torch.tensor([math.prod(grid[a + 1:]) for a in range(nd)], dtype=torch.int64)
    perms, flags, coords, reals, subs, los, his = [], [], [], [], [], [], []
    for sub_id, gs in enumerate(itertools.product(*[range(d) for d in dilation])):
        gs_t = torch.tensor(gs, dtype=torch.int64)
        d_t = torch.tensor(dilation, dtype=torch.int64)
        ng = (g - gs_t + d_t - 1) // d_t
        nt = [(int(n) + t - 1) // t for n, t in zip(ng, tile)]
        tiles = torch.tensor(list(itertools.product(*[range(x) for x in nt])), dtype=torch.int64).reshape(-1, nd)
        gc = tiles[:, None, :] * torch.tensor(tile) + local[None]  # [T, L, nd]
        valid = (gc < ng).all(-1)  # [T, L]
        real = gs_t + d_t * gc
        flat = img_off + (real * strides).sum(-1)
        T, L = valid.shape
        pad = block - L
        flat = torch.where(valid, flat, 0)
        flat = torch.nn.functional.pad(flat, (0, pad))
        fl = torch.nn.functional.pad(torch.where(valid, IMAGE, PAD), (0, pad), value=PAD)
        vmask = torch.nn.functional.pad(valid, (0, pad))[..., None]
        gcp = torch.where(vmask, torch.nn.functional.pad(gc, (0, 0, 0, pad)), _BIG)
        rp = torch.where(vmask, torch.nn.functional.pad(real, (0, 0, 0, pad)), _BIG)
        perms.append(flat.reshape(-1))
        flags.append(fl.reshape(-1))
        coords.append(gcp.reshape(-1, nd))
        reals.append(rp.reshape(-1, nd))
        subs.append(torch.full((T,), sub_id, dtype=torch.int64))
        los.append(torch.where(valid[..., None], gc, _BIG).amin(1))
        his.append(torch.where(valid[..., None], gc, -_BIG).amax(1))
    n_img_blocks = sum(s.numel() for s in subs)
    n_text_blocks = (text_len + block - 1) // block
    tpos = torch.arange(n_text_blocks * block, dtype=torch.int64)
    tvalid = tpos < text_len
    perms.append(torch.where(tvalid, txt_off + tpos, 0))
    flags.append(torch.where(tvalid, TEXT, PAD))
    coords.append(torch.full((tpos.numel(), nd), _BIG, dtype=torch.int64))
    reals.append(torch.full((tpos.numel(), nd), _BIG, dtype=torch.int64))
    perm = torch.cat(perms)
    flag = torch.cat(flags).to(torch.int32)
    co = torch.cat(coords)
    re = torch.cat(reals)
    co3 = torch.full((perm.numel(), 3), _BIG, dtype=torch.int64)
    re3 = torch.full((perm.numel(), 3), _BIG, dtype=torch.int64)
    co3[:, :nd] = co
    re3[:, :nd] = re
    valid_slot = flag != PAD
    S = math.prod(grid) + text_len
    inv = torch.empty(S, dtype=torch.int64)
    inv[perm[valid_slot]] = torch.nonzero(valid_slot).squeeze(1)
    blk_dense = (flag.reshape(-1, block) != PAD).all(1)
    return TileLayout(
        grid=tuple(grid), dilation=tuple(dilation), tile=tuple(tile), block=block, text_len=text_len,
        text_first=text_first, perm=perm.to(device), inv=inv.to(device), flag=flag.to(device),
        coords=co3.to(torch.int32).to(device), real=re3.to(torch.int32).to(device),
        n_img_blocks=n_img_blocks, n_text_blocks=n_text_blocks, blk_sub=torch.cat(subs),
        blk_lo=torch.cat(los), blk_hi=torch.cat(his), blk_dense=blk_dense,
    )
