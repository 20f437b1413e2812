"""Functional attention ops: the one front door to every kernel.

Tensors are ``[B, S, H, D]`` (diffusers' ``dispatch_attention_fn`` layout); the
output has q's dtype.  Each op validates its arguments (``ValueError`` naming
the argument), normalises them, and hands plain tensors to a backend in
``diffaccel.kernels``: ``"triton"``, ``"flex"`` (torch FlexAttention) or
``"torch"`` (portable eager code); ``backend=None`` picks the best for the
device.  A batch or head count of 0 gives an empty output (no kernel runs).

Non-finite inputs stay inside the pattern on every backend: a NaN or infinite
key or value reaches only the queries that see it (their outputs become NaN),
a non-finite query gives a NaN output, and every other output is what finite
inputs give (``kernels/reference.py`` states the rule; ``kernels/nonfinite.py``
enforces it for backends that cannot on their own).
"""
from __future__ import annotations

import functools
import math

from ._validate import (check_qkv, check_scale, check_tokens, is_finite_number, normalize_grid, per_axis,
                        positive_number, resolve_backend)

__all__ = ["dense_attention", "linear_attention", "local_attention", "moba_attention", "moba_params", "neighborhood_attention",
           "neighborhood_params"]


def neighborhood_params(grid, kernel_size, dilation=1, stride=1):
    """Validate and normalise neighborhood parameters for ``grid``.

    Returns ``(grid, kernel_size, dilation, stride)`` as tuples with one entry
    per axis, with a kernel larger than its axis clamped to the axis (and its
    stride to 1: the whole axis is visible to every query either way).
    """
    grid = normalize_grid(grid)
    nd = len(grid)
    kernel_size = per_axis("kernel_size", kernel_size, nd)
    dilation = per_axis("dilation", dilation, nd)
    stride = per_axis("stride", stride, nd)
    ks, ss = [], []
    for ax, (n, k, d, s) in enumerate(zip(grid, kernel_size, dilation, stride)):
        if s > k:
            raise ValueError(f"stride {stride} exceeds kernel_size {kernel_size} on axis {ax}; stride must be <= kernel_size")
        if d > 1 and d * k > n:
            raise ValueError(
                f"dilation * kernel_size = {d} * {k} exceeds grid axis {ax} of size {n}; "
                "with dilation > 1 each dilation group must hold a whole window"
            )
        if d == 1 and k >= n:
            k, s = n, 1
        ks.append(k)
        ss.append(s)
    return grid, tuple(ks), dilation, tuple(ss)


def neighborhood_attention(q, k, v, grid, kernel_size, *, dilation=1, stride=1, shift=0, text_len=0,
                           text_first=True, scale=None, backend=None):
    """Neighborhood (sliding-window) attention with NATTEN semantics.

    Args:
        q, k, v: ``[B, S, H, D]`` with ``S = text_len + prod(grid)``.
        grid: ``(L,)``, ``(H, W)`` or ``(T, H, W)``: image/video tokens in row-major order.
        kernel_size, dilation, stride: an int or one per axis.  A kernel larger
            than its axis covers the whole axis.  ``stride == kernel_size`` gives
            blocked (Swin-style) windows.
        shift: an int or one per axis: the grid is rolled cyclically by ``-shift`` before the windows and back
            after, so blocks (``stride == kernel_size``) start ``shift`` tokens in and wrap around the edges
            (Swin's cyclic shift, HiDiffusion's MSW-MSA); 0 = no roll.
        text_len, text_first: text tokens before (FLUX) or after (SD3) the grid;
            text queries see every key, image queries every text key plus their window.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"triton"``, ``"flex"``, ``"torch"`` or ``None`` (best available).
    """
    check_qkv(q, k, v)
    grid, kernel_size, dilation, stride = neighborhood_params(grid, kernel_size, dilation, stride)
    check_tokens(q, grid, text_len)
    if not isinstance(text_first, bool):
        raise ValueError(f"text_first must be a bool, got {text_first!r}")
    scale = check_scale(scale, q.shape[-1])
    shift = tuple(s % n for s, n in zip(per_axis("shift", shift, len(grid), minimum=None), grid))
    backend = resolve_backend(backend, q.device)
    if q.numel() == 0:
        return q * 0.0  # no batch or no heads: empty, still attached to the graph
    args = (grid, kernel_size, dilation, stride, text_len, text_first, scale)
    if any(shift):
        roll = functools.partial(_roll_grid, grid=grid, text_len=text_len, text_first=text_first)
        out = _neighborhood(backend, roll(q, shift), roll(k, shift), roll(v, shift), args)
        return roll(out, tuple(-s for s in shift))
    return _neighborhood(backend, q, k, v, args)


