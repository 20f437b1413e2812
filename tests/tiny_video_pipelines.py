"""Tiny real diffusers *video* pipelines for tests, built from config dicts (no hub access).

* :func:`tiny_cogvideox_pipeline` — ``CogVideoXPipeline`` (CogVideoX 1.0 / 2b style, T5 text encoder);
* :func:`tiny_hunyuan_video15_pipeline` — ``HunyuanVideo15Pipeline`` (Qwen2.5-VL text model + ByT5 glyph encoder);
* :func:`tiny_hunyuan_video_pipeline` — ``HunyuanVideoPipeline`` (HunyuanVideo 1.0: Llama + CLIP).

Each denoiser is a two-block transformer of width 16 or 24 (the config dicts of ``tiny_models``, a few entries
overridden), each VAE has 4 latent channels, 4x spatial and 4x temporal compression (``F`` frames ->
``(F - 1) // 4 + 1`` latent frames), and each tokenizer is a word-level ``PreTrainedTokenizerFast`` (the small
models' ``build_tokenizer``) adapted so that the pipeline's own prompt templates work unchanged: where a
pipeline drops a fixed number of template tokens (HunyuanVideo's ``crop_start``), the tokenizer splits the
template's prefix into exactly that many tokens (checked by an assertion in the builder).  Chat templates are
saved with the tokenizers, so every pipeline round-trips through ``save_pretrained`` /
``DiffusionPipeline.from_pretrained``.

Fixed seeds: two calls give identical weights.  Everything is fp32 on CPU with the progress bar off.  Reload
with ``from_pretrained(folder, disable_mmap=True)`` for bit-identical outputs (see ``tiny_family_pipelines``).
Embeddings from ``pipe.encode_prompt`` reproduce a ``pipe(prompt=...)`` call bit for bit only when computed
under ``torch.no_grad()`` (as ``__call__`` does): with autograd on, CPU attention takes another kernel (~4e-6).
"""
from __future__ import annotations

import inspect

import torch
from tiny_family_pipelines import CHAT_TEMPLATE, WORDS, _done  # also imports tiny_models (1 thread, offline hub)
from tiny_models import COGVIDEOX_CONFIG, HUNYUAN_VIDEO15_CONFIG, HUNYUAN_VIDEO_CONFIG


# Word-level pre-tokenization that treats whitespace like the byte-level BPEs of Qwen2 and Llama 3 do on the
# HunyuanVideo templates: a run of newlines is one token; a run of spaces gives one token for all but its last
# space (the last joins the next word), and a space before a digit is a token of its own.  With it the
# templates' prefixes split into exactly the pipelines' crop_start tokens (108 and 95).
PIECES = r"\w+|[^\w\s]+|\n+| +(?= )| (?=\d)"


def _word_tokenizer(words, max_length, bos=False, eos=False, specials=(), bpe_whitespace=False):
    """``build_tokenizer`` with ``words`` (lowercased), only ``[BOS]`` / ``[EOS]`` as asked added by the
    post-processor, ``specials`` as extra special tokens and, with ``bpe_whitespace``, :data:`PIECES`."""
    import re

    from diffaccel.pipelines.small import build_tokenizer
    from tokenizers import Regex, pre_tokenizers, processors

    pieces = PIECES if bpe_whitespace else r"\w+|[^\w\s]+"
    vocab = WORDS + tuple(w for text in words for w in re.findall(pieces, text.lower()))
    tok = build_tokenizer(tuple(dict.fromkeys(vocab)), max_length=max_length)
    single = " ".join(["[BOS]"] * bos + ["$A"] + ["[EOS]"] * eos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=single + " $B", special_tokens=[("[BOS]", tok.bos_token_id), ("[EOS]", tok.eos_token_id)])
    if bpe_whitespace:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pieces), behavior="removed", invert=True)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def _t5(vocab_size, d_model, pad_token_id, eos_token_id, seed):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                   pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                   decoder_start_token_id=pad_token_id)).eval()


