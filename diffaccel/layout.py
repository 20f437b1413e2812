"""Token layouts: where the image/video tokens of an attention call sit.

A pattern such as neighborhood attention needs, for every self-attention call,
the token grid (``(H, W)`` or ``(T, H, W)``, row-major) and where the other
tokens of the sequence sit.  diffusers does not pass that to attention
processors; each model family (``diffaccel.families``) reads it from the
denoiser's own inputs into a :class:`Layout`, once per denoiser call (see
``diffaccel.context``).

Everything that is not an image/video token of the grid is a **global token**:
text, FLUX Kontext / FLUX.2 / Qwen-Image-Edit reference images, Z-Image's
padding tokens.  Global tokens attend to every key, and every query attends
to every global key (as text always did); only image queries among image keys
follow the pattern.  A :class:`Split` says how many global tokens sit before
and after the grid in a call's sequence.

Padding: when the stock processor masks keys (padded text), the mask is read
once per tensor and call (:func:`key_padding`); padded global keys are
invisible, as in the stock processor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Layout", "LayoutError", "Split", "Match", "Padding", "key_padding"]


class LayoutError(ValueError):
    """The token layout of an attention call is unknown or inconsistent."""


@dataclass(frozen=True)
class Split:
    """Global tokens around the grid in one kind of self-attention call.

    ``before`` / ``after``: global tokens before / after the grid; ``None`` means
    "whatever the call holds beyond the grid and the other side".
    ``grid_queries``: the call's queries may be the grid tokens alone while its keys are
    the whole ``[before; grid; after]`` sequence (Qwen-Image 2.1's target-image rows).
    """

    before: int | None = 0
    after: int | None = 0
    grid_queries: bool = False

    def __post_init__(self):
        if self.before is None and self.after is None:
            raise LayoutError("a Split needs `before` or `after`")


@dataclass(frozen=True)
class Match:
    """How one attention call's tokens sit: its grid and its global tokens before / after the grid.
    ``grid_queries``: the queries are the grid tokens only (keys: the whole sequence)."""

    grid: tuple
    before: int
    after: int
    grid_queries: bool = False


@dataclass(frozen=True)
class Layout:
    """Token layout of one denoiser call.

    ``grids``: the candidate grids of the call (one per UNet level; one for the
    transformers), each ``(H, W)`` or ``(T, H, W)`` in row-major order.
    ``text_len``: text tokens joined to the image tokens (0 when none, ``None`` when unknown,
    as for a processor's explicit ``grid=``); read by the hand-written processors.
    ``splits``: the :class:`Split` s the self-attention calls of the model can take; empty
    means "the tokens beyond the grid are global, placed by the processor's ``text_first``"
    (a processor's explicit ``grid=``).
    ``passthrough``: an attention call that matches no split runs the stock (dense) attention
    instead of being an error (Qwen-Image 2.1's block-causal prefix rows).
    ``nonzero_float_mask``: a floating-point attention mask marks valid keys by a non-zero
    value (Chroma's pipeline passes a 0/1 float mask; see ``diffaccel.families.chroma``)
    instead of SDPA's additive 0 / -inf.
    """

    grids: tuple
    text_len: int | None = 0
    splits: tuple = ()
    passthrough: bool = False
    nonzero_float_mask: bool = False

    def __post_init__(self):
        grids = tuple(tuple(int(x) for x in g) for g in self.grids)
        if not grids:
            raise LayoutError("a Layout needs at least one grid")
        if any(x < 1 for g in grids for x in g):
            raise LayoutError(f"token grid sizes must be positive, got {list(grids)}")
        object.__setattr__(self, "grids", grids)
        object.__setattr__(self, "splits", tuple(self.splits))

    def grid_for(self, n_tokens: int, where: str = "") -> tuple:
        """The grid holding exactly ``n_tokens`` image tokens (error if none does)."""
        for g in self.grids:
            if math.prod(g) == n_tokens:
                return g
        raise LayoutError(
            f"an attention layer{where} has {n_tokens} image tokens, which matches no token grid of this "
            f"call (grids {list(self.grids)} hold {[math.prod(g) for g in self.grids]} tokens); "
            "this layer's tokens are not a grid diffaccel can find: restrict `layers=` to other layers "
            "or give the processor an explicit grid="
        )

    @property
    def single_grid(self) -> tuple:
        if len(self.grids) != 1:
            raise LayoutError(f"expected one token grid for this call, got {list(self.grids)}")
        return self.grids[0]

    def match(self, n_q: int, n_k: int, text_first: bool = True) -> Match | None:
        """Where the grid sits in a call with ``n_q`` queries and ``n_k`` keys; ``None`` when no
        split fits, ``LayoutError`` when several do."""
        found = []
        for g in self.grids:
            n = math.prod(g)
            if not self.splits:
                if n_q == n_k and n_k >= n:
                    extra = n_k - n
                    found.append(Match(g, extra, 0) if text_first else Match(g, 0, extra))
                continue
            for s in self.splits:
                before = n_k - n - s.after if s.before is None else s.before
                after = n_k - n - before if s.after is None else s.after
                if before < 0 or after < 0 or before + n + after != n_k:
                    continue
                if n_q == n_k:
                    found.append(Match(g, before, after))
                elif s.grid_queries and n_q == n:
                    found.append(Match(g, before, after, grid_queries=True))
        found = list(dict.fromkeys(found))
        if len(found) > 1:
            raise LayoutError(f"an attention call with {n_q} queries and {n_k} keys fits several token layouts "
                              f"of this call: {found}")
        return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# key padding read from an attention mask


@dataclass(frozen=True)
class Padding:
    """Valid global tokens per batch element.  ``valid[b]``: a tuple of bools over the call's global
    tokens (the ``before`` ones, then the ``after`` ones).  ``rows_masked``: the stock mask also hides
    the padded *queries* (their rows are all masked: the stock attention gives them zeros); otherwise
    padded queries attend to every valid key."""

    valid: tuple
    rows_masked: bool


def _mask_error(why, n_k):
    return ValueError(
        f"attention_mask {why}; diffaccel patterns honour only key-padding masks: every image token valid and "
        f"some global (text) tokens hidden, as a boolean mask [B, 1, 1, {n_k}] / [B, {n_k}] or one hiding the "
        f"same tokens as queries too ([B, 1, S, {n_k}]); float masks must be additive 0 / -inf (or <= -1e4)"
    )


_FULL_CHECK = 1 << 24  # query x key masks up to this size are checked element by element


def key_padding(attn_mask, batch: int, n_q: int, n_k: int, match: Match,
                nonzero_float_mask: bool = False) -> Padding | None:
    """The :class:`Padding` of the global tokens of one call from the stock processor's ``attn_mask``
    (``None``: nothing padded).  Reads the mask on the host (one synchronisation); a mask that hides
    image tokens or is not a key-padding mask is a ``ValueError`` naming ``attention_mask``."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise _mask_error(f"must be a torch.Tensor, got {type(attn_mask).__name__}", n_k)
    m = attn_mask
    if m.dim() == 2:
        m = m[:, None, None, :]
    elif m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[-1] != n_k or m.shape[0] not in (1, batch) or m.shape[1] != 1 \
            or m.shape[2] not in (1, n_q):
        raise _mask_error(f"has shape {tuple(attn_mask.shape)}, expected [{batch}, 1, 1 or {n_q}, {n_k}]", n_k)
    if m.dtype == torch.bool:
        keep = m
    elif m.is_floating_point():
        if nonzero_float_mask:
            keep = m != 0
        else:
            keep = m == 0
            if not bool(((m == 0) | (m <= -1e4)).all()):
                raise _mask_error("is a floating-point mask with values other than 0 and -inf (it adds them to "
                                  "the attention logits instead of hiding keys; a boolean mask hides them)", n_k)
    else:
        raise _mask_error(f"must be boolean or floating point, got dtype {m.dtype}", n_k)
    rows_masked = keep.shape[2] > 1
    if rows_masked:
        # a query-and-key mask: row i of a valid query is the key validity; the grid's first query is valid
        row = keep[:, 0, 0 if match.grid_queries else match.before]
        if match.grid_queries:
            valid_q = None
        else:
            valid_q = keep[:, 0].diagonal(dim1=-2, dim2=-1)
            if not torch.equal(valid_q, row):
                raise _mask_error("hides keys from some queries and not others", n_k)
        if n_q * n_k <= _FULL_CHECK:  # beyond, the diagonal and the grid's row are checked (no second S x S mask)
            expect = row[:, None, :] & (valid_q[:, :, None] if valid_q is not None else True)
            if not torch.equal(keep[:, 0], expect.expand_as(keep[:, 0])):
                raise _mask_error("is not a padding mask (its rows differ beyond the padded tokens)", n_k)
        keep_k = row
    else:
        keep_k = keep[:, 0, 0]
    b, n = match.before, math.prod(match.grid)
    if not bool(keep_k[:, b:b + n].all()):
        raise _mask_error("hides image tokens", n_k)
    globals_ = torch.cat([keep_k[:, :b], keep_k[:, b + n:]], dim=1)
    if bool(globals_.all()):
        return None
    rows = [tuple(bool(x) for x in r) for r in globals_.tolist()]
    if len(rows) == 1 and batch > 1:
        rows = rows * batch
    return Padding(tuple(rows), rows_masked and not match.grid_queries)


def __getattr__(name):  # the tracker lived here before diffaccel.context
    if name in ("track_layout", "untrack_layout", "get_tracker", "LayoutTracker"):
        from . import context

        return getattr(context, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
