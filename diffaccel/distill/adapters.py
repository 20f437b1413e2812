"""Adapters: what distillation needs from one pipeline type.

An adapter knows, for its pipeline class, how to

* encode prompts into the conditioning tensors the denoiser takes (done once, cached on disk);
* let the teacher generate clean latents from cached conditioning (data recipe (a)) and encode images into
  latents (recipe (b)) -- the only places the text encoders and the VAE run;
* noise clean latents, call the denoiser on cached inputs, and give the model's own training target:
  flow matching (``v = noise - x0``) for FLUX.1/.2, Chroma, Qwen-Image, Z-Image, SD3, Wan and HunyuanVideo, the
  scheduler's ``prediction_type`` (epsilon, v-prediction or sample, DDPM noising) for SD 1.5/2.1 and SDXL UNets
  and CogVideoX (with its SNR shift).

Built in: ``FluxPipeline``, ``ChromaPipeline``, ``Flux2Pipeline``, ``QwenImagePipeline``, ``QwenImage21Pipeline``,
``ZImagePipeline``, ``StableDiffusion3Pipeline``, ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``WanPipeline`` (2.1 and 2.2), ``CogVideoXPipeline``, ``HunyuanVideoPipeline``, ``HunyuanVideo15Pipeline`` and
``LTX2Pipeline`` (and
subclasses: the adapter of the nearest class wins).  Plug-ins (``diffaccel.distill.models``) add adapters for their
own pipelines (the small models).

Conventions: conditioning is a ``{name: tensor}`` dict, batch first; ``size`` is
``{"height": H, "width": W}`` (+ ``"num_frames"`` for video) in pixels; ``call`` is the denoiser to run
(the prepared student, or the teacher), called with the denoiser's own keyword arguments.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["Adapter", "FlowAdapter", "FluxAdapter", "ChromaAdapter", "Flux2Adapter", "QwenImageAdapter",
           "QwenImage21Adapter", "ZImageAdapter", "SD3Adapter", "SDAdapter", "SDXLAdapter", "WanAdapter",
           "CogVideoXAdapter", "HunyuanVideoAdapter", "HunyuanVideo15Adapter", "LTX2Adapter", "adapter_for",
           "logit_normal_sigmas", "shift_sigmas"]


def logit_normal_sigmas(n, generator, mean=0.0, std=1.0):
    """``n`` noise levels ``sigmoid(N(mean, std))`` (SD3's and FLUX's training density)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def shift_sigmas(sigma, shift):
    """The flow schedulers' shift: ``sigma -> shift sigma / (1 + (shift - 1) sigma)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _strip(frames):
    """PIL frames side by side."""
    from PIL import Image

    w, h = frames[0].size
    out = Image.new("RGB", (w * len(frames), h))
    for i, f in enumerate(frames):
        out.paste(f, (i * w, 0))
    return out


class Adapter:
    """Base class (see the module docstring).  Subclasses set :attr:`denoiser_attr` and implement the methods."""

    denoiser_attr = "transformer"
    video = False
    #: recipe (b) (images with captions) can train it
    supports_images = True
    #: "flow" (v = noise - x0) or the scheduler's prediction type: "epsilon", "v_prediction", "sample"
    objective = "flow"
    #: the teacher's guidance scale when --guidance-scale is not given (the pipeline's usual value)
    default_guidance = 5.0

    def __init__(self, pipe):
        self.pipe = pipe
        self.dtype = None  # the dtype inputs are cast to before the denoiser (set by the trainer)
        self.guidance = None  # the guidance scale of the run (FLUX feeds it to its guidance embedding)
        self.size = None  # the run's sample size (set by the trainer)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_attr)

    def denoisers(self) -> tuple:
        """The pipeline components this adapter can distil (the first is the default)."""
        return (self.denoiser_attr,)

    def select_denoiser(self, name):
        """Distil the component ``name`` (``--denoiser``); ``ValueError`` naming the option otherwise."""
        choices = self.denoisers()
        if name not in choices:
            raise ValueError(f"denoiser (--denoiser) must be one of {list(choices)} for {type(self.pipe).__name__}, "
                             f"got {name!r}")
        self.denoiser_attr = name

    @property
    def device(self):
        return self.denoiser.device

    # -- sizes
    def default_size(self) -> dict:
        raise NotImplementedError

    def size_multiple(self) -> int:
        return 8

    def check_size(self, size: dict) -> dict:
        m = self.size_multiple()
        for key in ("height", "width"):
            v = size.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < m or v % m:
                raise ValueError(f"{key} (--{key}) must be a positive multiple of {m} for "
                                 f"{type(self.pipe).__name__}, got {v!r}")
        if self.video:
            f = size.get("num_frames")
            if isinstance(f, bool) or not isinstance(f, int) or f < 1:
                raise ValueError(f"num_frames (--num-frames) must be a positive int, got {f!r}")
        elif size.get("num_frames") is not None:
            raise ValueError(f"num_frames (--num-frames) is for video pipelines, not {type(self.pipe).__name__}")
        return {k: v for k, v in size.items() if v is not None}

    # -- text
    def encode_prompts(self, prompts: list[str]) -> dict:
        raise NotImplementedError

    def encode_uncond(self) -> dict:
        """The conditioning of the empty prompt (batch 1): classifier-free guidance and caption dropout."""
        return self.encode_prompts([""])

    # -- data
    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        """Teacher samples: clean latents ``[B, ...]`` (``output_type="latent"``) or PIL images (videos: frame strips)."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor, size: dict) -> torch.Tensor:
        """``images`` ``[B, 3, H, W]`` in [0, 1] at ``size`` -> clean latents (video pipelines: one-frame clips)."""
        raise NotImplementedError

    # -- training
    def noise_levels(self, x0, generator) -> torch.Tensor:
        raise NotImplementedError

    def noisy(self, x0, noise, t):
        raise NotImplementedError

    def target(self, x0, noise, t):
        raise NotImplementedError

    def forward(self, call, x, t, cond, size):
        raise NotImplementedError

    def _cast(self, *tensors):
        dt = self.dtype
        return tuple(x if dt is None or not x.is_floating_point() else x.to(dt) for x in tensors)


