"""Tiny random diffusers denoisers for tests (no hub access).

Each factory builds an eval-mode fp32 model from a small config dict with a
fixed seed, so two calls give identical weights.  Each ``*_inputs`` helper
builds matching forward kwargs (fixed seed) at a given latent size:

* ``unet_inputs(model, height, width)``: ``sample`` is ``[B, 4, height, width]``
  (latent pixels; odd sizes are fine).
* ``flux_inputs(model, height, width)``: a ``height x width`` grid of packed
  image tokens (``hidden_states`` ``[B, height*width, C]`` plus matching
  ``img_ids``) and ``text_len`` text tokens.
* ``sd3_inputs(model, height, width)``: ``hidden_states`` ``[B, 4, height, width]``
  (latent pixels; tokens are ``height//2 x width//2``).
* ``wan_inputs(model, frames, height, width)``: ``hidden_states``
  ``[B, 4, frames, height, width]`` (tokens ``frames x height//2 x width//2``).

``TINY[family] = (factory, inputs_helper)``; ``TinyPipeline`` is a minimal
``DiffusionPipeline`` holding a ``unet`` and/or ``transformer``.

Importing this module sets ``torch.set_num_threads(1)``: on a small shared CPU
box OpenMP threads spinning against each other made the tiny UNet ~50x slower
(1.5 s vs 20 ms per forward).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

torch.set_num_threads(1)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(4, 6, 6),
)

SD3_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    pos_embed_max_size=32,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)

WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=32,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def _build(cls, config, seed):
    torch.manual_seed(seed)
    return cls(**config).eval()


def tiny_unet(seed=0, **overrides):
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, {**UNET_CONFIG, **overrides}, seed)


def tiny_flux(seed=0, **overrides):
    from diffusers import FluxTransformer2DModel

    return _build(FluxTransformer2DModel, {**FLUX_CONFIG, **overrides}, seed)


def tiny_sd3(seed=0, **overrides):
    from diffusers import SD3Transformer2DModel

    return _build(SD3Transformer2DModel, {**SD3_CONFIG, **overrides}, seed)


def tiny_wan(seed=0, **overrides):
    from diffusers import WanTransformer3DModel

    return _build(WanTransformer3DModel, {**WAN_CONFIG, **overrides}, seed)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def unet_inputs(model, height=8, width=8, batch=1, text_len=5, seed=0):
    g = _gen(seed)
    c = model.config
    return dict(
        sample=torch.randn(batch, c.in_channels, height, width, generator=g),
        timestep=torch.tensor(10.0),
        encoder_hidden_states=torch.randn(batch, text_len, c.cross_attention_dim, generator=g),
    )


def flux_image_ids(height, width):
    """``img_ids`` as FluxPipeline builds them: ``[height*width, 3]`` with (0, row, col)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def flux_inputs(model, height=4, width=4, batch=1, text_len=5, seed=0):
    g = _gen(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, height * width, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=flux_image_ids(height, width),
        txt_ids=torch.zeros(text_len, 3),
    )


def sd3_inputs(model, height=8, width=8, batch=1, text_len=5, seed=0):
    g = _gen(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 10.0),
    )


def wan_inputs(model, frames=2, height=8, width=8, batch=1, text_len=5, seed=0):
    g = _gen(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, frames, height, width, generator=g),
        timestep=torch.full((batch,), 10.0),
        encoder_hidden_states=torch.randn(batch, text_len, c.text_dim, generator=g),
    )


TINY = {
    "unet": (tiny_unet, unet_inputs),
    "flux": (tiny_flux, flux_inputs),
    "sd3": (tiny_sd3, sd3_inputs),
    "wan": (tiny_wan, wan_inputs),
}


def run(model, inputs):
    """Forward without grad; returns the output sample tensor."""
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def run_with_processor(model, inputs, processor):
    """``run`` with ``processor`` set on every attention layer and the layout tracked; the model's
    processors and tracking are restored afterwards."""
    import diffaccel
    from diffaccel.layout import untrack_layout

    original = model.attn_processors
    model.set_attn_processor(processor)
    try:
        diffaccel.track_layout(model)
        return run(model, inputs)
    finally:
        untrack_layout(model)
        model.set_attn_processor(original)


