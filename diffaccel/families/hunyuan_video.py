"""HunyuanVideo (``HunyuanVideoTransformer3DModel``).

* Self-attention: ``attn`` of the dual-stream ``transformer_blocks`` (text projected by ``add_*_proj``)
  and of the ``single_transformer_blocks`` (text joined before the projections); both see
  ``[video; text]``.  The text-only token refiner (``context_embedder.token_refiner...attn``) is untouched.
* Layout: ``hidden_states`` ``[B, C, F, H, W]`` / ``(patch_size_t, patch_size, patch_size)``; the text
  length from ``encoder_hidden_states``, after the video.  The model's key-padding mask (built from
  ``encoder_attention_mask``) is honoured per batch element (``diffaccel.layout.key_padding``).
* Processor: :class:`HunyuanVideoProcessor`, a wrapper over ``HunyuanVideoAttnProcessor2_0``; a call
  without ``encoder_hidden_states`` (the token refiner, when one processor is set on every layer)
  runs the refiner's stock ``AttnProcessor2_0``.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from ..layout import Layout, Split
from ..processors import StockProcessor
from . import Family
from ._common import attention_named, tokens, video_grid

__all__ = ["FAMILY", "HunyuanVideoProcessor"]


class HunyuanVideoProcessor(StockProcessor):
    """``HunyuanVideoAttnProcessor2_0`` with diffaccel's attention core: ``[video; text]``."""

    stock = HunyuanVideoAttnProcessor2_0
    family = "hunyuan_video"
    grid_ndim = 3
    text_first = False

    def stock_fallback(self, attn, args, kwargs):
        ehs = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (args[1] if len(args) > 1 else None)
        if ehs is not None:
            return None
        from diffusers.models.attention_processor import AttnProcessor2_0

        refiner = AttnProcessor2_0()
        return lambda attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw: refiner(
            attn, hidden_states, None, attention_mask)


def layout(model, get):
    p, pt = int(model.config.patch_size), int(model.config.patch_size_t)
    text = tokens(get, "encoder_hidden_states")
    return Layout((video_grid(get, model, "HunyuanVideo", (pt, p, p)),), text_len=text, splits=(Split(0, text),))


FAMILY = Family(
    name="hunyuan_video",
    model_classes=("HunyuanVideoTransformer3DModel",),
    grid_ndim=3,
    processors={"HunyuanVideoAttnProcessor2_0": HunyuanVideoProcessor},
    is_self_attention=attention_named("attn", blocks=("transformer_blocks", "single_transformer_blocks")),
    layout=layout,
    notes="dual + single stream ([video; text], padded text honoured; token refiner untouched)",
)
