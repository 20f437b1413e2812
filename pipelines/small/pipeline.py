"""Small text-to-image / text-to-video pipelines on real diffusers architectures, trained here.

Three ``DiffusionPipeline`` subclasses, each a real diffusers denoiser at small size,
a tiny ``transformers`` ``CLIPTextModel`` (random init, trained jointly with the
denoiser) with a word-level tokenizer (``tokenizers`` WordLevel, saved as
``tokenizer.json``), and diffusers' ``FlowMatchEulerDiscreteScheduler``:

=================  ===========================  ==========================================
pipeline           denoiser                     sample space
=================  ===========================  ==========================================
SmallFluxPipeline  ``FluxTransformer2DModel``   RGB pixels, 2x2 patches packed into tokens
                                                (as FluxPipeline packs its latents)
SmallUNetPipeline  ``UNet2DConditionModel``     RGB pixels, 2x2 space-to-depth (12 channels)
SmallWanPipeline   ``WanTransformer3DModel``    RGB video ``[3, F, H, W]`` (patch (1, 4, 4))
=================  ===========================  ==========================================

The "latent space" is lossless pixel packing (pixels in ``[-1, 1]``): no VAE.
Height and width may be any multiple of 2 (FLUX), of the spatial patch size (Wan) or of
``2 * 2**(levels-1)`` (UNet), so methods can be evaluated at 2x and 4x the native size.

Flow matching (rectified flow), the convention of diffusers' flow schedulers:
``x_sigma = (1 - sigma) * x0 + sigma * noise``, the denoiser predicts
``v = noise - x0``, and the Euler sampler walks ``sigma`` from 1 to 0.
:meth:`predict` (one denoiser call on pixels) is shared by sampling and by training
(:mod:`diffaccel.pipelines.small.train`).

Shipped models live in ``pipelines/small/models/<name>`` (:data:`SMALL_MODELS`)::

    from diffaccel.pipelines.small import load_small
    pipe = load_small("small-flux")
    image = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0)).images[0]
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import BaseOutput
from PIL import Image

from .shapes import VOCAB

__all__ = [
    "MODELS_DIR",
    "SMALL_MODELS",
    "SmallFluxPipeline",
    "SmallUNetPipeline",
    "SmallWanPipeline",
    "SmallVideoOutput",
    "build_tokenizer",
    "build_text_encoder",
    "build_pipeline",
    "is_patch_size",
    "repatch_wan",
    "load_small",
    "resolve_small",
    "DEFAULT_CONFIGS",
]

MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
# name -> pipeline class name; the folders are MODELS_DIR/<name>
SMALL_MODELS = {
    "small-flux": "SmallFluxPipeline",
    "small-unet": "SmallUNetPipeline",
    "small-wan": "SmallWanPipeline",
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
MAX_TEXT_LEN = 20

# Architectures of the shipped models (build_pipeline(kind, **overrides) changes any entry).
DEFAULT_CONFIGS = {
    "flux": dict(
        transformer=dict(patch_size=1, in_channels=12, out_channels=12, num_layers=2, num_single_layers=4,
                         attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                         pooled_projection_dim=64, axes_dims_rope=(8, 12, 12)),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        sample_size=32,
    ),
    "unet": dict(
        # attention_head_dim is the number of heads per level in UNet2DConditionModel (diffusers' legacy name)
        unet=dict(sample_size=16, in_channels=12, out_channels=12, block_out_channels=(48, 96, 96),
                  layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=64, attention_head_dim=(2, 4, 4), norm_num_groups=16),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        sample_size=32,
    ),
    "wan": dict(
        transformer=dict(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=3,
                         out_channels=3, text_dim=64, freq_dim=64, ffn_dim=384, num_layers=6,
                         cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=256),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        sample_size=32,
        num_frames=4,
        # noise-level shift of training and sampling, as Wan's flow_shift: without it the 4 correlated frames
        # make mid-noise denoising easy and the cross-attention (Wan's only text path) learned nothing in 3,000
        # steps; with it the text is used within a few hundred steps (docs/small-models.md)
        shift=3.0,
    ),
}


# ----------------------------------------------------------------------------- text


def build_tokenizer(words=VOCAB, max_length: int = MAX_TEXT_LEN):
    """A word-level ``PreTrainedTokenizerFast``: lowercase, whitespace/punctuation split, ``[BOS] ... [EOS]``,
    unknown words -> ``[UNK]``, padded to ``max_length``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]",
        model_max_length=max_length, padding_side="right",
    )


