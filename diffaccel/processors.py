"""Attention processors that mirror diffusers' own, with a pluggable attention core.

Each processor reproduces its model's stock processor exactly (projections,
QK norms, RoPE, output projections, residual / rescale) and replaces only the
attention call (``dispatch_attention_fn`` / ``F.scaled_dot_product_attention``)
with a *core*::

    core(q, k, v, grid=..., text_len=..., text_first=...) -> out     # all [B, S, H, D]

so the same processors serve every pattern (neighborhood, CLEAR, mixture of
block attention ...): a method only supplies the core.  ``grid`` is the image /
video token grid of the call (plain ints), ``text_len`` the number of text
tokens joined to it, before (``text_first=True``, FLUX) or after (SD3) the
image tokens.

===============================  ================================  ==========================================
processor                        mirrors                           core sees
===============================  ================================  ==========================================
:class:`UNetProcessor`           ``AttnProcessor2_0``              self-attention (``attn1``): image tokens
:class:`FluxProcessor`           ``FluxAttnProcessor``             [text; image] (double- and single-stream)
:class:`SD3Processor`            ``JointAttnProcessor2_0``         [image; text] (``attn``); image (``attn2``)
:class:`WanProcessor`            ``WanAttnProcessor``              video self-attention (``attn1``)
:class:`HunyuanVideoProcessor`   ``HunyuanVideoAttnProcessor2_0``  [video; text] (dual- and single-stream);
                                                                   padded text keys dropped per batch element
:class:`CogVideoXProcessor`      ``CogVideoXAttnProcessor2_0``     [text; video] (``attn1``)
===============================  ================================  ==========================================

**Where the grid comes from.**  A processor needs the token layout of each
call (see ``diffaccel.layout``).  In order of precedence:

1. an explicit ``grid=`` given to the processor (``(H, W)``, or ``(T, H, W)``
   for the video families): every call of a layer using it must then hold exactly that grid
   (for FLUX single-stream blocks the text length is the remaining tokens);
2. the layout tracker of the model it runs in: ``diffaccel.apply`` installs
   it; when you set processors yourself with ``model.set_attn_processor(...)``
   call ``diffaccel.track_layout(model)`` once.  On every forward the tracker
   records the layout of the call and binds every diffaccel processor of the
   model to itself.

With neither, the call raises :class:`~diffaccel.layout.LayoutError`
explaining this; a grid is never guessed.

**Cross-attention and masks.**  The UNet and Wan processors only change
self-attention: a call with ``encoder_hidden_states`` (cross-attention, e.g.
when one processor is set on every layer with ``set_attn_processor``) runs the
stock processor unchanged.  A self-attention call with an ``attention_mask``
raises ``ValueError``: the patterns cannot honour arbitrary masks.  The one
exception is HunyuanVideo's own text-padding mask (video tokens and a prefix of
the text tokens valid per batch element), which :class:`HunyuanVideoProcessor`
reproduces exactly.

Processors are ``torch.nn.Module`` s (``attn.processor`` is then a submodule,
so trainable pattern parameters are saved as ``...attn.processor.<name>``);
their ``__call__`` carries the signature of ``forward`` so diffusers passes
the right keyword arguments.  Subclasses override :meth:`PatternProcessor.attend`
to change how the core is called.
"""
from __future__ import annotations

import inspect
import math
import weakref

import torch

from ._validate import normalize_grid
from .layout import Layout, LayoutError

__all__ = [
    "PatternProcessor",
    "UNetProcessor",
    "FluxProcessor",
    "SD3Processor",
    "WanProcessor",
    "HunyuanVideoProcessor",
    "CogVideoXProcessor",
    "PROCESSORS",
    "make_processor",
    "swap_processors",
]


def _no_mask(attention_mask, cls):
    if attention_mask is not None:
        raise ValueError(
            f"{cls} received an attention_mask on a self-attention call; diffaccel patterns cannot honour "
            "arbitrary attention masks. Remove the mask or exclude this layer with layers=..."
        )


