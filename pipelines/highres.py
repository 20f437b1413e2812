"""High-resolution generation: a chain of stages over any loaded diffusers text-to-image (or text-to-video)
pipeline, the way LinFusion and CLEAR reach 2K-16K and FreeSwim 4K video.

A model asked to sample far beyond its training size in one stage breaks (repeated objects, lost colours and
layout).  The chain keeps every stage near sizes the model knows:

1. stage 1 at the model's native size (the target's aspect ratio), text-to-image, full attention unless
   ``first_stage_method`` (or it is the only stage: a target at the native size);
2. each later stage about 2x the previous one (or the given ``stages``) up to the target: the previous result is
   upscaled (pixels, bicubic; or the latents), re-noised to ``strength`` of the schedule and denoised by the
   pipeline's image-to-image counterpart (SDEdit) with the acceleration ``method`` applied.

The image-to-image counterpart comes from diffusers: ``AutoPipelineForImage2Image.from_pipe(pipe)`` (FLUX, SD,
SDXL, SD3 ...), ``WanVideoToVideoPipeline.from_pipe(pipe)`` for Wan; the shipped small pipelines have their own
``image=`` / ``strength=`` path.  The counterpart shares the pipeline's modules, so a method applied once is
applied to both.

Memory options: ``tiled_vae`` (``pipe.vae.enable_tiling()``: tiled decode and encode) and ``cpu_offload``
(``enable_model_cpu_offload()``, accelerate hooks moving one model at a time to the accelerator); both are undone
when the chain returns.  Attention options for the upscaled stages, on top of any method (full attention
included): ``ntk_factor`` (NTK-aware RoPE: the rotary ``theta`` times the factor; FLUX and Wan) and
``proportional_attention`` (the softmax scale of every self-attention grows with the token count as
``sqrt(log(N) / log(N_native))``, CLEAR's proportional attention with the native token count as the base).

    from diffaccel.pipelines import load_pipeline
    from diffaccel.pipelines.highres import generate_highres
    pipe = load_pipeline("small-flux")
    out = generate_highres(pipe, "a red circle on a blue background", height=128, width=128,
                           method="neighborhood", options={"kernel_size": 9})
    out.images[0].save("big.png"); print([(s.height, s.seconds) for s in out.stages])
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["StageInfo", "HighresOutput", "HighresPipeline", "generate_highres", "plan_stages", "default_strengths",
           "native_size", "size_multiple", "MAX_PIXELS", "UPSCALE_MODES", "FREESWIM"]

# The largest target accepted (pixels per frame): 16384 x 16384.  Beyond it no supported model has a use, and a
# typo such as height=1000000 must be an error naming the argument, not an allocation failure after stage 1.
MAX_PIXELS = 16384 * 16384
UPSCALE_MODES = ("pixel", "latent")
FREESWIM = "freeswim"  # the chain-level method for Wan video (diffaccel.pipelines.freeswim)


@dataclass
class StageInfo:
    """One stage of the chain: its size, the denoising steps it ran, its wall-clock seconds, the attention it ran
    with (``"dense"`` or a setting label such as ``"neighborhood:kernel_size=9"``, plus chain-level options) and
    the strength it was re-noised to (``None`` for stage 1)."""

    height: int
    width: int
    steps: int
    seconds: float
    method_label: str
    strength: float | None = None


@dataclass
class HighresOutput:
    """``images`` (PIL images) or, for video pipelines, ``frames`` (one list of PIL frames per video); ``stages``
    (:class:`StageInfo` per stage), ``seconds`` (the whole chain) and ``stage_outputs`` (each stage's images or
    frames, the last one being ``images`` / ``frames``)."""

    images: list | None = None
    frames: list | None = None
    stages: list = field(default_factory=list)
    seconds: float = 0.0
    stage_outputs: list = field(default_factory=list)


# ----------------------------------------------------------------------------- sizes


def _is_small(pipe) -> bool:
    from .small.pipeline import _SmallPipeline

    return isinstance(pipe, _SmallPipeline)


def _denoiser(pipe):
    for name in ("transformer", "unet"):
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            return model
    raise ValueError(f"{type(pipe).__name__} has no transformer or unet: not a diffusers text-to-image pipeline")


def _is_video(pipe) -> bool:
    if _is_small(pipe):
        return bool(pipe._video)
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def _vae_factor(pipe) -> int:
    return int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8)


def native_size(pipe) -> tuple[int, int]:
    """``(height, width)`` the pipeline generates by default: its training size (small pipelines: ``sample_size``;
    FLUX: ``default_sample_size * vae_scale_factor``; UNet pipelines: ``unet.config.sample_size * vae_scale_factor``;
    otherwise the ``height`` / ``width`` defaults of its ``__call__``, e.g. Wan's 480 x 832)."""
    if _is_small(pipe):
        return (int(pipe.config.sample_size),) * 2
    params = inspect.signature(pipe.__call__).parameters
    h, w = (params[n].default if n in params else None for n in ("height", "width"))
    if isinstance(h, int) and isinstance(w, int):
        return h, w
    if getattr(pipe, "default_sample_size", None):
        s = int(pipe.default_sample_size) * _vae_factor(pipe)
        return s, s
    unet = getattr(pipe, "unet", None)
    if unet is not None and isinstance(unet.config.sample_size, int):
        s = int(unet.config.sample_size) * _vae_factor(pipe)
        return s, s
    raise ValueError(f"cannot tell the native size of {type(pipe).__name__}; pass native_size=(height, width)")


def size_multiple(pipe) -> int:
    """Heights and widths of every stage are multiples of this (the VAE factor times the patch size; FLUX packs
    2 x 2 latents into a token)."""
    if _is_small(pipe):
        return int(pipe._size_multiple())
    from diffaccel.families import detect_family

    model = _denoiser(pipe)
    try:
        family = detect_family(model)
    except ValueError:
        family = None
    patch = getattr(model.config, "patch_size", None)
    if family == "flux":
        patch = 2
    elif isinstance(patch, (tuple, list)):
        patch = int(patch[-1])
    return _vae_factor(pipe) * int(patch or 1)


def _round(v, m):
    return max(m, int(round(v / m)) * m)


def plan_stages(native, height, width, multiple=1, stages=None) -> list[tuple[int, int]]:
    """The ``(height, width)`` of every stage.

    Default: stage 1 at the native size with the target's aspect ratio (its larger relative side equal to the
    native one), then ``n = ceil(log2(target / native))`` stages, each scaling by the same factor (2 for
    power-of-two ratios: 32 -> 64 -> 128 -> 256), rounded to ``multiple``.  A target not larger than the native size
    is one stage.  ``stages``: explicit sizes (ints for squares, or ``(height, width)``), non-decreasing in area and
    ending at the target."""
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
        if multiple > 1 and v % multiple:
            raise ValueError(f"{name} must be a multiple of {multiple} for this pipeline, got {v}")
    if height * width > MAX_PIXELS:
        raise ValueError(f"height x width = {height} x {width} exceeds the largest supported size "
                         f"({MAX_PIXELS} pixels, 16384 x 16384)")
    if stages is not None:
        out = []
        try:
            items = list(stages)
        except TypeError:
            raise ValueError(f"stages must be a list of sizes (ints or (height, width)), got {stages!r}") from None
        if not items:
            raise ValueError("stages must hold at least one size")
        for s in items:
            hw = (s, s) if isinstance(s, int) and not isinstance(s, bool) else tuple(s) if isinstance(s, (tuple, list)) else None
            if hw is None or len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                      for v in hw):
                raise ValueError(f"stages entries must be positive ints or (height, width) pairs, got {s!r}")
            if multiple > 1 and any(v % multiple for v in hw):
                raise ValueError(f"stages entry {s!r} is not a multiple of {multiple} (this pipeline's size step)")
            out.append(hw)
        if out[-1] != (height, width):
            raise ValueError(f"the last of stages {out[-1]} must be the target size {(height, width)}")
        if any(a[0] * a[1] > b[0] * b[1] for a, b in zip(out, out[1:])):
            raise ValueError(f"stages must not shrink: {out}")
        return out
    h0, w0 = native
    ratio = max(height / h0, width / w0)
    if ratio <= 1.0001:
        return [(height, width)]
    n = max(1, math.ceil(math.log2(ratio) - 1e-9))
    step = ratio ** (1.0 / n)
    sizes = [(_round(height / step ** (n - i), multiple), _round(width / step ** (n - i), multiple))
             for i in range(n)] + [(height, width)]
    return sizes


