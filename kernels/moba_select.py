"""Mixture of block attention: the block partition, the gate and the selection rules (the rules are
described in ``moba_ref``, whose dense-mask reference uses them).  Runtime code (``moba_torch``,
``moba_triton``) imports them from here, never from a ``*_ref`` module."""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

__all__ = ["SELECTIONS", "BlockPartition", "block_means", "block_partition", "gate_means", "image_slices", "moba_gate",
           "select_blocks", "select_head", "select_rows"]

SELECTIONS = ("query", "tile", "head")
_EPS = 1e-6


@dataclass(frozen=True)
class BlockPartition:
    """The MoBA blocks of one grid (on one device)."""

    grid: tuple
    block: tuple  # block size per axis, clamped to the grid
    block_grid: tuple  # number of blocks per axis
    n_blocks: int
    token_block: torch.Tensor  # [N] int64: block of every image token
    members: torch.Tensor  # [n_blocks, max_size] int64: image tokens of every block, row-major, padded with 0
    valid: torch.Tensor  # [n_blocks, max_size] bool
    sizes: torch.Tensor  # [n_blocks] int64

    @property
    def n_tokens(self):
        return self.token_block.numel()

    @property
    def uniform(self):
        """Whether every block holds ``max_size`` tokens (no partial border block)."""
        return bool(self.valid.all())


