"""CLEAR local attention on torch FlexAttention (via ``flex.flex_attention_with_mask_mod``).

The image tokens are reordered into spatial tiles (``flex.image_tile_order``)
so each FlexAttention block is a 2-D patch and most key blocks are either
fully visible or skipped; the output is put back in row-major order.  The
``mask_mod`` looks each position's kind (image / text / pooled) and grid
coordinates up in small per-position tables: no dense ``[S, S]`` mask exists.
Pooled tokens are appended after the sequence as extra keys.
"""
from __future__ import annotations

import functools

import torch

from .flex import BLOCK_SIZE, flex_attention_with_mask_mod, image_tile_order
from .patterns import max_sq_dist

__all__ = ["local_flex", "local_mask_mod"]

from .tiling import EXTRA as _POOLED  # noqa: E402  (the token-kind codes of tiling.py, used everywhere)
from .tiling import IMAGE as _IMAGE  # noqa: E402
from .tiling import TEXT as _TEXT  # noqa: E402


def local_mask_mod(kind, ys, xs, d2):
    """mask_mod of local attention from per-position tables over ``[sequence; pooled]``:
    ``kind`` (``tiling.IMAGE`` / ``TEXT`` / ``EXTRA`` for the pooled tokens), grid row ``ys`` and column ``xs`` (0 off the image)."""

    def mask_mod(b, h, q_idx, kv_idx):
        qk, kk = kind[q_idx], kind[kv_idx]
        dy = ys[q_idx] - ys[kv_idx]
        dx = xs[q_idx] - xs[kv_idx]
        near = dy * dy + dx * dx <= d2
        text_q = (qk == _TEXT) & (kk != _POOLED)
        image_q = (qk == _IMAGE) & ((kk != _IMAGE) | near)
        return text_q | image_q

    return mask_mod


class _LocalLayout:
    def __init__(self, grid, d2, text_len, text_first, n_pooled, device, reorder, block_size):
        h, w = grid
        n = h * w
        s = n + text_len
        off = text_len if text_first else 0
        order = image_tile_order(grid, (1, 1), block_size) if reorder else torch.arange(n)
        self.identity = bool((order == torch.arange(n)).all())
        perm = torch.arange(s)
        perm[off:off + n] = order + off
        self.perm = None if self.identity else perm.to(device)
        self.inverse = None if self.identity else torch.argsort(perm).to(device)
        kind = torch.full((s + n_pooled,), _TEXT, dtype=torch.int32)
        kind[off:off + n] = _IMAGE
        kind[s:] = _POOLED
        ys = torch.zeros(s + n_pooled, dtype=torch.int32)
        xs = torch.zeros(s + n_pooled, dtype=torch.int32)
        ys[off:off + n] = (order // w).to(torch.int32)
        xs[off:off + n] = (order % w).to(torch.int32)
        self.tables = tuple(t.to(device) for t in (kind, ys, xs))
        self.mask_mod = local_mask_mod(*self.tables, d2)


@functools.lru_cache(maxsize=32)
def _layout(grid, d2, text_len, text_first, n_pooled, device, reorder, block_size):
    return _LocalLayout(grid, d2, text_len, text_first, n_pooled, device, reorder, block_size)


def local_flex(q, k, v, grid, radius, text_len, text_first, kx, vx, scale, reorder=True, block_size=None):
    """CLEAR local attention (semantics of ``local_ref``) on FlexAttention; ``kx``/``vx``: pooled tokens
    ``[B, P, H, D]`` or None.  Arguments already validated by ``diffaccel.ops.local_attention``."""
    block_size = block_size or BLOCK_SIZE
    n_pooled = 0 if kx is None else kx.shape[1]
    d2 = max_sq_dist(radius)
    config = (tuple(grid), d2, int(text_len), bool(text_first), n_pooled)
    layout = _layout(*config, q.device, bool(reorder), block_size)
    if layout.perm is not None:
        q, k, v = (t.index_select(1, layout.perm) for t in (q, k, v))
    if n_pooled:
        k = torch.cat([k, kx.to(k.dtype)], dim=1)
        v = torch.cat([v, vx.to(v.dtype)], dim=1)
    key = ("clear_local",) + config + (bool(reorder),)
    out = flex_attention_with_mask_mod(q, k, v, layout.mask_mod, key, scale, block_size)
    if layout.perm is not None:
        out = out.index_select(1, layout.inverse)
    return out

