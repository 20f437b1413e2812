"""The distillation tests' tiny real diffusers pipelines (sizes and vocabulary their loss thresholds were set on),
built from config dicts (no hub access): a ``FluxPipeline`` (tiny CLIP + T5 text
encoders, a one-block VAE) and a ``StableDiffusionPipeline`` (tiny CLIP, a two-block VAE), in the spirit of
diffusers' own ``get_dummy_components``.  Tokenizers are word-level ``PreTrainedTokenizerFast`` (the small
models' :func:`build_tokenizer`), so nothing is downloaded.  Fixed seeds: two calls give identical weights."""
from __future__ import annotations

import torch
from tiny_pipelines import _clip, _one_block_vae, _t5

WORDS = ("a", "an", "the", "red", "blue", "green", "cat", "dog", "house", "tree", "on", "in", "at", "night", "sky")


def _tokenizer(max_length):
    from diffaccel.pipelines.small import build_tokenizer

    return build_tokenizer(WORDS, max_length=max_length)


def _two_block_vae():
    """A two-block ``AutoencoderKL`` (``vae_scale_factor`` 2, 4 latent channels): SD's and SDXL's."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=16).eval()


def tiny_flux_pipeline(seed=0):
    """``FluxPipeline`` with a 1+1-block transformer (4 latent channels = 1 VAE channel packed 2x2), CLIP-like and
    T5 text encoders of width 32 and a one-block VAE (scale factor 1): 16x16 pixels = 8x8 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tok = _tokenizer(8)
    tok2 = _tokenizer(12)
    clip = _clip(tok, seed=seed)
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=tok2.pad_token_id,
                                 eos_token_id=tok2.eos_token_id, decoder_start_token_id=0)).eval()
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]).eval()
    torch.manual_seed(seed + 3)
    vae = _one_block_vae()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)


def tiny_sd_pipeline(seed=0):
    """``StableDiffusionPipeline``: a two-level UNet with cross-attention (width 16/32), a tiny CLIP text encoder
    and a two-block VAE (scale factor 2): 16x16 pixels = 8x8 latents."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tok = _tokenizer(10)
    clip = _clip(tok, seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8).eval()
    torch.manual_seed(seed + 2)
    vae = _two_block_vae()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=clip, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _clip_projection(tokenizer, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, projection_dim=32,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModelWithProjection(cfg).eval()


def tiny_sd3_pipeline(seed=0):
    """``StableDiffusion3Pipeline``: one joint block, two CLIP-with-projection encoders and a T5 (width 32), a
    one-block VAE: 16x16 pixels = 16x16 latent tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = _tokenizer(8)
    torch.manual_seed(seed + 1)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                        pooled_projection_dim=64, out_channels=4).eval()
    torch.manual_seed(seed + 2)
    vae = _one_block_vae(latent_channels=4)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=_clip_projection(tok, seed), tokenizer=tok,
                                    text_encoder_2=_clip_projection(tok, seed + 3), tokenizer_2=tok,
                                    text_encoder_3=_t5(tok, seed=seed + 4), tokenizer_3=_tokenizer(12))


def tiny_sdxl_pipeline(seed=0):
    """``StableDiffusionXLPipeline``: a two-level UNet with the text-time embedding, a CLIP and a
    CLIP-with-projection encoder (width 32 each), the two-block VAE: 16x16 pixels = 8x8 latents."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok = _tokenizer(8)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=8).eval()
    torch.manual_seed(seed + 2)
    vae = _two_block_vae()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=_clip(tok, seed=seed), tokenizer=tok,
                                     text_encoder_2=_clip_projection(tok, seed + 3), tokenizer_2=tok, unet=unet,
                                     scheduler=sched)


def tiny_wan_pipeline(seed=0):
    """``WanPipeline``: a two-layer ``WanTransformer3DModel`` (patch 1x2x2), a T5 text encoder (width 32) and a tiny
    ``AutoencoderKLWan`` (x8 spatial, x4 temporal): 5 frames of 16x16 pixels = 2x2x2 tokens... at 32x32, 2x4x4."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tok = _tokenizer(12)
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return WanPipeline(tokenizer=tok, text_encoder=_t5(tok, seed=seed), vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=transformer)


def tiny_chroma_pipeline(seed=0):
    """``ChromaPipeline``: a 1+1-block ``ChromaTransformer2DModel`` (4 latent channels = 1 VAE channel packed 2x2), a
    T5 text encoder (width 32, padded text masked) and the one-block VAE: 16x16 pixels = 8x8 tokens."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tok = _tokenizer(12)
    torch.manual_seed(seed + 1)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=[4, 6, 6], approximator_num_channels=8,
                                           approximator_hidden_dim=32, approximator_layers=1).eval()
    torch.manual_seed(seed + 2)
    vae = _one_block_vae()
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae,
                          text_encoder=_t5(tok, seed=seed), tokenizer=tok, transformer=transformer)


def tiny_wan22_pipeline(seed=0):
    """Wan 2.2's layout: :func:`tiny_wan_pipeline` with a second expert (``transformer_2``, the low-noise one) and
    ``boundary_ratio`` 0.5."""
    from diffusers import WanPipeline

    base = tiny_wan_pipeline(seed)
    low = tiny_wan_pipeline(seed + 10).transformer
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer, transformer_2=low, boundary_ratio=0.5)
