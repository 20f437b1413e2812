"""Keep non-finite keys and values inside the attention pattern, for backends that cannot on their own.

A masked-out logit is ``-inf`` only if it is *replaced*: an additive ``0 / -inf`` mask (SDPA) turns a
NaN logit into NaN, and a zero probability times a NaN (or infinite) value is NaN, so one bad key or
value of a gathered halo or a partial block reaches queries that do not see it.
:func:`contain_nonfinite` runs such a backend on cleaned inputs (non-finite entries of ``k``/``v``
set to 0) and marks as NaN exactly the outputs that see a bad input: a second pass through the same
pattern with zero queries and keys (uniform probabilities over each query's visible keys, all > 0)
and values ``1`` where ``v`` is not finite or the key is not, ``0`` elsewhere.  Output ``(i, d)``
is NaN iff query ``i`` sees a key whose key is not finite or whose value ``d`` is not (the
reference's rule, ``reference.masked_attention_reference``); everything else is exactly what the
backend computes on finite inputs.  A non-finite query is cleaned too and gives a NaN row
(:func:`nan_rows`).  Finite inputs cost one ``isfinite`` pass over ``q``/``k``/``v`` and a host
synchronisation; under ``torch.compile`` the check (data-dependent control flow) is skipped, so a
compiled graph stays whole and runs the backend as it is.
"""
from __future__ import annotations

import torch

__all__ = ["clean", "contain_nonfinite", "nan_rows", "nonfinite_marks", "unchecked_or_finite"]


def unchecked_or_finite(*tensors):
    """Whether the fast path applies: under ``torch.compile`` (no data-dependent check there), or every given
    tensor (``None`` skipped) is finite, read with one host synchronisation."""
    if torch.compiler.is_compiling():
        return True
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return not flags or bool(torch.stack(flags).all())


def clean(t):
    return None if t is None else torch.where(torch.isfinite(t), t, torch.zeros((), dtype=t.dtype, device=t.device))


def nonfinite_marks(k, v):
    """fp32 ``1`` where a value is not finite or its key is not (every channel), else ``0``."""
    if k is None:
        return None
    bad = ~torch.isfinite(v) | ~torch.isfinite(k).all(-1, keepdim=True)
    return bad.to(torch.float32)


def _zeros(t):
    return None if t is None else torch.zeros(t.shape, dtype=torch.float32, device=t.device)


def nan_rows(out, q):
    """``out`` with the rows of non-finite queries set to NaN.  Queries are cleaned too before they reach
    a kernel: SDPA's fused CPU kernel returns 0 for a row whose every logit is NaN, and CPU bf16 matmuls
    can carry a NaN into a neighbouring row."""
    bad = ~torch.isfinite(q).all(-1, keepdim=True)
    return out.masked_fill(bad, float("nan")) if bool(bad.any()) else out


def contain_nonfinite(attend, q, k, v, kx=None, vx=None):
    """``attend(q, k, v, kx, vx)`` (any backend of one fixed pattern; ``kx``/``vx``: extra keys such as
    pooled tokens, or None) with non-finite keys / values reaching only the queries that see them, and
    non-finite queries giving NaN rows."""
    if unchecked_or_finite(q, k, v, kx, vx):
        return attend(q, k, v, kx, vx)
    out = attend(clean(q), clean(k), clean(v), clean(kx), clean(vx))
    with torch.no_grad():
        seen = attend(_zeros(q), _zeros(k), nonfinite_marks(k, v), _zeros(kx), nonfinite_marks(kx, vx))
    return nan_rows(out.masked_fill(seen > 0, float("nan")), q)
