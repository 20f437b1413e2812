"""Trained attention projections of the processor methods ("neighborhood", "moba"): the ``weights=`` option.

``diffaccel distill`` trains the projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of the patched
self-attention layers so the pattern approximates full attention.  They are stored as one safetensors file
``projections.safetensors`` whose keys are the denoiser's own parameter names (``<layer>.to_q.weight``,
``<layer>.to_out.0.bias`` ...; the layout CLEAR's checkpoints use) and whose metadata names the method::

    diffaccel.apply(pipe, "neighborhood", kernel_size=9, weights="runs/flux-na")     # a folder holding the file
    diffaccel.apply(pipe, "moba", block=(8, 8), topk=2, weights="moba.safetensors")   # or the file itself

Loading is all-or-nothing: every key, shape and dtype is checked before any parameter changes, and
``diffaccel.remove`` puts the original values back (a CPU copy is kept while the method is applied).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .io import atomic_path, hub_fetch, is_hub_repo_id

__all__ = ["WEIGHTS_NAME", "PROJECTIONS", "projection_keys", "projection_parameters", "check_weights_option",
           "save_projections", "write_projections", "install_with_weights"]

WEIGHTS_NAME = "projections.safetensors"
#: the trained projections of a patched attention layer, in every method that trains projections (CLEAR,
#: neighborhood, MoBA; their registry entries' ``trainable_parameters``, the files, ``diffaccel distill``): the
#: image stream's ``to_q`` / ``to_k`` / ``to_v`` / ``to_out`` and the fused ones some families have instead
#: (``to_qkv``; FLUX.2's single blocks' ``to_qkv_mlp_proj``); a text stream's own projections stay frozen
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out", "to_qkv", "to_qkv_mlp_proj")
FORMAT = "diffaccel-projections"


def check_weights_option(value):
    """``ValueError`` unless ``value`` is ``None``, a path / Hub repo id, or a state dict."""
    if value is None or isinstance(value, Mapping):
        return value
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"weights must be None, a projections.safetensors file or a folder holding one, a Hub repo "
                         f"id or a state dict, got {value!r}")
    return value


def projection_keys(layers) -> dict:
    """``{key: parameter}`` of the trainable projections of ``layers`` (``[(name, attention module)]``)."""
    out = {}
    for name, attn in layers:
        for proj in PROJECTIONS:
            sub = getattr(attn, proj, None)
            if isinstance(sub, torch.nn.Module):
                for pname, p in sub.named_parameters():
                    out[f"{name}.{proj}.{pname}"] = p
    return out


def projection_parameters(model, layers) -> list:
    """The parameters of :func:`projection_keys` (a registry ``trainable_parameters`` hook)."""
    return list(projection_keys(layers).values())


def save_projections(model, path, layer_names, *, method: str, dtype=None):
    """Write the projections of the layers ``layer_names`` of ``model`` to ``path`` (a ``.safetensors`` file, or a
    folder that receives ``projections.safetensors``), atomically.  Returns the file written."""
    layers = [(n, model.get_submodule(n)) for n in layer_names]
    tensors = {k: p.detach().to("cpu", dtype=dtype or p.dtype).clone()
               for k, p in projection_keys(layers).items()}
    return write_projections(path, tensors, method=method)


def write_projections(path, tensors: dict, *, method: str):
    """Write ``tensors`` (keys ``<layer>.to_q.weight`` ...) as a projections file for ``method``, atomically;
    ``path`` is the file or a folder receiving ``projections.safetensors``.  Returns the file written."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        path = os.path.join(path, WEIGHTS_NAME)
    if not tensors:
        raise ValueError("no projections to save")
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": FORMAT, "method": method})
    return path


def _resolve_file(weights) -> str:
    w = os.path.expanduser(os.fspath(weights))
    if os.path.isfile(w):
        return w
    if os.path.isdir(w):
        path = os.path.join(w, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"weights folder {w!r} has no {WEIGHTS_NAME} (written by `diffaccel distill`)")
        return path
    if w.endswith(".safetensors") or not is_hub_repo_id(w):
        raise ValueError(f"weights={weights!r}: no such file or folder, and not a Hub repo id ('owner/name')")
    return hub_fetch(w, filename=WEIGHTS_NAME)


def _read(weights, method):
    """``({key: tensor}, label)`` of ``weights``; a file of another method or format is a ``ValueError``."""
    if isinstance(weights, Mapping):
        bad = [k for k, t in weights.items() if not isinstance(k, str) or not isinstance(t, torch.Tensor)]
        if bad:
            raise ValueError(f"weights state dict must map str to torch.Tensor; bad entries: {bad[:5]}")
        return dict(weights), "the given state dict"
    path = _resolve_file(weights)
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"could not read the safetensors file {path!r}: {type(e).__name__}: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"weights {path!r} is not a diffaccel projections file (metadata format "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("method") != method:
        raise ValueError(f"weights {path!r} were trained for method {meta.get('method')!r}, not {method!r}")
    return tensors, path


def install_with_weights(model, layers, weights, method: str, install):
    """Run ``install()`` (which patches ``layers`` and returns its undo) with the projections of ``weights`` loaded
    into those layers first; returns an undo that restores processors and projection values.  ``weights=None``:
    ``install()`` alone.  Every check runs before anything changes."""
    if weights is None:
        return install()
    tensors, label = _read(weights, method)
    want = projection_keys(layers)
    problems = []
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:8])}")
    for k, p in want.items():
        t = tensors.get(k)
        if t is not None and tuple(t.shape) != tuple(p.shape):
            problems.append(f"{k}: shape {list(t.shape)}, the model's is {list(p.shape)}")
        elif t is not None and not t.is_floating_point():
            problems.append(f"{k}: dtype {t.dtype} is not floating point")
    if problems:
        raise ValueError(f"{method} weights {label} do not fit this {type(model).__name__}; nothing was loaded:\n  - "
                         + "\n  - ".join(problems))
    originals = []
    try:
        with torch.no_grad():
            for k, p in want.items():
                originals.append((p, p.detach().to("cpu", copy=True)))
                p.copy_(tensors[k])
        undo_install = install()
    except BaseException:
        with torch.no_grad():
            for p, old in originals:
                p.copy_(old)
        raise

    def undo():
        undo_install()
        with torch.no_grad():
            for p, old in originals:
                p.copy_(old)
        originals.clear()

    return undo
