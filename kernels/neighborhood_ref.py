"""Neighborhood (sliding-window) attention: NATTEN semantics, plain PyTorch.

Per axis of length ``n`` with window ``k``, dilation ``d`` and stride ``s``:

* the axis is split into ``d`` interleaved groups (coordinate mod ``d``); a
  query's window lives in its own group, in group coordinates ``c // d``;
* queries are grouped into stride blocks of ``s`` consecutive group
  coordinates; every query of a block uses the window of the block's centre
  ``b*s + s//2`` (clamped to the group's last coordinate);
* the window of a centre ``c`` starts at ``clamp(c - k//2, 0, n_g - k)`` and
  holds ``k`` group coordinates (``k//2`` before and ``k - k//2 - 1`` after,
  shifted inward at borders); a ``k`` larger than the group covers it all.
"""
from __future__ import annotations

import torch

from .patterns import axis_window_start
from .reference import join_text_mask, masked_attention_reference


def axis_visibility(n, k, d=1, s=1, device=None):
    """Boolean ``[n, n]``: query coordinate i sees key coordinate j on this axis."""
    start, length = axis_window_start(n, k, d, s, device)
    j = torch.arange(n, device=device)
    rel = j[None, :] - start[:, None]
    return (rel >= 0) & (rel % d == 0) & (rel // d < length[:, None])


def neighborhood_mask(grid, kernel_size, dilation, stride, text_len=0, text_first=True, device=None):
    """Dense boolean mask ``[S, S]`` of neighborhood attention over ``grid``
    (``kernel_size``/``dilation``/``stride``: one int per axis), joined with
    ``text_len`` text tokens."""
    mask = None
    for n, k, d, s in zip(grid, kernel_size, dilation, stride):
        ax = axis_visibility(n, k, d, s, device)
        if mask is None:
            mask = ax
        else:
            m = mask.shape[0]
            mask = (mask[:, None, :, None] & ax[None, :, None, :]).reshape(m * n, m * n)
    return join_text_mask(mask, text_len, text_first)


def neighborhood_reference(q, k, v, grid, kernel_size, dilation, stride, text_len=0, text_first=True, scale=None):
    """Reference neighborhood attention (dense mask, fp32 softmax)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    mask = neighborhood_mask(grid, kernel_size, dilation, stride, text_len, text_first, q.device)
    return masked_attention_reference(q, k, v, mask, scale)
