"""Train the small pipelines of :mod:`diffaccel.pipelines.small` with flow matching on the shapes dataset.

    diffaccel train-small flux --minutes 60 --output pipelines/small/models/small-flux --work-dir runs/small-flux

Training (rectified flow, as SD3 / FLUX):

* data: :class:`~diffaccel.pipelines.small.shapes.ShapesDataset` (video:
  ``ShapesVideoDataset``, and ``ShapesDataset`` frames on the image steps of
  ``--image-fraction``) with ``--data-seed``; step ``i`` uses samples
  ``i * batch ... (i + 1) * batch - 1`` (deterministic order, never repeated
  within ``--dataset-size``, which wraps around);
* ``sigma ~ sigmoid(N(0, 1))`` (logit-normal), shifted by the pipeline scheduler's ``shift``
  (``--timestep-shift``; 1 for the image models, 3 for Wan), ``x = (1 - sigma) x0 + sigma noise``,
  loss ``|| predict(x, sigma) - (noise - x0) ||^2``;
* the text encoder trains jointly; 10% of captions are replaced by ``""`` so the
  pipelines can run classifier-free guidance;
* AdamW, linear warm-up then constant learning rate, gradient clipping at 1,
  an EMA of the weights (the exported pipeline holds the EMA weights).

``--work-dir`` holds ``checkpoints/`` (model, EMA, optimiser, step, as safetensors + JSON, published
atomically with a ``latest`` pointer: ``--resume`` continues from it; a work dir of older runs with a
``checkpoint.pt`` resumes too, read with ``torch.load(weights_only=True)``), ``log.jsonl`` and preview
grids (every ``--sample-every`` steps and at the end; 0 = none).  The exported folder
(``--output``) is a ``save_pretrained`` pipeline (safetensors, weights stored in
``--save-dtype``) plus ``training.json`` with the command, the step count and the
final loss.  Training runs on ``--device`` (CPU by default, GPU if given).

Files: ``--work-dir`` must be new, empty or an earlier train-small work dir (a run marker); ``--output``
new, empty or an earlier export (its ``training.json``), and the two separate folders.  Anything else is
refused before any work; an export is written beside ``--output`` and swapped in whole.
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import sys
import time

import numpy as np
import torch

from diffaccel.io import (CheckpointDir, check_separate_folders, claim_folder, load_tree, owned_folder, replace_folder,
                          save_tree)

from .shapes import ShapesDataset, ShapesVideoDataset, still_caption
from .pipeline import _CLASSES, DEFAULT_CONFIGS, build_pipeline, is_patch_size, load_small, repatch_wan, resolve_small

__all__ = ["train_small", "collate", "shape_loss_weights", "sample_sigmas", "noisy_batch", "lr_at", "is_image_step",
           "teacher_targets", "run_from_args", "SAVE_DTYPES", "MIXED_PRECISIONS"]

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MIXED_PRECISIONS = ("no", "bf16")


def collate(dataset, indices, coverage=False):
    """``(pixels [B, ...], captions)`` of ``dataset`` samples ``indices`` (wrapping around its length); with
    ``coverage``, ``(pixels, captions, coverage [B, 1, ...])``."""
    items = [dataset[int(i) % len(dataset)] for i in indices]
    out = (torch.stack([it["pixels"] for it in items]), [it["caption"] for it in items])
    return out + (torch.stack([it["coverage"] for it in items]),) if coverage else out


def shape_loss_weights(coverage, shape_weight, margin=2):
    """Per-pixel loss weights ``1 + shape_weight * near`` from the shapes' ``coverage`` (``[B, 1, H, W]`` or
    ``[B, 1, F, H, W]``), ``near`` its maximum over a ``(2 margin + 1)``-pixel square (each frame alone): the
    shapes and ``margin`` pixels around them, where a shape's outline is drawn."""
    k = 2 * margin + 1
    if coverage.dim() == 5:
        near = torch.nn.functional.max_pool3d(coverage, (1, k, k), stride=1, padding=(0, margin, margin))
    else:
        near = torch.nn.functional.max_pool2d(coverage, k, stride=1, padding=margin)
    return 1.0 + shape_weight * near


def _trainable(pipe):
    return [pipe.denoiser, pipe.text_encoder]


def _state(pipe):
    return {"denoiser": pipe.denoiser.state_dict(), "text_encoder": pipe.text_encoder.state_dict()}


