"""Portable eager backend for generalized linear attention, chunked over the sequence.

Same maths as :mod:`linear_attention_ref`, but the fp32 copies only ever exist
for one chunk of tokens at a time, so the extra memory is
``O(chunk * H * D)`` plus the ``D x (D + 1)`` state ``[S | z]``, instead of
fp32 copies of the whole q, k and v.  Each chunk's fp32 contribution is divided
by ``N`` before it is accumulated, so neither the state nor the normaliser grows
with the sequence length (no overflow for fp16/bf16 inputs at any length).
Numerator and normaliser come from one product with the augmented state.
Built from differentiable torch ops: autograd provides the backward; without
autograd, chunks are written straight into the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# fp32 elements per chunk of q (or k, or v): 4M floats = 16 MiB.
_CHUNK_ELEMENTS = 1 << 22


def _chunk_len(t):
    b, _, h, d = t.shape
    return max(64, _CHUNK_ELEMENTS // max(1, b * h * d))


def linear_attention_torch(q, k, v, eps):
    b, sq, h, d = q.shape
    n = k.shape[1]
    inv_n = 1.0 / n
    # state_aug = [S | z]: [B, H, D, D + 1], so one product gives numerator and normaliser
    state = q.new_zeros((b, h, d, d + 1), dtype=torch.float32)
    step = _chunk_len(k)
    for s in range(0, n, step):
        # F.elu returns a fresh tensor (it saves its input, not its output, for the backward): +1 in place
        kf = F.elu(k[:, s:s + step].float()).add_(1.0)
        vf = v[:, s:s + step].float()
        part = torch.cat([torch.einsum("bshd,bshe->bhde", kf, vf), kf.sum(dim=1).unsqueeze(-1)], dim=-1)
        state = state + part * inv_n  # each chunk's share is divided by N before it is accumulated
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    out = None if grad else q.new_empty(q.shape)
    outs = []
    step = _chunk_len(q)
    for s in range(0, sq, step):
        qf = F.elu(q[:, s:s + step].float()).add_(1.0)
        r = torch.einsum("bshd,bhde->bshe", qf, state)  # [B, c, H, D + 1]
        num, den = r[..., :d], r[..., d:] + eps
        if grad:
            outs.append((num / den).to(q.dtype))
        else:  # inference: write each chunk straight into the output (no concatenation pass)
            if q.dtype == torch.float32:
                torch.div(num, den, out=out[:, s:s + step])
            else:
                out[:, s:s + step].copy_(num / den)
    if not grad:
        return out
    if not outs:  # no queries (or an empty batch/head axis)
        return q.new_empty(q.shape)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
