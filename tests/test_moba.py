"""Mixture of block attention (ops.moba_attention): selection rules against plain-Python loops, the
torch and Triton backends against the dense-mask reference, tables, errors.

Triton runs on CPU through TRITON_INTERPRET=1 (conftest.py), so its cases are few and tiny.
"""
import itertools
import math

import pytest
import torch

from diffaccel import ops
from diffaccel.kernels.moba_ref import block_partition, moba_mask, moba_reference, moba_select, select_blocks
from diffaccel.kernels.moba_torch import moba_torch
from diffaccel.kernels.moba_triton import moba_geometry, moba_tables, moba_triton, pack_bits, table_sizes


def _qkv(b, s, h, d, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


# ---------------------------------------------------------------------------------------------
# selection rules, written out with Python loops


def _blocks_by_loops(grid, block):
    block = [min(b, n) for b, n in zip(block, grid)]
    bgrid = [(n + b - 1) // b for n, b in zip(grid, block)]
    ids = []
    for c in itertools.product(*[range(n) for n in grid]):
        bid = 0
        for a in range(len(grid)):
            bid = bid * bgrid[a] + c[a] // block[a]
        ids.append(bid)
    return ids, math.prod(bgrid)


def _pick(scores, own, topk, threshold):
    """One decision: own block + others by the rule (scores: list over candidates)."""
    C = len(scores)
    others = sorted((i for i in range(C) if i != own), key=lambda i: -scores[i])
    if topk is not None:
        return {own, *others[:topk - 1]}
    if not others:
        return {own}
    mn, mx = min(scores), max(scores)
    den = mx - mn if mx - mn > 1e-6 else 1.0
    g = [(s - mn) / den for s in scores]
    total = sum(g)
    remain = max(threshold - g[own] / (total + 1e-6), 0.0)
    taken, acc = [], 0.0
    for i in others:
        taken.append(i)
        acc += g[i]
        if acc / (total + 1e-6) >= remain:
            break
    return {own, *taken}


def _select_by_loops(q, k, grid, block, topk, threshold, selection):
    """bool [B, H, N, C] from q, k [B, N, H, D] (image tokens)."""
    ids, C = _blocks_by_loops(grid, block)
    B, N, H, _ = q.shape
    members = [[n for n in range(N) if ids[n] == c] for c in range(C)]
    out = torch.zeros(B, H, N, C, dtype=torch.bool)
    for b, h in itertools.product(range(B), range(H)):
        kmean = [k[b, m, h].double().mean(0) for m in members]
        if selection == "query":
            for n in range(N):
                s = [float(q[b, n, h].double() @ km) for km in kmean]
                for c in _pick(s, ids[n], topk, threshold):
                    out[b, h, n, c] = True
        elif selection == "tile":
            for t in range(C):
                qm = q[b, members[t], h].double().mean(0)
                chosen = _pick([float(qm @ km) for km in kmean], t, topk, threshold)
                for n in members[t]:
                    for c in chosen:
                        out[b, h, n, c] = True
        else:  # head: one decision over every (query, block) pair of the head
            s = [[float(q[b, n, h].double() @ km) for km in kmean] for n in range(N)]
            for n in range(N):
                out[b, h, n, ids[n]] = True
            others = sorted(((n, c) for n in range(N) for c in range(C) if c != ids[n]),
                            key=lambda p: -s[p[0]][p[1]])
            if topk is not None:
                chosen = others[:(topk - 1) * N]
            else:
                flat = [x for row in s for x in row]
                mn, mx = min(flat), max(flat)
                den = mx - mn if mx - mn > 1e-6 else 1.0
                g = [[(x - mn) / den for x in row] for row in s]
                total = sum(map(sum, g))
                own = sum(g[n][ids[n]] for n in range(N))
                remain = max(threshold - own / (total + 1e-6), 0.0)
                chosen, acc = [], 0.0
                for n, c in others:
                    chosen.append((n, c))
                    acc += g[n][c]
                    if acc / (total + 1e-6) >= remain:
                        break
            for n, c in chosen:
                out[b, h, n, c] = True
    return out


@pytest.mark.parametrize("grid,block", [((11,), (4,)), ((5, 7), (2, 3)), ((3, 4, 5), (2, 4, 2)),
                                        ((2, 3, 5), (9, 1, 2))])
def test_block_partition_matches_loops(grid, block):
    part = block_partition(grid, block)
    ids, C = _blocks_by_loops(grid, block)
    assert part.n_blocks == C
    assert part.token_block.tolist() == ids
    assert part.sizes.tolist() == [ids.count(c) for c in range(C)]
    assert part.block == tuple(min(b, n) for b, n in zip(block, grid))


RULES = [
    ("query", 3, None), ("query", None, 0.3), ("query", None, 0.0), ("query", None, 1.0),
    ("tile", 2, None), ("tile", None, 0.5),
    ("head", 2, None), ("head", None, 0.4),
]


@pytest.mark.parametrize("selection,topk,threshold", RULES)
def test_selection_rules_match_loops(selection, topk, threshold):
    grid, block = (4, 5), (2, 2)  # 6 blocks, partial ones on the right border
    q, k, _ = _qkv(2, 20, 2, 8, seed=1)
    sel = select_blocks(q, k, block_partition(grid, block), topk, threshold, selection)
    ref = _select_by_loops(q, k, grid, block, topk, threshold, selection)
    assert torch.equal(sel, ref)


def test_selection_properties():
    grid, block = (6, 6), (2, 3)  # 6 blocks
    q, k, _ = _qkv(1, 36, 3, 8, seed=2)
    part = block_partition(grid, block)
    own = torch.nn.functional.one_hot(part.token_block, part.n_blocks).bool()
    for sel_mode in ("query", "tile", "head"):
        sel = select_blocks(q, k, part, 3, None, sel_mode)
        assert (sel | ~own).all(), "every query keeps its own block"
        if sel_mode != "head":
            assert (sel.sum(-1) == 3).all()
        else:
            assert int(sel.sum()) == 3 * 3 * 36  # (topk) pairs per query on average, per head
        assert select_blocks(q, k, part, 6, None, sel_mode).all()
        assert torch.equal(select_blocks(q, k, part, 1, None, sel_mode), own.expand(1, 3, -1, -1))
        # threshold: at least one other block, a larger threshold never keeps fewer
        lo = select_blocks(q, k, part, None, 0.0, sel_mode)
        hi = select_blocks(q, k, part, None, 0.8, sel_mode)
        if sel_mode != "head":
            assert (lo.sum(-1) == 2).all()
        assert (hi.sum(-1) >= lo.sum(-1)).all() if sel_mode != "head" else hi.sum() >= lo.sum()
    tile = select_blocks(q, k, part, 2, None, "tile")
    for c in range(part.n_blocks):  # every query of a block shares the block's choice
        rows = tile[:, :, part.token_block == c]
        assert (rows == rows[:, :, :1]).all()


# ---------------------------------------------------------------------------------------------
# torch backend (fast): many cases

TORCH_CASES = [
    # grid, block, text_len, text_first
    ((23,), (5,), 0, True),
    ((6, 7), (3, 4), 3, True),
    ((6, 7), (2, 7), 4, False),
    ((3, 4, 5), (2, 2, 3), 5, False),  # 3D, partial border blocks
    ((4, 4, 6), (1, 4, 6), 0, True),  # temporal (1D) partition
    ((4, 4, 6), (4, 2, 2), 2, True),  # spatial, every frame (VMoBA's 2D)
]


@pytest.mark.parametrize("grid,block,text_len,text_first", TORCH_CASES)
@pytest.mark.parametrize("selection,topk,threshold", [("query", 2, None), ("query", None, 0.3), ("tile", None, 0.5),
                                                      ("head", 3, None)])
def test_torch_matches_reference_fp32_with_grads(grid, block, text_len, text_first, selection, topk, threshold):
    s = text_len + math.prod(grid)
    q, k, v = _qkv(2, s, 2, 16, grad=True, seed=3)
    args = (grid, block, topk, threshold, selection, text_len, text_first, 0.3)
    out = moba_torch(q, k, v, *args)
    ref = moba_reference(q, k, v, *args)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=f"d{name} differs")


def test_torch_no_grad_path_and_half_precision():
    grid, block = (5, 6), (2, 3)
    q, k, v = _qkv(2, 30 + 3, 3, 16, seed=4)
    with torch.no_grad():  # the fused (flash) no-grad path
        out = ops.moba_attention(q, k, v, grid, block, topk=3, text_len=3, backend="torch")
    ref = moba_reference(q, k, v, grid, block, 3, None, "query", 3, True, 16 ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # the no-grad path reuses its buffers: a smaller call after a larger one, every selection mode
    q2, k2, v2 = _qkv(1, 12 + 2, 2, 16, seed=10)
    for selection, topk, threshold in [("query", None, 0.3), ("head", 2, None), ("tile", 2, None)]:
        with torch.no_grad():
            out = ops.moba_attention(q2, k2, v2, (3, 4), 2, topk=topk, threshold=threshold, selection=selection,
                                     text_len=2, text_first=False, backend="torch")
        ref = moba_reference(q2, k2, v2, (3, 4), (2, 2), topk, threshold, selection, 2, False)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        qh, kh, vh = (t.to(dtype) for t in (q, k, v))
        out = ops.moba_attention(qh, kh, vh, grid, block, threshold=0.3, text_len=3, backend="torch")
        assert out.dtype == dtype
        ref = moba_reference(qh.float(), kh.float(), vh.float(), grid, block, None, 0.3, "query", 3, True)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_topk_extremes_are_dense_and_block_diagonal():
    grid, block = (4, 6), (2, 3)
    q, k, v = _qkv(1, 24 + 2, 2, 16, seed=5)
    scale = 0.25
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)
    for backend in ("torch", "triton"):
        out = ops.moba_attention(q, k, v, grid, block, topk=4, text_len=2, scale=scale, backend=backend)
        torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-4)
    part = block_partition(grid, block)
    own = torch.nn.functional.one_hot(part.token_block, part.n_blocks).bool().expand(1, 2, -1, -1)
    from diffaccel.kernels.reference import masked_attention_reference

    diag = masked_attention_reference(q, k, v, moba_mask(own, part, 2, True), scale)
    out = ops.moba_attention(q, k, v, grid, block, topk=1, text_len=2, scale=scale, backend="torch")
    torch.testing.assert_close(out, diag, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Triton backend (interpreter on CPU): a few tiny cases covering the axes

TRITON_CASES = [
    # grid, block, text_len, text_first, selection, topk, threshold, batch, heads
    ((23,), (5,), 0, True, "query", 2, None, 2, 1),  # 1D, partial last block
    ((6, 7), (3, 4), 3, True, "query", None, 0.3, 1, 2),  # 2D, text prefix, threshold
    ((3, 4, 5), (2, 2, 3), 4, False, "head", 2, None, 1, 2),  # 3D, partial, text suffix, per-head global
    ((2, 4, 6), (1, 4, 6), 0, True, "tile", None, 0.5, 2, 1),  # temporal 1D partition of a video
]


@pytest.mark.parametrize("grid,block,text_len,text_first,selection,topk,threshold,batch,heads", TRITON_CASES)
def test_triton_matches_reference_fp32_with_grads(grid, block, text_len, text_first, selection, topk, threshold, batch,
                                                  heads):
    s = text_len + math.prod(grid)
    q, k, v = _qkv(batch, s, heads, 16, grad=True, seed=6)
    args = (grid, block, topk, threshold, selection, text_len, text_first, 0.3)
    out = moba_triton(q, k, v, *args)
    ref = moba_reference(q, k, v, *args)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, msg=f"d{name} differs")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    grid, block = (5, 6), (2, 3)
    q, k, v = _qkv(1, 30 + 3, 2, 40, dtype=dtype, seed=7)  # head dim 40: padded inside the kernel
    out = ops.moba_attention(q, k, v, grid, block, topk=2, text_len=3, text_first=False, backend="triton")
    assert out.dtype == dtype
    # the selection is made on the half-precision inputs (upcast to fp32), as the backends do
    sel = moba_select(q, k, grid, block, 2, None, "query", 3, False)
    mask = moba_mask(sel, block_partition(grid, block), 3, False)
    from diffaccel.kernels.reference import masked_attention_reference

    ref = masked_attention_reference(q.float(), k.float(), v.float(), mask, 40 ** -0.5)
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_triton_tables_cover_the_selection_and_mark_full_blocks():
    grid, block = (8, 8), (4, 4)  # 4 MoBA blocks of 16 = one kernel block each (CPU block 16)
    q, k, _ = _qkv(2, 64, 2, 8, seed=8)
    part = block_partition(grid, block)
    geo = moba_geometry(grid, block, 0, True, 16, "cpu")
    visit, full, bits = moba_tables(q, k, geo, part, 2, None, "query")
    sel = select_blocks(q, k, part, 2, None, "query")
    assert torch.equal(bits.view(2, 2, 64, 1)[..., 0], pack_bits(sel)[:, :, geo.slot_token, 0])
    # MoBA block c is kernel block c here: visit = some query of the tile selected it, full = all did
    per_tile = sel[:, :, geo.slot_token].view(2, 2, 4, 16, 4)
    assert torch.equal(visit.view(2, 2, 4, 4), per_tile.any(3))
    assert torch.equal(full.view(2, 2, 4, 4), per_tile.all(3))
    assert full.view(2, 2, 4, 4).diagonal(dim1=-2, dim2=-1).all()  # own block: always full
    # tile selection: every query of a tile shares the choice, so nothing needs an element mask
    visit_t, full_t, _ = moba_tables(q, k, geo, part, 2, None, "tile")
    assert torch.equal(visit_t, full_t)
    assert int(visit_t.sum(-1).max()) == 2


