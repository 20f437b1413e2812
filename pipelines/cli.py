"""The ``diffaccel generate``, ``eval`` and ``train-small`` subcommands.

They live in the pipelines layer (they need the small pipelines) and plug into
the ``diffaccel`` console script through the ``diffaccel.cli`` entry point
group (see ``pyproject.toml``): :func:`register` adds them to its subparsers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import diffaccel
from diffaccel.cli import DTYPES
from diffaccel.registry import available_methods

from . import load_pipeline
from .media import save_media
from .small import evaluate, resolve_small
from .small import train as train_small

GENERATE_METHODS = ("dense", *available_methods())  # every registered method; "dense" = full attention


def _peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA, max allocated)"
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{kib / 1024:.0f} MiB (process max RSS)"


def generate(model="small-flux", method="dense", options=(), prompt="a red circle on a blue background", *,
             height=None, width=None, steps=20, seed=0, guidance_scale=None, negative_prompt=None, num_frames=None,
             num_images=1, device=None, dtype=None, allow_download=False, pipe=None):
    """One generation with ``method`` applied: ``(result, seconds, peak_memory, label)``.

    ``method`` is ``"dense"`` or a diffaccel method, optionally with options (``"neighborhood:kernel_size=9"``);
    ``options`` adds ``KEY=VALUE`` strings.  Small models get the method's default setting when none is given.
    ``pipe`` reuses an already loaded pipeline (the method is applied for this call and removed after it).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    setting = evaluate.parse_setting(method, list(options))
    if setting.method not in GENERATE_METHODS:
        raise ValueError(f"method must be one of {GENERATE_METHODS}, got {setting.method!r}")
    if pipe is None:
        pipe = load_pipeline(model, device=device, dtype=dtype, allow_download=allow_download)
    opts = dict(setting.options)
    if setting.method != "dense" and not opts and resolve_small(model) is not None:
        # a small model: the first default setting of this method (sized on its native token grid)
        defaults = [s for s in evaluate.default_settings(pipe) if s.method == setting.method]
        if defaults:
            opts = dict(defaults[0].options)
    label = evaluate.Setting(setting.method, opts).label
    kwargs = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed))
    for name, value in (("height", height), ("width", width), ("guidance_scale", guidance_scale),
                        ("negative_prompt", negative_prompt), ("num_frames", num_frames)):
        if value is not None:
            kwargs[name] = value
    if num_images > 1:
        kwargs["num_images_per_prompt"] = num_images
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if setting.method != "dense":
        diffaccel.apply(pipe, setting.method, **evaluate.resolve_options(opts))
    try:
        t0 = time.perf_counter()
        result = pipe(prompt, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    finally:
        if setting.method != "dense":
            diffaccel.remove(pipe)
    return result, seconds, _peak_memory(device), label


def _cmd_generate(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.model}: {args.method}", file=sys.stderr, flush=True)
    try:
        result, seconds, peak, label = generate(
            args.model, args.method, args.option, args.prompt, height=args.height, width=args.width,
            steps=args.steps, seed=args.seed, guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt, num_frames=args.num_frames, num_images=args.num_images,
            device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
            allow_download=args.allow_download)
    except ValueError as e:
        raise SystemExit(f"diffaccel generate: {e}") from None
    paths = save_media(result, args.output)
    print(f"{label}: time: {seconds:.2f} s ({args.steps} steps, {seconds / args.steps:.3f} s/step); "
          f"peak memory: {peak}")
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_eval(args):

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = None if not args.settings else [evaluate.parse_setting(s) for s in args.settings]
    out = evaluate.evaluate(
        models=tuple(args.models), settings=settings, scales=tuple(args.scales),
        video_scales=tuple(args.video_scales) if args.video_scales else None,
        num_prompts=args.num_prompts, steps=args.steps,
        guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
        classifier=None if args.no_classifier else args.classifier, device=device, progress=args.progress,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    rows, config = out["results"], out["config"]
    print(evaluate.format_table(rows))
    for note in config["skipped"]:
        print(f"skipped: {note}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=config, results=rows), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        evaluate.plot_quality_speed(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _add_train_small_arguments(p):
    p.add_argument("kind", choices=["flux", "unet", "wan", "classifier", "linfusion"],
                   help="which small model to train (classifier: the shape/colour classifier of `diffaccel eval`; "
                        "linfusion: distil LinFusion layers from --teacher)")
    p.add_argument("--output", help="exported folder (default: the shipped pipelines/small/models/small-<kind>, "
                                    "shape-classifier or small-unet-linfusion)")
    p.add_argument("--work-dir", help="checkpoints, logs and sample grids (default runs/<name>)")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget of this run (default 60)")
    p.add_argument("--max-steps", type=int, help="stop at this total step count")
    p.add_argument("--batch-size", type=int, help="default 32 (64 for the classifier)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3; classifier 2e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    p.add_argument("--cooldown-from", type=int, metavar="STEP",
                   help="decay the learning rate linearly from this total step to 2%% of it at --max-steps")
    p.add_argument("--text-encoder-from", metavar="MODEL",
                   help="start the text encoder from this small pipeline's trained one (same tokenizer and "
                        "text-encoder architecture, e.g. small-flux) instead of random weights")
    p.add_argument("--timestep-shift", type=float, metavar="SHIFT",
                   help="shift the training noise levels up, sigma -> SHIFT*sigma/(1+(SHIFT-1)*sigma) (default: the "
                        "pipeline scheduler's shift, which sampling uses: 1 for flux/unet, 3 for wan)")
    p.add_argument("--patch-size", type=_patch_size, metavar="T,H,W",
                   help="wan: the transformer's patch size (default 1,4,4 as DEFAULT_CONFIGS); a resumed run keeps "
                        "its checkpoint's")
    p.add_argument("--image-fraction", type=float, default=0.0, metavar="F",
                   help="wan: make this fraction of the steps image steps (single-frame clips of the image dataset, "
                        "as Wan trains jointly on images and videos; 1: images only; needs a temporal patch of 1)")
    p.add_argument("--init-from", metavar="MODEL",
                   help="start from this small pipeline's weights (a shipped name or a folder) instead of random ones; "
                        "wan: with --patch-size dividing its patch, its patch embedding and output are converted "
                        "(e.g. --init-from small-wan --patch-size 1,2,2)")
    p.add_argument("--mixed-precision", choices=train_small.MIXED_PRECISIONS, default="no",
                   help="bf16: run the forward pass under bf16 autocast (weights, optimiser and EMA stay fp32)")
    p.add_argument("--image-timestep-shift", type=float, metavar="SHIFT",
                   help="wan with --image-fraction: the noise shift of the image steps (default: --timestep-shift's)")
    p.add_argument("--image-teacher", metavar="MODEL",
                   help="wan with --image-fraction: the image steps regress this small image pipeline's velocity "
                        "(e.g. small-unet) instead of the sampled noise - x0; the video steps stay plain flow matching")
    p.add_argument("--video-teacher-sigma", type=float, metavar="S",
                   help="wan with --image-teacher: the video clips at noise levels <= S also regress the teacher's "
                        "velocity, frame by frame (captions without the motion words)")
    p.add_argument("--shape-weight", type=float, default=0.0, metavar="W",
                   help="flux/unet/wan: weight the squared error on and within 2 pixels of the shapes by 1 + W "
                        "(weighted mean; default 0: plain flow matching)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the shapes dataset")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and noise")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="continue from <work-dir>/checkpoint.pt")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint and export every N steps")
    p.add_argument("--sample-every", type=int, default=1000, help="write a preview grid every N steps")
    p.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of the exported weights")
    p.add_argument("--teacher", default="small-unet", help="linfusion: the small UNet pipeline to distil from")


def _patch_size(text):
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--patch-size must be T,H,W integers, got {text!r}") from None


def _cmd_train_small(args):

    train_small.run_from_args(args)
    return 0


def register(sub):
    """Add ``generate``, ``eval`` and ``train-small`` to the ``diffaccel`` subparsers ``sub``."""
    g = sub.add_parser("generate", help="generate an image or video, offline by default on the small FLUX model",
                       description="Generate with a diffusers pipeline and a diffaccel method. Offline by default: "
                                   "the shipped small models (small-flux, small-unet, small-wan), local folders, or "
                                   "Hub ids already in the local cache (--allow-download to fetch).")
    g.add_argument("--model", default="small-flux",
                   help="small model name (small-flux, small-unet, small-wan), diffusers Hub id or folder "
                        "(default small-flux)")
    g.add_argument("--method", default="dense",
                   help=f"{', '.join(GENERATE_METHODS)}, optionally with options "
                        "'method:key=value,...' (e.g. 'neighborhood:kernel_size=9'); small models get a default "
                        "setting when none is given")
    g.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (Python literal value), repeatable: -o kernel_size=(9,9)")
    g.add_argument("--prompt", default="a red circle and a blue square on a yellow background")
    g.add_argument("--negative-prompt")
    g.add_argument("--height", type=int, help="default: the model's native size")
    g.add_argument("--width", type=int, help="default: the model's native size")
    g.add_argument("--num-frames", type=int, help="video models only")
    g.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the pipeline's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--output", default="output.png", help="image file (videos: .gif, or a frame strip)")
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 for small models, the pipeline's otherwise")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--allow-download", action="store_true", help="let Hub ids download (default: offline)")
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("eval", help="quality (PSNR/SSIM vs full attention, classifier accuracy) and speed of every "
                                    "method on the small shapes models",
                       description="For each small model, size and method setting: the same prompts and seeds as "
                                   "full attention; PSNR and SSIM to the full-attention output, shape/colour "
                                   "classifier accuracy and seconds per sample.  See the pipelines layer's evaluate module.")
    e.add_argument("--models", nargs="+", default=["small-flux", "small-unet", "small-wan"])
    e.add_argument("--settings", nargs="+",
                   help="method settings 'method:key=value,...' (default: a few per applicable method)")
    e.add_argument("--scales", nargs="+", type=float, default=[1, 2, 4], help="multiples of the native size")
    e.add_argument("--video-scales", nargs="+", type=float,
                   help="scales for video models (default: --scales)")
    e.add_argument("--num-prompts", type=int, default=8)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=4.0)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=4, help="samples per pipeline call")
    e.add_argument("--classifier", default="shape-classifier", help="classifier name or folder")
    e.add_argument("--no-classifier", action="store_true")
    e.add_argument("--json", help="write the config and every row as JSON")
    e.add_argument("--plot", help="write a PNG of PSNR against seconds per sample per method")
    e.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    e.add_argument("--threads", type=int, help="torch CPU threads")
    e.add_argument("--progress", action="store_true", help="progress bars over the denoising steps")
    e.set_defaults(func=_cmd_eval)

    t = sub.add_parser("train-small", help="train a small shapes model (flux, unet, wan) or the shape classifier",
                       description="Train a small shapes model (FLUX, UNet or Wan architecture) with flow matching on the "
                                   "procedural shapes dataset (or the shape/colour classifier), on CPU by default.")
    _add_train_small_arguments(t)
    t.set_defaults(func=_cmd_train_small)