class FlowAdapter(Adapter):
    """Flow matching (rectified flow): ``x_t = (1 - sigma) x0 + sigma noise``, target ``noise - x0``,
    ``sigma`` logit-normal shifted like the pipeline's scheduler."""

    def shift(self, x0) -> float:
        cfg = self.pipe.scheduler.config
        for key in ("flow_shift", "shift"):
            v = cfg.get(key)
            if v is not None:
                return float(v)
        return 1.0

    def noise_levels(self, x0, generator):
        return shift_sigmas(logit_normal_sigmas(x0.shape[0], generator), self.shift(x0))

    def noisy(self, x0, noise, t):
        s = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, t):
        return noise - x0


# ------------------------------------------------------------------------------------------------- FLUX


def _dynamic_shift(cfg, n_tokens):
    """The shift ``exp(mu)`` a scheduler with ``use_dynamic_shifting`` applies at ``n_tokens`` image tokens (the
    pipelines' ``calculate_shift``), else ``None``."""
    if not cfg.get("use_dynamic_shifting"):
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(n_tokens, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    return math.exp(mu)


def _normalised_clip_latents(vae, images):
    """``images`` ``[B, 3, H, W]`` in [0, 1] as one-frame clips through a causal video VAE (Wan's, Qwen-Image's):
    latents ``[B, C, 1, h, w]`` normalised by the VAE's ``latents_mean`` / ``latents_std``."""
    lat = vae.encode((images * 2 - 1).unsqueeze(2).to(vae.device, vae.dtype)).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=lat.device, dtype=lat.dtype).view(1, -1, 1, 1, 1)
    return (lat - mean) / std


def _pad_text(embeds, length):
    """Text states of one prompt each (a list of ``[L_i, D]``, or ``[B, L, D]`` with a ``[B, L]`` mask given as
    ``(embeds, mask)``) -> ``([B, length, D]`` zero-padded, ``[B, length]`` 0/1 mask): the data cache stores one
    shape for every sample; the adapters give the denoiser the mask (or the unpadded states) back."""
    if isinstance(embeds, tuple):
        states, mask = embeds
        mask = torch.ones(states.shape[:2], device=states.device) if mask is None else mask
        embeds = [s[m.bool()] for s, m in zip(states, mask)]
    out = embeds[0].new_zeros(len(embeds), length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), length, device=embeds[0].device)
    for i, e in enumerate(embeds):
        n = min(length, e.shape[0])
        out[i, :n] = e[:n]
        mask[i, :n] = 1
    return out, mask


class FluxAdapter(FlowAdapter):
    """``FluxPipeline``: packed 2x2 latents ``[B, N, 4C]``, CLIP pooled + T5 states, guidance embedding (dev)."""

    default_guidance = 3.5

    def max_sequence_length(self):
        return int(min(512, getattr(self.pipe.tokenizer_2, "model_max_length", 512) or 512))

    def default_size(self):
        s = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return {"height": s, "width": s}

    def size_multiple(self):
        return self.pipe.vae_scale_factor * 2

    def encode_prompts(self, prompts):
        pe, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                max_sequence_length=self.max_sequence_length())
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def _grid(self, size):
        f = self.pipe.vae_scale_factor * 2
        return size["height"] // f, size["width"] // f

    def shift(self, x0):
        return _dynamic_shift(self.pipe.scheduler.config, x0.shape[1]) or super().shift(x0)

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        out = self.pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                        height=size["height"], width=size["width"], num_inference_steps=steps, guidance_scale=guidance,
                        generator=generators, output_type=output_type,
                        max_sequence_length=self.max_sequence_length())
        return out.images

    def encode_images(self, images, size):
        vae = self.pipe.vae
        lat = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
        lat = (lat - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = lat.shape
        return self.pipe._pack_latents(lat, b, c, h, w)

    def forward(self, call, x, t, cond, size):
        x, pe, pooled = self._cast(x, cond["prompt_embeds"], cond["pooled_prompt_embeds"])
        h, w = self._grid(size)
        img_ids = self.pipe._prepare_latent_image_ids(x.shape[0], h, w, x.device, x.dtype)
        txt_ids = torch.zeros(pe.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), float(self.guidance or 1.0), device=x.device,
                                  dtype=torch.float32)
        return call(hidden_states=x, timestep=t.to(x.dtype), guidance=guidance, pooled_projections=pooled,
                    encoder_hidden_states=pe, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


class ChromaAdapter(FluxAdapter):
    """``ChromaPipeline``: FLUX's packed latents and flow schedule; T5 states with their padding mask (no pooled
    text, no guidance embedding), passed to the denoiser as a boolean mask; the teacher's guidance is
    classifier-free against the empty prompt."""

    default_guidance = 5.0

    def max_sequence_length(self):
        return int(min(512, getattr(self.pipe.tokenizer, "model_max_length", 512) or 512))

    def encode_prompts(self, prompts):
        pe, _, mask, _, _, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length())
        return {"prompt_embeds": pe, "prompt_attention_mask": mask.float()}

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        b = cond["prompt_embeds"].shape[0]
        out = self.pipe(prompt_embeds=cond["prompt_embeds"], prompt_attention_mask=cond["prompt_attention_mask"],
                        negative_prompt_embeds=uncond["prompt_embeds"].expand(b, -1, -1),
                        negative_prompt_attention_mask=uncond["prompt_attention_mask"].expand(b, -1),
                        height=size["height"], width=size["width"], num_inference_steps=steps,
                        guidance_scale=guidance, generator=generators, output_type=output_type,
                        max_sequence_length=self.max_sequence_length())
        return out.images

    def forward(self, call, x, t, cond, size):
        x, pe = self._cast(x, cond["prompt_embeds"])
        h, w = self._grid(size)
        img_ids = self.pipe._prepare_latent_image_ids(x.shape[0], h, w, x.device, x.dtype)
        txt_ids = torch.zeros(pe.shape[1], 3, device=x.device, dtype=x.dtype)
        # [text; image] as the pipeline builds it, but boolean: the pipeline's 0/1 float mask is added to the
        # logits by the stock processor (the teacher) and hides nothing (diffusers issue #12116), while diffaccel
        # (the student) reads it as a mask; a boolean mask means the same to both
        text_mask = cond["prompt_attention_mask"].to(x.device) != 0
        mask = torch.cat([text_mask, text_mask.new_ones(x.shape[0], x.shape[1])], dim=1)
        return call(hidden_states=x, timestep=t.to(x.dtype), encoder_hidden_states=pe, txt_ids=txt_ids,
                    img_ids=img_ids, attention_mask=mask, return_dict=False)[0]