def _load_state(pipe, state):
    pipe.denoiser.load_state_dict(state["denoiser"])
    pipe.text_encoder.load_state_dict(state["text_encoder"])


def is_training_export(folder) -> bool:
    """Whether ``folder`` is an export a diffaccel training run wrote (it holds such a ``training.json``): the
    only kind of non-empty ``--output`` folder an export replaces."""
    try:
        with open(os.path.join(folder, "training.json"), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(info, dict) and "command" in info and "steps" in info


def check_output_folders(output, work_dir):
    """Before any work: ``output`` (``--output``) new, empty or an earlier export (:func:`is_training_export`),
    ``work_dir`` (``--work-dir``) claimable by :func:`claim_work_dir`, and the two separate folders."""
    check_separate_folders(output=output, work_dir=work_dir)
    if not owned_folder(output, is_training_export):
        raise ValueError(f"output (--output) {os.path.abspath(output)!r} is not empty and is not a diffaccel training "
                         "export (no training.json written by train-small); it is never replaced: pass a new folder")
    claim_work_dir(work_dir, create=False)


def claim_work_dir(work_dir, create=True):
    """Claim ``work_dir`` (``--work-dir``) for train-small: new, empty, or an earlier train-small work dir
    (its run marker, or the ``checkpoint.pt`` of the runs before the marker existed).  ``create=False``: check
    only, write nothing."""
    from diffaccel.io import RUN_MARKER, atomic_write_json

    legacy = os.path.isfile(os.path.join(work_dir, "checkpoint.pt")) and not os.path.isfile(
        os.path.join(work_dir, RUN_MARKER))
    if legacy:
        if create:
            atomic_write_json(os.path.join(work_dir, RUN_MARKER), {"kind": "train-small", "identity": None})
        return
    claim_folder(work_dir, kind="train-small", arg="work_dir (--work-dir)", create=create)


_CHECKPOINT_KEYS = {"kind": str, "step": int, "model": dict, "optimizer": dict, "ema": list}


def load_checkpoint(work_dir, checkpoints):
    """``(checkpoint, path)`` of the latest checkpoint in ``work_dir`` for ``--resume``: ``checkpoints/`` (safetensors +
    JSON), or the ``checkpoint.pt`` of older runs read with ``torch.load(weights_only=True)`` (no code runs).  No
    checkpoint, or a corrupt or incomplete one, is a ``ValueError`` naming the file, never a silent restart."""
    path = checkpoints.latest()
    if path is not None:
        ck, _ = load_tree(path)
    else:
        path = os.path.join(work_dir, "checkpoint.pt")
        if not os.path.isfile(path):
            raise ValueError(f"resume (--resume): {os.path.abspath(work_dir)!r} holds no checkpoint to resume from")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, empty, random bytes, or pickled code that weights_only refuses
            raise ValueError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ck, dict):
        raise ValueError(f"checkpoint {path!r} is a {type(ck).__name__}, not a train-small checkpoint")
    for key, typ in _CHECKPOINT_KEYS.items():
        if not isinstance(ck.get(key), typ):
            raise ValueError(f"checkpoint {path!r} has no valid {key!r} entry (expected {typ.__name__})")
    if not isinstance(ck.get("rng"), torch.Tensor):
        raise ValueError(f"checkpoint {path!r} has no valid 'rng' entry (expected a tensor)")
    return ck, path


def _check_patch_size(kind, patch_size, ck):
    """The patch size a run builds its model with: ``patch_size`` (Wan only, three positive ints), or a resumed
    checkpoint's; ``None`` for the default."""
    saved = tuple(ck["patch_size"]) if ck is not None and ck.get("patch_size") else None
    if patch_size is None:
        return saved
    patch_size = tuple(patch_size)
    if kind != "wan":
        raise ValueError(f"patch_size (--patch-size) is for wan runs, not {kind!r}")
    if not is_patch_size(patch_size):
        raise ValueError(f"patch_size (--patch-size) must be three positive integers (t, h, w), got {patch_size!r}")
    resumed = saved or tuple(DEFAULT_CONFIGS[kind]["transformer"]["patch_size"])
    if ck is not None and patch_size != resumed:
        raise ValueError(f"patch_size (--patch-size) {patch_size} differs from the resumed checkpoint's "
                         f"{saved or 'default'}")
    return patch_size


