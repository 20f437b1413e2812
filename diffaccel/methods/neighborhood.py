"""The "neighborhood" method: every selected self-attention becomes neighborhood
(sliding-window) attention over the image/video token grid, NATTEN semantics
(see ``diffaccel.ops.neighborhood_attention``).  Text tokens keep full attention.

    diffaccel.apply(pipe, "neighborhood", kernel_size=(13, 13))              # images
    diffaccel.apply(pipe, "neighborhood", kernel_size=(5, 13, 13), stride=1)  # video, (T, H, W)

Families: ``unet``, ``flux``, ``sd3`` ((H, W) grids); ``wan``, ``hunyuan_video``, ``cogvideox``
((T, H, W) grids).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import ops
from .._validate import BACKENDS
from ..processors import make_processor, swap_processors
from ..registry import Method, register_method

_GRID_NDIM = {"unet": 2, "flux": 2, "sd3": 2, "wan": 3, "hunyuan_video": 3, "cogvideox": 3}
SHIFT_SCHEDULES = ("layer", "step")


def _check_axes(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        raise ValueError(f"{name} must be a positive int or a tuple of 2 or 3 positive ints, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value!r}")
        return value
    value = tuple(value)
    if len(value) not in (2, 3) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value):
        raise ValueError(f"{name} must be a positive int or a tuple of 2 or 3 positive ints, got {value!r}")
    return value


@dataclass
class NeighborhoodOptions:
    """Options of the "neighborhood" method.

    kernel_size: window size; an int applies to every grid axis, 2 values to
        (H, W) grids, 3 values to the (T, H, W) grids of the video families
        (Wan, HunyuanVideo, CogVideoX).  A window larger than
        an axis covers the whole axis.
    dilation, stride: the same forms; ``stride == kernel_size`` gives blocked
        (Swin-style) windows.
    shift: shifted windows (``ops.neighborhood_attention``'s ``shift``: the grid rolled
        cyclically before the windows and back after): an int or one per axis for every
        layer and step; ``"layer"``: Swin's alternation, layer ``i`` (in the order of the
        patched layers) shifted by ``(i % 2) * kernel // 2``; ``"step"``: HiDiffusion's
        MSW-MSA, denoising step ``t`` shifted by ``(t % 4) * kernel // 4`` (its four shifts,
        cycled instead of drawn at random; steps counted from the timesteps as MoBA's
        ``dense_steps``).  With ``stride == kernel_size`` and ``layers=`` on a UNet's
        top blocks this is HiDiffusion's window attention.  0 = none.
    backend: ``"triton"``, ``"flex"``, ``"torch"`` or ``None`` (best for the device).
    """

    kernel_size: int | tuple | None = None
    dilation: int | tuple = 1
    stride: int | tuple = 1
    shift: int | tuple | str = 0
    backend: str | None = None

    def __post_init__(self):
        if self.kernel_size is None:
            raise ValueError("kernel_size is required, e.g. kernel_size=(13, 13) (or 3 values for video)")
        self.kernel_size = _check_axes("kernel_size", self.kernel_size)
        self.dilation = _check_axes("dilation", self.dilation)
        self.stride = _check_axes("stride", self.stride)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {self.backend!r}")
        for name in ("dilation", "stride"):
            value = getattr(self, name)
            if isinstance(value, tuple) and isinstance(self.kernel_size, tuple) and len(value) != len(self.kernel_size):
                raise ValueError(f"{name} {value!r} and kernel_size {self.kernel_size!r} have different numbers of axes")
        n = max(len(x) if isinstance(x, tuple) else 1 for x in (self.kernel_size, self.stride))
        ks = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,) * n
        st = self.stride if isinstance(self.stride, tuple) else (self.stride,) * n
        if any(s > k for s, k in zip(st, ks)):
            raise ValueError(f"stride {self.stride!r} must not exceed kernel_size {self.kernel_size!r} on any axis")
        if isinstance(self.shift, str):
            if self.shift not in SHIFT_SCHEDULES:
                raise ValueError(f"shift must be an int, a tuple of ints or one of {SHIFT_SCHEDULES}, got {self.shift!r}")
        else:
            sh = (self.shift,) if isinstance(self.shift, int) else self.shift
            if not isinstance(sh, (tuple, list)) or len(sh) not in (1, 2, 3) or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in sh):
                raise ValueError(f"shift must be an int, a tuple of 2 or 3 ints or one of {SHIFT_SCHEDULES}, "
                                 f"got {self.shift!r}")
            self.shift = self.shift if isinstance(self.shift, int) else tuple(self.shift)


def core_kwargs(options: NeighborhoodOptions, family: str) -> dict:
    """The keyword arguments of ``ops.neighborhood_attention`` for ``family``'s grids
    (``ValueError`` naming the option if its number of values does not fit the grid)."""
    nd = _GRID_NDIM[family]
    out = {}
    for name in ("kernel_size", "dilation", "stride"):
        value = getattr(options, name)
        if isinstance(value, tuple) and len(value) != nd:
            grid = "(T, H, W)" if nd == 3 else "(H, W)"
            raise ValueError(
                f"{name}={value!r} has {len(value)} values but {family!r} models have {nd}-axis token grids "
                f"{grid}; give an int or {nd} values"
            )
        out[name] = value
    if isinstance(options.shift, tuple) and len(options.shift) != nd:
        raise ValueError(f"shift={options.shift!r} has {len(options.shift)} values but {family!r} models have "
                         f"{nd}-axis token grids; give an int or {nd} values")
    if not isinstance(options.shift, str):
        out["shift"] = options.shift
    out["backend"] = options.backend
    return out


class ShiftedCore:
    """The attention core of one layer with a scheduled shift (``shift="layer"`` or ``"step"``)."""

    def __init__(self, kwargs, schedule, layer_index, counter=None):
        self.keywords = dict(kwargs, shift=schedule)
        self.kwargs, self.schedule, self.layer_index, self.counter = kwargs, schedule, layer_index, counter

    def shift_for(self, grid):
        k = self.kwargs["kernel_size"]
        k = (k,) * len(grid) if isinstance(k, int) else k
        if self.schedule == "layer":
            return tuple((self.layer_index % 2) * (ki // 2) for ki in k)
        step = max(self.counter.step, 0)
        return tuple(((step % 4) * ki) // 4 for ki in k)

    def __call__(self, q, k, v, *, grid, text_len, text_first):
        return ops.neighborhood_attention(q, k, v, grid, shift=self.shift_for(grid), text_len=text_len,
                                          text_first=text_first, **self.kwargs)


def install(model, family, options, layers):
    """Install neighborhood processors on ``layers`` (``[(name, attention module)]``); returns undo."""
    kwargs = core_kwargs(options, family)
    if not isinstance(options.shift, str):
        core = functools.partial(ops.neighborhood_attention, **kwargs)
        return swap_processors(model, {name: make_processor(family, core) for name, _ in layers})
    counter = handle = None
    if options.shift == "step":
        from .moba import StepCounter, _timestep_hook

        counter = StepCounter(0)
    processors = {name: make_processor(family, ShiftedCore(kwargs, options.shift, i, counter))
                  for i, (name, _) in enumerate(layers)}
    undo_swap = swap_processors(model, processors)
    if counter is not None:
        handle = _timestep_hook(model, counter, needed_by='neighborhood shift="step"')

    def undo():
        if handle is not None:
            handle.remove()
        undo_swap()

    return undo


register_method(
    Method(
        name="neighborhood",
        options_cls=NeighborhoodOptions,
        install=install,
        families=tuple(_GRID_NDIM),
        description="neighborhood (sliding-window) self-attention over the token grid; text keeps full attention",
    )
)
