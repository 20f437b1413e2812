"""Helpers shared by several family modules (reading inputs; no family knowledge)."""
from __future__ import annotations

import torch

from ..layout import LayoutError


def patch_sizes(model, nd, name="patch_size"):
    """``model.config.<name>`` as a tuple of ``nd`` ints."""
    p = getattr(model.config, name)
    p = (p,) * nd if isinstance(p, int) else tuple(p)
    if len(p) != nd:
        raise LayoutError(f"{name} {getattr(model.config, name)!r} does not have {nd} entries")
    return tuple(int(x) for x in p)


def tokens(get, name) -> int:
    """The sequence length (dim 1) of a forward argument; 0 when it is not given."""
    x = get(name)
    return 0 if x is None else int(x.shape[1])


def video_grid(get, model, label, patch, frames_first=False):
    """``(F/pt, H/ph, W/pw)`` of ``hidden_states`` ``[B, C, F, H, W]`` (``[B, F, C, H, W]`` with
    ``frames_first``)."""
    hs = get("hidden_states")
    if hs is None or hs.dim() != 5:
        raise LayoutError(f"{label} layout: expected hidden_states of shape "
                          f"{'[B, F, C, H, W]' if frames_first else '[B, C, F, H, W]'}")
    f, h, w = (int(hs.shape[1]), int(hs.shape[3]), int(hs.shape[4])) if frames_first else \
        (int(x) for x in hs.shape[-3:])
    pt, ph, pw = patch
    return (f // pt, h // ph, w // pw)


def image_grid_from_ids(ids, label, frame_axes=(0,)):
    """``((rows, cols), n_target)`` from position ids ``[N, k]`` (``[B, N, k]``: the first element's):
    the target image is the leading run of tokens sharing the first token's ``frame_axes`` coordinates,
    one full rectangle in row-major order (axes 1 and 2 are row and column, as FLUX / FLUX.2 / Chroma
    build them); the tokens after it are reference images (FLUX Kontext, FLUX.2 multi-reference).
    Reads the ids on the host."""
    if ids is None:
        raise LayoutError(f"{label} layout: the call has no img_ids")
    if ids.dim() == 3:
        ids = ids[0]
    if ids.dim() != 2 or ids.shape[-1] < 3 or ids.shape[0] == 0:
        raise LayoutError(f"{label} layout: expected img_ids of shape [N, {max(frame_axes) + 3}], "
                          f"got {tuple(ids.shape)}")
    ids = ids.detach().to("cpu", torch.float64)
    same = torch.ones(ids.shape[0], dtype=torch.bool)
    for a in frame_axes:
        same &= ids[:, a] == ids[0, a]
    n = int(same.logical_not().nonzero()[0, 0]) if not bool(same.all()) else ids.shape[0]
    rows, cols = ids[:n, 1], ids[:n, 2]
    r0, c0 = rows[0].item(), cols[0].item()
    h = int(round(rows.max().item() - r0)) + 1
    w = int(round(cols.max().item() - c0)) + 1
    ok = h >= 1 and w >= 1 and h * w == n
    if ok:
        ar = torch.arange(n, dtype=torch.float64)
        ok = bool(torch.equal(rows, r0 + torch.div(ar, w, rounding_mode="floor"))) and bool(
            torch.equal(cols, c0 + ar % w))
    if not ok:
        raise LayoutError(
            f"{label} layout: the first {n} img_ids (the target image) are not one full rectangular grid of "
            "image tokens in row-major order, as the diffusers pipelines build them; diffaccel patterns need "
            "the target image as one grid (reference images may follow it)"
        )
    return (h, w), n


def scaled_rope(model, factor, classes, attr="pos_embed", extra=()):
    """``(attr, a copy of model.<attr> with theta * factor)`` for rotary embeddings built as
    ``cls(theta=..., axes_dim=..., **extra)`` (NTK-aware RoPE, CLEAR's ``ntk_factor``)."""
    old = getattr(model, attr, None)
    if type(old).__name__ not in classes:
        raise ValueError(f"NTK-scaled RoPE needs the model's {' or '.join(classes)}, found {type(old).__name__}")
    kwargs = {name: getattr(old, name) for name in extra}
    return attr, type(old)(theta=old.theta * factor, axes_dim=list(old.axes_dim), **kwargs)


def attention_named(*leaves, blocks=None, self_only=False):
    """An ``is_self_attention`` predicate: attention modules whose last name part is one of ``leaves``, inside
    one of the top-level ``blocks`` (any when ``None``); ``self_only`` skips modules marked
    ``is_cross_attention``."""

    def predicate(name, module):
        return (name.rsplit(".", 1)[-1] in leaves
                and (blocks is None or name.split(".", 1)[0] in blocks)
                and not (self_only and getattr(module, "is_cross_attention", False)))

    return predicate