def _pipeline_cls():
    from diffusers import DiffusionPipeline

    class TinyPipeline(DiffusionPipeline):
        """A DiffusionPipeline holding only denoisers (no tokenizers, no VAE)."""

        def __init__(self, unet, transformer):
            super().__init__()
            self.register_modules(unet=unet, transformer=transformer)

    return TinyPipeline


def tiny_pipeline(unet=None, transformer=None):
    return _pipeline_cls()(unet=unet, transformer=transformer)


# --- video families added later: HunyuanVideo and CogVideoX -----------------------------------

HUNYUAN_VIDEO_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=12,
    num_layers=1,
    num_single_layers=1,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    guidance_embeds=False,
    text_embed_dim=16,
    pooled_projection_dim=8,
    rope_axes_dim=(4, 4, 4),
)

# CogVideoX 1.0 (CogVideoX-2b style: sin-cos positional embeddings, no RoPE, one latent frame per token);
# the positional embedding fixes the text length to max_text_seq_length
COGVIDEOX_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    time_embed_dim=16,
    text_embed_dim=16,
    num_layers=2,
    sample_width=8,
    sample_height=8,
    sample_frames=5,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=5,
)

# CogVideoX 1.5 style: RoPE (passed in by the caller, as the pipeline does), patch_size_t=2 groups frames
COGVIDEOX15_CONFIG = dict(
    COGVIDEOX_CONFIG,
    patch_size_t=2,
    use_rotary_positional_embeddings=True,
)


def tiny_hunyuan_video(seed=0, **overrides):
    from diffusers import HunyuanVideoTransformer3DModel

    return _build(HunyuanVideoTransformer3DModel, {**HUNYUAN_VIDEO_CONFIG, **overrides}, seed)


def tiny_cogvideox(seed=0, **overrides):
    from diffusers import CogVideoXTransformer3DModel

    return _build(CogVideoXTransformer3DModel, {**COGVIDEOX_CONFIG, **overrides}, seed)


def tiny_cogvideox15(seed=0, **overrides):
    return tiny_cogvideox(seed, **{**COGVIDEOX15_CONFIG, **overrides})


def hunyuan_video_inputs(model, frames=2, height=8, width=8, batch=1, text_len=5, valid_text=None, seed=0):
    """``hidden_states`` ``[B, C, frames, height, width]`` (tokens ``frames x height//2 x width//2``);
    ``valid_text``: per batch element, how many leading text tokens are valid
    (``encoder_attention_mask`` is 1 for those, 0 for the padding after them); default all."""
    g = _gen(seed)
    c = model.config
    mask = torch.ones(batch, text_len)
    if valid_text is not None:
        for b, n in enumerate(valid_text):
            mask[b, n:] = 0
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, frames, height, width, generator=g),
        timestep=torch.full((batch,), 10.0),
        encoder_hidden_states=torch.randn(batch, text_len, c.text_embed_dim, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
    )


