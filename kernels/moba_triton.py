"""Mixture of block attention on the block-sparse Triton core (``blocksparse.py``).

Slot layout (static, cached per geometry): every MoBA block occupies its own run of
``ceil(size / BLOCK)`` kernel blocks (its tokens row-major inside the block, the last kernel block
padded), MoBA blocks in row-major block order, then the text tokens.  So every kernel key block
belongs to exactly one MoBA block, and every query tile to one own block.

Per call (data-dependent, per batch*head): the gate and selection, no gradient.  Per-query
selection (MoBA / VMoBA's rule) runs in the Triton gate kernel (``_moba_gate_kernel``: one program per
query tile scores its queries against every block's mean key in fp32, picks the own block plus the
top-k / threshold blocks in registers and writes the selection bits), so the ``[B, H, N, n_blocks]``
gate is never materialised; tile and head selection use torch ops (``moba_ref.select_blocks``).  Then,
for every query tile the union of its queries' selected MoBA
blocks (kernel key blocks to visit) and their intersection (blocks every query selected: no
element mask when the key block has no padding); text key blocks are visited by every tile, text
query tiles visit everything.  The element test on partial entries (``MODE_SELECT``) reads a
compact bit table ``[B*H, slots, ceil(n_blocks / 32)]`` int32: bit ``c`` of a query slot's row says
whether that query selected MoBA block ``c``.  Forward and backward are the core's kernels.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import List
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .blocksparse import (MODE_SELECT, BlockPlan, dynamic_tables, register_planner, sparse_attn_dyn_bwd,
                          sparse_attn_dyn_fwd)
from .launch import attention_block, cuda_arch, gate_launch
from .moba_select import block_partition, gate_means, image_slices, select_blocks
from .nonfinite import clean, nan_rows, nonfinite_marks, unchecked_or_finite
from .tiling import _BIG, IMAGE, PAD, TEXT, TileLayout

# elements of the per-query selection [B, heads, N, n_blocks] handled at once
_SEL_BUDGET = 1 << 26


def kernel_block(block, q):
    """Kernel block (slots per tile) for MoBA blocks of ``block`` tokens per axis and ``q``'s device,
    dtype and head dim: 16 on the interpreter; on CUDA the MoBA block size rounded up to a power of two,
    between 16 and the core's tile for ``q`` (``launch.attention_block``)."""
    arch = cuda_arch(q.device)
    if arch is None:
        return 16
    cap = attention_block(arch, q.dtype, q.shape[-1])
    return max(16, min(cap, 1 << max(0, (math.prod(block) - 1).bit_length())))


def pack_bits(sel):
    """bool ``[..., C]`` -> int32 ``[..., ceil(C / 32)]``: bit ``c % 32`` of word ``c // 32`` is ``sel[..., c]``."""
    *lead, C = sel.shape
    W = (C + 31) // 32
    x = torch.zeros(*lead, W * 32, dtype=torch.int32, device=sel.device)
    x[..., :C] = sel
    weights = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32, device=sel.device)
    return (x.view(*lead, W, 32) * weights).sum(-1, dtype=torch.int32)


@dataclass
class MobaGeometry:
    """Static slot layout of one (grid, block, text) geometry and what the per-call tables need."""

    layout: TileLayout
    plan: BlockPlan
    n_img_kb: int  # image kernel blocks
    kb_mb: torch.Tensor  # [n_img_kb] int64: MoBA block of every image kernel block
    slot_token: torch.Tensor  # [n_img_kb * BLOCK] int64: image token of every image slot (pads: 0)
    slot_valid: torch.Tensor  # [n_img_kb * BLOCK] bool


