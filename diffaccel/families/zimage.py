"""Z-Image (``ZImageTransformer2DModel``: Z-Image and Z-Image-Turbo).

* Self-attention: ``attention`` of the image ``noise_refiner`` blocks (``[image; padding]``) and of the
  main ``layers`` (``[image; padding; caption]``).  The caption-only ``context_refiner`` (and the SigLIP
  refiner) are untouched.
* Layout: the image grid ``(H / patch_size, W / patch_size)`` of the latents in ``x`` (one
  ``[C, 1, H, W]`` tensor per sample; every sample must share the size); the model pads the image and
  the caption to multiples of 32 tokens: those padding tokens and the caption are global tokens after the
  grid.  Captions of different lengths in one batch give a key-padding mask, honoured per sample.
  Omni mode (``x`` a list of lists: condition images) is a clear error.
* Processor: a wrapper over ``ZSingleStreamAttnProcessor``.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF, ZSingleStreamAttnProcessor

from ..layout import Layout, LayoutError, Split
from ..processors import StockProcessor
from . import Family

__all__ = ["FAMILY", "ZImageProcessor"]


class ZImageProcessor(StockProcessor):
    """``ZSingleStreamAttnProcessor`` with diffaccel's attention core: ``[image; padding; caption]``."""

    stock = ZSingleStreamAttnProcessor
    family = "zimage"
    grid_ndim = 2
    text_first = False


def _padded(n):
    return n + (-n) % SEQ_MULTI_OF


def layout(model, get):
    x, caps = get("x"), get("cap_feats")
    if not isinstance(x, (list, tuple)) or not x:
        raise LayoutError("Z-Image layout: expected x as a list of [C, F, H, W] latents")
    if isinstance(x[0], (list, tuple)):
        raise LayoutError("Z-Image omni mode (condition images in x) is not supported by diffaccel patterns")
    p = get("patch_size") or 2
    fp = get("f_patch_size") or 1
    shapes = {tuple(int(s) for s in xi.shape[-3:]) for xi in x}
    if len(shapes) != 1:
        raise LayoutError(f"Z-Image layout: the latents in x have different sizes {sorted(shapes)}; diffaccel needs "
                          "one image size per call")
    f, h, w = shapes.pop()
    if f // fp != 1:
        raise LayoutError(f"Z-Image layout: expected one latent frame per image, got {f}")
    grid = (h // p, w // p)
    n = grid[0] * grid[1]
    pad = _padded(n) - n
    cap = max(_padded(len(c)) for c in caps) if caps else 0
    return Layout((grid,), text_len=pad + cap, splits=(Split(0, pad), Split(0, pad + cap)))


def is_self_attention(name, module):
    parts = name.split(".")
    return parts[-1] == "attention" and parts[0] in ("layers", "noise_refiner")


FAMILY = Family(
    name="zimage",
    model_classes=("ZImageTransformer2DModel",),
    grid_ndim=2,
    processors={"ZSingleStreamAttnProcessor": ZImageProcessor},
    is_self_attention=is_self_attention,
    layout=layout,
    timestep_arg="t",
    notes="`layers` + image `noise_refiner` (caption refiner untouched)",
)
