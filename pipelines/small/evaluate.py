"""``diffaccel eval``: every method against full attention on the small shapes models.

For each small model, each size (the native size times ``scales``, default 1x, 2x, 4x)
and each method setting, the same prompts, seeds and initial noise as full
(dense) attention are generated, then:

* **PSNR** to the dense output: ``10 * log10(1 / MSE)`` with pixels in [0, 1] and
  the MSE over every pixel, channel (and frame) of the sample; averaged over samples.
  Identical images give ``inf``, reported as :data:`PSNR_CAP` (100 dB).
* **SSIM** to the dense output (Wang et al., 2004): an 11x11 Gaussian window with
  sigma 1.5, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L = 1``, computed per
  channel on the valid region (no padding), averaged over the map, the channels
  (and frames), then over samples.
* **classifier accuracy** of a small CNN (:class:`ShapeClassifier`, trained on the
  shapes dataset, shipped in ``pipelines/small/models/shape-classifier``) on the samples,
  area-downsampled to the classifier's 32x32 input (videos: every frame): *shape*,
  *colour*, *pair* (shape and colour together) and *background* accuracy against the
  prompt.  The dense rows give the reference accuracy (chance: shape 1/4, colour
  about 1/5, pair about 1/20, background 1/6).
* **speed**: wall-clock seconds per sample of the whole generation (text encoding,
  every step, classifier-free guidance), and the speedup over dense at that size.

Results: a table, ``--json``, and a plot of PSNR against seconds per sample per
method (one panel per model and size; PIL, no matplotlib needed).
"""
from __future__ import annotations

import ast
import json
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .shapes import COLOR_NAMES, SHAPES, ShapesDataset, parse_caption

__all__ = [
    "PSNR_CAP",
    "psnr",
    "ssim",
    "ShapeClassifier",
    "load_classifier",
    "train_classifier",
    "classifier_accuracy",
    "eval_prompts",
    "Setting",
    "parse_setting",
    "default_settings",
    "resolve_options",
    "evaluate",
    "format_table",
    "evaluate_highres",
    "format_highres_table",
    "plot_quality_speed",
]

PSNR_CAP = 100.0
CLASSIFIER_SIZE = 32


