"""Attention patterns on torch FlexAttention.

Generic pieces (reusable by every pattern that can be written as a mask_mod):

* :func:`build_block_mask` turns a ``mask_mod`` into a ``BlockMask`` by
  evaluating it on chunks of query blocks, so no dense ``[Sq, Skv]`` mask is
  ever held in memory.
* :func:`flex_attention_with_mask_mod` runs ``[B, S, H, D]`` tensors through
  ``flex_attention`` with a ``BlockMask`` cached (small LRU) under a caller's
  hashable ``key``.  On CUDA ``flex_attention`` is compiled (once, cached); on
  CPU it runs eagerly unless ``DIFFACCEL_FLEX_COMPILE_CPU=1``.  Eager
  FlexAttention materialises the full ``[B, H, Sq, Skv]`` scores, so on CPU it
  is a correctness path, not a fast one (use the "torch" backend); compiling
  works on CPU with a C++ toolchain (static shapes), but costs tens of seconds
  per new shape.
  FlexAttention has no backward on CPU, so when autograd needs one there
  :func:`block_sparse_attention` evaluates the same ``mask_mod`` on the same
  ``BlockMask``'s blocks with differentiable gathers and SDPA.

A ``mask_mod(b, h, q_idx, kv_idx)`` used here must be made of broadcasting
tensor ops (comparisons, arithmetic, indexing of captured lookup tables), as
FlexAttention requires anyway: it is also called on broadcast index tensors.
It must not depend on ``b`` or ``h`` (BlockMasks here broadcast over batch and
heads), and every query should see at least one key.

Neighborhood attention (:func:`neighborhood_flex`) reorders the image tokens
so that each 128-token block is a spatial tile of one dilation group (fewer,
fuller key blocks per query block than row-major order), and its ``mask_mod``
looks visibility up in per-position coordinate tables and per-axis window
start / length tables (from ``axis_window_start``).
"""
from __future__ import annotations

import collections
import functools
import math
import os
import threading

import torch
import torch.nn.functional as F

from .patterns import axis_window_start

__all__ = [
    "BLOCK_SIZE",
    "block_sparse_attention",
    "build_block_mask",
    "cached_block_mask",
    "flex_attention_with_mask_mod",
    "image_tile_order",
    "neighborhood_flex",
    "neighborhood_mask_mod",
]

BLOCK_SIZE = 128
# Elements of mask_mod evaluated at once while building a BlockMask.
_EVAL_ELEMENTS = 1 << 22
_BLOCK_MASK_CACHE_SIZE = 32

_lock = threading.Lock()
_block_masks: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()


def _flex_api():
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    return BlockMask, flex_attention


def _compile_on_cpu():
    return os.environ.get("DIFFACCEL_FLEX_COMPILE_CPU", "0") == "1"


@functools.lru_cache(maxsize=None)
def _compiled_flex(device_type):
    _, flex_attention = _flex_api()
    # CPU: static shapes (inductor's C++ flex template failed to build once dynamic
    # shapes kicked in on a recompile, torch 2.13); CUDA: torch's default.
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def _flex_fn(device):
    _, flex_attention = _flex_api()
    if device.type == "cuda" or (device.type == "cpu" and _compile_on_cpu()):
        return _compiled_flex(device.type)
    return flex_attention


