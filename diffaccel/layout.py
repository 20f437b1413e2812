"""Token layouts: where the image/video tokens of each attention call sit.

A pattern such as neighborhood attention needs, for every self-attention call,
the token grid (``(H, W)`` or ``(T, H, W)``, row-major) and how many text
tokens surround it.  diffusers does not pass that to attention processors, so
diffaccel records it from the denoiser's own inputs:

* :func:`track_layout` installs a forward pre-hook on the denoiser
  (``register_forward_pre_hook(..., with_kwargs=True)``).  On every call it
  computes the :class:`Layout` of that call from the inputs (below) and binds
  every diffaccel processor found in the model to the model's
  :class:`LayoutTracker`.  The hook is idempotent and cheap: the attention
  modules are found once and cached; the layout is plain ints.
* Per family (``diffaccel.families``):

  - ``"unet"``: latent ``(H, W)`` from ``sample``; the grids of the deeper
    levels follow the UNet's downsampling chain (a stride-2 conv with padding
    1 gives ``ceil(n / 2)`` per level, odd sizes included).  Each attention
    layer picks the level whose token count matches its own.
  - ``"flux"``: the grid from ``img_ids`` (rows, cols), which must be one full
    rectangular grid in row-major order (FLUX Kontext's extra reference-image
    tokens are not); ``text_len`` from ``encoder_hidden_states``.
  - ``"sd3"``: ``hidden_states`` ``[B, C, H, W]`` / ``patch_size``.
  - ``"wan"``: ``hidden_states`` ``[B, C, F, H, W]`` / ``patch_size`` ``(pt, ph, pw)``.
  - ``"hunyuan_video"``: ``hidden_states`` ``[B, C, F, H, W]`` /
    ``(patch_size_t, patch_size, patch_size)``; ``text_len`` from ``encoder_hidden_states``
    (padded text tokens are handled per call from the attention mask, see
    ``HunyuanVideoProcessor``).
  - ``"cogvideox"``: ``hidden_states`` ``[B, F, C, H, W]`` (frames before channels):
    CogVideoX 1.0 (``patch_size_t=None``) ``(F, H/p, W/p)``; CogVideoX 1.5 groups
    ``patch_size_t`` latent frames per token: ``(F/p_t, H/p, W/p)``; ``text_len`` from
    ``encoder_hidden_states``.

  The layout does not depend on the batch, so batched and classifier-free
  guidance calls work, and every resolution / aspect ratio is found anew on
  each call (no re-initialisation).

A processor learns its layout, in order of precedence, from an explicit
``grid=`` given to it, or from the tracker of the model it ran in last.  With
neither it raises :class:`LayoutError` saying what to do; it never guesses a
grid.  A layer whose token count matches no grid of the call also raises
:class:`LayoutError`.
"""
from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["Layout", "LayoutError", "LayoutTracker", "track_layout", "untrack_layout", "get_tracker"]

_TRACKER_ATTR = "_diffaccel_tracker"


class LayoutError(ValueError):
    """The token layout of an attention call is unknown or inconsistent."""


@dataclass(frozen=True)
class Layout:
    """Token layout of one denoiser call.

    ``grids``: the candidate grids of the call (one per UNet level; one for the
    transformers), each ``(H, W)`` or ``(T, H, W)`` in row-major order.
    ``text_len``: text tokens joined to the image tokens (0 when none, ``None`` when unknown,
    as for a processor's explicit ``grid=``).
    """

    grids: tuple
    text_len: int | None = 0
    _by_count: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        grids = tuple(tuple(int(x) for x in g) for g in self.grids)
        if not grids:
            raise LayoutError("a Layout needs at least one grid")
        object.__setattr__(self, "grids", grids)
        by_count = {}
        for g in grids:
            by_count.setdefault(math.prod(g), g)
        object.__setattr__(self, "_by_count", by_count)

    def grid_for(self, n_tokens: int, where: str = "") -> tuple:
        """The grid holding exactly ``n_tokens`` image tokens (error if none does)."""
        g = self._by_count.get(n_tokens)
        if g is None:
            raise LayoutError(
                f"an attention layer{where} has {n_tokens} image tokens, which matches no token grid of this "
                f"call (grids {list(self.grids)} hold {[math.prod(g) for g in self.grids]} tokens); "
                "this layer's tokens are not a grid diffaccel can find: restrict `layers=` to other layers "
                "or give the processor an explicit grid="
            )
        return g

    @property
    def single_grid(self) -> tuple:
        if len(self.grids) != 1:
            raise LayoutError(f"expected one token grid for this call, got {list(self.grids)}")
        return self.grids[0]


# ---------------------------------------------------------------------------------------------
# per-family layout of one call


