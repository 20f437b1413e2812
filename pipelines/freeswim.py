"""FreeSwim's dual-path attention for Wan video at high resolution (Wu et al., 2025, "FreeSwim: Revisiting
Sliding-Window Attention Mechanisms for Training-Free Ultra-High-Resolution Video Generation").

A Wan model sampling far above its training size keeps detail when every query attends over a window the size of
the training grid (*inward* sliding windows: a window near the border is shifted inwards so it stays whole, as
NATTEN's neighborhood attention does), but windows alone repeat content and lose the global layout.  FreeSwim runs
two branches over the same latents in one batch:

* the **window branch**: self-attention over inward sliding windows (``diffaccel.ops.neighborhood_attention``,
  every frame, ``window`` tokens per spatial axis; default the native token grid, odd);
* the **full branch**: full self-attention.  Its *cross-attention output replaces the window branch's* in every
  block (the text reaches the window branch only through the full branch, which sees the whole frame), and is
  **cached**: the full branch runs on every ``refresh_every``-th denoising step only; the steps in between run the
  window branch alone with the cached cross-attention outputs, which is where the speed comes from.

The window branch's output is the sample; the full branch only steers it.  Steps are counted from the
denoiser's timesteps (a larger timestep than the last call's starts a new generation; calls with the same timestep
are the same step: classifier-free guidance run as separate calls gets a cache slot per call).  Unlike the
reference implementation, the full branch runs for the unconditional calls too (each call is treated alike, so
batched and separate classifier-free guidance behave the same).

``FreeSwim(pipe, ...)`` wraps a loaded Wan pipeline (``WanPipeline``, ``WanVideoToVideoPipeline``, or the shipped
``small-wan``): call it as the pipeline (``FreeSwim(pipe)(prompt, height=..., ...)``) or use it as a context manager
around calls of ``pipe`` (the high-resolution chain does, with ``method="freeswim"``).  The paper runs it on a
video-to-video stage from an upscaled native-size video (:func:`diffaccel.pipelines.highres.generate_highres`).
"""
from __future__ import annotations

import inspect

import torch

__all__ = ["FreeSwim"]


def _wan_transformer(pipe):
    from diffusers import WanTransformer3DModel

    model = pipe if isinstance(pipe, torch.nn.Module) else getattr(pipe, "transformer", None)
    model = getattr(model, "_orig_mod", model)
    if not isinstance(model, WanTransformer3DModel):
        raise ValueError(f"FreeSwim needs a Wan pipeline (a WanTransformer3DModel denoiser); got {type(pipe).__name__}")
    return model


class _State:
    """Per-wrapper state of the current denoiser call: the step and call slot, whether both branches run."""

    def __init__(self, refresh_every):
        self.refresh_every = refresh_every
        self.reset()

    def reset(self):
        self.last_t = None
        self.step = -1
        self.slot = 0
        self.dual = False
        self.batch = 0
        self.cache = {}  # (slot, layer index) -> the full branch's cross-attention output
        self.full_steps = []  # steps on which the full branch ran (for inspection and tests)

    def observe(self, t):
        if self.last_t is None or t > self.last_t:
            self.step, self.slot = 0, 0
            self.cache.clear()
            self.full_steps = []
        elif t < self.last_t:
            self.step, self.slot = self.step + 1, 0
        else:
            self.slot += 1
        self.last_t = t
        self.dual = self.step % self.refresh_every == 0
        if self.dual and (not self.full_steps or self.full_steps[-1] != self.step):
            self.full_steps.append(self.step)


class _WindowCore:
    """The self-attention core: on dual calls the batch is ``[window branch; full branch]``."""

    def __init__(self, state, window, backend):
        self.state, self.window, self.backend = state, window, backend

    def kernel(self, grid):
        t, h, w = grid
        return (t, min(self.window[0], h), min(self.window[1], w))

    def __call__(self, q, k, v, *, grid, text_len, text_first):
        from diffaccel import ops

        def windowed(q, k, v):
            return ops.neighborhood_attention(q, k, v, grid, self.kernel(grid), text_len=text_len,
                                              text_first=text_first, backend=self.backend)

        if not self.state.dual:
            return windowed(q, k, v)
        b = q.shape[0] // 2
        full = torch.nn.functional.scaled_dot_product_attention(
            q[b:].transpose(1, 2), k[b:].transpose(1, 2), v[b:].transpose(1, 2)).transpose(1, 2)
        return torch.cat([windowed(q[:b], k[:b], v[:b]), full.to(q.dtype)])


class _CrossAttentionOverride:
    """Wraps the stock Wan cross-attention processor of one block: on dual calls the full branch's output replaces
    the window branch's and is cached; on the calls in between the cached output is returned (no cross-attention is
    computed); without a cache entry of the right shape it runs as usual."""

    def __init__(self, stock, state, index):
        self.stock, self.state, self.index = stock, state, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        st = self.state
        key = (st.slot, self.index)
        if st.dual:
            b = hidden_states.shape[0] // 2
            ehs = encoder_hidden_states[b:] if encoder_hidden_states is not None else None
            out = self.stock(attn, hidden_states[b:], ehs, attention_mask, rotary_emb, **kwargs)
            st.cache[key] = out.detach()
            return torch.cat([out, out])
        cached = st.cache.get(key)
        if cached is not None and cached.shape == (hidden_states.shape[0], hidden_states.shape[1], cached.shape[2]):
            return cached
        return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


