"""Method "moba": mixture of block attention (MoBA / VMoBA) for video and image DiTs.

    # Wan video, (T, H, W) token grids: VMoBA's 1D -> 2D -> 3D cycle by layer, VMoBA's threshold
    diffaccel.apply(pipe, "moba", partitions=[(4, None, None), (None, 8, 8), (2, 8, 8)], threshold=0.25,
                    dense_steps=10)
    # FLUX, (H, W) token grids: 2D blocks, top-k
    diffaccel.apply(pipe, "moba", block=(16, 16), topk=8)

Every selected self-attention becomes :func:`diffaccel.ops.moba_attention`: the image/video tokens
are cut into blocks, every query keeps its own block plus the best others by the gate
``q . mean(k of block)`` and attends to their tokens only; global (text) tokens keep full attention.

Options (``MobaOptions``):

* ``block`` or ``partitions`` (exactly one): the block size per axis; ``partitions`` is a list of
  blocks cycled by layer (layer ``i`` uses ``partitions[i % len(partitions)]``, ``i`` counting the
  patched layers in model order).  A ``None`` entry means "the whole axis": for video, temporal (1D)
  blocks are ``(bt, None, None)``, spatial (2D) ``(1, bh, bw)`` or VMoBA's all-frames
  ``(None, bh, bw)``, spatio-temporal (3D) ``(bt, bh, bw)``.
* ``topk`` or ``threshold`` (exactly one), ``selection``: see ``ops.moba_attention``.
* ``dense_steps``: the first ``dense_steps`` denoising steps of every generation run dense
  attention (VMoBA keeps the early, layout-forming steps full).  The step is the call context's
  (``diffaccel.context``: a timestep larger than the previous call's starts a new generation, a
  smaller one is the next step, an equal one the same step); steps are counted across every
  denoiser patched by one ``apply`` (Wan 2.2's two experts share one count).
  :func:`diffaccel.context.reset_steps` forces a new generation.
* ``dense_layers``: layers that always run dense attention: ints (index among the patched
  layers; negative from the end) and/or fnmatch patterns on the layer names
  (e.g. ``"blocks.0.attn1"``).  They keep their place in the partition cycle.
* ``backend``: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA, else torch).
* ``weights``: projections trained by ``diffaccel distill`` (``projections.safetensors``, a folder holding it,
  a Hub repo id or a state dict; see ``diffaccel.projections``), or ``None``.

Families: every family (``diffaccel.families``); blocks take ``family.grid_ndim`` entries.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from .. import ops
from .._validate import per_axis
from ..bench import Case
from ..context import current_context, reset_steps
from ..processors import make_processor, swap_processors
from ..projections import check_weights_option, install_with_weights
from ..registry import BenchSpec, Method, check_backend_option, register_method
from ._common import ALL_FAMILIES, attention_projections

__all__ = ["MobaOptions", "MobaCore", "install", "reset_steps"]

BACKENDS = ("triton", "torch")


@dataclass
class MobaOptions:
    """Options of the "moba" method (see the module docstring)."""

    block: int | tuple | None = None
    partitions: list | tuple | None = None
    topk: int | None = None
    threshold: float | None = None
    selection: str = "query"
    dense_steps: int = 0
    dense_layers: int | str | list | tuple = ()
    backend: str | None = None
    weights: object = None

    def __post_init__(self):
        if (self.block is None) == (self.partitions is None):
            raise ValueError("give exactly one of block (one partition for every layer) or partitions "
                             f"(cycled by layer), got block={self.block!r}, partitions={self.partitions!r}")
        if self.block is not None:
            self.block = per_axis("block", self.block, allow_none=True)
        else:
            if isinstance(self.partitions, (str, bytes)) or not isinstance(self.partitions, (list, tuple)) \
                    or not self.partitions:
                raise ValueError(f"partitions must be a non-empty list of blocks, got {self.partitions!r}")
            self.partitions = [per_axis(f"partitions[{i}]", p, allow_none=True)
                               for i, p in enumerate(self.partitions)]
        # topk / threshold / selection: the op's own checks
        _, _, self.topk, self.threshold, self.selection = ops.moba_params(
            (1,), 1, self.topk, self.threshold, self.selection)
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps must be a non-negative int, got {self.dense_steps!r}")
        dl = self.dense_layers
        dl = [dl] if isinstance(dl, (int, str)) and not isinstance(dl, bool) else dl
        try:
            dl = list(dl)
        except TypeError:
            raise ValueError(f"dense_layers must be ints and/or glob patterns, got {self.dense_layers!r}") from None
        if not all((isinstance(x, int) and not isinstance(x, bool)) or (isinstance(x, str) and x) for x in dl):
            raise ValueError(f"dense_layers must be ints and/or non-empty glob patterns, got {self.dense_layers!r}")
        self.dense_layers = tuple(dl)
        check_backend_option(self.backend, BACKENDS)
        check_weights_option(self.weights)

    def blocks(self):
        return [self.block] if self.block is not None else list(self.partitions)


class MobaCore:
    """The attention core of one layer: ``core(q, k, v, grid=..., text_len=..., text_first=...)``.
    ``dense``: this layer always runs dense attention; ``dense_steps``: the first steps of every
    generation do (read from the call context)."""

    def __init__(self, block, options: MobaOptions, *, dense=False):
        self.block = block
        self.options = options
        self.dense = dense
        self.dense_steps = options.dense_steps
        self.keywords = {"block": block, "selection": options.selection, "dense": dense}
        self.keywords["topk" if options.topk is not None else "threshold"] = (
            options.topk if options.topk is not None else options.threshold)

    def block_for(self, grid):
        if isinstance(self.block, int):
            return self.block
        return tuple(n if b is None else b for b, n in zip(self.block, grid))

    def dense_now(self) -> bool:
        if self.dense:
            return True
        if not self.dense_steps:
            return False
        ctx = current_context()
        step = None if ctx is None else ctx.step
        return step is not None and 0 <= step < self.dense_steps

    def __call__(self, q, k, v, *, grid, text_len, text_first, scale=None):
        if self.dense_now():
            return ops.dense_attention(q, k, v, scale=scale)
        o = self.options
        return ops.moba_attention(q, k, v, grid, self.block_for(grid), topk=o.topk, threshold=o.threshold,
                                  selection=o.selection, text_len=text_len, text_first=text_first, scale=scale,
                                  backend=o.backend)


def _dense_set(options, names):
    dense = set()
    n = len(names)
    for x in options.dense_layers:
        if isinstance(x, int):
            if not -n <= x < n:
                raise ValueError(f"dense_layers index {x} is out of range: {n} layers are patched")
            dense.add(x % n)
        else:
            hit = [i for i, name in enumerate(names) if fnmatch.fnmatchcase(name, x)]
            if not hit:
                raise ValueError(f"dense_layers pattern {x!r} matches no patched layer; names look like {names[:4]}")
            dense.update(hit)
    return dense


def install(model, family, options: MobaOptions, layers):
    """Install MoBA processors on ``layers`` (``[(name, attention module)]``); returns undo."""
    nd = family.grid_ndim
    blocks = options.blocks()
    for i, b in enumerate(blocks):
        if isinstance(b, tuple) and len(b) != nd:
            what = "block" if options.block is not None else f"partitions[{i}]"
            grid = "(T, H, W)" if nd == 3 else "(H, W)"
            raise ValueError(f"{what}={b!r} has {len(b)} entries but {family.name!r} models have {nd}-axis token "
                             f"grids {grid}; give an int or {nd} entries")
    names = [name for name, _ in layers]
    dense = _dense_set(options, names)
    processors = {
        name: make_processor(family, MobaCore(blocks[i % len(blocks)], options, dense=i in dense), attn=module)
        for i, (name, module) in enumerate(layers)
    }
    return install_with_weights(model, layers, options.weights, "moba", lambda: swap_processors(model, processors))


def default_settings(grid):
    """Blocks of half and a quarter of each spatial side (top-2 / top-4); video: every frame, then
    VMoBA's cycle of all-frames 2D blocks and 2-frame 3D blocks."""
    h2, w2 = (max(g // 2, 1) for g in grid[-2:])
    if len(grid) == 3:
        t = grid[0]
        return [dict(block=(t, h2, w2), topk=2),
                dict(partitions=[(None, h2, w2), (min(2, t), h2, w2)], topk=2)]
    h4, w4 = (max(g // 4, 1) for g in grid[-2:])
    return [dict(block=(h2, w2), topk=2), dict(block=(h4, w4), topk=4)]


# --- bench ----------------------------------------------------------------------------------------

def _bench_cases(cuda):
    if cuda:
        return [Case("moba-wan-480p", "moba", (21, 30, 52), 12, 128, 0, params=dict(block=(3, 10, 13), topk=6)),
                Case("moba-wan-720p", "moba", (21, 45, 80), 12, 128, 0, params=dict(block=(3, 9, 16), topk=26))]
    return [Case("moba-8x32x32-b2x8x8-top8", "moba", (8, 32, 32), 4, 64, 0, params=dict(block=(2, 8, 8), topk=8))]


def _bench_pairs(case):
    n, t = math.prod(case.grid), case.text_len
    block = case.params["block"]
    block = tuple(block) if isinstance(block, (tuple, list)) else (block,) * len(case.grid)
    nb = math.prod(math.ceil(g / b) for g, b in zip(case.grid, block))
    keep = min(case.params.get("topk", nb), nb)
    return int(n * n * keep / nb) + 2 * n * t + t * t  # uniform-block estimate


def _bench_run(case, backend, q, k, v):
    return ops.moba_attention(q, k, v, case.grid, text_len=case.text_len, backend=backend, **case.params)


def _bench_gate(case, q, k):
    """Everything the Triton MoBA op does before the attention kernel."""
    from ..kernels.moba_triton import gate_tables, kernel_block

    p = dict(case.params)
    grid, block, topk, threshold, selection = ops.moba_params(case.grid, p["block"], p.get("topk"),
                                                               p.get("threshold"), p.get("selection", "query"))
    return gate_tables(q, k, grid, block, topk, threshold, selection, case.text_len, True,
                       kernel_block(block, q))


register_method(
    Method(
        name="moba",
        options_cls=MobaOptions,
        install=install,
        families=ALL_FAMILIES,
        description="mixture of block attention (MoBA/VMoBA): each query attends to its own and its best-gated "
                    "blocks; text keeps full attention",
        backends=BACKENDS,
        default_settings=default_settings,
        trainable_parameters=attention_projections,
        counts_steps=lambda options: options.dense_steps > 0,
        bench=BenchSpec(op="moba", cases=_bench_cases, pairs=_bench_pairs, run=_bench_run, gate=_bench_gate),
    )
)
