"""LinFusion: generalized linear attention in place of a UNet's self-attention.

LinFusion (Liu et al., 2024) replaces the softmax self-attention (``attn1``) of
every transformer block of an SD 1.5 / SD 2.1 / SDXL UNet with

    q = W_q(x + MLP_q(x))     k = W_k(x + MLP_k(x))     v = W_v(x)
    out = W_out(linear_attention(q, k, v))            (diffaccel.ops.linear_attention)

where ``MLP = Linear(d, m) -> LayerNorm(m) -> LeakyReLU -> Linear(m, d)``.
Cross-attention (``attn2``) is untouched, so ControlNet and IP-Adapter keep working.

This module holds the layer (:class:`LinFusionAttention`), the published
checkpoint format (read / validate / write) and the table that maps base
pipelines to LinFusion's released checkpoints.  The method itself (options,
``install``) is :mod:`diffaccel.methods.linfusion`.

Checkpoint format (LinFusion's ``save_pretrained`` output, read and written as is)::

    folder/config.json
        {"_class_name": "LinFusion", "modules_list": [
            {"module_name": "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
             "dim_n": 320, "heads": 8, "projection_mid_dim": null}, ...]}
    folder/diffusion_pytorch_model.safetensors
        "{i}.to_q.weight", "{i}.to_k.weight", "{i}.to_v.weight",
        "{i}.to_out.0.weight", "{i}.to_out.0.bias",
        "{i}.to_q_.{0,1,3}.{weight,bias}", "{i}.to_k_.{0,1,3}.{weight,bias}"

for the ``i``-th entry of ``modules_list``.  ``dim_n`` is the width of
``to_q``'s output, ``projection_mid_dim`` the MLP width (``null`` = the layer
width, ``-1`` = LinFusion's identity branch: ``q = W_q(x + x)``).
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from . import ops
from .io import atomic_dir, hub_fetch, is_hub_repo_id

__all__ = [
    "LINFUSION_CHECKPOINTS",
    "LinFusionAttention",
    "linfusion_checkpoint_for",
    "load_linfusion_checkpoint",
    "save_linfusion",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_NAME_BIN = "diffusion_pytorch_model.bin"

# Base pipeline (Hub id) -> LinFusion checkpoint (Hub id), used by ``weights="auto"``.
# The first six rows are LinFusion's own table (src/linfusion/linfusion.py, two
# revisions); the SD 1.5 mirror and SD 1.4 share SD 1.5's UNet architecture,
# which LinFusion-1-5 is released for ("SD v1.5 and its variants").
LINFUSION_CHECKPOINTS = {
    "runwayml/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "SG161222/Realistic_Vision_V4.0_noVAE": "Yuanshi/LinFusion-1-5",
    "stablediffusionapi/realistic-vision-v51": "Yuanshi/LinFusion-1-5",
    "Lykon/dreamshaper-8": "Yuanshi/LinFusion-1-5",
    "stabilityai/stable-diffusion-2-1": "Yuanshi/LinFusion-2-1",
    "stabilityai/stable-diffusion-xl-base-1.0": "Yuanshi/LinFusion-XL",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "Yuanshi/LinFusion-1-5",
    "CompVis/stable-diffusion-v1-4": "Yuanshi/LinFusion-1-5",
}
_CHECKPOINTS_LOWER = {k.lower(): v for k, v in LINFUSION_CHECKPOINTS.items()}
_HUB_CACHE_DIR = re.compile(r"models--([^/\\]+?)--([^/\\]+)")

# the parameters a LinFusion checkpoint holds per layer (anything else in the layer, e.g. a
# group_norm shared with the teacher, is not part of the format)
_OWN_PREFIXES = ("to_q.", "to_k.", "to_v.", "to_out.", "to_q_.", "to_k_.")


def _mlp(dim, mid_dim):
    if mid_dim == -1:
        return nn.Identity()
    return nn.Sequential(nn.Linear(dim, mid_dim), nn.LayerNorm(mid_dim), nn.LeakyReLU(), nn.Linear(mid_dim, dim))


class LinFusionAttention(nn.Module):
    """Drop-in replacement for a diffusers self-attention ``Attention`` module (``attn1``).

    Keeps the teacher's layout and parameter names (``to_q``, ``to_k``,
    ``to_v``, ``to_out.0``, ``to_out.1``) plus the two MLP branches
    ``to_q_`` / ``to_k_`` (``nn.Sequential`` indices 0, 1, 3, as in LinFusion's
    checkpoints).  ``forward`` accepts what diffusers' transformer blocks pass
    to ``attn1``; it honours the teacher's ``residual_connection``,
    ``rescale_output_factor``, ``group_norm``, ``spatial_norm`` (the last two
    are the teacher's own modules, shared) and 4-D ``[B, C, H, W]`` inputs.

    Args:
        query_dim: width of the input (and of the MLP branches' output).
        heads, dim_head: the attention heads (``heads * dim_head`` = width of ``to_q``'s output).
        out_dim: width of ``to_out.0``'s output (default ``query_dim``).
        kv_dim: width of the key/value source (default ``query_dim``).
        mid_dim: MLP width; ``None`` = ``query_dim``; ``-1`` = LinFusion's "no MLP", whose
            branch is ``nn.Identity`` so the projections see ``x + x`` (kept as is, so such
            checkpoints behave as they were trained).
        qkv_bias, out_bias, dropout: as the teacher's ``Attention``.
        eps, backend: passed to :func:`diffaccel.ops.linear_attention`.
    """

    def __init__(self, query_dim, heads, dim_head, *, out_dim=None, kv_dim=None, mid_dim=None, qkv_bias=False,
                 out_bias=True, dropout=0.0, residual_connection=False, rescale_output_factor=1.0,
                 group_norm=None, spatial_norm=None, eps=1e-4, backend=None):
        super().__init__()
        out_dim = query_dim if out_dim is None else out_dim
        kv_dim = query_dim if kv_dim is None else kv_dim
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.mid_dim = query_dim if mid_dim is None else mid_dim
        self.eps = eps
        self.backend = backend
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, out_dim, bias=out_bias), nn.Dropout(dropout)])
        self.to_q_ = _mlp(query_dim, self.mid_dim)
        self.to_k_ = _mlp(kv_dim, self.mid_dim)
        self.group_norm = group_norm
        self.spatial_norm = spatial_norm

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_attention(cls, attn, *, mid_dim=None, eps=1e-4, backend=None, init="teacher"):
        """A student for the diffusers ``Attention`` module ``attn``, on its device and dtype.

        ``init="teacher"``: ``to_q/to_k/to_v/to_out`` are copies of the
        teacher's, and the last ``Linear`` of each MLP branch is zero, so
        ``x + MLP(x) == x`` (with ``mid_dim=-1``, whose branch is the identity,
        ``to_q``/``to_k`` are the teacher's halved) and the student starts as the teacher's projections
        feeding linear instead of softmax attention (its output is close to,
        not equal to, the teacher's).  ``init="random"``: PyTorch's default
        initialisation everywhere.  ``ValueError`` if ``attn`` has features this
        formulation has no place for.
        """
        problems = unsupported_features(attn)
        if problems:
            raise ValueError(f"LinFusion cannot replace this attention module: {'; '.join(problems)}")
        inner = attn.to_q.out_features
        heads = attn.heads
        student = cls(
            attn.to_q.in_features, heads, inner // heads,
            out_dim=attn.to_out[0].out_features,
            kv_dim=attn.to_k.in_features,
            mid_dim=mid_dim,
            qkv_bias=attn.to_q.bias is not None,
            out_bias=attn.to_out[0].bias is not None,
            dropout=attn.to_out[1].p if len(attn.to_out) > 1 and isinstance(attn.to_out[1], nn.Dropout) else 0.0,
            residual_connection=bool(getattr(attn, "residual_connection", False)),
            rescale_output_factor=float(getattr(attn, "rescale_output_factor", 1.0)),
            group_norm=getattr(attn, "group_norm", None),
            spatial_norm=getattr(attn, "spatial_norm", None),
            eps=eps, backend=backend,
        )
        w = attn.to_q.weight
        student.to(device=w.device, dtype=w.dtype)
        student.train(attn.training)
        if init == "teacher":
            with torch.no_grad():
                for name in ("to_q", "to_k", "to_v"):
                    src, dst = getattr(attn, name), getattr(student, name)
                    dst.weight.copy_(src.weight)
                    if src.bias is not None:
                        dst.bias.copy_(src.bias)
                student.to_out[0].weight.copy_(attn.to_out[0].weight)
                if attn.to_out[0].bias is not None:
                    student.to_out[0].bias.copy_(attn.to_out[0].bias)
                for mlp, proj in ((student.to_q_, student.to_q), (student.to_k_, student.to_k)):
                    if isinstance(mlp, nn.Sequential):
                        nn.init.zeros_(mlp[3].weight)
                        nn.init.zeros_(mlp[3].bias)
                    else:  # identity branch: W(x + x) = (W / 2)(2x) must equal the teacher's W x
                        proj.weight.mul_(0.5)
        elif init != "random":
            raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
        return student

    # ------------------------------------------------------------------ checkpoint format

    def linfusion_state_dict(self):
        """The parameters a LinFusion checkpoint stores for this layer (no shared teacher norms)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(_OWN_PREFIXES)}

    def linfusion_entry(self, module_name):
        return {
            "module_name": module_name,
            "dim_n": self.to_q.out_features,
            "heads": self.heads,
            # LinFusion writes null for its default (the layer width)
            "projection_mid_dim": None if self.mid_dim == self.to_q.in_features else self.mid_dim,
        }

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # kwargs: cross_attention_kwargs meant for other layers (e.g. IP-Adapter's ip_adapter_masks,
        # a LoRA scale) are ignored, as diffusers' own self-attention processor ignores them.
        if attention_mask is not None:
            raise ValueError(
                "LinFusionAttention does not support attention_mask: linear attention has no per-pair "
                "logits to mask. Pass attention_mask=None (diffusers' pipelines do for self-attention)."
            )
        residual = hidden_states
        if self.spatial_norm is not None:
            hidden_states = self.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, c, height * width).transpose(1, 2)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        q = self.to_q(hidden_states + self.to_q_(hidden_states))
        k = self.to_k(context + self.to_k_(context))
        v = self.to_v(context)
        batch = q.shape[0]
        q = q.view(batch, -1, self.heads, self.dim_head)
        k = k.view(batch, -1, self.heads, self.dim_head)
        v = v.view(batch, -1, self.heads, self.dim_head)
        out = ops.linear_attention(q, k, v, eps=self.eps, backend=self.backend)
        out = out.reshape(batch, -1, self.heads * self.dim_head)
        out = self.to_out[1](self.to_out[0](out))

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, -1, height, width)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out

    def extra_repr(self):
        return f"heads={self.heads}, dim_head={self.dim_head}, mid_dim={self.mid_dim}, eps={self.eps}, backend={self.backend!r}"


def unsupported_features(attn):
    """Why ``attn`` cannot be replaced by a :class:`LinFusionAttention` (empty list: it can)."""
    problems = []
    for name in ("to_q", "to_k", "to_v"):
        if not isinstance(getattr(attn, name, None), nn.Linear):
            problems.append(f"it has no nn.Linear {name}")
    to_out = getattr(attn, "to_out", None)
    if not isinstance(to_out, nn.ModuleList) or not to_out or not isinstance(to_out[0], nn.Linear):
        problems.append("it has no to_out[0] nn.Linear")
    if not isinstance(getattr(attn, "heads", None), int):
        problems.append("it has no integer `heads`")
    if problems:
        return problems
    if attn.to_q.out_features % attn.heads:
        problems.append(f"to_q's width {attn.to_q.out_features} is not a multiple of heads={attn.heads}")
    if getattr(attn, "is_cross_attention", False) or getattr(attn, "only_cross_attention", False):
        problems.append("it is cross-attention (LinFusion replaces self-attention only)")
    for feat, why in (
        ("norm_q", "QK normalisation (norm_q)"),
        ("norm_k", "QK normalisation (norm_k)"),
        ("norm_cross", "encoder-state normalisation (norm_cross)"),
        ("add_k_proj", "added key/value projections (added_kv_proj_dim)"),
    ):
        if getattr(attn, feat, None) is not None:
            problems.append(f"it uses {why}, which LinFusion's formulation has no place for")
    return problems


# ---------------------------------------------------------------------- checkpoint table


def linfusion_checkpoint_for(name_or_path):
    """The LinFusion checkpoint (Hub id) for a base pipeline's name or path, or ``None``.

    Matches a Hub id (case-insensitively) or a Hub cache path
    (``.../models--runwayml--stable-diffusion-v1-5/snapshots/<rev>/unet``).
    """
    if not name_or_path:
        return None
    name = os.fspath(name_or_path).rstrip("/\\")
    hit = _CHECKPOINTS_LOWER.get(name.lower())
    if hit is None:
        m = _HUB_CACHE_DIR.search(name)
        if m:
            hit = _CHECKPOINTS_LOWER.get(f"{m.group(1)}/{m.group(2)}".lower())
    return hit


def resolve_auto_weights(model, pipeline_name=None):
    """``weights="auto"``: the LinFusion checkpoint for the pipeline ``model`` came from."""
    candidates = [pipeline_name]
    config = getattr(model, "config", None)
    if config is not None:
        candidates.append(getattr(config, "_name_or_path", None))
    for name in candidates:
        hit = linfusion_checkpoint_for(name)
        if hit:
            return hit
    seen = [str(c) for c in candidates if c]
    known = ", ".join(sorted(LINFUSION_CHECKPOINTS))
    raise ValueError(
        f"weights='auto' found no LinFusion checkpoint for this model (name_or_path: {seen or 'unknown'}); "
        f"known base pipelines: {known}. Pass weights=<folder or Hub id of a LinFusion checkpoint> instead."
    )


# ---------------------------------------------------------------------- reading


def resolve_checkpoint_folder(weights):
    """A local folder for ``weights``: the folder itself, or a Hub repo id downloaded (or found in the cache)."""
    path = os.path.expanduser(os.fspath(weights))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"weights={weights!r} is a file; pass the checkpoint folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not is_hub_repo_id(path):
        raise ValueError(f"weights={weights!r} is neither an existing folder nor a Hub repo id ('owner/name')")
    folder = hub_fetch(path, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    if not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        folder = hub_fetch(path, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME_BIN])
    return folder


def read_checkpoint_folder(folder):
    """``(modules_list, tensors)`` from a checkpoint folder; ``ValueError`` if unreadable."""
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"LinFusion checkpoint {folder!r} has no {CONFIG_NAME}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 errors are ValueErrors
        why = "nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"LinFusion checkpoint {folder!r}: cannot read {CONFIG_NAME} ({cfg_path}): {why}") from None
    modules_list = config.get("modules_list") if isinstance(config, dict) else None
    if not isinstance(modules_list, list):
        raise ValueError(f"LinFusion checkpoint {folder!r}: {CONFIG_NAME} has no 'modules_list' list")
    st_path = os.path.join(folder, WEIGHTS_NAME)
    bin_path = os.path.join(folder, WEIGHTS_NAME_BIN)
    try:
        if os.path.isfile(st_path):
            from safetensors.torch import load_file

            tensors = load_file(st_path, device="cpu")
        elif os.path.isfile(bin_path):
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"LinFusion checkpoint {folder!r} has neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN}")
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"LinFusion checkpoint {folder!r}: cannot read its weights: {type(e).__name__}: {e}") from e
    return modules_list, tensors