def tiny_cogvideox_pipeline(seed=0):
    """A ``CogVideoXPipeline`` (CogVideoX-2b style): a 2-layer ``CogVideoXTransformer3DModel`` (2 heads x 8, patch 2,
    sin-cos positional embeddings, no RoPE, ``text_embed_dim`` 16, ``max_text_seq_length`` 226), an
    ``AutoencoderKLCogVideoX`` (4 latent channels, 3 blocks: 4x spatial and 4x temporal compression,
    ``scaling_factor`` 1.15258426), a 1-layer ``T5EncoderModel`` of width 16 over a word-level tokenizer that
    appends ``[EOS]`` (as T5's ``</s>``) and the ``CogVideoXDDIMScheduler`` of CogVideoX-2b (v-prediction,
    scaled-linear betas, zero terminal SNR, ``snr_shift_scale`` 3, trailing timesteps).

    Sizes: height and width multiples of 8 pixels (the pipeline's check; latents are ``H/4 x W/4``, tokens 2x2
    latent patches).  Frames: ``F`` gives ``(F - 1) // 4 + 1`` latent frames; decoding gives back ``F`` frames
    only for an odd latent count (``F`` = 1, 9, 17, ...), an even count ``T`` decodes to ``4 T`` frames.
    The defaults (no height/width/num_frames) are 16 x 16 x 9.  ``output_type="latent"`` returns the
    *scaled* latents frames-first, ``[B, T, 4, H/4, W/4]`` (16 x 16 x 9 -> ``[1, 3, 4, 4, 4]``, 12 video tokens).

    Prompts are always padded to ``max_sequence_length`` = 226 tokens (the sin-cos embedding fixes the text
    length to the transformer's ``max_text_seq_length``; keep both equal).
    ``pipe.encode_prompt(["a red cat", "the blue dog on a green tree"], do_classifier_free_guidance=True)``
    returns ``(prompt_embeds [2, 226, 16], negative_prompt_embeds [2, 226, 16])`` (float32, the T5 output of
    the padded ids, no attention mask anywhere; the negatives encode ``""``); with
    ``do_classifier_free_guidance=False`` the negatives are ``None``.
    """
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    tok = _word_tokenizer((), max_length=226, eos=True)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(**{**COGVIDEOX_CONFIG, "max_text_seq_length": 226, "sample_height": 4,
                                                 "sample_width": 4, "sample_frames": 9}).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8), down_block_types=("CogVideoXDownBlock3D",) * 3,
                                 up_block_types=("CogVideoXUpBlock3D",) * 3, latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4, sample_height=16,
                                 sample_width=16).eval()
    encoder = _t5(len(tok), 16, tok.pad_token_id, tok.eos_token_id, seed + 2)
    sched = CogVideoXDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                   prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                                   timestep_spacing="trailing")
    return _done(CogVideoXPipeline(tokenizer=tok, text_encoder=encoder, vae=vae, transformer=transformer,
                                   scheduler=sched))


