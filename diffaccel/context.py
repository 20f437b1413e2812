"""The per-call context: what processors need to know about the denoiser call they run in.

:func:`track_layout` installs **one** forward pre-hook (and its matching post-hook) on a
denoiser.  On every call the pre-hook builds a :class:`CallContext` holding

* the call's token :class:`~diffaccel.layout.Layout` (read from the call's inputs by the
  model's family, ``diffaccel.families``; computed lazily, the first time a processor asks,
  so a tracked model without diffaccel processors is never touched);
* the call's ``timestep`` and, when step counting is on, the denoising ``step`` index;
* a memo of the padding masks already read in this call (each mask tensor is read on the host
  once per call, however many layers receive it);

and pushes it on a thread-local stack; the post-hook pops it (also when the forward raises).
Processors read :func:`current_context` — the innermost denoiser call running in this
thread — and nothing is written into them.  Two threads running the same model each see their
own context; nothing is kept in module globals across calls.

**Denoising steps** (:class:`StepCounter`).  A call whose timestep (its largest value) is
*larger* than the previous call's starts a new generation (step 0), a smaller one is the next
step, an equal one the same step (classifier-free guidance run as two calls, a second-order
scheduler's repeated timestep).  ``diffaccel.apply`` shares one counter between the denoisers of a
pipeline (Wan 2.2's two experts count one sequence of steps).  Counting reads the timestep on
the host, so it is on only when a method asks for it (MoBA's ``dense_steps``) or
``tracker.count_steps = True``; :func:`reset_steps` starts a new generation by hand.
"""
from __future__ import annotations

import inspect
import threading
import weakref

import torch

from .layout import Layout, LayoutError, key_padding

__all__ = ["CallContext", "StepCounter", "Tracker", "current_context", "get_tracker", "reset_steps",
           "track_layout", "untrack_layout"]

_TRACKER_ATTR = "_diffaccel_tracker"
_local = threading.local()


def thread_stack(name: str = "calls") -> list:
    """A list private to the running thread (``"calls"``: the contexts of the tracked calls running in it)."""
    stack = getattr(_local, name, None)
    if stack is None:
        stack = []
        setattr(_local, name, stack)
    return stack


def _stack() -> list:
    return thread_stack()


def current_context() -> "CallContext | None":
    """The context of the innermost tracked denoiser call running in this thread (``None`` outside one)."""
    stack = _stack()
    return stack[-1] if stack else None


