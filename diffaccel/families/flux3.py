"""FLUX.3 (``Flux3Transformer2DModel``).

* Self-attention: ``attn`` of the image mode blocks (``mode_blocks.image.*``: the target image alone)
  and of the joint ``single_transformer_blocks`` (``[text; target image; reference images]``).  The
  text mode blocks and the reference-image mode blocks (``mode_blocks.image_cond.*``, on the reference
  grid) are untouched.
* Layout: the target grid from ``img_ids`` (4 axes ``(t, h, w, l)``); the text length from
  ``encoder_hidden_states``; the reference tokens of ``image_cond_hidden_states`` are global tokens.
* Processor: a wrapper over ``Flux3AttnProcessor``.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_flux3 import Flux3AttnProcessor

from ..layout import Layout, LayoutError, Split
from ..processors import StockProcessor
from . import Family
from ._common import image_grid_from_ids, scaled_rope, tokens

__all__ = ["FAMILY", "Flux3Processor"]


class Flux3Processor(StockProcessor):
    """``Flux3AttnProcessor`` with diffaccel's attention core."""

    stock = Flux3AttnProcessor
    family = "flux3"
    grid_ndim = 2
    text_first = True


def layout(model, get):
    grid, n = image_grid_from_ids(get("img_ids"), "FLUX.3", frame_axes=(0, 3))
    hs = get("hidden_states")
    if hs is not None and int(hs.shape[1]) != n:
        raise LayoutError(f"FLUX.3 layout: hidden_states has {int(hs.shape[1])} tokens but img_ids describe one "
                          f"{grid} image of {n}")
    text, refs = tokens(get, "encoder_hidden_states"), tokens(get, "image_cond_hidden_states")
    return Layout((grid,), text_len=text, splits=(Split(0, 0), Split(text, refs)))


def is_self_attention(name, module):
    parts = name.split(".")
    return parts[-1] == "attn" and (parts[0] == "single_transformer_blocks" or parts[:2] == ["mode_blocks", "image"])


FAMILY = Family(
    name="flux3",
    model_classes=("Flux3Transformer2DModel",),
    grid_ndim=2,
    processors={"Flux3AttnProcessor": Flux3Processor},
    is_self_attention=is_self_attention,
    layout=layout,
    scaled_rope=lambda model, factor: scaled_rope(model, factor, ("Flux3PosEmbed",)),
    notes="image mode blocks + joint single blocks; reference images as global tokens",
)
