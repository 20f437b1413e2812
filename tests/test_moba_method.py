"""diffaccel.apply(..., "moba") on tiny random Wan / FLUX (/ UNet) models."""
import pytest
import torch

import diffaccel
from diffaccel.context import get_tracker
from diffaccel.methods.moba import MobaCore, reset_steps
from tiny_models import (flux_inputs, run, sd3_inputs, tiny_flux, tiny_pipeline, tiny_sd3, tiny_unet, tiny_wan,
                         unet_inputs, wan_inputs)


def _cores(model):
    return [m.processor.core for _, m in model.named_modules()
            if isinstance(getattr(getattr(m, "processor", None), "core", None), MobaCore)]


@pytest.fixture(scope="module")
def wan():
    return tiny_wan()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wan_all_blocks_reproduce_and_top1_changes(wan, backend):
    inp = wan_inputs(wan, frames=3, height=8, width=12)  # (3, 4, 6) token grid
    ref = run(wan, inp)
    # VMoBA's cycle: temporal, spatial (every frame), spatio-temporal
    # topk=8: every block of each partition (3, 6 and 8 blocks), with few steps of the interpreted Triton gate
    diffaccel.apply(wan, "moba", partitions=[(1, None, None), (None, 2, 2), (2, 2, 3)], topk=8, backend=backend)
    try:
        assert [c.block for c in _cores(wan)] == [(1, None, None), (None, 2, 2)]
        torch.testing.assert_close(run(wan, inp), ref, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(wan)
    diffaccel.apply(wan, "moba", block=(1, 2, 3), topk=1, backend=backend)
    try:
        assert (run(wan, inp) - ref).abs().max() > 1e-3
    finally:
        diffaccel.remove(wan)
    assert torch.equal(run(wan, inp), ref)  # remove restores the model exactly


def test_wan_second_resolution_and_threshold(wan):
    diffaccel.apply(wan, "moba", block=(2, 2, 2), threshold=0.25, selection="tile", backend="torch")
    try:
        for frames, h, w in [(2, 8, 8), (3, 6, 10)]:  # (2, 4, 4) and (3, 3, 5): partial border blocks
            inp = wan_inputs(wan, frames=frames, height=h, width=w)
            out = run(wan, inp)
            assert out.shape == inp["hidden_states"].shape and torch.isfinite(out).all()
    finally:
        diffaccel.remove(wan)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flux_2d_blocks(backend):
    flux = tiny_flux()
    inp = flux_inputs(flux, height=6, width=8)
    ref = run(flux, inp)
    diffaccel.apply(flux, "moba", block=(3, 4), topk=4, backend=backend)  # 4 blocks: every block
    try:
        torch.testing.assert_close(run(flux, inp), ref, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(flux)
    diffaccel.apply(flux, "moba", block=(2, 2), topk=1, backend=backend)
    try:
        assert (run(flux, inp) - ref).abs().max() > 1e-4
        out = run(flux, flux_inputs(flux, height=5, width=7))  # another resolution, partial blocks
        assert torch.isfinite(out).all()
    finally:
        diffaccel.remove(flux)


@pytest.mark.parametrize("family,backend", [("sd3", "torch"), ("sd3", "triton"), ("unet", "torch")])
def test_sd3_and_unet_2d_blocks(family, backend):
    """SD3 (joint [image; text] attn and SD3.5's image-only attn2) and the UNet (every level): blocks
    covering the grid reproduce the model, top-1 changes it, and another size works."""
    model, inputs = (tiny_sd3(), sd3_inputs) if family == "sd3" else (tiny_unet(), unet_inputs)
    size = (12, 16) if family == "sd3" else (8, 16)  # SD3: a (6, 8) token grid; UNet: (8, 16) and (4, 8)
    inp = inputs(model, height=size[0], width=size[1])
    ref = run(model, inp)
    # every block: SD3's (6, 8) grid has 6 blocks of (2, 4), the UNet's (8, 16) level 16
    diffaccel.apply(model, "moba", block=(2, 4), topk=6 if family == "sd3" else 16, backend=backend)
    try:
        torch.testing.assert_close(run(model, inp), ref, atol=1e-5, rtol=1e-5)
    finally:
        diffaccel.remove(model)
    diffaccel.apply(model, "moba", block=(2, 4), topk=1, backend=backend)
    try:
        assert (run(model, inp) - ref).abs().max() > 1e-4
        other = inputs(model, height=size[0] - 2 if family == "sd3" else 16, width=size[1] - 6 if family == "sd3" else 8)
        out = run(model, other)  # another size: partial border blocks
        assert out.shape == other["hidden_states" if family == "sd3" else "sample"].shape and torch.isfinite(out).all()
    finally:
        diffaccel.remove(model)
    assert torch.equal(run(model, inp), ref)


def test_dense_steps_follow_the_timesteps(wan):
    inp = wan_inputs(wan, frames=2, height=8, width=8)

    def at(t):
        return {**inp, "timestep": torch.full((1,), float(t))}

    dense = {t: run(wan, at(t)) for t in (900, 700, 500)}
    diffaccel.apply(wan, "moba", block=(1, 2, 2), topk=1, dense_steps=2, backend="torch")
    try:
        counter = get_tracker(wan).steps
        assert torch.equal(run(wan, at(900)), dense[900])  # step 0: dense
        assert torch.equal(run(wan, at(900)), dense[900])  # same timestep (second CFG call): still step 0
        assert torch.equal(run(wan, at(700)), dense[700])  # step 1: dense
        assert counter.step == 1
        assert not torch.allclose(run(wan, at(500)), dense[500])  # step 2: sparse
        assert counter.step == 2
        assert torch.equal(run(wan, at(900)), dense[900])  # a larger timestep: a new generation, dense again
        assert counter.step == 0
        run(wan, at(700))
        assert reset_steps(wan) and counter.step == -1
        assert torch.equal(run(wan, at(500)), dense[500])  # after reset_steps any timestep starts a generation
        assert counter.step == 0
    finally:
        diffaccel.remove(wan)
    assert not reset_steps(wan)


def test_dense_steps_shared_by_the_denoisers_of_a_pipeline():
    unet, wan = tiny_unet(), tiny_wan()
    pipe = tiny_pipeline(unet=unet, transformer=wan)
    diffaccel.apply(pipe, "moba", block=2, topk=1, dense_steps=1, backend="torch")
    try:
        counter = get_tracker(wan).steps
        assert get_tracker(unet).steps is counter and get_tracker(wan).count_steps
        run(unet, {**unet_inputs(unet), "timestep": torch.tensor(900.0)})
        run(wan, {**wan_inputs(wan, frames=2, height=4, width=4), "timestep": torch.tensor([700.0])})
        assert counter.step == 1
    finally:
        diffaccel.remove(pipe)


def test_dense_layers(wan):
    inp = wan_inputs(wan, frames=2, height=8, width=8)
    ref = run(wan, inp)
    diffaccel.apply(wan, "moba", block=(1, 2, 2), topk=1, dense_layers=[0, -1], backend="torch")
    try:
        assert [c.dense for c in _cores(wan)] == [True, True]
        torch.testing.assert_close(run(wan, inp), ref, atol=1e-6, rtol=1e-6)
    finally:
        diffaccel.remove(wan)
    diffaccel.apply(wan, "moba", block=(1, 2, 2), topk=1, dense_layers="blocks.1.*", backend="torch")
    try:
        assert [c.dense for c in _cores(wan)] == [False, True]
        assert (run(wan, inp) - ref).abs().max() > 1e-3
    finally:
        diffaccel.remove(wan)


@pytest.mark.parametrize("options,match", [
    (dict(topk=2), "exactly one of block"),
    (dict(block=2, partitions=[2], topk=2), "exactly one of block"),
    (dict(block=2), "exactly one of topk or threshold"),
    (dict(block=(2, 2), topk=2), "3-axis token grids"),
    (dict(partitions=[(1, 2, 2), (2, 2)], topk=2), r"partitions\[1\]"),
    (dict(partitions=[], topk=2), "non-empty list"),
    (dict(block=(0, 2, 2), topk=2), "block must be"),
    (dict(block=2, topk=2, dense_steps=-1), "dense_steps"),
    (dict(block=2, topk=2, dense_layers=[5]), "out of range"),
    (dict(block=2, topk=2, dense_layers=["nope.*"]), "matches no patched layer"),
    (dict(block=2, topk=2, backend="flex"), "backend"),
    (dict(block=2, topk=2, selection="x"), "selection"),
    (dict(block=2, topk=2, window=3), "unknown option"),
])
def test_option_errors(wan, options, match):
    with pytest.raises(ValueError, match=match):
        diffaccel.apply(wan, "moba", **options)
    assert not any(True for _ in _cores(wan))  # nothing was patched