def default_strengths(num_upscales: int) -> list[float]:
    """The re-noising strength of each upscale stage by default: 0.5 for the first 2x, 0.4 for the second, 0.3 for
    every later one (the later stages add detail to a picture whose layout is settled)."""
    return [(0.5, 0.4)[i] if i < 2 else 0.3 for i in range(num_upscales)]


# ----------------------------------------------------------------------------- attention options around a method


class _RopeSwap:
    """NTK-aware RoPE for a stage: the denoiser's rotary embedding swapped for one with ``theta * factor``."""

    def __init__(self, model, factor):
        self.model, self.factor, self.attr, self.old, self.new = model, factor, None, None, None
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed
        from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

        for attr in ("pos_embed", "rope"):
            old = getattr(model, attr, None)
            if type(old) is FluxPosEmbed:
                self.attr, self.old = attr, old
                self.new = FluxPosEmbed(theta=old.theta * factor, axes_dim=list(old.axes_dim))
            elif type(old) is WanRotaryPosEmbed:
                self.attr, self.old = attr, old
                patch = old.patch_size
                self.new = WanRotaryPosEmbed(old.attention_head_dim, patch, old.max_seq_len,
                                             theta=10000.0 * factor).to(old.freqs_cos.device)
        if self.attr is None:
            raise ValueError(f"ntk_factor scales rotary position embeddings; {type(model).__name__} has none that "
                             "diffaccel knows (FLUX's FluxPosEmbed, Wan's WanRotaryPosEmbed); leave ntk_factor=1")

    def __enter__(self):
        setattr(self.model, self.attr, self.new)
        return self

    def __exit__(self, *exc):
        setattr(self.model, self.attr, self.old)


