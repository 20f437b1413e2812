"""Shifted windows (HiDiffusion's MSW-MSA, Swin's cyclic shift) with the existing neighborhood kernel: the op's
``shift`` against an independent dense masked reference on every backend, and the ``neighborhood`` method's
``shift`` schedules (per layer, per denoising step) on a tiny UNet's top blocks through ``layers=``."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import tiny_models
import diffaccel
from diffaccel import ops
from diffaccel.kernels.reference import join_text_mask, masked_attention_reference


def _shifted_block_mask(grid, block, shift):
    """Image query i sees image key j iff, after rolling the grid by -shift (wrapping), both lie in the same
    block of ``block`` tokens per axis (blocks tile the grid: each axis a multiple of its block)."""
    coords = list(itertools.product(*[range(n) for n in grid]))
    ids = [tuple(((c - s) % n) // b for c, s, n, b in zip(xy, shift, grid, block)) for xy in coords]
    n = len(coords)
    return torch.tensor([[ids[i] == ids[j] for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("backend,grid,block,shift,text_len,text_first", [
    ("torch", (8, 12), (4, 6), (1, 3), 3, True),
    ("torch", (8, 12), (4, 6), (2, 5), 2, False),
    ("torch", (4, 4, 6), (2, 2, 3), (1, 3, 4), 0, True),
    ("torch", (8, 8), (4, 4), (-1, 9), 0, True),  # negative and larger-than-axis shifts wrap
    # the roll is the same for every backend; one case each (the Triton interpreter is slow on CPU)
    ("flex", (4, 6), (2, 3), (1, 2), 2, True),
    ("triton", (4, 6), (2, 3), (1, 2), 2, False),
])
def test_shift_matches_a_dense_reference(backend, grid, block, shift, text_len, text_first):
    g = torch.Generator().manual_seed(0)
    n = math.prod(grid) + text_len
    q, k, v = (torch.randn(2, n, 2, 8, generator=g) for _ in range(3))
    out = ops.neighborhood_attention(q, k, v, grid, block, stride=block, shift=shift, text_len=text_len,
                                     text_first=text_first, backend=backend)
    mask = join_text_mask(_shifted_block_mask(grid, block, shift), text_len, text_first)
    ref = masked_attention_reference(q, k, v, mask, 8 ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    if any(s % m for s, m in zip(shift, grid)):  # a shift changes the result
        plain = ops.neighborhood_attention(q, k, v, grid, block, stride=block, text_len=text_len,
                                           text_first=text_first, backend=backend)
        assert (plain - out).abs().max() > 1e-3


def test_shift_arguments():
    q = torch.randn(1, 16, 1, 4)
    for bad in ((1, 2, 3), "1", 1.5, True, (1, None)):
        with pytest.raises(ValueError, match="shift"):
            ops.neighborhood_attention(q, q, q, (4, 4), 2, stride=2, shift=bad)
    for bad, match in (("diagonal", "shift must be"), ((1, 2.0), "shift must be"), (True, "shift must be")):
        with pytest.raises(ValueError, match=match):
            diffaccel.apply(tiny_models.tiny_unet(), "neighborhood", kernel_size=4, shift=bad)
    with pytest.raises(ValueError, match="shift=.*3 values"):
        diffaccel.apply(tiny_models.tiny_unet(), "neighborhood", kernel_size=4, shift=(1, 1, 1))


class _Shifts:
    def __init__(self, monkeypatch):
        self.seen = []
        real = ops.neighborhood_attention

        def spy(q, k, v, grid, kernel_size, **kw):
            self.seen.append((tuple(grid), kw.get("shift", 0)))
            return real(q, k, v, grid, kernel_size, **kw)

        monkeypatch.setattr(ops, "neighborhood_attention", spy)


TOP = ["down_blocks.0", "up_blocks.1"]  # the tiny UNet's highest-resolution (8 x 8) attention blocks


def test_per_layer_shift_on_the_top_blocks(monkeypatch):
    """shift="layer": the patched layers alternate unshifted / shifted by half a window (Swin); only the top
    blocks are patched (HiDiffusion's placement)."""
    model = tiny_models.tiny_unet()
    inputs = tiny_models.unet_inputs(model, 8, 8)
    with torch.no_grad():
        ref = model(**inputs).sample
    spy = _Shifts(monkeypatch)
    diffaccel.apply(model, "neighborhood", kernel_size=4, stride=4, shift="layer", layers=TOP)
    try:
        with torch.no_grad():
            out = model(**inputs).sample
    finally:
        diffaccel.remove(model)
    assert [s for _, s in spy.seen] == [(0, 0), (2, 2), (0, 0)]  # 1 down + 2 up layers, in order
    assert {g for g, _ in spy.seen} == {(8, 8)}
    assert not torch.allclose(out, ref)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, ref)  # removed


def test_per_step_shift_cycles_hidiffusions_four_shifts(monkeypatch):
    """shift="step": denoising step t shifts by (t % 4) * kernel // 4; calls at the same timestep (guidance) share
    the step; a larger timestep starts a new generation."""
    model = tiny_models.tiny_unet()
    inputs = tiny_models.unet_inputs(model, 8, 8)
    spy = _Shifts(monkeypatch)
    diffaccel.apply(model, "neighborhood", kernel_size=4, stride=4, shift="step", layers="down_blocks.0")
    try:
        with torch.no_grad():
            for t in (900.0, 900.0, 700.0, 500.0, 300.0, 100.0, 950.0):
                model(**{**inputs, "timestep": torch.tensor(t)})
    finally:
        diffaccel.remove(model)
    per_call = [s for _, s in spy.seen]  # down_blocks.0 has one attention layer
    assert per_call == [(0, 0), (0, 0), (1, 1), (2, 2), (3, 3), (0, 0), (0, 0)]
    assert not model._forward_pre_hooks  # the step hook is removed with the method


def test_shifted_windows_on_a_pipeline(monkeypatch):
    """HiDiffusion's MSW-MSA on the shipped small UNet's top blocks, through the public API: 2 x 2 windows of its
    16 x 16 top-level grid at 64 px, shifted per step; the picture differs from unshifted windows."""
    from diffaccel.pipelines import load_pipeline

    pipe = load_pipeline("small-unet", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=64, num_inference_steps=3, output_type="pt")
    layers = ["down_blocks.0", "up_blocks.2"]
    outs = {}
    for shift in (0, "step"):
        diffaccel.apply(pipe, "neighborhood", kernel_size=16, stride=16, shift=shift, layers=layers)
        try:
            outs[shift] = pipe("a red circle on a blue background", generator=torch.Generator().manual_seed(0),
                               **kw).images
        finally:
            diffaccel.remove(pipe)
    assert outs[0].shape == (1, 3, 64, 64) and torch.isfinite(outs["step"]).all()
    assert (outs[0] - outs["step"]).abs().max() > 1e-3
