"""Tiny real ``QwenImagePipeline`` and ``ZImagePipeline`` for tests, built from config dicts (no hub access).

Each has a two-layer denoiser of width 32, a tiny VAE with one 2x down-sampling, diffusers'
``FlowMatchEulerDiscreteScheduler`` and a tiny Qwen text encoder (``Qwen2_5_VLForConditionalGeneration`` /
``Qwen3Model``, width 32) over a word-level tokenizer (the small models' ``build_tokenizer``) that knows the
Qwen chat markers: ``<|im_start|>``, ``<|im_end|>`` and ``"\\n"`` are single tokens and no BOS/EOS is added, so
the pipelines' own prompt templates work unchanged.  Everything the pipelines need lives in the components
(the Z-Image chat template is the tokenizer's ``chat_template``), so ``save_pretrained`` /
``DiffusionPipeline.from_pretrained`` round-trips them.  Fixed seeds: two calls give identical weights.  Every
pipeline is fp32 on CPU with its progress bar off.

Reloaded pipelines give bit-identical outputs only with ``from_pretrained(folder, disable_mmap=True)``: weights
memory-mapped from safetensors files can sit at addresses of another alignment, and CPU BLAS then rounds
differently (the Qwen-Image latents of a reload differed by ~5e-7).
"""
from __future__ import annotations

import tiny_models  # noqa: F401  (single-threaded torch, HF_HUB_OFFLINE)
import torch

WORDS = ("a", "an", "the", "red", "blue", "green", "cat", "dog", "house", "tree", "on", "in", "at", "night", "sky")
# the words of QwenImagePipeline.prompt_template_encode's system prompt, and the chat roles
TEMPLATE_WORDS = ("system", "user", "assistant", "describe", "image", "by", "detailing", "color", "shape", "size",
                  "texture", "quantity", "text", "spatial", "relationships", "of", "objects", "and", "background",
                  ",", ":")
# Qwen3's chat template as ZImagePipeline uses it (one user turn, add_generation_prompt=True, enable_thinking=True)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen_tokenizer(max_length, chat_template=None):
    """``build_tokenizer`` made Qwen-like: chat markers and newline as tokens, no ``[BOS]``/``[EOS]`` added."""
    from diffaccel.pipelines.small import build_tokenizer
    from tokenizers import AddedToken, processors

    tok = build_tokenizer(WORDS + TEMPLATE_WORDS, max_length=max_length)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    tok.chat_template = chat_template
    return tok


def _done(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_qwenimage_pipeline(seed=0):
    """A ``QwenImagePipeline``: a 2-layer ``QwenImageTransformer2DModel`` (2 heads x 16, ``joint_attention_dim`` 32),
    an ``AutoencoderKLQwenImage`` with 4 latent channels and one 2x down-sampling (``vae_scale_factor`` 2), a
    ``Qwen2_5_VLForConditionalGeneration`` text encoder (width 32, 2 layers, 1-block vision tower) and the
    dynamic-shift flow-match scheduler.

    Sizes: height and width multiples of 4 pixels (``vae_scale_factor * 2``; others are floored, with a
    warning).  ``output_type="latent"`` returns *packed* latents ``[B, (H/4)*(W/4), 16]``: each token is a 2x2
    patch of the 4-channel latent, channel order (c, dy, dx); 32x32 pixels = 8x8 = 64 tokens.

    The pipeline's default template attributes are kept (``prompt_template_encode``, 34 template tokens dropped,
    ``tokenizer_max_length`` 1024): the tokenizer splits the template's prefix into exactly 34 tokens, as Qwen's
    does.  ``pipe.encode_prompt(["a red cat", "the blue dog on a green tree"])`` returns
    ``(prompt_embeds [2, L, 32] float32, prompt_embeds_mask [2, L] int64)`` where ``L`` is the longest prompt's
    token count plus the 5 tokens of the template's suffix; the mask has 1 on valid tokens, 0 on right padding,
    and is ``None`` when every prompt has the same length (so always for a single prompt).  Reload with
    ``disable_mmap=True`` for bit-identical outputs (module docstring).
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer(1024 + 34)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.0, 2.5]).eval()
    torch.manual_seed(seed + 2)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=None,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                            time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=encoder, tokenizer=tok, transformer=transformer)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(tok(prefix).input_ids) == pipe.prompt_template_encode_start_idx, "template prefix length"
    return _done(pipe)


def tiny_zimage_pipeline(seed=0):
    """A ``ZImagePipeline``: a ``ZImageTransformer2DModel`` (2 main + 1 noise- and 1 context-refiner layers, 2 heads
    x 16, ``cap_feat_dim`` 32, patch 2), an ``AutoencoderKL`` with 4 latent channels and two blocks
    (``vae_scale_factor`` 2, Flux-style shift/scaling factors, no quant convs), a ``Qwen3Model`` text encoder
    (width 32, 2 layers) and the flow-match scheduler with a static shift of 3.

    Sizes: height and width multiples of 4 pixels (``vae_scale_factor * 2``; others raise).
    ``output_type="latent"`` returns *unpacked* scaled latents ``[B, 4, H/2, W/2]`` (the transformer patchifies
    2x2 itself); 32x32 pixels = 16x16 latents = 64 image tokens.  ``guidance_scale`` defaults to 5, so a call runs
    classifier-free guidance against ``""`` (prompt and negative batched through one transformer call).

    The chat template (Qwen3's, one user turn plus the assistant prompt) is the tokenizer's ``chat_template``.
    ``pipe.encode_prompt(["a red cat", "the blue dog on a green tree"], do_classifier_free_guidance=True)`` returns
    ``(prompt_embeds, negative_prompt_embeds)``, each a *list* of 2 unpadded float32 tensors ``[L_i, 32]`` (the
    text encoder's second-to-last hidden states of the valid tokens: template + prompt, e.g. 11 and 15 tokens; the
    negatives, of ``""``, 8 tokens each); with ``do_classifier_free_guidance=False`` the negatives are ``[]``.
    Caveat of diffusers: ``encode_prompt`` overwrites the items of a prompt *list* passed in with their
    chat-templated text, so pass a copy.  The chat template is saved with the tokenizer (``chat_template.jinja``)
    and survives ``save_pretrained`` / ``from_pretrained``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tok = _qwen_tokenizer(512, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                                           axes_dims=[8, 4, 4], axes_lens=[1024, 512, 512]).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=32,
                        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                        shift_factor=0.1159).eval()
    torch.manual_seed(seed + 2)
    encoder = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                     max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=None,
                                     eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))).eval()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return _done(ZImagePipeline(scheduler=sched, vae=vae, text_encoder=encoder, tokenizer=tok,
                                transformer=transformer))
