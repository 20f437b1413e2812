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
from ..processors import make_processor, swap_processors
from ..registry import BenchSpec, Method, check_backend_option, register_method
from ._common import ALL_FAMILIES, attention_projections, per_axis_for_family

BACKENDS = ("triton", "flex", "torch")


@dataclass
class NeighborhoodOptions:
    """Options of the "neighborhood" method.

    kernel_size: window size; an int applies to every grid axis, 2 values to
        (H, W) grids, 3 values to the (T, H, W) grids of the video families.
        A window larger than an axis covers the whole axis.
    dilation, stride: the same forms; ``stride == kernel_size`` gives blocked
        (Swin-style) windows.
    backend: ``"triton"``, ``"flex"``, ``"torch"`` or ``None`` (best for the device).
    """

    kernel_size: int | tuple | None = None
    dilation: int | tuple = 1
    stride: int | tuple = 1
    backend: str | None = None

    def __post_init__(self):
        if self.kernel_size is None:
            raise ValueError("kernel_size is required, e.g. kernel_size=(13, 13) (or 3 values for video)")
        self.kernel_size = per_axis("kernel_size", self.kernel_size)
        self.dilation = per_axis("dilation", self.dilation)
        self.stride = per_axis("stride", self.stride)
        check_backend_option(self.backend, BACKENDS)
        for name in ("dilation", "stride"):
            value = getattr(self, name)
            if isinstance(value, tuple) and isinstance(self.kernel_size, tuple) and len(value) != len(self.kernel_size):
                raise ValueError(f"{name} {value!r} and kernel_size {self.kernel_size!r} have different numbers of axes")
        n = max(len(x) if isinstance(x, tuple) else 1 for x in (self.kernel_size, self.stride))
        ks = self.kernel_size if isinstance(self.kernel_size, tuple) else (self.kernel_size,) * n
        st = self.stride if isinstance(self.stride, tuple) else (self.stride,) * n
        if any(s > k for s, k in zip(st, ks)):
            raise ValueError(f"stride {self.stride!r} must not exceed kernel_size {self.kernel_size!r} on any axis")


def core_kwargs(options: NeighborhoodOptions, family) -> dict:
    """The keyword arguments of ``ops.neighborhood_attention`` for ``family``'s grids
    (``ValueError`` naming the option if its number of values does not fit the grid)."""
    out = {name: per_axis_for_family(name, getattr(options, name), family)
           for name in ("kernel_size", "dilation", "stride")}
    out["backend"] = options.backend
    return out


def install(model, family, options, layers):
    """Install neighborhood processors on ``layers`` (``[(name, attention module)]``); returns undo."""
    core = functools.partial(ops.neighborhood_attention, **core_kwargs(options, family))
    processors = {name: make_processor(family, core, attn=module) for name, module in layers}
    return swap_processors(model, processors)


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
    )
)