def _neighborhood(backend, q, k, v, args):
    if backend == "triton":
        from .kernels.neighborhood_triton import neighborhood_triton as run
    elif backend == "flex":
        from .kernels.flex import neighborhood_flex as run
    else:
        from .kernels.neighborhood_torch import neighborhood_torch as run
    from .kernels.nonfinite import contain_nonfinite

    return contain_nonfinite(lambda q, k, v, kx, vx: run(q, k, v, *args), q, k, v)


def _roll_grid(x, shift, *, grid, text_len, text_first):
    """``x`` ``[B, S, H, D]`` with its grid tokens rolled by ``-shift`` per axis (text tokens stay)."""
    import torch

    n = math.prod(grid)
    lo = text_len if text_first else 0
    image = x[:, lo:lo + n].unflatten(1, grid)
    image = torch.roll(image, shifts=[-s for s in shift], dims=list(range(1, 1 + len(grid)))).flatten(1, len(grid))
    if not text_len:
        return image
    text = x[:, :text_len] if text_first else x[:, n:]
    return torch.cat([text, image] if text_first else [image, text], dim=1)


def linear_attention(q, k, v, *, eps=1e-4, backend=None):
    """LinFusion's generalized linear attention (non-causal), O(N) in the sequence length.

    ``out_i = phi(q_i)^T S / (phi(q_i)^T z + eps)`` with ``phi(x) = elu(x) + 1``,
    ``S = sum_j phi(k_j) v_j^T / N`` and ``z = sum_j phi(k_j) / N`` over the
    ``N`` keys.  Accumulated in fp32 (the key features are scaled by ``1/N``
    before accumulation, so fp16/bf16 inputs stay finite at any length);
    returned in q's dtype.  Differentiable on every backend.

    Args:
        q: ``[B, Sq, H, D]``.
        k, v: ``[B, Sk, H, D]``; ``Sk`` may differ from ``Sq`` (e.g. cross-attention).
        eps: positive finite number added to the normaliser.
        backend: ``"triton"`` (fused kernels; CUDA, or CPU with ``TRITON_INTERPRET=1``),
            ``"torch"`` (portable eager code, chunked over the sequence) or
            ``None`` (Triton on CUDA, else torch).
    """
    check_qkv(q, k, v, same_length=False)
    if k.shape[1] == 0:
        raise ValueError(f"k and v must hold at least one token (the state is divided by N), got k {tuple(k.shape)}")
    eps = positive_number("eps", eps)
    backend = resolve_backend(backend, q.device, supported=("triton", "torch"))
    if backend == "triton" and q.numel() > 0:
        from .kernels.linear_attention_triton import linear_attention_triton

        return linear_attention_triton(q, k, v, float(eps))
    from .kernels.linear_attention_torch import linear_attention_torch

    return linear_attention_torch(q, k, v, float(eps))


