"""Neighborhood attention in portable eager PyTorch: tile and halo.

The image grid is cut into query tiles (per axis: runs of consecutive
coordinates of one dilation group; automatic run lengths are multiples of the
stride, so the queries of a stride block, which share a window, stay together).  A tile's queries can only see the union of
their windows, its *halo*: per axis the union of the windows of its
coordinates (from :func:`axis_window_start`), so in n-D the halo is the
Cartesian product of the per-axis halos and the element mask is the AND of
per-axis masks.  Every tile is padded to the same query count ``tq`` and halo
size ``hk`` (padded queries repeat a real one, padded keys are masked out), all
text keys are appended to every halo, and batched
``scaled_dot_product_attention`` with an additive 0/-inf mask does
``[B*tiles, H, tq, D] x [B*tiles, H, hk + text, D]`` (SDPA's kernels
accumulate half-precision inputs in fp32).  Text queries attend to every key
with plain SDPA.  Memory is ``O(tiles * hk)`` gathered keys per head instead
of ``O(S^2)``; the tile size per axis minimises a simple cost model
(:func:`choose_tiles`).

Everything is gathers (``index_select``) and SDPA, so autograd works.  The
only per-call Python loop is over chunks of tiles (about ``_CHUNK_BYTES`` of
gathered keys each, into reused scratch buffers) when no gradient is needed;
with autograd all tiles go in one call.  The index tables and masks are planned once per
``(grid, kernel, dilation, stride, text_len, text_first, device)``.
"""
from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from .patterns import axis_window_start

__all__ = ["neighborhood_torch", "plan_tiles"]

# Cost model of one tile in "logit elements": a fixed per-tile overhead of
# SDPA's batched loop plus the tq * hk logits it computes.
_TILE_OVERHEAD = 8192
# Gathered k/v (+ mask) bytes per chunk of tiles when no gradient is needed.
_CHUNK_BYTES = 32 * 2**20


def _axis_runs(n, d, t):
    """Query tiles of one axis: runs of ``t`` consecutive coordinates of one dilation group."""
    runs = []
    for g in range(min(d, n)):
        coords = list(range(g, n, d))
        runs += [coords[i:i + t] for i in range(0, len(coords), t)]
    return runs


def _axis_halo(run, start, length, d):
    """Key coordinates a run can see: from its lowest window start to its highest
    window end, every ``d``-th (the windows of a run of one group overlap or
    touch, so this is their union; a superset would only cost masked work)."""
    lo = min(start[i] for i in run)
    hi = max(start[i] + d * (length[i] - 1) for i in run)
    return list(range(lo, hi + 1, d))


def _axis_sizes(n, k, d, s, t):
    """``(tiles, tq, hk)`` of :func:`_axis_tiling` without building it."""
    start, length = (x.tolist() for x in axis_window_start(n, k, d, s))
    runs = _axis_runs(n, d, t)
    return len(runs), max(map(len, runs)), max(len(_axis_halo(r, start, length, d)) for r in runs)