@functools.lru_cache(maxsize=64)
def moba_geometry(grid, block, text_len, text_first, kblock, device):
    nd = len(grid)
    part = block_partition(grid, block, "cpu")
    C, width = part.members.shape
    N = part.n_tokens
    nkb = (part.sizes + kblock - 1) // kblock
    kb_start = torch.cumsum(nkb, 0) - nkb
    n_img = int(nkb.sum())
    slot_of = kb_start[:, None] * kblock + torch.arange(width)[None, :]
    slot_token = torch.zeros(n_img * kblock, dtype=torch.int64)
    slot_valid = torch.zeros(n_img * kblock, dtype=torch.bool)
    slot_token[slot_of[part.valid]] = part.members[part.valid]
    slot_valid[slot_of[part.valid]] = True
    kb_mb = torch.repeat_interleave(torch.arange(C), nkb)
    n_txt = (text_len + kblock - 1) // kblock
    n_slots = (n_img + n_txt) * kblock
    img_off = text_len if text_first else 0
    txt_off = 0 if text_first else N
    tpos = torch.arange(n_txt * kblock)
    tvalid = tpos < text_len
    perm = torch.cat([torch.where(slot_valid, img_off + slot_token, 0), torch.where(tvalid, txt_off + tpos, 0)])
    flag = torch.cat([torch.where(slot_valid, IMAGE, PAD), torch.where(tvalid, TEXT, PAD)]).to(torch.int32)
    live = flag != PAD
    inv = torch.empty(N + text_len, dtype=torch.int64)
    inv[perm[live]] = torch.nonzero(live).squeeze(1)
    # kpos[:, 0]: MoBA block of every image key slot (-1 elsewhere), read by MODE_SELECT
    kpos = torch.full((n_slots, 3), -1, dtype=torch.int32)
    kpos[:n_img * kblock, 0] = torch.where(slot_valid, kb_mb.repeat_interleave(kblock), -1).to(torch.int32)
    # real grid coordinates of image slots (for inspection; the kernels do not read them)
    strides = [math.prod(grid[a + 1:]) for a in range(nd)]
    real = torch.full((n_slots, 3), _BIG, dtype=torch.int64)
    for a in range(nd):
        real[:n_img * kblock, a] = torch.where(slot_valid, slot_token // strides[a] % grid[a], _BIG)
    rb = real[:n_img * kblock, :nd].reshape(n_img, kblock, nd)
    vb = slot_valid.reshape(n_img, kblock, 1)
    dev = torch.device(device)
    layout = TileLayout(
        grid=tuple(grid), dilation=(1,) * nd, tile=tuple(block), block=kblock, text_len=text_len,
        text_first=text_first, perm=perm.to(dev), inv=inv.to(dev), flag=flag.to(dev),
        coords=real.to(torch.int32).to(dev), real=real.to(torch.int32).to(dev), n_img_blocks=n_img,
        n_text_blocks=n_txt, blk_sub=torch.zeros(n_img, dtype=torch.int64),
        blk_lo=torch.where(vb, rb, _BIG).amin(1), blk_hi=torch.where(vb, rb, -_BIG).amax(1),
        blk_dense=live.reshape(-1, kblock).all(1).to(dev),
    )
    dummy = torch.zeros(1, 1, dtype=torch.int32, device=dev)
    kpos = kpos.to(dev)
    plan = BlockPlan(dummy, dummy[0], dummy, dummy, dummy[0], dummy, qflag=layout.flag, kflag=layout.flag,
                     qlo=kpos, qhi=kpos, kpos=kpos, mode=MODE_SELECT, ndim=nd, block=kblock)
    return MobaGeometry(layout, plan, n_img, kb_mb.to(dev), slot_token.to(dev), slot_valid.to(dev))


def _encode(grid, block, text_len, text_first):
    return [len(grid), *grid, *block, int(text_len), int(text_first)]


@register_planner("moba")
def moba_plan(ints, floats, block, device):
    nd = ints[0]
    grid, bs = tuple(ints[1:1 + nd]), tuple(ints[1 + nd:1 + 2 * nd])
    geo = moba_geometry(grid, bs, ints[1 + 2 * nd], bool(ints[2 + 2 * nd]), block, device)
    return geo.layout, geo.plan


# beyond this many MoBA blocks the torch selection path is faster than the fused gate kernel (whose
# shared memory is bounded whatever the count: it streams the candidates in chunks)
GATE_MAX_BLOCKS = 1024


@triton.jit
def _gate_scores(q_rows, valid, km_ptr, km_base, c0, offs_c, C, D, BLOCK_D: tl.constexpr, KCH: tl.constexpr,
                 UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Scores ``q . kmean`` of the query rows ``q_rows`` (row pointers, ``[BLOCK_M, 1]``) against candidate
    blocks ``c0 + offs_c``, fp32, accumulated over head-dim pieces of ``KCH``."""
    cm = (c0 + offs_c) < C
    s = tl.zeros([q_rows.shape[0], offs_c.shape[0]], dtype=tl.float32)
    for d0 in range(0, BLOCK_D, KCH):
        offs_d = d0 + tl.arange(0, KCH)
        dm = (offs_d < D)[None, :]
        qt = tl.load(q_rows + offs_d[None, :], mask=valid[:, None] & dm, other=0.0)
        km = tl.load(km_ptr + km_base + (c0 + offs_c)[:, None] * D + offs_d[None, :], mask=cm[:, None] & dm,
                     other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            km = km.to(tl.float32)
        s += tl.dot(qt, tl.trans(km), input_precision=PREC)
    return s


@triton.jit
def _gate_next(g, idx, cand, cv, ci):
    """Per row, the best entry of ``g`` after ``(cv, ci)`` in the order (value descending, block ascending)
    among ``cand``: ``(value, block)``, ``(-inf, 2**30)`` when there is none."""
    after = cand & ((g < cv[:, None]) | ((g == cv[:, None]) & (idx[None, :] > ci[:, None])))
    w = tl.where(after, g, float("-inf"))
    m = tl.max(w, 1)
    i = tl.min(tl.where(after & (w == m[:, None]), idx[None, :], 1 << 30), 1)
    return m, i


@triton.jit
def _moba_gate_kernel(q_ptr, km_ptr, slot_token_ptr, slot_valid_ptr, kb_mb_ptr, bits_ptr, any_ptr, all_ptr, cut_ptr,
                      cut_idx_ptr, threshold, stride_qb, stride_qs, stride_qh, img_off, H, C, D, n_slots, n_words,
                      n_tiles, kblock, n_pick,
                      THRESH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                      KCH: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Gate and per-query selection of one query tile (``kblock`` image slots, all of one MoBA block) of
    one batch*head: scores ``q . kmean`` (fp32 accumulation), the own block plus the best others (top-k
    or VMoBA's threshold rule; ties: lower block first), written as selection bits per slot and as the
    union / intersection over the tile's valid queries.

    Candidates are streamed in chunks of ``BLOCK_C`` (shared memory and registers do not grow with the
    number of blocks).  Pass 1, per ``BLOCK_M`` query rows: the *cut*, the last block taken in the order
    (normalised score descending, block ascending): ``n_pick`` steps of "next best" for top-k, VMoBA's
    cumulative rule for a threshold (at most ``C - 1`` steps, stopping once every row is done); with one
    chunk the scores stay in registers, else they are recomputed per step.  The cut (and the row's
    normalisation) goes to ``cut_ptr``/``cut_idx_ptr``.  Pass 2, chunk by chunk: selected = own block or
    at or before the cut."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    own = tl.load(kb_mb_ptr + tile)
    offs_c = tl.arange(0, BLOCK_C)
    km_base = bh * C * D
    one_chunk = C <= BLOCK_C
    cut_rows = cut_ptr + bh * n_slots * 3
    for r in range(0, kblock, BLOCK_M):
        offs_m = tile * kblock + r + tl.arange(0, BLOCK_M)
        tok = tl.load(slot_token_ptr + offs_m)
        valid = tl.load(slot_valid_ptr + offs_m) != 0
        q_rows = q_ptr + b * stride_qb + (img_off + tok)[:, None] * stride_qs + h * stride_qh
        cv = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
        ci = tl.full([BLOCK_M], -1, dtype=tl.int32)
        lo = tl.zeros([BLOCK_M], dtype=tl.float32)
        den = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if THRESH:
            # min-max normalisation over every block, then the own block's share and the total
            hi = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            lo = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                s = _gate_scores(q_rows, valid, km_ptr, km_base, c0, offs_c, C, D, BLOCK_D, KCH, UPCAST, PREC)
                cm = ((c0 + offs_c) < C)[None, :]
                lo = tl.minimum(lo, tl.min(tl.where(cm, s, float("inf")), 1))
                hi = tl.maximum(hi, tl.max(tl.where(cm, s, float("-inf")), 1))
            den = hi - lo
            den = tl.where(den <= 1e-6, 1.0, den)
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            own_val = tl.zeros([BLOCK_M], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                s = _gate_scores(q_rows, valid, km_ptr, km_base, c0, offs_c, C, D, BLOCK_D, KCH, UPCAST, PREC)
                idx = c0 + offs_c
                g = tl.where((idx < C)[None, :], (s - lo[:, None]) / den[:, None], 0.0)
                total += tl.sum(g, 1)
                own_val += tl.sum(tl.where((idx == own)[None, :], g, 0.0), 1)
            total = total + 1e-6
            remain = tl.maximum(threshold - own_val / total, 0.0)
            cum = tl.zeros([BLOCK_M], dtype=tl.float32)
            done = ~valid
            step = 0
            if one_chunk:
                s = _gate_scores(q_rows, valid, km_ptr, km_base, 0, offs_c, C, D, BLOCK_D, KCH, UPCAST, PREC)
                g = (s - lo[:, None]) / den[:, None]
                cand = ((offs_c < C) & (offs_c != own))[None, :]
                while (step < C - 1) & (tl.min(done.to(tl.int32), 0) == 0):
                    m, i = _gate_next(g, offs_c, cand, cv, ci)
                    take = (~done) & (m > float("-inf"))
                    cv = tl.where(take, m, cv)
                    ci = tl.where(take, i, ci)
                    cum += tl.where(take, m, 0.0)
                    done = done | (cum / total >= remain)
                    step += 1
            else:
                while (step < C - 1) & (tl.min(done.to(tl.int32), 0) == 0):
                    bm = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                    bi = tl.full([BLOCK_M], 1 << 30, dtype=tl.int32)
                    for c0 in range(0, C, BLOCK_C):
                        s = _gate_scores(q_rows, valid, km_ptr, km_base, c0, offs_c, C, D, BLOCK_D, KCH, UPCAST, PREC)
                        idx = c0 + offs_c
                        g = (s - lo[:, None]) / den[:, None]
                        m, i = _gate_next(g, idx, ((idx < C) & (idx != own))[None, :], cv, ci)
                        better = (m > bm) | ((m == bm) & (i < bi))
                        bm = tl.where(better, m, bm)
                        bi = tl.where(better, i, bi)
                    take = (~done) & (bm > float("-inf"))
                    cv = tl.where(take, bm, cv)
                    ci = tl.where(take, bi, ci)
                    cum += tl.where(take, bm, 0.0)
                    done = done | (cum / total >= remain)
                    step += 1
        else:
            if one_chunk:
                s = _gate_scores(q_rows, valid, km_ptr, km_base, 0, offs_c, C, D, BLOCK_D, KCH, UPCAST, PREC)
                cand = ((offs_c < C) & (offs_c != own))[None, :]
                for _ in range(n_pick):
                    cv, ci = _gate_next(s, offs_c, cand, cv, ci)
            else:
                for _ in range(n_pick):
                    bm = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
                    bi = tl.full([BLOCK_M], 1 << 30, dtype=tl.int32)
                    for c0 in range(0, C, BLOCK_C):
                        s = _gate_scores(q_rows, valid, km_ptr, km_base, c0, offs_c, C, D, BLOCK_D, KCH, UPCAST, PREC)
                        idx = c0 + offs_c
                        m, i = _gate_next(s, idx, ((idx < C) & (idx != own))[None, :], cv, ci)
                        better = (m > bm) | ((m == bm) & (i < bi))
                        bm = tl.where(better, m, bm)
                        bi = tl.where(better, i, bi)
                    cv = bm
                    ci = bi
        tl.store(cut_rows + offs_m * 3, cv)
        tl.store(cut_rows + offs_m * 3 + 1, lo)
        tl.store(cut_rows + offs_m * 3 + 2, den)
        tl.store(cut_idx_ptr + bh * n_slots + offs_m, ci)
    tl.debug_barrier()  # pass 2 reads the cuts other threads of this program wrote
    offs_w = tl.arange(0, BLOCK_C // 32)
    for c0 in range(0, C, BLOCK_C):
        idx = c0 + offs_c
        cm = idx < C
        any_acc = tl.zeros([BLOCK_C], dtype=tl.int32)
        all_acc = tl.full([BLOCK_C], 1, dtype=tl.int32)
        for r in range(0, kblock, BLOCK_M):
            offs_m = tile * kblock + r + tl.arange(0, BLOCK_M)
            tok = tl.load(slot_token_ptr + offs_m)
            valid = tl.load(slot_valid_ptr + offs_m) != 0
            q_rows = q_ptr + b * stride_qb + (img_off + tok)[:, None] * stride_qs + h * stride_qh
            s = _gate_scores(q_rows, valid, km_ptr, km_base, c0, offs_c, C, D, BLOCK_D, KCH, UPCAST, PREC)
            cv = tl.load(cut_rows + offs_m * 3)
            lo = tl.load(cut_rows + offs_m * 3 + 1)
            den = tl.load(cut_rows + offs_m * 3 + 2)
            ci = tl.load(cut_idx_ptr + bh * n_slots + offs_m)
            g = (s - lo[:, None]) / den[:, None]
            taken = (g > cv[:, None]) | ((g == cv[:, None]) & (idx[None, :] <= ci[:, None]))
            sel = cm[None, :] & ((idx == own)[None, :] | taken)
            bitvals = tl.where(sel, 1 << (offs_c % 32)[None, :], 0)
            words = tl.sum(tl.reshape(bitvals, [BLOCK_M, BLOCK_C // 32, 32]), 2)
            words = tl.where(valid[:, None], words, 0)
            w_idx = c0 // 32 + offs_w
            tl.store(bits_ptr + bh * n_slots * n_words + offs_m[:, None] * n_words + w_idx[None, :], words,
                     mask=(w_idx < n_words)[None, :])
            sel_i = sel.to(tl.int32)
            any_acc = tl.maximum(any_acc, tl.max(tl.where(valid[:, None], sel_i, 0), 0))
            all_acc = tl.minimum(all_acc, tl.min(tl.where(valid[:, None], sel_i, 1), 0))
        base = (bh * n_tiles + tile) * C
        tl.store(any_ptr + base + idx, any_acc.to(tl.int8), mask=cm)
        tl.store(all_ptr + base + idx, all_acc.to(tl.int8), mask=cm)


def _gate_fused(q, k, geo, part, topk, threshold):
    """``(any_sel, all_sel, bits)`` of every image query tile from the fused Triton gate kernel:
    bool ``[B, H, n_tiles, C]`` twice and int32 ``[B, H, slots, words]``."""
    layout = geo.layout
    B, _, H, D = q.shape
    N, C = part.n_tokens, part.n_blocks
    ni, kblock = geo.n_img_kb, layout.block
    img, _ = image_slices(N, layout.text_len, layout.text_first)
    # the mean keys in q's dtype, as the reference rounds them (moba_select.moba_gate)
    kmean = gate_means(k[:, img], part).to(q.dtype).contiguous()  # [B, H, C, D]
    words = (C + 31) // 32
    bits = torch.zeros(B, H, layout.num_slots, words, dtype=torch.int32, device=q.device)
    any_sel = torch.empty(B, H, ni, C, dtype=torch.int8, device=q.device)
    all_sel = torch.empty_like(any_sel)
    cut = torch.empty(B * H, layout.num_slots, 3, dtype=torch.float32, device=q.device)
    cut_idx = torch.empty(B * H, layout.num_slots, dtype=torch.int32, device=q.device)
    n_pick = min(int(topk), C) - 1 if threshold is None else 0  # never more steps than other blocks
    arch = cuda_arch(q.device)
    cfg = gate_launch(arch, q.dtype, D)
    block_d = max(16, triton.next_power_of_2(D))
    # fp32 products run on FMAs, whose operands sit in registers: a head-dim piece of 8 at a time
    _moba_gate_kernel[(ni, B * H)](
        q, kmean, geo.slot_token, geo.slot_valid.to(torch.int8), geo.kb_mb, bits, any_sel, all_sel, cut, cut_idx,
        float(threshold if threshold is not None else 0.0), q.stride(0), q.stride(1), q.stride(2), img.start,
        H, C, D, layout.num_slots, words, ni, kblock, n_pick,
        THRESH=threshold is not None, BLOCK_M=cfg.block, BLOCK_C=cfg.sub, BLOCK_D=block_d,
        KCH=min(block_d, 128) if q.dtype != torch.float32 else min(block_d, 8), UPCAST=arch is None, PREC="ieee",
        **cfg.options(arch),
    )
    return any_sel.bool(), all_sel.bool(), bits


def moba_tables(q, k, geo, part, topk, threshold, selection, fused=None):
    """Per batch*head block tables and selection bits of one call:
    ``(visit, full)`` bool ``[B*H, n_blocks, n_blocks]`` and bits int32 ``[B*H, slots, words]``.

    ``fused`` (default: per-query selection with at most :data:`GATE_MAX_BLOCKS` blocks): gate and
    selection in the Triton gate kernel, without materialising the ``[B, H, N, n_blocks]`` gate; else
    torch ops (``moba_ref.select_blocks``)."""
    layout = geo.layout
    B, _, H, _ = q.shape
    N, C = part.n_tokens, part.n_blocks
    nb, ni, kblock = layout.n_blocks, geo.n_img_kb, layout.block
    dense = layout.blk_dense
    visit = torch.ones(B, H, nb, nb, dtype=torch.bool, device=q.device)
    full = dense.expand(B, H, nb, nb).clone()
    if fused is None:
        fused = selection == "query" and C <= GATE_MAX_BLOCKS
    if fused:
        if selection != "query":
            raise ValueError(f"the fused gate kernel makes per-query selections, not selection={selection!r}")
        any_sel, all_sel, bits = _gate_fused(q, k, geo, part, topk, threshold)
        visit[:, :, :ni, :ni] = any_sel[..., geo.kb_mb]
        full[:, :, :ni, :ni] = all_sel[..., geo.kb_mb] & dense[:ni]
        return visit.view(B * H, nb, nb), full.view(B * H, nb, nb), bits.view(B * H, layout.num_slots, -1)
    img, _ = image_slices(N, layout.text_len, layout.text_first)
    bits = torch.zeros(B, H, layout.num_slots, (C + 31) // 32, dtype=torch.int32, device=q.device)
    valid = geo.slot_valid.view(ni, kblock, 1)
    chunk = max(1, _SEL_BUDGET // max(B * N * C, 1))
    for h0 in range(0, H, chunk):
        h1 = min(H, h0 + chunk)
        sel = select_blocks(q[:, img, h0:h1], k[:, img, h0:h1], part, topk, threshold, selection)  # [B, h, N, C]
        per_slot = sel[:, :, geo.slot_token].view(B, h1 - h0, ni, kblock, C)
        any_sel = (per_slot & valid).any(3)  # [B, h, ni, C]: some query of the tile selected the block
        all_sel = (per_slot | ~valid).all(3)  # every query of the tile selected it
        visit[:, h0:h1, :ni, :ni] = any_sel[..., geo.kb_mb]
        full[:, h0:h1, :ni, :ni] = all_sel[..., geo.kb_mb] & dense[:ni]
        bits[:, h0:h1, :ni * kblock] = pack_bits(sel)[:, :, geo.slot_token] * geo.slot_valid[:, None]
    return visit.view(B * H, nb, nb), full.view(B * H, nb, nb), bits.view(B * H, layout.num_slots, -1)


def table_sizes(grid, block, text_len, kblock):
    """``(kernel blocks, slots, selection words)`` of a geometry, by arithmetic alone (for fake tensors).
    ``block`` clamped to ``grid``."""
    per_axis = []
    for n, b in zip(grid, block):
        sizes = {b: n // b}
        if n % b:
            sizes[n % b] = sizes.get(n % b, 0) + 1
        per_axis.append(sizes.items())
    n_img = 0
    n_moba = 1
    for n, b in zip(grid, block):
        n_moba *= -(-n // b)
    for combo in itertools.product(*per_axis):
        size = math.prod(s for s, _ in combo)
        count = math.prod(c for _, c in combo)
        n_img += count * -(-size // kblock)
    nb = n_img + -(-text_len // kblock)
    return nb, nb * kblock, -(-n_moba // 32)


def gate_tables(q, k, grid, block, topk, threshold, selection, text_len, text_first, kblock):
    """The gate, selection and static-width block tables of one call (everything but the attention):
    ``(tables, bits)`` for ``sparse_attn_dyn_fwd``.  ``block`` clamped to ``grid``."""
    part = block_partition(grid, block, q.device)
    geo = moba_geometry(grid, block, text_len, text_first, kblock, str(q.device))
    visit, full, bits = moba_tables(q, k, geo, part, topk, threshold, selection)
    return dynamic_tables(visit, full, static_width=True), bits


_SELECTION_CODES = {"query": 0, "tile": 1, "head": 2}


def _params(ints):
    nd = ints[0]
    grid, block = tuple(ints[1:1 + nd]), tuple(ints[1 + nd:1 + 2 * nd])
    text_len, text_first, topk, selection, kblock = ints[1 + 2 * nd:]
    return grid, block, text_len, bool(text_first), (topk if topk > 0 else None), \
        list(_SELECTION_CODES)[selection], kblock


@torch.library.custom_op("diffaccel::moba_attn_fwd", mutates_args=())
def moba_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ints: List[int], threshold: float,
                  scale: float) -> List[torch.Tensor]:
    """Gate, selection, block tables and block-sparse attention in one opaque op:
    ``[out, lse, kv_idx, kv_cnt, kv_full, q_idx, q_cnt, q_full, bits]`` (the tables are kept for the
    backward).  ``ints``: ``[ndim, *grid, *block, text_len, text_first, topk (0: threshold), selection
    code, kernel block]``."""
    grid, block, text_len, text_first, topk, selection, kblock = _params(ints)
    tables, bits = gate_tables(q, k, grid, block, topk, None if topk else threshold, selection, text_len,
                               text_first, kblock)
    out, lse = sparse_attn_dyn_fwd(q, k, v, *tables, bits, "moba", _encode(grid, block, text_len, text_first), [],
                                   scale, kblock)
    return [out, lse, *tables, bits]


@moba_attn_fwd.register_fake
def _(q, k, v, ints, threshold, scale):
    grid, block, text_len, text_first, topk, selection, kblock = _params(ints)
    B, S, H, D = q.shape
    nb, slots, words = table_sizes(grid, block, text_len, kblock)
    BH = B * H

    def i32(*shape):
        return q.new_empty(shape, dtype=torch.int32)

    tables = [i32(BH, nb, nb), i32(BH, nb), i32(BH, nb, nb), i32(BH, nb, nb), i32(BH, nb), i32(BH, nb, nb)]
    return [torch.empty_like(q), q.new_empty((B, H, S), dtype=torch.float32), *tables, i32(BH, slots, words)]


def _moba_setup_context(ctx, inputs, output):
    q, k, v, ints, threshold, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    grid, block, text_len, text_first, _, _, kblock = _params(ints)
    ctx.args = ("moba", _encode(grid, block, text_len, text_first), [], scale, kblock)


def _moba_backward(ctx, grads):
    q, k, v, o, lse, *tables = ctx.saved_tensors
    dq, dk, dv = sparse_attn_dyn_bwd(grads[0], q, k, v, o, lse, *tables, *ctx.args)
    return dq, dk, dv, None, None, None


moba_attn_fwd.register_autograd(_moba_backward, setup_context=_moba_setup_context)


class _FixedTables(torch.autograd.Function):
    """Block-sparse attention over given MoBA tables (the non-finite path of :func:`moba_triton`)."""

    @staticmethod
    def forward(ctx, q, k, v, tables, args):
        out, lse = sparse_attn_dyn_fwd(q, k, v, *tables, *args)
        ctx.save_for_backward(q, k, v, out, lse, *tables)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *tables = ctx.saved_tensors
        dq, dk, dv = sparse_attn_dyn_bwd(do, q, k, v, o, lse, *tables, *ctx.args)
        return dq, dk, dv, None, None


def moba_triton(q, k, v, grid, block, topk, threshold, selection, text_len, text_first, scale, kblock=None):
    """Mixture of block attention on the Triton core (validated arguments, see ``ops.moba_attention``):
    one custom op (:func:`moba_attn_fwd`), so ``torch.compile(fullgraph=True)`` sees no graph break.
    ``kblock``: kernel block size (default :func:`kernel_block`).  Non-finite inputs (checked outside
    ``torch.compile``) take a second pass that keeps them inside the pattern (``nonfinite``'s rule)."""
    grid = tuple(int(g) for g in grid)
    block = tuple(min(int(b), n) for b, n in zip(block, grid))
    kblock = int(kblock or kernel_block(block, q))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    ints = [len(grid), *grid, *block, int(text_len), int(bool(text_first)), int(topk or 0),
            _SELECTION_CODES[selection], kblock]
    threshold = float(threshold if threshold is not None else -1.0)
    if unchecked_or_finite(q, k, v):
        return moba_attn_fwd(q, k, v, ints, threshold, scale)[0]
    # non-finite inputs (``nonfinite``'s rule, as the torch backend): select with them (the gate contains
    # them), attend to cleaned copies over those tables, and mark as NaN the outputs whose selected blocks (or
    # the text) hold a bad key or value: a second pass over the same tables with zero queries and keys
    # (uniform weights over every visible key) and values 1 where an input is bad
    with torch.no_grad():
        tables, bits = gate_tables(q, k, grid, block, topk, None if topk else threshold, selection, text_len,
                                   text_first, kblock)
    args = ("moba", _encode(grid, block, text_len, text_first), [], scale, kblock)
    out = _FixedTables.apply(clean(q), clean(k), clean(v), (*tables, bits), args)
    with torch.no_grad():
        zeros = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        seen, _ = sparse_attn_dyn_fwd(zeros, zeros, nonfinite_marks(k, v), *tables, bits, *args)
    return nan_rows(out.masked_fill(seen > 0, float("nan")), q)
