"""``diffaccel.apply`` / ``diffaccel.remove``: switch a diffusers pipeline's
self-attention to a diffaccel method and back.

    pipe = FluxPipeline.from_pretrained(...)
    diffaccel.apply(pipe, "neighborhood", kernel_size=(16, 16))
    image = pipe(prompt, height=2048, width=2048).images[0]
    diffaccel.remove(pipe)      # original processors back; outputs bit-identical to before

``apply`` patches every denoiser of a pipeline (``pipe.unet``, ``pipe.transformer``,
``pipe.transformer_2`` ...) or a denoiser model passed directly.  It is
all-or-nothing: every argument is checked and every processor built before any
model changes.  Applying to a model that already has a method applied is an
error: call :func:`remove` first.
"""
from __future__ import annotations

import torch

from .families import check_stock_processors, detect_family, select_layers
from .layout import get_tracker, track_layout, untrack_layout
from .registry import build_options, get_method

__all__ = ["apply", "remove", "applied_method"]

_STATE_ATTR = "_diffaccel_applied"


class _Applied:
    __slots__ = ("method", "options", "layers", "undo", "owns_tracker")

    def __init__(self, method, options, layers, undo, owns_tracker):
        self.method, self.options, self.layers, self.undo, self.owns_tracker = method, options, layers, undo, owns_tracker


def _denoisers(pipe_or_model) -> list[tuple[str, torch.nn.Module]]:
    """``[(label, model)]``: the model itself, or the denoisers of a pipeline."""
    if isinstance(pipe_or_model, torch.nn.Module):
        # a torch.compile'd model: patch the model it wraps
        return [("", getattr(pipe_or_model, "_orig_mod", pipe_or_model))]
    config = getattr(pipe_or_model, "config", None)
    if config is None or not hasattr(pipe_or_model, "register_modules"):
        raise ValueError(
            f"expected a diffusers DiffusionPipeline or a denoiser model, got {type(pipe_or_model).__name__}"
        )
    found = []
    for name in config.keys():
        if name.startswith("_") or not (name == "unet" or name.startswith("transformer")):
            continue
        model = getattr(pipe_or_model, name, None)
        if isinstance(model, torch.nn.Module):
            found.append((name, model))
    if not found:
        raise ValueError(f"{type(pipe_or_model).__name__} has no unet or transformer to patch")
    return found


def applied_method(model) -> str | None:
    """Name of the diffaccel method applied to a denoiser ``model``, or ``None``."""
    state = model.__dict__.get(_STATE_ATTR)
    return None if state is None else state.method


def apply(pipe_or_model, method: str, *, layers=None, **options):
    """Switch the self-attention of a pipeline's denoiser(s) to ``method``.

    Args:
        pipe_or_model: a ``DiffusionPipeline`` (its ``unet`` / ``transformer*`` are
            patched) or a denoiser model (``UNet2DConditionModel``,
            ``FluxTransformer2DModel``, ``SD3Transformer2DModel``,
            ``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel``,
            ``CogVideoXTransformer3DModel``).  Anything else: ``ValueError`` naming it.
        method: a registered method name (``diffaccel.registry.available_methods()``),
            e.g. ``"neighborhood"``.
        layers: ``None`` (every self-attention layer of the family, see
            ``diffaccel.families``) or fnmatch glob pattern(s) on the qualified
            attention-module names, e.g. ``"transformer_blocks.*"`` or
            ``["down_blocks.1", "mid_block.*"]``; a pattern naming a module
            selects the attention layers below it.  Each pattern must match at
            least one self-attention layer.
        **options: the method's options (e.g. ``kernel_size=`` for
            "neighborhood"); an unknown option is a ``ValueError`` naming it.

    The token layout of every call is tracked automatically
    (``diffaccel.track_layout``), so any resolution, aspect ratio, batch size
    and classifier-free guidance work without re-applying.  Applying to a model
    that already has a method is a ``ValueError``: :func:`remove` first.

    Returns ``pipe_or_model``.
    """
    m = get_method(method)
    opts = build_options(m, options)
    targets = _denoisers(pipe_or_model)

    # 1. check everything before changing anything
    plans = []
    used_patterns = set()
    for label, model in targets:
        family = detect_family(model)
        if family not in m.families:
            raise ValueError(f"method {method!r} does not support {type(model).__name__} (family {family!r})")
        if applied_method(model) is not None:
            raise ValueError(
                f"{type(model).__name__} already has diffaccel method {applied_method(model)!r} applied; "
                "call diffaccel.remove(...) first"
            )
        selected, used = select_layers(model, family, layers)
        used_patterns |= used
        check_stock_processors(family, selected)
        plans.append((label, model, family, selected))
    if layers is not None:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        unused = [p for p in patterns if p not in used_patterns]
        if unused:
            examples = [n for _, model, family, _ in plans for n, _ in select_layers(model, family)[0]][:4]
            raise ValueError(
                f"layers pattern(s) {unused} match no self-attention layer; names look like {examples}"
            )
    if not any(selected for *_, selected in plans):
        raise ValueError("no self-attention layer to patch")

    # 2. install (each install builds every processor before swapping); undo all on failure
    done = []
    try:
        for label, model, family, selected in plans:
            if not selected:
                continue
            undo = m.install(model, family, opts, selected)
            owns = get_tracker(model) is None
            try:
                track_layout(model)
            except BaseException:
                undo()
                raise
            state = _Applied(method, opts, [n for n, _ in selected], undo, owns)
            model.__dict__[_STATE_ATTR] = state
            done.append(model)
    except BaseException:
        for model in done:
            _remove_one(model)
        raise
    return pipe_or_model


def _remove_one(model) -> bool:
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return False
    state.undo()
    if state.owns_tracker:
        untrack_layout(model)
    return True


def remove(pipe_or_model) -> bool:
    """Undo :func:`apply`: restore the original processor objects and remove the layout hook
    that ``apply`` installed (a tracker installed earlier by the user is kept), so outputs are
    bit-identical to before.  Returns whether anything was removed (no method applied: no-op)."""
    removed = False
    for _, model in _denoisers(pipe_or_model):
        removed |= _remove_one(model)
    return removed
