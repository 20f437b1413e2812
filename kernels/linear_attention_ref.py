"""Plain PyTorch reference for LinFusion's generalized (non-causal) linear attention.

    phi(x)  = elu(x) + 1
    S       = sum_j phi(k_j) v_j^T / N          (D x D per batch and head)
    z       = sum_j phi(k_j) / N                (D per batch and head)
    out_i   = phi(q_i)^T S / (phi(q_i)^T z + eps)

``N`` is the number of keys.  Everything is computed in fp32 and returned in
q's dtype.  This is the definition the fast backends are tested against: it
materialises fp32 copies of q, k and v and is not meant to be fast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def elu_feature_map(x):
    """phi(x) = elu(x) + 1: positive, and the identity plus one for x > 0."""
    return F.elu(x) + 1.0


def linear_attention_reference(q, k, v, eps=1e-4):
    """``q``: ``[B, Sq, H, D]``, ``k``/``v``: ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]`` in q's dtype."""
    n = k.shape[1]
    qf = elu_feature_map(q.float())
    kf = elu_feature_map(k.float())
    vf = v.float()
    state = torch.einsum("bshd,bshe->bhde", kf, vf) / n
    norm = kf.sum(dim=1) / n  # [B, H, D]
    num = torch.einsum("bshd,bhde->bshe", qf, state)
    den = torch.einsum("bshd,bhd->bsh", qf, norm) + eps
    return (num / den.unsqueeze(-1)).to(q.dtype)
