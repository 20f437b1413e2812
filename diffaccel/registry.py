"""The method registry: a method = a name + an options dataclass + an installer.

Adding a method touches one place: a module under ``diffaccel/methods/`` that
calls :func:`register_method`, imported from ``diffaccel/methods/__init__.py``.

* ``options_cls`` is a dataclass; ``apply(..., **options)`` builds it, so an
  unknown option is a ``ValueError`` naming it, and its ``__post_init__``
  validates values (``ValueError`` naming the option).
* ``install(model, family, options, layers)`` patches the selected attention
  layers of one denoiser and returns an *undo* callable that restores them
  exactly.  ``layers`` is a list of ``(qualified_name, attention_module)``.
  An installer must be all-or-nothing: build everything first, then swap.
* ``families``: the model families it supports (see ``diffaccel.families``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

_METHODS: dict[str, "Method"] = {}


@dataclass(frozen=True)
class Method:
    name: str
    options_cls: type
    install: Callable[..., Callable[[], None]]
    families: tuple[str, ...]
    description: str = ""


def register_method(method: Method) -> Method:
    if not dataclasses.is_dataclass(method.options_cls):
        raise TypeError(f"options_cls of method {method.name!r} must be a dataclass")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    from . import methods  # noqa: F401  (registers the built-in methods)

    if name not in _METHODS:
        raise ValueError(f"method must be one of {sorted(_METHODS)}, got {name!r}")
    return _METHODS[name]


def available_methods() -> list[str]:
    from . import methods  # noqa: F401

    return sorted(_METHODS)


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