class Flux2Adapter(FluxAdapter):
    """``Flux2Pipeline``: packed latents ``[B, N, 4C]`` normalised by the VAE's BatchNorm statistics; text states of
    ``text_length`` tokens (the pipeline pads and gives the padding to the denoiser too: no mask); 4-axis ids; the
    guidance embedding (no classifier-free guidance).  The flow shift is the pipeline's empirical ``mu`` at
    ``schedule_steps`` steps."""

    default_guidance = 4.0
    text_length = 512  # the pipeline's max_sequence_length
    schedule_steps = 50  # the pipeline's default num_inference_steps (FLUX.2's shift depends on it)

    def shift(self, x0):
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return math.exp(compute_empirical_mu(x0.shape[1], self.schedule_steps))

    def encode_prompts(self, prompts):
        pe, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device, max_sequence_length=self.text_length)
        return {"prompt_embeds": pe}

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        out = self.pipe(prompt_embeds=cond["prompt_embeds"], guidance_scale=guidance, height=size["height"],
                        width=size["width"], num_inference_steps=steps, generator=generators,
                        output_type=output_type, max_sequence_length=self.text_length)
        return out.images

    def encode_images(self, images, size):
        vae = self.pipe.vae
        lat = self.pipe._encode_vae_image((images * 2 - 1).to(vae.device, vae.dtype), generator=None)
        return self.pipe._pack_latents(lat)

    def forward(self, call, x, t, cond, size):
        x, pe = self._cast(x, cond["prompt_embeds"])
        h, w = self._grid(size)
        img_ids = self.pipe._prepare_latent_ids(x.new_empty(x.shape[0], 1, h, w)).to(x.device)
        txt_ids = self.pipe._prepare_text_ids(pe).to(x.device)
        guidance = None
        if self.denoiser.config.get("guidance_embeds"):
            guidance = torch.full((x.shape[0],), float(self.guidance or 1.0), device=x.device, dtype=torch.float32)
        return call(hidden_states=x, timestep=t.to(x.dtype), guidance=guidance, encoder_hidden_states=pe,
                    txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]


class QwenImageAdapter(FluxAdapter):
    """``QwenImagePipeline``: packed 2x2 latents ``[B, N, 4C]`` normalised by the VAE's ``latents_mean`` / ``std``;
    Qwen2.5-VL states padded to ``text_length`` tokens with their mask; ``img_shapes`` for the RoPE; the teacher
    guides with the pipeline's true CFG (``true_cfg_scale``) against the empty prompt."""

    default_guidance = 4.0
    text_length = 512  # the pipeline's max_sequence_length

    def encode_prompts(self, prompts):
        pe, mask = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                           max_sequence_length=self.text_length)
        pe, mask = _pad_text((pe, mask), self.text_length)
        return {"prompt_embeds": pe, "prompt_embeds_mask": mask}

    def _text(self, cond):
        return cond["prompt_embeds"], cond["prompt_embeds_mask"].long()

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        b = cond["prompt_embeds"].shape[0]
        pe, mask = self._text(cond)
        npe, nmask = self._text(uncond)
        out = self.pipe(prompt_embeds=pe, prompt_embeds_mask=mask, negative_prompt_embeds=npe.expand(b, -1, -1),
                        negative_prompt_embeds_mask=nmask.expand(b, -1), true_cfg_scale=guidance,
                        height=size["height"], width=size["width"], num_inference_steps=steps, generator=generators,
                        output_type=output_type, **self._call_options())
        return out.images

    def _call_options(self):
        return {"max_sequence_length": self.text_length}

    def _pack(self, lat):
        b, c, h, w = lat.shape
        return self.pipe._pack_latents(lat, b, c, h, w)

    def encode_images(self, images, size):
        return self._pack(_normalised_clip_latents(self.pipe.vae, images)[:, :, 0])

    def _inputs(self, x, cond, size):
        """The latents and text states cast for the denoiser, the text mask and the token grid."""
        (x,) = self._cast(x)
        pe, mask = self._text(cond)
        (pe,) = self._cast(pe)
        return x, pe, mask, self._grid(size)

    def forward(self, call, x, t, cond, size):
        x, pe, mask, (h, w) = self._inputs(x, cond, size)
        guidance = None
        if self.denoiser.config.get("guidance_embeds"):
            guidance = torch.full((x.shape[0],), float(self.guidance or 1.0), device=x.device, dtype=torch.float32)
        return call(hidden_states=x, timestep=t.to(x.dtype), guidance=guidance, encoder_hidden_states=pe,
                    encoder_hidden_states_mask=mask.to(x.device), img_shapes=[[(1, h, w)]] * x.shape[0],
                    return_dict=False)[0]