@pytest.mark.parametrize("grid,block,text_len,kblock", [((23,), (5,), 0, 16), ((6, 7), (3, 4), 3, 16),
                                                        ((3, 9, 10), (2, 4, 3), 20, 8), ((5, 40), (5, 40), 0, 64)])
def test_table_sizes_match_the_geometry(grid, block, text_len, kblock):
    geo = moba_geometry(grid, block, text_len, True, kblock, "cpu")
    nb, slots, words = table_sizes(grid, block, text_len, kblock)
    assert (nb, slots, words) == (geo.layout.n_blocks, geo.layout.num_slots,
                                  (block_partition(grid, block).n_blocks + 31) // 32)


def test_triton_compiles_fullgraph_forward_and_backward():
    """The gate, selection, tables and kernel are one custom op: no graph break, same values and grads."""
    grid, block = (2, 4, 6), (1, 2, 3)
    q, k, v = _qkv(1, 48 + 5, 2, 16, grad=True, seed=9)

    def f(q, k, v):
        return ops.moba_attention(q, k, v, grid, block, topk=3, text_len=5, backend="triton") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    ref = f(q, k, v)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("grid,block,text_len,text_first,topk,threshold,dtype", [
    ((23,), (5,), 0, True, 2, None, torch.float32),
    ((6, 7), (3, 4), 3, True, None, 0.3, torch.float32),  # partial blocks, threshold
    ((3, 4, 5), (2, 2, 3), 4, False, 3, None, torch.float16),
    ((4, 8, 8), (2, 4, 4), 0, True, None, 0.6, torch.bfloat16),
    ((5, 40), (1, 5), 2, True, 7, None, torch.float32),  # 40 blocks: two selection words, bit 31 used
    ((4, 6), (2, 2), 0, True, 9, None, torch.float32),  # topk > blocks: everything
])
def test_fused_gate_kernel_matches_the_torch_selection(grid, block, text_len, text_first, topk, threshold, dtype):
    """The Triton gate kernel (scores, per-query selection, bits, per-tile union / intersection) gives
    exactly the tables of the torch selection path."""
    q, k, _ = _qkv(2, math.prod(grid) + text_len, 3, 16, dtype=dtype, seed=10)
    part = block_partition(grid, block)
    geo = moba_geometry(grid, block, text_len, text_first, 16, "cpu")
    want = moba_tables(q, k, geo, part, topk, threshold, "query", fused=False)
    got = moba_tables(q, k, geo, part, topk, threshold, "query", fused=True)
    for name, a, b in zip(("visit", "full", "bits"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("topk,threshold", [(4, None), (None, 0.3)])
def test_fused_gate_streams_candidates_in_chunks(topk, threshold, monkeypatch):
    """More MoBA blocks than the gate kernel's chunk of candidates (32 here): the selection is computed
    chunk by chunk and still equals the torch selection."""
    from diffaccel.kernels import moba_triton
    from diffaccel.kernels.launch import Launch

    monkeypatch.setattr(moba_triton, "gate_launch", lambda arch, dtype, head_dim: Launch(16, 32))
    grid, block = (2, 20), (1, 1)  # 40 blocks of one token
    q, k, _ = _qkv(1, 40, 1, 16, seed=12)
    part = block_partition(grid, block)
    geo = moba_geometry(grid, block, 0, True, 16, "cpu")
    want = moba_tables(q, k, geo, part, topk, threshold, "query", fused=False)
    got = moba_tables(q, k, geo, part, topk, threshold, "query", fused=True)
    for name, a, b in zip(("visit", "full", "bits"), got, want):
        assert torch.equal(a, b), name


def test_pack_bits():
    sel = torch.rand(3, 70) < 0.5
    words = pack_bits(sel)
    assert words.shape == (3, 3) and words.dtype == torch.int32
    unpacked = ((words[..., :, None].long() >> torch.arange(32)) & 1).flatten(-2)[..., :70].bool()
    assert torch.equal(unpacked, sel)


def test_keys_of_unselected_blocks_do_not_matter():
    grid, block = (4, 8), (4, 2)  # 4 blocks along the width
    q, k, v = _qkv(1, 32, 1, 16, seed=9)
    sel = moba_select(q, k, grid, block, 2, None)
    part = block_partition(grid, block)
    n = 0
    unselected = [c for c in range(4) if not sel[0, 0, n, c]]
    tokens = [t for t in range(32) if part.token_block[t] in unselected]
    k2, v2 = k.clone(), v.clone()
    v2[:, tokens] += 100.0  # values only: the gate (mean keys) and thus the selection stay the same
    for backend in ("torch", "triton"):
        a = ops.moba_attention(q, k, v, grid, block, topk=2, backend=backend)
        b = ops.moba_attention(q, k2, v2, grid, block, topk=2, backend=backend)
        torch.testing.assert_close(a[:, n], b[:, n], atol=1e-6, rtol=0)
        assert not torch.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# front door


def test_front_door_defaults_and_non_contiguous():
    grid = (5, 6)
    q = torch.randn(1, 2, 30 + 3, 16).transpose(1, 2)
    k = torch.randn(1, 33, 16, 2).transpose(2, 3)
    v = torch.randn(1, 33, 2, 32)[..., ::2]
    ref = moba_reference(q, k, v, grid, (3, 3), 2, None, "query", 3, True)
    for backend in ("torch", "triton"):
        out = ops.moba_attention(q, k, v, grid, 3, topk=2, text_len=3, backend=backend)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # a block larger than an axis covers the axis
    out = ops.moba_attention(q, k, v, grid, (99, 2), topk=2, text_len=3, backend="torch")
    torch.testing.assert_close(out, moba_reference(q, k, v, grid, (5, 2), 2, None, "query", 3, True),
                               atol=2e-5, rtol=1e-4)
    empty = torch.randn(0, 30, 2, 16)
    assert ops.moba_attention(empty, empty, empty, grid, 3, topk=2).shape == empty.shape


@pytest.mark.parametrize("kwargs,match", [
    (dict(block=0, topk=2), "block must be >= 1"),
    (dict(block=(2, 2, 2), topk=2), "one per grid axis"),
    (dict(block=(2, True), topk=2), "block must be"),
    (dict(block=2), "exactly one of topk or threshold"),
    (dict(block=2, topk=2, threshold=0.3), "exactly one of topk or threshold"),
    (dict(block=2, topk=0), "topk must be a positive int"),
    (dict(block=2, topk=2.0), "topk must be a positive int"),
    (dict(block=2, threshold=1.5), r"threshold must be a number in \[0, 1\]"),
    (dict(block=2, threshold=float("nan")), "threshold must be"),
    (dict(block=2, topk=2, selection="block"), "selection must be one of"),
    (dict(block=2, topk=2, text_len=1), "expected S = text_len"),
    (dict(block=2, topk=2, text_first=1), "text_first must be a bool"),
    (dict(block=2, topk=2, backend="flex"), "backend must be one of"),
    (dict(block=2, topk=2, scale=-1.0), "scale must be"),
])
def test_errors(kwargs, match):
    q, k, v = _qkv(1, 20, 1, 8)
    with pytest.raises(ValueError, match=match):
        ops.moba_attention(q, k, v, (4, 5), **kwargs)


def test_error_on_grid():
    q, k, v = _qkv(1, 20, 1, 8)
    with pytest.raises(ValueError, match="grid must have"):
        ops.moba_attention(q, k, v, (1, 4, 5, 1), 2, topk=2)


def test_triton_gate_caps_topk_at_the_number_of_blocks():
    """topk far beyond the number of blocks (here 10**9 on 4) returns at once (the gate kernel once
    looped topk - 1 times) and keeps every block, as the torch backend does."""
    import signal

    grid, block = (8, 8), (4, 4)
    q, k, v = _qkv(1, 64, 2, 16, seed=11)

    def timeout(*_):
        raise TimeoutError("the Triton gate did not return within 60 s for topk=10**9")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    try:
        out = ops.moba_attention(q, k, v, grid, block, topk=10 ** 9, backend="triton")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    want = ops.moba_attention(q, k, v, grid, block, topk=10 ** 9, backend="torch")
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(out, dense.transpose(1, 2), atol=2e-5, rtol=1e-4)