class StepCounter:
    """Denoising step of the current generation, from the timesteps the denoiser(s) are called with
    (rule in the module docstring).  ``step`` is -1 before the first call."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.step = -1
        self.last_t = None

    def observe(self, t: float) -> int:
        if self.last_t is None or t > self.last_t:
            self.step = 0
        elif t < self.last_t:
            self.step += 1
        self.last_t = t
        return self.step


class CallContext:
    """What one denoiser call tells its processors (built by the tracker's pre-hook).

    ``family``: the :class:`~diffaccel.families.Family` of the model; ``timestep``: the call's
    timestep argument as given (``None`` when it has none); ``step``: the denoising step index
    (``None`` unless step counting is on); ``layout``: the call's token layout (lazy)."""

    __slots__ = ("family", "timestep", "step", "_model", "_get", "_layout", "_masks")

    def __init__(self, model, family, get, timestep, step):
        self.family = family
        self.timestep = timestep
        self.step = step
        self._model = weakref.ref(model)
        self._get = get
        self._layout = None
        self._masks = []

    @property
    def model(self):
        return self._model()

    def get(self, name):
        """A forward argument of the call by name (``None`` when not given)."""
        return self._get(name)

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = self.family.layout(self.model, self._get)
        return self._layout

    def padding(self, attn_mask, batch, n_q, n_k, match):
        """:func:`~diffaccel.layout.key_padding` of ``attn_mask``, read once per mask tensor in this call."""
        if attn_mask is None:
            return None
        key = (batch, n_q, n_k, match)
        for mask, version, k, value in self._masks:
            if mask is attn_mask and k == key and version == getattr(attn_mask, "_version", None):
                return value
        value = key_padding(attn_mask, batch, n_q, n_k, match, self.layout.nonzero_float_mask)
        try:
            version = attn_mask._version
        except (AttributeError, RuntimeError):  # inference tensors have no version counter
            version = None
        if version is not None:
            self._masks.append((attn_mask, version, key, value))
        return value

    def layer_names(self, processor) -> list[str]:
        """Qualified names of the attention modules of this call's model using ``processor`` (for errors)."""
        model = self.model
        if model is None:
            return []
        return [n for n, m in model.named_modules() if getattr(m, "processor", None) is processor]


class Tracker:
    """The one pre-forward hook of a denoiser (installed by :func:`track_layout`).

    ``steps``: its :class:`StepCounter` (shared between the denoisers of one ``apply``);
    ``count_steps``: whether calls update it."""

    def __init__(self, model, family):
        self.family = family
        self.steps = StepCounter()
        self.count_steps = False
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = []
        self._arg_index = {name: i for i, name in enumerate(params)}
        self._handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True),
            model.register_forward_hook(self._exit, with_kwargs=True, always_call=True),
        ]

    def _enter(self, model, args, kwargs):
        index = self._arg_index

        def get(name):
            if name in kwargs:
                return kwargs[name]
            i = index.get(name)
            return args[i] if i is not None and i < len(args) else None

        t = get(self.family.timestep_arg)
        step = None
        if self.count_steps:
            if t is None:
                raise ValueError(f"counting denoising steps needs the {self.family.timestep_arg!r} argument of every "
                                 f"{type(model).__name__} call; this call has none")
            step = self.steps.observe(float(t.max()) if isinstance(t, torch.Tensor) else float(t))
        _stack().append(CallContext(model, self.family, get, t, step))
        return None

    def _exit(self, model, args, kwargs, output):
        stack = _stack()
        if stack:
            stack.pop()
        return None

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


LayoutTracker = Tracker  # the former name


def get_tracker(model) -> Tracker | None:
    return model.__dict__.get(_TRACKER_ATTR)


def track_layout(model) -> Tracker:
    """Record the token layout of every call of ``model`` (a supported diffusers denoiser) for the
    diffaccel processors in it.

    Idempotent: returns the existing tracker if there is one.  Needed by any diffaccel processor set
    directly with ``model.set_attn_processor(...)`` without an explicit ``grid=``;
    :func:`diffaccel.apply` calls it for you.  Undo with :func:`untrack_layout`.
    """
    tracker = get_tracker(model)
    if tracker is not None:
        return tracker
    from .families import detect_family

    tracker = Tracker(model, detect_family(model, record=True))
    model.__dict__[_TRACKER_ATTR] = tracker
    return tracker


def untrack_layout(model) -> bool:
    """Remove the hooks installed by :func:`track_layout`; returns whether there were any."""
    tracker = model.__dict__.pop(_TRACKER_ATTR, None)
    if tracker is None:
        return False
    tracker.remove()
    return True


def reset_steps(pipe_or_model) -> bool:
    """Start a new generation for step counting on the denoiser(s) of ``pipe_or_model`` (e.g. after an
    interrupted generation followed by an img2img one starting at a lower timestep).  Returns whether a
    denoiser counting steps was found."""
    from .api import denoisers

    found = False
    for _, model in denoisers(pipe_or_model):
        tracker = get_tracker(model)
        if tracker is not None and tracker.count_steps:
            tracker.steps.reset()
            found = True
    return found


def require_layout() -> tuple[CallContext, Layout]:
    """The current context and its layout, or a :class:`LayoutError` saying how to provide one."""
    ctx = current_context()
    if ctx is None:
        raise LayoutError(
            "this attention call does not know its token layout: it has no grid= and is not running inside a "
            "tracked denoiser call. Use diffaccel.apply(...), or call diffaccel.track_layout(model) once after "
            "model.set_attn_processor(...) and call the model (not an attention layer alone), or construct the "
            "processor with an explicit grid="
        )
    return ctx, ctx.layout
