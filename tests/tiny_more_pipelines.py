"""Tiny real ``QwenImage21Pipeline`` and ``LTX2Pipeline`` for tests, built from config dicts (no hub access).

Both reuse the tiny denoiser configs of ``tiny_models`` (``QWENIMAGE21_CONFIG``, ``LTX2_CONFIG``); every other
component is built here, as small as the pipelines allow, with word-level tokenizers from the small models'
``build_tokenizer``.  Fixed seeds: two calls give identical weights.  Everything is fp32 on CPU with the progress
bar off; a builder plus a 2-step call takes well under a second once diffusers and transformers are imported.

Both round-trip through ``save_pretrained`` / ``DiffusionPipeline.from_pretrained(folder, disable_mmap=True)``
(``disable_mmap`` for bit-identical outputs, see ``tiny_family_pipelines``).  The Qwen-Image 2.1 processor is
``TinyQwen3VLProcessor`` of this module, which ``model_index.json`` records as ``["tiny_more_pipelines",
"TinyQwen3VLProcessor"]``: diffusers resolves that name from ``sys.modules``, so import this module (as
``tiny_more_pipelines``) before loading a saved copy.
"""
from __future__ import annotations

import re

import tiny_models  # noqa: F401  (first: sets HF_HUB_OFFLINE and single-threaded torch)
import torch
from tiny_family_pipelines import WORDS, _done
from tiny_models import tiny_ltx2, tiny_qwenimage21  # the LTX2_CONFIG / QWENIMAGE21_CONFIG denoisers
# ``ProcessorMixin`` must stay a name of this module: diffusers finds the load method of ``TinyQwen3VLProcessor`` by
# looking its base classes up in the module that defines it.
from transformers import ProcessorMixin, Qwen3VLProcessor

