"""The method registry: a method registers once, and every list derives from it.

A method is its kernel files, its op in ``diffaccel/ops.py``, and a module under
``diffaccel/methods/`` that calls :func:`register_method` (imported from
``diffaccel/methods/__init__.py``).  ``diffaccel generate`` / ``eval`` (their method lists and
default settings), the CLI choices, ``diffaccel bench``'s cases and the demo's method list are all
read from the :class:`Method` records here.

* ``options_cls`` is a dataclass; ``apply(..., **options)`` builds it, so an unknown option is a
  ``ValueError`` naming it, and its ``__post_init__`` validates values (``ValueError`` naming the
  option).
* ``install(model, family, options, layers)`` patches the selected attention layers of one denoiser
  and returns an *undo* callable that restores them exactly.  ``family`` is the model's
  :class:`~diffaccel.families.Family`; ``layers`` a list of ``(qualified_name, attention_module)``.
  An installer must be all-or-nothing: build everything first, then swap.
* ``families``: the model families it supports (``diffaccel.families.FAMILIES``).
* ``backends``: the backends its op runs on; ``apply`` checks an options' ``backend`` against them and
  the device before anything changes.
* ``default_settings(grid)``: option dicts sized on a model's native token grid (``(H, W)`` or
  ``(T, H, W)``), strongest first: what ``diffaccel eval`` compares and ``diffaccel generate`` uses
  when no options are given.
* ``trainable_parameters(model, layers)``: the parameters a distillation trains for this method on a
  patched denoiser (``layers``: the patched ``(name, module)`` pairs); see
  :func:`diffaccel.api.trainable_parameters`.
* ``counts_steps(options)``: whether the method needs the denoising step of every call
  (``diffaccel.context``), e.g. MoBA's ``dense_steps``.
* ``bench``: a :class:`BenchSpec` for ``diffaccel bench`` (``None``: not benchmarked).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["BenchSpec", "Method", "available_methods", "build_options", "check_backend_option", "get_method",
           "methods", "register_method"]

_METHODS: dict[str, "Method"] = {}


@dataclass(frozen=True)
class BenchSpec:
    """How ``diffaccel bench`` runs a method's op.

    op: the op's name in the bench (``--op`` choice, e.g. ``"local"`` for CLEAR).
    cases: ``(cuda: bool) -> [diffaccel.bench.Case]``, the default suite on CUDA / CPU.
    pairs: ``(case) -> int``: visible query-key pairs of a case (its density and useful FLOPs).
    run: ``(case, backend, q, k, v) -> out``.
    flex: whether the op has a FlexAttention backend (then run as the same-pattern baseline).
    gate: optional ``(case, q, k) -> None`` running what the op does before its attention kernel on the
        Triton backend (reported as ``gate_ms`` / ``gate_share``).
    """

    op: str
    cases: Callable
    pairs: Callable
    run: Callable
    flex: bool = False
    gate: Callable | None = None


def _no_parameters(model, layers):
    return []


@dataclass(frozen=True)
class Method:
    name: str
    options_cls: type
    install: Callable[..., Callable[[], None]]
    families: tuple[str, ...]
    description: str = ""
    backends: tuple[str, ...] = ("triton", "flex", "torch")
    default_settings: Callable[[tuple], list] | None = None
    trainable_parameters: Callable = _no_parameters
    counts_steps: Callable[[Any], bool] = lambda options: False
    bench: BenchSpec | None = None


def register_method(method: Method) -> Method:
    if not dataclasses.is_dataclass(method.options_cls):
        raise TypeError(f"options_cls of method {method.name!r} must be a dataclass")
    _METHODS[method.name] = method
    return method


def _load():
    from . import methods  # noqa: F401  (registers the built-in methods)


def get_method(name) -> Method:
    _load()
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {name!r}")
    return _METHODS[name]


def available_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    _load()
    return sorted(_METHODS)


def methods() -> list[Method]:
    """The registered :class:`Method` records, sorted by name."""
    _load()
    return [_METHODS[n] for n in sorted(_METHODS)]


def check_backend_option(backend, supported) -> None:
    """The one check of a method's ``backend`` option: ``None`` or one of ``supported``."""
    if backend is not None and (not isinstance(backend, str) or backend not in supported):
        raise ValueError(f"backend must be one of {tuple(supported)} or None, got {backend!r}")


def build_options(method: Method, options: dict[str, Any]):
    """``method.options_cls(**options)`` with a clear error for unknown names."""
    init = [f for f in dataclasses.fields(method.options_cls) if f.init]
    fields = {f.name for f in init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for method {method.name!r}; valid options: {sorted(fields)}"
        )
    missing = [f.name for f in init if f.name not in options
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"method {method.name!r} needs the option(s) {missing}")
    return method.options_cls(**options)
