"""CLEAR local attention: every backend against the plain PyTorch reference.

Triton runs on CPU through TRITON_INTERPRET=1 (conftest.py): few, tiny cases.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from diffaccel import ops
from diffaccel.kernels.blocksparse import get_plan
from diffaccel.kernels.local_ref import circle_mask, local_mask, local_reference, max_sq_dist, pool_reference
from diffaccel.kernels.local_torch import plan_local, pool_tokens
from diffaccel.kernels.local_triton import encode

# grid, radius, text_len, text_first, down_factor
CASES = [
    ((7, 9), 2.5, 5, True, None),
    ((6, 11), 3, 0, False, 2),  # 6 divisible by 2, 11 not
    ((7, 9), math.sqrt(5), 3, False, 3),  # radius**2 just above an integer distance: strictly-less boundary
    ((6, 8), 2, 4, True, 2),  # divisible both ways
    ((5, 4), 20.0, 2, True, None),  # radius covers the whole grid
]
IDS = [f"{g[0]}x{g[1]}-r{r:.2f}-t{t}{'f' if tf else 's'}-d{d}" for g, r, t, tf, d in CASES]
TOL = {torch.float32: (3e-5, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def _qkv(b, s, h, d, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def _weight(d, seed=1):
    if d is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(d, d, generator=g) * 2 / d ** 2).requires_grad_(True)


def _check(backend, case, dtype, grad, b=2, h=2, dh=16):
    grid, radius, text_len, text_first, d = case
    s = text_len + math.prod(grid)
    q, k, v = _qkv(b, s, h, dh, dtype=dtype, grad=grad)
    w = _weight(d)
    kw = dict(text_len=text_len, text_first=text_first, down_factor=d, pool_weight=w, scale=0.3)
    out = ops.local_attention(q, k, v, grid, radius, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    ref = local_reference(q, k, v, grid, radius, text_len, text_first, d, w, 0.3)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    if grad:
        g = torch.randn_like(out)
        ins = (q, k, v) + ((w,) if d else ())
        got = torch.autograd.grad(out, ins, g)
        want = torch.autograd.grad(ref, ins, g)
        for name, a, r in zip(("q", "k", "v", "pool_weight"), got, want):
            torch.testing.assert_close(a, r, atol=2e-4, rtol=2e-4, msg=lambda m: f"d{name} differs: {m}")


# ---------------------------------------------------------------------------------------------
# the reference itself


def test_reference_mask_and_pooling_follow_the_definition():
    grid, radius = (6, 7), 2.2
    m = circle_mask(grid, radius)
    for i in range(42):
        for j in range(42):
            yi, xi, yj, xj = i // 7, i % 7, j // 7, j % 7
            assert bool(m[i, j]) == ((yi - yj) ** 2 + (xi - xj) ** 2 < radius ** 2)
    full = local_mask(grid, radius, text_len=3, text_first=False, n_pooled=4)
    assert full.shape == (45, 49)
    assert full[:42, 42:].all() and full[42:, :45].all()  # image sees text+pooled; text sees text+image
    assert not full[42:, 45:].any()  # text never sees pooled tokens
    # divisible grid: CLEAR's pooling, x.unflatten(H/d, d, W/d, d) * w summed over the window
    x = torch.randn(2, 3 + 24, 2, 5)
    w = torch.rand(2, 2)
    img = x[:, 3:].unflatten(1, (2, 2, 3, 2))  # 4 x 6 grid, d = 2: [B, H/d, d, W/d, d, heads, D]
    clear = (img * w[None, None, :, None, :, None, None]).sum(dim=(2, 4)).flatten(1, 2)
    torch.testing.assert_close(pool_reference(x, (4, 6), 2, w, 3, True), clear)
    torch.testing.assert_close(pool_tokens(x, (4, 6), 2, w, 3, True), clear)


@pytest.mark.parametrize("grid,d", [((7, 9), 2), ((6, 11), 4), ((3, 2), 4), ((8, 8), 4)])
def test_pool_tokens_match_reference_and_border_rule(grid, d):
    n = math.prod(grid)
    x = torch.randn(1, n + 2, 3, 4)
    w = torch.rand(d, d)
    got = pool_tokens(x, grid, d, w, text_len=2, text_first=False)
    torch.testing.assert_close(got, pool_reference(x, grid, d, w, 2, False))
    ph, pw = -(-grid[0] // d), -(-grid[1] // d)
    assert got.shape == (1, ph * pw, 3, 4)
    # the last pooled token repeats the bottom-right token where its window leaves the grid
    i, j = ph - 1, pw - 1
    img = x[:, :n].unflatten(1, grid)
    want = sum(img[:, min(i * d + a, grid[0] - 1), min(j * d + b, grid[1] - 1)] * w[a, b]
               for a in range(d) for b in range(d))
    torch.testing.assert_close(got[:, -1], want)


def test_max_sq_dist_is_strict():
    assert max_sq_dist(2) == 3 and max_sq_dist(2.0001) == 4 and max_sq_dist(math.sqrt(5)) == 5
    assert max_sq_dist(0.5) == 0 and max_sq_dist(1) == 0


# ---------------------------------------------------------------------------------------------
# torch backend (tile and halo)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_fp32_forward_backward(case):
    _check("torch", case, torch.float32, grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_torch_half(case, dtype):
    _check("torch", case, dtype, grad=False)


def test_torch_tile_shapes_and_chunks_agree(monkeypatch):
    import diffaccel.kernels.local_torch as lt

    grid, radius = (13, 10), 3.3
    q, k, v = _qkv(2, 6 + 130, 2, 8)
    ref = local_reference(q, k, v, grid, radius, 6, True, 3, None, 0.5)
    kx, vx = (pool_tokens(t, grid, 3, torch.full((3, 3), 1 / 9), 6, True) for t in (k, v))
    monkeypatch.setattr(lt, "_CHUNK_BYTES", 1)  # one tile per chunk
    for tile in [(1, 1), (3, 4), (13, 10), (5, 2)]:
        out = lt.local_torch(q, k, v, grid, radius, 6, True, kx, vx, 0.5, tile=tile)
        torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-4)
    plan = plan_local(grid, max_sq_dist(radius), 6, True, kx.shape[1], q.device)
    # the halo drops box corners no query reaches: fewer keys than the box
    reach = math.isqrt(max_sq_dist(radius))
    box = min(plan.tile[0] + 2 * reach, 13) * min(plan.tile[1] + 2 * reach, 10)
    assert plan.hk <= box


# ---------------------------------------------------------------------------------------------
# flex backend


@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_flex_forward_backward(case):
    _check("flex", case, torch.float32, grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flex_half(dtype):
    _check("flex", CASES[1], dtype, grad=False)


# ---------------------------------------------------------------------------------------------
# triton backend (interpreted on CPU: few tiny cases)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=[IDS[1], IDS[2]])
def test_triton_forward_backward(case):
    _check("triton", case, torch.float32, grad=True, b=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half(dtype):
    _check("triton", CASES[0], dtype, grad=False, b=1)


def test_triton_plan_skips_far_tiles_marks_interior_full_and_covers_the_circle():
    grid, radius = (48, 48), 5.5
    layout, plan = get_plan("local", encode(grid, 0, True, 0), (radius,), 16, "cpu")
    # 4x4 tiles, radius 5.5: a query tile reaches at most its 5x5 tile neighbourhood
    assert int(plan.kv_cnt.max()) <= 25
    assert plan.density < 25 / 144 + 1e-9
    assert int(plan.kv_full.sum()) > 0
    mask = circle_mask(grid, radius)
    blk = layout.inv // 16
    visited = torch.zeros(layout.n_blocks, layout.n_blocks, dtype=torch.bool)
    full = torch.zeros_like(visited)
    for m in range(layout.n_blocks):
        cols = plan.kv_idx[m, : plan.kv_cnt[m]].long()
        visited[m, cols] = True
        full[m, cols] = plan.kv_full[m, : plan.kv_cnt[m]].bool()
    qi, ki = mask.nonzero(as_tuple=True)
    assert visited[blk[qi], blk[ki]].all()  # every visible pair is in a visited block pair
    qi, ki = (~mask).nonzero(as_tuple=True)
    assert not full[blk[qi], blk[ki]].any()  # no invisible pair is in a block marked full


def test_triton_pooled_gradients_and_text_never_sees_pooled():
    grid = (5, 6)
    q, k, v = _qkv(1, 4 + 30, 2, 16)
    out = ops.local_attention(q, k, v, grid, 1.5, text_len=4, down_factor=2, backend="triton")
    # text queries do not depend on the pooled tokens: same as without pooling
    out0 = ops.local_attention(q, k, v, grid, 1.5, text_len=4, backend="triton")
    torch.testing.assert_close(out[:, :4], out0[:, :4], atol=0, rtol=0)
    assert not torch.allclose(out[:, 4:], out0[:, 4:])


# ---------------------------------------------------------------------------------------------
# semantics through the front door


@pytest.mark.parametrize("backend", ["torch", "flex"])
def test_radius_covering_the_grid_is_dense_attention(backend):
    grid = (5, 7)
    q, k, v = _qkv(2, 3 + 35, 2, 8)
    out = ops.local_attention(q, k, v, grid, 100.0, text_len=3, backend=backend)
    dense = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=2e-6, rtol=1e-5)


def test_default_backend_pool_weight_and_scale():
    grid = (6, 6)
    q, k, v = _qkv(1, 36, 2, 8)
    out = ops.local_attention(q, k, v, grid, 2, down_factor=3)  # CPU: torch backend, uniform 1/9 weights
    ref = local_reference(q, k, v, grid, 2, 0, True, 3, torch.full((3, 3), 1 / 9), 8 ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_non_contiguous_inputs():
    grid = (4, 5)
    q = torch.randn(1, 2, 22, 8).transpose(1, 2)
    k = torch.randn(1, 22, 8, 2).transpose(2, 3)
    v = torch.randn(1, 22, 2, 16)[..., ::2]
    for backend in ("torch", "flex"):
        out = ops.local_attention(q, k, v, grid, 2.5, text_len=2, text_first=False, down_factor=2, backend=backend)
        ref = local_reference(q, k, v, grid, 2.5, 2, False, 2)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_errors_name_the_argument():
    q, k, v = _qkv(1, 20, 2, 8)
    call = lambda *a, **kw: ops.local_attention(*a, **kw)  # noqa: E731
    cases = [
        ((q, k, v, (4, 5), 0), {}, "radius"),
        ((q, k, v, (4, 5), float("inf")), {}, "radius"),
        ((q, k, v, (4, 5), True), {}, "radius"),
        ((q, k, v, (20,), 2), {}, "grid"),
        ((q, k, v, (2, 2, 5), 2), {}, "grid"),
        ((q, k, v, (4, 4), 2), {}, "tokens"),
        ((q, k, v, (4, 5), 2), {"text_len": -1}, "text_len"),
        ((q, k, v, (4, 5), 2), {"text_first": 1}, "text_first"),
        ((q, k, v, (4, 5), 2), {"down_factor": 1}, "down_factor"),
        ((q, k, v, (4, 5), 2), {"down_factor": 2.0}, "down_factor"),
        ((q, k, v, (4, 5), 2), {"pool_weight": torch.ones(2, 2)}, "down_factor"),
        ((q, k, v, (4, 5), 2), {"down_factor": 2, "pool_weight": torch.ones(3, 3)}, "pool_weight"),
        ((q, k, v, (4, 5), 2), {"down_factor": 2, "pool_weight": torch.ones(2, 2, dtype=torch.long)}, "pool_weight"),
        ((q, k, v, (4, 5), 2), {"scale": -1.0}, "scale"),
        ((q, k, v, (4, 5), 2), {"backend": "cuda"}, "backend"),
        ((q, k, v[:, :, :1], (4, 5), 2), {}, "shape"),
        ((q, k.double(), v, (4, 5), 2), {}, "dtype"),
    ]
    for args, kw, word in cases:
        with pytest.raises(ValueError, match=word):
            call(*args, **kw)
