"""FreeSwim's dual path (diffaccel.pipelines.freeswim) on a tiny WanPipeline built from configs: the output shape,
the full branch's cross-attention output replacing the window branch's, the cache refreshed every N steps; and the
high-resolution chain on Wan video (WanVideoToVideoPipeline.from_pipe)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import tiny_models  # noqa: F401
from diffaccel.pipelines.freeswim import FreeSwim
from diffaccel.pipelines.highres import generate_highres
from tiny_pipelines import tiny_sd_pipeline, tiny_wan_pipeline

PROMPT = "a red circle moving left on a blue background"
CALL = dict(height=32, width=48, num_frames=5, num_inference_steps=4, max_sequence_length=16, output_type="np")


@pytest.fixture(scope="module")
def wan():
    return tiny_wan_pipeline()


def _run(pipe, fn, seed=0):
    return fn(PROMPT, generator=torch.Generator().manual_seed(seed), **CALL).frames


def test_shape_and_a_window_covering_everything_is_the_plain_pipeline(wan):
    """Tokens 5 frames -> 2 latent frames x 2 x 3.  A window covering the grid with the full branch on every step
    computes what the model computes (both branches are full attention); a 1 x 1 window does not."""
    plain = _run(wan, wan)
    assert plain.shape == (1, 5, 32, 48, 3)
    wide = _run(wan, FreeSwim(wan, window=9, refresh_every=1))
    assert wide.shape == plain.shape
    np.testing.assert_allclose(wide, plain, atol=2e-4)
    small = FreeSwim(wan, window=1, refresh_every=2)
    narrow = _run(wan, small)
    assert np.abs(narrow - plain).max() > 1e-3
    assert small.full_steps == [0, 2]
    # everything restored afterwards
    assert all(type(m.processor).__name__ == "WanAttnProcessor" for m in wan.transformer.modules()
               if hasattr(m, "processor"))
    assert not wan.transformer._forward_pre_hooks and not wan.transformer._forward_hooks


def test_full_branch_cross_attention_replaces_the_window_branch(wan):
    """On a refresh step the batch is [window branch; full branch]: every block's cross-attention returns the full
    branch's output for both halves (the window branch's own would differ), and the denoiser returns the window
    branch only."""
    model = wan.transformer
    seen = []
    def grab(m, args, kwargs, out):
        names = ("hidden_states", "encoder_hidden_states")
        given = dict(zip(names, args), **{n: kwargs[n] for n in names if n in kwargs})
        seen.append((m, given, out))

    hooks = [blk.attn2.register_forward_hook(grab, with_kwargs=True) for blk in model.blocks]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    text = torch.randn(1, 16, 32, generator=g)
    fs = FreeSwim(wan, window=1, refresh_every=2)
    try:
        with fs, torch.no_grad():
            out = model(hidden_states=x, timestep=torch.tensor([900.0]), encoder_hidden_states=text,
                        return_dict=False)[0]
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == x.shape and fs.full_steps == [0]
    stock = WanAttnProcessor()
    assert len(seen) == len(model.blocks)
    for attn, kwargs, y in seen:
        hs, ehs = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        assert hs.shape[0] == 2 and torch.equal(y[0], y[1])
        with torch.no_grad():
            full = stock(attn, hs[1:], ehs[1:])
            window = stock(attn, hs[:1], ehs[:1])
        torch.testing.assert_close(y[1:], full)
        assert (window - full).abs().max() > 1e-4  # the branches' hidden states differ: the override matters


def test_cache_is_refreshed_every_n_steps(wan, monkeypatch):
    """refresh_every=3 over 6 steps: the full branch (and any cross-attention) runs on steps 0 and 3; on the other
    steps every block reuses the cached output of its call slot (conditional and unconditional calls each have one)."""
    stock_calls = []
    real = WanAttnProcessor.__call__

    def counting(self, attn, hidden_states, *args, **kwargs):
        stock_calls.append((fs.state.step, fs.state.slot, hidden_states.shape[0]))
        return real(self, attn, hidden_states, *args, **kwargs)

    monkeypatch.setattr(WanAttnProcessor, "__call__", counting)
    fs = FreeSwim(wan, window=1, refresh_every=3)
    returned = {}

    def spy(m, a, k, out):
        returned.setdefault((fs.state.step, fs.state.slot), []).append(out.clone())

    hooks = [blk.attn2.register_forward_hook(spy, with_kwargs=True) for blk in wan.transformer.blocks]
    try:
        fs(PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=5.0,
           **{**CALL, "num_inference_steps": 6})
    finally:
        for h in hooks:
            h.remove()
    assert fs.full_steps == [0, 3]
    blocks = len(wan.transformer.blocks)
    # cross-attention computed only on refresh steps: per step 2 calls (cond, uncond) x blocks, on the full half
    assert sorted({s for s, _, _ in stock_calls}) == [0, 3]
    assert len(stock_calls) == 2 * 2 * blocks and all(b == 1 for *_, b in stock_calls)
    for step in (1, 2):  # reused: the outputs of step 0's same call slot (window half)
        for slot in (0, 1):
            for now, then in zip(returned[(step, slot)], returned[(0, slot)]):
                assert torch.equal(now, then[:1])
    for now, then in zip(returned[(4, 0)], returned[(3, 0)]):
        assert torch.equal(now, then[:1])
    assert not torch.equal(returned[(3, 0)][0], returned[(0, 0)][0])  # refreshed


def test_arguments(wan):
    for kw, match in ((dict(refresh_every=0), "refresh_every"), (dict(window="9"), "window"),
                      (dict(window=(3, 0)), "window"), (dict(backend="cuda"), "backend")):
        with pytest.raises(ValueError, match=match):
            FreeSwim(wan, **kw)
    with pytest.raises(ValueError, match="Wan pipeline"):
        FreeSwim(tiny_sd_pipeline())
    assert FreeSwim(wan).window == (31, 53)  # the native 480 x 832 over 8 x 2, made odd (FreeSwim's 2*15+1, 2*26+1)


def test_highres_chain_on_wan_video(wan):
    rope = wan.transformer.rope
    out = generate_highres(wan, PROMPT, height=64, width=64, native_size=32, num_frames=5, num_inference_steps=2,
                           strength=1.0, method="freeswim", options={"window": 3}, ntk_factor=2.0,
                           proportional_attention=True, pipeline_kwargs={"max_sequence_length": 16})
    assert len(out.frames) == 1 and len(out.frames[0]) == 5 and out.frames[0][0].size == (64, 64)
    assert [(s.height, s.method_label) for s in out.stages] == [(32, "dense"),
                                                                (64, "freeswim:window=3+ntk2+proportional")]
    assert out.stages[1].steps == 2
    assert wan.transformer.rope is rope and not wan.transformer._forward_hooks


def test_chain_keeps_the_pipelines_dtypes():
    """Building the image-to-image counterparts changes no module of the user's pipeline (diffusers' class-level
    from_pipe casts every shared module to float32 unless told otherwise)."""
    from diffaccel.pipelines.highres import _adapter

    for pipe in (tiny_wan_pipeline(), tiny_sd_pipeline()):
        denoiser = getattr(pipe, "transformer", None) or pipe.unet
        denoiser.to(torch.bfloat16)
        _adapter(pipe, "pixel")
        assert denoiser.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
