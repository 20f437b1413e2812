"""Qwen-Image (``QwenImageTransformer2DModel``): text-to-image, Qwen-Image-Edit (Plus) and Layered.

* Self-attention: the joint ``attn`` of every block, ``[text; target image; condition images]``.
* Layout: the target grid from ``img_shapes`` (the first ``(frame, h, w)`` entry of each sample; every
  sample must share them); the condition images that Qwen-Image-Edit packs after the target (and the
  further layers of Qwen-Image-Layered) are global tokens; the text length from
  ``encoder_hidden_states``.  The key-padding mask the stock processor builds from
  ``encoder_hidden_states_mask`` is honoured per batch element (any pattern of valid text).
* Processor: a wrapper over ``QwenDoubleStreamAttnProcessor2_0``.
"""
from __future__ import annotations

import math

from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

from ..layout import Layout, LayoutError, Split
from ..processors import StockProcessor
from . import Family
from ._common import attention_named, scaled_rope, tokens

__all__ = ["FAMILY", "QwenImageProcessor"]


class QwenImageProcessor(StockProcessor):
    """``QwenDoubleStreamAttnProcessor2_0`` with diffaccel's attention core."""

    stock = QwenDoubleStreamAttnProcessor2_0
    family = "qwenimage"
    grid_ndim = 2
    text_first = True


def target_shape(img_shapes, label, which):
    """``(h, w)`` of entry ``which`` of ``img_shapes`` (``[(frame, h, w), ...]`` per sample, shared)."""
    if not img_shapes:
        raise LayoutError(f"{label} layout: the call has no img_shapes")
    per_sample = [list(map(tuple, s)) if isinstance(s, (list, tuple)) and s and isinstance(s[0], (list, tuple))
                  else [tuple(s)] for s in img_shapes]
    if any(s != per_sample[0] for s in per_sample):
        raise LayoutError(f"{label} layout: the samples of a batch have different img_shapes {img_shapes}; "
                          "diffaccel needs one token layout per call")
    shapes = per_sample[0]
    frame, h, w = (int(x) for x in shapes[which])
    return shapes, frame, (h, w)


def layout(model, get):
    shapes, _, grid = target_shape(get("img_shapes"), "Qwen-Image", 0)
    hs = get("hidden_states")
    n_image = int(hs.shape[1]) if hs is not None else math.prod(grid)
    extra = n_image - math.prod(grid)
    if extra < 0:
        raise LayoutError(f"Qwen-Image layout: hidden_states has {n_image} tokens, fewer than the {grid} target")
    text = tokens(get, "encoder_hidden_states")
    return Layout((grid,), text_len=text, splits=(Split(text, extra),))


FAMILY = Family(
    name="qwenimage",
    model_classes=("QwenImageTransformer2DModel",),
    grid_ndim=2,
    processors={"QwenDoubleStreamAttnProcessor2_0": QwenImageProcessor},
    is_self_attention=attention_named("attn"),
    layout=layout,
    scaled_rope=lambda model, factor: scaled_rope(model, factor, ("QwenEmbedRope",), extra=("scale_rope",)),
    notes="joint `attn`; Edit condition images as global tokens; padded text honoured",
)
