"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``).

* Self-attention: ``attn1`` of every block (``[text; video]``, joined by the processor).
* Layout: ``hidden_states`` ``[B, F, C, H, W]`` (frames before channels): CogVideoX 1.0
  (``patch_size_t=None``) ``(F, H/p, W/p)``; CogVideoX 1.5 groups ``patch_size_t`` latent frames per
  token: ``(F/p_t, H/p, W/p)``; the text length from ``encoder_hidden_states``.
* Processor: hand-written :class:`CogVideoXProcessor` mirroring ``CogVideoXAttnProcessor2_0`` — the
  stock processor calls ``F.scaled_dot_product_attention`` directly, so there is no
  ``dispatch_attention_fn`` seam to wrap.
"""
from __future__ import annotations

import torch

from ..layout import Layout, LayoutError
from ..processors import PatternProcessor, no_mask, qkv_heads_first
from . import Family
from ._common import attention_named, tokens

__all__ = ["FAMILY", "CogVideoXProcessor"]


def layout(model, get):
    hs = get("hidden_states")
    if hs is None or hs.dim() != 5:
        raise LayoutError("CogVideoX layout: expected hidden_states of shape [B, F, C, H, W]")
    p = int(model.config.patch_size)
    pt = model.config.patch_size_t  # None: CogVideoX 1.0 (one latent frame per token); 1.5: frames grouped
    f, h, w = int(hs.shape[1]), int(hs.shape[3]), int(hs.shape[4])
    t = f if pt is None else f // int(pt)
    return Layout(((t, h // p, w // p),), text_len=tokens(get, "encoder_hidden_states"))


class CogVideoXProcessor(PatternProcessor):
    """Self-attention ``attn1`` of ``CogVideoXTransformer3DModel`` (1.0 and 1.5), mirroring
    ``CogVideoXAttnProcessor2_0``: [text; video] joined by the processor (``text_first=True``),
    RoPE on the video tokens when given; the grid is ``(T, H, W)`` (see ``diffaccel.layout``).
    (The model passes no ``attention_mask``; one given through ``attention_kwargs`` is rejected.)"""

    family = "cogvideox"
    grid_ndim = 3

    def forward(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        no_mask(attention_mask, type(self).__name__)
        text_seq_length = encoder_hidden_states.size(1)
        grid = self.image_grid(hidden_states.shape[1])

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]

        query, key, value, head_dim = qkv_heads_first(attn, hidden_states)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            t = text_seq_length
            query = torch.cat([query[:, :, :t], apply_rotary_emb(query[:, :, t:], image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                key = torch.cat([key[:, :, :t], apply_rotary_emb(key[:, :, t:], image_rotary_emb)], dim=2)

        hidden_states = self.attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            grid=grid, text_len=text_seq_length, text_first=True,
        )
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


FAMILY = Family(
    name="cogvideox",
    model_classes=("CogVideoXTransformer3DModel",),
    grid_ndim=3,
    processors={"CogVideoXAttnProcessor2_0": CogVideoXProcessor},
    is_self_attention=attention_named("attn1", self_only=True),
    layout=layout,
    notes="`attn1` ([text; video]), 1.0 and 1.5",
)
