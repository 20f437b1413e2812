"""Pattern geometry every backend of an op shares (and its plain PyTorch reference reads too):
neighborhood windows per axis (NATTEN semantics, see ``neighborhood_ref``) and CLEAR's circle
radius (see ``local_ref``).  Runtime code imports these from here, never from a ``*_ref`` module."""
from __future__ import annotations

import math

import torch

__all__ = ["axis_window_start", "max_sq_dist"]


def axis_window_start(n, k, d=1, s=1, device=None):
    """Window of every coordinate of one axis.

    Returns ``(start, length)`` where ``start`` is an int64 tensor ``[n]`` of
    window starts in *real* coordinates and the window of coordinate ``i`` is
    ``start[i] + d * arange(length[i])`` (``length`` is ``[n]`` too: groups of
    a dilated axis can be shorter than ``k``).
    """
    i = torch.arange(n, device=device)
    g = i % d
    gi = i // d
    n_g = (n - g + d - 1) // d
    k_eff = torch.clamp(n_g, max=k)
    centre = torch.minimum((gi // s) * s + s // 2, n_g - 1)
    start_g = torch.clamp(torch.minimum(centre - k // 2, n_g - k_eff), min=0)
    return g + d * start_g, k_eff


def max_sq_dist(radius):
    """The largest integer squared distance strictly below ``radius**2`` (computed in float64):
    an integer offset is visible iff ``dy**2 + dx**2 <= max_sq_dist(radius)``.  A positive radius always
    sees distance 0 (``radius**2`` may underflow to 0.0); ``radius`` must be finite (callers clamp it to
    the grid's diagonal)."""
    return max(math.ceil(float(radius) * float(radius)) - 1, 0)
