"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): T2V, I2V, the TI2V-5B variant, and Wan 2.2 A14B's two
experts (``pipe.transformer`` and ``pipe.transformer_2``: ``diffaccel.apply`` on the pipeline patches
both and they share one step count).

* Self-attention: ``attn1`` of every block (video tokens only); the text / image cross-attention
  ``attn2`` is untouched.
* Layout: ``hidden_states`` ``[B, C, F, H, W]`` / ``patch_size`` ``(pt, ph, pw)``.  TI2V's image
  condition replaces latent frames (no extra tokens); its per-token timestep is read by its maximum
  for step counting.
* Processor: :class:`WanProcessor`, a wrapper over ``WanAttnProcessor``; calls with
  ``encoder_hidden_states`` (cross-attention) run the stock processor unchanged.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from ..layout import Layout, Split
from ..processors import StockProcessor
from . import Family
from ._common import attention_named, patch_sizes, video_grid

__all__ = ["FAMILY", "WanProcessor"]


class WanProcessor(StockProcessor):
    """``WanAttnProcessor`` with diffaccel's attention core on video self-attention (``(T, H, W)`` grid)."""

    stock = WanAttnProcessor
    family = "wan"
    grid_ndim = 3
    cross_attention_arg = "encoder_hidden_states"


def layout(model, get):
    return Layout((video_grid(get, model, "Wan", patch_sizes(model, 3)),), splits=(Split(0, 0),))


FAMILY = Family(
    name="wan",
    model_classes=("WanTransformer3DModel",),
    grid_ndim=3,
    processors={"WanAttnProcessor": WanProcessor},
    is_self_attention=attention_named("attn1", self_only=True),
    layout=layout,
    notes="`attn1`; 2.1, 2.2 (both experts), TI2V-5B",
)
