"""diffaccel.pipelines: what users run on top of diffaccel.

* :func:`load_pipeline` — a shipped small model (``"small-flux"``, ``"small-unet"``, ``"small-wan"``), a
  diffusers pipeline folder or a Hub id, offline unless asked;
* :mod:`.highres` — high-resolution generation as a chain of stages (native size, then 2x upscales re-noised
  and denoised with a diffaccel method applied), tiled VAE and CPU offload as memory options;
* :mod:`.freeswim` — FreeSwim's dual-path attention for Wan video at high resolution;
* :mod:`.small` — the small shapes models, their dataset, training and evaluation;
* :mod:`.cli` — the ``diffaccel generate`` / ``eval`` / ``train-small`` subcommands.
"""
from __future__ import annotations

import os

__all__ = ["load_pipeline"]


def load_pipeline(name_or_path: str, *, device=None, dtype=None, allow_download: bool = False):
    """Load a pipeline by name: a shipped small model name, a folder holding a small pipeline or any diffusers
    pipeline, or a diffusers Hub id.

    ``device``: default CUDA when available, else CPU.  ``dtype``: default fp32 for the small models, the
    pipeline's own otherwise.  Offline unless ``allow_download``: a Hub id then loads from the local Hub cache
    only.  Anything that cannot be loaded is a ``ValueError`` naming it.
    """
    import torch
    from diffusers import DiffusionPipeline

    from .small import load_small, resolve_small

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"name_or_path must be a model name, folder or Hub id, got {name_or_path!r}")
    name = os.fspath(name_or_path)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r} ({e})") from None
    if resolve_small(name) is not None:
        return load_small(name, device=device, dtype=dtype or torch.float32)
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        pipe = DiffusionPipeline.from_pretrained(name, local_files_only=not allow_download, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        hint = "" if allow_download or os.path.isdir(name) else \
            " (offline: only the local Hub cache is searched; pass allow_download=True / --allow-download to fetch it)"
        raise ValueError(f"cannot load pipeline {name!r}{hint}: {e}") from None
    return pipe.to(device)
