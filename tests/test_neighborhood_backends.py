"""The "torch" (tile and halo) and "flex" (FlexAttention) neighborhood backends
against the dense reference ``kernels.neighborhood_ref.neighborhood_reference``."""
import math

import pytest
import torch

from diffaccel.kernels import flex as flex_mod
from diffaccel.kernels import neighborhood_torch as torch_mod
from diffaccel.kernels.neighborhood_ref import neighborhood_reference
from diffaccel.kernels.reference import masked_attention_reference
from diffaccel.ops import neighborhood_attention, neighborhood_params

# CPU runs FlexAttention eagerly on purpose (compiling costs tens of seconds per shape).
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, H, D = 2, 3, 8
SCALE = 0.3

# (grid, kernel_size, dilation, stride, text_len, text_first), before normalisation.
CASES = {
    "1d": ((13,), 5, 1, 1, 0, True),
    "1d-even-dil-stride-suffix": ((13,), 4, 2, 3, 5, False),
    "2d-prefix": ((7, 9), 3, 1, 1, 5, True),
    "2d-even-dil-blocked-suffix": ((7, 9), (4, 3), (1, 2), (2, 3), 5, False),
    "2d-kernel-ge-axis": ((7, 9), (7, 12), 1, 1, 5, True),
    "2d-blocked-dilated": ((8, 8), 4, 2, 4, 0, True),
    "3d-stride": ((3, 5, 6), (2, 3, 3), 1, (1, 2, 3), 0, True),
    "3d-mixed-suffix": ((3, 5, 6), (3, 5, 2), (1, 1, 3), (3, 1, 2), 5, False),
}
FLEX_CASES = ["1d-even-dil-stride-suffix", "2d-prefix", "2d-even-dil-blocked-suffix", "3d-stride", "3d-mixed-suffix"]


def _config(name):
    grid, ks, dil, st, text_len, text_first = CASES[name]
    grid, ks, dil, st = neighborhood_params(grid, ks, dil, st)
    return grid, ks, dil, st, text_len, text_first


def _qkv(grid, text_len, dtype=torch.float32, seed=0, b=B):
    gen = torch.Generator().manual_seed(seed)
    s = text_len + math.prod(grid)
    return [torch.randn(b, s, H, D, generator=gen).to(dtype) for _ in range(3)]


def _check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def _torch_backend(tiles=None):
    def run(*args):
        return torch_mod.neighborhood_torch(*args, tiles=tiles)
    return run


def _flex_backend(block_size=None, reorder=True):
    def run(*args):
        return flex_mod.neighborhood_flex(*args, reorder=reorder, block_size=block_size)
    return run


# ----------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize("name", list(CASES))
def test_torch_matches_reference_fp32(name):
    grid, ks, dil, st, text_len, text_first = _config(name)
    q, k, v = _qkv(grid, text_len)
    ref = neighborhood_reference(q, k, v, grid, ks, dil, st, text_len, text_first, SCALE)
    args = (q, k, v, grid, ks, dil, st, text_len, text_first, SCALE)
    # Automatic tiles (often one tile on grids this small), then forced small
    # tiles so halos, padding and several tiles per axis are exercised.
    for tiles in (None, tuple(st), (1,) * len(grid), tuple(2 * s for s in st)):
        _check(_torch_backend(tiles)(*args), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["2d-even-dil-blocked-suffix", "3d-stride"])
def test_torch_matches_reference_half(name, dtype):
    grid, ks, dil, st, text_len, text_first = _config(name)
    q, k, v = _qkv(grid, text_len, dtype)
    ref = neighborhood_reference(q, k, v, grid, ks, dil, st, text_len, text_first, SCALE)
    out = _torch_backend(tuple(st))(q, k, v, grid, ks, dil, st, text_len, text_first, SCALE)
    _check(out, ref, dtype)


def test_torch_plan_is_far_below_dense():
    grid, ks, dil, st = neighborhood_params((64, 64), 5)
    plan = torch_mod.plan_tiles(grid, ks, dil, st, 0, True, torch.device("cpu"))
    s = math.prod(grid)
    assert plan.mask.numel() < s * s / 10
    assert plan.kv_index.numel() < s * s / 10
    # Every image token is produced by exactly one tile slot.
    assert plan.out_index.unique().numel() == s


