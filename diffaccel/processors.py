"""Attention processors with a pluggable attention *core*::

    core(q, k, v, grid=..., text_len=..., text_first=...) -> out     # all [B, S, H, D]

so the same processors serve every pattern (neighborhood, CLEAR, mixture of block attention ...):
a method only supplies the core.  ``grid`` is the image / video token grid of the call (plain
ints), ``text_len`` the number of global (text, reference-image) tokens joined to it, before
(``text_first=True``) or after (``text_first=False``) the image tokens.

Two kinds of processors, both :class:`PatternProcessor` s:

* :class:`StockProcessor` — a thin wrapper over diffusers' own processor.  Wherever the stock
  processor does the projections, norms and RoPE and calls ``dispatch_attention_fn``, the wrapper
  runs the *stock code itself* with only that call replaced: the stock ``__call__`` is re-bound to
  a namespace where ``dispatch_attention_fn`` is diffaccel's dispatch, which reads the current
  call's token layout (``diffaccel.context``), honours padded text the way the stock mask does,
  and runs the core.  A diffusers update to projections or RoPE therefore cannot silently diverge
  from a copy.  Nothing global is changed: other models, and every call outside a wrapper, run
  diffusers unchanged; the wrapper of the running call is found on a thread-local stack, so
  threads do not see each other's calls.
* hand-written processors, only where the stock processor calls
  ``F.scaled_dot_product_attention`` directly (no seam to replace): the UNet's
  ``AttnProcessor2_0``, SD3's ``JointAttnProcessor2_0``, CogVideoX's ``CogVideoXAttnProcessor2_0``
  (see their family modules).

**Where the grid comes from.**  In order of precedence:

1. an explicit ``grid=`` given to the processor: every call must then hold exactly that grid, the
   other tokens being global tokens on the processor's ``text_first`` side;
2. the call context of the tracked denoiser it runs in (``diffaccel.context``): ``diffaccel.apply``
   installs the tracker; when you set processors yourself with ``model.set_attn_processor(...)``
   call ``diffaccel.track_layout(model)`` once.

With neither, the call raises :class:`~diffaccel.layout.LayoutError` explaining this; a grid is never
guessed.

Processors are ``torch.nn.Module`` s (``attn.processor`` is then a submodule, so trainable pattern
parameters are saved as ``...attn.processor.<name>``); their ``__call__`` carries the signature of
the stock processor (or of ``forward``) so diffusers passes the right keyword arguments.
Subclasses override :meth:`PatternProcessor.attend` to change how the core is called.
"""
from __future__ import annotations

import inspect
import math
import types

import torch

from ._validate import normalize_grid
from .context import current_context, require_layout, thread_stack
from .layout import Layout, LayoutError, Match, Split, key_padding

__all__ = ["PatternProcessor", "StockProcessor", "make_processor", "swap_processors", "no_mask", "qkv_heads_first"]


def no_mask(attention_mask, cls):
    if attention_mask is not None:
        raise ValueError(
            f"{cls} received an attention_mask on a self-attention call; diffaccel patterns cannot honour "
            "arbitrary attention masks. Remove the mask or exclude this layer with layers=..."
        )


