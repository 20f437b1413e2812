"""LTX-2 (``LTX2VideoTransformer3DModel``): joint audio-video generation.

* Self-attention: the video self-attention ``attn1`` of every block.  The audio tokens stay on full
  attention: ``audio_attn1``, the text cross-attentions and the audio <-> video cross-attentions are
  untouched.
* Layout: the video grid ``(num_frames / patch_size_t, height / patch_size, width / patch_size)`` from
  the ``num_frames``, ``height`` and ``width`` arguments (latent sizes, as ``LTX2Pipeline`` passes them);
  tokens beyond the grid (conditioning latents appended by the condition pipelines) are global tokens.
  A ``video_self_attention_mask`` (IC-LoRA) is not a padding mask: a clear error.
* Processors: wrappers over ``LTX2AudioVideoAttnProcessor`` and ``LTX2PerturbedAttnProcessor`` (LTX-2.3's
  spatio-temporal guidance); calls with ``encoder_hidden_states`` (cross-attention) run the stock
  processor unchanged.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoAttnProcessor, LTX2PerturbedAttnProcessor

from ..layout import Layout, LayoutError, Split
from ..processors import StockProcessor
from . import Family
from ._common import attention_named

__all__ = ["FAMILY", "LTX2Processor", "LTX2PerturbedProcessor"]


class LTX2Processor(StockProcessor):
    """``LTX2AudioVideoAttnProcessor`` with diffaccel's attention core on video self-attention."""

    stock = LTX2AudioVideoAttnProcessor
    family = "ltx2"
    grid_ndim = 3
    text_first = False
    cross_attention_arg = "encoder_hidden_states"


class LTX2PerturbedProcessor(LTX2Processor):
    """``LTX2PerturbedAttnProcessor`` with diffaccel's attention core on video self-attention."""

    stock = LTX2PerturbedAttnProcessor


def layout(model, get):
    sizes = {name: get(name) for name in ("num_frames", "height", "width")}
    missing = [name for name, v in sizes.items() if v is None]
    if missing:
        raise LayoutError(f"LTX-2 layout: the call has no {', '.join(missing)}; diffaccel reads the video token "
                          "grid from num_frames, height and width (as LTX2Pipeline passes them)")
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    grid = (int(sizes["num_frames"]) // pt, int(sizes["height"]) // p, int(sizes["width"]) // p)
    hs = get("hidden_states")
    n = grid[0] * grid[1] * grid[2]
    extra = int(hs.shape[1]) - n if hs is not None else 0
    if extra < 0:
        raise LayoutError(f"LTX-2 layout: hidden_states has {int(hs.shape[1])} tokens, fewer than the {grid} grid "
                          "given by num_frames, height and width")
    return Layout((grid,), text_len=0, splits=(Split(0, extra),))


FAMILY = Family(
    name="ltx2",
    model_classes=("LTX2VideoTransformer3DModel",),
    grid_ndim=3,
    processors={"LTX2AudioVideoAttnProcessor": LTX2Processor, "LTX2PerturbedAttnProcessor": LTX2PerturbedProcessor},
    is_self_attention=attention_named("attn1", blocks=("transformer_blocks",)),
    layout=layout,
    notes="video `attn1` (audio and cross-attention untouched)",
)