class QwenImage21Adapter(QwenImageAdapter):
    """``QwenImage21Pipeline`` (text to image): latents flattened without patching ``[B, h*w, C]`` (a 16x VAE on
    RGBA), normalised by ``latents_mean`` / ``std``; Qwen3-VL states padded to ``text_length`` with their mask;
    ``img_mask`` (no condition images, one slot per 2x2 group of target latents) and ``img_shapes`` as the pipeline
    builds them; the KV cache is a sampling device and stays off in training."""

    default_guidance = 1.0  # the pipeline's true_cfg_scale default (no classifier-free guidance)

    def default_size(self):
        return {"height": 1024, "width": 1024}

    def _grid(self, size):
        f = self.pipe.vae_scale_factor
        return size["height"] // f, size["width"] // f

    def encode_prompts(self, prompts):
        pe, mask, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device)
        pe, mask = _pad_text((pe, mask), self.text_length)
        return {"prompt_embeds": pe, "prompt_embeds_mask": mask}

    def _call_options(self):
        return {}  # its __call__ takes no max_sequence_length

    def encode_images(self, images, size):
        vae = self.pipe.vae
        rgba = torch.cat([images, torch.ones_like(images[:, :1])], dim=1) * 2 - 1  # opaque
        lat = self.pipe._encode_vae_image(rgba.unsqueeze(2).to(vae.device, vae.dtype), generator=None)
        return self._pack(lat[:, :, 0])

    def forward(self, call, x, t, cond, size):
        x, pe, mask, (h, w) = self._inputs(x, cond, size)
        b, n = x.shape[:2]
        img_mask = torch.cat([torch.zeros(b, pe.shape[1], dtype=torch.bool, device=x.device),
                              torch.ones(b, n // 4, dtype=torch.bool, device=x.device)], dim=1)
        out = call(hidden_states=x, timestep=t.to(x.dtype), encoder_hidden_states=pe,
                   encoder_hidden_states_mask=mask.to(x.device), img_shapes=[[(1, h, w)]] * b, img_mask=img_mask,
                   return_dict=False)[0]
        return out[:, -n:]


class ZImageAdapter(FlowAdapter):
    """``ZImagePipeline``: latents ``[B, C, h, w]`` (``(x - shift_factor) * scaling_factor``; the transformer
    patchifies 2x2); Qwen3 states, one unpadded tensor per prompt (cached padded to ``text_length`` with a mask).
    The denoiser takes lists, ``1 - sigma`` as its timestep and predicts ``x0 - noise``: :meth:`forward` returns
    ``noise - x0`` like the other flow adapters."""

    text_length = 512  # the pipeline's max_sequence_length

    def default_size(self):
        return {"height": 1024, "width": 1024}

    def size_multiple(self):
        return self.pipe.vae_scale_factor * 2

    def shift(self, x0):
        return _dynamic_shift(self.pipe.scheduler.config, (x0.shape[-2] // 2) * (x0.shape[-1] // 2)) or \
            super().shift(x0)

    def encode_prompts(self, prompts):
        embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
                                            max_sequence_length=self.text_length)
        pe, mask = _pad_text(embeds, self.text_length)
        return {"prompt_embeds": pe, "prompt_embeds_mask": mask}

    @staticmethod
    def _unpadded(cond):
        return [e[m.bool()] for e, m in zip(cond["prompt_embeds"], cond["prompt_embeds_mask"])]

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        b = cond["prompt_embeds"].shape[0]
        out = self.pipe(prompt_embeds=self._unpadded(cond), negative_prompt_embeds=self._unpadded(uncond) * b,
                        guidance_scale=guidance, height=size["height"], width=size["width"],
                        num_inference_steps=steps, generator=generators, output_type=output_type,
                        max_sequence_length=self.text_length)
        return out.images

    def encode_images(self, images, size):
        vae = self.pipe.vae
        lat = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
        return (lat - vae.config.shift_factor) * vae.config.scaling_factor

    def forward(self, call, x, t, cond, size):
        x, pe = self._cast(x, cond["prompt_embeds"])
        caps = self._unpadded({"prompt_embeds": pe, "prompt_embeds_mask": cond["prompt_embeds_mask"]})
        out = call(list(x.unsqueeze(2).unbind(0)), (1 - t).to(x.dtype), caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)


# ------------------------------------------------------------------------------------------------- SD3


def _generate_pooled(pipe, cond, uncond, generators, size, steps, guidance, output_type):
    """A pipeline call with text states and pooled text, and the empty prompt's as negatives (SD3, SDXL)."""
    b = cond["prompt_embeds"].shape[0]
    out = pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
               negative_prompt_embeds=uncond["prompt_embeds"].expand(b, -1, -1),
               negative_pooled_prompt_embeds=uncond["pooled_prompt_embeds"].expand(b, -1),
               height=size["height"], width=size["width"], num_inference_steps=steps, guidance_scale=guidance,
               generator=generators, output_type=output_type)
    return out.images


class SD3Adapter(FlowAdapter):
    """``StableDiffusion3Pipeline``: latents ``[B, 16, h, w]``, joint CLIP-L/G + T5 states and pooled text."""

    default_guidance = 7.0

    def default_size(self):
        s = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return {"height": s, "width": s}

    def size_multiple(self):
        return self.pipe.vae_scale_factor * self.pipe.patch_size

    def encode_prompts(self, prompts):
        pe, _, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                   device=self.device, do_classifier_free_guidance=False)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def encode_uncond(self):
        _, npe, _, npooled = self.pipe.encode_prompt(prompt=[""], prompt_2=None, prompt_3=None, device=self.device,
                                                     do_classifier_free_guidance=True)
        return {"prompt_embeds": npe, "pooled_prompt_embeds": npooled}

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        return _generate_pooled(self.pipe, cond, uncond, generators, size, steps, guidance, output_type)

    def encode_images(self, images, size):
        vae = self.pipe.vae
        lat = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
        return (lat - vae.config.shift_factor) * vae.config.scaling_factor

    def forward(self, call, x, t, cond, size):
        x, pe, pooled = self._cast(x, cond["prompt_embeds"], cond["pooled_prompt_embeds"])
        return call(hidden_states=x, timestep=(t * 1000).to(x.dtype), encoder_hidden_states=pe,
                    pooled_projections=pooled, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------- Wan


def _check_frames(size, multiple, name):
    if (size["num_frames"] - 1) % multiple:
        raise ValueError(f"num_frames (--num-frames) - 1 must be a multiple of {multiple} for {name}, "
                         f"got {size['num_frames']}")
    return size


def _video_frames(out, output_type):
    """A video pipeline's output: latents, or each video's frames side by side."""
    frames = out.frames
    if output_type == "latent":
        return frames
    from PIL import Image

    return [_strip([f if isinstance(f, Image.Image) else Image.fromarray((np.asarray(f) * 255).round().astype("uint8"))
                    for f in v]) for v in frames]


class WanAdapter(FlowAdapter):
    """``WanPipeline``: video latents ``[B, C, F', h, w]`` normalised by the VAE's ``latents_mean`` / ``std``;
    UMT5 states (512 tokens).  Wan 2.2 (``transformer_2`` and ``boundary_ratio``): each expert is distilled on its
    own noise range, ``transformer`` on ``sigma >= boundary_ratio``, ``transformer_2`` below (the pipeline's
    hand-over); the teacher's samples use both, as the pipeline does."""

    video = True

    def denoisers(self):
        if getattr(self.pipe, "transformer_2", None) is not None and self.pipe.config.get("boundary_ratio") is not None:
            return ("transformer", "transformer_2")
        return ("transformer",)

    def noise_levels(self, x0, generator):
        sigma = super().noise_levels(x0, generator)
        if len(self.denoisers()) == 1:
            return sigma
        b = float(self.pipe.config.boundary_ratio)
        return b + (1 - b) * sigma if self.denoiser_attr == "transformer" else b * sigma

    def default_size(self):
        return {"height": 480, "width": 832, "num_frames": 81}

    def size_multiple(self):
        return self.pipe.vae_scale_factor_spatial * int(self.denoiser.config.patch_size[1])

    def check_size(self, size):
        return _check_frames(super().check_size(size), self.pipe.vae_scale_factor_temporal, "WanPipeline")

    def encode_prompts(self, prompts):
        pe, _ = self.pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                        max_sequence_length=512, device=self.device)
        return {"prompt_embeds": pe}

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        b = cond["prompt_embeds"].shape[0]
        out = self.pipe(prompt_embeds=cond["prompt_embeds"],
                        negative_prompt_embeds=uncond["prompt_embeds"].expand(b, -1, -1),
                        height=size["height"], width=size["width"], num_frames=size["num_frames"],
                        num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                        output_type="latent" if output_type == "latent" else "pil")
        return _video_frames(out, output_type)

    def encode_images(self, images, size):
        return _normalised_clip_latents(self.pipe.vae, images)

    def forward(self, call, x, t, cond, size):
        x, pe = self._cast(x, cond["prompt_embeds"])
        return call(hidden_states=x, timestep=(t * 1000).to(x.dtype), encoder_hidden_states=pe, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------- UNet


class SDAdapter(Adapter):
    """``StableDiffusionPipeline`` (SD 1.5 / 2.1): latents ``[B, 4, h, w]`` scaled by the VAE's
    ``scaling_factor``; DDPM noising and the scheduler's ``prediction_type`` as target."""

    denoiser_attr = "unet"
    default_guidance = 7.5

    def __init__(self, pipe):
        super().__init__(pipe)
        self.noise_scheduler = self.training_scheduler()
        self.objective = self.noise_scheduler.config.prediction_type

    def training_scheduler(self):
        """The scheduler whose ``add_noise`` / ``get_velocity`` define training (DDPM on the pipeline's betas)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def default_size(self):
        s = self.denoiser.config.sample_size * self.pipe.vae_scale_factor
        return {"height": s, "width": s}

    def size_multiple(self):
        return self.pipe.vae_scale_factor * 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def encode_prompts(self, prompts):
        pe, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"prompt_embeds": pe}

    def encode_uncond(self):
        _, npe = self.pipe.encode_prompt([""], self.device, 1, True)
        return {"prompt_embeds": npe}

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        b = cond["prompt_embeds"].shape[0]
        out = self.pipe(prompt_embeds=cond["prompt_embeds"],
                        negative_prompt_embeds=uncond["prompt_embeds"].expand(b, -1, -1),
                        height=size["height"], width=size["width"], num_inference_steps=steps,
                        guidance_scale=guidance, generator=generators, output_type=output_type)
        return out.images

    def encode_images(self, images, size):
        vae = self.pipe.vae
        lat = vae.encode((images * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
        return lat * vae.config.scaling_factor

    def noise_levels(self, x0, generator):
        n = self.noise_scheduler.config.num_train_timesteps
        return torch.randint(0, n, (x0.shape[0],), generator=generator).float()

    def noisy(self, x0, noise, t):
        return self.noise_scheduler.add_noise(x0, noise, t.long().to(x0.device))

    def target(self, x0, noise, t):
        if self.objective == "epsilon":
            return noise
        if self.objective == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t.long().to(x0.device))
        if self.objective == "sample":
            return x0
        raise ValueError(f"unsupported prediction_type {self.objective!r} of {type(self.pipe).__name__}'s scheduler")

    def added_cond(self, cond, size, x):
        return None

    def forward(self, call, x, t, cond, size):
        x, pe = self._cast(x, cond["prompt_embeds"])
        kwargs = {}
        added = self.added_cond(cond, size, x)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return call(x, t.to(x.device), encoder_hidden_states=pe, return_dict=False, **kwargs)[0]


class SDXLAdapter(SDAdapter):
    """``StableDiffusionXLPipeline``: SD's recipe plus the pooled text and the size/crop time ids."""

    def encode_prompts(self, prompts):
        pe, _, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.device,
                                                   do_classifier_free_guidance=False)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def encode_uncond(self):
        _, npe, _, npooled = self.pipe.encode_prompt(prompt=[""], device=self.device, do_classifier_free_guidance=True)
        return {"prompt_embeds": npe, "pooled_prompt_embeds": npooled}

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        return _generate_pooled(self.pipe, cond, uncond, generators, size, steps, guidance, output_type)

    def added_cond(self, cond, size, x):
        (pooled,) = self._cast(cond["pooled_prompt_embeds"])
        h, w = size["height"], size["width"]
        ids = torch.tensor([[h, w, 0, 0, h, w]], device=x.device, dtype=pooled.dtype).expand(x.shape[0], -1)
        return {"text_embeds": pooled, "time_ids": ids}


# ------------------------------------------------------------------------------------------------- video


class CogVideoXAdapter(SDAdapter):
    """``CogVideoXPipeline``: latents frames-first ``[B, F', C, h, w]`` scaled by the VAE's ``scaling_factor``; T5
    states of the transformer's fixed text length; DDPM noising with CogVideoX's SNR shift and the scheduler's
    ``prediction_type`` (v-prediction) as target, from ``CogVideoXDDIMScheduler``; RoPE (5B / 1.5) built as the
    pipeline builds it."""

    denoiser_attr = "transformer"
    video = True
    default_guidance = 6.0

    def training_scheduler(self):
        from diffusers import CogVideoXDDIMScheduler

        return CogVideoXDDIMScheduler.from_config(self.pipe.scheduler.config)

    def default_size(self):
        cfg, f = self.denoiser.config, self.pipe.vae_scale_factor_spatial
        return {"height": cfg.sample_height * f, "width": cfg.sample_width * f, "num_frames": cfg.sample_frames}

    def size_multiple(self):
        return 8  # the pipeline's check

    def check_size(self, size):
        return _check_frames(super().check_size(size), self.pipe.vae_scale_factor_temporal, "CogVideoXPipeline")

    def text_length(self):
        return int(self.denoiser.config.max_text_seq_length)

    def encode_prompts(self, prompts):
        pe, _ = self.pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False, device=self.device,
                                        max_sequence_length=self.text_length())
        return {"prompt_embeds": pe}

    def encode_uncond(self):
        return self.encode_prompts([""])

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        b = cond["prompt_embeds"].shape[0]
        out = self.pipe(prompt_embeds=cond["prompt_embeds"],
                        negative_prompt_embeds=uncond["prompt_embeds"].expand(b, -1, -1), height=size["height"],
                        width=size["width"], num_frames=size["num_frames"], num_inference_steps=steps,
                        guidance_scale=guidance, generator=generators,
                        output_type="latent" if output_type == "latent" else "pil",
                        max_sequence_length=self.text_length())
        return _video_frames(out, output_type)

    def encode_images(self, images, size):
        vae = self.pipe.vae
        lat = vae.encode((images * 2 - 1).unsqueeze(2).to(vae.device, vae.dtype)).latent_dist.mode()
        return (lat * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)

    def forward(self, call, x, t, cond, size):
        x, pe = self._cast(x, cond["prompt_embeds"])
        rope = None
        if self.denoiser.config.use_rotary_positional_embeddings:
            rope = self.pipe._prepare_rotary_positional_embeddings(size["height"], size["width"], x.shape[1], x.device)
        return call(hidden_states=x, encoder_hidden_states=pe, timestep=t.long().to(x.device), image_rotary_emb=rope,
                    return_dict=False)[0]


class HunyuanVideoAdapter(FlowAdapter):
    """``HunyuanVideoPipeline`` (1.0): latents ``[B, C, F', h, w]`` scaled by the VAE's ``scaling_factor``; Llama
    states (256 tokens, right-padded, with their mask) and CLIP's pooled text; the guidance embedding (no
    classifier-free guidance by default)."""

    video = True
    default_guidance = 6.0

    def default_size(self):
        return {"height": 720, "width": 1280, "num_frames": 129}

    def size_multiple(self):
        return 16  # the pipeline's check

    def check_size(self, size):
        return _check_frames(super().check_size(size), self.pipe.vae_scale_factor_temporal, "HunyuanVideoPipeline")

    def encode_prompts(self, prompts):
        pe, pooled, mask = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask.float()}

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        out = self.pipe(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"],
                        prompt_attention_mask=cond["prompt_attention_mask"].long(), guidance_scale=guidance,
                        height=size["height"], width=size["width"], num_frames=size["num_frames"],
                        num_inference_steps=steps, generator=generators,
                        output_type="latent" if output_type == "latent" else "pil")
        return _video_frames(out, output_type)

    def encode_images(self, images, size):
        vae = self.pipe.vae
        lat = vae.encode((images * 2 - 1).unsqueeze(2).to(vae.device, vae.dtype)).latent_dist.mode()
        return lat * vae.config.scaling_factor

    def forward(self, call, x, t, cond, size):
        x, pe, pooled = self._cast(x, cond["prompt_embeds"], cond["pooled_prompt_embeds"])
        guidance = None
        if self.denoiser.config.get("guidance_embeds"):
            guidance = torch.full((x.shape[0],), float(self.guidance or 1.0) * 1000.0, device=x.device, dtype=x.dtype)
        return call(hidden_states=x, timestep=(t * 1000).to(x.dtype), encoder_hidden_states=pe,
                    encoder_attention_mask=cond["prompt_attention_mask"].to(x.device, x.dtype),
                    pooled_projections=pooled, guidance=guidance, return_dict=False)[0]


