"""Method "moba": mixture of block attention (MoBA / VMoBA) for video and image DiTs.

    # Wan video, (T, H, W) token grids: VMoBA's 1D -> 2D -> 3D cycle by layer, VMoBA's threshold
    diffaccel.apply(pipe, "moba", partitions=[(4, None, None), (None, 8, 8), (2, 8, 8)], threshold=0.25,
                    dense_steps=10)
    # FLUX, (H, W) token grids: 2D blocks, top-k
    diffaccel.apply(pipe, "moba", block=(16, 16), topk=8)

Every selected self-attention becomes :func:`diffaccel.ops.moba_attention`: the image/video tokens
are cut into blocks, every query keeps its own block plus the best others by the gate
``q . mean(k of block)`` and attends to their tokens only; text tokens keep full attention.

Options (``MobaOptions``):

* ``block`` or ``partitions`` (exactly one): the block size per axis; ``partitions`` is a list of
  blocks cycled by layer (layer ``i`` uses ``partitions[i % len(partitions)]``, ``i`` counting the
  patched layers in model order).  A ``None`` entry means "the whole axis": for video, temporal (1D)
  blocks are ``(bt, None, None)``, spatial (2D) ``(1, bh, bw)`` or VMoBA's all-frames
  ``(None, bh, bw)``, spatio-temporal (3D) ``(bt, bh, bw)``.
* ``topk`` or ``threshold`` (exactly one), ``selection``: see ``ops.moba_attention``.
* ``dense_steps``: the first ``dense_steps`` denoising steps of every generation run dense
  attention (VMoBA keeps the early, layout-forming steps full).  **Rule**: a forward pre-hook on
  the denoiser reads the ``timestep`` argument of every call (its largest value); a call with a
  timestep *larger* than the previous call's starts a new generation (step 0), a smaller one is
  the next step, an equal one the same step (classifier-free guidance run as two calls, or a
  second-order scheduler's repeated timestep).  Steps are counted across every denoiser patched
  by one ``apply`` (Wan 2.2's two experts share one count).  Call :func:`reset_steps` to force a
  new generation (e.g. after an interrupted generation followed by an img2img one starting at a
  lower timestep).
* ``dense_layers``: layers that always run dense attention: ints (index among the patched
  layers; negative from the end) and/or fnmatch patterns on the layer names
  (e.g. ``"blocks.0.attn1"``).  They keep their place in the partition cycle.
* ``backend``: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA, else torch).
* ``weights``: projections trained by ``diffaccel distill`` (``projections.safetensors``, a folder holding it,
  a Hub repo id or a state dict; see ``diffaccel.projections``), or ``None``.

Families: ``wan``, ``hunyuan_video``, ``cogvideox`` (3-axis ``(T, H, W)`` grids; for CogVideoX 1.5
``T`` counts groups of ``patch_size_t`` latent frames), ``flux``, ``sd3``, ``unet`` (2-axis grids).
"""
from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field

import torch

from .. import ops
from .._validate import per_axis
from ..processors import make_processor, swap_processors
from ..projections import check_weights_option, install_with_weights
from ..registry import Method, register_method

__all__ = ["MobaOptions", "MobaCore", "StepCounter", "install", "reset_steps"]

_GRID_NDIM = {"wan": 3, "hunyuan_video": 3, "cogvideox": 3, "flux": 2, "sd3": 2, "unet": 2}


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
    _counter: "StepCounter | None" = field(default=None, init=False, repr=False, compare=False)

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
        if self.backend not in (None, "triton", "torch"):
            raise ValueError(f"backend must be 'triton', 'torch' or None, got {self.backend!r}")
        check_weights_option(self.weights)

    def blocks(self):
        return [self.block] if self.block is not None else list(self.partitions)


