"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``).

* Self-attention: ``attn`` of every ``transformer_blocks`` block, ``[video; conditions]`` where the
  conditions are the Qwen text, the ByT5 glyph text and the image embeddings, valid tokens first
  (the model reorders them).  The token refiner is untouched.
* Layout: ``hidden_states`` ``[B, C, F, H, W]`` / ``(patch_size_t, patch_size, patch_size)``; every
  token after the video is a global token.  The stock processor's mask hides padded condition tokens as
  keys and queries; diffaccel honours it per batch element (padded queries get zeros, as under the
  stock mask).
* Processor: a wrapper over ``HunyuanVideo15AttnProcessor2_0``.  Note that the stock processor builds
  a ``[B, 1, S, S]`` boolean mask in every layer (also with diffaccel: it is the stock code running);
  its size, not the attention, then bounds the longest videos.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from ..layout import Layout, Split
from ..processors import StockProcessor
from . import Family
from ._common import attention_named, video_grid

__all__ = ["FAMILY", "HunyuanVideo15Processor"]


class HunyuanVideo15Processor(StockProcessor):
    """``HunyuanVideo15AttnProcessor2_0`` with diffaccel's attention core: ``[video; conditions]``."""

    stock = HunyuanVideo15AttnProcessor2_0
    family = "hunyuan_video15"
    grid_ndim = 3
    text_first = False


def layout(model, get):
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    return Layout((video_grid(get, model, "HunyuanVideo 1.5", (pt, p, p)),), text_len=None,
                  splits=(Split(0, None),))


FAMILY = Family(
    name="hunyuan_video15",
    model_classes=("HunyuanVideo15Transformer3DModel",),
    grid_ndim=3,
    processors={"HunyuanVideo15AttnProcessor2_0": HunyuanVideo15Processor},
    is_self_attention=attention_named("attn", blocks=("transformer_blocks",)),
    layout=layout,
    notes="[video; text] (padded text honoured; token refiner untouched)",
)