class HunyuanVideo15Adapter(FlowAdapter):
    """``HunyuanVideo15Pipeline`` (text to video): latents ``[B, C, F', h, w]`` scaled by the VAE's
    ``scaling_factor``; Qwen2.5-VL states (1000 tokens) and ByT5 glyph states (256) with their masks; the denoiser
    takes the latents with zero condition latents and mask channel, and zero image embeddings, as the pipeline's
    text-to-video call does; classifier-free guidance through the pipeline's guider."""

    video = True
    default_guidance = 6.0

    def default_size(self):
        w, h = self.pipe.default_aspect_ratio
        height, width = self.pipe.video_processor.calculate_default_height_width(h, w, self.pipe.target_size)
        return {"height": int(height), "width": int(width), "num_frames": 121}

    def size_multiple(self):
        return self.pipe.vae_scale_factor_spatial * int(self.denoiser.config.patch_size)

    def check_size(self, size):
        return _check_frames(super().check_size(size), self.pipe.vae_scale_factor_temporal, "HunyuanVideo15Pipeline")

    _KEYS = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")

    def encode_prompts(self, prompts):
        out = self.pipe.encode_prompt(prompt=list(prompts), device=self.device, batch_size=len(prompts))
        return dict(zip(self._KEYS, out))

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        b = cond["prompt_embeds"].shape[0]
        if output_type != "latent" and b > 1:  # its VAE decodes one video at a time (see encode_images)
            return [v for i in range(b) for v in self.generate(
                prompts, {k: t[i:i + 1] for k, t in cond.items()}, uncond, generators[i:i + 1], size, steps=steps,
                guidance=guidance, output_type=output_type)]
        negatives = {f"negative_{k}": v.expand(b, *v.shape[1:]) for k, v in uncond.items()}
        guider = self.pipe.guider
        self.pipe.guider = guider.new(guidance_scale=guidance)
        try:
            out = self.pipe(**cond, **negatives, height=size["height"], width=size["width"],
                            num_frames=size["num_frames"], num_inference_steps=steps, generator=generators,
                            output_type="latent" if output_type == "latent" else "pil")
        finally:
            self.pipe.guider = guider
        return _video_frames(out, output_type)

    def encode_images(self, images, size):
        # one image at a time: AutoencoderKLHunyuanVideo15's causal attention mask does not broadcast over a batch
        # (diffusers 0.42)
        vae = self.pipe.vae
        clips = (images * 2 - 1).unsqueeze(2).to(vae.device, vae.dtype)
        lat = torch.cat([vae.encode(c[None]).latent_dist.mode() for c in clips])
        return lat * vae.config.scaling_factor

    def forward(self, call, x, t, cond, size):
        (x,) = self._cast(x)
        pe, pe2 = self._cast(cond["prompt_embeds"], cond["prompt_embeds_2"])
        b, c, f, h, w = x.shape
        hidden = torch.cat([x, x.new_zeros(b, c, f, h, w), x.new_zeros(b, 1, f, h, w)], dim=1)
        image_embeds = x.new_zeros(b, self.pipe.vision_num_semantic_tokens, self.pipe.vision_states_dim)
        return call(hidden_states=hidden, image_embeds=image_embeds, timestep=(t * 1000).to(x.dtype),
                    encoder_hidden_states=pe, encoder_attention_mask=cond["prompt_embeds_mask"].to(x.device, x.dtype),
                    encoder_hidden_states_2=pe2,
                    encoder_attention_mask_2=cond["prompt_embeds_mask_2"].to(x.device, x.dtype),
                    return_dict=False)[0]