def _check_image_fraction(kind, image_fraction, pipe):
    if not isinstance(image_fraction, (int, float)) or isinstance(image_fraction, bool) or not 0 <= image_fraction <= 1:
        raise ValueError(f"image_fraction (--image-fraction) must be a number in [0, 1], got {image_fraction!r}")
    if image_fraction and kind != "wan":
        raise ValueError(f"image_fraction (--image-fraction) is for wan runs, not {kind!r}")
    if image_fraction and pipe.denoiser.config.patch_size[0] != 1:
        raise ValueError(f"image_fraction (--image-fraction) needs a temporal patch of 1 (single-frame clips), "
                         f"the model's is {pipe.denoiser.config.patch_size[0]}")


def is_image_step(step, image_fraction):
    """Whether training step ``step`` (0-based) of a Wan run with ``image_fraction`` is an image step: the
    image steps are spread evenly, ``floor((step + 1) f) > floor(step f)``."""
    return int((step + 1) * image_fraction) > int(step * image_fraction)


@torch.no_grad()
def _copy_text_encoder(pipe, source):
    """Load the text encoder of the small pipeline ``source`` into ``pipe`` (same vocabulary and shapes)."""
    src = load_small(source)
    if src.tokenizer.get_vocab() != pipe.tokenizer.get_vocab():
        raise ValueError(f"text_encoder_from (--text-encoder-from) {source!r} has a different tokenizer vocabulary")
    want, got = pipe.text_encoder.state_dict(), src.text_encoder.state_dict()
    if set(want) != set(got) or any(want[k].shape != got[k].shape for k in want):
        raise ValueError(f"text_encoder_from (--text-encoder-from) {source!r}: its text encoder's architecture "
                         f"differs from this model's")
    pipe.text_encoder.load_state_dict({k: v.float() for k, v in got.items()})


def _init_training(init_from):
    """The ``training.json`` of the pipeline a run starts from (``None`` without one), so that an export records
    its whole lineage; read when the run starts and kept in the checkpoint for resumes."""
    folder = resolve_small(init_from)
    path = os.path.join(folder, "training.json") if folder else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _load_image_teacher(image_teacher, image_fraction, pipe, device):
    """The frozen image pipeline whose velocity the image steps regress (``None`` without ``image_teacher``)."""
    if not image_teacher:
        return None
    if not image_fraction:
        raise ValueError("image_teacher (--image-teacher) needs image steps (--image-fraction > 0) of a wan run")
    teacher = load_small(image_teacher)
    if getattr(teacher, "_video", False):
        raise ValueError(f"image_teacher (--image-teacher) {image_teacher!r} is a video pipeline, not an image one")
    if teacher.config.sample_size != pipe.config.sample_size:
        raise ValueError(f"image_teacher (--image-teacher) {image_teacher!r} has native size "
                         f"{teacher.config.sample_size}, this model {pipe.config.sample_size}")
    teacher.to(device)
    for m in _trainable(teacher):
        m.eval().requires_grad_(False)
    return teacher


@torch.no_grad()
def _teacher_velocity(teacher, xt, sigma, captions, device):
    """``teacher``'s velocity on the clips ``xt [B, 3, F, H, W]``, frame by frame (fp32, same shape); the
    captions' motion words are dropped (:func:`still_caption`), as the image teacher never saw them."""
    b, c, f, h, w = xt.shape
    text, pooled = teacher.encode_prompt([still_caption(t) for t in captions], device)
    frames = xt.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    v = teacher.predict(frames, sigma.repeat_interleave(f), text.repeat_interleave(f, 0),
                        pooled.repeat_interleave(f, 0))
    return v.float().reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)


def teacher_targets(teacher, xt, sigma, captions, target, image_step, video_teacher_sigma, device):
    """The regression target of one Wan batch with an image ``teacher``: every clip of an image step, and on
    video steps the clips with ``sigma <= video_teacher_sigma`` (``None``: none), take the teacher's
    velocity; the others keep the flow-matching ``target``."""
    if image_step:
        return _teacher_velocity(teacher, xt, sigma, captions, device)
    if video_teacher_sigma is None:
        return target
    pick = sigma <= video_teacher_sigma
    if not pick.any():
        return target
    target = target.clone()
    target[pick] = _teacher_velocity(teacher, xt[pick], sigma[pick],
                                     [c for c, p in zip(captions, pick.tolist()) if p], device)
    return target