class PatternProcessor(torch.nn.Module):
    """Base class: layout resolution and the core call, shared by every family's processor.

    Args:
        core: ``core(q, k, v, grid=..., text_len=..., text_first=...) -> out`` on ``[B, S, H, D]``.
        grid: optional explicit token grid for every call of this processor; without it the
            layout comes from the call context of the tracked model (``diffaccel.track_layout``).
    """

    family = ""
    grid_ndim = 2
    text_first = True

    def __init__(self, core, *, grid=None):
        super().__init__()
        if not callable(core):
            raise ValueError(f"core must be callable, got {type(core).__name__}")
        self.core = core
        self.grid = None if grid is None else normalize_grid(grid, allowed=(self.grid_ndim,))
        self._explicit = None if grid is None else Layout((self.grid,), text_len=None)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            # diffusers' attention modules filter the kwargs they pass by the signature of
            # `processor.__call__`; give it forward's signature while still going through
            # nn.Module.__call__ (hooks, compile).
            _set_call_signature(cls, inspect.signature(cls.forward), cls.forward.__doc__)

    def extra_repr(self):
        core = getattr(self.core, "func", self.core)
        parts = [f"core={getattr(core, '__name__', type(core).__name__)}"]
        if getattr(self.core, "keywords", None):
            parts += [f"{k}={v!r}" for k, v in self.core.keywords.items()]
        if self.grid is not None:
            parts.append(f"grid={self.grid}")
        return ", ".join(parts)

    # -- layout ------------------------------------------------------------------------------
    def layout(self) -> Layout:
        """The layout of the current call: the explicit grid, else the call context's."""
        if self._explicit is not None:
            return self._explicit
        return require_layout()[1]

    def _where(self):
        ctx = current_context()
        names = ctx.layer_names(self) if ctx is not None else []
        return f" ({', '.join(names)})" if names else ""

    def image_grid(self, n_tokens: int) -> tuple:
        """The grid of a call whose image tokens number ``n_tokens``."""
        layout = self.layout()
        try:
            return layout.grid_for(n_tokens)
        except LayoutError:
            return layout.grid_for(n_tokens, where=self._where())

    # -- core --------------------------------------------------------------------------------
    def attend(self, q, k, v, *, grid, text_len, text_first, scale=None):
        """Call the core on ``[B, S, H, D]`` tensors; override to change how it is called."""
        if scale is None:
            return self.core(q, k, v, grid=grid, text_len=text_len, text_first=text_first)
        return self.core(q, k, v, grid=grid, text_len=text_len, text_first=text_first, scale=scale)

    def attend_split(self, q, k, v, match: Match, scale=None):
        """The core on a call whose global tokens sit ``match.before`` before and ``match.after`` after
        the grid (both: moved in front of the grid for the core and back after it).  With
        ``match.grid_queries`` the queries are the grid tokens only."""
        grid, b, a = match.grid, match.before, match.after
        n = math.prod(grid)
        if match.grid_queries and (b or a):
            B, _, H, D = q.shape
            q = torch.cat([q.new_zeros(B, b, H, D), q, q.new_zeros(B, a, H, D)], dim=1)
            out = self.attend_split(q, k, v, Match(grid, b, a), scale)
            return out[:, b:b + n]
        if a == 0:
            return self.attend(q, k, v, grid=grid, text_len=b, text_first=True, scale=scale)
        if b == 0:
            return self.attend(q, k, v, grid=grid, text_len=a, text_first=False, scale=scale)

        def front(x):
            return torch.cat([x[:, :b], x[:, b + n:], x[:, b:b + n]], dim=1)

        out = self.attend(front(q), front(k), front(v), grid=grid, text_len=b + a, text_first=True, scale=scale)
        return torch.cat([out[:, :b], out[:, b + a:], out[:, b:b + a]], dim=1)

    def attend_padded(self, q, k, v, match: Match, padding, scale=None):
        """:meth:`attend_split` where batch element ``i`` has the global tokens ``padding.valid[i]`` valid
        (``padding=None``: all).  Padded global keys are invisible to every query; padded global queries
        attend densely to the valid keys, or get zeros when the stock mask hides their rows too
        (``padding.rows_masked``), as under the stock processor's mask.  Batch elements with the same
        padding run together."""
        if padding is None:
            return self.attend_split(q, k, v, match, scale)
        from .ops import dense_attention

        grid, b, a = match.grid, match.before, match.after
        n = math.prod(grid)
        groups = {}
        for i, pattern in enumerate(padding.valid):
            groups.setdefault(pattern, []).append(i)
        outs, order = [], []
        for pattern, idx in groups.items():
            if len(groups) == 1:
                qg, kg, vg = q, k, v
            else:
                ix = torch.tensor(idx, device=q.device)
                qg, kg, vg = q.index_select(0, ix), k.index_select(0, ix), v.index_select(0, ix)
            keep_b = [p for p in range(b) if pattern[p]]
            keep_a = [b + n + j for j in range(a) if pattern[b + j]]
            kept = keep_b + list(range(b, b + n)) + keep_a
            sub = Match(grid, len(keep_b), len(keep_a), match.grid_queries)
            if len(kept) == q.shape[1] or (match.grid_queries and len(kept) == k.shape[1]):
                outs.append(self.attend_split(qg, kg, vg, sub, scale))
                order.extend(idx)
                continue
            kept_t = torch.tensor(kept, device=q.device)
            kv, vv = kg.index_select(1, kept_t), vg.index_select(1, kept_t)
            if match.grid_queries:
                out = self.attend_split(qg, kv, vv, sub, scale)
            else:
                out_valid = self.attend_split(qg.index_select(1, kept_t), kv, vv, sub, scale)
                kept_set = set(kept)
                padded = [p for p in range(q.shape[1]) if p not in kept_set]
                padded_t = torch.tensor(padded, device=q.device)
                if padding.rows_masked:
                    out_pad = out_valid.new_zeros(out_valid.shape[0], len(padded), *out_valid.shape[2:])
                else:
                    out_pad = dense_attention(qg.index_select(1, padded_t), kv, vv, scale=scale).to(out_valid.dtype)
                out = out_valid.new_empty(out_valid.shape[0], q.shape[1], *out_valid.shape[2:])
                out = out.index_copy(1, kept_t, out_valid).index_copy(1, padded_t, out_pad)
            outs.append(out)
            order.extend(idx)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        if order != sorted(order):
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order)] = torch.arange(len(order))
            out = out.index_select(0, inverse.to(out.device))
        return out


