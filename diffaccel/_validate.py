"""Argument checks shared by every op: each error is a ValueError naming the argument."""
from __future__ import annotations

import math
import operator

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
    if d < 1:
        raise ValueError(f"q, k and v must have a head dim D >= 1 (shape [B, S, H, D]), got q {tuple(q.shape)}")
    if k.shape[0] != b or k.shape[2] != h or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch, heads or head dim")
    if same_length and k.shape[1] != s:
        raise ValueError(f"k/v have {k.shape[1]} tokens but q has {s}; this op is self-attention over one sequence")


def _int_like(x):
    """``x`` as an int if it is one (Python or NumPy integer, not a bool), else ``None``."""
    if isinstance(x, bool) or not hasattr(x, "__index__"):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _entries(name, value, what):
    """The entries of a per-axis sequence (tuple, list, torch.Size); a str or other iterable is refused."""
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return list(value)


def normalize_grid(grid, allowed=(1, 2, 3)):
    """``grid`` as a tuple of positive ints with ``len(grid)`` in ``allowed`` (an int is a 1-axis grid).
    Floats, bools and strings are refused, never rounded or split."""
    axes = " or ".join(map(str, allowed))
    what = f"an int or a tuple of {axes} positive ints ((L,), (H, W) or (T, H, W))"
    one = _int_like(grid)
    entries = [grid] if one is not None else _entries("grid", grid, what)
    values = [_int_like(g) for g in entries]
    if any(v is None for v in values):
        raise ValueError(f"grid must be {what}, got {grid!r}")
    if len(values) not in allowed:
        raise ValueError(f"grid must have {axes} axes, got {grid!r}")
    if any(v < 1 for v in values):
        raise ValueError(f"grid sizes must be positive, got {grid!r}")
    return tuple(values)


def per_axis(name, value, ndim=None, *, minimum=1, allow_none=False):
    """The one validator of per-axis arguments (kernel size, dilation, stride, MoBA blocks, ...).

    ``value``: an int for every axis, or a tuple/list with one entry per axis; entries are ints
    ``>= minimum`` (bools, floats and strings are refused), or ``None`` ("the whole axis") when
    ``allow_none``.  With ``ndim`` (the grid's number of axes) the result is a tuple of ``ndim``
    entries; without it (method options, before the model's grid is known) an int is returned
    as is and a sequence must have 2 or 3 entries (image or video grids).  ``ValueError``
    naming ``name`` otherwise.
    """
    lengths = (ndim,) if ndim is not None else (2, 3)
    entry = f"int >= {minimum}" + (" or None (the whole axis)" if allow_none else "")
    what = f"an int >= {minimum} or a tuple of {' or '.join(map(str, lengths))} entries, each an {entry}"
    one = _int_like(value)
    if one is not None:
        if one < minimum:
            raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
        return (one,) * ndim if ndim is not None else one
    entries = _entries(name, value, what)
    out = []
    for x in entries:
        v = _int_like(x)
        if x is None and allow_none:
            out.append(None)
        elif v is None:
            raise ValueError(f"{name} must be {what}, got {value!r}")
        elif v < minimum:
            raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
        else:
            out.append(v)
    if len(out) not in lengths:
        raise ValueError(f"{name} must be {what} (one per grid axis), got {value!r}")
    return tuple(out)


def check_tokens(q, grid, text_len, extra=""):
    if not isinstance(text_len, int) or isinstance(text_len, bool) or text_len < 0:
        raise ValueError(f"text_len must be a non-negative int, got {text_len!r}")
    n = math.prod(grid)
    if q.shape[1] != n + text_len:
        raise ValueError(
            f"q has {q.shape[1]} tokens but grid {grid} holds {n} and text_len is {text_len} "
            f"(expected S = text_len + prod(grid) = {n + text_len}){extra}"
        )


def is_finite_number(x):
    """Whether ``x`` is a real int or float (not a bool) that a float holds finitely."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def positive_number(name, value):
    """``value`` as a float if it is a positive finite number, else a ``ValueError`` naming ``name``."""
    if not is_finite_number(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_scale(scale, head_dim):
    if scale is None:
        return head_dim ** -0.5
    return positive_number("scale", scale)


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