def build_text_encoder(tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                       seed: int = 0):
    """A tiny randomly initialised ``CLIPTextModel`` for ``tokenizer`` (trained with the denoiser)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        projection_dim=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


# ----------------------------------------------------------------------------- pipelines


@dataclass
class SmallVideoOutput(BaseOutput):
    """``frames``: per video a list of PIL frames (``"pil"``), ``[B, F, H, W, 3]`` floats in [0, 1] (``"np"``)
    or ``[B, 3, F, H, W]`` in [0, 1] (``"pt"``)."""

    frames: object


def _pack2x2(x):
    """``[B, C, H, W]`` -> ``[B, 4C, H/2, W/2]`` (channel order c, dy, dx)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def _unpack2x2(x):
    b, c4, h, w = x.shape
    c = c4 // 4
    return x.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * 2, w * 2)


class _SmallPipeline(DiffusionPipeline):
    """Shared text encoding, sampling loop and output conversion."""

    model_cpu_offload_seq = "text_encoder->denoiser"
    _video = False

    def _init_common(self, sample_size):
        self.register_to_config(sample_size=int(sample_size))

    # -- hooks for subclasses
    @property
    def denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    def predict(self, x, sigma, text, pooled):  # pragma: no cover - abstract
        """One denoiser call: ``x`` pixels (``[B, 3, H, W]`` or ``[B, 3, F, H, W]``), ``sigma`` ``[B]`` in
        [0, 1], text states ``[B, L, D]`` and pooled text ``[B, D]`` -> velocity, the shape of ``x``."""
        raise NotImplementedError

    def _size_multiple(self) -> int:
        return 2

    # -- text
    def encode_prompt(self, prompts, device=None):
        """``(states [B, L, D], pooled [B, D])`` of a list of prompts (``""`` is the unconditional prompt)."""
        device = device or self.denoiser.device
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        out = self.text_encoder(input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device))
        dtype = self.denoiser.dtype
        return out.last_hidden_state.to(dtype), out.pooler_output.to(dtype)

    def _check_multiple(self, name, value, m, why=""):
        """``value`` if it is an int and a positive multiple of ``m``, else a ValueError naming ``name``."""
        if isinstance(value, bool) or not isinstance(value, int) or value < m or value % m:
            raise ValueError(f"{name} must be a positive multiple of {m}{why} for {type(self).__name__}, got {value!r}")
        return value

    def _check_size(self, height, width):
        m = self._size_multiple()
        for name, v in (("height", height), ("width", width)):
            self._check_multiple(name, v, m)

    def _noise_shape(self, batch, height, width, num_frames):
        return (batch, 3, height, width)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **kwargs,
    ):
        """Generate from ``prompt``.  ``height``/``width`` default to the native ``sample_size``;
        ``guidance_scale > 1`` runs classifier-free guidance against ``negative_prompt`` (default ``""``)
        in one batched call per step.  ``latents``: the initial noise (pixels, ``sigma = 1``).
        ``output_type``: ``"pil"``, ``"np"`` or ``"pt"`` (floats in [0, 1])."""
        num_frames = kwargs.pop("num_frames", None)
        if kwargs:
            raise TypeError(f"unexpected argument(s) {sorted(kwargs)}")
        if not self._video and num_frames is not None:
            raise TypeError(f"{type(self).__name__} generates images; num_frames is for video pipelines")
        if self._video:
            num_frames = self._check_frames(self.config.num_frames if num_frames is None else num_frames)
        height = height or self.config.sample_size
        width = width or self.config.sample_size
        self._check_size(height, width)
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        device = self.denoiser.device
        dtype = self.denoiser.dtype
        cfg = guidance_scale > 1.0
        if cfg:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * len(prompts) if isinstance(neg, str) else [n for n in neg for _ in range(num_images_per_prompt)]
            if len(negs) != batch:
                raise ValueError(f"negative_prompt has {len(negs)} entries for {batch} prompts")
            text, pooled = self.encode_prompt(prompts + negs, device)
        else:
            text, pooled = self.encode_prompt(prompts, device)

        shape = self._noise_shape(batch, height, width, num_frames)
        if latents is None:
            if isinstance(generator, list):
                x = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
            else:
                x = torch.randn(shape, generator=generator, dtype=torch.float32)
        else:
            x = latents.float().cpu()
            if tuple(x.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(x.shape)}")
        x = x.to(device)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            sigma = (t / self.scheduler.config.num_train_timesteps).to(dtype)
            xin = torch.cat([x, x]) if cfg else x
            v = self.predict(xin.to(dtype), sigma.expand(xin.shape[0]), text, pooled).float()
            if cfg:
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance_scale * (v_cond - v_uncond)
            x = self.scheduler.step(v, t, x, return_dict=False)[0]

        out = (x.clamp(-1, 1) + 1) / 2
        return self._output(out.cpu(), output_type, return_dict)

    def _output(self, out, output_type, return_dict):
        if output_type == "pt":
            images = out
        else:
            arr = out.movedim(1, -1).numpy()  # [B, H, W, 3]
            images = arr if output_type == "np" else [Image.fromarray(np.rint(a * 255).astype(np.uint8)) for a in arr]
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class SmallFluxPipeline(_SmallPipeline):
    """Text-to-image with a small ``FluxTransformer2DModel`` on 2x2-packed RGB pixels (native 32x32 pixels,
    16x16 tokens).  Text: a tiny ``CLIPTextModel``'s states (``encoder_hidden_states``) and pooled output
    (``pooled_projections``); ``txt_ids`` zeros and ``img_ids`` ``(0, row, col)`` as FluxPipeline."""

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, sample_size: int = 32):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        self._init_common(sample_size)
        self._ids_cache = {}

    @property
    def denoiser(self):
        return self.transformer

    def _img_ids(self, h, w, device):
        key = (h, w, str(device))
        ids = self._ids_cache.get(key)
        if ids is None:
            ids = torch.zeros(h, w, 3, device=device)
            ids[..., 1] = torch.arange(h, device=device)[:, None]
            ids[..., 2] = torch.arange(w, device=device)[None, :]
            ids = self._ids_cache[key] = ids.reshape(h * w, 3)
        return ids

    def predict(self, x, sigma, text, pooled):
        b, c, h, w = x.shape
        tokens = _pack2x2(x)  # [B, 12, h/2, w/2]
        hp, wp = h // 2, w // 2
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, hp*wp, 12]
        out = self.transformer(
            hidden_states=tokens, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma,
            img_ids=self._img_ids(hp, wp, x.device), txt_ids=torch.zeros(text.shape[1], 3, device=x.device),
            return_dict=False,
        )[0]
        return _unpack2x2(out.transpose(1, 2).reshape(b, c * 4, hp, wp))