def _query_modules(model):
    """The modules whose outputs are the queries of every self-attention layer (scaling them scales q.k):
    ``norm_q`` / ``norm_added_q`` where the layer normalises its queries, else ``to_q`` / ``add_q_proj``."""
    from diffaccel.families import detect_family, self_attention_layers

    mods = []
    for _, attn in self_attention_layers(model, detect_family(model)):
        for norm, proj in (("norm_q", "to_q"), ("norm_added_q", "add_q_proj")):
            m = getattr(attn, norm, None)
            m = m if isinstance(m, torch.nn.Module) else getattr(attn, proj, None)
            if isinstance(m, torch.nn.Module):
                mods.append(m)
    return mods


class _ProportionalAttention:
    """Proportional attention for a stage ``ratio`` times the native area: every self-attention query is scaled by
    ``sqrt(log(N) / log(N / ratio))``, N the call's query count, so the softmax scale becomes
    ``sqrt(log_base(N) / D)`` with ``base`` the native count (CLEAR's rule; text tokens count with the image tokens
    where the layer joins them).  Forward hooks on the query modules; removed on exit."""

    def __init__(self, model, ratio):
        self.ratio = float(ratio)
        self.modules = _query_modules(model)
        if not self.modules:
            raise ValueError(f"proportional_attention: no self-attention queries found in {type(model).__name__}")
        self.handles = []

    def factor(self, n):
        base = n / self.ratio
        return math.sqrt(math.log(n) / math.log(base)) if base > 1.5 and self.ratio > 1 else 1.0

    def _hook(self, module, args, out):
        if not isinstance(out, torch.Tensor) or out.dim() < 3:
            return None
        f = self.factor(out.shape[1])
        return out if f == 1.0 else out * f

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------- pipeline adapters


def _to_pil(x):
    """``[B, 3, H, W]`` in [0, 1] -> PIL images; ``[B, 3, F, H, W]`` -> lists of PIL frames."""
    arr = np.rint(x.clamp(0, 1).float().cpu().numpy() * 255).astype(np.uint8)
    if arr.ndim == 4:
        return [Image.fromarray(a.transpose(1, 2, 0)) for a in arr]
    return [[Image.fromarray(f) for f in v.transpose(1, 2, 3, 0)] for v in arr]


def _resize_tensor(x, h, w, antialias=True):
    video = x.dim() == 5
    if video:
        n, c, f = x.shape[:3]
        x = x.movedim(2, 1).reshape(n * f, c, *x.shape[-2:])
    x = F.interpolate(x.float(), size=(h, w), mode="bicubic", antialias=antialias, align_corners=False)
    if video:
        x = x.reshape(n, f, c, h, w).movedim(1, 2)
    return x


