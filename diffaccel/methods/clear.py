"""Method "clear": CLEAR's local attention for MM-DiTs (FLUX, SD3, FLUX.2, Chroma, Qwen-Image).

The op is :func:`diffaccel.ops.local_attention` and its kernels are ``kernels/local_*.py``
(method ``clear`` -> op ``local_attention`` -> kernels ``local_*``).

    diffaccel.apply(pipe, "clear", radius=16, weights="Huage001/CLEAR")              # clear_local_16.safetensors
    diffaccel.apply(pipe, "clear", radius=8, down_factor=4, weights="ckpt/clear_local_8_down_4.safetensors",
                    ntk_factor=10, proportional_attention=True)                      # CLEAR's 2K-8K settings

Every selected joint attention becomes :func:`diffaccel.ops.local_attention`:
image queries see the image keys within ``radius`` (circle, strictly less),
every text key and, with ``down_factor``, the ``d x d``-pooled image tokens;
text queries see every text and image key.  Text length, resolution and aspect
ratio come from the layout tracker on every call (nothing re-initialised).

Weights: CLEAR's published checkpoints are loaded as they are.  Their keys are
the denoiser's own parameter names of the fine-tuned projections of each
attention layer, ``<layer>.to_q.{weight,bias}``, ``<layer>.to_k.*``,
``<layer>.to_v.*`` and ``<layer>.to_out.0.*`` (FLUX single-stream layers have
no ``to_out``), plus ``<layer>.processor.spatial_weight`` ``[1,1,1,d,1,d,1]``
for the pooled variants (``<layer>`` e.g. ``transformer_blocks.0.attn``,
``single_transformer_blocks.3.attn``).  :func:`save_clear` writes the same format.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import ops
from .._validate import positive_number
from ..api import denoisers
from ..bench import Case
from ..families import get_family, self_attention_layers
from ..io import hub_fetch, is_hub_repo_id
from ..projections import PROJECTIONS as _PROJECTIONS
from ..projections import projection_parameters
from ..processors import PatternProcessor, StockProcessor, swap_processors
from ..registry import BenchSpec, Method, check_backend_option, register_method

__all__ = [
    "ClearOptions",
    "ClearProcessorMixin",
    "ClearFluxProcessor",
    "ClearSD3Processor",
    "clear_processor_class",
    "clear_filename",
    "clear_state_dict",
    "save_clear",
    "write_clear",
    "install",
]

BACKENDS = ("triton", "flex", "torch")
# the MM-DiT image families whose joint attention matches CLEAR's ([text; image] or [image; text])
FAMILIES = ("flux", "sd3", "flux2", "chroma", "qwenimage")
_SPATIAL = "processor.spatial_weight"


@dataclass
class ClearOptions:
    """Options of the "clear" method.

    radius: the circular window: image keys with squared distance ``< radius**2``
        (in tokens; CLEAR's ``window_size``: 8, 16 or 32).
    down_factor: ``None`` (or 1, CLEAR's notebooks' "no pooling") or an int ``d >= 2``:
        image queries also see ``ceil(H/d) * ceil(W/d)`` pooled tokens; each processor
        owns a learnable ``spatial_weight`` ``[1,1,1,d,1,d,1]`` (init ``1/d**2``).
    weights: ``None`` (the model's own projections), a local ``.safetensors`` file,
        a Hub repo id (e.g. ``"Huage001/CLEAR"``, downloaded when online, else from
        the local cache) or a state dict; CLEAR's format (module docstring).
    weights_file: the file in a Hub repo; default ``clear_local_{radius}.safetensors``
        or ``clear_local_{radius}_down_{d}.safetensors`` (CLEAR's release names).
    ntk_factor: NTK-aware RoPE (FLUX): the RoPE ``theta`` is multiplied by this
        factor (as CLEAR's ``get_1d_rotary_pos_embed(..., ntk_factor=...)``); the
        model's ``pos_embed`` is swapped for a scaled one and restored by ``remove``.
        CLEAR uses 10 for 2K-8K generation.  1 = unchanged.
    proportional_attention: softmax scale ``sqrt(log_base(N) / D)`` with ``N`` the
        call's token count (text + image, pooled tokens excluded) times
        ``proportional_n_factor`` and ``base = train_tokens``; ``False``: ``1/sqrt(D)``.
    train_tokens: the base of that log, default the family's ``native_tokens``
        (``diffaccel.families``: FLUX, FLUX.2 and Chroma 4608, SD3 4429: 1024 x 1024 plus the
        text; families without one need it given).  ``N = train_tokens`` gives ``1/sqrt(D)``.
    proportional_n_factor: multiplies ``N`` inside the log (default 1).  CLEAR's
        released pooled-token processor uses 10 (``log(10 * N, base)``); pass 10
        to reproduce it exactly with the ``_down_`` checkpoints.
    keep_original_weights: with ``weights``, keep a CPU copy of the replaced
        projections so ``remove`` restores them (``False`` saves that memory;
        ``remove`` then restores processors and RoPE only, and warns).
    backend: ``"triton"``, ``"flex"``, ``"torch"`` or ``None`` (best for the device).
    """

    radius: float
    down_factor: int | None = None
    weights: object = None
    weights_file: str | None = None
    ntk_factor: float = 1.0
    proportional_attention: bool = False
    train_tokens: int | None = None
    proportional_n_factor: float = 1.0
    keep_original_weights: bool = True
    backend: str | None = None

    def __post_init__(self):
        self.radius = positive_number("radius", self.radius)
        d = self.down_factor
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"down_factor must be None, 1 (no pooled tokens) or an int >= 2, got {d!r}")
        if d == 1:
            self.down_factor = None
        w = self.weights
        if w is not None and not isinstance(w, (str, os.PathLike, Mapping)):
            raise ValueError(
                f"weights must be None, a .safetensors path, a Hub repo id or a state dict, got {type(w).__name__}"
            )
        if self.weights_file is not None:
            if not isinstance(self.weights_file, str) or not self.weights_file:
                raise ValueError(f"weights_file must be a file name in the Hub repo, got {self.weights_file!r}")
            if not isinstance(w, str):
                raise ValueError("weights_file needs weights=<Hub repo id>")
        self.ntk_factor = positive_number("ntk_factor", self.ntk_factor)
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(f"proportional_attention must be a bool, got {self.proportional_attention!r}")
        t = self.train_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 2):
            raise ValueError(f"train_tokens must be None or an int >= 2, got {t!r}")
        self.proportional_n_factor = positive_number("proportional_n_factor", self.proportional_n_factor)
        if not isinstance(self.keep_original_weights, bool):
            raise ValueError(f"keep_original_weights must be a bool, got {self.keep_original_weights!r}")
        check_backend_option(self.backend, BACKENDS)


# ---------------------------------------------------------------------------------------------
# processors


class ClearProcessorMixin(PatternProcessor):
    """CLEAR on top of a family processor (see :func:`clear_processor_class`): the core is
    :func:`diffaccel.ops.local_attention`; with ``down_factor`` the processor owns ``spatial_weight``
    ``[1,1,1,d,1,d,1]`` (CLEAR's parameter, saved as ``<layer>.processor.spatial_weight``).  Only the
    core and its arguments change, so the family's processor (diffusers' own, wrapped) does the rest;
    CLEAR's trained projections are loaded into the model's own ``to_q/k/v/out`` by ``install``."""

    def __init__(self, radius, *, down_factor=None, proportional_attention=False, train_tokens=None,
                 proportional_n_factor=1.0, backend=None, grid=None, device=None, dtype=None, like=None):
        core = functools.partial(ops.local_attention, radius=float(radius), backend=backend)
        if isinstance(self, StockProcessor):
            super().__init__(core, grid=grid, like=like)
        else:
            super().__init__(core, grid=grid)
        self.radius = float(radius)
        self.down_factor = down_factor
        self.proportional_attention = bool(proportional_attention)
        base = train_tokens or get_family(self.family).native_tokens
        if base is None and self.proportional_attention:
            raise ValueError(f"proportional_attention needs train_tokens for family {self.family!r} (the tokens of "
                             "one call at its training resolution: image grid + text)")
        self.train_tokens = int(base) if base else None
        self.proportional_n_factor = float(proportional_n_factor)
        if down_factor is not None:
            d = int(down_factor)
            init = torch.full((1, 1, 1, d, 1, d, 1), 1.0 / (d * d), device=device, dtype=dtype)
            self.spatial_weight = torch.nn.Parameter(init)

    def softmax_scale(self, n_tokens, head_dim):
        """``sqrt(log_base(N * factor) / D)`` with proportional attention, else ``None`` (``1/sqrt(D)``)."""
        if not self.proportional_attention:
            return None
        n = max(n_tokens * self.proportional_n_factor, 2.0)
        return math.sqrt(math.log(n, self.train_tokens) / head_dim)

    def attend(self, q, k, v, *, grid, text_len, text_first, scale=None):
        d = self.down_factor
        pool_weight = None if d is None else self.spatial_weight.reshape(d, d)
        if self.proportional_attention:
            scale = self.softmax_scale(text_len + math.prod(grid), q.shape[-1])
        return self.core(q, k, v, grid=grid, text_len=text_len, text_first=text_first, down_factor=d,
                         pool_weight=pool_weight, scale=scale)

    def extra_repr(self):
        parts = [f"radius={self.radius:g}"]
        if self.down_factor is not None:
            parts.append(f"down_factor={self.down_factor}")
        if self.proportional_attention:
            parts.append(f"proportional_attention=True, train_tokens={self.train_tokens}")
        if self.core.keywords.get("backend"):
            parts.append(f"backend={self.core.keywords['backend']!r}")
        if self.grid is not None:
            parts.append(f"grid={self.grid}")
        return ", ".join(parts)


_CLASSES = {}


def clear_processor_class(processor_cls):
    """``Clear<Name>``: CLEAR on top of a family's processor class (cached)."""
    cls = _CLASSES.get(processor_cls)
    if cls is None:
        cls = type(f"Clear{processor_cls.__name__}", (ClearProcessorMixin, processor_cls),
                   {"__doc__": f"CLEAR on {processor_cls.__name__}.", "__module__": __name__})
        _CLASSES[processor_cls] = cls
    return cls


def __getattr__(name):  # ClearFluxProcessor, ClearSD3Processor, ...: CLEAR on a family's processor class
    if name.startswith("Clear") and name.endswith("Processor"):
        from .. import processors

        try:
            return clear_processor_class(getattr(processors, name[len("Clear"):]))
        except AttributeError:
            pass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_processor(family, options, attn):
    ref = _projection(attn).weight
    cls = clear_processor_class(family.processor_for(attn))
    kwargs = dict(like=attn.processor) if issubclass(cls, StockProcessor) else {}
    return cls(
        options.radius, down_factor=options.down_factor, proportional_attention=options.proportional_attention,
        train_tokens=options.train_tokens, proportional_n_factor=options.proportional_n_factor,
        backend=options.backend, device=ref.device, dtype=ref.dtype, **kwargs,
    )


def _projection(attn):
    """The query projection of an attention module (``to_q``, or a fused ``to_qkv*``)."""
    for name in ("to_q", "to_qkv", "to_qkv_mlp_proj"):
        sub = getattr(attn, name, None)
        if isinstance(sub, torch.nn.Linear):
            return sub
    raise ValueError(f"{type(attn).__name__} has no query projection CLEAR knows (to_q / to_qkv)")


# ---------------------------------------------------------------------------------------------
# checkpoints


def clear_filename(radius, down_factor=None):
    """CLEAR's release file name: ``clear_local_{r}.safetensors`` / ``clear_local_{r}_down_{d}.safetensors``."""
    r = int(radius) if float(radius).is_integer() else radius
    return f"clear_local_{r}.safetensors" if not down_factor else f"clear_local_{r}_down_{down_factor}.safetensors"


def _resolve_file(options):
    """A local ``.safetensors`` path for ``options.weights`` (a path or a Hub repo id)."""
    w = os.path.expanduser(os.fspath(options.weights))
    if os.path.isfile(w):
        return w
    if os.path.isdir(w):
        name = options.weights_file or clear_filename(options.radius, options.down_factor)
        path = os.path.join(w, name)
        if os.path.isfile(path):
            return path
        raise ValueError(f"weights folder {w!r} has no {name}; pass the .safetensors file itself")
    if w.endswith(".safetensors") or not is_hub_repo_id(w):
        raise ValueError(f"weights={options.weights!r}: no such file, and not a Hub repo id ('owner/name')")
    filename = options.weights_file or clear_filename(options.radius, options.down_factor)
    return hub_fetch(w, filename=filename)


class _Source:
    """Uniform read access to a state dict or a safetensors file: names, shapes, dtypes, tensors."""

    def __init__(self, weights, options):
        self._file = None
        if isinstance(weights, Mapping):
            self._tensors = dict(weights)
            bad = [k for k, t in self._tensors.items() if not isinstance(k, str) or not isinstance(t, torch.Tensor)]
            if bad:
                raise ValueError(f"weights state dict must map str to torch.Tensor; bad entries: {bad[:5]}")
            self.meta = {k: (tuple(t.shape), t.dtype) for k, t in self._tensors.items()}
            self.label = "the given state dict"
            return
        path = _resolve_file(options)
        from safetensors import safe_open

        try:
            self._file = safe_open(path, framework="pt", device="cpu")
            self.meta = {}
            for k in self._file.keys():
                sl = self._file.get_slice(k)
                self.meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:
            raise ValueError(f"could not read the safetensors file {path!r}: {type(e).__name__}: {e}") from e
        self.label = path

    def get(self, key):
        return self._file.get_tensor(key) if self._file is not None else self._tensors[key]

    def checked(self, key, like):
        """Tensor ``key`` read and cast to ``like``'s dtype; ``ValueError`` naming the checkpoint and the key
        if it cannot be read or cast, or holds NaN / inf."""
        try:
            t = self.get(key).to(dtype=like.dtype, device="cpu")
        except Exception as e:
            raise ValueError(f"CLEAR checkpoint {self.label}: cannot read tensor {key!r}: "
                             f"{type(e).__name__}: {e}; nothing was loaded") from e
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"CLEAR checkpoint {self.label}: tensor {key!r} holds NaN or inf values "
                             "(a corrupt or diverged checkpoint); nothing was loaded")
        return t


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _is_float(dtype):
    return dtype.is_floating_point if isinstance(dtype, torch.dtype) else str(dtype).upper() in _FLOAT_DTYPES


def expected_keys(layers, down_factor):
    """``{key: (shape, target)}`` of CLEAR's format for ``layers`` ``[(name, attention)]``; ``target`` is the
    model parameter, or ``(name, None)`` for a processor's ``spatial_weight`` (created by the install)."""
    want = {}
    for name, attn in layers:
        for proj in _PROJECTIONS:
            sub = getattr(attn, proj, None)
            if not isinstance(sub, torch.nn.Module):
                continue
            for pname, p in sub.named_parameters():
                want[f"{name}.{proj}.{pname}"] = (tuple(p.shape), p)
        if down_factor:
            want[f"{name}.{_SPATIAL}"] = ((1, 1, 1, down_factor, 1, down_factor, 1), (name, None))
    return want


def _summarise(items, limit=12):
    items = sorted(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_checkpoint(meta, layers, down_factor, all_layer_names=()):
    """Every problem of a checkpoint (``meta``: ``{key: (shape, dtype)}``) for ``layers``, as strings.

    Keys of self-attention layers that exist in the model but are not patched (``all_layer_names``
    minus ``layers``, see ``layers=``) are left alone: not a problem, not loaded."""
    want = expected_keys(layers, down_factor)
    problems = []
    fused = [name for name, attn in layers if getattr(attn, "fused_projections", False)]
    if fused:
        problems.append(f"layers with fused QKV projections (call model.unfuse_qkv_projections() first): "
                        f"{_summarise(fused)}")
    selected = {name for name, _ in layers}
    other_layers = tuple(n + "." for n in all_layer_names if n not in selected)
    missing = [k for k in want if k not in meta]
    unexpected = [k for k in meta if k not in want and not (other_layers and k.startswith(other_layers))]
    spatial = [k for k in unexpected if k.endswith("." + _SPATIAL)] if not down_factor else []
    if spatial:
        shape = meta[spatial[0]][0]
        d = shape[3] if len(shape) == 7 else "?"
        problems.append(f"the checkpoint has pooled-token weights ({len(spatial)} x spatial_weight, d={d}) but "
                        f"down_factor is None: pass down_factor={d}")
    if missing and down_factor and all(k.endswith("." + _SPATIAL) for k in missing):
        problems.append(f"the checkpoint has no spatial_weight for down_factor={down_factor}: it was trained "
                        "without pooled tokens (pass down_factor=None)")
    elif missing:
        problems.append(f"{len(missing)} missing key(s): {_summarise(missing)}")
    rest = [k for k in unexpected if k not in spatial]
    if rest:
        problems.append(f"{len(rest)} unexpected key(s): {_summarise(rest)}")
    shapes = [f"{k} {list(meta[k][0])} (expected {list(want[k][0])})" for k in want
              if k in meta and tuple(meta[k][0]) != want[k][0]]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_summarise(shapes)}")
    dtypes = [f"{k} ({meta[k][1]})" for k in want if k in meta and not _is_float(meta[k][1])]
    if dtypes:
        problems.append(f"non-floating-point tensor(s): {_summarise(dtypes)}")
    return problems


def clear_state_dict(model_or_pipe, dtype=None):
    """CLEAR-format state dict (CPU tensors) of a model with the "clear" method applied."""
    model = _denoiser(model_or_pipe)
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(getattr(m, "processor", None), ClearProcessorMixin)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no CLEAR processors to save (apply the 'clear' method first)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    out = {}
    for name, attn in layers:
        proc = attn.processor
        for key, (_, target) in expected_keys([(name, attn)], proc.down_factor).items():
            t = proc.spatial_weight if isinstance(target, tuple) else target
            t = t.detach().to("cpu", dtype=dtype or t.dtype)
            out[key] = t.clone().contiguous()
    return out


def save_clear(model_or_pipe, path, *, dtype=None):
    """Write the patched layers' projections and ``spatial_weight`` s in CLEAR's checkpoint format
    (one ``.safetensors`` file, keys as CLEAR's release), atomically.  Readable by CLEAR's notebooks
    (``load_state_dict(strict=False)``) and by ``diffaccel.apply(..., "clear", weights=path)``.
    ``dtype`` optionally casts the tensors.  Returns ``path``."""
    tensors = clear_state_dict(model_or_pipe, dtype)
    model = _denoiser(model_or_pipe)
    proc = next(m.processor for m in model.modules() if isinstance(getattr(m, "processor", None), ClearProcessorMixin))
    return write_clear(path, tensors, proc.radius, proc.down_factor)


def write_clear(path, tensors, radius, down_factor=None):
    """Write ``tensors`` (CLEAR's keys) as a CLEAR checkpoint file, atomically; returns ``path``."""
    from safetensors.torch import save_file

    from ..io import atomic_path

    meta = {"format": "pt", "method": "clear", "radius": f"{float(radius):g}", "down_factor": str(down_factor or 1)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    return path


def _denoiser(model_or_pipe):
    return denoisers(model_or_pipe)[0][1]


# ---------------------------------------------------------------------------------------------
# NTK-scaled RoPE


def _ntk_pos_embed(model, family, factor):
    """``(attribute, a copy of the model's rotary embedding with theta * factor)`` (``None`` when
    ``factor == 1``)."""
    if factor == 1.0:
        return None
    if family.scaled_rope is None:
        raise ValueError(
            f"ntk_factor={factor:g} scales rotary position embeddings, but {type(model).__name__} has none "
            "(e.g. SD3 uses absolute position embeddings); leave ntk_factor=1"
        )
    return family.scaled_rope(model, factor)


# ---------------------------------------------------------------------------------------------
# install


def install(model, family, options, layers):
    """Install CLEAR processors on ``layers`` ``[(name, attention)]``, load ``options.weights``, scale RoPE;
    returns the undo callable.  All-or-nothing: every check (checkpoint keys and shapes included) runs
    before the model changes."""
    if family.name not in FAMILIES:
        raise ValueError(f"method 'clear' supports the families {FAMILIES}, not {family.name!r}")
    if not layers:
        return lambda: None
    pos_embed = _ntk_pos_embed(model, family, options.ntk_factor)

    name_of = {id(m): n for n, m in model.named_modules()}
    layers = [(name_of.get(id(attn), name), attn) for name, attn in layers]
    loads = []  # (model parameter, key)
    source = None
    if options.weights is not None:
        source = _Source(options.weights, options)
        all_names = [n for n, _ in self_attention_layers(model, family)]
        problems = check_checkpoint(source.meta, layers, options.down_factor, all_names)
        if problems:
            raise ValueError(
                f"CLEAR checkpoint {source.label} does not fit this {type(model).__name__} "
                f"(radius={options.radius:g}, down_factor={options.down_factor}); nothing was loaded:\n  - "
                + "\n  - ".join(problems)
            )
        for key, (_, target) in expected_keys(layers, options.down_factor).items():
            if not isinstance(target, tuple):
                loads.append((target, key))
        # every tensor is read, cast and checked before anything changes: a failure part-way must not
        # leave some projections overwritten (with keep_original_weights=False there is nothing to restore)
        for param, key in loads:
            source.checked(key, param)

    processors = {name: _make_processor(family, options, attn) for name, attn in layers}
    if source is not None and options.down_factor:
        with torch.no_grad():
            for name, proc in processors.items():
                proc.spatial_weight.copy_(source.checked(f"{name}.{_SPATIAL}", proc.spatial_weight))

    # change the model: weights, then processors, then RoPE; undo in reverse
    originals = []
    restorable = options.keep_original_weights
    try:
        with torch.no_grad():
            for param, key in loads:
                if restorable:
                    originals.append((param, param.detach().to("cpu", copy=True)))
                param.copy_(source.get(key))
    except BaseException:
        with torch.no_grad():
            for param, old in originals:
                param.copy_(old)
        raise
    undo_processors = swap_processors(model, processors)
    old_pos_embed = None
    if pos_embed is not None:
        attr, new = pos_embed
        old_pos_embed = (attr, getattr(model, attr))
        setattr(model, attr, new)

    def undo():
        if old_pos_embed is not None:
            setattr(model, *old_pos_embed)
        undo_processors()
        if loads and not restorable:
            warnings.warn("diffaccel.remove: the CLEAR projections stay loaded (keep_original_weights=False)",
                          stacklevel=3)
        with torch.no_grad():
            for param, old in originals:
                param.copy_(old)
        originals.clear()

    return undo


def default_settings(grid):
    """Radius of half a side, then a quarter of it with 4 x 4 pooled tokens (images only)."""
    if len(grid) != 2:
        return []
    g = min(grid)
    return [dict(radius=max(g // 2, 1)), dict(radius=max(g // 4, 1), down_factor=4)]


def trainable_parameters(model, layers):
    """CLEAR fine-tunes each patched layer's image-stream projections (``to_q/k/v/out``, or the fused
    ones) and, with pooled tokens, the processors' ``spatial_weight``."""
    params = projection_parameters(model, layers)
    for _, attn in layers:
        weight = getattr(attn.processor, "spatial_weight", None)
        if weight is not None:
            params.append(weight)
    return params


# --- bench ----------------------------------------------------------------------------------------

def _bench_cases(cuda):
    if cuda:
        return [Case(f"clear-flux-{name}-r16", "local", (n, n), 24, 128, 512, params=dict(radius=16))
                for name, n in (("1k", 64), ("2k", 128), ("4k", 256), ("8k", 512))]
    return [Case("clear-96x96-r8-text64", "local", (96, 96), 4, 64, 64, params=dict(radius=8))]


def _bench_pairs(case):
    """Exact count of visible pairs of a circular window (``dy**2 + dx**2 < r**2``) plus pooled and text."""
    h, w = case.grid
    r = float(case.params["radius"])
    img = 0
    ri = math.ceil(r)
    for dy in range(-ri + 1, ri):
        rem = r * r - dy * dy
        if rem <= 0 or abs(dy) >= h:
            continue
        half = math.ceil(math.sqrt(rem)) - 1  # largest dx with dx^2 < rem
        while (half + 1) ** 2 < rem:
            half += 1
        while half >= 0 and half * half >= rem:
            half -= 1
        xs = sum(max(w - abs(dx), 0) for dx in range(-half, half + 1))
        img += (h - abs(dy)) * xs
    n, t = h * w, case.text_len
    d = case.params.get("down_factor")
    pooled = n * math.ceil(h / d) * math.ceil(w / d) if d else 0
    return img + pooled + 2 * n * t + t * t


def _bench_run(case, backend, q, k, v):
    return ops.local_attention(q, k, v, case.grid, text_len=case.text_len, backend=backend, **case.params)


register_method(
    Method(
        name="clear",
        options_cls=ClearOptions,
        install=install,
        families=FAMILIES,
        description="CLEAR local (circular window) attention for MM-DiT image models, optional pooled tokens, "
                    "CLEAR checkpoints, NTK RoPE and proportional attention",
        backends=BACKENDS,
        default_settings=default_settings,
        trainable_parameters=trainable_parameters,
        bench=BenchSpec(op="local", cases=_bench_cases, pairs=_bench_pairs, run=_bench_run, flex=True),
    )
)