def cogvideox_rope(model, frames, height, width, seed=0):
    """A ``(cos, sin)`` rotary embedding for the video tokens of a CogVideoX call, each ``[S, head_dim]``
    (random angles, the layout ``apply_rotary_emb`` expects; the pipeline computes real ones)."""
    c = model.config
    p, pt = c.patch_size, c.patch_size_t or 1
    n = (frames // pt) * (height // p) * (width // p)
    angles = torch.rand(n, c.attention_head_dim // 2, generator=_gen(seed + 1)) * 6.0
    angles = angles.repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def cogvideox_inputs(model, frames=2, height=8, width=8, batch=1, text_len=None, seed=0):
    """``hidden_states`` ``[B, frames, C, height, width]`` (frames before channels, as CogVideoX takes
    them); tokens ``(frames / patch_size_t) x height//2 x width//2``.  Models with RoPE get
    ``image_rotary_emb`` from :func:`cogvideox_rope`."""
    g = _gen(seed)
    c = model.config
    text_len = c.max_text_seq_length if text_len is None else text_len
    inputs = dict(
        hidden_states=torch.randn(batch, frames, c.in_channels, height, width, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, c.text_embed_dim, generator=g),
        timestep=torch.full((batch,), 10.0),
    )
    if c.use_rotary_positional_embeddings:
        inputs["image_rotary_emb"] = cogvideox_rope(model, frames, height, width, seed)
    return inputs


TINY.update({
    "hunyuan_video": (tiny_hunyuan_video, hunyuan_video_inputs),
    "cogvideox": (tiny_cogvideox, cogvideox_inputs),
})


# --- the current diffusers families: FLUX.2, FLUX.3, Chroma, Qwen-Image (2.1), HunyuanVideo 1.5, LTX-2,
# Z-Image.  Configs follow the shapes of diffusers' own tiny test models, shrunk further.

FLUX2_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    timestep_guidance_channels=16,
    mlp_ratio=2.0,
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=False,
)

FLUX3_CONFIG = dict(
    in_channels=4,
    cond_in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    timestep_channels=16,
    mlp_ratio=2.0,
    axes_dims_rope=(4, 4, 4, 4),
)

CHROMA_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(4, 6, 6),
    approximator_num_channels=8,
    approximator_hidden_dim=16,
    approximator_layers=1,
)

QWENIMAGE_CONFIG = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(4, 6, 6),
)

QWENIMAGE21_CONFIG = dict(
    patch_size=1,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    context_in_dim=8,
    mlp_ratio=2,
    axes_dims_rope=(4, 6, 6),
)

HUNYUAN_VIDEO15_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=1,
    patch_size_t=1,
    text_embed_dim=16,
    text_embed_2_dim=8,
    image_embed_dim=12,
    rope_axes_dim=(2, 2, 4),
    target_size=16,
    task_type="t2v",
)

LTX2_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,
    audio_in_channels=4,
    audio_out_channels=4,
    audio_num_attention_heads=2,
    audio_attention_head_dim=4,
    audio_cross_attention_dim=8,
    num_layers=2,
    qk_norm="rms_norm_across_heads",
    caption_channels=16,
    rope_double_precision=False,
)

ZIMAGE_CONFIG = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=4,
    dim=16,
    n_layers=1,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    qk_norm=True,
    cap_feat_dim=16,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[4, 2, 2],
    axes_lens=[256, 32, 32],
)


def _tiny(class_name, config, seed, overrides):
    import diffusers

    return _build(getattr(diffusers, class_name), {**config, **overrides}, seed)


def tiny_flux2(seed=0, **overrides):
    return _tiny("Flux2Transformer2DModel", FLUX2_CONFIG, seed, overrides)


def tiny_flux3(seed=0, **overrides):
    return _tiny("Flux3Transformer2DModel", FLUX3_CONFIG, seed, overrides)


def tiny_chroma(seed=0, **overrides):
    return _tiny("ChromaTransformer2DModel", CHROMA_CONFIG, seed, overrides)


def tiny_qwenimage(seed=0, **overrides):
    return _tiny("QwenImageTransformer2DModel", QWENIMAGE_CONFIG, seed, overrides)


def tiny_qwenimage21(seed=0, **overrides):
    return _tiny("QwenImage21Transformer2DModel", QWENIMAGE21_CONFIG, seed, overrides)


def tiny_hunyuan_video15(seed=0, **overrides):
    return _tiny("HunyuanVideo15Transformer3DModel", HUNYUAN_VIDEO15_CONFIG, seed, overrides)


def tiny_ltx2(seed=0, **overrides):
    return _tiny("LTX2VideoTransformer3DModel", LTX2_CONFIG, seed, overrides)