# ----------------------------------------------------------------------------- image metrics


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` or ``[B, 3, F, H, W]`` -> ``[B, N, 3, H, W]`` (N frames, 1 for images), float64."""
    x = x.detach().to(torch.float64)
    if x.dim() == 4:
        return x[:, None]
    if x.dim() == 5:
        return x.movedim(2, 1)
    raise ValueError(f"expected [B, 3, H, W] or [B, 3, F, H, W] images, got shape {tuple(x.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per sample (``[B]``) of images in [0, 1]: ``10 log10(1 / MSE)`` over all pixels, channels and
    frames; capped at :data:`PSNR_CAP` (identical images)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (_as_images(a) - _as_images(b)).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(1.0 / mse.clamp_min(1e-30))
    return out.clamp(max=PSNR_CAP)


def _gaussian_window(size=11, sigma=1.5):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM per sample (``[B]``) of images in [0, 1] (Wang et al. 2004; see the module docstring).  Images
    smaller than the window use a window of their smaller side (odd)."""
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    x, y = _as_images(a), _as_images(b)
    bsz, n, c, h, w = x.shape
    x, y = x.reshape(bsz * n * c, 1, h, w), y.reshape(bsz * n * c, 1, h, w)
    size = min(window, h, w)
    size -= (size + 1) % 2
    g = _gaussian_window(size, sigma)
    kh, kw = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(t):
        return F.conv2d(F.conv2d(t, kh), kw)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    smap = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return smap.reshape(bsz, -1).mean(1)


# ----------------------------------------------------------------------------- classifier


class ShapeClassifier(ModelMixin, ConfigMixin):
    """A tiny CNN on 32x32 RGB images in [0, 1] with multi-label heads for the (shape, colour) pairs present
    (:func:`~diffaccel.pipelines.small.shapes.pair_index`), the shapes present and the colours present, and a softmax
    head for the background colour.  A pair's score is the sum of the log-sigmoids of its pair, shape and colour
    logits."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, width: int = 32, num_shapes: int = len(SHAPES), num_colors: int = len(COLOR_NAMES)):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        w = width
        self.features = nn.Sequential(block(3, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2),
                                      block(2 * w, 4 * w))
        self.pairs = nn.Linear(8 * w, num_shapes * num_colors)
        self.shapes = nn.Linear(8 * w, num_shapes)
        self.colors = nn.Linear(8 * w, num_colors)
        self.background = nn.Linear(8 * w, num_colors)

    def forward(self, images):
        """``images`` ``[B, 3, 32, 32]`` in [0, 1] -> ``(pair, shape, colour, background)`` logits."""
        f = self.features(images * 2 - 1)
        h = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)  # average and max pooling
        return self.pairs(h), self.shapes(h), self.colors(h), self.background(h)

    def pair_scores(self, pair_logits, shape_logits, color_logits):
        """``[B, S*C]`` log-scores of every (shape, colour) pair."""
        nc = color_logits.shape[1]
        joint = F.logsigmoid(shape_logits)[:, :, None] + F.logsigmoid(color_logits)[:, None, :]
        return F.logsigmoid(pair_logits) + joint.reshape(-1, shape_logits.shape[1] * nc)

    @torch.no_grad()
    def predict(self, images, num_shapes=1):
        """Predicted ``[(shape, colour), ...]`` (the ``num_shapes`` most likely pairs) and background per image;
        images of any size are area-resized to 32x32 first."""
        images = _resize_for_classifier(images)
        pair_logits, shape_logits, color_logits, bg_logits = self(images.to(self.dtype))
        top = self.pair_scores(pair_logits, shape_logits, color_logits).topk(num_shapes, dim=1).indices
        nc = len(COLOR_NAMES)
        pairs = [[(SHAPES[int(i) // nc], COLOR_NAMES[int(i) % nc]) for i in row] for row in top]
        return pairs, [COLOR_NAMES[int(i)] for i in bg_logits.argmax(1)]


def _resize_for_classifier(images):
    if images.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
        images = F.interpolate(images.float(), size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE), mode="area")
    return images


def load_classifier(name_or_path: str = "shape-classifier", device="cpu") -> ShapeClassifier:
    """The shipped classifier (``"shape-classifier"``) or one saved in a folder."""
    from .pipeline import MODELS_DIR

    folder = name_or_path if os.path.isdir(name_or_path) else os.path.join(MODELS_DIR, name_or_path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no classifier in {folder} (train one with `diffaccel train-small classifier`)")
    model = ShapeClassifier.from_pretrained(folder, local_files_only=True)
    return model.float().eval().to(device)


def _augment(x, gen):
    """Robustness to generated samples: small colour jitter, blur and noise (``x`` in [0, 1])."""
    b = x.shape[0]
    gain = 1 + 0.08 * torch.randn(b, 3, 1, 1, generator=gen)
    x = x * gain
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        kk = (k[:, None] * k[None, :]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
        x = torch.where(blur.view(-1, 1, 1, 1), F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kk, groups=3), x)
    sigma = 0.06 * torch.rand(b, 1, 1, 1, generator=gen)
    x = x + sigma * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def _batch(dataset, indices):
    items = [dataset[int(i) % len(dataset)] for i in indices]
    x = torch.stack([it["pixels"] for it in items]).add(1).div(2)
    return x, torch.stack([it["pairs"] for it in items]), torch.stack([it["background"] for it in items]), \
        [it["caption"] for it in items]


def train_classifier(output: str, work_dir: str, minutes: float = 60.0, max_steps: int | None = 4000,
                     batch_size: int = 64, lr: float = 2e-3, data_seed: int = 0, seed: int = 0, threads: int = 1,
                     device: str = "cpu", resume: bool = False, command: str | None = None, val_size: int = 1000):
    """Train the shape/colour classifier on the shapes dataset (``data_seed``; validation on ``data_seed + 1``),
    save it to ``output`` (``save_pretrained``) with ``training.json`` holding the validation accuracy."""
    from diffaccel.io import replace_folder

    from .train import check_output_folders, claim_work_dir, is_training_export

    if threads:
        torch.set_num_threads(int(threads))
    check_output_folders(output, work_dir)
    claim_work_dir(work_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ShapeClassifier().to(device)
    max_steps = max_steps or 4000
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max_steps, pct_start=0.1)
    train = ShapesDataset(data_seed, 10_000_000, CLASSIFIER_SIZE)
    t0 = time.time()
    step = 0
    while step < max_steps and time.time() - t0 < minutes * 60:
        x, pairs, bg, _ = _batch(train, range(step * batch_size, (step + 1) * batch_size))
        x = _augment(x, gen).to(device)
        pairs = pairs.to(device)
        pl, sl, cl, bl = model(x)
        grid = pairs.view(-1, len(SHAPES), len(COLOR_NAMES))
        loss = (F.binary_cross_entropy_with_logits(pl, pairs) * 10
                + F.binary_cross_entropy_with_logits(sl, grid.amax(2)) * 4
                + F.binary_cross_entropy_with_logits(cl, grid.amax(1)) * 4
                + F.cross_entropy(bl, bg.to(device)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 100 == 0:
            print(json.dumps(dict(step=step, loss=round(loss.item(), 4), minutes=round((time.time() - t0) / 60, 2))),
                  flush=True)
    model.eval()
    val = ShapesDataset(data_seed + 1, val_size, CLASSIFIER_SIZE)
    x, _, _, captions = _batch(val, range(val_size))
    acc = classifier_accuracy(model, x, captions)
    info = dict(steps=step, batch_size=batch_size, lr=lr, minutes_trained=round((time.time() - t0) / 60, 1),
                data_seed=data_seed, validation=dict(data_seed=data_seed + 1, samples=val_size, **acc),
                command=command)
    with replace_folder(output, is_training_export, arg="output (--output)") as tmp:
        model.save_pretrained(tmp)
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump(info, f, indent=2)
    print(json.dumps(info), flush=True)
    return info


@torch.no_grad()
def classifier_accuracy(classifier, images, captions) -> dict:
    """Mean accuracies of ``classifier`` on ``images`` (``[B, 3, H, W]`` or ``[B, 3, F, H, W]`` in [0, 1]) against
    the shapes, colours and backgrounds named by ``captions``: ``shape``, ``colour``, ``pair`` (fraction of
    prompted items found among the top-k predictions, k = shapes in the prompt; shapes and colours matched as
    multisets) and ``background``.  Video frames are classified one by one."""
    frames = _as_images(images).float()  # [B, N, 3, H, W]
    b, n = frames.shape[:2]
    totals = dict(shape=0.0, colour=0.0, pair=0.0, background=0.0)
    count = 0
    parsed = [parse_caption(c) for c in captions]
    for i in range(b):
        want, want_bg = parsed[i]
        got, got_bg = classifier.predict(frames[i], num_shapes=len(want))
        for pairs, bg in zip(got, got_bg):
            k = len(want)
            totals["shape"] += _multiset_hits([s for s, _ in want], [s for s, _ in pairs]) / k
            totals["colour"] += _multiset_hits([c for _, c in want], [c for _, c in pairs]) / k
            totals["pair"] += len(set(want) & set(pairs)) / k
            totals["background"] += float(bg == want_bg)
            count += 1
    return {k: v / max(count, 1) for k, v in totals.items()}


def _multiset_hits(want, got):
    got = list(got)
    hits = 0
    for w in want:
        if w in got:
            got.remove(w)
            hits += 1
    return hits


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """A method and its options; ``"dense"`` is full attention (no method applied)."""

    method: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.method
        return self.method + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.options.items())

    def __hash__(self):
        return hash(self.label)


def _fmt(v):
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return str(v)


def _split_top(text, sep=","):
    """Split on ``sep`` outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_setting(text: str, extra: list[str] | None = None) -> Setting:
    """``"method"`` or ``"method:key=value,key=value"`` (values as Python literals, e.g.
    ``"moba:block=(8,8),topk=2"``), plus ``extra`` ``"key=value"`` strings."""
    method, _, rest = text.partition(":")
    method = method.strip()
    options = {}
    for item in _split_top(rest) + list(extra or []):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"option {item!r} of setting {text!r} is not key=value")
        options[key.strip()] = _parse_value(value.strip())
    if method == "dense" and options:
        raise ValueError("dense (full attention) takes no options")
    return Setting(method, options)


def resolve_options(options: dict) -> dict:
    """``options`` with string values naming a shipped folder of ``pipelines/small/models`` (e.g.
    ``weights="small-unet-linfusion"``) replaced by its path (a path that exists as given is kept)."""
    from .pipeline import MODELS_DIR

    out = {}
    for k, v in options.items():
        if isinstance(v, str) and v and not os.path.exists(v) and os.sep not in v \
                and os.path.isdir(os.path.join(MODELS_DIR, v)):
            v = os.path.join(MODELS_DIR, v)
        out[k] = v
    return out


def _family(pipe) -> str:
    from diffaccel.api import denoisers
    from diffaccel.families import detect_family

    return detect_family(denoisers(pipe)[0][1])


def native_grid(pipe) -> tuple:
    """The token grid of a small pipeline at its native size: ``(H, W)`` (UNet: its first level), or
    ``(T, H, W)`` for video."""
    size = pipe.config.sample_size
    patch = getattr(pipe.denoiser.config, "patch_size", 1) or 1
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
    if _family(pipe) == "wan":
        return (max(pipe.config.num_frames // int(patch[0]), 1), size // int(patch[1]), size // int(patch[2]))
    side = size // 2  # the small image models see 16 x 16 tokens at their native size
    return (side, side)


def default_settings(pipe) -> list[Setting]:
    """The method settings evaluated by default for a small pipeline (``dense`` excluded): each registered method
    supporting the model's family at its ``default_settings`` sized on the native token grid (16 x 16 image tokens;
    video ``T x g x g``), plus the shipped students of ``diffaccel distill`` (:func:`distilled_settings`)."""
    from diffaccel.registry import methods

    fam = _family(pipe)
    grid = native_grid(pipe)
    s = []
    for m in methods():
        if fam not in m.families or m.default_settings is None:
            continue
        s += [Setting(m.name, dict(o)) for o in m.default_settings(grid)]
    return s + distilled_settings(pipe)


def distilled_settings(pipe) -> list[Setting]:
    """The shipped students of ``pipe``'s model (folders of ``pipelines/small/models`` whose ``training.json``
    records a ``diffaccel distill`` run on it): each its method and options with ``weights=<folder>``, so eval
    reports it next to the same setting undistilled."""
    from .pipeline import MODELS_DIR

    model = os.path.basename(os.path.normpath(str(pipe.config.get("_name_or_path", ""))))
    out = []
    for name in sorted(os.listdir(MODELS_DIR)):
        try:
            with open(os.path.join(MODELS_DIR, name, "training.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("kind") == "distill" and info.get("model") == model:
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in (info.get("options") or {}).items()}
            out.append(Setting(info["method"], {**options, "weights": name}))
    return out


# ----------------------------------------------------------------------------- evaluation


def eval_prompts(num: int, video: bool = False, seed: int = 0) -> list[str]:
    """``num`` single-shape prompts cycling through every (shape, colour) pair in a fixed shuffled order, each
    on a background of another colour."""
    rng = np.random.default_rng(seed)
    pairs = [(s, c) for s in SHAPES for c in COLOR_NAMES]
    order = rng.permutation(len(pairs))
    out = []
    for i in range(num):
        shape, colour = pairs[order[i % len(pairs)]]
        bgs = [c for c in COLOR_NAMES if c != colour]
        bg = bgs[rng.integers(len(bgs))]
        motion = f" moving {('left', 'right', 'up', 'down')[rng.integers(4)]}" if video else ""
        out.append(f"a {colour} {shape}{motion} on a {bg} background")
    return out


def _generate(pipe, prompts, seeds, height, width, steps, guidance, batch_size, **extra):
    """Samples ``[B, 3, (F,) H, W]`` in [0, 1] and seconds per sample (``extra``: more pipeline arguments).  The
    initial noise of prompt ``i`` is drawn from ``torch.Generator().manual_seed(seeds[i])`` whatever the batching.
    One untimed warm-up call (one prompt, two steps) first, so one-off costs (caches of the patterns' tables,
    first-call allocations) are not charged to the first setting measured."""
    pipe(prompts[:1], height=height, width=width, num_inference_steps=2, guidance_scale=guidance,
         generator=[torch.Generator().manual_seed(0)], output_type="pt", **extra)
    outs = []
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        ps = prompts[start:start + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        r = pipe(ps, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                 generator=gens, output_type="pt", **extra)
        outs.append(r.frames if hasattr(r, "frames") else r.images)
    seconds = (time.perf_counter() - t0) / len(prompts)
    return torch.cat(outs), seconds


def dense_accuracy(pipe, classifier, num_prompts: int, steps: int = 16, guidance: float = 4.0,
                   batch_size: int = 8, images: bool = False) -> dict:
    """The classifier's accuracy on ``pipe``'s samples of the first ``num_prompts`` :func:`eval_prompts` (video
    prompts for video models; with ``images``, a video model draws single frames from the image prompts) at the
    native size, seeds ``0 .. num_prompts - 1``, with whatever attention the pipeline has (full attention unless a
    method is applied)."""
    video = _family(pipe) == "wan"
    extra = dict(num_frames=1) if video and images else {}
    prompts = eval_prompts(num_prompts, video=video and not images)
    size = pipe.config.sample_size
    x, _ = _generate(pipe, prompts, range(num_prompts), size, size, steps, guidance, batch_size, **extra)
    return classifier_accuracy(classifier, x, prompts)


def evaluate(models=("small-flux",), settings=None, scales=(1, 2, 4), video_scales=None, num_prompts=8, steps=20,
             guidance=4.0, seed=0, batch_size=4, classifier="shape-classifier", device="cpu", progress=False,
             log=None):
    """Run the evaluation (module docstring).  ``settings``: ``None`` (:func:`default_settings` of each model) or a
    list of :class:`Setting` / setting strings (settings whose method does not support a model are skipped with a
    note).  ``video_scales``: the scales of video models (default ``scales``).  Returns ``dict(config=..., results=[row, ...])``; one row per (model, scale, setting), dense included."""
    import diffaccel
    from diffaccel.registry import get_method

    from .pipeline import SMALL_MODELS, load_small, resolve_small

    log = log or (lambda msg: print(msg, flush=True))
    clf = load_classifier(classifier, device) if classifier else None
    rows = []
    skipped = []
    prompts_used = {}
    for model_name in models:
        if resolve_small(model_name) is None:
            raise ValueError(f"eval runs on the small shapes models {sorted(SMALL_MODELS)} or folders holding one; "
                             f"got {model_name!r}")
        pipe = load_small(model_name, device=device)
        pipe.set_progress_bar_config(disable=not progress)
        fam = _family(pipe)
        video = fam == "wan"
        native = pipe.config.sample_size
        prompts = eval_prompts(num_prompts, video=video, seed=seed)
        prompts_used[model_name] = prompts
        seeds = [seed * 100_000 + i for i in range(num_prompts)]
        if settings is None:
            model_settings = default_settings(pipe)
        else:
            model_settings = []
            for s in settings:
                s = parse_setting(s) if isinstance(s, str) else s
                if s.method == "dense":
                    continue
                if fam not in get_method(s.method).families:
                    skipped.append(f"{s.label} on {model_name} ({fam}): not supported")
                    continue
                model_settings.append(s)
        for scale in (video_scales or scales) if video else scales:
            size = int(round(native * scale))
            log(f"# {model_name} {size}x{size}: dense")
            ref, ref_sec = _generate(pipe, prompts, seeds, size, size, steps, guidance, batch_size)
            base = dict(model=model_name, family=fam, scale=scale, height=size, width=size)
            row = dict(base, setting="dense", method="dense", psnr=PSNR_CAP, ssim=1.0, sec_per_sample=ref_sec,
                       speedup=1.0)
            if clf is not None:
                row.update({f"acc_{k}": v for k, v in classifier_accuracy(clf, ref, prompts).items()})
            rows.append(row)
            for s in model_settings:
                log(f"# {model_name} {size}x{size}: {s.label}")
                try:
                    diffaccel.apply(pipe, s.method, **resolve_options(s.options))
                except Exception as e:  # an invalid setting for this model: reported, not fatal
                    skipped.append(f"{s.label} on {model_name}: {type(e).__name__}: {e}")
                    continue
                try:
                    out, sec = _generate(pipe, prompts, seeds, size, size, steps, guidance, batch_size)
                finally:
                    diffaccel.remove(pipe)
                row = dict(base, setting=s.label, method=s.method, psnr=float(psnr(out, ref).mean()),
                           ssim=float(ssim(out, ref).mean()), sec_per_sample=sec, speedup=ref_sec / sec)
                if clf is not None:
                    row.update({f"acc_{k}": v for k, v in classifier_accuracy(clf, out, prompts).items()})
                rows.append(row)
    config = dict(models=list(models), scales=list(scales), num_prompts=num_prompts, steps=steps, guidance=guidance,
                  seed=seed, batch_size=batch_size, device=str(device), threads=torch.get_num_threads(),
                  classifier=classifier, prompts=prompts_used, skipped=skipped)
    return dict(config=config, results=rows)


def format_table(rows) -> str:
    cols = [("model", "model", "{}"), ("size", None, "{}"), ("setting", "setting", "{}"), ("PSNR", "psnr", "{:.2f}"),
            ("SSIM", "ssim", "{:.4f}"), ("shape", "acc_shape", "{:.2f}"), ("colour", "acc_colour", "{:.2f}"),
            ("pair", "acc_pair", "{:.2f}"), ("bg", "acc_background", "{:.2f}"), ("s/sample", "sec_per_sample", "{:.3f}"),
            ("speedup", "speedup", "{:.2f}x")]
    return _table(rows, cols, left=3)


def _table(rows, cols, left):
    """A text table of ``rows`` (dicts): ``cols`` are ``(title, key, format)`` (``"size"``: height x width); the
    first ``left`` columns left-aligned."""
    table = [[c[0] for c in cols]]
    for r in rows:
        line = []
        for name, key, fmt in cols:
            if name == "size":
                line.append(f"{r['height']}x{r['width']}")
            elif key in r and r[key] is not None:
                line.append(fmt.format(r[key]))
            else:
                line.append("-")
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot

_METHOD_COLORS = {"dense": (0, 0, 0), "neighborhood": (31, 119, 180), "clear": (255, 127, 14),
                  "linfusion": (44, 160, 44), "moba": (214, 39, 40)}


def plot_quality_speed(rows, path: str, metric: str = "psnr") -> str:
    """A PNG with one panel per (model, size): ``metric`` (PSNR by default; dense drawn at the top edge) against
    seconds per sample (log scale), one colour per method.  Drawn with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    panels = []
    for r in rows:
        key = (r["model"], r["height"], r["width"])
        if key not in panels:
            panels.append(key)
    pw, ph, margin = 360, 260, 50
    ncols = min(3, len(panels)) or 1
    nrows = math.ceil(len(panels) / ncols) or 1
    legend_h = 30
    img = Image.new("RGB", (ncols * pw, nrows * ph + legend_h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for pi, key in enumerate(panels):
        ox, oy = (pi % ncols) * pw, (pi // ncols) * ph + legend_h
        sub = [r for r in rows if (r["model"], r["height"], r["width"]) == key]
        ys = [r[metric] for r in sub if r["method"] != "dense"] or [0.0]
        y_lo = min(ys)
        y_hi = max(max(ys), y_lo + 1e-3)
        pad = 0.1 * (y_hi - y_lo) + (1.0 if metric == "psnr" else 0.01)
        y_lo, y_hi = y_lo - pad, y_hi + pad
        xs = [math.log10(max(r["sec_per_sample"], 1e-6)) for r in sub]
        x_lo, x_hi = min(xs) - 0.1, max(xs) + 0.1
        x0, y0, x1, y1 = ox + margin, oy + 20, ox + pw - 15, oy + ph - 35
        d.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        d.text((ox + margin, oy + 4), f"{os.path.basename(str(key[0]).rstrip('/'))} {key[1]}x{key[2]}: "
                                      f"{metric.upper()} vs speed", fill="black", font=font)
        d.text((x0 + (x1 - x0) // 2 - 60, y1 + 18), "seconds / sample (log)", fill="black", font=font)
        for frac in (0.0, 0.5, 1.0):
            yv = y_lo + frac * (y_hi - y_lo)
            yy = y1 - frac * (y1 - y0)
            d.text((ox + 4, yy - 6), f"{yv:.1f}" if metric == "psnr" else f"{yv:.3f}", fill=(80, 80, 80), font=font)
            xv = x_lo + frac * (x_hi - x_lo)
            xx = x0 + frac * (x1 - x0)
            d.text((xx - 14, y1 + 4), f"{10 ** xv:.3g}", fill=(80, 80, 80), font=font)
        for r in sub:
            xv = math.log10(max(r["sec_per_sample"], 1e-6))
            yv = min(r[metric], y_hi) if r["method"] != "dense" else y_hi
            px = x0 + (xv - x_lo) / (x_hi - x_lo) * (x1 - x0)
            py = y1 - (yv - y_lo) / (y_hi - y_lo) * (y1 - y0)
            col = _METHOD_COLORS.get(r["method"], (100, 100, 100))
            if r["method"] == "dense":
                d.polygon([(px, py - 6), (px - 5, py + 3), (px + 5, py + 3)], fill=col)
            else:
                d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=col)
    x = 8
    for m, col in _METHOD_COLORS.items():
        if any(r["method"] == m for r in rows):
            d.ellipse([x, 10, x + 8, 18], fill=col)
            d.text((x + 12, 8), m + (" (top edge)" if m == "dense" else ""), fill="black", font=font)
            x += 110
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


# ----------------------------------------------------------------------------- high-resolution chain


def evaluate_highres(models=("small-flux", "small-unet"), settings=None, scales=(4, 8), num_prompts=16,
                     steps=(16, 10), strength=None, single_stage=(), single_steps=10, guidance=4.0, seed=0,
                     batch_size=4, classifier="shape-classifier", device="cpu", log=None):
    """The high-resolution chain (:func:`diffaccel.pipelines.highres.generate_highres`) on the small models: does
    a native-size sample upscaled to ``scales`` x the native size stay the prompted picture?

    For each model and setting (``None``: dense and the first default setting of every method the model supports;
    video models also ``freeswim``), the :func:`eval_prompts` are generated once through the chain to the largest
    scale (stage 1 at the native size with full attention and ``steps[0]`` steps; each 2x stage with the setting,
    ``steps[1]`` schedule steps re-noised to ``strength``); the output of every stage at a requested scale is
    area-downscaled to the classifier's 32 x 32 and scored against the prompt (:func:`classifier_accuracy`).  The
    stage-1 outputs give the native-size accuracy of the same prompts and seeds (row ``scale`` 1).
    ``single_stage``: scales at which each setting also samples in one stage (``single_steps`` steps, the same
    seeds), the comparison.  Rows: ``mode`` (``"chain"``, ``"single"`` or ``"native"``), ``model``, ``setting``,
    ``scale``, sizes, ``acc_*`` and ``sec_per_sample`` (the chain's: every stage up to that scale)."""
    import diffaccel  # noqa: F401
    from diffaccel.registry import get_method

    from ..highres import FREESWIM, generate_highres, plan_stages
    from .pipeline import SMALL_MODELS, load_small, resolve_small

    log = log or (lambda msg: print(msg, flush=True))
    clf = load_classifier(classifier, device)
    rows = []
    scales = sorted(float(s) for s in scales)
    for model_name in models:
        if resolve_small(model_name) is None:
            raise ValueError(f"models must be small shapes models {sorted(SMALL_MODELS)} or folders holding one; "
                             f"got {model_name!r}")
        pipe = load_small(model_name, device=device)
        pipe.set_progress_bar_config(disable=True)
        fam = _family(pipe)
        video = fam == "wan"
        native = pipe.config.sample_size
        prompts = eval_prompts(num_prompts, video=video, seed=seed)
        seeds = [seed * 100_000 + i for i in range(num_prompts)]
        if settings is None:
            chosen, seen = [Setting("dense")], set()
            for s in default_settings(pipe):
                if s.method not in seen:
                    seen.add(s.method)
                    chosen.append(s)
            if video:
                chosen.append(Setting(FREESWIM))
        else:
            chosen = []
            for s in settings:
                s = parse_setting(s) if isinstance(s, str) else s
                if s.method in ("dense", FREESWIM) or fam in get_method(s.method).families:
                    if s.method != FREESWIM or video:
                        chosen.append(s)
            first = {}
            for d in default_settings(pipe):
                first.setdefault(d.method, d)
            chosen = [first.get(s.method, s) if not s.options else s for s in chosen]
        top = int(round(native * scales[-1]))
        sizes = plan_stages((native, native), top, top, pipe._size_multiple())
        stage_steps = [steps[0]] + [steps[min(i, len(steps) - 1)] for i in range(1, len(sizes))]
        extra = dict(guidance_scale=guidance)
        native_done = False
        for s in chosen:
            log(f"# {model_name}: chain to {top}x{top} ({[h for h, _ in sizes]}), {s.label}")
            outs = [[] for _ in sizes]
            secs = [0.0] * len(sizes)
            for start in range(0, num_prompts, batch_size):
                r = generate_highres(pipe, prompts[start:start + batch_size], height=top, width=top,
                                     method=s.method, options=dict(s.options), stages=sizes, strength=strength,
                                     num_inference_steps=stage_steps, seed=seeds[start:start + batch_size], **extra)
                for i, st in enumerate(r.stages):
                    secs[i] += st.seconds
                    outs[i].append(_stage_tensor(r.stage_outputs[i]))
                labels = [st.method_label for st in r.stages]
                strengths = [st.strength for st in r.stages]
            base = dict(model=model_name, family=fam, setting=s.label, method=s.method, steps=stage_steps,
                        strengths=strengths, stage_labels=labels)
            for i, (h, w) in enumerate(sizes):
                scale = h / native
                if i == 0 and native_done:
                    continue
                if i and not any(abs(scale - sc) < 1e-6 for sc in scales):
                    continue
                acc = classifier_accuracy(clf, torch.cat(outs[i]), prompts)
                row = dict(base, mode="native" if i == 0 else "chain", scale=scale, height=h, width=w,
                           sec_per_sample=sum(secs[:i + 1]) / num_prompts,
                           **{f"acc_{k}": v for k, v in acc.items()})
                if i == 0:
                    row.update(setting="dense", method="dense")
                rows.append(row)
                log(_row_line(row))
            native_done = True
            for scale in single_stage:
                size = int(round(native * scale))
                log(f"# {model_name}: single stage {size}x{size}, {s.label}")
                if s.method == FREESWIM:
                    from ..freeswim import FreeSwim

                    ctx = FreeSwim(pipe, **s.options)
                elif s.method != "dense":
                    ctx = _applied(pipe, s)
                else:
                    ctx = _nothing()
                with ctx:
                    x, sec = _generate(pipe, prompts, seeds, size, size, single_steps, guidance, batch_size)
                acc = classifier_accuracy(clf, x, prompts)
                row = dict(model=model_name, family=fam, setting=s.label, method=s.method, mode="single",
                           scale=float(scale), height=size, width=size, steps=[single_steps], sec_per_sample=sec,
                           **{f"acc_{k}": v for k, v in acc.items()})
                rows.append(row)
                log(_row_line(row))
    config = dict(models=list(models), scales=scales, num_prompts=num_prompts, steps=list(steps), strength=strength,
                  single_stage=list(single_stage), single_steps=single_steps, guidance=guidance, seed=seed,
                  batch_size=batch_size, device=str(device), threads=torch.get_num_threads(), classifier=classifier)
    return dict(config=config, results=rows)


def _stage_tensor(out):
    """PIL images (or lists of PIL frames) -> ``[B, 3, H, W]`` (``[B, 3, F, H, W]``) in [0, 1]."""
    def one(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)

    if isinstance(out[0], (list, tuple)):
        return torch.stack([torch.stack([one(f) for f in v], 1) for v in out])
    return torch.stack([one(im) for im in out])


class _applied:
    def __init__(self, pipe, setting):
        self.pipe, self.setting = pipe, setting

    def __enter__(self):
        import diffaccel

        diffaccel.apply(self.pipe, self.setting.method, **resolve_options(self.setting.options))

    def __exit__(self, *exc):
        import diffaccel

        diffaccel.remove(self.pipe)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _row_line(row):
    return (f"{row['mode']:6s} {row['model']} {row['height']}x{row['width']} {row['setting']}: shape "
            f"{row['acc_shape']:.2f} colour {row['acc_colour']:.2f} pair {row['acc_pair']:.2f} bg "
            f"{row['acc_background']:.2f}  {row['sec_per_sample']:.1f} s/sample")


def format_highres_table(rows) -> str:
    """A table of :func:`evaluate_highres` rows."""
    cols = [("model", "model", "{}"), ("mode", "mode", "{}"), ("size", None, "{}"), ("setting", "setting", "{}"),
            ("shape", "acc_shape", "{:.2f}"), ("colour", "acc_colour", "{:.2f}"), ("pair", "acc_pair", "{:.2f}"),
            ("bg", "acc_background", "{:.2f}"), ("s/sample", "sec_per_sample", "{:.1f}")]
    return _table(rows, cols, left=4)