class _Adapter:
    """How the chain drives one kind of pipeline: ``first`` (text-to-image at stage 1) and ``refine`` (upscale the
    previous output, image-to-image); outputs in the adapter's own form, ``public`` turns one into PIL."""

    video = False

    def __init__(self, pipe, upscale):
        self.pipe = pipe
        self.upscale = upscale
        self.i2i = pipe

    def pipes(self):
        """The pipelines the chain calls (text-to-image and image-to-image)."""
        return [self.pipe, self.i2i]

    @staticmethod
    def steps(num_inference_steps, strength):
        """Denoising steps of a stage: all of them at stage 1, the last ``strength`` part after (diffusers' rule)."""
        if strength is None:
            return num_inference_steps
        init = min(num_inference_steps * strength, num_inference_steps)
        return num_inference_steps - int(max(num_inference_steps - init, 0))


class _SmallAdapter(_Adapter):
    """The shipped small pipelines: pixel space (no VAE), their own image-to-image path; stages pass float tensors."""

    def __init__(self, pipe, upscale):
        super().__init__(pipe, upscale)
        self.video = bool(pipe._video)

    def first(self, prompts, h, w, steps, generators, kwargs):
        kwargs.pop("_last", None)
        r = self.pipe(prompts, height=h, width=w, num_inference_steps=steps, generator=generators,
                      output_type="pt", **kwargs)
        return r.frames if self.video else r.images

    def refine(self, prev, prompts, h, w, steps, strength, generators, kwargs):
        kwargs.pop("_last", None)
        image = _resize_tensor(prev, h, w).clamp(0, 1)
        r = self.pipe(prompts, image=image, strength=strength, height=h, width=w, num_inference_steps=steps,
                      generator=generators, output_type="pt", **kwargs)
        return r.frames if self.video else r.images

    def public(self, out):
        return _to_pil(out)


class _DiffusersImageAdapter(_Adapter):
    """A diffusers text-to-image pipeline; image-to-image from ``AutoPipelineForImage2Image.from_pipe``.  Stages pass
    ``"pt"`` images in [0, 1] (pixel upscaling) or latents (``upscale="latent"``; SD-style 4-D latents and FLUX's
    packed ones)."""

    def __init__(self, pipe, upscale):
        super().__init__(pipe, upscale)
        from diffusers import AutoPipelineForImage2Image

        try:
            self.i2i = AutoPipelineForImage2Image.from_pipe(pipe)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{type(pipe).__name__} has no image-to-image counterpart in diffusers "
                             f"(AutoPipelineForImage2Image.from_pipe: {e}); the chain needs one") from None
        self.i2i.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        self.flux = type(_denoiser(pipe)).__name__ == "FluxTransformer2DModel"
        if upscale == "latent" and not self.flux and getattr(pipe, "unet", None) is None:
            raise ValueError(f"upscale='latent' supports UNet (SD, SDXL) and FLUX pipelines, not "
                             f"{type(pipe).__name__}; use upscale='pixel'")

    def _latent(self, out, h, w):
        if self.flux:  # packed [B, S, C*4] -> [B, C, H/8, W/8]
            return self.pipe._unpack_latents(out, h, w, self.pipe.vae_scale_factor)
        return out

    def first(self, prompts, h, w, steps, generators, kwargs):
        last = kwargs.pop("_last", False)
        kind = "latent" if self.upscale == "latent" and not last else "pt"
        r = self.pipe(prompts, height=h, width=w, num_inference_steps=steps, generator=generators,
                      output_type=kind, **kwargs)
        return (kind, h, w, self._latent(r.images, h, w) if kind == "latent" else r.images)

    def refine(self, prev, prompts, h, w, steps, strength, generators, kwargs):
        last = kwargs.pop("_last", False)
        kind, ph, pw, x = prev
        if kind == "latent":
            lh, lw = x.shape[-2] * h // ph, x.shape[-1] * w // pw
            image = F.interpolate(x.float(), size=(lh, lw), mode="bicubic", align_corners=False).to(x.dtype)
        else:
            image = _resize_tensor(x, h, w).clamp(0, 1)
        out_kind = "latent" if self.upscale == "latent" and not last else "pt"
        r = self.i2i(prompts, image=image, strength=strength, height=h, width=w, num_inference_steps=steps,
                     generator=generators, output_type=out_kind, **kwargs)
        return (out_kind, h, w, self._latent(r.images, h, w) if out_kind == "latent" else r.images)

    def public(self, out):
        kind, h, w, x = out
        if kind == "latent":  # only intermediate stages are latents
            return None
        return _to_pil(x)


