"""The student (the denoiser with a method applied) and its frozen teacher, in one model.

The teacher is the same denoiser with full attention.  Every weight the method does not train is shared: the
teacher keeps its own (frozen) copy of only the modules the student trains, stashed inside the model beside the
student's, and :meth:`Student.teacher` swaps them in for one forward pass:

* processor methods (``clear``, ``neighborhood``, ``moba``): the stock processor goes back on each patched
  attention layer and the teacher's copies of ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` replace the
  student's (stashed as ``<layer>._diffaccel_teacher``);
* ``linfusion`` (a module swap): the original attention modules go back in place of the LinFusion layers
  (stashed beside them as ``_diffaccel_teacher_<attr>``).

Swapping modules (not parameter values) leaves the student's parameters, their gradients and the optimiser
untouched, and works the same on one device and under DDP / DeepSpeed ZeRO-2 / FSDP2.  Under FSDP2 every module
of a block, the stashed copies included, stays in the block's shard group: the swap only changes which module the
attention layer calls, and FSDP all-gathers the group's parameters (sharded ``DTensor`` objects) whichever is called.
FSDP2 replaces the parameter objects, so :meth:`Student.rebind` re-reads them after ``accelerator.prepare``;
:meth:`Student.trained_state` gathers full tensors and :meth:`Student.load_trained` shards them back.

What trains (:func:`trainable_parameters`): LinFusion's modules (projections and MLP branches; the norms shared
with the teacher stay frozen); CLEAR's image-stream ``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0`` (+ the pooled
tokens' ``spatial_weight`` with ``down_factor``); the same projections of the patched layers for neighborhood and
MoBA (:data:`diffaccel.projections.PROJECTIONS`).  The list is the method registry's ``trainable_parameters``.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from ..families import detect_family, select_layers
from ..projections import PROJECTIONS
from ..registry import build_options, get_method

__all__ = ["TRAINABLE_METHODS", "Student", "trainable_parameters", "check_method", "full_tensor", "like_param"]

TRAINABLE_METHODS = ("linfusion", "clear", "neighborhood", "moba")

_STASH = "_diffaccel_teacher"


def _get_proj(attn, key):
    """The module of projection ``key`` (``PROJECTIONS``) of ``attn``: ``to_out`` is ``to_out[0]`` where it is a
    ``ModuleList`` (a ``Linear`` + dropout), the module itself elsewhere (FLUX.2's single blocks)."""
    sub = getattr(attn, key, None)
    if isinstance(sub, torch.nn.ModuleList):
        return sub[0] if len(sub) else None
    return sub if isinstance(sub, torch.nn.Module) else None


def _set_proj(attn, key, module):
    sub = getattr(attn, key)
    if isinstance(sub, torch.nn.ModuleList):
        sub[0] = module
    else:
        setattr(attn, key, module)


def full_tensor(t):
    """``t`` whole: an FSDP2-sharded ``DTensor`` is gathered (a collective: every process calls it in the same
    order); a plain tensor is returned as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(value, param):
    """``value`` (a whole tensor) laid out like ``param``: sharded the same way when ``param`` is a ``DTensor``,
    on its device and in its dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(device=param.device if not isinstance(param, DTensor) else param.to_local().device,
                     dtype=param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value


def check_method(method: str, family: str, options: dict):
    """``ValueError`` naming ``--method`` / ``--option`` for a method that cannot be distilled here."""
    if method not in TRAINABLE_METHODS:
        raise ValueError(f"method (--method) must be one of {list(TRAINABLE_METHODS)}, got {method!r}")
    m = get_method(method)
    if family not in m.families:
        raise ValueError(f"method (--method) {method!r} does not support the {family!r} family of this model; it "
                         f"supports {list(m.families)}")
    opts = build_options(m, options)
    if method == "moba" and opts.dense_steps:
        raise ValueError("option (--option) dense_steps is a sampling setting of moba; distil with dense_steps=0")
    return opts


def trainable_parameters(method: str, model, layer_names) -> dict:
    """``{name: parameter}`` (names relative to ``model``) of what ``method`` trains in the patched layers: the
    method registry's ``trainable_parameters`` (the same list ``diffaccel.trainable_parameters(pipe)`` gives),
    named as the model names them."""
    layers = [(n, model.get_submodule(n)) for n in layer_names]
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if _STASH not in name:
            names.setdefault(id(p), name)
    out = {}
    for p in get_method(method).trainable_parameters(model, layers):
        out[names[id(p)]] = p
    return out


class Student:
    """Apply ``method`` to ``denoiser`` for distillation: freeze everything, stash the teacher's copies, select the
    trained parameters (``requires_grad`` on them only).  ``layers``: as ``diffaccel.apply``."""

    def __init__(self, denoiser, method: str, options: dict, layers=None):
        import diffaccel

        self.model = denoiser
        self.method = method
        self.family = detect_family(denoiser)
        self.options = check_method(method, self.family, options)
        selected, _ = select_layers(denoiser, self.family, layers)
        self.layer_names = [n for n, _ in selected]
        denoiser.requires_grad_(False)
        stock = {n: attn.processor for n, attn in selected}
        originals = {n: attn for n, attn in selected}
        copies = {}
        if method != "linfusion":  # the teacher's own copies of the projections, taken before any weights load
            for n, attn in selected:
                copies[n] = {k: copy.deepcopy(_get_proj(attn, k)) for k in PROJECTIONS
                           if _get_proj(attn, k) is not None}
        diffaccel.apply(denoiser, method, layers=layers, **options)
        self._stock = stock
        for n in self.layer_names:
            if method == "linfusion":
                parent_name, _, attr = n.rpartition(".")
                parent = denoiser.get_submodule(parent_name) if parent_name else denoiser
                setattr(parent, f"{_STASH}_{attr}", originals[n])
            else:
                attn = denoiser.get_submodule(n)
                setattr(attn, _STASH, torch.nn.ModuleDict(copies[n]))
        self.trained = trainable_parameters(method, denoiser, self.layer_names)
        if not self.trained:
            raise ValueError(f"method {method!r} has nothing to train in the selected layers")
        for p in self.trained.values():
            p.requires_grad_(True)
        self.features = {}
        self._capture = False
        self._hooks = []
        self._in_teacher = False

    # ------------------------------------------------------------------ teacher

    def _swap(self):
        for n in self.layer_names:
            if self.method == "linfusion":
                parent_name, _, attr = n.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                stash = f"{_STASH}_{attr}"
                a, b = getattr(parent, attr), getattr(parent, stash)
                setattr(parent, attr, b)
                setattr(parent, stash, a)
            else:
                attn = self.model.get_submodule(n)
                stash = getattr(attn, _STASH)
                for k in list(stash.keys()):
                    a, b = _get_proj(attn, k), stash[k]
                    _set_proj(attn, k, b)
                    stash[k] = a

    @contextlib.contextmanager
    def teacher(self):
        """Within the block the model computes the teacher: full attention with the original weights."""
        if self._in_teacher:
            raise RuntimeError("teacher() is not reentrant")
        procs = {}
        if self.method != "linfusion":
            for n in self.layer_names:
                attn = self.model.get_submodule(n)
                procs[n] = attn.processor
                attn.set_processor(self._stock[n])
        self._swap()
        self._in_teacher = True
        try:
            yield self.model
        finally:
            self._in_teacher = False
            self._swap()
            for n, p in procs.items():
                self.model.get_submodule(n).set_processor(p)

    # ------------------------------------------------------------------ per-layer features

    def capture_features(self):
        """Forward hooks on the patched attention layers (student's and teacher's): while :meth:`capturing`, each
        layer's output lands in ``self.features[name]``."""
        if self._hooks:
            return
        seen = set()

        def make(name):
            def hook(module, args, output):
                if self._capture:
                    self.features[name] = output
            return hook

        modules = [(n, self.model.get_submodule(n)) for n in self.layer_names]
        if self.method == "linfusion":
            for n in self.layer_names:
                parent_name, _, attr = n.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                modules.append((n, getattr(parent, f"{_STASH}_{attr}")))
        for n, m in modules:
            if id(m) not in seen:
                seen.add(id(m))
                self._hooks.append(m.register_forward_hook(make(n)))

    @contextlib.contextmanager
    def capturing(self):
        self.features = {}
        self._capture = True
        try:
            yield self.features
        finally:
            self._capture = False

    # ------------------------------------------------------------------ accounting

    def teacher_parameters(self) -> list:
        """The teacher's own (frozen) parameters: the stashed copies."""
        out = []
        for n in self.layer_names:
            if self.method == "linfusion":
                parent_name, _, attr = n.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                out += list(getattr(parent, f"{_STASH}_{attr}").parameters())
            else:
                out += list(getattr(self.model.get_submodule(n), _STASH).parameters())
        return out

    def rebind(self):
        """Re-read the trained parameters from the model (FSDP2's ``fully_shard`` replaces parameter objects by
        sharded ones); returns them in the order of :attr:`trained`."""
        self.trained = {k: self.model.get_parameter(k) for k in self.trained}
        return list(self.trained.values())

    def trained_state(self) -> dict:
        """CPU fp32 copies of the trained parameters, by name (whole tensors: sharded ones are gathered, so under
        FSDP every process calls this)."""
        return {k: full_tensor(p.detach()).to("cpu", torch.float32).clone() for k, p in self.trained.items()}

    def load_trained(self, state: dict, where: str):
        missing = sorted(set(self.trained) - set(state))
        unexpected = sorted(set(state) - set(self.trained))
        bad = [k for k in self.trained if k in state and tuple(state[k].shape) != tuple(self.trained[k].shape)]
        if missing or unexpected or bad:
            raise ValueError(f"{where} does not fit this run's trained parameters (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}, shape mismatches {bad[:4]})")
        with torch.no_grad():
            for k, p in self.trained.items():
                p.copy_(like_param(state[k], p))

    # ------------------------------------------------------------------ export

    def export(self, folder, state: dict) -> list[str]:
        """Write ``state`` (trained parameters by name, e.g. :meth:`trained_state` or the EMA) in the method's
        loadable format into ``folder``; returns the files written.  LinFusion: ``config.json`` +
        ``diffusion_pytorch_model.safetensors``; CLEAR: ``clear_local_<r>[_down_<d>].safetensors``; neighborhood /
        MoBA: ``projections.safetensors``.  ``diffaccel.apply(pipe, method, weights=folder, ...)`` loads each."""
        import os

        if set(state) != set(self.trained):
            raise ValueError("export: the state does not hold exactly the trained parameters")
        if self.method == "linfusion":
            from ..linfusion import CONFIG_NAME, WEIGHTS_NAME, write_linfusion

            modules_list, tensors = [], {}
            for i, name in enumerate(self.layer_names):
                modules_list.append(self.model.get_submodule(name).linfusion_entry(name))
                tensors.update({f"{i}.{k[len(name) + 1:]}": v for k, v in state.items() if k.startswith(name + ".")})
            write_linfusion(folder, modules_list, tensors)
            return [os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)]
        if self.method == "clear":
            from ..methods.clear import clear_filename, write_clear

            path = os.path.join(folder, clear_filename(self.options.radius, self.options.down_factor))
            return [write_clear(path, state, self.options.radius, self.options.down_factor)]
        from ..projections import write_projections

        return [write_projections(folder, state, method=self.method)]