def tiny_zimage(seed=0, **overrides):
    return _tiny("ZImageTransformer2DModel", ZIMAGE_CONFIG, seed, overrides)


def _text_mask(batch, text_len, valid_text):
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    for b, n in enumerate(valid_text or ()):
        mask[b, n:] = False
    return mask


def flux4_ids(height, width, t=0):
    """FLUX.2 / FLUX.3 ``img_ids``: ``[height*width, 4]`` of (t, row, col, layer), as Flux2Pipeline builds them."""
    ids = torch.cartesian_prod(torch.tensor([t]), torch.arange(height), torch.arange(width), torch.tensor([0]))
    return ids.float()


def flux2_inputs(model, height=4, width=4, batch=1, text_len=5, refs=(), seed=0):
    """``refs``: ``(h, w)`` of reference images appended after the target (t = 10, 20, ...)."""
    g = _gen(seed)
    c = model.config
    ids = [flux4_ids(height, width)] + [flux4_ids(h, w, t=10 * (i + 1)) for i, (h, w) in enumerate(refs)]
    ids = torch.cat(ids)
    return dict(
        hidden_states=torch.randn(batch, ids.shape[0], c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=ids,
        txt_ids=torch.zeros(text_len, 4),
    )


def flux3_inputs(model, height=4, width=4, batch=1, text_len=5, ref=None, seed=0):
    """``ref``: ``(h, w)`` of one reference image (``image_cond_hidden_states``)."""
    g = _gen(seed)
    c = model.config
    inputs = dict(
        hidden_states=torch.randn(batch, height * width, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=flux4_ids(height, width),
        txt_ids=torch.zeros(text_len, 4),
    )
    if ref is not None:
        h, w = ref
        inputs["image_cond_hidden_states"] = torch.randn(batch, h * w, c.cond_in_channels, generator=g)
        inputs["image_cond_ids"] = flux4_ids(h, w, t=10)
    return inputs


def chroma_inputs(model, height=4, width=4, batch=1, text_len=5, valid_text=None, seed=0):
    """``valid_text``: per batch element, the valid leading text tokens (a boolean ``attention_mask`` over
    ``[text; image]``, as ChromaPipeline builds it but boolean)."""
    g = _gen(seed)
    c = model.config
    inputs = dict(
        hidden_states=torch.randn(batch, height * width, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=flux_image_ids(height, width),
        txt_ids=torch.zeros(text_len, 3),
    )
    if valid_text is not None:
        inputs["attention_mask"] = torch.cat([_text_mask(batch, text_len, valid_text),
                                              torch.ones(batch, height * width, dtype=torch.bool)], dim=1)
    return inputs


def _qwen_pack(batch, h, w, channels, g):
    """Packed latents of an ``h x w`` token image (2 x 2 patches, as QwenImagePipeline packs them)."""
    return torch.randn(batch, h * w, channels, generator=g)


def qwenimage_inputs(model, height=4, width=4, batch=1, text_len=5, valid_text=None, cond=None, seed=0):
    """``height x width`` target tokens; ``cond``: ``(h, w)`` of an edit condition image packed after it;
    ``valid_text``: per batch element, the valid leading text tokens (``encoder_hidden_states_mask``)."""
    g = _gen(seed)
    c = model.config
    shapes = [(1, height, width)] + ([(1, *cond)] if cond else [])
    n = sum(h * w for _, h, w in shapes)
    inputs = dict(
        hidden_states=_qwen_pack(batch, n, 1, c.in_channels, g),
        encoder_hidden_states=torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_shapes=[shapes] * batch,
    )
    if valid_text is not None:
        inputs["encoder_hidden_states_mask"] = _text_mask(batch, text_len, valid_text).long()
    return inputs


def qwenimage21_inputs(model, height=4, width=4, batch=1, text_len=4, cond=None, valid_text=None, seed=0):
    """Text, an optional ``cond`` ``(h, w)`` condition image (its 2 x 2 slots after the text), then the
    ``height x width`` target (even sizes: one vision slot per 2 x 2 latent tokens)."""
    g = _gen(seed)
    c = model.config
    shapes = ([(1, *cond)] if cond else []) + [(1, height, width)]
    cond_tokens = cond[0] * cond[1] if cond else 0
    slots = text_len + cond_tokens // 4 + height * width // 4
    img_mask = torch.zeros(batch, slots, dtype=torch.bool)
    img_mask[:, text_len:] = True
    ehs_len = text_len + cond_tokens // 4
    inputs = dict(
        hidden_states=torch.randn(batch, cond_tokens + height * width, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, ehs_len, c.context_in_dim, generator=g),
        encoder_hidden_states_mask=torch.ones(batch, ehs_len, dtype=torch.long),
        timestep=torch.full((batch,), 0.5),
        img_shapes=[shapes] * batch,
        img_mask=img_mask,
    )
    for b, v in enumerate(valid_text or ()):
        inputs["encoder_hidden_states_mask"][b, v:text_len] = 0
    return inputs


def hunyuan_video15_inputs(model, frames=1, height=8, width=8, batch=1, text_len=6, valid_text=None, seed=0):
    """``valid_text``: per batch element, the valid Qwen text tokens (``encoder_attention_mask``)."""
    g = _gen(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, frames, height, width, generator=g),
        timestep=torch.full((batch,), 1.0),
        encoder_hidden_states=torch.randn(batch, text_len, c.text_embed_dim, generator=g),
        encoder_hidden_states_2=torch.randn(batch, 4, c.text_embed_2_dim, generator=g),
        encoder_attention_mask=_text_mask(batch, text_len, valid_text).float(),
        encoder_attention_mask_2=torch.ones(batch, 4),
        image_embeds=torch.zeros(batch, 3, c.image_embed_dim),
    )


def ltx2_inputs(model, frames=2, height=4, width=4, batch=1, text_len=5, seed=0):
    g = _gen(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, frames * height * width, c.in_channels, generator=g),
        audio_hidden_states=torch.randn(batch, 5, c.audio_in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, c.caption_channels, generator=g),
        audio_encoder_hidden_states=torch.randn(batch, text_len, c.caption_channels, generator=g),
        timestep=torch.full((batch,), 500.0),
        encoder_attention_mask=torch.ones(batch, text_len, dtype=torch.bool),
        num_frames=frames,
        height=height,
        width=width,
        audio_num_frames=5,
        fps=25.0,
    )


def zimage_inputs(model, height=8, width=8, batch=1, text_len=6, text_lens=None, seed=0):
    """``x``: one ``[C, 1, height, width]`` latent per sample (tokens ``height/2 x width/2``); ``text_lens``:
    a caption length per sample (different lengths give the unified sequence a padding mask)."""
    g = _gen(seed)
    c = model.config
    lens = list(text_lens) if text_lens is not None else [text_len] * batch
    return dict(
        x=[torch.randn(c.in_channels, 1, height, width, generator=g) for _ in range(batch)],
        cap_feats=[torch.randn(n, c.cap_feat_dim, generator=g) for n in lens],
        t=torch.full((batch,), 0.5),
    )


TINY.update({
    "flux2": (tiny_flux2, flux2_inputs),
    "flux3": (tiny_flux3, flux3_inputs),
    "chroma": (tiny_chroma, chroma_inputs),
    "qwenimage": (tiny_qwenimage, qwenimage_inputs),
    "qwenimage21": (tiny_qwenimage21, qwenimage21_inputs),
    "hunyuan_video15": (tiny_hunyuan_video15, hunyuan_video15_inputs),
    "ltx2": (tiny_ltx2, ltx2_inputs),
    "zimage": (tiny_zimage, zimage_inputs),
})


def output_of(result):
    """The sample of a model call with ``return_dict=False`` (LTX-2: video and audio; Z-Image: a list)."""
    out = result[0]
    if isinstance(out, (list, tuple)):
        return torch.cat([o.flatten() for o in out])
    return out