class PatternProcessor(torch.nn.Module):
    """Base class: layout resolution and the core call, shared by every family's processor.

    Args:
        core: ``core(q, k, v, grid=..., text_len=..., text_first=...) -> out`` on ``[B, S, H, D]``.
        grid: optional explicit token grid for every call of this processor; without it the
            layout comes from the model's tracker (``diffaccel.track_layout``).
    """

    family = ""
    grid_ndim = 2

    def __init__(self, core, *, grid=None):
        super().__init__()
        if not callable(core):
            raise ValueError(f"core must be callable, got {type(core).__name__}")
        self.core = core
        self.grid = None if grid is None else normalize_grid(grid, allowed=(self.grid_ndim,))
        self._explicit = None if grid is None else Layout((self.grid,), text_len=None)
        self._tracker = None  # set by the model's LayoutTracker on every forward

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            # diffusers' attention modules filter the kwargs they pass by the signature of
            # `processor.__call__`; give it forward's signature while still going through
            # nn.Module.__call__ (hooks, compile).
            def __call__(self, *args, **kwargs):
                return torch.nn.Module.__call__(self, *args, **kwargs)

            __call__.__signature__ = inspect.signature(cls.forward)
            __call__.__doc__ = cls.forward.__doc__
            cls.__call__ = __call__

    def extra_repr(self):
        core = getattr(self.core, "func", self.core)
        parts = [f"core={getattr(core, '__name__', type(core).__name__)}"]
        if getattr(self.core, "keywords", None):
            parts += [f"{k}={v!r}" for k, v in self.core.keywords.items()]
        if self.grid is not None:
            parts.append(f"grid={self.grid}")
        return ", ".join(parts)

    # -- layout ------------------------------------------------------------------------------
    def layout(self) -> Layout:
        """The layout of the current call: the explicit grid, else the tracker's."""
        if self._explicit is not None:
            return self._explicit
        tracker = self._tracker
        if tracker is None:
            raise LayoutError(
                f"{type(self).__name__} does not know the token layout of this call: it has no grid= and "
                "the model is not tracked. Use diffaccel.apply(...), or call diffaccel.track_layout(model) "
                "once after model.set_attn_processor(...), or construct the processor with an explicit grid="
            )
        if tracker.layout is None:
            raise LayoutError(
                f"{type(self).__name__} has no layout for this call: the tracked model has not been called "
                "(call the model itself, not an attention layer alone, or give the processor grid=)"
            )
        return tracker.layout

    def _where(self):
        names = self._tracker.layer_names(self) if self._tracker is not None else []
        return f" ({', '.join(names)})" if names else ""

    def image_grid(self, n_tokens: int) -> tuple:
        """The grid of a call whose image tokens number ``n_tokens``."""
        layout = self.layout()
        try:
            return layout.grid_for(n_tokens)
        except LayoutError:
            return layout.grid_for(n_tokens, where=self._where())

    def joined_grid(self, n_total: int) -> tuple[tuple, int]:
        """``(grid, text_len)`` of a call holding text and image tokens joined (``n_total`` tokens)."""
        layout = self.layout()
        grid = layout.single_grid
        text_len = n_total - math.prod(grid)
        if text_len < 0 or (layout.text_len is not None and text_len != layout.text_len):
            raise LayoutError(
                f"an attention layer{self._where()} has {n_total} tokens; its image grid {grid} holds "
                f"{math.prod(grid)} and the call has {layout.text_len} text tokens"
            )
        return grid, text_len

    # -- core --------------------------------------------------------------------------------
    def attend(self, q, k, v, *, grid, text_len, text_first):
        """Call the core on ``[B, S, H, D]`` tensors; override to change how it is called."""
        return self.core(q, k, v, grid=grid, text_len=text_len, text_first=text_first)


# ---------------------------------------------------------------------------------------------
# UNet2DConditionModel (SD 1.5 / 2.1 / SDXL): mirrors AttnProcessor2_0


class UNetProcessor(PatternProcessor):
    """Self-attention of ``UNet2DConditionModel`` (``attn1``), mirroring ``AttnProcessor2_0``.

    The grid of each layer is the UNet level whose token count matches (see
    ``diffaccel.layout``); a 4-D ``[B, C, H, W]`` input carries its own grid.
    Cross-attention calls run the stock ``AttnProcessor2_0`` unchanged.
    """

    family = "unet"
    _stock = None

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            if UNetProcessor._stock is None:
                from diffusers.models.attention_processor import AttnProcessor2_0

                UNetProcessor._stock = AttnProcessor2_0()
            return UNetProcessor._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            from diffusers.utils import deprecate

            deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored.")
        _no_mask(attention_mask, type(self).__name__)

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


# ---------------------------------------------------------------------------------------------
# FluxTransformer2DModel: mirrors FluxAttnProcessor


