"""Qwen-Image 2.1 (``QwenImage21Transformer2DModel``): one single-stream sequence
``[prefix; target image]`` where the prefix interleaves text and condition images with a
block-causal mask, and the target image (last) attends to everything.

* Self-attention: ``attn`` of every block.  Only the target image's rows change: in the prefill
  (one attention call per prefix segment, then one for the target) the prefix calls run the stock
  attention unchanged (the layout's ``passthrough``), and in the KV-cached decode steps the single
  call is the target's.  The target queries attend to every prefix key (global tokens) plus their
  pattern among the target's tokens.
* Layout: the target grid from the last ``img_shapes`` entry; the prefix length from ``img_mask``
  (each vision slot stands for 2 x 2 latent tokens; read on the host once per call).  The prefix
  key-padding mask (``encoder_hidden_states_mask``) is honoured.
* Processor: a wrapper over ``QwenImage21AttnProcessor`` (the default).  ``QwenImage21FlexAttnProcessor``
  runs the whole prefill as one FlexAttention call and is not wrapped: such layers are a clear error
  at ``apply`` (use the default processor).
"""
from __future__ import annotations

import math

from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21AttnProcessor

from ..layout import Layout, LayoutError, Split
from ..processors import StockProcessor
from . import Family
from ._common import attention_named
from .qwenimage import target_shape

__all__ = ["FAMILY", "QwenImage21Processor"]

_TOKENS_PER_SLOT = 4  # one vision-language image slot per 2 x 2 latent tokens


class QwenImage21Processor(StockProcessor):
    """``QwenImage21AttnProcessor`` with diffaccel's attention core on the target image's rows."""

    stock = QwenImage21AttnProcessor
    family = "qwenimage21"
    grid_ndim = 2
    text_first = True


def layout(model, get):
    _, frame, grid = target_shape(get("img_shapes"), "Qwen-Image 2.1", -1)
    if frame != 1:
        raise LayoutError(f"Qwen-Image 2.1 layout: the target image has {frame} frames; expected 1")
    img_mask = get("img_mask")
    if img_mask is None:
        raise LayoutError("Qwen-Image 2.1 layout: the call has no img_mask")
    total = int(img_mask.shape[-1]) + (_TOKENS_PER_SLOT - 1) * int(img_mask.reshape(-1, img_mask.shape[-1])[0].sum())
    prefix = total - math.prod(grid)
    if prefix < 0:
        raise LayoutError(f"Qwen-Image 2.1 layout: img_mask describes {total} tokens, fewer than the {grid} target")
    return Layout((grid,), text_len=prefix, splits=(Split(prefix, 0, grid_queries=True),), passthrough=True)


FAMILY = Family(
    name="qwenimage21",
    model_classes=("QwenImage21Transformer2DModel",),
    grid_ndim=2,
    processors={"QwenImage21AttnProcessor": QwenImage21Processor},
    is_self_attention=attention_named("attn"),
    layout=layout,
    notes="target-image rows (prefill and KV-cached decode); block-causal prefix untouched",
)
