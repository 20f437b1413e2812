"""diffaccel demo: high-resolution generation in the browser, with full attention side by side.

    pip install -e ".[demo]"
    python app.py                          # http://127.0.0.1:7860 (--host, --port or GRADIO_SERVER_PORT)

Pick a model (the shipped small-flux, small-unet, small-wan; a local diffusers folder; a Hub id already in
the local cache), a method among those the model supports and its options, a target size; Generate runs the
high-resolution chain (``diffaccel.pipelines.highres``), optionally also with full attention,
and shows the results, the time of every stage, the speedup, this run's peak memory, and which tokens a
clicked query attends to under the method.  Offline: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import re
import tempfile
import threading
import uuid
from collections import OrderedDict

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw

from diffaccel import pattern as attention_pattern
from diffaccel.pipelines import probe
from diffaccel.pipelines.small import SMALL_MODELS

DEFAULT_MODEL = "small-flux"
DEFAULT_PROMPT = "a red circle and a blue square on a yellow background"
VIEW_PX = 320  # results are shown at least this large (nearest-neighbour upscaling by an integer factor)
PATTERN_PX = 320
MAX_LOADED = 2  # pipelines kept in memory
MAX_GIFS = 64  # video results kept on disk (in a temporary folder of this process)
ALLOW_DOWNLOAD = False  # --allow-download: Hub ids not in the local cache are downloaded
CSS = "#report table th, #report table td { white-space: nowrap; }"


# =============================================================================================== seams
# Everything the demo takes from the library is reached through the functions of this section.


def _generate_highres():
    from diffaccel.pipelines.highres import generate_highres

    return generate_highres


def model_family(pipe) -> str:
    """The diffaccel model family of a pipeline's denoiser."""
    from diffaccel.families import detect_family

    return detect_family(probe.denoiser_of(pipe))


def supported_methods(family: str) -> list[str]:
    """``dense`` plus every registered method whose families include ``family``."""
    from diffaccel.registry import available_methods, get_method

    return ["dense"] + [m for m in available_methods() if family in get_method(m).families]


def all_methods() -> list[str]:
    from diffaccel.registry import available_methods

    return ["dense"] + list(available_methods())


def options_class(method: str):
    from diffaccel.registry import get_method

    return get_method(method).options_cls


def shipped_weights(model: str, method: str) -> str | None:
    """The distilled weights shipped for ``method`` on a small model, by convention the folder
    ``<models dir>/<model>-<method>`` (e.g. ``small-unet-linfusion``); ``None`` when there are none."""
    from diffaccel.pipelines.small import MODELS_DIR

    name = f"{model}-{method}"
    if model in SMALL_MODELS and os.path.isdir(os.path.join(MODELS_DIR, name)):
        return name
    return None


def suggested_options(model: str, pipe, method: str) -> dict:
    """Option values to start from: the evaluation's first setting of ``method`` for this model (sized on its
    native token grid), and the shipped distilled weights where they exist (with the setting they were
    trained for)."""
    if method == "dense":
        return {}
    try:
        from diffaccel.pipelines.small.evaluate import default_settings

        out = next((dict(s.options) for s in default_settings(pipe) if s.method == method), {})
    except Exception:  # a pipeline the small-model settings do not describe
        out = {}
    weights = shipped_weights(model, method)
    if weights is not None and "weights" in {f.name for f in dataclasses.fields(options_class(method))}:
        from diffaccel.pipelines.small.evaluate import distilled_settings

        # a student trained by `diffaccel distill` starts from the setting it was trained for (its training.json)
        student = next((st for st in distilled_settings(pipe)
                        if st.method == method and st.options.get("weights") == weights), None)
        out = dict(student.options) if student is not None else {**out, "weights": weights}
    return out


def resolve_option_values(options: dict) -> dict:
    """Option values naming a shipped folder (``weights="small-unet-linfusion"``) as paths."""
    from diffaccel.pipelines.small.evaluate import resolve_options

    return resolve_options(options)


def applied_method(pipe):
    from diffaccel.api import applied_method as applied

    return applied(probe.denoiser_of(pipe))


# ============================================================================ media helpers


def _to_pil_frames(video) -> list:
    if isinstance(video, (list, tuple)) and all(isinstance(f, Image.Image) for f in video):
        return list(video)
    arr = np.asarray(video)
    return [Image.fromarray(np.rint(np.clip(f, 0, 1) * 255).astype(np.uint8)) for f in arr]


