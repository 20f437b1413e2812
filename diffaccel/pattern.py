"""Which keys a query attends to under a method, read off the method's own attention op.

Nothing here draws a pattern from a formula: :func:`visible_keys` runs the attention core a
method installs (:func:`attention_core`: ``diffaccel.ops.<op>`` with the keyword arguments the
method derives from its options) on probe tensors and reads the result back:

* ``v`` is one-hot over a chunk of keys (key ``j`` of the chunk writes 1 into channel ``j``),
  so the output row of a query is its attention weight on each key of the chunk; the chunks
  together cover every key.  A key is visible when its weight is positive.
* ``q = k = 0`` (the default) gives every visible key the same weight ``1 / n_visible``: the
  pattern of a data-independent method (neighborhood, CLEAR's window, linear attention, full
  attention) is exactly the set of keys with a positive weight.
* A data-dependent method (MoBA's gate) needs the real ``q`` and ``k`` of a layer
  (:func:`capture_self_attention` records them from a full-attention forward).  The probe
  scales ``q`` by ``2**-20`` (exact in floating point): the gate's ranking of blocks (top-k or
  VMoBA's min-max normalised threshold) is unchanged and the softmax over the selected keys is
  nearly uniform, so every selected key still reads as a positive weight.

    core = attention_core("neighborhood", {"kernel_size": 5}, "flux")
    vis = visible_keys(core, grid=(16, 16), query=(8, 8))
    vis.image[0]            # [16, 16] bool: the keys query (8, 8) attends to (head 0)
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from . import ops
from .registry import build_options, get_method

__all__ = ["PROBE_MAX_TOKENS", "Visibility", "attention_core", "visible_keys", "capture_self_attention",
           "NoPatternProbe"]

# the probe runs the op once per chunk of keys over every query: cost ~ tokens**2; beyond this it is refused
PROBE_MAX_TOKENS = 16384
_Q_SCALE = 2.0 ** -20


class NoPatternProbe(ValueError):
    """The pattern of this method / token count cannot be probed."""


def _dense_core(q, k, v, *, grid, text_len, text_first):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_core(method: str, options: dict | None, family: str, layer: int = 0):
    """``core(q, k, v, *, grid, text_len, text_first)``: the attention ``method`` runs in its ``layer``-th
    patched self-attention layer of a ``family`` model with ``options`` (validated as ``diffaccel.apply``
    does: ``ValueError`` naming a bad option).  CLEAR's pooled tokens get zero pooling weights, so they
    take softmax mass (and are counted) but write nothing into the probe's one-hot values."""
    if method == "dense":
        if options:
            raise ValueError("dense (full attention) takes no options")
        return _dense_core
    m = get_method(method)
    if family not in m.families:
        raise ValueError(f"method {method!r} does not support {family!r} models (it supports {list(m.families)})")
    opts = build_options(m, dict(options or {}))
    if method == "neighborhood":
        from .families import get_family
        from .methods.neighborhood import core_kwargs

        kwargs = core_kwargs(opts, get_family(family))
        return lambda q, k, v, *, grid, text_len, text_first: ops.neighborhood_attention(
            q, k, v, grid, text_len=text_len, text_first=text_first, **kwargs)
    if method == "clear":
        d = opts.down_factor

        def clear_core(q, k, v, *, grid, text_len, text_first):
            pool = None if d is None else torch.zeros((d, d), device=q.device, dtype=torch.float32)
            return ops.local_attention(q, k, v, grid, opts.radius, text_len=text_len, text_first=text_first,
                                       down_factor=d, pool_weight=pool, backend=opts.backend)

        return clear_core
    if method == "moba":
        from .methods.moba import MobaCore

        blocks = opts.blocks()
        return MobaCore(blocks[layer % len(blocks)], opts)
    if method == "linfusion":
        # every query attends to every key with kernel-feature weights; text is not part of these layers
        return lambda q, k, v, *, grid, text_len, text_first: ops.linear_attention(
            q, k, v, eps=opts.eps, backend=opts.backend)
    raise NoPatternProbe(f"no pattern probe for method {method!r}")


@dataclasses.dataclass
class Visibility:
    """What one query attends to.  ``image``: ``[heads, *grid]`` bool; ``text``: ``[heads, text_len]`` bool;
    ``extra``: keys beyond the sequence the op adds itself (CLEAR's pooled tokens), per head."""

    image: np.ndarray
    text: np.ndarray
    extra: np.ndarray

    @property
    def share(self) -> np.ndarray:
        """``[*grid]``: the fraction of heads that attend to each image key."""
        return self.image.mean(axis=0)