class LTX2Adapter(FlowAdapter):
    """``LTX2Pipeline`` (LTX-2: video with its audio, one denoiser).  A sample is the video and the audio latents
    the denoiser works on (normalised, packed ``[B, N, C]`` and ``[B, L, C*M]``), flattened into one ``[B, D]``
    tensor so the flow loss covers both; :meth:`forward` splits it, runs the joint call as the pipeline's denoising
    loop does (coordinates, ``fps``, cross timestep) and flattens both velocities back.  The text is cached after
    LTX-2's connectors (the video and audio contexts and their mask): the Gemma states before them stack every
    layer.  The teacher's samples come from the prompts themselves with the pipeline's own guidance (CFG, STG,
    modality guidance at ``--guidance-scale``); images with captions cannot train it (no audio)."""

    video = True
    supports_images = False
    default_guidance = 3.0
    frame_rate = 24.0  # the pipeline's default
    text_length = 1024  # the pipeline's max_sequence_length

    def default_size(self):
        return {"height": 512, "width": 768, "num_frames": 121}

    def size_multiple(self):
        return self.pipe.vae_spatial_compression_ratio

    def check_size(self, size):
        return _check_frames(super().check_size(size), self.pipe.vae_temporal_compression_ratio, "LTX2Pipeline")

    # -- the latent layout of one sample
    def _layout(self, size):
        p = self.pipe
        f = (size["num_frames"] - 1) // p.vae_temporal_compression_ratio + 1
        h, w = size["height"] // p.vae_spatial_compression_ratio, size["width"] // p.vae_spatial_compression_ratio
        per_second = p.audio_sampling_rate / p.audio_hop_length / float(p.audio_vae_temporal_compression_ratio)
        audio_frames = round(size["num_frames"] / self.frame_rate * per_second)
        mel = p.audio_vae.config.mel_bins // p.audio_vae_mel_compression_ratio
        return f, h, w, audio_frames, mel

    def _flat(self, video, audio):
        """Denormalised unpacked latents (the pipeline's ``output_type="latent"``) -> ``[B, D]``."""
        p = self.pipe
        v = p._pack_latents(p._normalize_latents(video.float(), p.vae.latents_mean, p.vae.latents_std,
                                                 p.vae.config.scaling_factor),
                            p.transformer_spatial_patch_size, p.transformer_temporal_patch_size)
        a = p._normalize_audio_latents(p._pack_audio_latents(audio.float()), p.audio_vae.latents_mean,
                                       p.audio_vae.latents_std)
        return torch.cat([v.flatten(1), a.flatten(1)], dim=1)

    def _split(self, x, size):
        f, h, w, audio_frames, _ = self._layout(size)
        n = f * h * w // (self.pipe.transformer_spatial_patch_size ** 2 * self.pipe.transformer_temporal_patch_size)
        cv = int(self.denoiser.config.in_channels)
        video = x[:, :n * cv].reshape(x.shape[0], n, cv)
        audio = x[:, n * cv:].reshape(x.shape[0], audio_frames, -1)
        return video, audio

    def shift(self, x0):
        """The pipeline's ``mu`` at the run's number of video tokens (``self.size``, set by the trainer)."""
        cfg = self.pipe.scheduler.config
        size = self.size or self.default_size()
        f, h, w, _, _ = self._layout(size)
        n = f * h * w // (self.pipe.transformer_spatial_patch_size ** 2 * self.pipe.transformer_temporal_patch_size)
        return _dynamic_shift(dict(cfg, base_image_seq_len=cfg.get("base_image_seq_len", 1024),
                                   base_shift=cfg.get("base_shift", 0.95), max_shift=cfg.get("max_shift", 2.05)),
                              n) or super().shift(x0)

    # -- text
    def encode_prompts(self, prompts):
        pe, mask, _, _ = self.pipe.encode_prompt(prompt=list(prompts), do_classifier_free_guidance=False,
                                                 device=self.device, max_sequence_length=self.text_length)
        side = getattr(self.pipe.tokenizer, "padding_side", "left")
        video_ctx, audio_ctx, ctx_mask = self.pipe.connectors(pe, mask, padding_side=side)
        return {"video_context": video_ctx, "audio_context": audio_ctx, "context_mask": ctx_mask.float()}

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        if prompts is None:
            raise ValueError("LTX2Pipeline's teacher samples are generated from the prompts themselves")
        out = self.pipe(prompt=list(prompts), negative_prompt=[""] * len(prompts), height=size["height"],
                        width=size["width"], num_frames=size["num_frames"], frame_rate=self.frame_rate,
                        num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                        output_type="latent" if output_type == "latent" else "pil",
                        max_sequence_length=self.text_length)
        if output_type == "latent":
            return self._flat(out.frames, out.audio)
        return _video_frames(out, output_type)

    def encode_images(self, images, size):
        raise ValueError("data (--data): LTX-2 learns video with its audio; images with captions cannot train it")

    def forward(self, call, x, t, cond, size):
        from diffusers.pipelines.ltx2.utils import conditioning_frame_rate

        (x,) = self._cast(x)
        video, audio = self._split(x, size)
        video_ctx, audio_ctx = self._cast(cond["video_context"], cond["audio_context"])
        mask = cond["context_mask"].to(x.device, x.dtype)
        f, h, w, audio_frames, _ = self._layout(size)
        b = x.shape[0]
        fps = conditioning_frame_rate(self.frame_rate, 1.0)
        video_coords = self.denoiser.rope.prepare_video_coords(b, f, h, w, x.device, fps=fps)
        audio_coords = self.denoiser.audio_rope.prepare_audio_coords(b, audio_frames, x.device)
        timestep = (t * 1000).to(x.dtype)
        v_video, v_audio = call(hidden_states=video, audio_hidden_states=audio, encoder_hidden_states=video_ctx,
                                audio_encoder_hidden_states=audio_ctx, timestep=timestep, sigma=timestep,
                                encoder_attention_mask=mask, audio_encoder_attention_mask=mask, num_frames=f, height=h,
                                width=w, fps=fps, audio_num_frames=audio_frames, video_coords=video_coords,
                                audio_coords=audio_coords, isolate_modalities=False,
                                spatio_temporal_guidance_blocks=None, perturbation_mask=None, use_cross_timestep=True,
                                return_dict=False)
        return torch.cat([v_video.flatten(1), v_audio.flatten(1)], dim=1)


