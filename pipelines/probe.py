"""What a pipeline will do at a size, found before doing it, and what a run cost.

* :func:`token_layout`: the token grid and text length of the denoiser's first self-attention at a
  target size: one call of the pipeline at its native size is stopped at the denoiser's first input
  (text encoding only, nothing at the target size is allocated); diffaccel's layout rules read the grid
  from that input and it is scaled to the target.
* :func:`estimate_memory`: the memory a generation at that size needs beyond what is already held,
  from the token count, the attention width and heads and the dtype (:class:`MemoryEstimate`);
  :func:`available_memory` is what the device has.
* :class:`PeakMemory`: the peak memory of one run (CUDA: max allocated after a reset; CPU: the growth of the
  process's resident memory, sampled every few milliseconds after returning freed heap to the system).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import inspect
import math
import threading

import torch

__all__ = ["denoiser_of", "native_size", "TokenLayout", "token_layout", "MemoryEstimate", "estimate_memory",
           "available_memory", "PeakMemory", "format_bytes"]

_DENOISER_ATTRS = ("denoiser", "transformer", "unet")


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's denoiser (its ``transformer`` or ``unet``); ``ValueError`` when it has none."""
    for name in _DENOISER_ATTRS:
        model = getattr(pipe, name, None)
        if isinstance(model, torch.nn.Module):
            return model
    raise ValueError(f"{type(pipe).__name__} has no denoiser (transformer or unet)")


def native_size(pipe) -> tuple[int, int]:
    """``(height, width)`` the pipeline generates when none is given."""
    sample = getattr(getattr(pipe, "config", None), "sample_size", None)
    if isinstance(sample, int):  # the small pipelines: pixels
        return sample, sample
    params = inspect.signature(pipe.__call__).parameters
    h, w = (getattr(params.get(n), "default", None) for n in ("height", "width"))
    if isinstance(h, int) and isinstance(w, int):
        return h, w
    scale = getattr(pipe, "vae_scale_factor", None)
    size = getattr(pipe, "default_sample_size", None)
    if size is None and getattr(pipe, "unet", None) is not None:
        size = pipe.unet.config.sample_size
    if isinstance(scale, int) and isinstance(size, int):
        return size * scale, size * scale
    raise ValueError(f"cannot tell the native size of {type(pipe).__name__}; give height and width")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """The first self-attention layer of a call: ``grid`` ``(H, W)`` or ``(T, H, W)``, ``text_len`` text tokens
    joined to it; ``heads``, ``width`` (= heads x head dim) and ``dtype`` of the denoiser's attention;
    ``batch``: samples per denoiser call (classifier-free guidance doubles it); ``text_first``: whether the text
    tokens come before the grid in the joint sequence."""

    family: str
    grid: tuple
    text_len: int
    heads: int
    width: int
    dtype: torch.dtype
    batch: int
    text_first: bool = True

    @property
    def tokens(self) -> int:
        return self.text_len + math.prod(self.grid)

    def at(self, grid) -> "TokenLayout":
        return dataclasses.replace(self, grid=tuple(int(g) for g in grid))


class _Stop(Exception):
    pass


def denoiser_call(pipe, prompt="probe", **kwargs):
    """``(args, kwargs)`` of the denoiser's first call in ``pipe(prompt, **kwargs)``; the call stops there."""
    model = denoiser_of(pipe)
    seen = {}

    def hook(module, args, kw):
        seen["call"] = (args, kw)
        raise _Stop

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=1, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "call" not in seen:
        raise ValueError(f"{type(pipe).__name__} never called its denoiser")
    return seen["call"]


def call_layout(model, family: str, args, kwargs):
    """``(grids, text_len, text_first)`` of one denoiser call, by the family's own layout rule
    (``diffaccel.families``); ``text_first``: whether the text tokens come before the grid."""
    from diffaccel.families import get_family

    params = list(inspect.signature(model.forward).parameters)

    def get(name):
        if name in kwargs:
            return kwargs[name]
        i = params.index(name) if name in params else None
        return args[i] if i is not None and i < len(args) else None

    layout = get_family(family).layout(model, get)
    split = layout.splits[0] if layout.splits else None
    text_first = split is None or split.before != 0
    return layout.grids, int(layout.text_len or 0), text_first


