"""Tiny real diffusers pipelines for tests, built from config dicts (no hub access): ``FluxPipeline``,
``StableDiffusionPipeline`` and ``WanPipeline`` with tiny VAEs, text encoders and a word-level tokenizer (the small
models' ``build_tokenizer``), in the spirit of diffusers' own ``get_dummy_components``.  Fixed seeds: two calls
give identical weights.  Every pipeline is fp32 on CPU with its progress bar off.
"""
from __future__ import annotations

import tiny_models  # noqa: F401  (single-threaded torch, HF_HUB_OFFLINE)
import torch


def _tokenizer(max_length):
    from diffaccel.pipelines.small import build_tokenizer

    return build_tokenizer(max_length=max_length)


def _clip(tokenizer, hidden=32, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, projection_dim=hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    return CLIPTextModel(config).eval()


def _t5(tokenizer, d_model=32, seed=0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def _one_block_vae(sample_size=16, latent_channels=1):
    """A one-block ``AutoencoderKL`` (``vae_scale_factor`` 1) with FLUX's shift and scaling factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(4,),
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def _done(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_flux_pipeline(seed=0):
    """A ``FluxPipeline``: 1 double + 1 single block, a one-level VAE (``vae_scale_factor`` 1, 1 latent channel packed
    2 x 2 into 4), CLIP + T5 text encoders.  Sizes: multiples of 2 pixels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    torch.manual_seed(seed + 1)
    vae = _one_block_vae(sample_size=32)
    tok, tok2 = _tokenizer(16), _tokenizer(32)
    return _done(FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_clip(tok, seed=seed),
                              tokenizer=tok, text_encoder_2=_t5(tok2, seed=seed), tokenizer_2=tok2,
                              transformer=transformer))


def tiny_sd_pipeline(seed=0):
    """A ``StableDiffusionPipeline``: a two-level UNet (self-attention at the second level), a two-level VAE
    (``vae_scale_factor`` 2), a CLIP text encoder, DDIM.  Native size 16 x 16 pixels (``sample_size`` 8)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=2).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=2).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    tok = _tokenizer(16)
    return _done(StableDiffusionPipeline(vae=vae, text_encoder=_clip(tok, seed=seed), tokenizer=tok, unet=unet,
                                         scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False))


def tiny_wan_pipeline(seed=0):
    """A ``WanPipeline``: a 2-layer ``WanTransformer3DModel`` (patch 1 x 2 x 2), a tiny ``AutoencoderKLWan`` (spatial
    factor 8, temporal 4), a T5 text encoder.  Sizes: multiples of 16 pixels; frames ``4k + 1``."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    tok = _tokenizer(16)
    return _done(WanPipeline(tokenizer=tok, text_encoder=_t5(tok, seed=seed), vae=vae, transformer=transformer,
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0)))
