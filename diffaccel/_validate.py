"""Argument checks shared by every op: each error is a ValueError naming the argument."""
from __future__ import annotations

import math

import torch

BACKENDS = ("triton", "flex", "torch")


def check_qkv(q, k, v, same_length=True):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, S, H, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch, heads or head dim")
    if same_length and k.shape[1] != s:
        raise ValueError(f"k/v have {k.shape[1]} tokens but q has {s}; this op is self-attention over one sequence")


def normalize_grid(grid, allowed=(1, 2, 3)):
    if isinstance(grid, int):
        grid = (grid,)
    try:
        grid = tuple(int(g) for g in grid)
    except TypeError:
        raise ValueError(f"grid must be a tuple of ints (L,), (H, W) or (T, H, W), got {grid!r}") from None
    if len(grid) not in allowed:
        raise ValueError(f"grid must have {' or '.join(map(str, allowed))} axes, got {grid!r}")
    if any(g < 1 for g in grid):
        raise ValueError(f"grid sizes must be positive, got {grid!r}")
    return grid


def per_axis(name, value, ndim, minimum=1):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    try:
        value = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}") from None
    if len(value) != ndim or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints (one per grid axis), got {value!r}")
    if minimum is not None and any(x < minimum for x in value):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    return value


def check_tokens(q, grid, text_len, extra=""):
    if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 0:
        raise ValueError(f"text_len must be a non-negative int, got {text_len!r}")
    n = math.prod(grid)
    if q.shape[1] != n + text_len:
        raise ValueError(
            f"q has {q.shape[1]} tokens but grid {grid} holds {n} and text_len is {text_len} "
            f"(expected S = text_len + prod(grid) = {n + text_len}){extra}"
        )


def check_scale(scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def triton_available(device):
    """Whether Triton kernels can run for tensors on ``device``."""
    import os

    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def flex_available(device):
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return device.type in ("cuda", "cpu")


def resolve_backend(backend, device, supported=BACKENDS):
    """Pick a backend: by name (error if it cannot run here) or the best for the device."""
    checks = {"triton": triton_available, "flex": flex_available, "torch": lambda d: True}
    if backend is None:
        if device.type == "cuda" and "triton" in supported and triton_available(device):
            return "triton"
        return "torch" if "torch" in supported else supported[0]
    if backend not in supported:
        raise ValueError(f"backend must be one of {supported} or None, got {backend!r}")
    if not checks[backend](device):
        why = {
            "triton": "Triton needs a CUDA device, or TRITON_INTERPRET=1 for CPU tensors",
            "flex": "torch.nn.attention.flex_attention is not available",
        }[backend]
        raise ValueError(f"backend={backend!r} cannot run on {device}: {why}")
    return backend
