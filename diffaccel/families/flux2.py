"""FLUX.2 (``Flux2Transformer2DModel``: FLUX.2 [dev] and [klein]), multi-reference editing included.

* Self-attention: ``attn`` of the double-stream ``transformer_blocks`` (``Flux2Attention``) and of the
  ``single_transformer_blocks`` (``Flux2ParallelSelfAttention``, QKV and MLP in one projection); both
  see ``[text; target image; reference images]``.
* Layout: the target grid from ``img_ids`` (4 axes ``(t, h, w, l)``: the leading tokens sharing the
  first token's ``t`` and ``l``, one full row-major rectangle); the reference images that
  ``Flux2Pipeline`` appends after it (``t = 10, 20, ...``) are global tokens; the text length from
  ``encoder_hidden_states``.
* Processors: wrappers over ``Flux2AttnProcessor`` and ``Flux2ParallelSelfAttnProcessor``.  The KV-cache
  processors of FLUX.2 [klein] KV (``Flux2KV*``) are not wrapped (their attention goes through a helper
  with reference-only causal rows): such layers are a clear error at ``apply``.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

from ..processors import StockProcessor
from . import Family
from ._common import attention_named, scaled_rope
from .flux import ids_layout

__all__ = ["FAMILY", "Flux2Processor", "Flux2SingleProcessor"]


class Flux2Processor(StockProcessor):
    """``Flux2AttnProcessor`` (double-stream blocks) with diffaccel's attention core."""

    stock = Flux2AttnProcessor
    family = "flux2"
    grid_ndim = 2
    text_first = True


class Flux2SingleProcessor(StockProcessor):
    """``Flux2ParallelSelfAttnProcessor`` (single-stream blocks) with diffaccel's attention core."""

    stock = Flux2ParallelSelfAttnProcessor
    family = "flux2"
    grid_ndim = 2
    text_first = True


def layout(model, get):
    return ids_layout(model, get, "FLUX.2", frame_axes=(0, 3))


FAMILY = Family(
    name="flux2",
    model_classes=("Flux2Transformer2DModel",),
    grid_ndim=2,
    processors={"Flux2AttnProcessor": Flux2Processor, "Flux2ParallelSelfAttnProcessor": Flux2SingleProcessor},
    is_self_attention=attention_named("attn", blocks=("transformer_blocks", "single_transformer_blocks")),
    layout=layout,
    native_tokens=64 * 64 + 512,
    scaled_rope=lambda model, factor: scaled_rope(model, factor, ("Flux2PosEmbed",)),
    notes="double + single stream; multi-reference images as global tokens",
)
