"""Model families: one module per diffusers denoiser family.

Each module in this package defines one :class:`Family` named ``FAMILY``: how to recognise the model
and its self-attention modules, how to read each call's token layout from the denoiser's inputs
(:class:`~diffaccel.layout.Layout`), which stock processors it patches and with which processor
class (a wrapper over diffusers' own processor, ``diffaccel.processors.StockProcessor``, or a
hand-written one where the stock processor has no ``dispatch_attention_fn`` seam), and the rank of
its token grid.  Nothing about a family lives anywhere else; adding one is adding a module to
:data:`FAMILY_MODULES` (see CONTRIBUTING.md).

Family modules are imported on first use (they import the diffusers model code they describe).
"""
from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["FAMILIES", "FAMILY_MODULES", "Family", "check_stock_processors", "detect_family", "get_family",
           "select_layers", "self_attention_layers"]

# family name -> module in this package (import order = detection order)
FAMILY_MODULES = {
    "unet": "unet",
    "flux": "flux",
    "sd3": "sd3",
    "wan": "wan",
    "hunyuan_video": "hunyuan_video",
    "cogvideox": "cogvideox",
    "flux2": "flux2",
    "flux3": "flux3",
    "qwenimage": "qwenimage",
    "qwenimage21": "qwenimage21",
    "hunyuan_video15": "hunyuan_video15",
    "ltx2": "ltx2",
    "zimage": "zimage",
    "chroma": "chroma",
}
FAMILIES = tuple(FAMILY_MODULES)


@dataclass(frozen=True)
class Family:
    """One denoiser family.

    name: the family's name (``diffaccel.families.FAMILIES``).
    model_classes: diffusers class names of its denoisers (``diffusers.<name>``).
    grid_ndim: rank of its token grid: 2 for images ``(H, W)``, 3 for video ``(T, H, W)``; a method's
        per-axis options take this many values.
    processors: ``{stock processor class name: diffaccel processor class}``: a selected layer must run one
        of these stock processors, and gets the matching diffaccel processor.
    is_self_attention: ``(qualified_name, module) -> bool`` for the attention modules a method patches.
    layout: ``(model, get) -> Layout`` of one call, ``get(name)`` returning a forward argument.
    timestep_arg: the forward argument holding the timestep.
    native_tokens: tokens of one joint call at the family's training resolution (image grid + text),
        the base of CLEAR's proportional attention; ``None`` when unknown.
    scaled_rope: ``(model, factor) -> (attribute, new module)``: the model's rotary embedding with its
        ``theta`` multiplied by ``factor`` (NTK-aware RoPE), or ``None`` for families without RoPE.
    notes: one line for the README's support table.
    """

    name: str
    model_classes: tuple
    grid_ndim: int
    processors: dict
    is_self_attention: Callable
    layout: Callable
    timestep_arg: str = "timestep"
    native_tokens: int | None = None
    scaled_rope: Callable | None = None
    notes: str = field(default="", compare=False)

    def model_types(self) -> tuple:
        import diffusers

        return tuple(c for c in (getattr(diffusers, n, None) for n in self.model_classes) if c is not None)

    def processor_for(self, module):
        """The diffaccel processor class for an attention ``module`` running a stock processor of this family."""
        cls = self.processors.get(type(module.processor).__name__)
        if cls is None:
            raise ValueError(f"{type(module.processor).__name__} is not a stock processor of family {self.name!r}")
        return cls


def get_family(name: str) -> Family:
    """The :class:`Family` record named ``name``."""
    if name not in FAMILY_MODULES:
        raise ValueError(f"unknown model family {name!r}; known: {FAMILIES}")
    return importlib.import_module(f"{__name__}.{FAMILY_MODULES[name]}").FAMILY


def _families():
    return [get_family(name) for name in FAMILIES]


def detect_family(model, record: bool = False):
    """The family name of a denoiser model (its :class:`Family` with ``record=True``); ``ValueError``
    naming the model if unsupported."""
    import torch

    if isinstance(model, torch.nn.Module):
        for fam in _families():
            types = fam.model_types()
            if types and isinstance(model, types):
                return fam if record else fam.name
    supported = ", ".join(f"{c} ({f.name!r})" for f in _families() for c in f.model_classes)
    raise ValueError(f"unsupported model {type(model).__name__}: diffaccel supports {supported}")


def _family(family) -> Family:
    return family if isinstance(family, Family) else get_family(family)


def _has_processor(module) -> bool:
    return hasattr(module, "set_processor") and hasattr(module, "processor")


def self_attention_layers(model, family) -> list:
    """``[(qualified_name, attention_module)]`` of every self-attention layer of ``model``."""
    fam = _family(family)
    return [(n, m) for n, m in model.named_modules() if _has_processor(m) and fam.is_self_attention(n, m)]


def _matches(name, pattern) -> bool:
    # a pattern naming a module also selects the attention layers below it ("down_blocks.1")
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def normalize_patterns(layers) -> list:
    """``layers=`` as a list of glob patterns (a string is one pattern; any iterable is read once)."""
    if isinstance(layers, str):
        layers = [layers]
    try:
        patterns = list(layers)
    except TypeError:
        raise ValueError(f"layers must be a glob pattern or a list of them, got {layers!r}") from None
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"layers must be a non-empty list of non-empty glob patterns, got {layers!r}")
    return patterns


def select_layers(model, family, layers=None) -> tuple[list, set]:
    """Self-attention layers of ``model`` selected by ``layers`` (fnmatch patterns on the qualified
    module names; ``None`` = all).  Returns ``(selected, patterns_that_matched)``."""
    candidates = self_attention_layers(model, family)
    if layers is None:
        return candidates, set()
    patterns = normalize_patterns(layers)
    used = set()
    selected = []
    for name, module in candidates:
        hit = [p for p in patterns if _matches(name, p)]
        if hit:
            used.update(hit)
            selected.append((name, module))
    return selected, used


def check_stock_processors(family, layers) -> None:
    """``ValueError`` unless every selected layer runs one of the family's stock processors (which ours
    wrap or mirror): patching over another processor (IP-Adapter, a fused or custom one) would silently
    drop it."""
    fam = _family(family)
    stock = sorted(fam.processors)
    for name, module in layers:
        cls = type(module.processor).__name__
        if cls not in fam.processors:
            raise ValueError(
                f"layer {name!r} runs {cls}, not the stock processor ({' or '.join(stock)}) that diffaccel "
                "wraps; restore it first (e.g. model.set_default_attn_processor() or diffaccel.remove) "
                "or exclude the layer with layers="
            )
