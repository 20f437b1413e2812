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

from ._validate import resolve_backend
from .context import StepCounter, get_tracker, track_layout, untrack_layout
from .families import check_stock_processors, detect_family, normalize_patterns, select_layers
from .registry import build_options, get_method

__all__ = ["apply", "remove", "applied_method", "applied_state", "denoisers", "trainable_parameters"]

_STATE_ATTR = "_diffaccel_applied"


class _Applied:
    """What :func:`apply` did to one denoiser (``applied_state(model)``)."""

    __slots__ = ("method", "options", "layers", "undo", "owns_tracker", "steps")

    def __init__(self, method, options, layers, undo, owns_tracker, steps):
        self.method, self.options, self.layers, self.undo = method, options, layers, undo
        self.owns_tracker, self.steps = owns_tracker, steps


def denoisers(pipe_or_model) -> list[tuple[str, torch.nn.Module]]:
    """``[(label, model)]``: the model itself (the model a ``torch.compile`` wrapper holds), or the
    denoisers of a pipeline (``unet``, ``transformer``, ``transformer_2`` ...)."""
    if isinstance(pipe_or_model, torch.nn.Module):
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


def applied_state(model) -> _Applied | None:
    """What :func:`apply` did to a denoiser ``model`` (method, options, patched layer names), or ``None``."""
    return model.__dict__.get(_STATE_ATTR)


def applied_method(model) -> str | None:
    """Name of the diffaccel method applied to a denoiser ``model``, or ``None``."""
    state = applied_state(model)
    return None if state is None else state.method


def _device(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def apply(pipe_or_model, method: str, *, layers=None, **options):
    """Switch the self-attention of a pipeline's denoiser(s) to ``method``.

    Args:
        pipe_or_model: a ``DiffusionPipeline`` (its ``unet`` / ``transformer*`` are patched: Wan 2.2's
            two experts both) or a denoiser model of a supported family (``diffaccel.families``).
            Anything else: ``ValueError`` naming it.
        method: a registered method name (``diffaccel.registry.available_methods()``),
            e.g. ``"neighborhood"``.
        layers: ``None`` (every self-attention layer of the family) or fnmatch glob pattern(s) on the
            qualified attention-module names, e.g. ``"transformer_blocks.*"`` or
            ``["down_blocks.1", "mid_block.*"]``; a pattern naming a module selects the attention
            layers below it.  Each pattern must match at least one self-attention layer.
        **options: the method's options (e.g. ``kernel_size=`` for "neighborhood"); an unknown option
            is a ``ValueError`` naming it.

    The token layout of every call is tracked automatically (``diffaccel.track_layout``), so any
    resolution, aspect ratio, batch size and classifier-free guidance work without re-applying.
    Applying to a model that already has a method is a ``ValueError``: :func:`remove` first.

    Returns ``pipe_or_model``.
    """
    if not isinstance(method, str):
        raise ValueError(f"method must be a method name (str), one of diffaccel.registry.available_methods(); "
                         f"got {method!r}")
    m = get_method(method)
    opts = build_options(m, options)
    targets = denoisers(pipe_or_model)
    patterns = None if layers is None else normalize_patterns(layers)  # read a generator once

    # 1. check everything before changing anything
    plans = []
    used_patterns = set()
    for label, model in targets:
        family = detect_family(model, record=True)
        if family.name not in m.families:
            raise ValueError(f"method {method!r} does not support {type(model).__name__} (family {family.name!r}); "
                             f"it supports {list(m.families)}")
        if applied_method(model) is not None:
            raise ValueError(
                f"{type(model).__name__} already has diffaccel method {applied_method(model)!r} applied; "
                "call diffaccel.remove(...) first"
            )
        if getattr(opts, "backend", None) is not None:
            resolve_backend(opts.backend, _device(model), m.backends)
        selected, used = select_layers(model, family, patterns)
        used_patterns |= used
        check_stock_processors(family, selected)
        plans.append((label, model, family, selected))
    if patterns is not None:
        unused = [p for p in patterns if p not in used_patterns]
        if unused:
            examples = [n for _, model, family, _ in plans for n, _ in select_layers(model, family)[0]][:4]
            raise ValueError(
                f"layers pattern(s) {unused} match no self-attention layer; names look like {examples}"
            )
    if not any(selected for *_, selected in plans):
        raise ValueError("no self-attention layer to patch")

    # 2. install (each install builds every processor before swapping); undo all on failure
    steps = StepCounter() if m.counts_steps(opts) else None  # one count for every denoiser of the pipeline
    done = []
    try:
        for label, model, family, selected in plans:
            if not selected:
                continue
            undo = m.install(model, family, opts, selected)
            owns = get_tracker(model) is None
            try:
                tracker = track_layout(model)
            except BaseException:
                undo()
                raise
            previous = (tracker.steps, tracker.count_steps)
            if steps is not None:
                tracker.steps, tracker.count_steps = steps, True
            state = _Applied(method, opts, [n for n, _ in selected], undo, owns, previous)
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
    tracker = get_tracker(model)
    if state.owns_tracker:
        untrack_layout(model)
    elif tracker is not None:
        tracker.steps, tracker.count_steps = state.steps
    return True


def remove(pipe_or_model) -> bool:
    """Undo :func:`apply`: restore the original processor objects and remove the layout hook
    that ``apply`` installed (a tracker installed earlier by the user is kept), so outputs are
    bit-identical to before.  Returns whether anything was removed (no method applied: no-op)."""
    removed = False
    for _, model in denoisers(pipe_or_model):
        removed |= _remove_one(model)
    return removed


def trainable_parameters(pipe_or_model) -> list:
    """The parameters a distillation trains for the method applied to ``pipe_or_model``'s denoiser(s)
    (each method's ``trainable_parameters``, see ``diffaccel.registry``): LinFusion's layers; CLEAR's
    image-stream projections and pooling weights; the attention projections of the patched layers for
    "neighborhood" and "moba".  ``ValueError`` when no method is applied."""
    params, seen = [], set()
    found = False
    for _, model in denoisers(pipe_or_model):
        state = applied_state(model)
        if state is None:
            continue
        found = True
        layers = [(n, model.get_submodule(n)) for n in state.layers]
        for p in get_method(state.method).trainable_parameters(model, layers):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not found:
        raise ValueError("no diffaccel method is applied: diffaccel.apply(...) first")
    return params
