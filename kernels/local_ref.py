"""CLEAR local attention: plain PyTorch reference (dense mask, fp32 softmax).

Semantics every backend is tested against, on a ``[text; image]`` (or
``[image; text]``) sequence with an ``H x W`` image grid in row-major order:

* an image query at ``(y, x)`` sees the image keys with
  ``(y - y')**2 + (x - x')**2 < radius**2`` (strictly less; ``radius`` may be
  a float), every text key and, with pooling, every pooled token;
* a text query sees every text and image key, never a pooled token;
* pooling (``down_factor`` d): ``ceil(H/d) * ceil(W/d)`` pooled keys/values,
  row-major, ``pooled[i, j] = sum_{a,b} x[min(i*d + a, H-1), min(j*d + b, W-1)] * w[a, b]``.
  For a grid divisible by ``d`` this is exactly CLEAR's
  ``(x.unflatten(H/d, d, W/d, d) * w).sum(a, b)``; otherwise the last, partial
  row/column of windows repeats the grid's border tokens (edge replication), so
  every image token is pooled and every window keeps the full weight mass.
"""
from __future__ import annotations

import math

import torch

from .patterns import max_sq_dist
from .reference import join_text_mask, masked_attention_reference

__all__ = ["max_sq_dist", "pooled_grid", "circle_mask", "local_mask", "pool_reference", "local_reference"]


def pooled_grid(grid, down_factor):
    """``(ceil(H/d), ceil(W/d))``: the grid of pooled tokens (``(0, 0)`` without pooling)."""
    if not down_factor:
        return (0, 0)
    return tuple(-(-n // down_factor) for n in grid)


def circle_mask(grid, radius, device=None):
    """Boolean ``[N, N]``: image query i sees image key j (squared distance < radius**2)."""
    h, w = grid
    y = torch.arange(h, device=device).repeat_interleave(w)
    x = torch.arange(w, device=device).repeat(h)
    d2 = (y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2
    return d2 <= max_sq_dist(min(float(radius), math.hypot(h, w)))


def local_mask(grid, radius, text_len=0, text_first=True, n_pooled=0, device=None):
    """Dense boolean mask ``[S, S + n_pooled]`` of CLEAR local attention; pooled keys come last."""
    n = math.prod(grid)
    mask = join_text_mask(circle_mask(grid, radius, device), text_len, text_first)
    if n_pooled:
        pooled = torch.zeros(mask.shape[0], n_pooled, dtype=torch.bool, device=mask.device)
        img = slice(text_len, text_len + n) if text_first else slice(0, n)
        pooled[img] = True
        mask = torch.cat([mask, pooled], dim=1)
    return mask


def pool_reference(x, grid, down_factor, weight, text_len=0, text_first=True):
    """Pooled image tokens ``[B, P, H, D]`` of ``x`` ``[B, S, H, D]`` (fp32), edge-replicated borders."""
    h, w = grid
    d = down_factor
    n = h * w
    off = text_len if text_first else 0
    img = x[:, off:off + n].float().unflatten(1, (h, w))  # [B, h, w, H, D]
    ph, pw = pooled_grid(grid, d)
    rows = torch.clamp(torch.arange(ph * d, device=x.device), max=h - 1)
    cols = torch.clamp(torch.arange(pw * d, device=x.device), max=w - 1)
    img = img[:, rows][:, :, cols]  # [B, ph*d, pw*d, H, D]
    win = img.unflatten(1, (ph, d)).unflatten(3, (pw, d))  # [B, ph, d, pw, d, H, D]
    out = (win * weight.float()[None, None, :, None, :, None, None]).sum(dim=(2, 4))
    return out.flatten(1, 2)


def local_reference(q, k, v, grid, radius, text_len=0, text_first=True, down_factor=None, pool_weight=None,
                    scale=None):
    """Reference CLEAR local attention of ``[B, S, H, D]`` tensors; fp32 math, q's dtype out."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    n_pooled = 0
    if down_factor:
        if pool_weight is None:
            pool_weight = torch.full((down_factor, down_factor), 1.0 / down_factor ** 2, device=q.device)
        kx = pool_reference(k, grid, down_factor, pool_weight, text_len, text_first)
        vx = pool_reference(v, grid, down_factor, pool_weight, text_len, text_first)
        n_pooled = kx.shape[1]
        k = torch.cat([k.float(), kx], dim=1)
        v = torch.cat([v.float(), vx], dim=1)
    mask = local_mask(grid, radius, text_len, text_first, n_pooled, q.device)
    return masked_attention_reference(q, k, v, mask, scale)