def _downsampled(n: int, down) -> int:
    """Size of one spatial axis after a UNet downsampler (``Downsample2D``-like)."""
    conv = getattr(down, "conv", None)
    if isinstance(conv, torch.nn.Conv2d):
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if isinstance(p, str):  # "same"/"valid" are not used by diffusers downsamplers
            raise LayoutError(f"unsupported downsampler padding {p!r} in {type(down).__name__}")
        extra = 1 if getattr(down, "use_conv", False) and getattr(down, "padding", None) == 0 else 0
        return (n + 2 * p + extra - k) // s + 1
    if isinstance(conv, torch.nn.AvgPool2d):
        k = conv.kernel_size if isinstance(conv.kernel_size, int) else conv.kernel_size[0]
        s = conv.stride if isinstance(conv.stride, int) else conv.stride[0]
        return (n - k) // s + 1
    raise LayoutError(f"cannot follow the token grid through downsampler {type(down).__name__}")


def unet_grids(model, height: int, width: int) -> tuple:
    """The token grids of every level of a UNet for a latent of ``height x width``."""
    grids = [(height, width)]
    h, w = height, width
    for block in model.down_blocks:
        for down in getattr(block, "downsamplers", None) or ():
            h, w = _downsampled(h, down), _downsampled(w, down)
            grids.append((h, w))
    return tuple(grids)


def _unet_layout(model, get):
    sample = get("sample")
    if sample is None or sample.dim() != 4:
        raise LayoutError("UNet layout: expected `sample` of shape [B, C, H, W]")
    return Layout(unet_grids(model, int(sample.shape[-2]), int(sample.shape[-1])))


def flux_grid_from_ids(img_ids) -> tuple:
    """``(rows, cols)`` of FLUX ``img_ids`` (``[N, 3]``: (frame, row, col)); error unless they are one
    full rectangular grid in row-major order."""
    if img_ids.dim() == 3:
        img_ids = img_ids[0]
    if img_ids.dim() != 2 or img_ids.shape[-1] < 3 or img_ids.shape[0] == 0:
        raise LayoutError(f"FLUX layout: expected img_ids of shape [N, 3], got {tuple(img_ids.shape)}")
    ids = img_ids.detach().to("cpu", torch.float64)
    n = ids.shape[0]
    rows, cols = ids[:, 1], ids[:, 2]
    r0, c0 = rows[0].item(), cols[0].item()
    h = int(round(rows.max().item() - r0)) + 1
    w = int(round(cols.max().item() - c0)) + 1
    ok = h >= 1 and w >= 1 and h * w == n
    if ok:
        ar = torch.arange(n, dtype=torch.float64)
        ok = (
            bool(torch.equal(rows, r0 + torch.div(ar, w, rounding_mode="floor")))
            and bool(torch.equal(cols, c0 + ar % w))
            and bool((ids[:, 0] == ids[0, 0]).all())
        )
    if not ok:
        raise LayoutError(
            f"FLUX layout: img_ids ({n} tokens) are not one full rectangular grid of image tokens in row-major "
            "order (as FluxPipeline builds them); e.g. FLUX Kontext appends reference-image tokens. "
            "diffaccel patterns need a single image grid"
        )
    return (h, w)


class _FluxLayout:
    """FLUX layout with a cache: pipelines pass the same ``img_ids`` tensor every step, so the
    (host-synchronising) grid check runs once per generation."""

    def __init__(self):
        self._ids_ref = None
        self._ids_version = None
        self._grid = None

    def __call__(self, model, get):
        img_ids = get("img_ids")
        ehs = get("encoder_hidden_states")
        if img_ids is None:
            raise LayoutError("FLUX layout: the call has no img_ids")
        try:
            version = img_ids._version
        except RuntimeError:  # inference tensors have no version counter: check every call
            version = None
        ref = self._ids_ref() if self._ids_ref is not None else None
        if version is not None and ref is img_ids and self._ids_version == version:
            grid = self._grid
        else:
            grid = flux_grid_from_ids(img_ids)
            self._ids_ref, self._ids_version, self._grid = weakref.ref(img_ids), version, grid
        return Layout((grid,), text_len=0 if ehs is None else int(ehs.shape[1]))


def _patch_sizes(model, nd):
    p = model.config.patch_size
    p = (p,) * nd if isinstance(p, int) else tuple(p)
    if len(p) != nd:
        raise LayoutError(f"patch_size {model.config.patch_size!r} does not have {nd} entries")
    return p


