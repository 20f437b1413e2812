"""Functional attention ops: the one front door to every kernel.

Tensors are ``[B, S, H, D]`` (diffusers' ``dispatch_attention_fn`` layout); the
output has q's dtype.  Each op validates its arguments (``ValueError`` naming
the argument), normalises them, and hands plain tensors to a backend in
``diffaccel.kernels``: ``"triton"``, ``"flex"`` (torch FlexAttention) or
``"torch"`` (portable eager code); ``backend=None`` picks the best for the
device.
"""
from __future__ import annotations

import math

from ._validate import check_qkv, check_scale, check_tokens, normalize_grid, per_axis, resolve_backend

__all__ = ["linear_attention", "neighborhood_attention", "neighborhood_params"]


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


def neighborhood_attention(q, k, v, grid, kernel_size, *, dilation=1, stride=1, text_len=0, text_first=True,
                           scale=None, backend=None):
    """Neighborhood (sliding-window) attention with NATTEN semantics.

    Args:
        q, k, v: ``[B, S, H, D]`` with ``S = text_len + prod(grid)``.
        grid: ``(L,)``, ``(H, W)`` or ``(T, H, W)``: image/video tokens in row-major order.
        kernel_size, dilation, stride: an int or one per axis.  A kernel larger
            than its axis covers the whole axis.  ``stride == kernel_size`` gives
            blocked (Swin-style) windows.
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
    backend = resolve_backend(backend, q.device)
    args = (q, k, v, grid, kernel_size, dilation, stride, text_len, text_first, scale)
    if backend == "triton":
        from .kernels.neighborhood_triton import neighborhood_triton

        return neighborhood_triton(*args)
    if backend == "flex":
        from .kernels.flex import neighborhood_flex

        return neighborhood_flex(*args)
    from .kernels.neighborhood_torch import neighborhood_torch

    return neighborhood_torch(*args)


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
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    backend = resolve_backend(backend, q.device, supported=("triton", "torch"))
    if backend == "triton" and q.numel() > 0:
        from .kernels.linear_attention import linear_attention_triton

        return linear_attention_triton(q, k, v, float(eps))
    from .kernels.linear_attention_torch import linear_attention_torch

    return linear_attention_torch(q, k, v, float(eps))