def tiny_hunyuan_video15_pipeline(seed=0):
    """A ``HunyuanVideo15Pipeline`` (text-to-video): a 2-layer ``HunyuanVideo15Transformer3DModel`` (2 heads x 8,
    patch 1, 1 refiner layer, ``in_channels`` 9 = 4 noisy latent + 4 condition latent + 1 mask channels,
    ``text_embed_dim`` 16, ``text_embed_2_dim`` 8, ``image_embed_dim`` 12), an ``AutoencoderKLHunyuanVideo15``
    (4 latent channels, 4x spatial and 4x temporal compression, ``scaling_factor`` 1.03682), a
    ``Qwen2_5_VLTextModel`` (width 16, 3 layers; the pipeline reads ``hidden_states[-3]``) over a word-level
    tokenizer with Qwen's chat markers and chat template, a ``T5EncoderModel`` of width 8 as ByT5 glyph encoder
    over the real (file-less) ``ByT5Tokenizer``, the flow-match Euler scheduler with ``shift`` 5 and a
    ``ClassifierFreeGuidance`` guider (scale 6: every step runs the transformer twice, prompt then ``""``).

    Sizes: height and width multiples of 4 pixels (latents ``H/4 x W/4``, one token per latent pixel); frames
    ``F = 4k + 1`` (``(F - 1) // 4 + 1`` latent frames, decoded back to ``F``).  ``output_type="latent"`` returns
    the *scaled* latents channels-first, ``[B, 4, T, H/4, W/4]`` (16 x 16 x 5 -> ``[1, 4, 2, 4, 4]``);
    the default ``output_type`` is ``"np"``.

    The pipeline's template attributes are kept: Qwen's chat template with the video system message, 108
    template tokens dropped (``prompt_template_encode_start_idx``), prompts padded to 1000 tokens after the
    crop (``tokenizer_max_length``); glyph texts (quoted parts of the prompt) padded to 256 bytes.
    ``pipe.encode_prompt(["a red cat", 'the sign "hi" on a tree'])`` (``batch_size`` defaults to 1 but must be
    the number of prompts: pass ``batch_size=2``) returns ``(prompt_embeds [2, 1000, 16], prompt_embeds_mask
    [2, 1000], prompt_embeds_2 [2, 256, 8], prompt_embeds_mask_2 [2, 256])``, all float32 (masks too): the
    Qwen states after the template, mask 1 on the prompt tokens plus the 5 tokens of the template's suffix
    (``<|im_end|> \\n <|im_start|> assistant \\n``), 0 on padding; the ByT5 states of ``'Text "hi". '`` with its
    byte mask (12 ones), and zeros with an all-zero mask for a prompt without quotes.
    """
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    system = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
    tok = _word_tokenizer(("system user assistant\n", system), 1108, specials=("<|im_start|>", "<|im_end|>"),
                          bpe_whitespace=True)
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(**{**HUNYUAN_VIDEO15_CONFIG, "in_channels": 9}).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=4).eval()
    torch.manual_seed(seed + 2)
    encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id, bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]})).eval()
    tok_2 = ByT5Tokenizer()
    encoder_2 = _t5(len(tok_2), 8, tok_2.pad_token_id, tok_2.eos_token_id, seed + 3)
    pipe = HunyuanVideo15Pipeline(text_encoder=encoder, tokenizer=tok, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=encoder_2,
                                  tokenizer_2=tok_2, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    prefix = tok.apply_chat_template(format_text_input(["{}"], pipe.system_message)[0], tokenize=False,
                                     add_generation_prompt=True).split("{}")[0]
    assert len(tok(prefix).input_ids) == pipe.prompt_template_encode_start_idx, "template prefix length"
    return _done(pipe)


def tiny_hunyuan_video_pipeline(seed=0):
    """A ``HunyuanVideoPipeline`` (HunyuanVideo 1.0, text-to-video): a ``HunyuanVideoTransformer3DModel`` with 1
    dual- and 1 single-stream block and 1 refiner layer (2 heads x 12, patch 2, RoPE axes 4+4+4,
    ``text_embed_dim`` 16, ``pooled_projection_dim`` 8, guidance embedding on, as the guidance-distilled
    release), an ``AutoencoderKLHunyuanVideo`` (4 latent channels, 4x spatial and 4x temporal compression,
    ``scaling_factor`` 0.476986), a ``LlamaModel`` (width 16, 3 layers; the pipeline reads ``hidden_states[-3]``)
    over a word-level tokenizer with Llama 3's header markers that adds ``[BOS]`` only, a ``CLIPTextModel`` of
    width 8 (its ``pooler_output`` is the pooled projection) over a ``[BOS] ... [EOS]`` word-level tokenizer padded
    to 77, and the flow-match Euler scheduler with ``shift`` 7.

    Sizes: height and width multiples of 16 pixels (the pipeline's check; latents ``H/4 x W/4``, tokens 2x2
    latent patches); frames ``F = 4k + 1`` (``(F - 1) // 4 + 1`` latent frames, decoded back to ``F``).
    ``output_type="latent"`` returns the *scaled* latents channels-first, ``[B, 4, T, H/4, W/4]``
    (16 x 16 x 5 -> ``[1, 4, 2, 4, 4]``).  ``guidance_scale`` (default 6) only feeds the guidance embedding
    (times 1000); true CFG runs only with ``true_cfg_scale > 1`` and a negative prompt.

    The default ``prompt_template`` is kept (Llama 3 chat markup with the video system message, ``crop_start``
    95 tokens, ``[BOS]`` included).  ``pipe.encode_prompt(["a red cat", "the blue dog on a green tree"])``
    returns ``(prompt_embeds [2, 256, 16] float32, pooled_prompt_embeds [2, 8] float32, prompt_attention_mask
    [2, 256] int64)``: the Llama states after the template, prompts padded to ``max_sequence_length`` (256)
    tokens after the crop, mask 1 on the prompt tokens plus the template's closing ``<|eot_id|>``, 0 on padding.
    """
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import LlamaConfig, LlamaModel

    from diffaccel.pipelines.small import build_text_encoder, build_tokenizer

    template, crop_start = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    tok = _word_tokenizer((template.replace("{}", " "),), 256 + crop_start, bos=True,
                          specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), bpe_whitespace=True)
    assert len(tok(template.split("{}")[0]).input_ids) == crop_start, "template prefix length"
    tok_2 = build_tokenizer(WORDS, max_length=77)
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(**{**HUNYUAN_VIDEO_CONFIG, "guidance_embeds": True}).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(8, 8, 8),
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1,
                                    norm_num_groups=2, spatial_compression_ratio=4,
                                    temporal_compression_ratio=4).eval()
    torch.manual_seed(seed + 2)
    encoder = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"))).eval()
    encoder_2 = build_text_encoder(tok_2, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, seed=seed + 3).eval()
    return _done(HunyuanVideoPipeline(text_encoder=encoder, tokenizer=tok, transformer=transformer, vae=vae,
                                      scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                      text_encoder_2=encoder_2, tokenizer_2=tok_2))
