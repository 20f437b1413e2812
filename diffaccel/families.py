"""Model families: which diffusers denoisers diffaccel supports and where their
self-attention layers are.

=========  ==========================  ===============================================
family     model class                 self-attention layers patched
=========  ==========================  ===============================================
``unet``   ``UNet2DConditionModel``    ``attn1`` of every transformer block (SD 1.5 /
                                       2.1 / SDXL); cross-attention ``attn2`` untouched
``flux``   ``FluxTransformer2DModel``  ``attn`` of double-stream blocks ([text; image])
                                       and single-stream blocks ([text; image] joined)
``sd3``    ``SD3Transformer2DModel``   joint ``attn`` ([image; text]) and SD3.5's
                                       image-only ``attn2``
``wan``    ``WanTransformer3DModel``   video self-attention ``attn1``; text
                                       cross-attention ``attn2`` untouched
=========  ==========================  ===============================================

=================  ==================================  =======================================
family             model class                         self-attention layers patched
=================  ==================================  =======================================
``hunyuan_video``  ``HunyuanVideoTransformer3DModel``  ``attn`` of the dual-stream
                                                       ``transformer_blocks`` ([video; text],
                                                       padded text keys masked) and of the
                                                       ``single_transformer_blocks`` (the
                                                       joined sequence); the text-only
                                                       token-refiner attention
                                                       (``context_embedder...attn``) untouched
``cogvideox``      ``CogVideoXTransformer3DModel``     ``attn1`` of every block ([text; video],
                                                       CogVideoX 1.0 and 1.5)
=================  ==================================  =======================================

Adding a family touches this table (``_FAMILIES``), a layout rule in
``diffaccel.layout`` and a processor in ``diffaccel.processors``.
"""
from __future__ import annotations

import fnmatch

__all__ = ["FAMILIES", "detect_family", "self_attention_layers", "select_layers", "check_stock_processors"]

# family -> (diffusers model class name, stock processor class names that our processors mirror)
_FAMILIES = {
    "unet": ("UNet2DConditionModel", ("AttnProcessor2_0", "AttnProcessor")),
    "flux": ("FluxTransformer2DModel", ("FluxAttnProcessor",)),
    "sd3": ("SD3Transformer2DModel", ("JointAttnProcessor2_0",)),
    "wan": ("WanTransformer3DModel", ("WanAttnProcessor",)),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel", ("HunyuanVideoAttnProcessor2_0",)),
    "cogvideox": ("CogVideoXTransformer3DModel", ("CogVideoXAttnProcessor2_0",)),
}
FAMILIES = tuple(_FAMILIES)


def _model_classes():
    import diffusers

    return {fam: getattr(diffusers, cls) for fam, (cls, _) in _FAMILIES.items()}


def detect_family(model) -> str:
    """The family of a denoiser model; ``ValueError`` naming the model if unsupported."""
    import torch

    if isinstance(model, torch.nn.Module):
        for fam, cls in _model_classes().items():
            if isinstance(model, cls):
                return fam
    supported = ", ".join(f"{cls} ({fam!r})" for fam, (cls, _) in _FAMILIES.items())
    raise ValueError(f"unsupported model {type(model).__name__}: diffaccel supports {supported}")


def _is_self_attention(family, name, module) -> bool:
    if not (hasattr(module, "set_processor") and hasattr(module, "processor")):
        return False
    leaf = name.rsplit(".", 1)[-1]
    if family == "unet":
        # Attention modules of transformer blocks; attn1 is self-attention unless only_cross_attention
        return (
            leaf == "attn1"
            and not getattr(module, "is_cross_attention", False)
            and getattr(module, "added_kv_proj_dim", None) is None
        )
    if family == "flux":
        return leaf == "attn"
    if family == "sd3":
        return leaf in ("attn", "attn2")
    if family == "wan":
        return leaf == "attn1" and not getattr(module, "is_cross_attention", False)
    if family == "hunyuan_video":
        # dual- and single-stream blocks; the token refiner's text-only attention
        # (context_embedder.token_refiner.refiner_blocks.*.attn) is not a video self-attention
        return leaf == "attn" and name.split(".", 1)[0] in ("transformer_blocks", "single_transformer_blocks")
    if family == "cogvideox":
        return leaf == "attn1" and not getattr(module, "is_cross_attention", False)
    raise ValueError(f"unknown model family {family!r}; known: {FAMILIES}")


def self_attention_layers(model, family: str) -> list:
    """``[(qualified_name, attention_module)]`` of every self-attention layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if _is_self_attention(family, n, m)]


def _matches(name, pattern) -> bool:
    # a pattern naming a module also selects the attention layers below it ("down_blocks.1")
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def select_layers(model, family: str, layers=None) -> tuple[list, set]:
    """Self-attention layers of ``model`` selected by ``layers`` (fnmatch patterns on the qualified
    module names; ``None`` = all).  Returns ``(selected, patterns_that_matched)``."""
    candidates = self_attention_layers(model, family)
    if layers is None:
        return candidates, set()
    patterns = _normalize_patterns(layers)
    used = set()
    selected = []
    for name, module in candidates:
        hit = [p for p in patterns if _matches(name, p)]
        if hit:
            used.update(hit)
            selected.append((name, module))
    return selected, used


def _normalize_patterns(layers):
    if isinstance(layers, str):
        layers = [layers]
    try:
        patterns = list(layers)
    except TypeError:
        raise ValueError(f"layers must be a glob pattern or a list of them, got {layers!r}") from None
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"layers must be a non-empty list of non-empty glob patterns, got {layers!r}")
    return patterns


def check_stock_processors(family: str, layers) -> None:
    """``ValueError`` unless every selected layer runs the family's stock processor (which ours mirror):
    patching over another processor (IP-Adapter, a fused or custom one) would silently drop it."""
    stock = _FAMILIES[family][1]
    for name, module in layers:
        cls = type(module.processor).__name__
        if cls not in stock:
            raise ValueError(
                f"layer {name!r} runs {cls}, not the stock processor ({' or '.join(stock)}) that diffaccel "
                "mirrors; restore it first (e.g. model.set_default_attn_processor() or diffaccel.remove) "
                "or exclude the layer with layers="
            )