def _set_call_signature(cls, signature, doc=None):
    def __call__(self, *args, **kwargs):
        return torch.nn.Module.__call__(self, *args, **kwargs)

    __call__.__signature__ = signature
    __call__.__doc__ = doc
    cls.__call__ = __call__


def qkv_heads_first(attn, hidden_states):
    """``to_q/to_k/to_v`` of ``hidden_states`` as ``[B, H, S, D]`` with the QK norms applied, as
    ``JointAttnProcessor2_0`` and ``CogVideoXAttnProcessor2_0`` do; also returns ``D``."""
    batch_size = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


# ---------------------------------------------------------------------------------------------
# wrappers over diffusers' stock processors

def _active_stack() -> list:
    """The wrapped stock processors running in this thread (innermost last)."""
    return thread_stack("processors")


def _stock_dispatch():
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn


def _dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              attention_kwargs=None, *, backend=None, parallel_config=None):
    """Stands in for ``dispatch_attention_fn`` inside a wrapped stock processor."""
    stack = _active_stack()
    if not stack:  # the re-bound stock code run outside a wrapper: behave exactly as diffusers
        return _stock_dispatch()(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 attention_kwargs, backend=backend, parallel_config=parallel_config)
    proc, explicit = stack[-1]
    return proc.dispatch(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                         parallel_config=parallel_config, explicit=explicit)


def _rebind(fn):
    """``fn`` (a stock processor's ``__call__``) with its global ``dispatch_attention_fn`` replaced by ours."""
    if "dispatch_attention_fn" not in fn.__code__.co_names:
        raise TypeError(f"{fn.__qualname__} does not call dispatch_attention_fn; it cannot be wrapped "
                        "(write a processor for it, as diffaccel does for AttnProcessor2_0)")
    namespace = dict(fn.__globals__)
    namespace["dispatch_attention_fn"] = _dispatch
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


class StockProcessor(PatternProcessor):
    """A diffusers stock processor with its attention core replaced (module docstring).

    Subclasses set ``stock`` (the diffusers processor class), ``grid_ndim``, ``text_first`` (where the
    global tokens of an explicit ``grid=`` call sit) and optionally ``cross_attention_arg`` (the argument
    that, when given, makes a call cross-attention: the stock processor then runs unchanged).
    Override :meth:`stock_fallback` for other calls that must run the stock processor of the layer.
    """

    stock = None
    cross_attention_arg = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("stock") is not None:
            cls._stock_call = staticmethod(_rebind(cls.stock.__call__))
            signature = inspect.signature(cls.stock.__call__)
            _set_call_signature(cls, signature, f"{cls.stock.__name__}.__call__ with diffaccel's attention core")
            params = list(signature.parameters)[2:]  # after self, attn
            cls._cross_index = params.index(cls.cross_attention_arg) if cls.cross_attention_arg else None
            cls._text_index = params.index("encoder_hidden_states") if "encoder_hidden_states" in params else None

    def __init__(self, core, *, grid=None, like=None):
        if type(self).stock is None:
            raise TypeError(f"{type(self).__name__} has no stock processor class")
        super().__init__(core, grid=grid)
        stock = self.stock()
        for attr in ("_attention_backend", "_parallel_config"):  # keep what the replaced processor was set to
            if like is not None and getattr(like, attr, None) is not None:
                setattr(stock, attr, getattr(like, attr))
        self._stock = stock

    # diffusers' set_attention_backend / context parallelism set these on the processor: they reach the wrapped
    # stock processor (its calls diffaccel leaves alone use them; patched calls reject context parallelism)
    @property
    def _attention_backend(self):
        return self._stock._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self._stock._attention_backend = value

    @property
    def _parallel_config(self):
        return self._stock._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value):
        self._stock._parallel_config = value

    def stock_fallback(self, attn, args, kwargs):
        """A callable running the whole call unchanged, or ``None`` to run it with the core."""
        name = self.cross_attention_arg
        if name is None:
            return None
        i = self._cross_index
        value = kwargs[name] if name in kwargs else (args[i] if i < len(args) else None)
        return self._stock if value is not None else None

    def _explicit_layout(self, args, kwargs):
        """With an explicit ``grid=``: the call's text is its ``encoder_hidden_states`` when the stock
        processor takes them (a joint call), else every token beyond the grid."""
        if self._explicit is None:
            return None
        i = self._text_index
        if i is None:
            return self._explicit
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (
            args[i] if i < len(args) else None)
        if text is None:
            return self._explicit
        n = int(text.shape[1])
        return Layout(self._explicit.grids, text_len=n, splits=(Split(n, 0) if self.text_first else Split(0, n),))

    def forward(self, attn, *args, **kwargs):
        fallback = self.stock_fallback(attn, args, kwargs)
        if fallback is not None:
            return fallback(attn, *args, **kwargs)
        stack = _active_stack()
        stack.append((self, self._explicit_layout(args, kwargs)))
        try:
            return self._stock_call(self._stock, attn, *args, **kwargs)
        finally:
            stack.pop()

    def dispatch(self, query, key, value, *, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                 backend, parallel_config, explicit=None):
        """The attention call of the wrapped stock processor: the core on the call's token layout."""
        if explicit is not None:
            ctx, layout = None, explicit
        else:
            ctx, layout = require_layout()
        n_q, n_k = query.shape[1], key.shape[1]
        match = layout.match(n_q, n_k, self.text_first)
        if match is None:
            if layout.passthrough:
                return _stock_dispatch()(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                         attention_kwargs, backend=backend, parallel_config=parallel_config)
            grids = [math.prod(g) for g in layout.grids]
            raise LayoutError(
                f"an attention layer{self._where()} attends {n_q} queries to {n_k} keys, which matches no token "
                f"grid of this call (image grids {list(layout.grids)} of {grids} tokens, global tokens "
                f"{[(s.before, s.after) for s in layout.splits] or 'any'}); restrict `layers=` to other layers "
                "or give the processor an explicit grid="
            )
        if dropout_p or is_causal or enable_gqa or attention_kwargs or parallel_config is not None:
            raise ValueError(f"{type(self).__name__}: diffaccel patterns do not support dropout, causal or "
                             "grouped-query attention, attention_kwargs or context parallelism")
        if key.shape[2] != query.shape[2]:
            raise ValueError(f"{type(self).__name__}: queries have {query.shape[2]} heads, keys {key.shape[2]}")
        batch = query.shape[0]
        if ctx is not None:
            padding = ctx.padding(attn_mask, batch, n_q, n_k, match)
        else:
            padding = key_padding(attn_mask, batch, n_q, n_k, match, layout.nonzero_float_mask)
        return self.attend_padded(query, key, value, match, padding, scale)