class _DiffusersVideoAdapter(_Adapter):
    """A diffusers Wan text-to-video pipeline; video-to-video from ``WanVideoToVideoPipeline.from_pipe``.  Stages pass
    lists of PIL frames (one video per call)."""

    video = True

    def __init__(self, pipe, upscale):
        super().__init__(pipe, upscale)
        if upscale != "pixel":
            raise ValueError("upscale='latent' is not supported for video pipelines; use upscale='pixel'")
        from diffusers import WanVideoToVideoPipeline as cls

        if type(_denoiser(pipe)).__name__ != "WanTransformer3DModel":
            raise ValueError(f"the video chain supports Wan pipelines; {type(pipe).__name__} is not one")
        # the pipeline's own modules, as WanVideoToVideoPipeline.from_pipe(pipe) passes them, without the
        # from_pipe(...) cast of every shared module to one dtype (float32 unless given): that would change the
        # user's pipeline (a bf16 transformer beside an fp32 VAE, as Wan is run)
        expected, _ = cls._get_signature_keys(cls)
        missing = [k for k in expected if k not in pipe.components and k not in cls._optional_components]
        if missing:
            raise ValueError(f"{type(pipe).__name__} lacks {missing} for WanVideoToVideoPipeline")
        self.i2i = cls(**{k: pipe.components[k] for k in expected if k in pipe.components})
        self.i2i.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))

    def first(self, prompts, h, w, steps, generators, kwargs):
        kwargs.pop("_last", None)
        videos = []
        for p, g in zip(prompts, generators):
            videos += self.pipe(p, height=h, width=w, num_inference_steps=steps, generator=g, output_type="pil",
                                **kwargs).frames
        return videos

    def refine(self, prev, prompts, h, w, steps, strength, generators, kwargs):
        kwargs.pop("_last", None)
        kwargs.pop("num_frames", None)  # the input video's length
        videos = []
        for video, p, g in zip(prev, prompts, generators):
            frames = [f.resize((w, h), Image.BICUBIC) for f in video]
            videos += self.i2i(video=frames, prompt=p, height=h, width=w, strength=strength,
                               num_inference_steps=steps, generator=g, output_type="pil", **kwargs).frames
        return videos

    def public(self, out):
        return [list(v) for v in out]


def _adapter(pipe, upscale):
    if _is_small(pipe):
        return _SmallAdapter(pipe, upscale)
    if _is_video(pipe):
        return _DiffusersVideoAdapter(pipe, upscale)
    params = inspect.signature(pipe.__call__).parameters
    if "image" in params or "video" in params:
        raise ValueError(f"pipe must be a text-to-image pipeline; {type(pipe).__name__} takes an input image")
    return _DiffusersImageAdapter(pipe, upscale)


# ----------------------------------------------------------------------------- checks


def _check_number(name, value, lo, hi, lo_open=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= lo if lo_open else value < lo) or value > hi:
        raise ValueError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return float(value)


def _per_stage(name, value, n, check):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} stage(s)")
        return [check(name, v) for v in value]
    return [check(name, value)] * n


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _resolve_setting(pipe, method, options):
    """``(method, options, label)`` with a small model's default options for a method given without any, and
    shipped folder names in option values resolved (e.g. ``weights="small-unet-linfusion"``)."""
    from .small.evaluate import Setting, default_settings, resolve_options

    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be 'dense', {FREESWIM!r} or a diffaccel method name, got {method!r}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"options must be a dict of method options, got {type(options).__name__}")
    opts = dict(options or {})
    if method == "dense":
        if opts:
            raise ValueError("method 'dense' (full attention) takes no options")
        return method, {}, "dense"
    if method == FREESWIM:
        return method, opts, Setting(method, opts).label
    if not opts and _is_small(pipe):
        defaults = [s for s in default_settings(pipe) if s.method == method]
        if defaults:
            opts = dict(defaults[0].options)
    return method, resolve_options(opts), Setting(method, opts).label


def _check_method(pipe, adapter, method, options):
    """Everything about ``method`` that can fail, checked before any stage runs: a diffaccel method is applied and
    removed once (its options, the family, the layers, weights files); FreeSwim's options are built."""
    if method == "dense":
        return
    if method == FREESWIM:
        from .freeswim import FreeSwim

        if not adapter.video:
            raise ValueError(f"method {FREESWIM!r} is for Wan video pipelines, not {type(pipe).__name__}")
        FreeSwim(pipe, **options)  # validates the options
        return
    import diffaccel

    diffaccel.apply(pipe, method, **options)
    diffaccel.remove(pipe)


