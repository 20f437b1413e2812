"""CLEAR local attention in portable eager PyTorch: tile and halo.

The image grid is covered by query tiles of ``ty x tx`` tokens (border tiles
are shifted inward, so every tile is full and the last ones overlap their
neighbours; each token's output is taken from one tile).  A tile's queries can
only see keys within ``R = floor(sqrt(D2))`` rows/columns of the tile, and of
that box only the keys within the circle of *some* query of the tile (the
rounded-rectangle halo: box corners no query reaches are dropped).  Halos are
padded to one size (padding masked out), every text key and every pooled
token is appended to every halo, and one batched
``scaled_dot_product_attention`` with an additive mask computes
``[B*tiles, H, tq, D] x [B*tiles, H, hk + text + pooled, D]``.  Text queries
attend to every text and image key with plain SDPA.

Everything is gathers and SDPA, so autograd works (gradients reach pooled
tokens and, through :func:`pool_tokens`, the pooling weights).  Work is split
into chunks of tiles bounded in memory.  Index tables are planned once per
geometry (``grid, D2, text_len, text_first, pooled tokens, device``).

The tile-and-halo plan (:class:`HaloPlan`) is generic: it takes any
translation-invariant element rule ``visible(dy, dx)`` with a bounded reach,
so other 2-D local patterns can reuse it.  Tiles whose halo sits at the same
offset share one mask, so the plan stays small at any resolution.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from .patterns import max_sq_dist
from .workspace import scratch

__all__ = ["pool_tokens", "HaloPlan", "plan_local", "local_torch", "choose_tile"]

# Per-tile overhead of SDPA's batched loop, in logit elements (cost model of the tile choice).
_TILE_OVERHEAD = 32768
# Gathered k/v + mask bytes per chunk of tiles.
_CHUNK_BYTES = int(os.environ.get("DIFFACCEL_LOCAL_CHUNK", 128 * 2 ** 20))
# Additive masks up to this size are cached per dtype; larger ones are built per chunk.
_MASK_CACHE_BYTES = 64 * 2 ** 20


def pool_tokens(x, grid, down_factor, weight, text_len=0, text_first=True):
    """CLEAR's pooled tokens of the image part of ``x`` ``[B, S, H, D]``: ``[B, ceil(H/d)*ceil(W/d), H, D]``.

    ``pooled[i, j] = sum_{a,b} x[min(i*d+a, H-1), min(j*d+b, W-1)] * weight[a, b]`` (see ``local_ref``);
    accumulated in fp32, returned in x's dtype.  Differentiable in ``x`` and ``weight``.
    """
    h, w = grid
    d = down_factor
    off = text_len if text_first else 0
    img = x[:, off:off + h * w].unflatten(1, (h, w))  # [B, h, w, H, D]
    ph, pw = -(-h // d), -(-w // d)
    wf = weight.float()
    acc = None
    for a in range(d):
        rows = torch.clamp(torch.arange(a, ph * d, d, device=x.device), max=h - 1)
        xa = img.index_select(1, rows)
        for b in range(d):
            cols = torch.clamp(torch.arange(b, pw * d, d, device=x.device), max=w - 1)
            term = xa.index_select(2, cols).float() * wf[a, b]
            acc = term if acc is None else acc + term
    return acc.flatten(1, 2).to(x.dtype)


def _axis_tiles(n, t):
    """Start of each tile of length ``t`` on an axis of ``n`` (the last shifted inward), and the
    tile / slot of every coordinate."""
    t = min(t, n)
    count = -(-n // t)
    starts = [min(i * t, n - t) for i in range(count)]
    c = torch.arange(n)
    tile = torch.clamp(c // t, max=count - 1)
    slot = c - torch.tensor(starts)[tile]
    return t, starts, tile, slot


def _axis_halo(n, t, starts, reach):
    """Start of each tile's key box (``min(t + 2*reach, n)`` long, shifted inside the axis)."""
    hb = min(t + 2 * reach, n)
    return hb, [min(max(s - reach, 0), n - hb) for s in starts]