_BUILTIN = (("FluxPipeline", FluxAdapter), ("ChromaPipeline", ChromaAdapter), ("Flux2Pipeline", Flux2Adapter),
            ("QwenImage21Pipeline", QwenImage21Adapter), ("QwenImagePipeline", QwenImageAdapter),
            ("ZImagePipeline", ZImageAdapter), ("StableDiffusion3Pipeline", SD3Adapter),
            ("StableDiffusionXLPipeline", SDXLAdapter), ("StableDiffusionPipeline", SDAdapter),
            ("WanPipeline", WanAdapter), ("CogVideoXPipeline", CogVideoXAdapter),
            ("HunyuanVideoPipeline", HunyuanVideoAdapter), ("HunyuanVideo15Pipeline", HunyuanVideo15Adapter),
            ("LTX2Pipeline", LTX2Adapter))
SUPPORTED = tuple(name for name, _ in _BUILTIN)


def adapter_for(pipe) -> Adapter:
    """The adapter of ``pipe``: a plug-in's, else a built-in one by class (subclasses included); ``ValueError``
    naming ``--model`` for any other pipeline."""
    from .models import plugins

    for p in plugins():
        a = p.adapter(pipe)
        if a is not None:
            return a
    builtin = dict(_BUILTIN)
    for c in type(pipe).__mro__:  # the most specific class first
        if c.__name__ in builtin:
            return builtin[c.__name__](pipe)
    raise ValueError(f"model (--model): distillation does not know the pipeline {type(pipe).__name__}; it supports "
                     f"{', '.join(SUPPORTED)} and the shipped small models")


def pil_images(x):
    """``[B, 3, (F,) H, W]`` floats in [0, 1] -> PIL images (videos: frame strips)."""
    from PIL import Image

    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = []
    for a in arr:
        if a.ndim == 4:  # [3, F, H, W]
            out.append(_strip([Image.fromarray(np.ascontiguousarray(f.transpose(1, 2, 0))) for f in a.transpose(1, 0, 2, 3)]))
        else:
            out.append(Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0))))
    return out