class FreeSwim:
    """FreeSwim's dual path on a loaded Wan pipeline (module docstring).

    Args:
        pipe: a Wan pipeline (or its ``WanTransformer3DModel``).
        window: the window branch's spatial window in tokens, an int or ``(height, width)``; default the native
            token grid (the pipeline's native size over the VAE factor and patch), made odd.  Every frame is in the
            window (FreeSwim's windows are spatial).
        refresh_every: the full branch runs on denoising steps ``0, N, 2N, ...`` of each generation; the cached
            cross-attention outputs serve the steps in between (``1``: every step, no caching).
        backend: the neighborhood-attention backend (``None``: the best for the device).
    """

    def __init__(self, pipe, *, window=None, refresh_every=2, backend=None):
        from diffaccel._validate import BACKENDS

        self.pipe = pipe
        self.model = _wan_transformer(pipe)
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every must be a positive int, got {refresh_every!r}")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if window is None:
            window = self._native_window()
        window = (window, window) if isinstance(window, int) and not isinstance(window, bool) else window
        if not (isinstance(window, (tuple, list)) and len(window) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in window)):
            raise ValueError(f"window must be a positive int or (height, width) in tokens, got {window!r}")
        self.window = tuple(window)
        self.refresh_every = refresh_every
        self.backend = backend
        self.state = _State(refresh_every)
        self._undo = None

    def _native_window(self):
        if isinstance(self.pipe, torch.nn.Module):
            raise ValueError("window is required when FreeSwim wraps a bare transformer (no pipeline to read the "
                             "native size from)")
        from .highres import native_size

        _, ph, pw = self.model.config.patch_size
        if hasattr(self.pipe, "_video") and getattr(self.pipe, "vae", None) is None:  # pixel-space small-wan
            factor = 1
        else:
            factor = int(getattr(self.pipe, "vae_scale_factor_spatial", 8))
        h, w = native_size(self.pipe)
        return tuple(v // (factor * p) + (v // (factor * p) + 1) % 2 for v, p in ((h, ph), (w, pw)))

    # -- install / remove ---------------------------------------------------------------------------------
    def __enter__(self):
        if self._undo is not None:
            raise ValueError("FreeSwim is already active on this pipeline")
        from diffaccel.api import applied_method
        from diffaccel.context import get_tracker, track_layout, untrack_layout
        from diffaccel.processors import make_processor, swap_processors

        model = self.model
        if applied_method(model) is not None:
            raise ValueError(f"the Wan transformer has diffaccel method {applied_method(model)!r} applied; "
                             "remove it before FreeSwim")
        core = _WindowCore(self.state, self.window, self.backend)
        procs = {}
        for i, block in enumerate(model.blocks):
            procs[f"blocks.{i}.attn1"] = make_processor("wan", core)
            procs[f"blocks.{i}.attn2"] = _CrossAttentionOverride(block.attn2.processor, self.state, i)
        self.state.reset()
        undo_procs = swap_processors(model, procs)
        owns_tracker = get_tracker(model) is None
        track_layout(model)
        params = list(inspect.signature(model.forward).parameters)
        pre = model.register_forward_pre_hook(self._pre_hook(params), with_kwargs=True)
        post = model.register_forward_hook(self._post_hook, with_kwargs=True)

        def undo():
            pre.remove()
            post.remove()
            if owns_tracker:
                untrack_layout(model)
            undo_procs()
            self.state.cache.clear()  # free the cached outputs; full_steps stays readable

        self._undo = undo
        return self

    def __exit__(self, *exc):
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()

    def __call__(self, *args, **kwargs):
        """Run the wrapped pipeline with the dual path."""
        with self:
            return self.pipe(*args, **kwargs)

    # -- the denoiser hooks -------------------------------------------------------------------------------
    def _pre_hook(self, params):
        index = {name: i for i, name in enumerate(params)}
        doubled = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")

        def hook(module, args, kwargs):
            args = list(args)

            def get(name):
                if name in kwargs:
                    return kwargs[name]
                i = index.get(name)
                return args[i] if i is not None and i < len(args) else None

            def put(name, value):
                if name in kwargs or index.get(name, len(args)) >= len(args):
                    kwargs[name] = value
                else:
                    args[index[name]] = value

            t = get("timestep")
            if t is None:
                raise ValueError("FreeSwim needs the timestep of every Wan transformer call")
            self.state.observe(float(t.max()) if isinstance(t, torch.Tensor) else float(t))
            x = get("hidden_states")
            self.state.batch = x.shape[0]
            if self.state.dual:
                for name in doubled:
                    v = get(name)
                    if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == x.shape[0]:
                        put(name, torch.cat([v, v]))
            return tuple(args), kwargs

        return hook

    def _post_hook(self, module, args, kwargs, output):
        if not self.state.dual:
            return None
        b = self.state.batch
        if isinstance(output, tuple):
            return (output[0][:b],) + tuple(output[1:])
        if hasattr(output, "sample"):
            output.sample = output.sample[:b]
            return output
        return output[:b]

    @property
    def full_steps(self) -> list[int]:
        """The steps of the last generation on which the full branch ran."""
        return list(self.state.full_steps)

    def __repr__(self):
        return f"FreeSwim({type(self.pipe).__name__}, window={self.window}, refresh_every={self.refresh_every})"