QWEN21_SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."  # QwenImage21Pipeline.sys_prompt
QWEN_MARKERS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen3-VL's chat template, reduced to text (an image part becomes its vision placeholder)
QWEN3VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TinyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` with a tokenizer only: the real one also needs a video processor, which needs torchvision
    (absent here).  Its ``__call__`` / ``apply_chat_template`` are Qwen3-VL's (``mm_token_type_ids`` included); text
    only, so condition images are not supported."""

    def __init__(self, tokenizer=None, chat_template=None, **kwargs):
        ProcessorMixin.__init__(self, tokenizer, chat_template=chat_template)
        markers = dict(image="<|image_pad|>", video="<|video_pad|>", vision_start="<|vision_start|>",
                       vision_end="<|vision_end|>")
        for kind, token in markers.items():  # what Qwen3VLProcessor.__init__ sets
            setattr(self, f"{kind}_token", token)
            setattr(self, f"{kind}_token_id", tokenizer.convert_tokens_to_ids(token))


def _word_tokenizer(words, max_length, single, padding_side="right"):
    """``build_tokenizer`` with the post-processor template ``single`` (e.g. ``"$A"``: no BOS/EOS added)."""
    from diffaccel.pipelines.small import build_tokenizer
    from tokenizers import processors

    tok = build_tokenizer(words, max_length=max_length)
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in ("[BOS]", "[EOS]") if t in single]
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
    tok.padding_side = padding_side
    return tok


def tiny_qwenimage21_pipeline(seed=0):
    """A ``QwenImage21Pipeline``: the 2-layer ``QwenImage21Transformer2DModel`` of ``tiny_models.QWENIMAGE21_CONFIG``
    (2 heads x 16, ``in_channels`` 4, ``context_in_dim`` 8, patch 1, ``causal_condition`` on, so the pipeline's KV
    cache is used), an ``AutoencoderKLQwenImage21`` (RGBA in/out, 4 latent channels, 4 spatial 2x down-samplings =
    the 16x the pipeline hard-codes as ``vae_scale_factor``, non-trivial ``latents_mean`` / ``latents_std``), the
    flow-match scheduler with dynamic exponential shift, a ``Qwen3VLForConditionalGeneration`` text encoder (width
    8, 2 layers, 1-block vision tower that t2i never runs) and a ``TinyQwen3VLProcessor`` whose word-level tokenizer
    knows the pipeline's template (chat markers and ``"\\n"`` are single tokens, nothing added around the text).

    Sizes: height and width multiples of 32 pixels (``vae_scale_factor * 2``; others are floored, with a warning);
    the smallest is 32 x 32.  ``output_type="latent"`` returns *packed, normalised* latents ``[B, (H/16)*(W/16),
    4]``: a raster flatten (token ``h * W/16 + w``) of the 4-channel latent, no patching; 32 x 32 = 4 tokens, the
    transformer's one ``2x2`` image slot.  Decoded outputs have 4 channels (RGBA): ``"np"`` gives ``[B, H, W, 4]``.

    ``pipe.encode_prompt(["a red cat", "the blue dog on a green tree"])`` returns ``(prompt_embeds [2, 15, 8] float32,
    prompt_embeds_mask [2, 15] int64, image_pad_mask [2, 15] bool)``: the last decoder layer's hidden states (before
    the final norm) of the template-wrapped prompts with the 12 system-turn tokens dropped, leaving
    ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`` (11 and 15 tokens), right-padded with zeros;
    the mask is 1 on valid tokens and ``None`` when nothing is padded; ``image_pad_mask`` is all False (no images).
    """
    from diffusers import AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline
    from tokenizers import AddedToken
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    words = WORDS + ("system", "user", "assistant") + tuple(re.findall(r"\w+|[^\w\s]", QWEN21_SYSTEM_PROMPT.lower()))
    tok = _word_tokenizer(words, 1024, "$A")
    tok.add_special_tokens({"additional_special_tokens": QWEN_MARKERS})
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    processor = TinyQwen3VLProcessor(tokenizer=tok, chat_template=QWEN3VL_CHAT_TEMPLATE)

    transformer = tiny_qwenimage21(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage21(base_dim=4, decoder_base_dim=4, z_dim=4, dim_mult=[1] * 5, num_res_blocks=1,
                                   temperal_downsample=[False] * 4, latents_mean=[0.1, -0.2, 0.3, 0.0],
                                   latents_std=[1.5, 2.0, 1.0, 2.5]).eval()
    torch.manual_seed(seed + 2)
    ids = {f"{kind}_token_id": getattr(processor, f"{kind}_token_id")
           for kind in ("image", "video", "vision_start", "vision_end")}
    text = dict(vocab_size=len(tok), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=8, patch_size=16,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids)).eval()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096,
                                            time_shift_type="exponential")
    pipe = QwenImage21Pipeline(scheduler=sched, vae=vae, text_encoder=encoder, processor=processor,
                               transformer=transformer)
    assert tok.unk_token_id not in tok(pipe.prompt_template_t2i.format("a red cat")).input_ids, "template words"
    return _done(pipe)


def tiny_ltx2_pipeline(seed=0):
    """An ``LTX2Pipeline`` (LTX-2.0 layout, video + audio): the 2-layer ``LTX2VideoTransformer3DModel`` of
    ``tiny_models.LTX2_CONFIG`` (video 2 heads x 8, audio 2 heads x 4, ``caption_channels`` 16, patch 1) with
    ``vae_scale_factors=(8, 8, 8)`` to match the VAE below; an ``AutoencoderKLLTX2Video`` (4 latent channels,
    patch 4 + one spatio-temporal and two temporal 2x down-samplings: 8x spatial, 8x temporal, causal); an
    ``AutoencoderKLLTX2Audio`` (stereo mel, 8 mel bins, 2 latent channels, 4x in time and mel); an ``LTX2Vocoder``
    (4x up-sampling, stereo, 400 Hz); ``LTX2TextConnectors`` (1 layer per modality, 2 heads x 8, 8 learnable
    registers); a ``Gemma3ForConditionalGeneration`` text encoder (width 16, 2 layers, 1-block vision tower never run)
    with a word-level tokenizer (``[BOS]`` prepended, left padding); the flow-match scheduler with LTX-2's dynamic
    exponential shift.  The video / audio VAEs get fixed non-trivial ``latents_mean`` / ``latents_std`` buffers.

    Sizes: height and width multiples of 32 (others raise), latents ``H/8 x W/8``; ``num_frames`` of the form 8k + 1
    (latent frames ``(num_frames - 1) // 8 + 1``).  Smallest: 32 x 32 x 1 frame; 32 x 32 x 9 frames = 2 x 4 x 4 = 32
    video tokens, with ``round(num_frames / frame_rate * 25)`` = 9 audio tokens.  ``output_type="latent"`` returns
    ``(video, audio)``, *unpacked and de-normalised* (the VAEs' own latent spaces): video ``[B, 4, F', H/8, W/8]``,
    audio ``[B, 2, L, 2]`` (channels, latent frames, latent mel bins).  Decoded: ``"np"`` video ``[B, F, H, W, 3]``
    and the vocoder's waveform ``[B, 2, 4 * (4L - 3)]``.

    ``pipe.encode_prompt(["a red cat", "the blue dog on a green tree"])`` (``do_classifier_free_guidance`` defaults to
    True) returns ``(prompt_embeds [2, 1024, 48] float32, prompt_attention_mask [2, 1024] int64,
    negative_prompt_embeds [2, 1024, 48], negative_prompt_attention_mask [2, 1024])``: every prompt is left-padded to
    ``max_sequence_length`` (1024) tokens; the 48 channels are all 3 Gemma hidden states (embeddings + 2 layers)
    stacked last, ``channel = 3 * h + layer``; masks are 1 on the last 4 / 8 positions (``[BOS]`` + words); the
    negatives encode ``""`` (1 token).  Prompt enhancement is not supported (no ``processor``).
    """
    from diffusers import (AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, FlowMatchEulerDiscreteScheduler,
                           LTX2Pipeline)
    from diffusers.pipelines.ltx2 import LTX2TextConnectors, LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tok = _word_tokenizer(WORDS, 1024, "[BOS] $A", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"]})

    transformer = tiny_ltx2(seed, vae_scale_factors=(8, 8, 8))
    torch.manual_seed(seed + 1)
    scaled = ("spatiotemporal", "temporal", "temporal")
    vae = AutoencoderKLLTX2Video(latent_channels=4, block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                                 down_block_types=("LTX2VideoDownBlock3D",) * 3, layers_per_block=(1, 1, 1, 1),
                                 decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True,) * 3,
                                 decoder_spatio_temporal_scaling=(True,) * 3, decoder_inject_noise=(False,) * 4,
                                 downsample_type=scaled, upsample_type=scaled, upsample_residual=(True,) * 3,
                                 upsample_factor=(1, 1, 1), patch_size=4, spatial_compression_ratio=8,
                                 temporal_compression_ratio=8).eval()
    torch.manual_seed(seed + 2)
    # base_channels must equal the packed audio width (latent channels x latent mel bins = 2 x 2 = audio_in_channels):
    # the pipeline (de-)normalises packed audio latents with the base_channels-sized latents_mean / latents_std
    audio_vae = AutoencoderKLLTX2Audio(base_channels=4, output_channels=2, ch_mult=(1, 2, 4), num_res_blocks=1,
                                       in_channels=2, resolution=16, latent_channels=2, mel_bins=8).eval()
    for model in (vae, audio_vae):
        n = model.latents_mean.numel()
        model.latents_mean.copy_(torch.linspace(-0.3, 0.3, n))
        model.latents_std.copy_(torch.linspace(0.5, 2.0, n))
    torch.manual_seed(seed + 3)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, sliding_window=16,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    markers = dict(boi_token_index="<start_of_image>", image_token_index="<image_soft_token>",
                   eoi_token_index="<end_of_image>")
    encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4,
        **{k: tok.convert_tokens_to_ids(v) for k, v in markers.items()})).eval()
    torch.manual_seed(seed + 4)
    connector = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, num_learnable_registers=8)
    connectors = LTX2TextConnectors(caption_channels=16, text_proj_in_factor=text["num_hidden_layers"] + 1,
                                    **{f"{m}_connector_{k}": v for m in ("video", "audio")
                                       for k, v in connector.items()}).eval()
    torch.manual_seed(seed + 5)
    vocoder = LTX2Vocoder(in_channels=2 * 8, hidden_channels=8, out_channels=2, upsample_kernel_sizes=[4, 4],
                          upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1]],
                          output_sampling_rate=400).eval()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                            base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1,
                                            time_shift_type="exponential")
    return _done(LTX2Pipeline(scheduler=sched, vae=vae, audio_vae=audio_vae, text_encoder=encoder, tokenizer=tok,
                              connectors=connectors, transformer=transformer, vocoder=vocoder))