class StepCounter:
    """Denoising step of the current generation, from the timesteps the denoiser is called with
    (rule in the module docstring)."""

    def __init__(self, dense_steps: int):
        self.dense_steps = dense_steps
        self.reset()

    def reset(self):
        self.step = -1
        self.last_t = None

    def observe(self, t: float):
        if self.last_t is None or t > self.last_t:
            self.step = 0
        elif t < self.last_t:
            self.step += 1
        self.last_t = t

    @property
    def dense(self) -> bool:
        return 0 <= self.step < self.dense_steps


def _dense_attention(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class MobaCore:
    """The attention core of one layer: ``core(q, k, v, grid=..., text_len=..., text_first=...)``."""

    def __init__(self, block, options: MobaOptions, *, dense=False, counter: StepCounter | None = None):
        self.block = block
        self.options = options
        self.dense = dense
        self.counter = counter
        self.keywords = {"block": block, "selection": options.selection, "dense": dense}
        self.keywords["topk" if options.topk is not None else "threshold"] = (
            options.topk if options.topk is not None else options.threshold)

    def block_for(self, grid):
        if isinstance(self.block, int):
            return self.block
        return tuple(n if b is None else b for b, n in zip(self.block, grid))

    def __call__(self, q, k, v, *, grid, text_len, text_first):
        if self.dense or (self.counter is not None and self.counter.dense):
            return _dense_attention(q, k, v)
        o = self.options
        return ops.moba_attention(q, k, v, grid, self.block_for(grid), topk=o.topk, threshold=o.threshold,
                                  selection=o.selection, text_len=text_len, text_first=text_first,
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


def _timestep_hook(model, counter):
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    index = params.index("timestep") if "timestep" in params else None

    def hook(module, args, kwargs):
        t = kwargs.get("timestep")
        if t is None and index is not None and index < len(args):
            t = args[index]
        if t is None:
            raise ValueError(f"moba dense_steps needs the timestep of every {type(module).__name__} call; "
                             "this call has none")
        counter.observe(float(t.max()) if isinstance(t, torch.Tensor) else float(t))
        return None

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def install(model, family, options: MobaOptions, layers):
    """Install MoBA processors on ``layers`` (``[(name, attention module)]``); returns undo."""
    nd = _GRID_NDIM[family]
    blocks = options.blocks()
    for i, b in enumerate(blocks):
        if isinstance(b, tuple) and len(b) != nd:
            what = "block" if options.block is not None else f"partitions[{i}]"
            grid = "(T, H, W)" if nd == 3 else "(H, W)"
            raise ValueError(f"{what}={b!r} has {len(b)} entries but {family!r} models have {nd}-axis token grids "
                             f"{grid}; give an int or {nd} entries")
    names = [name for name, _ in layers]
    dense = _dense_set(options, names)
    counter = None
    if options.dense_steps > 0:
        if options._counter is None:  # shared by every denoiser of one apply()
            options._counter = StepCounter(options.dense_steps)
        counter = options._counter
    processors = {
        name: make_processor(family, MobaCore(blocks[i % len(blocks)], options, dense=i in dense, counter=counter))
        for i, name in enumerate(names)
    }
    undo_swap = install_with_weights(model, layers, options.weights, "moba", lambda: swap_processors(model, processors))
    handle = _timestep_hook(model, counter) if counter is not None else None

    def undo():
        if handle is not None:
            handle.remove()
            counter.reset()
        undo_swap()

    return undo


def reset_steps(pipe_or_model) -> bool:
    """Start a new generation for ``dense_steps`` counting on the denoiser(s) of ``pipe_or_model``;
    returns whether a step counter was found."""
    from ..api import _STATE_ATTR, _denoisers

    found = False
    for _, model in _denoisers(pipe_or_model):
        state = model.__dict__.get(_STATE_ATTR)
        counter = getattr(getattr(state, "options", None), "_counter", None)
        if state is not None and state.method == "moba" and counter is not None:
            counter.reset()
            found = True
    return found


register_method(
    Method(
        name="moba",
        options_cls=MobaOptions,
        install=install,
        families=tuple(_GRID_NDIM),
        description="mixture of block attention (MoBA/VMoBA): each query attends to its own and its best-gated "
                    "blocks; text keeps full attention",
    )
)