def _check_radius(radius, grid):
    """``radius`` as a float, clamped to the grid's diagonal (a larger circle sees the whole grid the same
    way, and ``radius**2`` cannot overflow); an int too large for a float is such a radius too."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or radius <= 0:
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    if isinstance(radius, float) and not math.isfinite(radius):
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    diagonal = math.hypot(*grid)
    return diagonal if radius > diagonal else float(radius)


def _check_pooling(down_factor, pool_weight, q):
    if down_factor is None:
        if pool_weight is not None:
            raise ValueError("pool_weight was given without down_factor; pass down_factor=d with a d x d pool_weight")
        return None, None
    if isinstance(down_factor, bool) or not isinstance(down_factor, int) or down_factor < 2:
        raise ValueError(
            f"down_factor must be None (no pooled tokens) or an int >= 2, got {down_factor!r}"
        )
    d = down_factor
    if pool_weight is None:
        import torch

        return d, torch.full((d, d), 1.0 / (d * d), device=q.device, dtype=torch.float32)
    if not hasattr(pool_weight, "is_floating_point") or not pool_weight.is_floating_point():
        raise ValueError(f"pool_weight must be a floating-point torch.Tensor of shape ({d}, {d}), got {pool_weight!r}")
    if tuple(pool_weight.shape) != (d, d):
        raise ValueError(f"pool_weight must have shape (down_factor, down_factor) = ({d}, {d}), "
                         f"got {tuple(pool_weight.shape)}")
    if pool_weight.device != q.device:
        raise ValueError(f"pool_weight is on {pool_weight.device} but q is on {q.device}")
    return d, pool_weight


def local_attention(q, k, v, grid, radius, *, text_len=0, text_first=True, down_factor=None, pool_weight=None,
                    scale=None, backend=None):
    """CLEAR's local (circular-window) attention, optionally with pooled global tokens.

    An image query at ``(y, x)`` attends to the image keys with
    ``(y - y')**2 + (x - x')**2 < radius**2`` (strictly less), to every text
    key and, with ``down_factor``, to every pooled token.  Text queries attend
    to every text and image key (never to pooled tokens).

    Args:
        q, k, v: ``[B, S, H, D]`` with ``S = text_len + H_grid * W_grid``.
        grid: ``(H, W)``: the image tokens in row-major order.
        radius: positive number (a float is fine); ``radius**2`` bounds the squared distance.
        text_len, text_first: text tokens before (FLUX) or after (SD3) the image.
        down_factor: ``None`` or an int ``d >= 2``: append ``ceil(H/d) * ceil(W/d)``
            pooled keys/values (row-major), ``pooled[i, j] = sum_{a,b} x[i*d+a, j*d+b] * pool_weight[a, b]``.
            Border rule for grids not divisible by ``d``: the last, partial
            windows repeat the grid's last row/column (edge replication,
            ``x[min(i*d+a, H-1), min(j*d+b, W-1)]``), so every window keeps its
            full weight; divisible grids follow the rule exactly (CLEAR's pooling).
        pool_weight: ``d x d`` tensor (default ``1/d**2`` everywhere); gradients
            reach it when it requires grad (pooling is plain differentiable torch,
            accumulated in fp32, outside the attention kernel).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"triton"``, ``"flex"``, ``"torch"`` or ``None`` (Triton on CUDA, else torch).
            Every backend runs forward and backward (q, k, v, pool_weight).
    """
    check_qkv(q, k, v)
    grid = normalize_grid(grid, allowed=(2,))
    radius = _check_radius(radius, grid)
    check_tokens(q, grid, text_len)
    if not isinstance(text_first, bool):
        raise ValueError(f"text_first must be a bool, got {text_first!r}")
    down_factor, pool_weight = _check_pooling(down_factor, pool_weight, q)
    scale = check_scale(scale, q.shape[-1])
    backend = resolve_backend(backend, q.device)
    if q.numel() == 0:
        return q * 0.0  # no batch or no heads: empty, still attached to the graph
    kx = vx = None
    if down_factor is not None:
        from .kernels.local_torch import pool_tokens

        kx = pool_tokens(k, grid, down_factor, pool_weight, text_len, text_first)
        vx = pool_tokens(v, grid, down_factor, pool_weight, text_len, text_first)
    if backend == "triton":
        from .kernels.local_triton import local_triton as run
    elif backend == "flex":
        from .kernels.local_flex import local_flex as run
    else:
        from .kernels.local_torch import local_torch as run
    from .kernels.nonfinite import contain_nonfinite

    return contain_nonfinite(lambda q, k, v, kx, vx: run(q, k, v, grid, radius, text_len, text_first, kx, vx, scale),
                             q, k, v, kx, vx)


MOBA_SELECTIONS = ("query", "tile", "head")


def moba_params(grid, block, topk=None, threshold=None, selection="query"):
    """Validate and normalise mixture-of-block-attention parameters for ``grid``.

    Returns ``(grid, block, topk, threshold, selection)`` with ``grid``/``block`` as tuples (one
    entry per axis, a block larger than its axis clamped to the axis), exactly one of
    ``topk`` (int) / ``threshold`` (float) set.
    """
    grid = normalize_grid(grid)
    block = per_axis("block", block, len(grid))
    block = tuple(min(b, n) for b, n in zip(block, grid))
    if (topk is None) == (threshold is None):
        raise ValueError(f"give exactly one of topk or threshold, got topk={topk!r}, threshold={threshold!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive int (the number of blocks per query, own block included), "
                         f"got {topk!r}")
    if threshold is not None:
        if (not is_finite_number(threshold)
                or not 0 <= threshold <= 1):
            raise ValueError(f"threshold must be a number in [0, 1] (fraction of the normalised gate mass), "
                             f"got {threshold!r}")
        threshold = float(threshold)
    if selection not in MOBA_SELECTIONS:
        raise ValueError(f"selection must be one of {MOBA_SELECTIONS}, got {selection!r}")
    return grid, block, topk, threshold, selection


def moba_attention(q, k, v, grid, block, *, topk=None, threshold=None, selection="query", text_len=0,
                   text_first=True, scale=None, backend=None):
    """Mixture of block attention (MoBA; VMoBA's 1D/2D/3D partitions for video).

    The image/video tokens are cut into blocks of ``block`` tokens per axis; every query scores
    every block by its dot product with the block's mean key (fp32), keeps its own block plus the
    best others, and attends to the tokens of the chosen blocks only.  See
    ``diffaccel.kernels.moba_ref`` for the exact rules.

    Args:
        q, k, v: ``[B, S, H, D]`` with ``S = text_len + prod(grid)``.
        grid: ``(L,)``, ``(H, W)`` or ``(T, H, W)``: image/video tokens in row-major order.
        block: an int (every axis) or one size per axis; border blocks may be partial and a size
            larger than its axis covers the axis.  For a ``(T, H, W)`` video: temporal (1D)
            blocks ``(bt, H, W)``, spatial (2D) ``(1, bh, bw)`` (VMoBA's 2D blocks span every frame:
            ``(T, bh, bw)``), spatio-temporal (3D) ``(bt, bh, bw)``.
        topk: keep the own block plus the ``topk - 1`` best other blocks (``topk`` >= number of
            blocks: dense).
        threshold: VMoBA's rule: scores min-max normalised across blocks; the own block plus the
            fewest best other blocks (at least one) reaching ``threshold`` of the normalised total.
            Exactly one of ``topk`` / ``threshold``.
        selection: ``"query"`` (per query token and head: MoBA's rule), ``"tile"`` (per query block
            and head, scored with the block's mean query: coarser and faster) or ``"head"``
            (VMoBA's per-head global selection over all (query, block) pairs of a head).
        text_len, text_first: text tokens before (FLUX) or after (SD3) the grid; text queries see
            every key, image queries every text key plus their selected blocks.  The gate covers
            image blocks only.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"triton"`` (block-sparse Triton core; CUDA, or CPU with ``TRITON_INTERPRET=1``),
            ``"torch"`` (portable eager code) or ``None`` (Triton on CUDA, else torch).

    Differentiable in q, k, v on both backends; no gradient flows through the selection (as in MoBA).
    """
    check_qkv(q, k, v)
    grid, block, topk, threshold, selection = moba_params(grid, block, topk, threshold, selection)
    check_tokens(q, grid, text_len)
    if not isinstance(text_first, bool):
        raise ValueError(f"text_first must be a bool, got {text_first!r}")
    scale = check_scale(scale, q.shape[-1])
    backend = resolve_backend(backend, q.device, supported=("triton", "torch"))
    if q.numel() == 0:
        return q * 0.0  # no tokens or no batch: empty, still attached to the graph
    args = (q, k, v, grid, block, topk, threshold, selection, text_len, text_first, scale)
    if backend == "triton":
        from .kernels.moba_triton import moba_triton

        return moba_triton(*args)
    from .kernels.moba_torch import moba_torch

    return moba_torch(*args)



def dense_attention(q, k, v, *, scale=None):
    """Full softmax attention on ``[B, S, H, D]`` tensors (q and k/v may differ in length) with torch's
    ``scaled_dot_product_attention``: the baseline every pattern is measured against, and what padded
    text queries and dense layers run.  No argument checks beyond torch's own."""
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
