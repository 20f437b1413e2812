"""FLUX.1 (``FluxTransformer2DModel``), FLUX Kontext included.

* Self-attention: ``attn`` of the double-stream blocks (text projected by ``add_*_proj``) and of
  the single-stream blocks (text and image already joined); both see ``[text; image; references]``.
* Layout: the target image grid from ``img_ids`` (the leading tokens sharing the first token's frame
  coordinate, one full row-major rectangle; read on the host once per call); FLUX Kontext's
  reference-image tokens after it are global tokens (every query sees them, they see everything);
  the text length from ``encoder_hidden_states``.
* Processor: :class:`FluxProcessor`, a wrapper over ``FluxAttnProcessor`` (shared with Chroma).
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ..layout import Layout, LayoutError, Split
from ..processors import StockProcessor
from . import Family
from ._common import attention_named, image_grid_from_ids, scaled_rope, tokens

__all__ = ["FAMILY", "FluxProcessor", "ids_layout", "flux_rope"]


class FluxProcessor(StockProcessor):
    """``FluxAttnProcessor`` with diffaccel's attention core: ``[text; image; references]``."""

    stock = FluxAttnProcessor
    family = "flux"
    grid_ndim = 2
    text_first = True


def ids_layout(model, get, label, frame_axes=(0,), **layout_kw):
    """The layout of a FLUX-style call: ``[text; target image; reference images]`` with the target grid
    from ``img_ids`` (shared by FLUX, Chroma and FLUX.2)."""
    grid, n_target = image_grid_from_ids(get("img_ids"), label, frame_axes)
    hs = get("hidden_states")
    n_image = int(hs.shape[1]) if hs is not None else n_target
    if n_image < n_target:
        raise LayoutError(f"{label} layout: hidden_states has {n_image} tokens but img_ids describe {n_target}")
    text = tokens(get, "encoder_hidden_states")
    return Layout((grid,), text_len=text, splits=(Split(text, n_image - n_target),), **layout_kw)


def layout(model, get):
    return ids_layout(model, get, "FLUX")


def flux_rope(model, factor):
    """``("pos_embed", FluxPosEmbed with theta * factor)`` (CLEAR's NTK-aware RoPE)."""
    return scaled_rope(model, factor, ("FluxPosEmbed",))


FAMILY = Family(
    name="flux",
    model_classes=("FluxTransformer2DModel",),
    grid_ndim=2,
    processors={"FluxAttnProcessor": FluxProcessor},
    is_self_attention=attention_named("attn"),
    layout=layout,
    native_tokens=64 * 64 + 512,  # 1024 x 1024 and 512 T5 tokens
    scaled_rope=flux_rope,
    notes="double + single stream; Kontext reference images as global tokens",
)
