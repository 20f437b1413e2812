"""Tiny real ``diffusers.Flux2Pipeline`` for tests, built from config dicts (no hub access).

``tiny_flux2_pipeline(seed=0)`` builds:

* ``Flux2Transformer2DModel``: 1 double- and 1 single-stream block, 2 heads x 16 (RoPE axes 4+4+4+4),
  ``in_channels`` 16, ``joint_attention_dim`` 48, guidance embedding on;
* ``AutoencoderKLFlux2``: 4 latent channels, two blocks (8, 16 channels, one 2x down-sampling, so
  ``vae_scale_factor`` 2), no quant convs; its latent BatchNorm (``vae.bn``, 16 = 4 x 2x2 channels) gets fixed,
  non-trivial running statistics so that the pipeline's de-normalisation is not an identity;
* ``FlowMatchEulerDiscreteScheduler`` with FLUX.2's dynamic exponential shift (the pipeline passes ``mu``);
* ``Mistral3ForConditionalGeneration`` text encoder of width 16 with a 1-block Pixtral vision tower.  It has
  **30** (very thin) decoder layers: FLUX.2 stacks the hidden states of layers ``(10, 20, 30)`` (the default
  ``text_encoder_out_layers`` of ``__call__`` / ``encode_prompt``), so a prompt embedding has 3 x 16 = 48 channels;
* as ``tokenizer``, a word-level ``PreTrainedTokenizerFast`` (``build_tokenizer`` of the small models) with
  Mistral's chat markers (``[SYSTEM_PROMPT]``, ``[/SYSTEM_PROMPT]``, ``[INST]``, ``[/INST]``, image tokens) as
  special tokens, no BOS/EOS added by the post-processor (the template writes ``[BOS]``), a Mistral-style chat
  template, and the words of the pipeline's FLUX.2 system message in its vocabulary.  The real component is a
  ``PixtralProcessor``, but that needs torchvision (absent here); the pipeline only calls
  ``tokenizer.apply_chat_template(...)``, which the tokenizer provides for batches of conversations.
  Caption up-sampling (``caption_upsample_temperature``, which calls ``tokenizer.tokenizer.batch_decode``) and
  image conditioning of the text encoder are therefore not supported.

Sizes: height and width multiples of 4 pixels (``vae_scale_factor * 2``; others are floored, with a warning).
The smallest valid size is 4 x 4 (one image token); 32 x 32 gives 16 x 16 latents = 8 x 8 = 64 image tokens.
``output_type="latent"`` returns *packed, BatchNorm-normalised* latents ``[B, (H/4)*(W/4), 16]``: token
``h * (W/4) + w`` holds the 2x2 patch of the 4-channel VAE latent at (h, w), channel order (c, dy, dx).

Call with ``prompt=`` as a keyword: ``Flux2Pipeline.__call__``'s first positional parameter is ``image``
(``pipe(prompt="a red cat", height=32, width=32, num_inference_steps=2, output_type="latent")``).  There is no
negative prompt / true CFG: ``guidance_scale`` (default 4) only feeds the transformer's guidance embedding.

Prompts are always padded to ``max_sequence_length`` (512) tokens and the text mask is *not* given to the
transformer: ``pipe.encode_prompt(["a red cat", "the blue dog on a green tree"])`` returns ``(prompt_embeds
[2, 512, 48] float32, text_ids [2, 512, 4] int64)``, ``text_ids[b, l] = (0, 0, 0, l)``; no mask is returned.

Everything is fp32 on CPU with the progress bar off; fixed seeds (two calls give identical weights).  All
components round-trip through ``save_pretrained`` / ``DiffusionPipeline.from_pretrained``; reload with
``disable_mmap=True`` for bit-identical outputs (see ``tiny_family_pipelines``).
"""
from __future__ import annotations

import re

import torch
from tiny_family_pipelines import WORDS, _done  # also imports tiny_models (single-threaded torch, offline hub)

# Mistral-Small-3.1-style template; message contents are lists of {"type": "text"|"image", ...} or strings
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set parts = [{'type': 'text', 'text': m['content']}] %}"
    "{% else %}{% set parts = m['content'] %}{% endif %}"
    "{% set open, close = {'system': ('[SYSTEM_PROMPT]', '[/SYSTEM_PROMPT]'), 'user': ('[INST]', '[/INST]')}"
    ".get(m['role'], ('', eos_token)) %}{{ open }}"
    "{% for p in parts %}{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}[IMG]{% endif %}{% endfor %}"
    "{{ close }}{% endfor %}"
)
MARKERS = ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
TEXT_LAYERS = 30  # FLUX.2 reads hidden_states[10], [20] and [30]


def _mistral_tokenizer():
    from diffaccel.pipelines.small import build_tokenizer
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import processors

    words = WORDS + tuple(dict.fromkeys(re.findall(r"\w+|[^\w\s]+", SYSTEM_MESSAGE.lower())))
    tok = build_tokenizer(words, max_length=512)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tok.add_special_tokens({"additional_special_tokens": MARKERS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_flux2_pipeline(seed=0):
    """A tiny ``Flux2Pipeline`` (see the module docstring for components, sizes and outputs)."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline,
                           Flux2Transformer2DModel)
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok = _mistral_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=4, sample_size=32, use_quant_conv=False,
                             use_post_quant_conv=False).eval()
    vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 16))
    vae.bn.running_var.copy_(torch.linspace(0.5, 4.0, 16))
    torch.manual_seed(seed + 2)
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                max_position_embeddings=512, sliding_window=None, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=1)).eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096, time_shift_type="exponential")
    return _done(Flux2Pipeline(scheduler=sched, vae=vae, text_encoder=encoder, tokenizer=tok,
                               transformer=transformer))