def _sd3_layout(model, get):
    hs = get("hidden_states")
    if hs is None or hs.dim() != 4:
        raise LayoutError("SD3 layout: expected hidden_states of shape [B, C, H, W]")
    ph, pw = _patch_sizes(model, 2)
    ehs = get("encoder_hidden_states")
    return Layout(((int(hs.shape[-2]) // ph, int(hs.shape[-1]) // pw),), text_len=0 if ehs is None else int(ehs.shape[1]))


def _wan_layout(model, get):
    hs = get("hidden_states")
    if hs is None or hs.dim() != 5:
        raise LayoutError("Wan layout: expected hidden_states of shape [B, C, F, H, W]")
    pt, ph, pw = _patch_sizes(model, 3)
    f, h, w = (int(x) for x in hs.shape[-3:])
    return Layout(((f // pt, h // ph, w // pw),))


def _text_len(get):
    ehs = get("encoder_hidden_states")
    return 0 if ehs is None else int(ehs.shape[1])


def _hunyuan_video_layout(model, get):
    hs = get("hidden_states")
    if hs is None or hs.dim() != 5:
        raise LayoutError("HunyuanVideo layout: expected hidden_states of shape [B, C, F, H, W]")
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    f, h, w = (int(x) for x in hs.shape[-3:])
    return Layout(((f // pt, h // p, w // p),), text_len=_text_len(get))


def _cogvideox_layout(model, get):
    hs = get("hidden_states")
    if hs is None or hs.dim() != 5:
        raise LayoutError("CogVideoX layout: expected hidden_states of shape [B, F, C, H, W]")
    p = int(model.config.patch_size)
    pt = model.config.patch_size_t  # None: CogVideoX 1.0 (one latent frame per token); 1.5: frames grouped
    f, h, w = int(hs.shape[1]), int(hs.shape[3]), int(hs.shape[4])
    t = f if pt is None else f // int(pt)
    return Layout(((t, h // p, w // p),), text_len=_text_len(get))


def layout_fn(family: str):
    """A callable ``(model, get) -> Layout`` for ``family``; ``get(name)`` returns a forward argument."""
    if family == "unet":
        return _unet_layout
    if family == "flux":
        return _FluxLayout()
    if family == "sd3":
        return _sd3_layout
    if family == "wan":
        return _wan_layout
    if family == "hunyuan_video":
        return _hunyuan_video_layout
    if family == "cogvideox":
        return _cogvideox_layout
    raise LayoutError(f"no layout rule for model family {family!r}")


# ---------------------------------------------------------------------------------------------
# tracker


class LayoutTracker:
    """Records the :class:`Layout` of each call of one denoiser.

    Installed by :func:`track_layout`; ``tracker.layout`` is the layout of the
    current (or last) call, ``None`` before the first call.
    """

    def __init__(self, model, family: str):
        self.family = family
        self.layout: Layout | None = None
        self._compute = layout_fn(family)
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = []
        self._arg_index = {name: i for i, name in enumerate(params)}
        # attention modules (anything with a settable processor), found once
        self._attention = [
            (name, m) for name, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")
        ]
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, model, args, kwargs):
        from .processors import PatternProcessor

        bound = False
        for _, m in self._attention:
            p = m.processor
            if isinstance(p, PatternProcessor):
                if p._tracker is not self:
                    p._tracker = self
                bound = True
        if not bound:  # nothing of ours in the model: do not touch its inputs
            self.layout = None
            return None

        def get(name):
            if name in kwargs:
                return kwargs[name]
            i = self._arg_index.get(name)
            return args[i] if i is not None and i < len(args) else None

        self.layout = self._compute(model, get)
        return None

    def layer_names(self, processor) -> list[str]:
        """Qualified names of the attention modules using ``processor`` (for error messages)."""
        return [name for name, m in self._attention if m.processor is processor]

    def remove(self):
        self._handle.remove()
        for _, m in self._attention:
            if getattr(m.processor, "_tracker", None) is self:
                m.processor._tracker = None
        self.layout = None


def get_tracker(model) -> LayoutTracker | None:
    return model.__dict__.get(_TRACKER_ATTR)


def track_layout(model) -> LayoutTracker:
    """Record the token layout of every call of ``model`` (a supported diffusers denoiser).

    Idempotent: returns the existing tracker if there is one.  Needed by any
    diffaccel processor set directly with ``model.set_attn_processor(...)``
    without an explicit ``grid=``; :func:`diffaccel.apply` calls it for you.
    Undo with :func:`untrack_layout`.
    """
    tracker = get_tracker(model)
    if tracker is not None:
        return tracker
    from .families import detect_family

    tracker = LayoutTracker(model, detect_family(model))
    model.__dict__[_TRACKER_ATTR] = tracker
    return tracker


def untrack_layout(model) -> bool:
    """Remove the layout hook installed by :func:`track_layout`; returns whether there was one."""
    tracker = model.__dict__.pop(_TRACKER_ATTR, None)
    if tracker is None:
        return False
    tracker.remove()
    return True