def test_torch_auto_tiles_on_a_larger_grid():
    grid, ks, dil, st = neighborhood_params((40, 36), (7, 5), (2, 1), (1, 2))
    assert torch_mod.plan_tiles(grid, ks, dil, st, 3, False, torch.device("cpu")).tiles > 1
    q, k, v = _qkv(grid, 3, b=1)
    args = (q, k, v, grid, ks, dil, st, 3, False, SCALE)
    _check(_torch_backend()(*args), neighborhood_reference(*args), torch.float32)


def test_torch_inference_chunks_match(monkeypatch):
    grid, ks, dil, st, text_len, text_first = _config("2d-prefix")
    q, k, v = _qkv(grid, text_len)
    args = (q, k, v, grid, ks, dil, st, text_len, text_first, SCALE)
    ref = neighborhood_reference(*args)
    monkeypatch.setattr(torch_mod, "_CHUNK_BYTES", 1)  # one tile per chunk, scratch buffers reused
    with torch.no_grad():
        _check(_torch_backend((2, 2))(*args), ref, torch.float32)


# ----------------------------------------------------------------------------- flex backend


@pytest.mark.parametrize("name", FLEX_CASES)
def test_flex_matches_reference_fp32(name):
    grid, ks, dil, st, text_len, text_first = _config(name)
    q, k, v = _qkv(grid, text_len)
    args = (q, k, v, grid, ks, dil, st, text_len, text_first, SCALE)
    ref = neighborhood_reference(*args)
    # Block 128 covers these grids in one block; block 16 makes the BlockMask
    # sparse (partial, full and skipped blocks) and the tile reordering matter.
    _check(_flex_backend()(*args), ref, torch.float32)
    _check(_flex_backend(block_size=16)(*args), ref, torch.float32)
    _check(_flex_backend(block_size=16, reorder=False)(*args), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flex_matches_reference_half(dtype):
    grid, ks, dil, st, text_len, text_first = _config("2d-even-dil-blocked-suffix")
    q, k, v = _qkv(grid, text_len, dtype)
    args = (q, k, v, grid, ks, dil, st, text_len, text_first, SCALE)
    _check(_flex_backend(block_size=16)(*args), neighborhood_reference(*args), dtype)


def test_flex_block_mask_sparse_and_cached():
    grid, ks, dil, st = neighborhood_params((16, 16), 3)
    q, k, v = _qkv(grid, 0, b=1)
    _flex_backend(block_size=16)(q, k, v, grid, ks, dil, st, 0, True, SCALE)
    key = ("neighborhood", grid, ks, dil, st, 0, True, True)
    layout = flex_mod._layout(grid, ks, dil, st, 0, True, q.device, True, 16)
    bm = flex_mod.cached_block_mask(layout.mask_mod, key, 256, 256, q.device, 16)
    assert flex_mod.cached_block_mask(None, key, 256, 256, q.device, 16) is bm  # served from the LRU
    # 4x4 tiles of a 16x16 grid, kernel 3: each query tile sees its 3x3 tile neighbourhood at most.
    assert int(bm.kv_num_blocks.max() + bm.full_kv_num_blocks.max()) <= 9
    assert int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) < 16 * 16


def test_flex_attention_with_mask_mod_generic():
    """The reusable helper with another mask (causal band): flex path and the CPU autograd path."""
    s = 40

    def band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 7)

    q, k, v = _qkv((s,), 0)
    i = torch.arange(s)
    ref = masked_attention_reference(q, k, v, (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 7), SCALE)
    out = flex_mod.flex_attention_with_mask_mod(q, k, v, band, ("band", 7), SCALE, block_size=16)
    _check(out, ref, torch.float32)
    qg = q.clone().requires_grad_()
    out = flex_mod.flex_attention_with_mask_mod(qg, k, v, band, ("band", 7), SCALE, block_size=16)
    _check(out.detach(), ref, torch.float32)


# ----------------------------------------------------------------------------- both backends