class HaloPlan:
    """Index tables of one tiling of an ``H x W`` grid for a translation-invariant element rule
    ``visible(dy, dx)`` (``dy = query row - key row``, ``dx`` likewise; broadcasting tensors) that is
    False beyond ``reach`` rows / columns.

    * ``q_index`` ``[tiles * tq]``: image-token index (row-major) of each tile query slot;
    * ``k_index`` ``[tiles, hk]``: image-token index of each halo key slot (padding repeats a real key);
    * ``class_mask`` ``[C, tq, hk]`` bool and ``tile_class`` ``[tiles]``: the visibility of each tile's
      halo keys (padding: False).  Tiles whose halo box sits at the same offset share a class (every
      interior tile is one class), so the masks stay small at any resolution;
    * ``out_index`` ``[N]``: tile query slot holding each image token.
    """

    def __init__(self, grid, tile, reach, visible, device):
        h, w = grid
        ty, ys, y_tile, y_slot = _axis_tiles(h, tile[0])
        tx, xs, x_tile, x_slot = _axis_tiles(w, tile[1])
        hy, hys = _axis_halo(h, ty, ys, reach[0])
        hx, hxs = _axis_halo(w, tx, xs, reach[1])
        ys_t, xs_t, hys_t, hxs_t = (torch.tensor(a) for a in (ys, xs, hys, hxs))
        # offset of each tile's halo box from the tile, per axis, and its class id
        oy_vals, oy_id = torch.unique(ys_t - hys_t, return_inverse=True)
        ox_vals, ox_id = torch.unique(xs_t - hxs_t, return_inverse=True)
        nt, tq = len(ys) * len(xs), ty * tx
        tile_class = (oy_id[:, None] * len(ox_vals) + ox_id[None, :]).reshape(nt)
        # [C, tq, box] masks of the classes: query (i, j) at offset (oy, ox) inside the halo box
        qi = torch.arange(ty).repeat_interleave(tx)
        qj = torch.arange(tx).repeat(ty)
        ki = torch.arange(hy).repeat_interleave(hx)
        kj = torch.arange(hx).repeat(hy)
        oy = oy_vals.repeat_interleave(len(ox_vals))
        ox = ox_vals.repeat(len(oy_vals))
        dy = oy[:, None, None] + qi[None, :, None] - ki[None, None, :]
        dx = ox[:, None, None] + qj[None, :, None] - kj[None, None, :]
        box_mask = visible(dy, dx)
        # drop box keys no query of the class sees; pad every halo to the longest
        used = box_mask.any(1)  # [C, box]
        hk = max(int(used.sum(1).max()), 1)
        order = torch.argsort((~used).to(torch.int8), dim=1, stable=True)[:, :hk]
        keep = torch.gather(used, 1, order)
        order = torch.where(keep, order, order[:, :1])
        class_mask = torch.gather(box_mask, 2, order[:, None, :].expand(-1, tq, -1)) & keep[:, None, :]
        # per tile: query and key token indices
        t_y = ys_t.repeat_interleave(len(xs))
        t_x = xs_t.repeat(len(ys))
        self.q_index = ((t_y[:, None] + qi[None]) * w + t_x[:, None] + qj[None]).reshape(-1).to(device)
        k_order = order[tile_class]  # [T, hk] positions inside the halo box
        k_y = hys_t.repeat_interleave(len(xs))[:, None] + k_order // hx
        k_x = hxs_t.repeat(len(ys))[:, None] + k_order % hx
        self.k_index = (k_y * w + k_x).to(device)
        self.tiles, self.tq, self.hk, self.tile = nt, tq, hk, (ty, tx)
        out = (y_tile[:, None] * len(xs) + x_tile[None, :]) * tq + y_slot[:, None] * tx + x_slot[None, :]
        self.out_index = out.reshape(-1).to(device)
        self.class_mask = class_mask.to(device)
        self.tile_class = tile_class.to(device)
        self._additive = {}

    def additive_mask(self, dtype, lo, hi, n_global):
        """``0 / -inf`` mask of tiles ``lo:hi`` ``[hi-lo, tq, hk + n_global]`` in ``dtype``
        (the ``n_global`` text/pooled keys appended to every halo are visible)."""
        full_bytes = self.tiles * self.tq * (self.hk + n_global) * torch.finfo(dtype).bits // 8
        cached = full_bytes <= _MASK_CACHE_BYTES
        key = (dtype, n_global)
        if cached and key in self._additive:
            return self._additive[key][lo:hi]
        classes = self.class_mask.shape[0]
        m = torch.zeros(classes, self.tq, self.hk + n_global, dtype=dtype, device=self.class_mask.device)
        m[..., :self.hk].masked_fill_(~self.class_mask, float("-inf"))
        rng = slice(0, self.tiles) if cached else slice(lo, hi)
        m = m.index_select(0, self.tile_class[rng])
        if not cached:
            return m
        self._additive[key] = m
        return m[lo:hi]


def _circle(d2):
    def visible(dy, dx):
        return dy * dy + dx * dx <= d2

    return visible


def _halo_size(grid, tile, d2):
    """Keys a ``tile`` placed in the middle of ``grid`` can see (circle of max squared distance ``d2``)."""
    reach = math.isqrt(max(d2, 0))
    gaps = []
    for n, t in zip(grid, tile):
        lo = (n - t) // 2
        c = torch.arange(max(lo - reach, 0), min(lo + t + reach, n))
        gaps.append(torch.clamp(torch.maximum(lo - c, c - (lo + t - 1)), min=0))
    return int(((gaps[0][:, None] ** 2 + gaps[1][None, :] ** 2) <= d2).sum())