def _format_options(options: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


# ====================================================================================== model cache

_PIPES: OrderedDict = OrderedDict()
_LOAD_LOCK = threading.Lock()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: str):
    """A loaded pipeline for ``name`` (cached); ``ValueError`` naming it when it cannot be loaded."""
    name = (name or "").strip()
    if not name:
        raise ValueError(f"model: give a small model name ({', '.join(SMALL_MODELS)}), a diffusers pipeline "
                         "folder or a Hub id in the local cache")
    with _LOAD_LOCK:
        if name in _PIPES:
            _PIPES.move_to_end(name)
            return _PIPES[name]
        from diffaccel.pipelines import load_pipeline

        try:
            pipe = load_pipeline(name, device=device(), allow_download=ALLOW_DOWNLOAD)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        except (OSError, TypeError, KeyError) as e:
            raise ValueError(f"model: cannot load {name!r}: {e}") from None
        probe.denoiser_of(pipe)  # a pipeline without a denoiser is no use here
        _PIPES[name] = pipe
        while len(_PIPES) > MAX_LOADED:
            _PIPES.popitem(last=False)
        return pipe


# ===================================================================================== option fields

REQUIRED = object()


def _choices(method, name):
    if name == "selection":
        from diffaccel.ops import MOBA_SELECTIONS

        return tuple(MOBA_SELECTIONS)
    if name == "backend":
        from diffaccel.registry import get_method

        return ("auto",) + tuple(get_method(method).backends)
    return None


@dataclasses.dataclass(frozen=True)
class OptionField:
    """One option of a method as a form field: ``kind`` is ``bool``, ``int``, ``float``, ``choice`` (a
    dropdown; ``"auto"`` = ``None``) or ``literal`` (a Python literal, e.g. ``(9, 9)``; a bare word is a
    string; empty = the default)."""

    method: str
    name: str
    kind: str
    default: object
    annotation: str
    choices: tuple = ()
    help: str = ""

    @property
    def label(self) -> str:
        req = ", required" if self.default is REQUIRED else ""
        return f"{self.name} ({self.annotation}{req})"

    def initial(self, value=REQUIRED):
        """The form value showing option value ``value`` (default: the dataclass default)."""
        v = self.default if value is REQUIRED else value
        if v is REQUIRED:
            v = None
        if self.kind == "bool":
            return bool(v)
        if self.kind in ("int", "float"):
            return v
        if self.kind == "choice":
            return "auto" if v is None else v
        return "" if v is None else (v if isinstance(v, str) else repr(v))

    def parse(self, raw):
        """The option value of form value ``raw``; ``REQUIRED`` when empty (the default applies)."""
        if self.kind == "bool":
            return bool(raw)
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return REQUIRED
        if self.kind == "int":
            if isinstance(raw, float) and not raw.is_integer():
                raise ValueError(f"{self.method} option {self.name} must be an integer, got {raw!r}")
            return int(raw)
        if self.kind == "float":
            return float(raw)
        if self.kind == "choice":
            return None if raw == "auto" else raw
        text = raw.strip()
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text  # a bare word: a string (a path, a Hub id, a shipped folder name)


def _field_help(cls) -> dict:
    """``{field: text}`` from ``name: text`` paragraphs of the options class's docstring."""
    out, current = {}, None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"^\s{4}([a-z_]+(?:, [a-z_]+)*): (.*)$", line)
        if m:
            current = m.group(1).split(", ")
            for n in current:
                out[n] = m.group(2).strip()
        elif current and line.startswith("        ") and line.strip():
            for n in current:
                out[n] += " " + line.strip()
        else:
            current = None
    out = {k: re.sub(r":\w+:|``", "", v) for k, v in out.items()}
    return {k: (v.split(". ")[0].rstrip(".") + "." if ". " in v else v) for k, v in out.items()}


