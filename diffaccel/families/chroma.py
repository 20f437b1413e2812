"""Chroma (``ChromaTransformer2DModel``): FLUX.1's architecture with pruned modulation.

* Self-attention: ``attn`` of the double- and single-stream blocks, ``[text; image]``.
* Layout: as FLUX (target grid from ``img_ids``, text from ``encoder_hidden_states``).  The model's
  ``attention_mask`` (text padding, joint over ``[text; image]``) hides padded text as keys and
  queries; diffaccel honours it per batch element (padded text queries get zeros, as under the stock
  boolean mask).
* **Float masks.** ``ChromaPipeline`` passes its mask as a 0/1 *float* tensor, which SDPA adds to the
  logits (+1 on valid pairs) instead of hiding the padding (diffusers issue #12116).  diffaccel cannot
  add per-pair biases; it reads a float mask as "non-zero = valid" and hides the padded tokens, which
  is what the mask means (a boolean mask gives the same result in the stock model).  With the
  pipeline's float mask, diffaccel's output therefore differs from the stock model's by that bias.
* Processor: FLUX's :class:`~diffaccel.families.flux.FluxProcessor` (the same stock
  ``FluxAttnProcessor``).
"""
from __future__ import annotations

from . import Family
from ._common import attention_named
from .flux import FluxProcessor, flux_rope, ids_layout

__all__ = ["FAMILY"]


def layout(model, get):
    return ids_layout(model, get, "Chroma", nonzero_float_mask=True)


FAMILY = Family(
    name="chroma",
    model_classes=("ChromaTransformer2DModel",),
    grid_ndim=2,
    processors={"FluxAttnProcessor": FluxProcessor},
    is_self_attention=attention_named("attn", blocks=("transformer_blocks", "single_transformer_blocks")),
    layout=layout,
    native_tokens=64 * 64 + 512,
    scaled_rope=flux_rope,
    notes="double + single stream (padded text honoured)",
)