@functools.lru_cache(maxsize=64)
def _partition(grid, block, device):
    nd = len(grid)
    block = tuple(min(b, n) for b, n in zip(block, grid))
    bgrid = tuple((n + b - 1) // b for n, b in zip(grid, block))
    coords = torch.tensor(list(itertools.product(*[range(n) for n in grid])), dtype=torch.int64).reshape(-1, nd)
    bc = coords // torch.tensor(block)
    bstrides = torch.tensor([math.prod(bgrid[a + 1:]) for a in range(nd)], dtype=torch.int64)
    token_block = (bc * bstrides).sum(-1)
    n_blocks = math.prod(bgrid)
    sizes = torch.bincount(token_block, minlength=n_blocks)
    order = torch.argsort(token_block, stable=True)  # row-major inside each block
    start = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(order.numel()) - start[token_block[order]]
    width = int(sizes.max())
    members = torch.zeros(n_blocks, width, dtype=torch.int64)
    valid = torch.zeros(n_blocks, width, dtype=torch.bool)
    members[token_block[order], rank] = order
    valid[token_block[order], rank] = True
    dev = torch.device(device)
    return BlockPartition(grid, block, bgrid, n_blocks, token_block.to(dev), members.to(dev), valid.to(dev),
                          sizes.to(dev))


def block_partition(grid, block, device="cpu") -> BlockPartition:
    """The MoBA blocks of ``grid`` for ``block`` (one int per axis; larger than an axis = the whole axis).
    Cached per geometry and device."""
    return _partition(tuple(int(g) for g in grid), tuple(int(b) for b in block), str(torch.device(device)))


# ---------------------------------------------------------------------------------------------
# gate


def block_means(x, part):
    """Mean over each block's tokens: ``[B, N, H, D]`` -> fp32 ``[B, H, n_blocks, D]`` (fixed summation order)."""
    xb = x.float()[:, part.members]  # [B, nb, M, H, D]
    if not part.uniform:
        # where, not a product: a padding slot repeats token 0, and 0 * nan = nan
        xb = torch.where(part.valid[None, :, :, None, None], xb, 0.0)
    return (xb.sum(2) / part.sizes[None, :, None, None]).permute(0, 2, 1, 3)


def _finite_rows(x):
    """``x`` with every row (last dim) that is not all finite set to zero."""
    return torch.where(torch.isfinite(x).all(-1, keepdim=True), x, 0.0)


def gate_means(x, part):
    """:func:`block_means` as the gate uses them: a block whose mean is not finite (it holds a non-finite
    key, or query for tile selection) gets a zero mean, so it scores 0 for every query and the
    selection stays well defined, the same on every backend; whoever selects it sees the bad key.  The
    means are rounded to the inputs' dtype (as MoBA's own gate keeps them; fp32 inputs: unchanged), so
    16-bit inputs can be scored on tensor cores; the products are accumulated in fp32."""
    return _finite_rows(block_means(x, part).to(x.dtype).float())


def moba_gate(q_img, k_img, part, selection="query"):
    """fp32 gate scores: ``[B, H, N, n_blocks]`` (query / head selection) or ``[B, H, n_blocks, n_blocks]``
    (tile selection: rows are query blocks scored with their mean query)."""
    kmean = gate_means(k_img, part)
    if selection == "tile":
        rows = gate_means(q_img, part)
    else:
        rows = _finite_rows(q_img.float().permute(0, 2, 1, 3))
    return torch.matmul(rows, kmean.transpose(-1, -2))


# ---------------------------------------------------------------------------------------------
# selection rules


def _threshold_count(sorted_vals, own, total, threshold):
    """How many of the ``sorted_vals`` (best first, normalised, >= 0) VMoBA's rule takes: the fewest
    reaching ``threshold`` together with ``own`` (at least one, at most all).  Shapes ``[..., n]`` and
    ``[..., 1]``."""
    n = sorted_vals.shape[-1]
    remain = (threshold - own / (total + _EPS)).clamp(min=0.0)
    ratio = sorted_vals.cumsum(-1) / (total + _EPS)
    return ((ratio < remain).sum(-1, keepdim=True) + 1).clamp(max=n)


def select_rows(gate, own, topk=None, threshold=None):
    """Per-row selection: ``gate`` ``[..., R, C]`` fp32, ``own`` ``[R]`` int64 (the own block of each row)
    -> bool ``[..., R, C]`` with the own block and the chosen other blocks."""
    C = gate.shape[-1]
    own_mask = torch.nn.functional.one_hot(own, C).bool().expand_as(gate)
    if C == 1:
        return own_mask.clone()
    if topk is not None:
        if topk >= C:
            return torch.ones_like(own_mask)
        # the own block first (+inf), then the best others
        idx = gate.masked_fill(own_mask, float("inf")).topk(topk, dim=-1, sorted=False).indices
        return torch.zeros_like(own_mask).scatter_(-1, idx, True)
    mn = gate.amin(-1, keepdim=True)
    den = gate.amax(-1, keepdim=True) - mn
    den = torch.where(den <= _EPS, torch.ones_like(den), den)
    g = (gate - mn) / den
    own_val = torch.gather(g, -1, own.view(*(1,) * (g.dim() - 2), -1, 1).expand(*g.shape[:-1], 1))
    total = g.sum(-1, keepdim=True)
    vals, order = g.masked_fill(own_mask, float("-inf")).sort(dim=-1, descending=True, stable=True)
    vals, order = vals[..., :C - 1], order[..., :C - 1]  # the own block sorted last: drop it
    take = torch.arange(C - 1, device=g.device) < _threshold_count(vals, own_val, total, threshold)
    return own_mask.clone().scatter_(-1, order, take) | own_mask


def select_head(gate, own, topk=None, threshold=None):
    """VMoBA's per-head global selection: ``gate`` ``[B, H, N, C]`` fp32 -> bool ``[B, H, N, C]``."""
    B, H, N, C = gate.shape
    own_mask = torch.nn.functional.one_hot(own, C).bool().expand_as(gate)
    n_others = N * (C - 1)
    if n_others == 0:
        return own_mask.clone()
    if topk is not None:
        keep = min((topk - 1) * N, n_others)
        if keep == n_others:
            return torch.ones_like(own_mask)
        idx = gate.masked_fill(own_mask, float("-inf")).flatten(2).topk(keep, dim=-1, sorted=False).indices
        sel = torch.zeros(B, H, N * C, dtype=torch.bool, device=gate.device).scatter_(-1, idx, True)
        return sel.view(B, H, N, C) | own_mask
    mn = gate.amin((2, 3), keepdim=True)
    den = gate.amax((2, 3), keepdim=True) - mn
    den = torch.where(den <= _EPS, torch.ones_like(den), den)
    g = (gate - mn) / den
    own_sum = (g * own_mask).sum((2, 3)).unsqueeze(-1)  # [B, H, 1]
    total = g.sum((2, 3)).unsqueeze(-1)
    vals, order = g.masked_fill(own_mask, float("-inf")).flatten(2).sort(dim=-1, descending=True, stable=True)
    vals, order = vals[..., :n_others], order[..., :n_others]
    take = torch.arange(n_others, device=g.device) < _threshold_count(vals, own_sum, total, threshold)
    sel = torch.zeros(B, H, N * C, dtype=torch.bool, device=gate.device).scatter_(-1, order, take)
    return sel.view(B, H, N, C) | own_mask


@torch.no_grad()
def select_blocks(q_img, k_img, part, topk=None, threshold=None, selection="query"):
    """The selection of every image query: bool ``[B, H, N, n_blocks]`` (no gradient).

    ``q_img``/``k_img``: ``[B, N, H, D]``, the image tokens only."""
    gate = moba_gate(q_img, k_img, part, selection)
    if selection == "tile":
        sel = select_rows(gate, torch.arange(part.n_blocks, device=gate.device), topk, threshold)
        return sel[:, :, part.token_block]
    if selection == "head":
        return select_head(gate, part.token_block, topk, threshold)
    return select_rows(gate, part.token_block, topk, threshold)


def image_slices(n_img, text_len, text_first):
    """``(image, text)`` slices of the joint sequence."""
    if text_first:
        return slice(text_len, text_len + n_img), slice(0, text_len)
    return slice(0, n_img), slice(n_img, n_img + text_len)