@contextlib.contextmanager
def _memory_options(adapter, tiled_vae, cpu_offload):
    """Tiled VAE and model CPU offload for the chain's pipelines; both undone on exit (the pipeline back on the
    device it was on)."""
    vae = getattr(adapter.pipe, "vae", None)
    was_tiled = bool(getattr(vae, "use_tiling", False))
    device = _denoiser(adapter.pipe).device
    pipes = list({id(p): p for p in adapter.pipes()}.values())
    try:
        if tiled_vae and not was_tiled:
            vae.enable_tiling()
        if cpu_offload:
            for p in pipes:
                p.enable_model_cpu_offload()
        yield
    finally:
        if tiled_vae and not was_tiled:
            vae.disable_tiling()
        if cpu_offload:
            for p in pipes:
                p.remove_all_hooks()
            adapter.pipe.to(device)


def _stage_attention(adapter, ratio, ntk_factor, proportional):
    stack = contextlib.ExitStack()
    if ratio > 1.0001:
        model = _denoiser(adapter.pipe)
        if ntk_factor != 1.0:
            stack.enter_context(_RopeSwap(model, ntk_factor))
        if proportional:
            stack.enter_context(_ProportionalAttention(model, ratio))
    return stack


# ----------------------------------------------------------------------------- the chain