def choose_tile(grid, d2, n_global, candidates=(4, 8, 12, 16, 24, 32)):
    """Tile shape minimising ``tiles * (tq' * (halo + n_global) + overhead)``, with ``tq'`` the tile's
    queries rounded up to a multiple of 32 (SDPA's CPU kernel works on 32-row query blocks) and the
    halo counted for an interior tile (calibrated on CPU, fp32, radius 8: 8x12 to 16x12 tiles within noise)."""
    best, best_cost = None, math.inf
    for ty in sorted({min(c, grid[0]) for c in candidates}):
        for tx in sorted({min(c, grid[1]) for c in candidates}):
            nt = -(-grid[0] // ty) * -(-grid[1] // tx)
            tq = -(-ty * tx // 32) * 32
            cost = nt * (tq * (_halo_size(grid, (ty, tx), d2) + n_global) + _TILE_OVERHEAD)
            if cost < best_cost:
                best, best_cost = (ty, tx), cost
    return best


@functools.lru_cache(maxsize=16)
def plan_local(grid, d2, text_len, text_first, n_pooled, device, tile=None):
    """The (cached) :class:`HaloPlan` of CLEAR's circle (integer squared distance ``<= d2``) with its
    sequence-level tables: ``seq_q_index`` (query positions in q), ``seq_kv_index`` ``[tiles, hk + text
    + pooled]`` (key positions in ``[k; pooled]``: halo, then text keys, then pooled tokens)."""
    reach = math.isqrt(max(d2, 0))
    n_glob = text_len + n_pooled
    if tile is None:
        tile = choose_tile(grid, d2, n_glob)

    device = torch.device(device)
    plan = HaloPlan(tuple(grid), tuple(tile), (reach, reach), _circle(d2), device)
    n = math.prod(grid)
    img_off = text_len if text_first else 0
    txt_off = 0 if text_first else n
    glob = torch.cat([torch.arange(txt_off, txt_off + text_len), torch.arange(n_pooled) + n + text_len]).to(device)
    plan.n_global = n_glob
    plan.seq_q_index = plan.q_index + img_off
    plan.seq_kv_index = torch.cat([plan.k_index + img_off, glob.expand(plan.tiles, -1)], dim=1).contiguous()
    return plan


def halo_attention(q, k, v, plan, scale):
    """Attention of every tile's image queries over its halo plus the plan's global keys (text and
    pooled tokens, visible to every image query).  ``k``/``v`` hold the sequence followed by the
    pooled tokens.  Returns the image outputs ``[B, N, H, D]`` in row-major order."""
    b, _, h, dh = q.shape
    n_glob = plan.n_global
    hk = plan.hk + n_glob
    per_tile = b * hk * h * dh * 2 * k.element_size() + plan.tq * hk * q.element_size()
    chunk = max(1, _CHUNK_BYTES // per_tile)
    # without autograd the gathered operands go to per-thread buffers reused across chunks and calls
    cached = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))

    def gather(name, x, idx):
        if not cached:
            return x.index_select(1, idx)
        return torch.index_select(x, 1, idx, out=scratch(name, (b, idx.numel(), h, dh), x.dtype, x.device))

    parts = []
    for lo in range(0, plan.tiles, chunk):
        hi = min(lo + chunk, plan.tiles)
        nt = hi - lo
        kv_idx = plan.seq_kv_index[lo:hi].reshape(-1)
        qt = gather("local_q", q, plan.seq_q_index[lo * plan.tq:hi * plan.tq]).view(b * nt, plan.tq, h, dh)
        kt = gather("local_k", k, kv_idx).view(b * nt, hk, h, dh)
        vt = gather("local_v", v, kv_idx).view(b * nt, hk, h, dh)
        mask = plan.additive_mask(q.dtype, lo, hi, n_glob)
        if b > 1:
            mask = mask.repeat(b, 1, 1)
        out = F.scaled_dot_product_attention(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2),
                                             attn_mask=mask[:, None], scale=scale)
        parts.append(out.transpose(1, 2).reshape(b, nt * plan.tq, h, dh))
    tiles_out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return tiles_out.index_select(1, plan.out_index)


def local_torch(q, k, v, grid, radius, text_len, text_first, kx, vx, scale, tile=None):
    """CLEAR local attention (semantics of ``local_ref``) on validated ``[B, S, H, D]`` tensors;
    ``kx``/``vx``: pooled tokens ``[B, P, H, D]`` or None; ``tile`` overrides the query tile shape."""
    n = math.prod(grid)
    txt_off = 0 if text_first else n
    n_pooled = 0 if kx is None else kx.shape[1]
    plan = plan_local(tuple(grid), max_sq_dist(radius), text_len, bool(text_first), n_pooled, q.device,
                      None if tile is None else tuple(tile))
    k_all, v_all = k, v
    if n_pooled:
        k_all = torch.cat([k, kx.to(k.dtype)], dim=1)
        v_all = torch.cat([v, vx.to(v.dtype)], dim=1)
    image_out = halo_attention(q, k_all, v_all, plan, scale)
    if not text_len:
        return image_out
    text_out = F.scaled_dot_product_attention(
        q.narrow(1, txt_off, text_len).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
    ).transpose(1, 2)
    return torch.cat([text_out, image_out] if text_first else [image_out, text_out], dim=1)
