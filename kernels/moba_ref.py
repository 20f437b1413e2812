"""Mixture of block attention (MoBA / VMoBA for video DiTs): block partition, gate, selection rules
and a dense-mask reference, in plain PyTorch.

The image/video tokens of a grid ``(L,)``, ``(H, W)`` or ``(T, H, W)`` (row-major) are cut into
blocks of ``block`` tokens per axis (border blocks may be smaller); blocks are numbered row-major
over the block grid.  Each query scores every block with the dot product of the query and the
block's mean key (rounded to the inputs' dtype), accumulated in fp32 (no softmax scale), keeps its
*own* block (the block holding its position) and a few of the best other blocks, and attends to every
token of the chosen blocks.

Selection rules (``topk`` or ``threshold``):

* ``topk``: the own block plus the ``topk - 1`` best other blocks (``topk`` >= the number of
  blocks keeps every block).  Exact ties of fp32 scores (degenerate inputs, e.g.
  identical keys) are broken by ``torch.topk`` here and in the torch backend, by the lower block
  number in the Triton gate kernel; the scores themselves may differ in the last bit between the
  two (summation order), so near-ties can too.
* ``threshold`` (VMoBA's cumulative rule): per decision unit the scores are min-max normalised
  across blocks (a range <= 1e-6 is treated as 1); with ``own`` the normalised own-block score,
  ``total`` the sum over blocks and ``eps = 1e-6``, the other blocks are taken best first
  (ties: lower block number) until ``(own + taken) / (total + eps) >= threshold``, at least one
  (as VMoBA's release does) and at most all of them.

Selection granularity (``selection``):

* ``"query"``: one decision per query token and head (MoBA / VMoBA's ``query_head``).
* ``"tile"``: one decision per query *block* and head: the gate is scored with the mean query of
  the block, and every query of the block shares the choice.  Coarser and cheaper; on the Triton
  kernel every query tile then needs no element mask.
* ``"head"``: VMoBA's ``head_global``: one decision per (batch element, head) over all
  (query, block) pairs.  Every query keeps its own block; ``topk`` keeps the
  ``(topk - 1) * n_queries`` best other pairs of the head; ``threshold`` normalises across all
  pairs of the head and keeps the fewest best other pairs (at least one) reaching the threshold.
  Queries with a strong preference thus get more blocks than others.  (VMoBA's release pools the
  whole varlen batch; here each batch element decides on its own.)

Text tokens (``text_len``, before or after the grid): image queries see every text key and the
tokens of their selected blocks; text queries see every key.  The gate covers image blocks only.
Gradients never flow through the selection (as in MoBA).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from .reference import join_text_mask, masked_attention_reference

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
        xb = xb * part.valid[None, :, :, None, None]
    return (xb.sum(2) / part.sizes[None, :, None, None]).permute(0, 2, 1, 3)


def moba_gate(q_img, k_img, part, selection="query"):
    """fp32 gate scores: ``[B, H, N, n_blocks]`` (query / head selection) or ``[B, H, n_blocks, n_blocks]``
    (tile selection: rows are query blocks scored with their mean query).  Block means are rounded to
    the inputs' dtype (as MoBA's own gate keeps them; fp32 inputs: unchanged), so that 16-bit inputs
    can be scored on tensor cores; the products are accumulated in fp32."""
    kmean = block_means(k_img, part).to(k_img.dtype).float()
    if selection == "tile":
        rows = block_means(q_img, part).to(q_img.dtype).float()
    else:
        rows = q_img.float().permute(0, 2, 1, 3)
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


def moba_select(q, k, grid, block, topk=None, threshold=None, selection="query", text_len=0, text_first=True):
    """Selection of the image queries of a joint ``[B, S, H, D]`` sequence: bool ``[B, H, N, n_blocks]``."""
    part = block_partition(grid, block, q.device)
    img, _ = image_slices(part.n_tokens, text_len, text_first)
    return select_blocks(q[:, img], k[:, img], part, topk, threshold, selection)


def moba_mask(sel, part, text_len=0, text_first=True):
    """Dense visibility ``[B, H, S, S]`` from a selection ``[B, H, N, n_blocks]``."""
    img_mask = sel[..., part.token_block]  # [B, H, N, N]: query n sees key m iff it selected m's block
    B, H, N, _ = img_mask.shape
    base = join_text_mask(torch.zeros(N, N, dtype=torch.bool, device=sel.device), text_len, text_first)
    mask = base.expand(B, H, -1, -1).clone()
    img, _ = image_slices(N, text_len, text_first)
    mask[:, :, img, img] = img_mask
    return mask


def moba_reference(q, k, v, grid, block, topk=None, threshold=None, selection="query", text_len=0,
                   text_first=True, scale=None):
    """Reference mixture of block attention: the selection as a dense mask, fp32 softmax."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    part = block_partition(grid, block, q.device)
    sel = moba_select(q, k, grid, block, topk, threshold, selection, text_len, text_first)
    return masked_attention_reference(q, k, v, moba_mask(sel, part, text_len, text_first), scale)