def generate_highres(pipe, prompt, *, height, width, method="dense", options=None, first_stage_method=False,
                     stages=None, strength=None, num_inference_steps=20, seed=0, guidance_scale=None,
                     negative_prompt=None, num_frames=None, step_callback=None, tiled_vae=False, cpu_offload=False,
                     upscale="pixel", ntk_factor=1.0, proportional_attention=False, native_size=None,
                     num_images=1, pipeline_kwargs=None) -> HighresOutput:
    """Generate ``prompt`` at ``height`` x ``width`` through the chain of stages (module docstring).

    Args:
        pipe: a loaded text-to-image pipeline (FLUX, SD/SDXL, SD3 ... via ``AutoPipelineForImage2Image``), a Wan
            text-to-video pipeline, or a shipped small pipeline (``diffaccel.pipelines.load_pipeline``).
        prompt: a prompt or a list of prompts.
        height, width: the target size (a multiple of :func:`size_multiple`, at most :data:`MAX_PIXELS`).
        method, options: ``"dense"`` (full attention), a diffaccel method (``"neighborhood"``, ``"clear"``, ...) with
            its options dict (small pipelines: the method's default setting when ``options`` is empty), or
            ``"freeswim"`` (Wan video: :class:`~diffaccel.pipelines.freeswim.FreeSwim`'s dual path; its options).
        first_stage_method: apply the method to stage 1 too (default: stage 1 runs full attention, unless it is
            the only stage: a target at the native size gets the method).
        stages: explicit stage sizes (see :func:`plan_stages`); default native size, then 2x steps.
        strength: the re-noising strength of each upscale stage (a number, or one per upscale stage); default
            :func:`default_strengths`.
        num_inference_steps: the schedule length of each stage (an int, or one per stage); an upscale stage runs its
            last ``strength`` part (``int(steps * strength)`` steps, diffusers' img2img rule).
        seed: an int or one int per prompt (several prompts or images from one int: ``seed``, ``seed + 1``, ...);
            stage 1 draws its noise from ``seed`` (as the pipeline called alone would), stage ``i`` from
            ``seed + 7919 i``.
        guidance_scale, negative_prompt, num_frames: passed to every stage (``None``: the pipeline's default).
        step_callback: ``step_callback(stage_index, num_stages, step, steps_in_stage)`` after every denoising step
            of every stage (``stage_index`` from 0, ``step`` from 1 to ``steps_in_stage``).
        tiled_vae: tiled VAE decode/encode (pipelines with a VAE that has ``enable_tiling``).
        cpu_offload: accelerate's model CPU offload (needs an accelerator).
        upscale: ``"pixel"`` (decode, bicubic, encode again) or ``"latent"`` (bicubic on the latents; FLUX and
            UNet pipelines).
        ntk_factor, proportional_attention: NTK-aware RoPE and proportional attention on the upscaled stages, for
            any method (module docstring).
        native_size: override the native size ``(height, width)`` (default :func:`native_size`).
        num_images: samples per prompt.
        pipeline_kwargs: more keyword arguments for every stage's pipeline call (e.g. ``max_sequence_length``).

    Every argument is checked (``ValueError`` naming it) before the first stage runs; the method, the chain-level
    options and the memory options are undone when the call returns, also on error.
    """
    t_start = time.perf_counter()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    num_images = _positive_int("num_images", num_images)
    prompts = [p for p in prompts for _ in range(num_images)]
    if isinstance(seed, (list, tuple)):
        seeds = [int(s) for s in seed if isinstance(s, int) and not isinstance(s, bool)]
        if len(seeds) != len(seed) or len(seeds) * num_images != len(prompts):
            raise ValueError(f"seed must be an int or one int per prompt, got {seed!r}")
        seeds = [s for s in seeds for _ in range(num_images)]
    elif isinstance(seed, int) and not isinstance(seed, bool):
        seeds = [seed + i for i in range(len(prompts))] if len(prompts) > 1 else [seed]
    else:
        raise ValueError(f"seed must be an int or a list of ints, got {seed!r}")
    if pipeline_kwargs is not None and not isinstance(pipeline_kwargs, dict):
        raise ValueError(f"pipeline_kwargs must be a dict, got {type(pipeline_kwargs).__name__}")
    reserved = {"prompt", "image", "video", "height", "width", "strength", "num_inference_steps", "generator",
                "output_type", "callback_on_step_end", "guidance_scale", "negative_prompt", "num_frames"}
    clash = sorted(reserved & set(pipeline_kwargs or {}))
    if clash:
        raise ValueError(f"pipeline_kwargs must not set {clash}: the chain sets them (use its own arguments)")
    if upscale not in UPSCALE_MODES:
        raise ValueError(f"upscale must be one of {UPSCALE_MODES}, got {upscale!r}")
    for name, v in (("first_stage_method", first_stage_method), ("tiled_vae", tiled_vae),
                    ("cpu_offload", cpu_offload), ("proportional_attention", proportional_attention)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be a bool, got {v!r}")
    ntk_factor = _check_number("ntk_factor", ntk_factor, 0, 1e6)
    if step_callback is not None and not callable(step_callback):
        raise ValueError("step_callback must be callable or None")
    if guidance_scale is not None:
        guidance_scale = _check_number("guidance_scale", guidance_scale, 0, 1e4, lo_open=False)
    if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
        raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
    video = _is_video(pipe)
    if num_frames is not None:
        if not video:
            raise ValueError(f"num_frames is for video pipelines; {type(pipe).__name__} generates images")
        _positive_int("num_frames", num_frames)
    if native_size is None:
        native = globals()["native_size"](pipe)
    else:
        native = (native_size, native_size) if isinstance(native_size, int) else tuple(native_size)
        if len(native) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in native):
            raise ValueError(f"native_size must be a positive int or (height, width), got {native_size!r}")
    sizes = plan_stages(native, height, width, size_multiple(pipe), stages)
    n = len(sizes)
    steps = _per_stage("num_inference_steps", num_inference_steps, n, _positive_int)
    if strength is None:
        strengths = default_strengths(n - 1)
    else:
        strengths = _per_stage("strength", strength, n - 1, lambda nm, v: _check_number(nm, v, 0, 1))
    for i, s in enumerate(strengths, start=1):
        if int(steps[i] * s) < 1:  # no pipeline's img2img rule runs a step then (SD: int(N * s); FLUX: more)
            raise ValueError(f"strength {s} of num_inference_steps {steps[i]} leaves stage {i + 1} no denoising step")
    method, options, label = _resolve_setting(pipe, method, options)
    if method == "clear" and (ntk_factor != 1.0 or proportional_attention) and (
            options.get("ntk_factor", 1.0) != 1.0 or options.get("proportional_attention", False)):
        raise ValueError("give ntk_factor / proportional_attention either to the chain or in clear's options, "
                         "not both")
    if tiled_vae and not hasattr(getattr(pipe, "vae", None), "enable_tiling"):
        raise ValueError(f"tiled_vae: {type(pipe).__name__} has no VAE with enable_tiling() (pixel-space models "
                         "have nothing to tile)")
    if cpu_offload:
        from diffusers.utils.torch_utils import get_device

        if get_device() == "cpu":
            raise ValueError("cpu_offload needs an accelerator (CUDA, XPU, MPS ...); none is available")
    adapter = _adapter(pipe, upscale)
    if ntk_factor != 1.0 and n > 1:
        _RopeSwap(_denoiser(pipe), ntk_factor)  # raises for models without a known rotary embedding
    if proportional_attention and n > 1:
        _ProportionalAttention(_denoiser(pipe), 2.0)
    _check_method(pipe, adapter, method, options)

    extra = dict(pipeline_kwargs or {})
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    if negative_prompt is not None:
        extra["negative_prompt"] = negative_prompt
    if num_frames is not None:
        extra["num_frames"] = num_frames
    chain_label = "".join([f"+ntk{ntk_factor:g}" if ntk_factor != 1.0 else "",
                           "+proportional" if proportional_attention else ""])

    infos, outputs = [], []
    native_area = native[0] * native[1]
    with contextlib.ExitStack() as applied, _memory_options(adapter, tiled_vae, cpu_offload):
        prev, method_on = None, False
        for i, (h, w) in enumerate(sizes):
            use_method = method != "dense" and (i > 0 or first_stage_method or len(sizes) == 1)
            if use_method and not method_on:
                applied.enter_context(_method_context(adapter, method, options))
                method_on = True
            ratio = h * w / native_area
            stage_label = (label if use_method else "dense") + (chain_label if ratio > 1.0001 else "")
            strength_i = strengths[i - 1] if i else None
            expected = adapter.steps(steps[i], strength_i)
            kwargs = dict(extra, _last=(i == n - 1))
            counter = _callback(step_callback, i, n, expected)
            kwargs["callback_on_step_end"] = counter
            gens = [torch.Generator().manual_seed((s + 7919 * i) % 2 ** 63) for s in seeds]
            t0 = time.perf_counter()
            with _stage_attention(adapter, ratio, ntk_factor, proportional_attention):
                if i == 0:
                    prev = adapter.first(prompts, h, w, steps[i], gens, kwargs)
                else:
                    prev = adapter.refine(prev, prompts, h, w, steps[i], strength_i, gens, kwargs)
            _sync(pipe)
            seconds = time.perf_counter() - t0
            infos.append(StageInfo(h, w, counter.steps, seconds, stage_label, strength_i))
            outputs.append(adapter.public(prev))
    result = outputs[-1]
    total = time.perf_counter() - t_start
    if adapter.video:
        return HighresOutput(frames=result, stages=infos, seconds=total, stage_outputs=outputs)
    return HighresOutput(images=result, stages=infos, seconds=total, stage_outputs=outputs)


