"""diffaccel.ops.linear_attention: Triton (interpreter on CPU) and torch backends vs the plain reference."""
import os

import pytest
import torch

from diffaccel.kernels.linear_attention_ref import linear_attention_reference
from diffaccel.ops import linear_attention

TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.6e-2, 2e-2)}
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1 (tests/conftest.py sets it)"
)


def _qkv(b, sq, sk, h, d, dtype, scale=1.0, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        (torch.randn(b, s, h, d, generator=g) * scale).to(dtype).requires_grad_(grad) for s in (sq, sk, sk)
    )
    return q, k, v


def _close(a, b, dtype, what):
    atol, rtol = TOL[dtype]
    assert a.dtype == b.dtype, what
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [8, 16, 40])
@pytest.mark.parametrize("sq,sk", [(37, 50), (50, 37)])
def test_forward_matches_reference(backend, dtype, d, sq, sk):
    q, k, v = _qkv(2, sq, sk, 3, d, dtype)
    out = linear_attention(q, k, v, backend=backend)
    assert out.shape == (2, sq, 3, d) and out.dtype == dtype
    _close(out, linear_attention_reference(q, k, v), dtype, "out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,d", [(torch.float32, 8), (torch.float32, 40), (torch.float16, 16), (torch.bfloat16, 16)]
)
def test_gradients_match_reference(backend, dtype, d):
    q, k, v = _qkv(2, 37, 50, 3, d, dtype, seed=1, grad=True)
    dout = torch.randn(2, 37, 3, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = torch.autograd.grad(linear_attention(q, k, v, backend=backend), (q, k, v), dout)
    want = torch.autograd.grad(linear_attention_reference(q, k, v), (q, k, v), dout)
    for name, a, b in zip("qkv", got, want):
        # gradients are tiny-valued sums; compare relative to their own scale
        scale = b.float().abs().max().item()
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(a.float(), b.float(), atol=atol * max(scale, 1e-3) * 10, rtol=rtol * 2,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@needs_interpreter
def test_triton_split_reduction_and_wide_heads():
    # 200 keys = 4 tiles of 64 -> several sequence splits; D=80 -> two 64-wide head-dim blocks (padded to 128)
    q, k, v = _qkv(1, 130, 200, 1, 80, torch.float32, seed=3, grad=True)
    out = linear_attention(q, k, v, backend="triton")
    ref = linear_attention_reference(q, k, v)
    _close(out, ref, torch.float32, "out")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(4)
    b, s, h, d = 2, 37, 3, 16
    q = torch.randn(b, h, s, d, generator=g).transpose(1, 2)  # [B, S, H, D] view of a [B, H, S, D] tensor
    kv = torch.randn(b, 50, h, 2 * d + 3, generator=g)  # packed: k and v are strided slices
    k, v = kv[..., :d], kv[..., d + 3:]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    for t in (q, k, v):
        t.requires_grad_(True)
    out = linear_attention(q, k, v, backend=backend)
    ref = linear_attention_reference(q, k, v)
    _close(out, ref, torch.float32, "out")
    dout = torch.randn(b, h, s, d, generator=g).transpose(1, 2)  # non-contiguous upstream gradient too
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, bb in zip("qkv", got, want):
        torch.testing.assert_close(a, bb, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_is_used(backend):
    q, k, v = _qkv(1, 20, 24, 2, 16, torch.float32, seed=5)
    for eps in (1e-6, 0.5, 3):
        _close(linear_attention(q, k, v, eps=eps, backend=backend), linear_attention_reference(q, k, v, eps=eps),
               torch.float32, f"eps={eps}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [16384, 32768])
def test_torch_long_sequence_large_magnitude_half_is_finite(dtype, n):
    # |x| up to ~400: phi(k) ~ 100s; sum_j phi(k_j) v_j over 32K keys would be ~1e7 > fp16 max (65504)
    q, k, v = _qkv(1, n, n, 2, 16, dtype, scale=100.0, seed=6)
    out = linear_attention(q, k, v, backend="torch")
    assert torch.isfinite(out).all()
    ref = linear_attention_reference(q, k, v)  # fp32 internally
    torch.testing.assert_close(out.float(), ref.float(), atol=0.5, rtol=2e-2)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_moderate_sequence_large_magnitude_half_is_finite(dtype):
    q, k, v = _qkv(1, 100, 2048, 1, 16, dtype, scale=100.0, seed=7, grad=True)
    out = linear_attention(q, k, v, backend="triton")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), linear_attention_reference(q, k, v).float(), atol=0.5, rtol=2e-2)
    grads = torch.autograd.grad(out.float().square().mean(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_default_backend_on_cpu_is_torch_and_agrees():
    q, k, v = _qkv(1, 10, 12, 2, 8, torch.float32)
    _close(linear_attention(q, k, v), linear_attention_reference(q, k, v), torch.float32, "out")


def test_empty_query_and_batch():
    k = torch.randn(1, 7, 2, 8)
    assert linear_attention(torch.randn(1, 0, 2, 8), k, k).shape == (1, 0, 2, 8)
    k0 = torch.randn(0, 7, 2, 8)
    assert linear_attention(torch.randn(0, 5, 2, 8), k0, k0).shape == (0, 5, 2, 8)


@needs_interpreter
def test_custom_op_registration_and_compile():
    from diffaccel.kernels.linear_attention_triton import linear_attention_fwd

    q, k, v = _qkv(1, 20, 24, 2, 16, torch.float32, seed=8, grad=True)
    torch.library.opcheck(linear_attention_fwd, (q, k, v, 1e-4))

    def f(q, k, v):
        return linear_attention(q, k, v, backend="triton").sin()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break is an error
    out = compiled(q, k, v)
    _close(out, f(q, k, v), torch.float32, "compiled")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("eps", [0, -1e-4, float("nan"), float("inf"), True, "1e-4", None])
def test_bad_eps(eps):
    q, k, v = _qkv(1, 4, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="eps"):
        linear_attention(q, k, v, eps=eps)


@pytest.mark.parametrize("backend", ["flex", "cuda", ""])
def test_bad_backend(backend):
    q, k, v = _qkv(1, 4, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        linear_attention(q, k, v, backend=backend)


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv(1, 4, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="backend='triton'"):
        linear_attention(q, k, v, backend="triton")


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((1, 4, 2, 8), (1, 6, 3, 8), (1, 6, 3, 8)), "heads"),
        (((1, 4, 2, 8), (1, 6, 2, 8), (1, 5, 2, 8)), "same shape"),
        (((1, 4, 2, 8), (1, 6, 2, 16), (1, 6, 2, 16)), "head dim"),
        (((2, 4, 2, 8), (1, 6, 2, 8), (1, 6, 2, 8)), "batch"),
        (((4, 2, 8), (1, 6, 2, 8), (1, 6, 2, 8)), "q must be 4-D"),
        (((1, 4, 2, 8), (1, 0, 2, 8), (1, 0, 2, 8)), "at least one token"),
    ],
)
def test_bad_shapes(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        linear_attention(q, k, v)


def test_bad_types():
    q, k, v = _qkv(1, 4, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="k has dtype"):
        linear_attention(q, k.half(), v.half())
    with pytest.raises(ValueError, match="q must be a floating-point"):
        linear_attention(q.long(), k, v)
    with pytest.raises(ValueError, match="v must be a torch.Tensor"):
        linear_attention(q, k, v.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_the_definition(backend):
    """A NaN query entry makes that query's output NaN, a NaN key entry every output (it enters the
    shared state), on every backend; other queries stay finite.  (The Triton feature map once turned
    NaN into a finite value: exp(min(NaN, 0)) = exp(0).)"""
    q, k, v = _qkv(1, 12, 10, 2, 16, torch.float32)
    q[0, 3, 1, 5] = float("nan")
    out = linear_attention(q, k, v, backend=backend)
    want = torch.zeros_like(out, dtype=torch.bool)
    want[0, 3, 1] = True
    assert torch.equal(out.isnan(), want)
    k[0, 7, 0, 2] = float("nan")
    out = linear_attention(q, k, v, backend=backend)
    assert out[:, :, 0].isnan().all()  # head 0's state holds the NaN key
    assert torch.equal(out[:, :, 1].isnan(), want[:, :, 1])
