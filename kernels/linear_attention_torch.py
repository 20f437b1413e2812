"""Portable eager backend for generalized linear attention, chunked over the sequence.

Same maths as :mod:`linear_attention_ref`, but the fp32 copies only ever exist
for one chunk of tokens at a time, so the extra memory is
``O(chunk * H * D)`` plus the ``D x D`` state, instead of fp32 copies of the
whole q, k and v.  The key features are scaled by ``1/N`` before they are
accumulated, so neither the state nor the normaliser grows with the sequence
length (no overflow for fp16/bf16 inputs at any length).  Built from
differentiable torch ops: autograd provides the backward.
"""
from __future__ import annotations

import torch

from .linear_attention_ref import elu_feature_map

# fp32 elements per chunk of q (or k, or v): 4M floats = 16 MiB.
_CHUNK_ELEMENTS = 1 << 22


def _chunk_len(t):
    b, _, h, d = t.shape
    return max(64, _CHUNK_ELEMENTS // max(1, b * h * d))


def linear_attention_torch(q, k, v, eps):
    b, sq, h, d = q.shape
    n = k.shape[1]
    inv_n = 1.0 / n
    state = q.new_zeros((b, h, d, d), dtype=torch.float32)
    norm = q.new_zeros((b, h, d), dtype=torch.float32)
    step = _chunk_len(k)
    for s in range(0, n, step):
        kf = elu_feature_map(k[:, s:s + step].float()) * inv_n
        state = state + torch.einsum("bshd,bshe->bhde", kf, v[:, s:s + step].float())
        norm = norm + kf.sum(dim=1)
    outs = []
    step = _chunk_len(q)
    for s in range(0, sq, step):
        qf = elu_feature_map(q[:, s:s + step].float())
        num = torch.einsum("bshd,bhde->bshe", qf, state)
        den = torch.einsum("bshd,bhd->bsh", qf, norm) + eps
        outs.append((num / den.unsqueeze(-1)).to(q.dtype))
    if not outs:  # no queries (or an empty batch/head axis)
        return q.new_empty(q.shape)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