# ---------------------------------------------------------------------------------------------
# lookup and installation

def __getattr__(name):
    """The family modules' processor classes, importable from here as before (``processors.FluxProcessor``)."""
    if name.endswith("Processor") and not name.startswith("_"):
        from .families import FAMILIES, get_family

        for family in FAMILIES:
            for cls in get_family(family).processors.values():
                if cls.__name__ == name:
                    return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_processor(family, core, *, grid=None, attn=None) -> PatternProcessor:
    """A processor of ``family`` (a name or :class:`~diffaccel.families.Family`) running ``core``.  Families
    with several stock processors (FLUX.2's double- and single-stream blocks) need the attention module
    ``attn`` it is for (its current stock processor decides)."""
    from .families import get_family

    fam = family if not isinstance(family, str) else get_family(family)
    if attn is not None:
        cls = fam.processor_for(attn)
        like = attn.processor
    else:
        classes = list(dict.fromkeys(fam.processors.values()))
        if len(classes) != 1:
            raise ValueError(f"family {fam.name!r} has several processors ({[c.__name__ for c in classes]}): "
                             "pass attn=<the attention module> to choose")
        cls, like = classes[0], None
    if issubclass(cls, StockProcessor):
        return cls(core, grid=grid, like=like)
    return cls(core, grid=grid)


def swap_processors(model, new_processors: dict):
    """Set ``new_processors`` (``{attention module name (optionally + ".processor"): processor}``) on
    ``model`` all at once and return an ``undo()`` that restores the original processor objects.

    Every name is resolved before anything changes, so a bad name changes nothing.
    """
    targets = []
    seen = set()
    for name, proc in new_processors.items():
        mod_name = name[: -len(".processor")] if name.endswith(".processor") else name
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no module {mod_name!r}") from None
        if not hasattr(module, "set_processor") or not hasattr(module, "processor"):
            raise ValueError(f"{mod_name!r} ({type(module).__name__}) is not an attention module with a processor")
        if id(module) in seen:
            raise ValueError(f"attention module {mod_name!r} is named twice")
        seen.add(id(module))
        targets.append((module, proc))

    originals = [(module, module.processor) for module, _ in targets]
    done = []
    try:
        for module, proc in targets:
            module.set_processor(proc)
            done.append(module)
    except BaseException:
        for module, old in originals[: len(done)]:
            module.set_processor(old)
        raise

    def undo():
        for module, old in originals:
            module.set_processor(old)

    return undo