def option_fields(method: str) -> list[OptionField]:
    """The form fields of ``method``'s options dataclass (its ``init`` fields, in order)."""
    if method == "dense":
        return []
    cls = options_class(method)
    helps = _field_help(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        types = {t.strip() for t in annotation.split("|")} - {"None"}
        choices = _choices(method, f.name)
        optional = "None" in {t.strip() for t in annotation.split("|")}
        if types == {"bool"}:
            kind = "bool"
        elif choices:
            kind = "choice"
        elif types == {"int"} and not optional:
            kind = "int"
        elif types == {"float"} and not optional:
            kind = "float"
        else:  # a Python literal; optional numbers too (an empty field is None, a number field would show 0)
            kind = "literal"
        fields.append(OptionField(method, f.name, kind, default, annotation, choices or (), helps.get(f.name, "")))
    return fields


def parse_options(method: str, raw: dict) -> dict:
    """Option values from form values ``{name: raw}``; empty fields are left to their defaults, a required
    one left empty is a ``ValueError`` naming it."""
    out = {}
    for field in option_fields(method):
        if field.name not in raw and field.default is not REQUIRED:
            continue
        value = field.parse(raw.get(field.name))
        if value is REQUIRED:
            if field.default is REQUIRED:
                raise ValueError(f"{method} option {field.name} is required")
            continue
        if field.default is not REQUIRED and type(value) is type(field.default) and value == field.default:
            continue
        out[field.name] = value
    return out


# ========================================================================================= requests


@dataclasses.dataclass
class Request:
    """One click of Generate, as the form holds it."""

    model: str = DEFAULT_MODEL
    method: str = "dense"
    options: dict = dataclasses.field(default_factory=dict)  # raw form values of the method's fields
    prompt: str = DEFAULT_PROMPT
    height: int | None = None
    width: int | None = None
    steps: int = 20
    seed: int = 0
    guidance_scale: float | str | None = None
    num_frames: int | None = None
    compare: bool = True
    first_stage_method: bool = False
    stages: str = ""
    strength: float | str | None = None
    tiled_vae: bool = False
    cpu_offload: bool = False


def _positive_int(name, value, default=None):
    if value is None or (isinstance(value, str) and not value.strip()):
        if default is None:
            raise ValueError(f"{name} is required")
        return default
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if not f.is_integer() or f < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(f)


def _optional_float(name, value):
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return f


def parse_stages(text: str):
    """``"64x64, 128x128"`` (or ``"64, 128"`` for squares) -> ``[(64, 64), (128, 128)]``; empty -> ``None``."""
    text = (text or "").strip()
    if not text:
        return None
    out = []
    for item in text.split(","):
        parts = [p.strip() for p in item.lower().split("x")]
        if len(parts) == 1:
            parts = parts * 2
        if len(parts) != 2:
            raise ValueError(f"stages must be sizes like '64x64, 128x128', got {item.strip()!r}")
        out.append(tuple(_positive_int("stages", p) for p in parts))
    return out


@dataclasses.dataclass
class Plan:
    """A request checked against the model, before anything is generated."""

    pipe: object
    model: str
    family: str
    method: str
    options: dict
    label: str
    height: int
    width: int
    num_frames: int | None
    layout: probe.TokenLayout
    estimate: probe.MemoryEstimate
    pattern_core: object
    stages: list | None
    request: Request


def plan(req: Request) -> Plan:
    """Check everything about ``req`` that can be checked before generating: the model loads, the method
    supports its family, the options build and apply, sizes and the chain's settings, and the estimated memory
    fits the device.  ``ValueError`` with a message naming what is wrong."""
    import diffaccel

    pipe = load_model(req.model)
    family = model_family(pipe)
    methods = supported_methods(family)
    if req.method not in methods:
        known = all_methods()
        if req.method not in known:
            raise ValueError(f"method must be one of {known}, got {req.method!r}")
        raise ValueError(f"method {req.method!r} does not support {req.model} ({family!r} models); "
                         f"it supports: {', '.join(methods)}")
    options = parse_options(req.method, req.options)
    pattern_core = attention_pattern.attention_core(req.method, options, family)  # the options' own checks
    resolved = resolve_option_values(options)
    if req.method != "dense":  # the family's checks (grid axes, weights): applied, then removed at once
        diffaccel.apply(pipe, req.method, **resolved)
        diffaccel.remove(pipe)
    h0, w0 = probe.native_size(pipe)
    height = _positive_int("height", req.height, h0)
    width = _positive_int("width", req.width, w0)
    steps = _positive_int("steps", req.steps)
    req.guidance_scale = _optional_float("guidance scale", req.guidance_scale)
    if req.guidance_scale is not None and req.guidance_scale < 0:
        raise ValueError(f"guidance scale must be a non-negative number, got {req.guidance_scale!r}")
    try:
        req.seed = int(req.seed or 0)
    except (TypeError, ValueError):
        raise ValueError(f"seed must be an integer, got {req.seed!r}") from None
    req.steps = steps
    stages = parse_stages(req.stages)
    req.strength = _optional_float("strength", req.strength)
    if req.strength is not None and not 0 < req.strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {req.strength!r}")
    layout = probe.token_layout(pipe, height, width, num_frames=None, guidance_scale=req.guidance_scale)
    video = len(layout.grid) == 3
    num_frames = None
    if video:
        num_frames = _positive_int("frames", req.num_frames, _native_frames(pipe))
        layout = probe.token_layout(pipe, height, width, num_frames=num_frames, guidance_scale=req.guidance_scale)
    estimate = probe.estimate_memory(layout, pixels=height * width * (num_frames or 1))
    free = probe.available_memory(device())
    if estimate.bytes > free:
        raise ValueError(f"{height}x{width} needs an estimated {estimate}, more than the "
                         f"{probe.format_bytes(free)} available on {device().type}; choose a smaller size")
    # the op itself once at the target grid: the options' grid-dependent checks (e.g. dilation x kernel)
    q = torch.zeros(1, math.prod(layout.grid), 1, 8)
    pattern_core(q, q, q, grid=layout.grid, text_len=0, text_first=True)
    label = req.method if req.method == "dense" else f"{req.method}({_format_options(options)})"
    return Plan(pipe, req.model.strip(), family, req.method, resolved, label, height, width, num_frames, layout,
                estimate, pattern_core, stages, req)


def _native_frames(pipe):
    n = getattr(getattr(pipe, "config", None), "num_frames", None)
    if isinstance(n, int):
        return n
    p = inspect.signature(pipe.__call__).parameters.get("num_frames")
    return p.default if p is not None and isinstance(p.default, int) else 1


# ======================================================================================== generation


@dataclasses.dataclass
class RunResult:
    label: str
    output: object  # diffaccel.pipelines.highres.HighresOutput
    peak: int
    peak_how: str

    @property
    def frames(self) -> list:
        """The result as frames: ``[image]`` or the video's frames."""
        video = getattr(self.output, "frames", None)
        if video:
            return _to_pil_frames(video[0])
        return [self.output.images[0]]


class _LastCall:
    """Keeps the inputs of the denoiser's last call (for the attention-pattern capture)."""

    def __init__(self, model):
        self.call = None
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.call = (args, dict(kwargs))

    def remove(self):
        self._handle.remove()


def generate(p: Plan, method: str, progress=None, run_index: int = 0, num_runs: int = 1, keep_call=False):
    """One run of the chain with ``method`` (``"dense"`` or the plan's); ``progress(fraction, text)`` after
    every denoising step of every stage.  Returns ``(RunResult, last denoiser call or None)``."""
    req = p.request
    gen = _generate_highres()
    name = "full attention" if method == "dense" else p.method

    def on_step(stage, num_stages, step, steps):
        if progress is not None:
            done = (stage + min(step, steps) / max(steps, 1)) / max(num_stages, 1)
            progress((run_index + done) / num_runs,
                     f"{name}: stage {stage + 1}/{num_stages}, step {min(step, steps)}/{steps}")

    recorder = _LastCall(probe.denoiser_of(p.pipe)) if keep_call else None
    try:
        with probe.PeakMemory(device()) as peak:
            out = gen(p.pipe, req.prompt, height=p.height, width=p.width, method=method,
                      options=None if method == "dense" else p.options,
                      first_stage_method=req.first_stage_method, stages=p.stages, strength=req.strength,
                      num_inference_steps=req.steps, seed=req.seed, guidance_scale=req.guidance_scale,
                      num_frames=p.num_frames, step_callback=on_step, tiled_vae=req.tiled_vae,
                      cpu_offload=req.cpu_offload)
    finally:
        if recorder is not None:
            recorder.remove()
        if applied_method(p.pipe) is not None:  # never leave a method applied after a failure
            import diffaccel

            diffaccel.remove(p.pipe)
    label = "full attention" if method == "dense" else p.label
    return RunResult(label, out, peak.bytes, peak.how), (recorder.call if recorder else None)


# ========================================================================================== pattern

@dataclasses.dataclass
class PatternContext:
    """What the pattern picture needs to redraw for another query."""

    core: object
    method: str
    options: dict
    grid: tuple
    text_len: int
    text_first: bool
    frames: list  # PIL images, the result (one per video frame)
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    note: str = ""
    heads: int = 1


_CONTEXTS: OrderedDict = OrderedDict()
_MAX_CONTEXTS = 16


def _store(ctx: PatternContext) -> str:
    token = uuid.uuid4().hex
    _CONTEXTS[token] = ctx
    while len(_CONTEXTS) > _MAX_CONTEXTS:
        _CONTEXTS.popitem(last=False)
    return token


def pattern_context(p: Plan, result: RunResult, last_call) -> PatternContext:
    """The pattern of the plan's method on the first self-attention layer at the target size."""
    lay = p.layout
    frames = result.frames
    ctx = PatternContext(p.pattern_core, p.method, p.options, lay.grid, lay.text_len, lay.text_first, frames)
    if p.method == "moba":
        ctx.note = ("MoBA picks blocks from the data: the q and k drawn here are those of the first "
                    "self-attention layer, recorded from a full-attention forward on the input of the last "
                    "denoising step (first batch element); brightness = share of heads selecting each key")
        if last_call is None:
            raise ValueError("the last denoiser call was not recorded")
        qk = attention_pattern.capture_self_attention(probe.denoiser_of(p.pipe), *last_call, n_tokens=lay.tokens)
        if qk is None:
            ctx.core = None
            ctx.note = "MoBA's selection depends on q and k, and this model's were not captured: nothing drawn"
        else:
            ctx.q, ctx.k = qk[0][0].float().cpu(), qk[1][0].float().cpu()
            ctx.heads = ctx.q.shape[1]
        if p.options.get("dense_steps"):
            ctx.note += f"; the first {p.options['dense_steps']} steps run full attention"
    elif p.method == "linfusion":
        ctx.note = "linear attention: every query attends to every key, with kernel-feature weights"
    elif p.method == "dense":
        ctx.note = "full attention: every query attends to every key"
    return ctx


def _frame_for(ctx: PatternContext, t: int) -> Image.Image:
    T = ctx.grid[0] if len(ctx.grid) == 3 else 1
    n = len(ctx.frames)
    return ctx.frames[min(n - 1, round(t * (n - 1) / max(T - 1, 1)))] if T > 1 else ctx.frames[0]


def render_pattern(ctx: PatternContext, query: tuple):
    """``(picture, caption)``: the result with the keys ``query`` attends to lit (the share of heads for a
    per-head pattern), everything else dimmed, the query outlined in red; one panel per frame for video."""
    if ctx.core is None:
        return None, ctx.note
    vis = attention_pattern.visible_keys(ctx.core, ctx.grid, query, text_len=ctx.text_len,
                                         text_first=ctx.text_first, q=ctx.q, k=ctx.k)
    share = vis.share
    grid = ctx.grid if len(ctx.grid) == 3 else (1, *ctx.grid)
    share = share.reshape(grid)
    T, gh, gw = grid
    cell = _pattern_cell(ctx.grid)
    qt, qy, qx = (query if len(query) == 3 else (0, *query))
    panels = []
    for t in range(T):
        base = _frame_for(ctx, t).convert("RGB").resize((gw * cell, gh * cell), Image.BILINEAR)
        a = np.asarray(base, dtype=np.float32)
        s = np.kron(share[t], np.ones((cell, cell), dtype=np.float32))[..., None]
        lit = 0.55 * a + 0.45 * np.array([60, 230, 90], dtype=np.float32)
        a = np.where(s > 0, s * lit + (1 - s) * 0.2 * a, 0.2 * a)
        img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
        if t == qt:
            d = ImageDraw.Draw(img)
            w = max(1, cell // 4)
            d.rectangle([qx * cell - w, qy * cell - w, (qx + 1) * cell - 1 + w, (qy + 1) * cell - 1 + w],
                        outline=(255, 40, 40), width=w + 1)
        panels.append(img)
    gap = 6 if T > 1 else 0
    pic = Image.new("RGB", (T * gw * cell + (T - 1) * gap, gh * cell), (255, 255, 255))
    for t, img in enumerate(panels):
        pic.paste(img, (t * (gw * cell + gap), 0))
    heads = vis.image.shape[0]
    counts = vis.image.reshape(heads, -1).sum(1)
    union = int(vis.image.any(axis=0).sum())
    total = math.prod(ctx.grid)
    where = f"frame {qt}, row {qy}, column {qx}" if len(ctx.grid) == 3 else f"row {qy}, column {qx}"
    dims = "x".join(map(str, ctx.grid))
    text = int(vis.text.any(axis=0).sum())
    lo, hi = int(counts.min()), int(counts.max())
    n = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
    parts = [f"Query token at {where} of the {dims} token grid of the first self-attention layer attends to "
             f"**{n} of {total:,} image tokens** ({100 * hi / total:.1f}%)"]
    if heads > 1 and union != hi:
        parts[0] += f" in each of its {heads} heads, {union:,} in all"
    if ctx.text_len:
        parts.append(f"and {text} of {ctx.text_len} text tokens")
    if int(vis.extra.max()) > 0:
        parts.append(f"plus {int(vis.extra.max())} pooled tokens")
    caption = " ".join(parts) + ". Read off the method's attention op by a one-hot probe; click the result " \
                                "or this picture to pick another query."
    if ctx.note:
        caption += f" ({ctx.note}.)"
    return pic, caption


def query_from_click(ctx: PatternContext, x: float, y: float, width: int, height: int, panels: bool = False):
    """The grid position under pixel ``(x, y)`` of a ``width x height`` picture of the result (``panels``: the
    pattern picture, one panel per frame with 6 px gaps)."""
    grid = ctx.grid if len(ctx.grid) == 3 else (1, *ctx.grid)
    T, gh, gw = grid
    t = T // 2
    if panels and T > 1:
        panel_w = (width - 6 * (T - 1)) / T
        t = min(T - 1, int(x // (panel_w + 6)))
        x = x - t * (panel_w + 6)
        width = panel_w
    qy = min(gh - 1, max(0, int(y * gh / height)))
    qx = min(gw - 1, max(0, int(x * gw / width)))
    return (t, qy, qx) if len(ctx.grid) == 3 else (qy, qx)


def _pattern_cell(grid) -> int:
    T = grid[0] if len(grid) == 3 else 1
    gh, gw = grid[-2:]
    cell = max(1, PATTERN_PX // max(gh, gw))
    return max(1, min(cell, 1200 // (T * gw))) if T > 1 else cell


def displayed_size(ctx: PatternContext, panels: bool) -> tuple[int, int]:
    """``(width, height)`` of the pattern picture (``panels``) or of the shown result."""
    if panels:
        T = ctx.grid[0] if len(ctx.grid) == 3 else 1
        gh, gw = ctx.grid[-2:]
        cell = _pattern_cell(ctx.grid)
        return T * gw * cell + (T - 1) * 6, gh * cell
    w, h = ctx.frames[0].size
    f = max(1, math.ceil(VIEW_PX / min(w, h)))
    return w * f, h * f


def req_size(result: RunResult) -> str:
    s = result.output.stages[-1]
    return f"{s.height}x{s.width}"


def _first_method(methods) -> str:
    """The method selected first: neighborhood where the model supports it, else the first non-dense one."""
    return "neighborhood" if "neighborhood" in methods else next((m for m in methods if m != "dense"), "dense")


def default_query(grid) -> tuple:
    return tuple(n // 2 for n in grid)


# ========================================================================================== display

_OUT_DIR = None


def _out_dir():
    global _OUT_DIR
    if _OUT_DIR is None:
        _OUT_DIR = tempfile.mkdtemp(prefix="diffaccel-demo-")
    return _OUT_DIR


def viewable(frames: list):
    """An image (or an animated GIF's path for several frames) upscaled by an integer factor to at least
    ``VIEW_PX`` on its short side (nearest neighbour: pixels stay pixels)."""
    w, h = frames[0].size
    f = max(1, math.ceil(VIEW_PX / min(w, h)))
    big = [fr.convert("RGB").resize((w * f, h * f), Image.NEAREST) for fr in frames]
    if len(big) == 1:
        return big[0]
    folder = _out_dir()
    path = os.path.join(folder, f"{uuid.uuid4().hex}.gif")
    big[0].save(path, save_all=True, append_images=big[1:], duration=250, loop=0)
    # this process's own folder: keep the newest MAX_GIFS
    old = sorted((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getmtime)[:-MAX_GIFS]
    for f in old:
        os.remove(f)
    return path


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def report(p: Plan, runs: list[RunResult]) -> str:
    """Markdown: one row per stage (size, steps, strength, each run's seconds), totals, speedup, peak memory."""
    rows = ["| stage | size | steps | strength | " + " | ".join(r.label for r in runs) + " |",
            "|---" * (4 + len(runs)) + "|"]
    for i, stage in enumerate(runs[-1].output.stages):
        strength = getattr(stage, "strength", None)
        strength = "" if strength is None else f"{strength:g}"
        cells = []
        for r in runs:
            st = r.output.stages[i] if i < len(r.output.stages) else None
            if st is None:
                cells.append("")
                continue
            dense_here = r is runs[-1] and p.method != "dense" and st.method_label == "dense"
            cells.append(f"{st.seconds:.2f} s" + (" (full attention)" if dense_here else ""))
        rows.append(f"| {i + 1} | {stage.height}x{stage.width} | {stage.steps} | {strength} | " + " | ".join(cells)
                    + " |")
    lines = ["\n".join(rows), ""]
    totals = " · ".join(f"{r.label}: **{r.output.seconds:.2f} s**, peak memory {probe.format_bytes(r.peak)}"
                        for r in runs)
    lines.append(f"Total: {totals} ({runs[0].peak_how} of this run).")
    if len(runs) == 2:
        lines.append(f"Speedup over full attention: **{runs[0].output.seconds / runs[1].output.seconds:.2f}x**; "
                     f"PSNR to full attention {psnr(runs[0].frames[0], runs[1].frames[0]):.2f} dB.")
    lines.append(f"Estimated memory need at {p.height}x{p.width}: {p.estimate}.")
    return "\n\n".join(lines)


# ========================================================================================== the page


def run(req: Request, progress=None):
    """Plan and generate; returns ``(dense RunResult or None, method RunResult, report, PatternContext)``."""
    p = plan(req)
    compare = req.compare and p.method != "dense"
    n = 2 if compare else 1
    runs = []
    if compare:
        runs.append(generate(p, "dense", progress, 0, n)[0])
    result, last = generate(p, p.method, progress, n - 1, n, keep_call=p.method == "moba")
    runs.append(result)
    ctx = pattern_context(p, result, last)
    return (runs[0] if compare else None), result, report(p, runs), ctx


def _message(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    if isinstance(e, torch.OutOfMemoryError):
        return f"out of memory: {text}"
    if isinstance(e, (ValueError, TypeError, KeyError, SystemExit)):
        return text
    return f"{type(e).__name__}: {text}"


def model_settings(model: str):
    """What the form shows for ``model``: ``(methods, native (h, w), video, frames, {method: {field: value}})``."""
    pipe = load_model(model)
    family = model_family(pipe)
    methods = supported_methods(family)
    h, w = probe.native_size(pipe)
    lay = probe.token_layout(pipe, h, w)
    video = len(lay.grid) == 3
    values = {}
    for m in all_methods():
        sugg = suggested_options(model.strip(), pipe, m) if m in methods else {}
        values[m] = {f.name: f.initial(sugg.get(f.name, REQUIRED)) for f in option_fields(m)}
    return methods, (h, w), video, (_native_frames(pipe) if video else None), values


def _field_component(f: OptionField, value):
    kw = dict(label=f.label, info=f.help or None, elem_id=f"opt-{f.method}-{f.name}")
    if f.kind == "bool":
        return gr.Checkbox(value=value, **kw)
    if f.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if f.kind == "int" else None, **kw)
    if f.kind == "choice":
        return gr.Dropdown(list(f.choices), value=value, **kw)
    return gr.Textbox(value=value, placeholder="required" if f.default is REQUIRED else "empty: default", **kw)


def build_demo(default_model: str = DEFAULT_MODEL):
    """The page (see the README's Demo section for what each control does)."""
    methods0, (h0, w0), video0, frames0, values0 = model_settings(default_model)
    method0 = _first_method(methods0)
    fields = {m: option_fields(m) for m in all_methods()}

    with gr.Blocks(title="diffaccel") as demo:
        gr.Markdown("# diffaccel: high-resolution generation\nA diffaccel attention pattern against full "
                    "attention: same prompt, seed and stages; time per stage, speedup, peak memory, and which "
                    "tokens a query attends to.")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Row():
                    model = gr.Dropdown(list(SMALL_MODELS), value=default_model, label="model",
                                        allow_custom_value=True, elem_id="model",
                                        info="a shipped small model, a diffusers pipeline folder or a Hub id "
                                             "in the local cache")
                    method = gr.Dropdown(methods0, value=method0, label="method", elem_id="method",
                                         info="the methods this model supports")
                boxes, comps = {}, []
                for m in all_methods():
                    with gr.Group(visible=(m == method0)) as box:
                        for i in range(0, len(fields[m]), 2):
                            with gr.Row():
                                for f in fields[m][i:i + 2]:
                                    v = values0.get(m, {}).get(f.name, f.initial())
                                    comps.append((m, f.name, _field_component(f, v)))
                    boxes[m] = box
                prompt = gr.Textbox(value=DEFAULT_PROMPT, label="prompt", elem_id="prompt")
                with gr.Row():
                    height = gr.Number(value=2 * h0, label="height (px)", precision=0, info=f"native {h0}",
                                       elem_id="height")
                    width = gr.Number(value=2 * w0, label="width (px)", precision=0, info=f"native {w0}",
                                      elem_id="width")
                    frames = gr.Number(value=frames0, label="frames", precision=0, visible=video0, elem_id="frames")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="steps per stage", elem_id="steps")
                    seed = gr.Number(value=0, label="seed", precision=0, elem_id="seed")
                    guidance = gr.Textbox(value="", label="guidance scale", placeholder="pipeline default",
                                          elem_id="guidance")
                with gr.Accordion("high-resolution chain", open=False):
                    with gr.Row():
                        stages = gr.Textbox(label="stages", placeholder="automatic: native size, then 2x steps",
                                            info="sizes like 64x64, 128x128")
                        strength = gr.Textbox(label="strength", placeholder="the chain's schedule",
                                              info="re-noising of the later stages, in (0, 1]")
                    with gr.Row():
                        first_stage = gr.Checkbox(value=False, label="method on the first stage too")
                        tiled_vae = gr.Checkbox(value=False, label="tiled VAE")
                        offload = gr.Checkbox(value=False, label="CPU offload (accelerate)")
                compare = gr.Checkbox(value=True, label="also run full attention, side by side", elem_id="compare")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown("", elem_id="status", min_height=60)
            with gr.Column(scale=1):
                with gr.Row():
                    dense_out = gr.Image(label="full attention", interactive=False, elem_id="dense-out",
                                         height=VIEW_PX)
                    method_out = gr.Image(label="diffaccel (click: pick a query)", interactive=False,
                                          elem_id="method-out", height=VIEW_PX)
                result_md = gr.Markdown(elem_id="report")
                pattern_img = gr.Image(label="attention pattern (click: pick a query)", interactive=False,
                                       elem_id="pattern", height=VIEW_PX)
                pattern_md = gr.Markdown(elem_id="pattern-caption")
        state = gr.State(None)

        def on_model(name):
            try:
                methods, (h, w), video, nf, values = model_settings(name)
            except Exception as e:  # noqa: BLE001 - every failure is shown in the page
                raise gr.Error(_message(e)) from None
            m0 = _first_method(methods)
            ups = [gr.update(choices=methods, value=m0), gr.update(value=2 * h, info=f"native {h}"),
                   gr.update(value=2 * w, info=f"native {w}"), gr.update(value=nf, visible=video)]
            ups += [gr.update(visible=(m == m0)) for m in boxes]
            ups += [gr.update(value=values.get(m, {}).get(n, next(f for f in fields[m] if f.name == n).initial()))
                    for m, n, _ in comps]
            return ups

        model.change(on_model, model, [method, height, width, frames, *boxes.values(), *(c for *_, c in comps)],
                     show_progress_on=status)
        method.change(lambda m: [gr.update(visible=(k == m)) for k in boxes], method, list(boxes.values()))

        inputs = [model, method, prompt, height, width, frames, steps, seed, guidance, compare, first_stage,
                  stages, strength, tiled_vae, offload]

        def on_generate(values: dict, progress=gr.Progress()):
            m = values[method]
            req = Request(model=values[model], method=m, prompt=values[prompt], height=values[height],
                          width=values[width], steps=values[steps], seed=values[seed],
                          guidance_scale=values[guidance], num_frames=values[frames], compare=values[compare],
                          first_stage_method=values[first_stage], stages=values[stages],
                          strength=values[strength], tiled_vae=values[tiled_vae], cpu_offload=values[offload],
                          options={n: values[c] for mm, n, c in comps if mm == m})
            try:
                progress(0, desc="checking the request")
                dense, result, md, ctx = run(req, lambda frac, text: progress(frac, desc=text))
                progress(1, desc="drawing the attention pattern")
                pic, caption = render_pattern(ctx, default_query(ctx.grid))
            except gr.Error:
                raise
            except Exception as e:  # noqa: BLE001 - shown in the page; the server keeps serving
                raise gr.Error(_message(e)) from None
            except SystemExit as e:
                raise gr.Error(_message(e)) from None
            return (viewable(dense.frames) if dense else None, viewable(result.frames), md, pic, caption,
                    _store(ctx), f"Done: {result.label} at {req_size(result)}.")

        # progress and error badges go to the status line under the button; messages to the page's toasts
        go.click(lambda: "", None, status, queue=False, show_progress="hidden").then(
            on_generate, set(inputs) | {c for *_, c in comps},
            [dense_out, method_out, result_md, pattern_img, pattern_md, state, status], concurrency_limit=1,
            concurrency_id="generate", show_progress_on=status)

        def pick(token, x, y, panels):
            ctx = _CONTEXTS.get(token)
            if ctx is None:
                raise gr.Error("generate first: there is no result to pick a query in")
            try:
                return render_pattern(ctx, query_from_click(ctx, x, y, *displayed_size(ctx, panels), panels=panels))
            except Exception as e:  # noqa: BLE001
                raise gr.Error(_message(e)) from None

        def on_select_result(token, evt: gr.SelectData):
            return pick(token, *evt.index, panels=False)

        def on_select_pattern(token, evt: gr.SelectData):
            return pick(token, *evt.index, panels=True)

        method_out.select(on_select_result, state, [pattern_img, pattern_md], concurrency_limit=2,
                          show_progress_on=pattern_md)
        pattern_img.select(on_select_pattern, state, [pattern_img, pattern_md], concurrency_limit=2,
                           show_progress_on=pattern_md)
    return demo


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: GRADIO_SERVER_PORT, else 7860)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model shown first (default small-flux)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--allow-download", action="store_true",
                   help="let Hub ids that are not in the local cache download (default: offline)")
    args = p.parse_args(argv)
    global ALLOW_DOWNLOAD
    ALLOW_DOWNLOAD = args.allow_download
    if args.threads:
        torch.set_num_threads(args.threads)
    port = args.port if args.port is not None else int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    demo = build_demo(args.model)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.launch(server_name=args.host, server_port=port, show_error=True, css=CSS)


if __name__ == "__main__":
    main()
