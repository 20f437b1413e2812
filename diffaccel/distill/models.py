"""Which pipeline ``--model`` names, and how distillation drives it.

Model names are resolved by plug-ins first, then by diffusers:

* plug-ins: objects registered under the ``diffaccel.models`` entry-point group (``pyproject.toml``).  The
  pipelines layer registers one for the shipped small models (``small-flux``, ``small-unet``, ``small-wan``),
  so this package never imports the layer above it.  A plug-in has

  - ``names``: the model names it ships (for help and error messages);
  - ``load(name_or_path, *, device, dtype)``: the pipeline, or ``None`` when the name is not one of its own;
  - ``adapter(pipe)``: an :class:`~diffaccel.distill.adapters.Adapter` for a pipeline it loaded (else ``None``);
  - ``default_prompts(pipe, num, seed)``: the prompts its models are distilled on by default.

* otherwise ``DiffusionPipeline.from_pretrained(name_or_path)``: a local folder, or a Hub id (from the local Hub
  cache only, unless downloads are allowed).
"""
from __future__ import annotations

import os
from importlib.metadata import entry_points

__all__ = ["plugins", "model_names", "load_model", "plugin_for"]

GROUP = "diffaccel.models"


def plugins() -> list:
    out = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        out.append(ep.load())
    return out


def model_names() -> list[str]:
    """Names the plug-ins ship (e.g. ``small-flux``)."""
    return [n for p in plugins() for n in getattr(p, "names", ())]


def plugin_for(pipe):
    """The plug-in that has an adapter for ``pipe``, or ``None``."""
    for p in plugins():
        if p.adapter(pipe) is not None:
            return p
    return None


def load_model(name_or_path, *, device="cpu", dtype=None, allow_download=False):
    """The pipeline named by ``--model`` (see the module docstring); ``ValueError`` naming ``--model`` when it
    cannot be loaded."""
    import torch

    if not isinstance(name_or_path, (str, os.PathLike)) or not os.fspath(name_or_path):
        raise ValueError(f"model (--model) must be a model name, folder or Hub id, got {name_or_path!r}")
    name = os.fspath(name_or_path)
    for p in plugins():
        pipe = p.load(name, device=device, dtype=dtype)
        if pipe is not None:
            return pipe
    from diffusers import DiffusionPipeline

    if not os.path.isdir(name):
        from ..io import is_hub_repo_id

        if not is_hub_repo_id(name):
            raise ValueError(f"model (--model) {name!r} is neither a shipped model {model_names()}, nor a folder, "
                             "nor a Hub id ('owner/name')")
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        pipe = DiffusionPipeline.from_pretrained(name, local_files_only=not allow_download, **kwargs)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        hint = "" if allow_download or os.path.isdir(name) else \
            " (offline: only the local Hub cache is searched; pass --allow-download to fetch it)"
        raise ValueError(f"model (--model) {name!r} cannot be loaded as a diffusers pipeline{hint}: "
                         f"{type(e).__name__}: {e}") from None
    return pipe.to(torch.device(device))