BACKENDS = {"torch": _torch_backend((1, 2, 1)), "flex": _flex_backend(block_size=16),
            "flex-rowmajor": _flex_backend(block_size=16, reorder=False)}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_non_contiguous_inputs(backend):
    grid, ks, dil, st, text_len, text_first = _config("3d-mixed-suffix")
    s = text_len + math.prod(grid)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, s, D, generator=gen).transpose(1, 2)  # [B, S, H, D] view of [B, H, S, D]
    k = torch.randn(B, s, H, 2 * D, generator=gen)[..., ::2]  # strided head dim
    v = torch.randn(B, s + 4, H, D, generator=gen)[:, 2:-2]  # offset slice
    assert not (q.is_contiguous() or k.is_contiguous())
    args = (q, k, v, grid, ks, dil, st, text_len, text_first, SCALE)
    _check(BACKENDS[backend](*args), neighborhood_reference(*args), torch.float32)


GRAD_CASES = ["1d-even-dil-stride-suffix", "2d-prefix", "2d-even-dil-blocked-suffix", "3d-stride"]


@pytest.mark.parametrize("name", GRAD_CASES)
@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_gradients_match_reference(backend, name):
    grid, ks, dil, st, text_len, text_first = _config(name)
    tiles = tuple(st)
    fn = _torch_backend(tiles) if backend == "torch" else _flex_backend(block_size=16)
    base = _qkv(grid, text_len, seed=3)
    grad_out = torch.randn(base[0].shape, generator=torch.Generator().manual_seed(4))
    grads = []
    for f in (fn, neighborhood_reference):
        qkv = [t.clone().requires_grad_() for t in base]
        out = f(*qkv, grid, ks, dil, st, text_len, text_first, SCALE)
        (out * grad_out).sum().backward()
        grads.append([t.grad for t in qkv])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- public front door


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_front_door(backend):
    q, k, v = _qkv((7, 9), 5)
    out = neighborhood_attention(q, k, v, (7, 9), (4, 3), dilation=(1, 2), stride=(2, 3), text_len=5,
                                 text_first=False, backend=backend)
    ref = neighborhood_reference(q, k, v, (7, 9), (4, 3), (1, 2), (2, 3), 5, False, D ** -0.5)
    _check(out, ref, torch.float32)
    # Kernel larger than the axis covers it (clamped by the front door).
    q, k, v = _qkv((5, 6), 0)
    out = neighborhood_attention(q, k, v, (5, 6), 9, scale=SCALE, backend=backend)
    _check(out, neighborhood_reference(q, k, v, (5, 6), (5, 6), (1, 1), (1, 1), 0, True, SCALE), torch.float32)


def _call(q, k, v, grid=(4, 4), kernel_size=3, **kw):
    return lambda backend: neighborhood_attention(q, k, v, grid, kernel_size, backend=backend, **kw)


_q, _k, _v = _qkv((4, 4), 0, b=1)
BAD_CALLS = {  # name: (call, regex the message must match: the argument at fault)
    "S vs grid": (_call(_q, _k, _v, grid=(4, 5)), "grid"),
    "S vs text_len": (_call(_q, _k, _v, text_len=2), "text_len"),
    "stride > kernel": (_call(_q, _k, _v, stride=4), "stride"),
    "dilation * kernel > axis": (_call(_q, _k, _v, dilation=2), "dilation"),
    "kernel per axis": (_call(_q, _k, _v, kernel_size=(3, 3, 3)), "kernel_size"),
    "k/v vs q shape": (_call(_q, _k[:, :, :2], _v[:, :, :2]), "k/v"),
    "k vs v shape": (_call(_q, _k, _v[..., :4]), "k and v"),
    "dtype": (_call(_q.half(), _k, _v), "k has dtype"),
    "non-4D": (_call(_q[0], _k[0], _v[0]), "q must be 4-D"),
    "text_first": (_call(_q, _k, _v, text_first=1), "text_first"),
    "scale": (_call(_q, _k, _v, scale=-1.0), "scale"),
}


@pytest.mark.parametrize("what", list(BAD_CALLS))
@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_front_door_errors(backend, what):
    call, match = BAD_CALLS[what]
    with pytest.raises(ValueError, match=match):
        call(backend)


def test_front_door_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        _call(_q, _k, _v)("cuda-magic")