def _entry_problems(i, entry):
    where = f"modules_list[{i}]"
    if not isinstance(entry, dict):
        return [f"{where} is not an object: {entry!r}"]
    problems = []
    if not isinstance(entry.get("module_name"), str) or not entry.get("module_name"):
        problems.append(f"{where} has no module_name string")
    for key in ("dim_n", "heads"):
        val = entry.get(key)
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            problems.append(f"{where} ({entry.get('module_name')!r}) {key} must be a positive int, got {val!r}")
    mid = entry.get("projection_mid_dim")
    if mid is not None and (isinstance(mid, bool) or not isinstance(mid, int) or (mid < 1 and mid != -1)):
        problems.append(f"{where} ({entry.get('module_name')!r}) projection_mid_dim must be null, -1 or a positive int, got {mid!r}")
    return problems


_POSSIBLE_SUFFIXES = frozenset(
    [f"{p}.{t}" for p in ("to_q", "to_k", "to_v", "to_out.0") for t in ("weight", "bias")]
    + [f"{p}.{j}.{t}" for p in ("to_q_", "to_k_") for j in (0, 1, 3) for t in ("weight", "bias")]
)


def load_linfusion_checkpoint(weights, model, selected, *, eps=1e-4, backend=None):
    """Build a :class:`LinFusionAttention` per selected layer from a LinFusion checkpoint.

    ``selected``: ``[(name, attention_module)]`` of ``model``.  Returns
    ``{id(attention_module): student}``; nothing in ``model`` is modified.
    Every problem (unreadable entries, module names not in ``model``, selected
    layers without an entry, config mismatches, missing / unexpected keys, shape
    mismatches) is collected and raised as one ``ValueError``.  Entries for
    layers of ``model`` that are not selected are checked for key names only
    and otherwise skipped.
    """
    folder = resolve_checkpoint_folder(weights)
    modules_list, tensors = read_checkpoint_folder(folder)
    problems = []
    named = dict(model.named_modules())
    name_of = {id(m): n for n, m in model.named_modules()}
    by_name = {}
    for i, entry in enumerate(modules_list):
        p = _entry_problems(i, entry)
        if p:
            problems += p
            continue
        mname = entry["module_name"]
        if mname not in named:
            problems.append(f"modules_list[{i}] module_name {mname!r} not found in the {type(model).__name__}")
        elif mname in by_name:
            problems.append(f"modules_list[{i}] module_name {mname!r} is listed twice")
        else:
            by_name[mname] = i

    # keys: "{i}.{suffix}" with i an entry index and suffix a parameter a LinFusion layer can have
    unexpected = []
    by_index = {}
    for key in tensors:
        idx, _, suffix = key.partition(".")
        if not idx.isdigit() or int(idx) >= len(modules_list) or suffix not in _POSSIBLE_SUFFIXES:
            unexpected.append(key)
        else:
            by_index.setdefault(int(idx), {})[suffix] = tensors[key]

    students = {}
    for layer_name, attn in selected:
        mname = name_of.get(id(attn), layer_name)
        if mname not in by_name:
            if not any(isinstance(e, dict) and e.get("module_name") == mname for e in modules_list):
                problems.append(f"selected layer {mname!r} has no entry in the checkpoint's modules_list")
            continue
        i = by_name[mname]
        entry = modules_list[i]
        why = unsupported_features(attn)
        if why:
            problems.append(f"layer {mname!r}: {'; '.join(why)}")
            continue
        if entry["heads"] != attn.heads:
            problems.append(f"modules_list[{i}] ({mname!r}) heads={entry['heads']} but the layer has {attn.heads}")
        if entry["dim_n"] != attn.to_q.out_features:
            problems.append(f"modules_list[{i}] ({mname!r}) dim_n={entry['dim_n']} but the layer's to_q width is {attn.to_q.out_features}")
        student = LinFusionAttention.from_attention(
            attn, mid_dim=entry.get("projection_mid_dim"), eps=eps, backend=backend, init="random"
        )
        want = student.linfusion_state_dict()
        have = by_index.get(i, {})
        for suffix in sorted(set(want) - set(have)):
            problems.append(f"missing key {i}.{suffix} (layer {mname!r})")
        for suffix in sorted(set(have) - set(want)):
            unexpected.append(f"{i}.{suffix}")
        for suffix in sorted(set(want) & set(have)):
            if tuple(have[suffix].shape) != tuple(want[suffix].shape):
                problems.append(
                    f"shape mismatch for {i}.{suffix} (layer {mname!r}): checkpoint {tuple(have[suffix].shape)}, "
                    f"expected {tuple(want[suffix].shape)}"
                )
            elif not have[suffix].is_floating_point():
                problems.append(f"{i}.{suffix} has dtype {have[suffix].dtype}, expected a floating-point tensor")
            elif not bool(torch.isfinite(have[suffix]).all()):
                problems.append(f"{i}.{suffix} (layer {mname!r}) holds NaN or inf values")
        students[id(attn)] = (student, i)
    problems += [f"unexpected key {k}" for k in sorted(unexpected)]
    if problems:
        listing = "\n  - ".join(problems)
        raise ValueError(f"LinFusion checkpoint {weights!r} does not fit this model ({len(problems)} problem(s)):\n  - {listing}")

    out = {}
    for key, (student, i) in students.items():
        have = by_index.get(i, {})
        with torch.no_grad():
            for suffix, param in student.linfusion_state_dict().items():
                # state_dict() tensors share storage with the parameters: copy_ loads in place,
                # casting to the layer's dtype and device
                param.copy_(have[suffix])
        out[key] = student
    return out