def _query_index(grid, query) -> int:
    q = (query,) if isinstance(query, int) else tuple(int(x) for x in query)
    if len(q) != len(grid) or not all(0 <= a < n for a, n in zip(q, grid)):
        raise ValueError(f"query must be a position inside the grid {tuple(grid)}, got {query!r}")
    return int(np.ravel_multi_index(q, grid))


@torch.no_grad()
def visible_keys(core, grid, query, *, text_len: int = 0, text_first: bool = True, q=None, k=None, heads: int = 1,
                 chunk: int = 256, max_tokens: int = PROBE_MAX_TOKENS) -> Visibility:
    """Probe ``core`` for the keys the image query at ``query`` (a grid position) attends to.

    ``q``/``k``: ``[S, H, D]`` (one batch element, ``S = text_len + prod(grid)`` in the model's order) for a
    data-dependent core; default zeros with ``heads`` heads.  ``chunk``: keys read per op call.
    """
    grid = tuple(int(x) for x in grid)
    n_img = math.prod(grid)
    total = text_len + n_img
    if total > max_tokens:
        raise NoPatternProbe(f"the pattern probe runs the op over every query once per {chunk} keys; "
                             f"{total} tokens exceed its limit of {max_tokens}")
    qi = _query_index(grid, query) + (text_len if text_first else 0)
    if q is None:
        device = torch.device("cpu")
        d = max(chunk, 1)
        q = torch.zeros(1, total, heads, d, device=device)
        k = torch.zeros_like(q)
    else:
        if q.shape != k.shape or q.dim() != 3 or q.shape[0] != total:
            raise ValueError(f"q and k must be [S={total}, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
        heads = q.shape[1]
        d = max(chunk, q.shape[-1])
        pad = d - q.shape[-1]  # zero channels leave every q.k unchanged and give v room for a whole chunk
        q = torch.nn.functional.pad(q.float() * _Q_SCALE, (0, pad))[None]
        k = torch.nn.functional.pad(k.float(), (0, pad))[None]
    weights = torch.zeros(heads, total)
    row_sum = torch.zeros(heads)
    for c0 in range(0, total, d):
        n = min(d, total - c0)
        v = torch.zeros_like(q)
        idx = torch.arange(n, device=q.device)
        v[0, c0 + idx, :, idx] = 1.0
        out = core(q, k, v, grid=grid, text_len=text_len, text_first=text_first)[0, qi].float().cpu()  # [H, d]
        weights[:, c0:c0 + n] = out[:, :n]
        row_sum += out[:, :n].sum(-1)
    seen = weights > 0.5 / (total + 1) ** 2  # a visible key weighs >= ~1/total; masked ones exactly 0
    # keys the op appended (pooled tokens) take the remaining softmax mass at the same uniform weight
    w = torch.where(seen, weights, torch.zeros(())).amax(-1)
    extra = torch.where(w > 0, ((1 - row_sum) / w.clamp_min(1e-30)).round(), torch.zeros(())).clamp_min(0)
    text_sl = slice(0, text_len) if text_first else slice(n_img, total)
    img_sl = slice(text_len, total) if text_first else slice(0, n_img)
    return Visibility(image=seen[:, img_sl].reshape(heads, *grid).numpy(), text=seen[:, text_sl].numpy(),
                      extra=extra.long().numpy())


class _Captured(Exception):
    pass


def capture_self_attention(model, args, kwargs, n_tokens: int):
    """``(q, k)`` ``[B, S, H, D]`` of the first full-attention call of ``model(*args, **kwargs)`` whose queries
    and keys both number ``n_tokens`` (its first self-attention layer), recorded from
    ``torch.nn.functional.scaled_dot_product_attention`` as the model's own processors call it; the forward
    stops there.  ``None`` when no such call happens (e.g. a processor that does not use SDPA)."""
    from torch.overrides import TorchFunctionMode

    sdpa = torch.nn.functional.scaled_dot_product_attention
    found = {}

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kw=None):
            kw = kw or {}
            if func is sdpa:
                q = a[0] if len(a) > 0 else kw.get("query")
                k = a[1] if len(a) > 1 else kw.get("key")
                if q is not None and k is not None and q.shape[-2] == k.shape[-2] == n_tokens:
                    found["qk"] = (q.transpose(1, 2).detach().clone(), k.transpose(1, 2).detach().clone())
                    raise _Captured
            return func(*a, **kw)

    try:
        with torch.no_grad(), Recorder():
            model(*args, **kwargs)
    except _Captured:
        pass
    return found.get("qk")
