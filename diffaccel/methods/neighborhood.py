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
from .._validate import BACKENDS, per_axis
from ..processors import make_processor, swap_processors
from ..projections import check_weights_option, install_with_weights
from ..registry import Method, register_method

_GRID_NDIM = {"unet": 2, "flux": 2, "sd3": 2, "wan": 3, "hunyuan_video": 3, "cogvideox": 3}


@dataclass
class NeighborhoodOptions:
    """Options of the "neighborhood" method.

    kernel_size: window size; an int applies to every grid axis, 2 values to
        (H, W) grids, 3 values to the (T, H, W) grids of the video families
        (Wan, HunyuanVideo, CogVideoX).  A window larger than
        an axis covers the whole axis.
    dilation, stride: the same forms; ``stride == kernel_size`` gives blocked
        (Swin-style) windows.
    backend: ``"triton"``, ``"flex"``, ``"torch"`` or ``None`` (best for the device).
    weights: projections trained by ``diffaccel distill`` (a ``projections.safetensors`` file, a folder
        holding one, a Hub repo id or a state dict; see ``diffaccel.projections``), or ``None``.
    """

    kernel_size: int | tuple | None = None
    dilation: int | tuple = 1
    stride: int | tuple = 1
    backend: str | None = None
    weights: object = None

    def __post_init__(self):
        if self.kernel_size is None:
            raise ValueError("kernel_size is required, e.g. kernel_size=(13, 13) (or 3 values for video)")
        self.kernel_size = per_axis("kernel_size", self.kernel_size)
        self.dilation = per_axis("dilation", self.dilation)
        self.stride = per_axis("stride", self.stride)
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {self.backend!r}")
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
    out["backend"] = options.backend
    return out


def install(model, family, options, layers):
    """Install neighborhood processors on ``layers`` (``[(name, attention module)]``); returns undo."""
    core = functools.partial(ops.neighborhood_attention, **core_kwargs(options, family))
    processors = {name: make_processor(family, core) for name, _ in layers}
    return install_with_weights(model, layers, options.weights, "neighborhood",
                                lambda: swap_processors(model, processors))


register_method(
    Method(
        name="neighborhood",
        options_cls=NeighborhoodOptions,
        install=install,
        families=tuple(_GRID_NDIM),
        description="neighborhood (sliding-window) self-attention over the token grid; text keeps full attention",
    )
)
