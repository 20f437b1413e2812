"""diffaccel.pipelines.probe: token layouts at a target size, the memory estimate, peak memory of a run."""
import pytest
import torch

import diffaccel
from diffaccel.pipelines import probe
from diffaccel.pipelines.small import load_small


@pytest.fixture(scope="module")
def flux():
    return load_small("small-flux")


def _forwards(pipe):
    """A list that grows by one per completed denoiser forward."""
    done = []
    probe.denoiser_of(pipe).register_forward_hook(lambda *a: done.append(1))
    return done


def test_token_layout_scales_the_native_grid(flux):
    done = _forwards(flux)
    lay = probe.token_layout(flux, 64, 96)
    assert (lay.family, lay.grid, lay.text_len, lay.heads, lay.width, lay.batch) == ("flux", (32, 48), 20, 4, 128, 2)
    assert lay.tokens == 20 + 32 * 48
    assert probe.token_layout(flux, 32, 32, guidance_scale=1.0).batch == 1  # no classifier-free guidance
    assert not done  # the native call stopped at the denoiser's input


def test_token_layout_unet_and_video():
    unet = load_small("small-unet")
    lay = probe.token_layout(unet, 64, 32)
    assert (lay.family, lay.grid, lay.text_len) == ("unet", (32, 16), 0)  # the top level of the UNet
    wan = load_small("small-wan")
    lay = probe.token_layout(wan, 64, 64, num_frames=3)
    assert (lay.family, lay.grid) == ("wan", (3, 16, 16))
    assert probe.native_size(wan) == (32, 32)


def test_estimate_covers_a_measured_run_and_refuses_huge_sizes(flux):
    lay = probe.token_layout(flux, 128, 128)
    est = probe.estimate_memory(lay, pixels=128 * 128)
    diffaccel.apply(flux, "moba", block=(8, 8), topk=2)
    try:
        with probe.PeakMemory("cpu") as peak:
            flux("a red circle", height=128, width=128, num_inference_steps=1)
    finally:
        diffaccel.remove(flux)
    assert 0 < peak.bytes <= est.bytes
    assert est.bytes < 10 * 2 ** 30
    huge = probe.estimate_memory(probe.token_layout(flux, 8192, 8192), pixels=8192 * 8192)
    assert huge.bytes > 500 * 2 ** 30  # 16.8M tokens: refused long before allocating on any machine
    assert "16,777,236 tokens" in str(huge)


def test_peak_memory_sees_this_runs_allocation():
    with probe.PeakMemory("cpu") as peak:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB
        del x
    assert peak.bytes >= 48 * 2 ** 20
    with probe.PeakMemory("cpu") as small:
        pass
    assert small.bytes < 16 * 2 ** 20


def test_denoiser_of_rejects_a_pipeline_without_one():
    with pytest.raises(ValueError, match="no denoiser"):
        probe.denoiser_of(object())
