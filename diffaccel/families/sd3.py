"""SD3 / SD3.5 (``SD3Transformer2DModel``).

* Self-attention: the joint ``attn`` of every block (``[image; text]``) and SD3.5's image-only ``attn2``.
* Layout: ``hidden_states`` ``[B, C, H, W]`` / ``patch_size``; the text length from
  ``encoder_hidden_states``, after the image tokens.
* Processor: hand-written :class:`SD3Processor` mirroring ``JointAttnProcessor2_0`` — the stock
  processor calls ``F.scaled_dot_product_attention`` directly, so there is no
  ``dispatch_attention_fn`` seam to wrap.
"""
from __future__ import annotations

import torch

from ..layout import Layout, LayoutError
from ..processors import PatternProcessor, no_mask, qkv_heads_first
from . import Family
from ._common import attention_named, patch_sizes, tokens

__all__ = ["FAMILY", "SD3Processor"]


def layout(model, get):
    hs = get("hidden_states")
    if hs is None or hs.dim() != 4:
        raise LayoutError("SD3 layout: expected hidden_states of shape [B, C, H, W]")
    ph, pw = patch_sizes(model, 2)
    return Layout(((int(hs.shape[-2]) // ph, int(hs.shape[-1]) // pw),), text_len=tokens(get, "encoder_hidden_states"))


class SD3Processor(PatternProcessor):
    """SD3 / SD3.5 attention, mirroring ``JointAttnProcessor2_0``: the joint ``attn`` sees
    [image; text] (``text_first=False``); SD3.5's dual ``attn2`` is image-only self-attention.
    (The stock processor ignores ``attention_mask``; this one rejects it.)"""

    family = "sd3"

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        no_mask(attention_mask, type(self).__name__)
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query, key, value, head_dim = qkv_heads_first(attn, hidden_states)

        text_len = 0
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
            text_len = encoder_hidden_states.shape[1]
        grid = self.image_grid(residual.shape[1])

        hidden_states = self.attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            grid=grid, text_len=text_len, text_first=False,
        )
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1]:],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


FAMILY = Family(
    name="sd3",
    model_classes=("SD3Transformer2DModel",),
    grid_ndim=2,
    processors={"JointAttnProcessor2_0": SD3Processor},
    is_self_attention=attention_named("attn", "attn2"),
    layout=layout,
    native_tokens=64 * 64 + 333,  # 1024 x 1024 and 77 CLIP + 256 T5 tokens
    notes="joint `attn` + SD3.5 `attn2`",
)