class SmallUNetPipeline(_SmallPipeline):
    """Text-to-image with a small SD-style ``UNet2DConditionModel`` on 2x2 space-to-depth RGB pixels
    (native 32x32 pixels = a 16x16x12 sample); cross-attention on the tiny CLIP text states."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, sample_size: int = 32):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self._init_common(sample_size)

    @property
    def denoiser(self):
        return self.unet

    def _size_multiple(self):
        return 2 * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def predict(self, x, sigma, text, pooled):
        t = sigma * self.scheduler.config.num_train_timesteps
        out = self.unet(_pack2x2(x), t, encoder_hidden_states=text, return_dict=False)[0]
        return _unpack2x2(out)


class SmallWanPipeline(_SmallPipeline):
    """Text-to-video with a small ``WanTransformer3DModel`` on RGB video pixels ``[3, F, H, W]`` (native
    ``num_frames`` x 32 x 32; with the shipped patch (1, 4, 4), tokens ``F x 8 x 8``).  ``__call__`` returns
    :class:`SmallVideoOutput`."""

    _video = True

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, sample_size: int = 32, num_frames: int = 4):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        self._init_common(sample_size)
        self.register_to_config(num_frames=int(num_frames))

    @property
    def denoiser(self):
        return self.transformer

    def _size_multiple(self):
        _, ph, pw = self.transformer.config.patch_size
        return math.lcm(int(ph), int(pw))

    def _check_frames(self, num_frames):
        pt = int(self.transformer.config.patch_size[0])
        return self._check_multiple("num_frames", num_frames, pt, " (the temporal patch size)")

    def _noise_shape(self, batch, height, width, num_frames):
        return (batch, 3, num_frames, height, width)

    def predict(self, x, sigma, text, pooled):
        t = sigma * self.scheduler.config.num_train_timesteps
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    def _output(self, out, output_type, return_dict):
        if output_type == "pt":
            frames = out
        else:
            arr = out.permute(0, 2, 3, 4, 1).numpy()  # [B, F, H, W, 3]
            frames = arr if output_type == "np" else [
                [Image.fromarray(np.rint(f * 255).astype(np.uint8)) for f in video] for video in arr]
        if not return_dict:
            return (frames,)
        return SmallVideoOutput(frames=frames)


_CLASSES = {"flux": SmallFluxPipeline, "unet": SmallUNetPipeline, "wan": SmallWanPipeline}


def build_pipeline(kind: str, seed: int = 0, denoiser: dict | None = None, text: dict | None = None,
                   sample_size: int | None = None, num_frames: int | None = None):
    """A freshly initialised small pipeline of ``kind`` (``"flux"``, ``"unet"``, ``"wan"``) from
    :data:`DEFAULT_CONFIGS`, with entries of ``denoiser`` / ``text`` overriding the defaults."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel, WanTransformer3DModel

    if kind not in _CLASSES:
        raise ValueError(f"kind must be one of {sorted(_CLASSES)}, got {kind!r}")
    cfg = DEFAULT_CONFIGS[kind]
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, seed=seed, **{**cfg["text"], **(text or {})})
    scheduler = FlowMatchEulerDiscreteScheduler(shift=float(cfg.get("shift", 1.0)))
    torch.manual_seed(seed + 1)
    size = int(sample_size or cfg["sample_size"])
    if kind == "flux":
        model = FluxTransformer2DModel(**{**cfg["transformer"], **(denoiser or {})})
        return SmallFluxPipeline(model, text_encoder, tokenizer, scheduler, sample_size=size)
    if kind == "unet":
        model = UNet2DConditionModel(**{**cfg["unet"], "sample_size": size // 2, **(denoiser or {})})
        return SmallUNetPipeline(model, text_encoder, tokenizer, scheduler, sample_size=size)
    model = WanTransformer3DModel(**{**cfg["transformer"], **(denoiser or {})})
    return SmallWanPipeline(model, text_encoder, tokenizer, scheduler, sample_size=size,
                            num_frames=int(num_frames or cfg["num_frames"]))


def is_patch_size(patch_size) -> bool:
    """Whether ``patch_size`` is a Wan patch: three positive integers ``(t, h, w)``."""
    return len(patch_size) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in patch_size)


@torch.no_grad()
def repatch_wan(transformer, patch_size):
    """A ``WanTransformer3DModel`` with patch ``patch_size`` made from ``transformer``, whose patch each entry of
    ``patch_size`` divides: on a clip it computes exactly what ``transformer`` computes on that clip upsampled by
    ``old / new`` patch (nearest, each frame and pixel repeated), box-downsampled back.  The patch embedding sums
    the kernel over each repeated block and the output projection averages its rows over it; every other weight
    (blocks, rotary grid, text and time embeddings) is shared unchanged, since the token grid is the same.  Used
    to warm-start a finer-patch Wan run (``diffaccel train-small wan --init-from small-wan --patch-size 1,2,2``)."""
    from diffusers import WanTransformer3DModel

    old = tuple(int(v) for v in transformer.config.patch_size)
    new = tuple(patch_size)
    if not is_patch_size(new) or any(o % n for o, n in zip(old, new)):
        raise ValueError(f"patch_size (--patch-size) must be three positive integers dividing the model's patch "
                         f"{old}, got {patch_size!r}")
    f = [o // n for o, n in zip(old, new)]
    state = dict(transformer.state_dict())
    w = state["patch_embedding.weight"]  # [dim, C, pt, ph, pw]; old kernel index k = n * f + a
    state["patch_embedding.weight"] = w.reshape(*w.shape[:2], new[0], f[0], new[1], f[1], new[2], f[2]).sum((3, 5, 7))
    w, b = state["proj_out.weight"], state["proj_out.bias"]  # rows ordered (pt, ph, pw, channel)
    blocks = (new[0], f[0], new[1], f[1], new[2], f[2], -1)
    state["proj_out.weight"] = w.reshape(*blocks, w.shape[-1]).mean((1, 3, 5)).reshape(-1, w.shape[-1])
    state["proj_out.bias"] = b.reshape(*blocks).mean((1, 3, 5)).reshape(-1)
    model = WanTransformer3DModel.from_config({**transformer.config, "patch_size": new})
    model.load_state_dict(state)
    model.to(w.device)
    return model if model.dtype == w.dtype else model.to(w.dtype)


def resolve_small(name_or_path: str) -> str | None:
    """The folder of a shipped small model name (``"small-flux"`` ...), or ``name_or_path`` itself when it is a
    folder holding one of this module's pipelines; ``None`` otherwise."""
    if name_or_path in SMALL_MODELS:
        return os.path.join(MODELS_DIR, name_or_path)
    index = os.path.join(name_or_path, "model_index.json")
    if os.path.isfile(index):
        import json

        with open(index) as f:
            if json.load(f).get("_class_name") in SMALL_MODELS.values():
                return name_or_path
    return None


def load_small(name_or_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a small pipeline: a shipped name (:data:`SMALL_MODELS`) or a folder saved by ``save_pretrained``.
    Never touches the network."""
    import json

    folder = resolve_small(name_or_path)
    if folder is None:
        raise ValueError(f"{name_or_path!r} is neither a small model name {sorted(SMALL_MODELS)} nor a folder "
                         "holding a small pipeline")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"small model folder {folder} has no model_index.json (not trained yet? see "
                                "`diffaccel train-small --help`)")
    with open(os.path.join(folder, "model_index.json")) as f:
        cls_name = json.load(f)["_class_name"]
    cls = {c.__name__: c for c in _CLASSES.values()}[cls_name]
    pipe = cls.from_pretrained(folder, local_files_only=True, dtype=dtype)
    return pipe.to(device)
