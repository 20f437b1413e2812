"""The "neighborhood" method: every selected self-attention becomes neighborhood
(sliding-window) attention over the image/video token grid, NATTEN semantics
(see ``diffaccel.ops.neighborhood_attention``).  Global (text) tokens keep full attention.

    diffaccel.apply(pipe, "neighborhood", kernel_size=(13, 13))              # images
    diffaccel.apply(pipe, "neighborhood", kernel_size=(5, 13, 13), stride=1)  # video, (T, H, W)

Families: every family (``diffaccel.families``); per-axis options take ``family.grid_ndim`` values.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .. import ops
from .._validate import per_axis
from ..bench import Case
from ..context import current_context
from ..processors import make_processor, swap_processors
from ..projections import check_weights_option, install_with_weights
from ..registry import BenchSpec, Method, check_backend_option, register_method
from ._common import ALL_FAMILIES, attention_projections, per_axis_for_family

BACKENDS = ("triton", "flex", "torch")
SHIFT_SCHEDULES = ("layer", "step")


@dataclass
class NeighborhoodOptions:
    """Options of the "neighborhood" method.

    kernel_size: window size; an int applies to every grid axis, 2 values to
        (H, W) grids, 3 values to the (T, H, W) grids of the video families.
        A window larger than an axis covers the whole axis.
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
    weights: projections trained by ``diffaccel distill`` (a ``projections.safetensors`` file, a folder
        holding one, a Hub repo id or a state dict; see ``diffaccel.projections``), or ``None``.
    """

    kernel_size: int | tuple | None = None
    dilation: int | tuple = 1
    stride: int | tuple = 1
    shift: int | tuple | str = 0
    backend: str | None = None
    weights: object = None

    def __post_init__(self):
        if self.kernel_size is None:
            raise ValueError("kernel_size is required, e.g. kernel_size=(13, 13) (or 3 values for video)")
        self.kernel_size = per_axis("kernel_size", self.kernel_size)
        self.dilation = per_axis("dilation", self.dilation)
        self.stride = per_axis("stride", self.stride)
        check_backend_option(self.backend, BACKENDS)
        check_weights_option(self.weights)
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
            self.shift = per_axis("shift", self.shift, minimum=None)


def core_kwargs(options: NeighborhoodOptions, family) -> dict:
    """The keyword arguments of ``ops.neighborhood_attention`` for ``family``'s grids
    (``ValueError`` naming the option if its number of values does not fit the grid)."""
    out = {name: per_axis_for_family(name, getattr(options, name), family)
           for name in ("kernel_size", "dilation", "stride")}
    if not isinstance(options.shift, str):
        out["shift"] = per_axis_for_family("shift", options.shift, family)
    out["backend"] = options.backend
    return out


class ShiftedCore:
    """The attention core of one layer with a scheduled shift (``shift="layer"`` or ``"step"``; the step
    is the call context's, counted by the tracker: ``counts_steps`` below)."""

    def __init__(self, kwargs, schedule, layer_index):
        self.keywords = dict(kwargs, shift=schedule)
        self.kwargs, self.schedule, self.layer_index = kwargs, schedule, layer_index

    def shift_for(self, grid):
        k = self.kwargs["kernel_size"]
        k = (k,) * len(grid) if isinstance(k, int) else k
        if self.schedule == "layer":
            return tuple((self.layer_index % 2) * (ki // 2) for ki in k)
        ctx = current_context()
        step = max(ctx.step if ctx is not None and ctx.step is not None else 0, 0)
        return tuple(((step % 4) * ki) // 4 for ki in k)

    def __call__(self, q, k, v, *, grid, text_len, text_first):
        return ops.neighborhood_attention(q, k, v, grid, shift=self.shift_for(grid), text_len=text_len,
                                          text_first=text_first, **self.kwargs)


def install(model, family, options, layers):
    """Install neighborhood processors on ``layers`` (``[(name, attention module)]``); returns undo."""
    kwargs = core_kwargs(options, family)
    if isinstance(options.shift, str):
        cores = [ShiftedCore(kwargs, options.shift, i) for i in range(len(layers))]
    else:
        cores = [functools.partial(ops.neighborhood_attention, **kwargs)] * len(layers)
    processors = {name: make_processor(family, core, attn=module) for (name, module), core in zip(layers, cores)}
    return install_with_weights(model, layers, options.weights, "neighborhood",
                                lambda: swap_processors(model, processors))


def default_settings(grid):
    """Windows of about half and a quarter of each spatial side; video: every frame, then 3 frames."""
    half, quarter = (max(g // 2 + 1, 1) for g in grid[-2:]), (max(g // 4 + 1, 1) for g in grid[-2:])
    half, quarter = tuple(half), tuple(quarter)
    if len(grid) == 3:
        t = grid[0]
        return [dict(kernel_size=(t, *half)), dict(kernel_size=(min(3, t), *quarter))]
    same = half[0] == half[1] and quarter[0] == quarter[1]
    return [dict(kernel_size=half[0] if same else half), dict(kernel_size=quarter[0] if same else quarter)]


# --- bench ----------------------------------------------------------------------------------------

def _bench_cases(cuda):
    if cuda:
        cases = [Case(f"na2d-{name}-w{min(80, n)}", "neighborhood", (n, n), 24, 128, 512,
                      params=dict(kernel_size=min(80, n)))
                 for name, n in (("flux-1k", 64), ("flux-2k", 128), ("flux-4k", 256))]
        cases.append(Case("na2d-flux-4k-w80-s16", "neighborhood", (256, 256), 24, 128, 512,
                          params=dict(kernel_size=80, stride=16)))
        cases += [Case(f"na3d-{name}", "neighborhood", grid, 12, 128, 0, params=dict(kernel_size=(9, 15, 15)))
                  for name, grid in (("wan-480p", (21, 30, 52)), ("wan-720p", (21, 45, 80)))]
        return cases
    return [Case("na2d-128x128-k13", "neighborhood", (128, 128), 4, 64, 0, params=dict(kernel_size=13)),
            Case("na2d-64x64-k13-text64", "neighborhood", (64, 64), 4, 64, 64, params=dict(kernel_size=13)),
            Case("na3d-8x32x32-k3x9x9", "neighborhood", (8, 32, 32), 4, 64, 0, params=dict(kernel_size=(3, 9, 9)))]


def _bench_pairs(case):
    from ..kernels.patterns import axis_window_start

    grid, ks, dil, st = ops.neighborhood_params(case.grid, case.params["kernel_size"], case.params.get("dilation", 1),
                                                case.params.get("stride", 1))
    img = 1
    for n, k, d, s in zip(grid, ks, dil, st):
        _, length = axis_window_start(n, k, d, s)
        img *= int(length.sum())
    n, t = math.prod(grid), case.text_len
    return img + 2 * n * t + t * t


def _bench_run(case, backend, q, k, v):
    return ops.neighborhood_attention(q, k, v, case.grid, text_len=case.text_len, backend=backend, **case.params)


register_method(
    Method(
        name="neighborhood",
        options_cls=NeighborhoodOptions,
        install=install,
        families=ALL_FAMILIES,
        description="neighborhood (sliding-window) self-attention over the token grid; text keeps full attention",
        backends=BACKENDS,
        default_settings=default_settings,
        trainable_parameters=attention_projections,
        bench=BenchSpec(op="neighborhood", cases=_bench_cases, pairs=_bench_pairs, run=_bench_run, flex=True),
        counts_steps=lambda options: options.shift == "step",
    )
)