def _attention_shape(model, family):
    from diffaccel.families import self_attention_layers

    layers = self_attention_layers(model, family)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no self-attention layer diffaccel knows")
    widths = [m.to_q.out_features for _, m in layers]
    first = layers[0][1]
    heads = int(getattr(first, "heads", None) or first.to_q.out_features // first.head_dim)
    return heads, max(widths)


def token_layout(pipe, height: int, width: int, *, num_frames: int | None = None,
                 guidance_scale: float | None = None) -> TokenLayout:
    """The :class:`TokenLayout` of a generation at ``height x width`` (and ``num_frames`` for video)."""
    from diffaccel.families import detect_family

    model = denoiser_of(pipe)
    family = detect_family(model)
    h0, w0 = native_size(pipe)
    kwargs = {"height": h0, "width": w0}
    if num_frames is not None:
        kwargs["num_frames"] = num_frames
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    args, kw = denoiser_call(pipe, **kwargs)
    grids, text_len, text_first = call_layout(model, family, args, kw)
    g = grids[0]
    # tokens per pixel of the native call, applied to the target size (time axis unchanged)
    gh = math.ceil(height * g[-2] / h0)
    gw = math.ceil(width * g[-1] / w0)
    grid = (*g[:-2], gh, gw)
    sample = next((a for a in list(args) + list(kw.values()) if isinstance(a, torch.Tensor) and a.dim() >= 3), None)
    batch = int(sample.shape[0]) if sample is not None else 1
    heads, width_ = _attention_shape(model, family)
    return TokenLayout(family, grid, text_len, heads, width_, model.dtype, batch, text_first)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    bytes: int
    layout: TokenLayout
    note: str

    def __str__(self):
        return f"{format_bytes(self.bytes)} ({self.note})"


# Hidden-state copies of [batch, tokens, width] alive at a denoiser's peak: the block's input, q, k, v,
# attention output, the MLP's 4x-wide hidden state, residuals and the attention kernels' bounded
# workspaces.  Measured on the small models on CPU (docs/snippets/demo_memory.py: 1 denoising step, dense,
# neighborhood and MoBA at 64-256 px) the resident memory grew by 16-30 such copies, and by up to 91 in MoBA's
# first call at 256 px on small-flux (1.4 GiB for 16 MiB copies; 40 in the next); the estimate allows 128 plus a
# fixed 256 MiB.
ACTIVATION_COPIES = 128
FIXED_BYTES = 256 * 2 ** 20


def estimate_memory(layout: TokenLayout, pixels: int = 0) -> MemoryEstimate:
    """Memory a generation with ``layout`` needs beyond what is held already (weights are loaded):
    ``ACTIVATION_COPIES`` x batch x tokens x width x bytes per element + ``pixels`` x 3 x 4 x 4 (the decoded
    output in float and its copies) + a fixed ``FIXED_BYTES``.  Attention never materialises the
    tokens x tokens score matrix (torch's fused SDPA on CPU and CUDA, diffaccel's tiled kernels), so that
    term is absent."""
    elt = torch.finfo(layout.dtype).bits // 8 if layout.dtype.is_floating_point else 4
    act = ACTIVATION_COPIES * layout.batch * layout.tokens * layout.width * elt
    out = pixels * 3 * 4 * 4
    text = f" + {layout.text_len} text" if layout.text_len else ""
    note = (f"{layout.tokens:,} tokens ({'x'.join(map(str, layout.grid))}{text}) x "
            f"{layout.width} wide ({layout.heads} heads) x batch {layout.batch} x {elt} B x {ACTIVATION_COPIES}")
    return MemoryEstimate(int(act + out + FIXED_BYTES), layout, note)


def available_memory(device) -> int:
    """Bytes free on ``device`` (CUDA: free device memory; CPU: the system's available memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.bytes`` and ``peak.how``.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
    at the start.  CPU: the peak resident set size sampled every ``interval`` seconds minus the resident
    size at the start (freed heap is returned to the system first, so earlier runs do not hide this one's
    growth)."""

    def __init__(self, device, interval: float = 0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.bytes = 0
        self.how = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.how = "CUDA max allocated"
            return self
        import psutil

        _malloc_trim()
        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.how = "resident memory growth"
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.bytes = self._peak - self._base
        return False
