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

Non-finite inputs: a block whose mean key is not finite scores 0 for every query (:func:`gate_means`),
and a non-finite query scores as a zero query; the queries that select a block holding a non-finite
key or value get NaN (as every non-finite query does), the others never see it.

Text tokens (``text_len``, before or after the grid): image queries see every text key and the
tokens of their selected blocks; text queries see every key.  The gate covers image blocks only.
Gradients never flow through the selection (as in MoBA).
"""
from __future__ import annotations

import torch

from .moba_select import (  # noqa: F401  (the rules, re-exported for the tests)
    SELECTIONS,
    BlockPartition,
    block_means,
    block_partition,
    image_slices,
    moba_gate,
    select_blocks,
    select_head,
    select_rows,
)
from .reference import join_text_mask, masked_attention_reference

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
