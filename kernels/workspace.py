"""Per-thread scratch buffers for the eager CPU backends' no-grad paths.

Fresh large CPU allocations cost a page fault per 4 KiB page on first touch, about as much as the
copies written into them; buffers kept between calls avoid that.  Only for results consumed within
the call (gathered operands, merge buffers), never for returned tensors.
"""
from __future__ import annotations

import threading

import torch

__all__ = ["scratch", "clear_workspace", "WORKSPACE_MAX_BYTES"]

_WORKSPACE = threading.local()
WORKSPACE_MAX_BYTES = 1 << 28  # larger buffers are allocated fresh


def scratch(name, shape, dtype, device, cached=True):
    """An uninitialised ``shape`` buffer.  With ``cached`` on CPU (and at most
    :data:`WORKSPACE_MAX_BYTES`), this thread's buffer ``name`` reused across calls; else fresh."""
    numel = 1
    for x in shape:
        numel *= x
    if not cached or torch.device(device).type != "cpu" or numel * dtype.itemsize > WORKSPACE_MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    cache = _WORKSPACE.__dict__.setdefault("buffers", {})
    key = (name, dtype, str(device))
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def clear_workspace():
    """Free this thread's scratch buffers."""
    _WORKSPACE.__dict__.pop("buffers", None)