def _ordered(blocks):
    """Dense ``[nQB, nKB]`` 0/1 block table -> (num ``[1, 1, nQB]``, indices ``[1, 1, nQB, nKB]``), int32."""
    num = blocks.sum(dim=-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num[None, None].contiguous(), idx[None, None].contiguous()


def build_block_mask(mask_mod, q_len, kv_len, device, block_size=None):
    """A ``BlockMask`` (batch and head broadcast) for ``mask_mod`` over
    ``q_len x kv_len``, with fully visible blocks stored as full blocks.

    ``mask_mod`` is evaluated on chunks of query blocks against all keys (at
    most ``_EVAL_ELEMENTS`` at a time); positions past either length count as
    masked, as in ``torch``'s ``create_block_mask``."""
    BlockMask, _ = _flex_api()
    block_size = block_size or BLOCK_SIZE
    device = torch.device(device)
    n_qb, n_kb = -(-q_len // block_size), -(-kv_len // block_size)
    kv_pad = n_kb * block_size
    rows = max(1, _EVAL_ELEMENTS // (kv_pad * block_size)) * block_size
    zero = torch.zeros((), dtype=torch.int64, device=device)
    kv_idx = torch.arange(kv_pad, device=device)
    kv_ok = kv_idx < kv_len
    kv_safe = kv_idx.clamp(max=kv_len - 1)
    partial, full = [], []
    for lo in range(0, n_qb * block_size, rows):
        q_idx = torch.arange(lo, min(lo + rows, n_qb * block_size), device=device)
        q_ok = q_idx < q_len
        m = mask_mod(zero, zero, q_idx.clamp(max=q_len - 1)[:, None], kv_safe[None, :])
        m = m & q_ok[:, None] & kv_ok[None, :]
        count = m.view(-1, block_size, n_kb, block_size).sum(dim=(1, 3))
        partial.append((count > 0) & (count < block_size * block_size))
        full.append(count == block_size * block_size)
    partial, full = torch.cat(partial), torch.cat(full)
    kv_num, kv_indices = _ordered(partial)
    full_num, full_indices = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_indices, full_num, full_indices,
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(q_len, kv_len),
    )


def cached_block_mask(mask_mod, key, q_len, kv_len, device, block_size=None):
    """:func:`build_block_mask` behind a small LRU keyed on ``key`` (which must
    identify the mask) plus lengths, device and block size."""
    block_size = block_size or BLOCK_SIZE
    full_key = (key, q_len, kv_len, str(device), block_size)
    with _lock:
        bm = _block_masks.get(full_key)
        if bm is not None:
            _block_masks.move_to_end(full_key)
            return bm
    bm = build_block_mask(mask_mod, q_len, kv_len, device, block_size)
    with _lock:
        _block_masks[full_key] = bm
        while len(_block_masks) > _BLOCK_MASK_CACHE_SIZE:
            _block_masks.popitem(last=False)
    return bm


def block_sparse_attention(q, k, v, block_mask, scale):
    """Differentiable eager evaluation of ``flex_attention(q, k, v, block_mask=...)``
    on ``[B, H, S, D]`` tensors: every query block attends to the union of its
    partial and full key blocks (gathered, padded to the longest list), with
    ``block_mask.mask_mod`` evaluated on those pairs as an SDPA boolean mask.
    Used where FlexAttention has no backward (CPU)."""
    b, h, q_len, d = q.shape
    kv_len = k.shape[2]
    qb, kb = block_mask.BLOCK_SIZE
    n_qb, n_kb = -(-q_len // qb), -(-kv_len // kb)
    dev = q.device
    # Dense [nQB, nKB] table of blocks any query of the row may see.
    seen = torch.zeros(n_qb, n_kb + 1, dtype=torch.bool, device=dev)
    for num, idx in ((block_mask.kv_num_blocks, block_mask.kv_indices),
                     (block_mask.full_kv_num_blocks, block_mask.full_kv_indices)):
        if num is None:
            continue
        num, idx = num[0, 0, :n_qb].long(), idx[0, 0, :n_qb, :n_kb].long()
        live = torch.arange(idx.shape[-1], device=dev)[None, :] < num[:, None]
        seen.scatter_(1, torch.where(live, idx, n_kb), True)
    seen = seen[:, :n_kb]
    width = max(1, int(seen.sum(dim=1).max()))
    blocks = torch.argsort(seen.to(torch.int8), dim=1, descending=True, stable=True)[:, :width]
    block_ok = torch.gather(seen, 1, blocks)  # [nQB, width]
    kv_idx = (blocks[:, :, None] * kb + torch.arange(kb, device=dev)).reshape(n_qb, width * kb)
    kv_ok = block_ok.repeat_interleave(kb, dim=1) & (kv_idx < kv_len)
    kv_idx = kv_idx.clamp(max=kv_len - 1)
    q_idx = torch.arange(n_qb * qb, device=dev).view(n_qb, qb)
    q_ok = q_idx < q_len
    q_idx = q_idx.clamp(max=q_len - 1)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    mask = block_mask.mask_mod(zero, zero, q_idx[:, :, None], kv_idx[:, None, :]) & kv_ok[:, None, :]
    # Padded query rows see every gathered key (their output is dropped) so no row is empty.
    mask = mask | (~q_ok[:, :, None] & kv_ok[:, None, :])
    qg = q.index_select(2, q_idx.reshape(-1)).view(b, h, n_qb, qb, d).transpose(1, 2)
    kg = k.index_select(2, kv_idx.reshape(-1)).view(b, h, n_qb, width * kb, d).transpose(1, 2)
    vg = v.index_select(2, kv_idx.reshape(-1)).view(b, h, n_qb, width * kb, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        qg.reshape(b * n_qb, h, qb, d), kg.reshape(b * n_qb, h, width * kb, d),
        vg.reshape(b * n_qb, h, width * kb, d), attn_mask=mask.repeat(b, 1, 1)[:, None], scale=scale,
    )
    out = out.view(b, n_qb, h, qb, d).transpose(1, 2).reshape(b, h, n_qb * qb, d)
    return out[:, :, :q_len]


def flex_attention_with_mask_mod(q, k, v, mask_mod, key, scale, block_size=None):
    """Attention of ``[B, S, H, D]`` tensors restricted by ``mask_mod`` via FlexAttention.

    ``key`` is a hashable identifying the mask (same key => same mask for the
    same lengths and device); its ``BlockMask`` is built once and cached.
    ``block_size`` defaults to :data:`BLOCK_SIZE`.
    Returns ``[B, Sq, H, D]`` in q's dtype (FlexAttention accumulates in fp32).
    """
    block_mask = cached_block_mask(mask_mod, key, q.shape[1], k.shape[1], q.device, block_size)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and needs_grad:
        out = block_sparse_attention(qt, kt, vt, block_mask, scale)
    else:
        out = _flex_fn(q.device)(qt, kt, vt, block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------- neighborhood


def _tile_shape(grid_g, block_size):
    """A roughly cubic tile of at most ``block_size`` tokens over (dilation-group)
    axis lengths ``grid_g``: repeatedly double the shortest side that can grow
    (the last axis on ties), capped at the axis length."""
    tile = [1] * len(grid_g)
    while True:
        best = None
        for a in reversed(range(len(grid_g))):
            new = min(2 * tile[a], grid_g[a])
            if new > tile[a] and math.prod(tile) // tile[a] * new <= block_size:
                if best is None or tile[a] < tile[best]:
                    best = a
        if best is None:
            return tuple(tile)
        tile[best] = min(2 * tile[best], grid_g[best])


def _axis_order(n, d, t):
    """Order one axis: dilation group major, then tiles of ``t`` group coordinates.
    Returns per coordinate its (tile key, in-tile coordinate)."""
    i = torch.arange(n)
    g, gi = i % d, i // d
    return g * n + gi // t, gi % t


def image_tile_order(grid, dilation, block_size):
    """Permutation of the row-major image tokens into spatial tiles of one
    dilation group (``order[p]`` = row-major index of the token placed at ``p``)."""
    grid_g = [-(-n // d) for n, d in zip(grid, dilation)]
    tile = _tile_shape(grid_g, block_size)
    keys = [_axis_order(n, d, t) for n, d, t in zip(grid, dilation, tile)]
    nd = len(grid)
    tile_key = in_tile = torch.zeros((), dtype=torch.long)
    for a in range(nd):
        tk, it = keys[a]
        tile_key = tile_key[..., None] * (grid[a] * dilation[a]) + tk
        in_tile = in_tile[..., None] * tile[a] + it
    sort_key = tile_key.reshape(-1) * math.prod(tile) + in_tile.reshape(-1)
    return torch.argsort(sort_key, stable=True)


class _NeighborhoodLayout:
    """Lookup tables of one configuration (on ``device``) and its mask_mod."""

    def __init__(self, grid, kernel_size, dilation, stride, text_len, text_first, device, reorder, block_size):
        n_img = math.prod(grid)
        s_len = n_img + text_len
        off = text_len if text_first else 0
        order = image_tile_order(grid, dilation, block_size) if reorder else torch.arange(n_img)
        self.identity = not reorder or bool((order == torch.arange(n_img)).all())
        perm = torch.arange(s_len)
        perm[off:off + n_img] = order + off
        self.perm = None if self.identity else perm.to(device)
        self.inverse = None if self.identity else torch.argsort(perm).to(device)
        # Coordinates of the token at each sequence position (0 for text).
        coords = torch.zeros(len(grid), s_len, dtype=torch.int32)
        flat = order
        for a in reversed(range(len(grid))):
            coords[a, off:off + n_img] = (flat % grid[a]).to(torch.int32)
            flat = flat // grid[a]
        self.coords = [c.contiguous().to(device) for c in coords]
        self.starts, self.lengths = [], []
        for n, k, d, s in zip(grid, kernel_size, dilation, stride):
            st, ln = axis_window_start(n, k, d, s)
            self.starts.append(st.to(torch.int32).to(device))
            self.lengths.append(ln.to(torch.int32).to(device))
        self.mask_mod = neighborhood_mask_mod(self.coords, self.starts, self.lengths, dilation,
                                              text_len, text_first, n_img)


def neighborhood_mask_mod(coords, starts, lengths, dilation, text_len, text_first, n_img):
    """mask_mod of neighborhood attention.

    ``coords[a]`` ``[S]``: axis-``a`` coordinate of the image token at each
    sequence position; ``starts[a]``/``lengths[a]`` ``[n_a]``: window start
    (real coordinates) and length (group coordinates) of each axis-``a``
    coordinate.  Text (positions outside the image range) sees and is seen by
    everything."""
    lo, hi = (text_len, text_len + n_img) if text_first else (0, n_img)
    axes = list(zip(coords, starts, lengths, dilation))

    def mask_mod(b, h, q_idx, kv_idx):
        q_text = (q_idx < lo) | (q_idx >= hi)
        kv_text = (kv_idx < lo) | (kv_idx >= hi)
        seen = q_text | kv_text
        inside = ~seen
        for coord, start, length, d in axes:
            qc = coord[q_idx]
            rel = coord[kv_idx] - start[qc]
            ok = (rel >= 0) & (rel < length[qc] * d)
            if d > 1:
                ok = ok & (rel % d == 0)
            inside = inside & ok
        return seen | inside

    return mask_mod


@functools.lru_cache(maxsize=_BLOCK_MASK_CACHE_SIZE)
def _layout(grid, kernel_size, dilation, stride, text_len, text_first, device, reorder, block_size):
    return _NeighborhoodLayout(grid, kernel_size, dilation, stride, text_len, text_first, device, reorder, block_size)


def neighborhood_flex(q, k, v, grid, kernel_size, dilation, stride, text_len, text_first, scale, reorder=True,
                      block_size=None):
    """Neighborhood attention (NATTEN semantics, see ``neighborhood_ref``) on
    FlexAttention; ``[B, S, H, D]`` in and out, arguments already validated by
    ``diffaccel.ops.neighborhood_params``.  ``reorder`` tiles the image tokens
    (block sparsity) and restores the order on the output; ``block_size``
    (default :data:`BLOCK_SIZE`) is the BlockMask block and the tile volume."""
    block_size = block_size or BLOCK_SIZE
    config = (tuple(grid), tuple(kernel_size), tuple(dilation), tuple(stride), text_len, text_first)
    layout = _layout(*config, q.device, bool(reorder), block_size)
    if layout.perm is not None:
        q, k, v = (t.index_select(1, layout.perm) for t in (q, k, v))
    key = ("neighborhood",) + config + (bool(reorder),)
    out = flex_attention_with_mask_mod(q, k, v, layout.mask_mod, key, scale, block_size)
    if layout.perm is not None:
        out = out.index_select(1, layout.inverse)
    return out