def _flux_qkv(attn, hidden_states, encoder_hidden_states):
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        eq = ek = ev = None
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return query, key, value, eq, ek, ev
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    eq = ek = ev = None
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        eq = attn.add_q_proj(encoder_hidden_states)
        ek = attn.add_k_proj(encoder_hidden_states)
        ev = attn.add_v_proj(encoder_hidden_states)
    return query, key, value, eq, ek, ev


class FluxProcessor(PatternProcessor):
    """``FluxAttention`` of double-stream blocks ([text; image], text from ``encoder_hidden_states``)
    and single-stream blocks (the joined [text; image] sequence; the text length is the tokens
    beyond the image grid), mirroring ``FluxAttnProcessor``.  ``text_first=True``."""

    family = "flux"

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        _no_mask(attention_mask, type(self).__name__)
        query, key, value, eq, ek, ev = _flux_qkv(attn, hidden_states, encoder_hidden_states)

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        joint = attn.added_kv_proj_dim is not None and encoder_hidden_states is not None
        if joint:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
            grid, text_len = self.image_grid(hidden_states.shape[1]), encoder_hidden_states.shape[1]
        else:
            grid, text_len = self.joined_grid(hidden_states.shape[1])

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.attend(query, key, value, grid=grid, text_len=text_len, text_first=True)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [n_text, hidden_states.shape[1] - n_text], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


# ---------------------------------------------------------------------------------------------
# SD3Transformer2DModel: mirrors JointAttnProcessor2_0


def _qkv_heads_first(attn, hidden_states):
    """``to_q/to_k/to_v`` of ``hidden_states`` as ``[B, H, S, D]`` with the QK norms applied, as
    ``JointAttnProcessor2_0`` and ``CogVideoXAttnProcessor2_0`` do; also returns ``D``."""
    batch_size = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


class SD3Processor(PatternProcessor):
    """SD3 / SD3.5 attention, mirroring ``JointAttnProcessor2_0``: the joint ``attn`` sees
    [image; text] (``text_first=False``); SD3.5's dual ``attn2`` is image-only self-attention.
    (The stock processor ignores ``attention_mask``; this one rejects it.)"""

    family = "sd3"

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        _no_mask(attention_mask, type(self).__name__)
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query, key, value, head_dim = _qkv_heads_first(attn, hidden_states)

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


# ---------------------------------------------------------------------------------------------
# WanTransformer3DModel: mirrors WanAttnProcessor


def _wan_rope(hidden_states, freqs_cos, freqs_sin):
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanProcessor(PatternProcessor):
    """Video self-attention of ``WanTransformer3DModel`` (``attn1``), mirroring ``WanAttnProcessor``;
    the grid is ``(T, H, W)``.  Cross-attention calls run the stock ``WanAttnProcessor`` unchanged."""

    family = "wan"
    grid_ndim = 3
    _stock = None

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            if WanProcessor._stock is None:
                from diffusers.models.transformers.transformer_wan import WanAttnProcessor

                WanProcessor._stock = WanAttnProcessor()
            return WanProcessor._stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        _no_mask(attention_mask, type(self).__name__)

        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _wan_rope(query, *rotary_emb)
            key = _wan_rope(key, *rotary_emb)

        grid = self.image_grid(hidden_states.shape[1])
        hidden_states = self.attend(query, key, value, grid=grid, text_len=0, text_first=True)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


# ---------------------------------------------------------------------------------------------
# HunyuanVideoTransformer3DModel: mirrors HunyuanVideoAttnProcessor2_0