@torch.no_grad()
def _ema_update(ema_params, params, decay):
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def _sample_grid(pipe, path, prompts, steps=20, guidance=4.0):
    """Save one sample per prompt (first frame of videos) side by side as a PNG."""
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    g = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np")
    arr = out.images if hasattr(out, "images") else out.frames[:, 0]
    row = np.concatenate(list(arr), axis=1)
    Image.fromarray(np.rint(row * 255).astype(np.uint8)).resize((row.shape[1] * 3, row.shape[0] * 3),
                                                               Image.NEAREST).save(path)


PREVIEW_PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a purple background",
    "a white triangle on a green background",
    "a blue star on a yellow background",
    "a green circle and a red square on a white background",
]


def _continue_command(command):
    if not command:
        return None
    return command if "--resume" in command.split() else command + " --resume"


def sample_sigmas(n, generator, shift=1.0):
    """``n`` training noise levels: logit-normal ``sigmoid(N(0, 1))``, then shifted up as the flow schedulers'
    ``shift`` does at sampling time, ``sigma -> shift * sigma / (1 + (shift - 1) * sigma)``."""
    sigma = torch.sigmoid(torch.randn(n, generator=generator))
    return shift * sigma / (1 + (shift - 1) * sigma)


def noisy_batch(x0, captions, generator, caption_dropout=0.1, shift=1.0):
    """One flow-matching training batch from clean samples ``x0`` (CPU) and their captions, drawn from
    ``generator`` in this order: the captions dropped to ``""`` (probability ``caption_dropout``), the noise, the
    noise levels (:func:`sample_sigmas`).  Returns ``(captions, x_sigma, sigma, target velocity noise - x0)``."""
    drop = torch.rand(len(captions), generator=generator) < caption_dropout
    captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
    noise = torch.randn(x0.shape, generator=generator)
    sigma = sample_sigmas(x0.shape[0], generator, shift)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return captions, (1 - s) * x0 + s * noise, sigma, noise - x0


