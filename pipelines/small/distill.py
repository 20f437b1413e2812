"""The small models' plug-in for ``diffaccel distill`` (the ``diffaccel.models`` entry-point group).

It resolves the shipped names (``small-flux``, ``small-unet``, ``small-wan``) and folders holding a small
pipeline, drives them for distillation (:class:`SmallAdapter`: pixel-space flow matching through the pipelines'
own ``encode_prompt`` and ``predict``) and gives their default prompt set: captions of the shapes dataset
(video captions, with motion words, for small-wan).
"""
from __future__ import annotations

import torch

from diffaccel.distill.adapters import FlowAdapter, pil_images

from .shapes import caption_for, sample_spec
from .pipeline import SMALL_MODELS, _SmallPipeline, load_small, resolve_small

__all__ = ["SmallAdapter", "PLUGIN", "default_prompts"]

PROMPT_SEED = 1000  # the shapes-dataset seed of the default prompts (not the training data's)


class SmallAdapter(FlowAdapter):
    """A small pipeline: pixels in [-1, 1] are the latents (no VAE), ``sigma`` shifted by the scheduler's
    ``shift`` (1 for the image models, 3 for Wan), conditioning ``{"text", "pooled"}`` of the tiny CLIP."""

    denoiser_attr = "denoiser"
    default_guidance = 4.0

    @property
    def video(self):
        return bool(self.pipe._video)

    def default_size(self):
        s = int(self.pipe.config.sample_size)
        size = {"height": s, "width": s}
        if self.video:
            size["num_frames"] = int(self.pipe.config.num_frames)
        return size

    def size_multiple(self):
        return self.pipe._size_multiple()

    def check_size(self, size):
        size = super().check_size(size)
        if self.video:
            self.pipe._check_frames(size["num_frames"])
        return size

    def encode_prompts(self, prompts):
        text, pooled = self.pipe.encode_prompt(list(prompts))
        return {"text": text, "pooled": pooled}

    def generate(self, prompts, cond, uncond, generators, size, *, steps, guidance, output_type="latent"):
        extra = {"num_frames": size["num_frames"]} if self.video else {}
        out = self.pipe(list(prompts), height=size["height"], width=size["width"], num_inference_steps=steps,
                        guidance_scale=guidance, generator=list(generators), output_type="pt", **extra)
        x = out.frames if self.video else out.images  # [B, 3, (F,) H, W] in [0, 1]
        return x * 2 - 1 if output_type == "latent" else pil_images(x)

    def encode_images(self, images, size):
        x = images * 2 - 1
        return x.unsqueeze(2) if self.video else x

    def forward(self, call, x, t, cond, size):
        x, text, pooled = self._cast(x, cond["text"], cond["pooled"])
        return self.pipe.predict(x, t.to(x.dtype), text, pooled, denoiser=call)


def default_prompts(pipe, num, seed=0):
    """``num`` captions of the shapes dataset (seed ``PROMPT_SEED + seed``), video captions for video pipelines."""
    video = bool(getattr(pipe, "_video", False))
    out = []
    for i in range(int(num)):
        shapes, background, _ = sample_spec(PROMPT_SEED + int(seed), i, video=video)
        out.append(caption_for(shapes, background, video=video))
    return out


class _SmallModels:
    names = tuple(SMALL_MODELS)

    def load(self, name_or_path, *, device="cpu", dtype=None):
        if resolve_small(name_or_path) is None:
            return None
        return load_small(name_or_path, device=device, dtype=dtype or torch.float32)

    def adapter(self, pipe):
        return SmallAdapter(pipe) if isinstance(pipe, _SmallPipeline) else None

    def default_prompts(self, pipe, num, seed=0):
        return default_prompts(pipe, num, seed)


PLUGIN = _SmallModels()