@contextlib.contextmanager
def _method_context(adapter, method, options):
    if method == FREESWIM:
        from .freeswim import FreeSwim

        with FreeSwim(adapter.pipe, **options):
            yield
        return
    import diffaccel

    diffaccel.apply(adapter.pipe, method, **options)
    try:
        yield
    finally:
        diffaccel.remove(adapter.pipe)


class _callback:
    """The ``callback_on_step_end`` of one stage: counts the steps the pipeline runs and reports them to the user's
    ``step_callback(stage, num_stages, step, steps_in_stage)`` (``steps_in_stage``: the pipeline's own count,
    ``_num_timesteps``, where it keeps one)."""

    def __init__(self, step_callback, stage, num_stages, expected):
        self.step_callback, self.stage, self.num_stages, self.expected = step_callback, stage, num_stages, expected
        self.steps = 0

    def __call__(self, pipe, i, t, callback_kwargs):
        self.steps += 1
        if self.step_callback is not None:
            total = getattr(pipe, "_num_timesteps", None) or self.expected
            self.step_callback(self.stage, self.num_stages, self.steps, int(total))
        return callback_kwargs


def _sync(pipe):
    try:
        device = _denoiser(pipe).device
    except ValueError:
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HighresPipeline:
    """:func:`generate_highres` bound to a pipeline: ``HighresPipeline(pipe)(prompt, height=..., width=...,
    method=..., ...)`` returns a :class:`HighresOutput`.  ``pipe`` stays usable as it was."""

    def __init__(self, pipe, **defaults):
        self.pipe = pipe
        self.defaults = defaults

    def __call__(self, prompt, **kwargs):
        return generate_highres(self.pipe, prompt, **{**self.defaults, **kwargs})