def _axis_tiling(n, k, d, s, t):
    """Tile one axis with runs of ``t`` group coordinates.

    Returns ``(q_coords [Ta, tq], k_coords [Ta, hk], mask [Ta, tq, hk], tile_of [n], slot_of [n])``:
    per tile its query coordinates (padded by repeating the first) and halo key
    coordinates (padded by repeating the first, masked out), the visibility of
    those keys to those queries, and the (tile, slot) of each real coordinate.
    """
    start_t, length_t = axis_window_start(n, k, d, s)
    start, length = start_t.tolist(), length_t.tolist()
    runs = _axis_runs(n, d, t)
    halos = [_axis_halo(r, start, length, d) for r in runs]
    tq, hk = max(map(len, runs)), max(map(len, halos))
    qc = torch.tensor([r + r[:1] * (tq - len(r)) for r in runs], dtype=torch.long)
    kc = torch.tensor([h + h[:1] * (hk - len(h)) for h in halos], dtype=torch.long)
    k_valid = torch.arange(hk)[None, :] < torch.tensor([len(h) for h in halos])[:, None]
    rel = kc[:, None, :] - start_t[qc][:, :, None]
    mask = (rel >= 0) & (rel % d == 0) & (rel // d < length_t[qc][:, :, None]) & k_valid[:, None, :]
    tile_of, slot_of = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    for ti, r in enumerate(runs):
        tile_of[r] = ti
        slot_of[r] = torch.arange(len(r))
    return qc, kc, mask, tile_of, slot_of


def _tile_candidates(n, d, s):
    n_g = -(-n // d)
    mults = [m for m in itertools.chain(range(1, 9), (10, 12, 14, 16, 20, 24, 32, 48, 64, 96, 128)) if m * s < n_g]
    return sorted({m * s for m in mults} | {n_g})


@functools.lru_cache(maxsize=64)
def choose_tiles(grid, kernel_size, dilation, stride, text_len):
    """Tile size per axis minimising ``tiles * (tq * (hk + text) + overhead)``."""
    per_axis = []
    for n, k, d, s in zip(grid, kernel_size, dilation, stride):
        per_axis.append([(t,) + _axis_sizes(n, k, d, s, t) for t in _tile_candidates(n, d, s)])
    best, best_cost = None, math.inf
    for combo in itertools.product(*per_axis):
        nt = math.prod(c[1] for c in combo)
        tq = math.prod(c[2] for c in combo)
        hk = math.prod(c[3] for c in combo) + text_len
        cost = nt * (tq * hk + _TILE_OVERHEAD)
        if cost < best_cost:
            best, best_cost = tuple(c[0] for c in combo), cost
    return best


class TilePlan:
    """Index tables of one tiling (all on ``device``).

    * ``q_index`` ``[tiles * tq]``: sequence position of each tile query slot;
    * ``kv_index`` ``[tiles * (hk + text_len)]``: sequence position of each
      halo key slot, text keys last;
    * ``mask`` ``[tiles, tq, hk + text_len]`` bool;
    * ``out_index`` ``[N]``: tile query slot holding each image token (row-major);
    * ``image``/``text``: slices of the sequence.
    """

    def __init__(self, grid, kernel_size, dilation, stride, text_len, text_first, tiles, device):
        n_img = math.prod(grid)
        off = text_len if text_first else 0
        self.image = slice(off, off + n_img)
        self.text = slice(0, text_len) if text_first else slice(n_img, n_img + text_len)
        nd = len(grid)
        strides = [math.prod(grid[a + 1:]) for a in range(nd)]
        q_flat = k_flat = mask = None
        tile_of, slot_of = [], []
        n_tiles, tq_all, hk_all = [], [], []
        for a, (n, k, d, s, t) in enumerate(zip(grid, kernel_size, dilation, stride, tiles)):
            qc, kc, m, to, so = _axis_tiling(n, k, d, s, t)
            qc, kc = qc * strides[a], kc * strides[a]
            ta_n, ta, ha = m.shape
            tile_of.append(to)
            slot_of.append(so)
            n_tiles.append(ta_n)
            tq_all.append(ta)
            hk_all.append(ha)
            if q_flat is None:
                q_flat, k_flat, mask = qc, kc, m
            else:
                # Tile axes first, then slot axes: [T1..Ta, t1..ta] / [T1..Ta, t1..ta, h1..ha].
                pt, pq = q_flat.shape[:a], q_flat.shape[a:]
                q_flat = (q_flat.reshape(*pt, 1, *pq, 1) + qc.reshape(*(1,) * a, ta_n, *(1,) * a, ta))
                pk = k_flat.shape[a:]
                k_flat = (k_flat.reshape(*pt, 1, *pk, 1) + kc.reshape(*(1,) * a, ta_n, *(1,) * a, ha))
                pm = mask.shape[a:]
                mq, mh = pm[:a], pm[a:]
                mask = (mask.reshape(*pt, 1, *mq, 1, *mh, 1)
                        & m.reshape(*(1,) * a, ta_n, *(1,) * a, ta, *(1,) * a, ha))
        nt, tq, hk = math.prod(n_tiles), math.prod(tq_all), math.prod(hk_all)
        q_flat = q_flat.reshape(nt * tq) + off
        k_flat = k_flat.reshape(nt, hk) + off
        mask = mask.reshape(nt, tq, hk)
        if text_len:
            txt = torch.arange(self.text.start, self.text.stop)
            k_flat = torch.cat([k_flat, txt.expand(nt, text_len)], dim=1)
            mask = torch.cat([mask, mask.new_ones(nt, tq, text_len)], dim=2)
        # Output slot of each image token, row-major over the grid.
        tile_id = slot_id = torch.zeros((), dtype=torch.long)
        for a in range(nd):
            tile_id = tile_id[..., None] * n_tiles[a] + tile_of[a]
            slot_id = slot_id[..., None] * tq_all[a] + slot_of[a]
        out_index = (tile_id * tq + slot_id).reshape(n_img)
        self.tiles, self.tq, self.hk = nt, tq, hk + text_len
        self.tile_shape = tuple(tiles)
        self.q_index = q_flat.to(device)
        self.kv_index = k_flat.reshape(-1).to(device)
        self.mask = mask.to(device)
        self.out_index = out_index.to(device)
        self._float_masks = {}

    def additive_mask(self, dtype):
        """The mask as ``0 / -inf`` in ``dtype`` (SDPA would convert a boolean one on every call)."""
        m = self._float_masks.get(dtype)
        if m is None:
            m = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            m.masked_fill_(~self.mask, float("-inf"))
            self._float_masks[dtype] = m
        return m


@functools.lru_cache(maxsize=16)
def plan_tiles(grid, kernel_size, dilation, stride, text_len, text_first, device, tiles=None):
    """The (cached) :class:`TilePlan` of one configuration; ``tiles`` overrides the tile size per axis."""
    if tiles is None:
        tiles = choose_tiles(grid, kernel_size, dilation, stride, text_len)
    return TilePlan(grid, kernel_size, dilation, stride, text_len, text_first, tuple(tiles), device)


def _gather(x, index, shape, buf):
    """``x.index_select(1, index).view(shape)``, into the scratch ``buf`` when given
    (reusing one buffer across chunks avoids page-faulting fresh memory on every chunk)."""
    if buf is None:
        return x.index_select(1, index).view(shape)
    out = buf.view(-1)[:math.prod(shape)].view(x.shape[0], index.numel(), *x.shape[2:])
    return torch.index_select(x, 1, index, out=out).view(shape)


def _tile_attention(q, k, v, plan, lo, hi, scale, bufs=(None, None, None)):
    """Attention of tiles ``lo:hi``: returns ``[B * (hi-lo), H, tq, D]``."""
    b, _, h, dh = q.shape
    nt, tq, hk = hi - lo, plan.tq, plan.hk
    qt = _gather(q, plan.q_index[lo * tq:hi * tq], (b * nt, tq, h, dh), bufs[0]).transpose(1, 2)
    kv_idx = plan.kv_index[lo * hk:hi * hk]
    kt = _gather(k, kv_idx, (b * nt, hk, h, dh), bufs[1]).transpose(1, 2)
    vt = _gather(v, kv_idx, (b * nt, hk, h, dh), bufs[2]).transpose(1, 2)
    mask = plan.additive_mask(q.dtype)[lo:hi]
    if b > 1:
        mask = mask.repeat(b, 1, 1)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask[:, None], scale=scale)


def neighborhood_torch(q, k, v, grid, kernel_size, dilation, stride, text_len, text_first, scale, tiles=None):
    """Neighborhood attention (NATTEN semantics, see ``neighborhood_ref``) on
    ``[B, S, H, D]`` tensors with arguments already validated by
    ``diffaccel.ops.neighborhood_params``.  ``tiles`` (one int per axis, in
    dilation-group coordinates) overrides the automatic tile size."""
    plan = plan_tiles(tuple(grid), tuple(kernel_size), tuple(dilation), tuple(stride), text_len, text_first,
                      q.device, None if tiles is None else tuple(tiles))
    b, s, h, dh = q.shape
    tq, nt = plan.tq, plan.tiles
    need_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if need_grad:
        # One batched call: chunking would not lower the memory autograd keeps.
        out = _tile_attention(q, k, v, plan, 0, nt, scale)
        tiles_out = out.transpose(1, 2).reshape(b, nt * tq, h, dh)
    else:
        per_tile = b * h * dh * (plan.hk * 2 + tq) * q.element_size() + b * tq * plan.hk * q.element_size()
        chunk = min(nt, max(1, _CHUNK_BYTES // per_tile))
        bufs = None
        if chunk < nt:
            bufs = (q.new_empty(b * chunk * tq * h * dh), k.new_empty(b * chunk * plan.hk * h * dh),
                    v.new_empty(b * chunk * plan.hk * h * dh))
        tiles_out = q.new_empty(b, nt * tq, h, dh)
        for lo in range(0, nt, chunk):
            hi = min(lo + chunk, nt)
            out = _tile_attention(q, k, v, plan, lo, hi, scale, bufs or (None, None, None))
            tiles_out[:, lo * tq:hi * tq] = out.view(b, hi - lo, h, tq, dh).transpose(2, 3).reshape(
                b, (hi - lo) * tq, h, dh)
    image_out = tiles_out.index_select(1, plan.out_index)
    if not text_len:
        return image_out
    text_out = F.scaled_dot_product_attention(
        q[:, plan.text].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    ).transpose(1, 2)
    pieces = [text_out, image_out] if text_first else [image_out, text_out]
    return torch.cat(pieces, dim=1)
