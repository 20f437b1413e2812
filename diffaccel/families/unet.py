"""SD 1.5 / 2.1 / SDXL UNets (``UNet2DConditionModel``).

* Self-attention: ``attn1`` of every transformer block; cross-attention ``attn2`` is untouched.
* Layout: the latent ``(H, W)`` from ``sample``; the grids of the deeper levels follow the UNet's
  downsampling chain (a stride-2 conv with padding 1 gives ``ceil(n / 2)`` per level, odd sizes
  included).  Each attention layer picks the level whose token count matches its own.  No text
  in self-attention.
* Processor: hand-written :class:`UNetProcessor` mirroring ``AttnProcessor2_0`` — the stock
  processor calls ``F.scaled_dot_product_attention`` directly, so there is no
  ``dispatch_attention_fn`` seam to wrap.
"""
from __future__ import annotations

import torch

from ..layout import Layout, LayoutError
from ..processors import PatternProcessor, no_mask
from . import Family

__all__ = ["FAMILY", "UNetProcessor", "unet_grids"]


def _downsampled(n: int, down) -> int:
    """Size of one spatial axis after a UNet downsampler (``Downsample2D``-like)."""
    conv = getattr(down, "conv", None)
    if isinstance(conv, torch.nn.Conv2d):
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if isinstance(p, str):  # "same"/"valid" are not used by diffusers downsamplers
            raise LayoutError(f"unsupported downsampler padding {p!r} in {type(down).__name__}")
        extra = 1 if getattr(down, "use_conv", False) and getattr(down, "padding", None) == 0 else 0
        return (n + 2 * p + extra - k) // s + 1
    if isinstance(conv, torch.nn.AvgPool2d):
        k = conv.kernel_size if isinstance(conv.kernel_size, int) else conv.kernel_size[0]
        s = conv.stride if isinstance(conv.stride, int) else conv.stride[0]
        return (n - k) // s + 1
    raise LayoutError(f"cannot follow the token grid through downsampler {type(down).__name__}")


def unet_grids(model, height: int, width: int) -> tuple:
    """The token grids of every level of a UNet for a latent of ``height x width``."""
    grids = [(height, width)]
    h, w = height, width
    for block in model.down_blocks:
        for down in getattr(block, "downsamplers", None) or ():
            h, w = _downsampled(h, down), _downsampled(w, down)
            grids.append((h, w))
    return tuple(grids)


def layout(model, get):
    sample = get("sample")
    if sample is None or sample.dim() != 4:
        raise LayoutError("UNet layout: expected `sample` of shape [B, C, H, W]")
    return Layout(unet_grids(model, int(sample.shape[-2]), int(sample.shape[-1])))


class UNetProcessor(PatternProcessor):
    """Self-attention of ``UNet2DConditionModel`` (``attn1``), mirroring ``AttnProcessor2_0``.

    The grid of each layer is the UNet level whose token count matches; a 4-D ``[B, C, H, W]``
    input carries its own grid.  Cross-attention calls run the stock ``AttnProcessor2_0`` unchanged.
    """

    family = "unet"

    def __init__(self, core, *, grid=None):
        super().__init__(core, grid=grid)
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._stock = AttnProcessor2_0()

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            from diffusers.utils import deprecate

            deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored.")
        no_mask(attention_mask, type(self).__name__)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            grid = (height, width) if self._explicit is None else self.image_grid(height * width)
        batch_size, sequence_length, _ = hidden_states.shape
        if input_ndim != 4:
            grid = self.image_grid(sequence_length)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim)
        # norms act in the stock [B, H, S, D] layout
        if attn.norm_q is not None:
            query = attn.norm_q(query.transpose(1, 2)).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key.transpose(1, 2)).transpose(1, 2)

        hidden_states = self.attend(query, key, value, grid=grid, text_len=0, text_first=True)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def is_self_attention(name, module):
    # Attention modules of transformer blocks; attn1 is self-attention unless only_cross_attention
    return (
        name.rsplit(".", 1)[-1] == "attn1"
        and not getattr(module, "is_cross_attention", False)
        and getattr(module, "added_kv_proj_dim", None) is None
    )


FAMILY = Family(
    name="unet",
    model_classes=("UNet2DConditionModel",),
    grid_ndim=2,
    processors={"AttnProcessor2_0": UNetProcessor, "AttnProcessor": UNetProcessor},
    is_self_attention=is_self_attention,
    layout=layout,
    notes="`attn1` of every level (grids follow the downsampling chain)",
)