def _sdpa(q, k, v):
    """Dense attention on ``[B, S, H, D]`` tensors (q and k/v may differ in length)."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


# The last mask read by text_padding_lengths: (weakref to it, its version counter, the call's sizes, lengths).
# HunyuanVideoTransformer3DModel builds one mask per forward and passes it to every block, so the host
# read (a device sync) happens once per forward instead of once per attention layer.
_LAST_PADDING = None


def text_padding_lengths(attention_mask, batch_size: int, n_image: int, n_text: int, cls: str = "processor"):
    """Valid text lengths of a [video; text] key-padding mask, as HunyuanVideo builds it.

    ``attention_mask`` is a boolean ``[B, 1, 1, N]`` (or ``[B, N]``; batch 1 broadcasts) mask over
    the ``N = n_image + n_text`` keys: every video token valid and, per batch element, a prefix of
    the text tokens.  Returns ``None`` when there is no mask or every text token is valid, else
    the list of valid text lengths (one per batch element).  Anything else is a ``ValueError``
    naming ``attention_mask``.  The answer for the last mask tensor seen is reused while that tensor
    is unchanged (same object, same version counter), outside ``torch.compile``.
    """
    global _LAST_PADDING
    if attention_mask is None:
        return None
    cacheable = isinstance(attention_mask, torch.Tensor) and not torch.compiler.is_compiling()
    key = (batch_size, n_image, n_text)
    if cacheable and _LAST_PADDING is not None:
        ref, version, last_key, lengths = _LAST_PADDING
        if ref() is attention_mask and version == attention_mask._version and last_key == key:
            return None if lengths is None else list(lengths)
    lengths = _read_text_padding(attention_mask, batch_size, n_image, n_text, cls)
    if cacheable:
        _LAST_PADDING = (weakref.ref(attention_mask), attention_mask._version, key, lengths)
    return None if lengths is None else list(lengths)


def _read_text_padding(attention_mask, batch_size, n_image, n_text, cls):
    # the checks and the host read behind text_padding_lengths
    n = n_image + n_text

    def bad(why):
        return ValueError(
            f"{cls}: attention_mask {why}; diffaccel honours only HunyuanVideo's text-padding mask: a boolean "
            f"[B, 1, 1, {n}] key mask keeping every video token and a prefix of the text tokens of each batch "
            "element (as HunyuanVideoTransformer3DModel builds it from encoder_attention_mask)"
        )

    if not isinstance(attention_mask, torch.Tensor):
        raise bad(f"must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dtype != torch.bool:
        raise bad(f"must be boolean, got dtype {attention_mask.dtype}")
    shape = tuple(attention_mask.shape)
    if (
        len(shape) < 2
        or shape[-1] != n
        or shape[0] not in (1, batch_size)
        or any(d != 1 for d in shape[1:-1])
    ):
        raise bad(f"has shape {shape}, expected [{batch_size}, 1, 1, {n}] (a mask over keys only)")
    m = attention_mask.reshape(shape[0], n)
    text = m[:, n_image:]
    lengths = text.sum(dim=1)
    prefix = torch.arange(n_text, device=m.device)[None, :] < lengths[:, None]
    if not bool(m[:, :n_image].all()):
        raise bad("masks video tokens")
    if not torch.equal(text, prefix):
        raise bad("is not a prefix of valid text tokens followed by padding")
    lengths = [int(x) for x in lengths.tolist()]
    if len(lengths) == 1:
        lengths = lengths * batch_size
    if all(x == n_text for x in lengths):
        return None
    return lengths


class HunyuanVideoProcessor(PatternProcessor):
    """Attention of ``HunyuanVideoTransformer3DModel``, mirroring ``HunyuanVideoAttnProcessor2_0``:
    dual-stream blocks (text projected by ``add_*_proj``) and single-stream blocks (text joined
    before the projections) both attend over [video; text] (``text_first=False``), RoPE on the
    video tokens only; the grid is ``(T, H, W)``.

    **Padded text.**  The model masks padded text *keys* (``attention_mask`` ``[B, 1, 1, N]``,
    valid text = a prefix).  When every text token is valid the core sees the whole sequence;
    otherwise each group of batch elements with the same valid text length ``L`` is handled
    apart: the core runs on [video; first ``L`` text tokens], and the padded text queries get
    what the stock processor gives them, dense attention over the valid keys.  Any other mask is
    a ``ValueError`` naming ``attention_mask``.

    A call without ``encoder_hidden_states`` is the text-only token refiner (when one processor
    object is set on every layer with ``set_attn_processor``): it runs the refiner's stock
    ``AttnProcessor2_0`` unchanged.
    """

    family = "hunyuan_video"
    grid_ndim = 3
    _stock = None

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            if HunyuanVideoProcessor._stock is None:
                from diffusers.models.attention_processor import AttnProcessor2_0

                HunyuanVideoProcessor._stock = AttnProcessor2_0()
            return HunyuanVideoProcessor._stock(attn, hidden_states, None, attention_mask)

        n_image, n_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        grid = self.image_grid(n_image)
        lengths = text_padding_lengths(attention_mask, hidden_states.shape[0], n_image, n_text, type(self).__name__)
        joint = attn.add_q_proj is not None  # dual-stream: text has its own projections

        if not joint:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            if not joint:  # rotate the video tokens of the joined sequence only
                query = torch.cat(
                    [apply_rotary_emb(query[:, :n_image], image_rotary_emb, sequence_dim=1), query[:, n_image:]], dim=1
                )
                key = torch.cat(
                    [apply_rotary_emb(key[:, :n_image], image_rotary_emb, sequence_dim=1), key[:, n_image:]], dim=1
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if joint:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        hidden_states = self.attend_padded(query, key, value, grid=grid, text_len=n_text, valid_text=lengths)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states, encoder_hidden_states = hidden_states[:, :n_image], hidden_states[:, n_image:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    def attend_padded(self, q, k, v, *, grid, text_len, valid_text):
        """[video; text] attention where batch element ``b`` has ``valid_text[b]`` valid text tokens
        (a prefix; ``None`` = all).  Padded text keys are invisible to every query; padded text
        queries attend densely to the valid keys (as under the stock processor's key mask)."""
        if valid_text is None:
            return self.attend(q, k, v, grid=grid, text_len=text_len, text_first=False)
        n_image, total = math.prod(grid), q.shape[1]
        groups = {}
        for b, n_valid in enumerate(valid_text):
            groups.setdefault(n_valid, []).append(b)
        outs, order = [], []
        for n_valid, idx in groups.items():
            if len(groups) == 1:
                qg, kg, vg = q, k, v
            else:
                ix = torch.tensor(idx, device=q.device)
                qg, kg, vg = q.index_select(0, ix), k.index_select(0, ix), v.index_select(0, ix)
            n = n_image + n_valid
            kv, vv = kg[:, :n], vg[:, :n]
            out = self.attend(qg[:, :n], kv, vv, grid=grid, text_len=n_valid, text_first=False)
            if n < total:  # padded text queries: dense over the valid keys
                out = torch.cat([out, _sdpa(qg[:, n:], kv, vv).to(out.dtype)], dim=1)
            outs.append(out)
            order.extend(idx)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        if order != sorted(order):
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            out = out.index_select(0, inverse.to(out.device))
        return out


# ---------------------------------------------------------------------------------------------
# CogVideoXTransformer3DModel: mirrors CogVideoXAttnProcessor2_0


class CogVideoXProcessor(PatternProcessor):
    """Self-attention ``attn1`` of ``CogVideoXTransformer3DModel`` (1.0 and 1.5), mirroring
    ``CogVideoXAttnProcessor2_0``: [text; video] joined by the processor (``text_first=True``),
    RoPE on the video tokens when given; the grid is ``(T, H, W)`` (see ``diffaccel.layout``).
    (The model passes no ``attention_mask``; one given through ``attention_kwargs`` is rejected.)"""

    family = "cogvideox"
    grid_ndim = 3

    def forward(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        _no_mask(attention_mask, type(self).__name__)
        text_seq_length = encoder_hidden_states.size(1)
        grid = self.image_grid(hidden_states.shape[1])

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size = hidden_states.shape[0]

        query, key, value, head_dim = _qkv_heads_first(attn, hidden_states)

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


PROCESSORS = {"unet": UNetProcessor, "flux": FluxProcessor, "sd3": SD3Processor, "wan": WanProcessor,
              "hunyuan_video": HunyuanVideoProcessor, "cogvideox": CogVideoXProcessor}


def make_processor(family: str, core, *, grid=None) -> PatternProcessor:
    """A processor of ``family`` (see ``diffaccel.families``) running ``core``."""
    try:
        cls = PROCESSORS[family]
    except KeyError:
        raise ValueError(f"no processor for model family {family!r}; known: {sorted(PROCESSORS)}") from None
    return cls(core, grid=grid)


def swap_processors(model, new_processors: dict):
    """Set ``new_processors`` (``{attention module name (optionally + ".processor"): processor}``) on
    ``model`` all at once and return an ``undo()`` that restores the original processor objects.

    Every name is resolved before anything changes, so a bad name changes nothing.
    """
    targets = []
    seen = set()
    for name, proc in new_processors.items():
        mod_name = name[: -len(".processor")] if name.endswith(".processor") else name
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {mod_name!r}") from None
        if not hasattr(module, "set_processor") or not hasattr(module, "processor"):
            raise ValueError(f"{mod_name!r} ({type(module).__name__}) is not an attention module with a processor")
        if id(module) in seen:
            raise ValueError(f"attention module {mod_name!r} is named twice")
        seen.add(id(module))
        targets.append((module, proc))

    originals = [(module, module.processor) for module, _ in targets]
    done = []
    try:
        for module, proc in targets:
            module.set_processor(proc)
            done.append(module)
    except BaseException:
        for module, old in originals[: len(done)]:
            module.set_processor(old)
        raise

    def undo():
        for module, old in originals:
            module.set_processor(old)

    return undo