def lr_at(step, lr, warmup=200, cooldown_from=None, max_steps=None, final_lr_ratio=0.02):
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup`` steps, then constant;
    with ``cooldown_from``, linear decay from ``lr`` at that step to ``lr * final_lr_ratio`` at ``max_steps``."""
    scale = min(1.0, (step + 1) / max(warmup, 1))
    if cooldown_from is not None and step >= cooldown_from:
        span = max(max_steps - cooldown_from, 1)
        frac = min(1.0, (step - cooldown_from) / span)
        scale = min(scale, 1.0 - (1.0 - final_lr_ratio) * frac)
    return lr * scale


def train_small(
    kind: str,
    output: str,
    work_dir: str,
    minutes: float = 60.0,
    max_steps: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 200,
    cooldown_from: int | None = None,
    final_lr_ratio: float = 0.02,
    timestep_shift: float | None = None,
    image_timestep_shift: float | None = None,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    data_seed: int = 0,
    dataset_size: int = 1_000_000,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    init_from: str | None = None,
    text_encoder_from: str | None = None,
    patch_size: tuple | None = None,
    image_fraction: float = 0.0,
    mixed_precision: str = "no",
    image_teacher: str | None = None,
    video_teacher_sigma: float | None = None,
    shape_weight: float = 0.0,
    save_every: int = 200,
    log_every: int = 20,
    sample_every: int = 500,
    save_dtype: str = "fp16",
    command: str | None = None,
):
    """Train (or continue training) a small pipeline of ``kind`` ("flux", "unet", "wan"); export its EMA weights
    to ``output`` every ``save_every`` steps and at the end.  Stops after ``minutes`` of wall time or
    ``max_steps`` total steps, whichever first.  With ``cooldown_from`` the learning rate decays linearly from
    that step to ``lr * final_lr_ratio`` at ``max_steps`` (see :func:`lr_at`).  ``text_encoder_from`` (a small
    pipeline name or folder with the same tokenizer and text-encoder architecture) starts the text encoder from
    that pipeline's trained weights instead of random ones (it still trains jointly).  ``timestep_shift``
    (default: the pipeline scheduler's ``shift``, which sampling uses) moves the training noise levels up:
    ``sigma -> shift * sigma / (1 + (shift - 1) * sigma)``.  ``patch_size`` (Wan only, ``(t, h, w)``) replaces
    the default patch of :data:`DEFAULT_CONFIGS`; a resumed run keeps its checkpoint's.  ``image_fraction`` (Wan
    only, temporal patch 1) makes that fraction of the steps image steps, as Wan is trained jointly on images and
    videos: a batch of single-frame clips of :class:`ShapesDataset` (captions without motion); step ``i`` is one
    when ``floor((i + 1) f) > floor(i f)`` (every step for 1: a Wan model trained on images only);
    ``image_timestep_shift`` (default ``timestep_shift``) is the noise shift of the image steps.  ``init_from`` (a
    small pipeline name or folder of this ``kind``) starts from its weights; with a ``patch_size`` dividing its patch,
    a Wan model is converted by :func:`~diffaccel.pipelines.small.repatch_wan` first; the export records that
    pipeline's own ``training.json`` as ``init_from_training`` (its lineage, read when the run starts).
    ``mixed_precision="bf16"`` runs the forward pass under bf16 autocast (parameters, optimiser and EMA stay
    fp32).  ``image_teacher`` (Wan with ``image_fraction``: a small image pipeline name or folder of the same native
    size) makes the image steps regress that model's velocity on the same noisy frames, noise levels and captions
    (through its own text encoder) instead of the sampled ``noise - x0``; the video steps stay plain flow matching,
    except that with ``video_teacher_sigma`` their clips at noise levels ``sigma <= video_teacher_sigma`` regress
    the teacher's velocity frame by frame (captions without the motion words).  ``shape_weight`` weights
    the squared error of each pixel by :func:`shape_loss_weights` (``1 + shape_weight`` on and near the shapes, 1
    elsewhere; the loss is the weighted mean), so that the outlines, where the prompted shape shows, count more;
    the logged ``loss`` stays the plain mean squared error.  Returns a summary dict."""
    if cooldown_from is not None and max_steps is None:
        raise ValueError("cooldown_from (--cooldown-from) needs max_steps (--max-steps), the step where the decay ends")
    if isinstance(shape_weight, bool) or not isinstance(shape_weight, (int, float)) or not shape_weight >= 0:
        raise ValueError(f"shape_weight (--shape-weight) must be a number >= 0, got {shape_weight!r}")
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision (--mixed-precision) must be one of {MIXED_PRECISIONS}, "
                         f"got {mixed_precision!r}")
    if threads:
        torch.set_num_threads(int(threads))
    check_output_folders(output, work_dir)
    checkpoints = CheckpointDir(os.path.join(work_dir, "checkpoints"))
    torch.manual_seed(seed)
    ck, ckpt_path = load_checkpoint(work_dir, checkpoints) if resume else (None, None)
    if ck is not None and ck["kind"] != kind:
        raise ValueError(f"checkpoint {ckpt_path} holds a {ck['kind']!r} run, not {kind!r}")
    patch_size = _check_patch_size(kind, patch_size, ck)
    if init_from:
        pipe = load_small(init_from)
        if not isinstance(pipe, _CLASSES[kind]):
            raise ValueError(f"init_from (--init-from) {init_from!r} is a {type(pipe).__name__}, not a {kind} model")
        if patch_size is not None and tuple(pipe.denoiser.config.patch_size) != patch_size:
            pipe.register_modules(transformer=repatch_wan(pipe.denoiser, patch_size))
    else:
        pipe = build_pipeline(kind, seed=seed, denoiser=dict(patch_size=patch_size) if patch_size else None)
    _check_image_fraction(kind, image_fraction, pipe)
    if image_timestep_shift is not None and not (image_fraction and image_timestep_shift > 0):
        raise ValueError(f"image_timestep_shift (--image-timestep-shift) must be > 0 and needs image steps "
                         f"(--image-fraction > 0), got {image_timestep_shift!r}")
    teacher = _load_image_teacher(image_teacher, image_fraction, pipe, device)
    if video_teacher_sigma is not None and (
            teacher is None or isinstance(video_teacher_sigma, bool)
            or not isinstance(video_teacher_sigma, (int, float)) or not 0 < video_teacher_sigma <= 1):
        raise ValueError(f"video_teacher_sigma (--video-teacher-sigma) must be a number in (0, 1] and needs an "
                         f"image teacher (--image-teacher), got {video_teacher_sigma!r}")
    model_patch = tuple(pipe.denoiser.config.patch_size) if kind == "wan" else None  # recorded in checkpoint and export
    init_training = ck.get("init_training") if ck is not None else _init_training(init_from) if init_from else None
    if text_encoder_from and not resume:
        _copy_text_encoder(pipe, text_encoder_from)
    pipe.to(device)
    if timestep_shift is None:
        timestep_shift = float(pipe.scheduler.config.get("shift", 1.0))
    if not timestep_shift > 0:
        raise ValueError(f"timestep_shift (--timestep-shift) must be > 0, got {timestep_shift!r}")
    claim_work_dir(work_dir)
    video = kind == "wan"
    size = pipe.config.sample_size
    dataset = ShapesDataset(data_seed, dataset_size, size)
    videos = ShapesVideoDataset(data_seed, dataset_size, size, frames=pipe.config.num_frames) if video else None

    params = [p for m in _trainable(pipe) for p in m.parameters()]
    for m in _trainable(pipe):
        m.train()
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    step, elapsed_before, runs = 0, 0.0, []
    if ck is not None:
        try:
            _load_state(pipe, ck["model"])
            opt.load_state_dict(ck["optimizer"])
            if len(ck["ema"]) != len(ema):
                raise ValueError(f"{len(ck['ema'])} EMA tensors for {len(ema)} parameters")
            for e, v in zip(ema, ck["ema"]):
                e.copy_(v)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            raise ValueError(f"checkpoint {ckpt_path} does not fit this {kind} model "
                             f"({type(err).__name__}: {err})") from None
        step, elapsed_before = ck["step"], ck.get("elapsed", 0.0)
        runs = list(ck.get("runs") or [])
        if not runs and os.path.isfile(os.path.join(output, "training.json")):
            with open(os.path.join(output, "training.json")) as f:
                old = json.load(f)
            runs = [dict(command=old.get("command"), end_step=step, minutes=old.get("minutes_trained"))]
        torch.set_rng_state(ck["rng"])
        print(f"resumed {ckpt_path} at step {step} ({elapsed_before / 60:.1f} min trained)", flush=True)

    gen = torch.Generator().manual_seed(seed * 1000 + step)
    log_path = os.path.join(work_dir, "log.jsonl")
    t0 = time.time()
    losses = []

    def _runs():
        # every run that trained this model: its command, the step it ended at, wall minutes
        return runs + [dict(command=command, end_step=step, minutes=round((time.time() - t0) / 60, 1))]

    def save(final=False):
        ck = dict(kind=kind, patch_size=model_patch, init_training=init_training, step=step,
                  elapsed=elapsed_before + time.time() - t0, runs=_runs(), model=_state(pipe),
                  optimizer=opt.state_dict(), ema=[e.cpu() for e in ema], rng=torch.get_rng_state())
        checkpoints.save(step, lambda folder: save_tree(folder, ck, metadata=dict(kind=kind, step=step)))
        export(final)

    def export(final):
        # the pipeline with EMA weights, stored in save_dtype
        ema_pipe = copy.deepcopy(pipe)
        ema_params = [p for m in _trainable(ema_pipe) for p in m.parameters()]
        with torch.no_grad():
            for p, e in zip(ema_params, ema):
                p.copy_(e)
        for m in _trainable(ema_pipe):
            m.eval()
        ema_pipe.to("cpu")
        if sample_every and (final or step % sample_every == 0):
            _sample_grid(ema_pipe, os.path.join(work_dir, f"samples_{step:06d}.png"), PREVIEW_PROMPTS)
        ema_pipe.denoiser.to(SAVE_DTYPES[save_dtype])
        ema_pipe.text_encoder.to(SAVE_DTYPES[save_dtype])
        with replace_folder(output, is_training_export, arg="output (--output)") as tmp:
            _write_export(ema_pipe, tmp, step)

    def _write_export(ema_pipe, tmp, step):
        ema_pipe.save_pretrained(tmp, safe_serialization=True)
        recent = float(np.mean(losses[-200:])) if losses else None
        info = dict(kind=kind, steps=step, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                    cooldown=None if cooldown_from is None else dict(from_step=cooldown_from, to_step=max_steps,
                                                                      final_lr_ratio=final_lr_ratio),
                    minutes_trained=round((elapsed_before + time.time() - t0) / 60, 1), final_loss=recent,
                    data_seed=data_seed, seed=seed, weights_dtype=save_dtype, text_encoder_from=text_encoder_from,
                    timestep_shift=timestep_shift, image_timestep_shift=image_timestep_shift,
                    image_fraction=image_fraction, mixed_precision=mixed_precision,
                    patch_size=list(model_patch) if model_patch else None, init_from=init_from,
                    image_teacher=image_teacher, video_teacher_sigma=video_teacher_sigma, shape_weight=shape_weight,
                    init_from_training=init_training,
                    command=command, continue_with=_continue_command(command), runs=_runs())
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump(info, f, indent=2)

    print(f"training {kind}: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, batch {batch_size}, "
          f"{minutes} min / {max_steps} steps max, threads {torch.get_num_threads()}", flush=True)
    last = time.time()
    while True:
        if max_steps is not None and step >= max_steps:
            break
        if time.time() - t0 > minutes * 60:
            break
        idx = np.arange(step * batch_size, (step + 1) * batch_size)
        image_step = video and is_image_step(step, image_fraction)  # single-frame clips [B, 3, 1, H, W]
        if video and not image_step:
            x0, captions, cover = collate(videos, idx, coverage=True)
        else:
            x0, captions, cover = collate(dataset, idx, coverage=True)
            x0, cover = (x0.unsqueeze(2), cover.unsqueeze(2)) if video else (x0, cover)
        shift = image_timestep_shift if image_step and image_timestep_shift is not None else timestep_shift
        captions, xt, sigma, target = noisy_batch(x0, captions, gen, caption_dropout, shift)
        xt, sigma, target = xt.to(device), sigma.to(device), target.to(device)
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=mixed_precision == "bf16"):
            if teacher is not None:
                target = teacher_targets(teacher, xt, sigma, captions, target, image_step, video_teacher_sigma,
                                         device)
            text, pooled = pipe.encode_prompt(captions, device)
            pred = pipe.predict(xt, sigma, text, pooled)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        objective = loss
        if shape_weight:
            w = shape_loss_weights(cover.to(device), shape_weight).expand_as(pred)
            objective = (w * (pred.float() - target.float()).square()).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g_ in opt.param_groups:
            g_["lr"] = lr_at(step, lr, warmup, cooldown_from, max_steps, final_lr_ratio)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        _ema_update(ema, [p.detach() for p in params], decay)
        step += 1
        losses.append(loss.item())
        if step % log_every == 0:
            now = time.time()
            rec = dict(step=step, loss=float(np.mean(losses[-log_every:])), sec_per_step=(now - last) / log_every,
                       minutes=round((elapsed_before + now - t0) / 60, 2))
            last = now
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
        if save_every and step % save_every == 0:
            save()
    save(final=True)
    summary = dict(kind=kind, steps=step, minutes=round((elapsed_before + time.time() - t0) / 60, 1),
                   final_loss=float(np.mean(losses[-200:])) if losses else None, output=output)
    print(json.dumps(summary), flush=True)
    return summary


def distill_linfusion(
    output: str,
    work_dir: str,
    teacher: str = "small-unet",
    minutes: float = 30.0,
    max_steps: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 50,
    data_seed: int = 0,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    save_every: int = 200,
    log_every: int = 20,
    command: str | None = None,
):
    """Distil LinFusion layers for a small UNet pipeline (``teacher``): the student is the same pipeline with
    ``diffaccel.apply(pipe, "linfusion")`` (projections copied from the teacher, MLP branches zero-initialised);
    only the LinFusion parameters train, to match the teacher's velocity on noisy dataset images (logit-normal
    ``sigma``, prompts with 10% dropped, as in training).  Saves LinFusion's checkpoint format (``save_linfusion``)
    to ``output`` with ``training.json``.  Stops after ``minutes`` or ``max_steps``."""
    import diffaccel
    from diffaccel.linfusion import save_linfusion
    from diffaccel.methods.linfusion import linfusion_parameters

    from .pipeline import SmallUNetPipeline

    if threads:
        torch.set_num_threads(int(threads))
    check_output_folders(output, work_dir)
    torch.manual_seed(seed)
    pipe = load_small(teacher).to(device)
    if not isinstance(pipe, SmallUNetPipeline):
        raise ValueError(f"LinFusion distillation needs a small UNet pipeline, {teacher!r} is {type(pipe).__name__}")
    teacher_pipe = SmallUNetPipeline(copy.deepcopy(pipe.unet), pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                                     sample_size=pipe.config.sample_size)
    for m in (pipe.unet, pipe.text_encoder, teacher_pipe.unet):
        m.requires_grad_(False).eval()
    diffaccel.apply(pipe, "linfusion")
    params = linfusion_parameters(pipe)
    for p_ in params:
        p_.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    claim_work_dir(work_dir)
    dataset = ShapesDataset(data_seed + 7, 1_000_000, pipe.config.sample_size)
    gen = torch.Generator().manual_seed(seed)
    t0, step, losses = time.time(), 0, []
    print(f"distilling LinFusion for {teacher}: {sum(p_.numel() for p_ in params) / 1e6:.2f}M parameters",
          flush=True)

    def save():
        info = dict(teacher=teacher, steps=step, batch_size=batch_size, lr=lr,
                    minutes_trained=round((time.time() - t0) / 60, 1),
                    final_loss=float(np.mean(losses[-100:])) if losses else None, command=command)
        with replace_folder(output, is_training_export, arg="output (--output)") as tmp:
            save_linfusion(pipe, tmp, dtype=torch.float16)
            with open(os.path.join(tmp, "training.json"), "w") as f:
                json.dump(info, f, indent=2)

    while (max_steps is None or step < max_steps) and time.time() - t0 < minutes * 60:
        captions, xt, sigma, _ = noisy_batch(*collate(dataset, np.arange(step * batch_size, (step + 1) * batch_size)),
                                             gen)
        xt, sigma = xt.to(device), sigma.to(device)
        with torch.no_grad():
            text, pooled = pipe.encode_prompt(captions, device)
            target = teacher_pipe.predict(xt, sigma, text, pooled)
        pred = pipe.predict(xt, sigma, text, pooled)
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g_ in opt.param_groups:
            g_["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % log_every == 0:
            rec = dict(step=step, loss=float(np.mean(losses[-log_every:])), minutes=round((time.time() - t0) / 60, 2))
            with open(os.path.join(work_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
        if save_every and step % save_every == 0:
            save()
    save()
    return dict(steps=step, final_loss=float(np.mean(losses[-100:])) if losses else None, output=output)


def run_from_args(args):
    from .pipeline import MODELS_DIR

    name = {"classifier": "shape-classifier", "linfusion": "small-unet-linfusion"}.get(args.kind, f"small-{args.kind}")
    output = args.output or os.path.join(MODELS_DIR, name)
    work_dir = args.work_dir or os.path.join("runs", name)
    argv = list(getattr(args, "argv", None) or [])
    if "train-small" in argv:
        argv = argv[argv.index("train-small") + 1:]
    command = "diffaccel train-small " + " ".join(shlex.quote(a) for a in argv) if argv else None
    if args.kind == "linfusion":
        return distill_linfusion(output=output, work_dir=work_dir, teacher=args.teacher, minutes=args.minutes,
                                 max_steps=args.max_steps, batch_size=args.batch_size or 32, lr=args.lr or 1e-3,
                                 data_seed=args.data_seed, seed=args.seed, threads=args.threads, device=args.device,
                                 save_every=args.save_every, command=command)
    if args.kind == "classifier":
        from .evaluate import train_classifier

        return train_classifier(output=output, work_dir=work_dir, minutes=args.minutes, max_steps=args.max_steps,
                                batch_size=args.batch_size or 64, lr=args.lr or 2e-3, data_seed=args.data_seed, seed=args.seed,
                                threads=args.threads, device=args.device, resume=args.resume, command=command)
    return train_small(
        args.kind, output, work_dir, minutes=args.minutes, max_steps=args.max_steps,
        batch_size=args.batch_size or 32, lr=args.lr or 1e-3, warmup=args.warmup,
        text_encoder_from=args.text_encoder_from, timestep_shift=args.timestep_shift,
        image_timestep_shift=args.image_timestep_shift, patch_size=args.patch_size,
        image_fraction=args.image_fraction, mixed_precision=args.mixed_precision, init_from=args.init_from,
        image_teacher=args.image_teacher, video_teacher_sigma=args.video_teacher_sigma,
        shape_weight=args.shape_weight,
        cooldown_from=args.cooldown_from, ema_decay=args.ema_decay, data_seed=args.data_seed, seed=args.seed, threads=args.threads,
        device=args.device, resume=args.resume, save_every=args.save_every, sample_every=args.sample_every,
        save_dtype=args.save_dtype, command=command,
    )


def main(argv=None):
    """``python -m diffaccel.pipelines.small.train ...`` = ``diffaccel train-small ...``."""
    from diffaccel.cli import main as cli_main

    argv = sys.argv[1:] if argv is None else list(argv)
    cli_main(["train-small", *argv])


if __name__ == "__main__":
    main()