# ---------------------------------------------------------------------- writing


def _denoiser(model_or_pipe):
    """The UNet of a pipeline (or the model itself)."""
    from .api import denoisers

    found = denoisers(model_or_pipe)
    return next((m for label, m in found if label in ("", "unet")), found[0][1])


def save_linfusion(model_or_pipe, folder, *, dtype=None):
    """Write the model's LinFusion layers in LinFusion's checkpoint format, atomically.

    ``folder`` receives ``config.json`` and ``diffusion_pytorch_model.safetensors``
    (a new folder appears complete or not at all; in an existing folder each file is
    replaced atomically).  ``dtype`` optionally casts the saved tensors (e.g.
    ``torch.float16``).  Readable by LinFusion's ``LinFusion.from_pretrained`` and by
    ``diffaccel.apply(..., "linfusion", weights=folder)``.  Returns ``folder``.
    """
    from safetensors.torch import save_file

    unet = _denoiser(model_or_pipe)
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, LinFusionAttention)]
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no LinFusion layers to save (apply the 'linfusion' method first)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    modules_list, tensors = [], {}
    for i, (name, layer) in enumerate(layers):
        modules_list.append(layer.linfusion_entry(name))
        for suffix, t in layer.linfusion_state_dict().items():
            t = t.detach().to("cpu", dtype=dtype or t.dtype)
            tensors[f"{i}.{suffix}"] = t.clone().contiguous()
    try:
        import diffusers

        version = diffusers.__version__
    except ImportError:  # pragma: no cover
        version = None
    config = {"_class_name": "LinFusion", "_diffusers_version": version, "modules_list": modules_list}
    with atomic_dir(folder) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    return folder

