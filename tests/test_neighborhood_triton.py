"""The Triton block-sparse core on neighborhood attention, against the plain PyTorch reference.

Runs on CPU through TRITON_INTERPRET=1 (set in conftest.py), so shapes are small.
"""
import math

import pytest
import torch

from diffaccel import ops
from diffaccel.kernels.blocksparse import get_plan
from diffaccel.kernels.neighborhood_ref import neighborhood_mask, neighborhood_reference
from diffaccel.kernels.neighborhood_triton import _encode, neighborhood_triton

CASES = [
    # grid, kernel, dilation, stride, text_len, text_first
    ((13,), (5,), (1,), (1,), 0, True),
    ((21,), (4,), (2,), (3,), 3, False),
    ((7, 9), (3, 4), (1, 1), (1, 1), 5, True),
    ((7, 9), (3, 3), (2, 1), (1, 2), 5, False),
    ((6, 10), (3, 5), (1, 1), (3, 5), 0, True),  # stride == kernel: blocked windows
    ((5, 7), (5, 7), (1, 1), (1, 1), 2, True),  # kernel covers the grid: dense
    ((3, 5, 6), (2, 3, 3), (1, 1, 1), (1, 2, 3), 4, True),
    ((4, 6, 5), (3, 3, 2), (1, 2, 1), (1, 1, 1), 0, False),
]


def _qkv(b, s, h, d, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("grid,ks,dil,st,text_len,text_first", CASES)
def test_forward_backward_match_reference_fp32(grid, ks, dil, st, text_len, text_first):
    s = text_len + math.prod(grid)
    q, k, v = _qkv(2 if len(grid) < 3 else 1, s, 2, 16, grad=True)
    scale = 0.3
    out = neighborhood_triton(q, k, v, grid, ks, dil, st, text_len, text_first, scale)
    ref = neighborhood_reference(q, k, v, grid, ks, dil, st, text_len, text_first, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=f"d{name} differs")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    grid, ks = (7, 9), (3, 5)
    q, k, v = _qkv(1, 6 + 63, 2, 40, dtype=dtype)  # head dim 40: padded to 64 inside the kernel
    out = neighborhood_triton(q, k, v, grid, ks, (1, 1), (1, 1), 6, False, 40 ** -0.5)
    assert out.dtype == dtype
    ref = neighborhood_reference(q.float(), k.float(), v.float(), grid, ks, (1, 1), (1, 1), 6, False, 40 ** -0.5)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_front_door_non_contiguous_and_default_scale():
    grid = (5, 6)
    base = torch.randn(1, 2, 30 + 3, 16)  # [B, H, S, D]: transposed view is non-contiguous
    q = base.transpose(1, 2)
    k = torch.randn(1, 33, 16, 2).transpose(2, 3)
    v = torch.randn(1, 33, 2, 32)[..., ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = ops.neighborhood_attention(q, k, v, grid, 3, text_len=3, backend="triton")
    ref = neighborhood_reference(q, k, v, grid, (3, 3), (1, 1), (1, 1), 3, True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_plan_skips_blocks_and_marks_interior_blocks_full():
    grid, ks = (64, 64), (7, 7)
    layout, plan = get_plan("neighborhood", _encode(grid, ks, (1, 1), (1, 1), 0, True), (), 16, "cpu")
    # 4x4 tiles, 7x7 windows: each query tile needs at most its 3x3 tile neighbourhood
    assert int(plan.kv_cnt.max()) <= 9
    assert plan.density < 9 / 256 + 1e-9
    assert int(plan.kv_full.sum()) > 0  # the own tile is always fully inside every window of its queries
    # every visible (query, key) pair lies in a visited block pair
    mask = neighborhood_mask(grid, ks, (1, 1), (1, 1))
    slot_of = layout.inv
    qb = slot_of // 16
    visited = torch.zeros(layout.n_blocks, layout.n_blocks, dtype=torch.bool)
    for m in range(layout.n_blocks):
        visited[m, plan.kv_idx[m, : plan.kv_cnt[m]].long()] = True
    qi, ki = mask.nonzero(as_tuple=True)
    assert visited[qb[qi], qb[ki]].all()


def test_kernel_ignores_keys_outside_the_window():
    grid, ks = (6, 8), (3, 3)
    q, k, v = _qkv(1, 48, 2, 16)
    out = ops.neighborhood_attention(q, k, v, grid, ks, backend="triton")
    k2, v2 = k.clone(), v.clone()
    k2[:, 47] += 100.0  # bottom-right corner token, outside the window of the top-left query
    v2[:, 47] -= 100.0
    out2 = ops.neighborhood_attention(q, k2, v2, grid, ks, backend="triton")
    torch.testing.assert_close(out[:, 0], out2[:, 0], atol=0, rtol=0)
    assert not torch.allclose(out[:, 47], out2[:, 47])


def test_torch_compile_fullgraph_through_the_custom_op():
    grid = (4, 5)
    q, k, v = _qkv(1, 20 + 2, 2, 16, grad=True)

    def f(q, k, v):
        return ops.neighborhood_attention(q * 2, k, v, grid, 3, text_len=2, backend="triton").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(q, k, v)
    gq = torch.autograd.grad(y, q)[0]
    y_ref = f(q, k, v)
    gq_ref = torch.autograd.grad(y_ref, q)[0]
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gq, gq_ref)
