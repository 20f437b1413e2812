"""Method "linfusion": LinFusion's generalized linear attention for SD 1.5 / 2.1 / SDXL UNets.

    diffaccel.apply(pipe, "linfusion", weights="auto")            # the released checkpoint for this pipeline
    diffaccel.apply(pipe, "linfusion", weights="Yuanshi/LinFusion-1-5")
    diffaccel.apply(unet, "linfusion")                            # from the teacher, for distillation

Unlike processor-based methods, LinFusion *replaces* each selected ``attn1``
module by a :class:`~diffaccel.linfusion.LinFusionAttention` (it has its own
trainable MLP branches); ``remove`` puts the original modules back.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .. import ops
from .._validate import positive_number
from ..bench import Case
from ..linfusion import LinFusionAttention, load_linfusion_checkpoint, resolve_auto_weights, unsupported_features
from ..registry import BenchSpec, Method, check_backend_option, register_method

__all__ = ["LinFusionOptions", "install", "linfusion_parameters"]

BACKENDS = ("triton", "torch")


@dataclass
class LinFusionOptions:
    """Options of the "linfusion" method.

    weights: ``None`` (default): initialise from the teacher (see ``init``);
        ``"auto"``: LinFusion's released checkpoint for the pipeline the UNet
        was loaded from (``diffaccel.linfusion.LINFUSION_CHECKPOINTS``, matched
        on the UNet's ``config._name_or_path``); a local checkpoint folder; or a
        Hub repo id such as ``"Yuanshi/LinFusion-XL"`` (downloaded when online,
        else taken from the local Hub cache).
    mid_dim: width of the MLP branches when ``weights`` is None: ``None`` = the
        layer width (LinFusion's default) or a positive int.  With a checkpoint, its
        config decides (passing both is an error; LinFusion's ``-1``, an identity
        branch, is read from checkpoints but not offered here).
    backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA, else torch).
    eps: positive finite number added to the linear-attention normaliser (LinFusion uses 1e-4).
    init: when ``weights`` is None: ``"teacher"`` copies ``to_q/to_k/to_v/to_out``
        from the teacher and zeroes the last Linear of each MLP branch (so
        ``x + MLP(x) = x`` at start); ``"random"``: PyTorch's default
        initialisation everywhere (as LinFusion's from-scratch training).
    """

    weights: str | os.PathLike | None = None
    mid_dim: int | None = None
    backend: str | None = None
    eps: float = 1e-4
    init: str = "teacher"

    def __post_init__(self):
        w = self.weights
        if w is not None:
            if not isinstance(w, (str, os.PathLike)) or not os.fspath(w):
                raise ValueError(f"weights must be None, 'auto', a checkpoint folder or a Hub repo id, got {w!r}")
        m = self.mid_dim
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"mid_dim must be None or a positive int, got {m!r}")
            if w is not None:
                raise ValueError("mid_dim applies only when weights is None: a checkpoint's config sets the MLP width")
        check_backend_option(self.backend, BACKENDS)
        self.eps = positive_number("eps", self.eps)
        if self.init not in ("teacher", "random"):
            raise ValueError(f"init must be 'teacher' or 'random', got {self.init!r}")


def _parent_and_attr(model, name):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def install(model, family, options, layers):
    """Replace every ``(name, attention)`` in ``layers`` by a LinFusion layer; return the undo callable.

    All-or-nothing: every student is built (and every checkpoint tensor checked
    and loaded) before the first module is swapped.
    """
    if not layers:
        return lambda: None
    name_of = {id(m): n for n, m in model.named_modules()}
    problems = []
    slots = []
    for given_name, attn in layers:
        name = name_of.get(id(attn))
        if name is None:
            problems.append(f"layer {given_name!r} is not a submodule of the {type(model).__name__}")
            continue
        why = unsupported_features(attn)
        if why:
            problems.append(f"layer {name!r}: {'; '.join(why)}")
            continue
        slots.append((name, attn))
    if problems:
        raise ValueError("LinFusion cannot patch this model:\n  - " + "\n  - ".join(problems))

    if options.weights is None:
        students = {
            id(attn): LinFusionAttention.from_attention(
                attn, mid_dim=options.mid_dim, eps=options.eps, backend=options.backend, init=options.init
            )
            for _, attn in slots
        }
    else:
        weights = options.weights
        if isinstance(weights, str) and weights == "auto":
            weights = resolve_auto_weights(model)
        students = load_linfusion_checkpoint(weights, model, slots, eps=options.eps, backend=options.backend)

    swapped = []
    for name, attn in slots:
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, students[id(attn)])
        swapped.append((parent, attr, attn))

    def undo():
        for parent, attr, original in reversed(swapped):
            setattr(parent, attr, original)
        swapped.clear()

    return undo


def linfusion_parameters(model_or_pipe):
    """The trainable LinFusion parameters of a patched UNet (or a pipeline's ``unet``), e.g. for
    distillation: ``unet.requires_grad_(False)`` then ``for p in linfusion_parameters(unet): p.requires_grad_(True)``.
    Excludes norms shared with the teacher (``group_norm`` / ``spatial_norm``)."""
    from ..linfusion import _denoiser

    params = []
    for module in _denoiser(model_or_pipe).modules():
        if isinstance(module, LinFusionAttention):
            params += [p for n, p in module.named_parameters() if not n.startswith(("group_norm.", "spatial_norm."))]
    return params


def _trainable_parameters(model, layers):
    """LinFusion's layers (the patched names now hold them), shared norms excluded."""
    params = []
    for name, _ in layers:
        module = model.get_submodule(name)
        if isinstance(module, LinFusionAttention):
            params += [p for n, p in module.named_parameters() if not n.startswith(("group_norm.", "spatial_norm."))]
    return params


def _bench_cases(cuda):
    if cuda:
        return [Case(f"linear-{n}", "linear", (n,), 8, 40, 0) for n in (4096, 16384, 65536)]
    return [Case("linear-16384-h8-d40", "linear", (16384,), 8, 40, 0)]


def _bench_run(case, backend, q, k, v):
    return ops.linear_attention(q, k, v, backend=backend)


METHOD = register_method(
    Method(
        name="linfusion",
        options_cls=LinFusionOptions,
        install=install,
        families=("unet",),
        description="LinFusion generalized linear attention (replaces attn1 modules; trainable MLP branches)",
        backends=BACKENDS,
        default_settings=lambda grid: [dict()] if len(grid) == 2 else [],
        trainable_parameters=_trainable_parameters,
        bench=BenchSpec(op="linear", cases=_bench_cases, pairs=lambda case: case.tokens ** 2, run=_bench_run),
    )
)
