"""The block-sparse FlashAttention core shared by every sparse pattern.

Queries and keys live in *slot order* (see ``tiling.py``): blocks of ``BLOCK``
slots.  A pattern describes itself with

* a block table: for every query block the key blocks to visit
  (``kv_idx[m, :kv_cnt[m]]``) and whether each needs an element mask
  (``kv_full == 0``), plus its transpose for the backward pass;
* per-slot metadata read only on partial blocks: slot flags (image / text /
  pad / extra), integer query bounds ``qlo``/``qhi`` and key positions ``kpos``
  (``[S, 3]`` int32) and a float ``r2``.  ``MODE`` selects the element test:
  ``MODE_BOX``: ``qlo <= kpos <= qhi`` on every axis (neighborhood windows);
  ``MODE_CIRCLE``: ``sum((kpos - qlo)^2) < r2`` (CLEAR's circular window);
  ``MODE_NONE``: only the flag rules;
  ``MODE_SELECT``: a data-dependent selection (mixture of block attention):
  ``kpos[:, 0]`` is the id of each key slot's block and a per (batch*head)
  bit table ``sel[bh, query slot, id // 32] >> (id % 32) & 1`` says whether
  that query selected it.

Flag rules (every mode): pad keys are never visible; text keys are visible to
every query; image keys are visible to text queries; extra keys (pooled
tokens) are visible to image queries only; image keys are visible to image
queries where the mode's test passes.

Kernels: forward (online softmax, fp32 accumulation, log-sum-exp saved) and a
FlashAttention-2 backward (dK/dV over the transposed table, dQ over the
forward table).  A program owns ``ROWS`` rows of one block (all of it, or a
part: fewer accumulator registers) and streams the blocks of its table row in
``SUB``-slot pieces; tiles, ``num_warps`` and ``num_stages`` come from
``launch.attention_launch`` per (architecture, dtype, head dim).  They are
registered as torch custom ops so ``torch.compile`` treats them as single nodes.

Block tables are either static (one table for every batch*head, built by a
cached planner from the geometry: :func:`sparse_attention`) or dynamic (one
table per batch*head, computed from the data on every call:
:func:`sparse_attention_dynamic`, built with :func:`dynamic_tables`); the
kernels read both through a per batch*head table stride (0 when static).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch import attention_block, attention_launch, cuda_arch
from .tiling import EXTRA, IMAGE, PAD, TEXT

MODE_NONE, MODE_BOX, MODE_CIRCLE, MODE_SELECT = 0, 1, 2, 3
PAD_FLAG = PAD
# the slot flags of tiling.py as kernel constants
_IMAGE_FLAG = tl.constexpr(IMAGE)
_TEXT_FLAG = tl.constexpr(TEXT)
_EXTRA_FLAG = tl.constexpr(EXTRA)


@triton.jit
def _visible(offs_m, offs_n, QFLAG, KFLAG, QLO, QHI, KPOS, r2, SEL, sel_off, SEL_W, MODE: tl.constexpr):
    qf = tl.load(QFLAG + offs_m)[:, None]
    kf = tl.load(KFLAG + offs_n)[None, :]
    vis = (kf == _TEXT_FLAG) | ((kf == _EXTRA_FLAG) & (qf == _IMAGE_FLAG)) | ((kf == _IMAGE_FLAG) & (qf == _TEXT_FLAG))
    img = (kf == _IMAGE_FLAG) & (qf == _IMAGE_FLAG)
    if MODE == 1:
        # every axis: the planner gives unused axes an unbounded box
        for a in tl.static_range(3):
            lo = tl.load(QLO + offs_m * 3 + a)[:, None]
            hi = tl.load(QHI + offs_m * 3 + a)[:, None]
            kp = tl.load(KPOS + offs_n * 3 + a)[None, :]
            img = img & (kp >= lo) & (kp <= hi)
        vis = vis | img
    elif MODE == 2:
        # every axis: unused axes hold the same sentinel for queries and keys (distance 0)
        dist = tl.zeros(img.shape, dtype=tl.float32)
        for a in tl.static_range(3):
            qc = tl.load(QLO + offs_m * 3 + a)[:, None]
            kp = tl.load(KPOS + offs_n * 3 + a)[None, :]
            dd = (kp - qc).to(tl.float32)
            dist += dd * dd
        vis = vis | (img & (dist < r2))
    elif MODE == 3:
        kb = tl.maximum(tl.load(KPOS + offs_n * 3), 0)[None, :]
        word = tl.load(SEL + sel_off + offs_m[:, None] * SEL_W + kb // 32, mask=img, other=0)
        vis = vis | (img & (((word >> (kb % 32)) & 1) != 0))
    return vis


@triton.jit
def _load_tile(PTR, base, offs, stride, offs_d, dmask, UPCAST: tl.constexpr):
    """A [rows, BLOCK_D] tile of one (batch, head); fp32 when UPCAST (see ``_upcast``)."""
    x = tl.load(PTR + base + offs[:, None] * stride + offs_d[None, :], mask=dmask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _bs_fwd_kernel(Q, K, V, O, LSE, KV_IDX, KV_CNT, KV_FULL, QFLAG, KFLAG, QLO, QHI, KPOS, SEL,
                   sm_scale, r2, s_tab, s_cnt, s_sel, SEL_W,
                   s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
                   H, SQ, MAXK, D,
                   BLOCK: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr,
                   MODE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """ROWS query slots of one query block (of BLOCK slots); every key block of the block's table row
    in SUB-slot pieces."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = pid // (BLOCK // ROWS)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < D)[None, :]
    q = _load_tile(Q, b * s_qb + h * s_qh, offs_m, s_qs, offs_d, dmask, UPCAST)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    cnt = tl.load(KV_CNT + pid_bh * s_cnt + pid_m)
    for t in range(0, cnt * (BLOCK // SUB)):
        j = t // (BLOCK // SUB)
        kb = tl.load(KV_IDX + pid_bh * s_tab + pid_m * MAXK + j)
        full = tl.load(KV_FULL + pid_bh * s_tab + pid_m * MAXK + j)
        offs_n = kb * BLOCK + (t % (BLOCK // SUB)) * SUB + tl.arange(0, SUB)
        k = _load_tile(K, b * s_kb + h * s_kh, offs_n, s_ks, offs_d, dmask, UPCAST)
        v = _load_tile(V, b * s_vb + h * s_vh, offs_n, s_vs, offs_d, dmask, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if full == 0:
            vis = _visible(offs_m, offs_n, QFLAG, KFLAG, QLO, QHI, KPOS, r2, SEL, pid_bh * s_sel, SEL_W, MODE)
            qk = tl.where(vis, qk, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :], acc.to(O.dtype.element_ty), mask=dmask)
    # rows that saw no key (padding slots) get lse=+inf so the backward gives them zero probability
    tl.store(LSE + pid_bh * SQ + offs_m, tl.where(m_i > -1.0e29, m_i + tl.log2(l_i), float("inf")))


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, qk_scale, full, offs_m, offs_n, QFLAG, KFLAG, QLO, QHI, KPOS, r2,
                       SEL, sel_off, SEL_W, MODE: tl.constexpr, PREC: tl.constexpr):
    """Backward of one (query tile, key tile) pair: recomputed probabilities P and dS = P * (dP - delta)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.exp2(qk - lse[:, None])
    if full == 0:
        vis = _visible(offs_m, offs_n, QFLAG, KFLAG, QLO, QHI, KPOS, r2, SEL, sel_off, SEL_W, MODE)
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def _bs_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, Q_IDX, Q_CNT, Q_FULL, QFLAG, KFLAG, QLO, QHI, KPOS, SEL,
                        sm_scale, r2, s_tab, s_cnt, s_sel, SEL_W,
                        s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
                        H, SQ, MAXQ, D,
                        BLOCK: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr,
                        MODE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """ROWS key slots of one key block (of BLOCK slots); every query block of the block's (transposed)
    table row in SUB-slot pieces."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_n = pid // (BLOCK // ROWS)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < D)[None, :]
    k = _load_tile(K, b * s_kb + h * s_kh, offs_n, s_ks, offs_d, dmask, UPCAST)
    v = _load_tile(V, b * s_vb + h * s_vh, offs_n, s_vs, offs_d, dmask, UPCAST)
    dk = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    cnt = tl.load(Q_CNT + pid_bh * s_cnt + pid_n)
    for t in range(0, cnt * (BLOCK // SUB)):
        i = t // (BLOCK // SUB)
        qb = tl.load(Q_IDX + pid_bh * s_tab + pid_n * MAXQ + i)
        full = tl.load(Q_FULL + pid_bh * s_tab + pid_n * MAXQ + i)
        offs_m = qb * BLOCK + (t % (BLOCK // SUB)) * SUB + tl.arange(0, SUB)
        q = _load_tile(Q, b * s_qb + h * s_qh, offs_m, s_qs, offs_d, dmask, UPCAST)
        do = _load_tile(DO, b * s_db + h * s_dh, offs_m, s_ds, offs_d, dmask, UPCAST)
        lse = tl.load(LSE + pid_bh * SQ + offs_m)
        delta = tl.load(DELTA + pid_bh * SQ + offs_m)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, qk_scale, full, offs_m, offs_n, QFLAG, KFLAG, QLO, QHI,
                                   KPOS, r2, SEL, pid_bh * s_sel, SEL_W, MODE, PREC)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    dk = dk * sm_scale
    tl.store(DK + b * s_kb + h * s_kh + offs_n[:, None] * s_ks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=dmask)
    tl.store(DV + b * s_vb + h * s_vh + offs_n[:, None] * s_vs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=dmask)


@triton.jit
def _bs_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KV_IDX, KV_CNT, KV_FULL, QFLAG, KFLAG, QLO, QHI, KPOS, SEL,
                      sm_scale, r2, s_tab, s_cnt, s_sel, SEL_W,
                      s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
                      H, SQ, MAXK, D,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr,
                      MODE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """ROWS query slots of one query block (of BLOCK slots); every key block of the block's table row
    in SUB-slot pieces."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_m = pid // (BLOCK // ROWS)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = (offs_d < D)[None, :]
    q = _load_tile(Q, b * s_qb + h * s_qh, offs_m, s_qs, offs_d, dmask, UPCAST)
    do = _load_tile(DO, b * s_db + h * s_dh, offs_m, s_ds, offs_d, dmask, UPCAST)
    lse = tl.load(LSE + pid_bh * SQ + offs_m)
    delta = tl.load(DELTA + pid_bh * SQ + offs_m)
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    cnt = tl.load(KV_CNT + pid_bh * s_cnt + pid_m)
    for t in range(0, cnt * (BLOCK // SUB)):
        j = t // (BLOCK // SUB)
        kb = tl.load(KV_IDX + pid_bh * s_tab + pid_m * MAXK + j)
        full = tl.load(KV_FULL + pid_bh * s_tab + pid_m * MAXK + j)
        offs_n = kb * BLOCK + (t % (BLOCK // SUB)) * SUB + tl.arange(0, SUB)
        k = _load_tile(K, b * s_kb + h * s_kh, offs_n, s_ks, offs_d, dmask, UPCAST)
        v = _load_tile(V, b * s_vb + h * s_vh, offs_n, s_vs, offs_d, dmask, UPCAST)
        p, ds = _probs_and_dscores(q, k, v, do, lse, delta, qk_scale, full, offs_m, offs_n, QFLAG, KFLAG, QLO, QHI,
                                   KPOS, r2, SEL, pid_bh * s_sel, SEL_W, MODE, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    dq = dq * sm_scale
    tl.store(DQ + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=dmask)


def _prec(dtype):
    # fp32 inputs: fp32 FMA products ("tf32x3" spills at every tile size, see launch.py); 16-bit: ignored
    return "ieee"


def _upcast(arch, dtype):
    # Triton 3.9's CPU interpreter computes bf16 tl.dot wrongly; upcast tiles to fp32 there only.
    return arch is None and dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# plans: the block tables + slot metadata of one pattern on one geometry
# ---------------------------------------------------------------------------------------------

@dataclass
class BlockPlan:
    """Everything the kernels need about a pattern, on one device."""

    kv_idx: torch.Tensor
    kv_cnt: torch.Tensor
    kv_full: torch.Tensor
    q_idx: torch.Tensor
    q_cnt: torch.Tensor
    q_full: torch.Tensor
    qflag: torch.Tensor
    kflag: torch.Tensor
    qlo: torch.Tensor
    qhi: torch.Tensor
    kpos: torch.Tensor
    mode: int
    ndim: int
    block: int
    r2: float = 0.0

    @property
    def density(self):
        """Fraction of (query block, key block) pairs visited."""
        return float(self.kv_cnt.sum()) / (self.kv_cnt.numel() * self.q_cnt.numel())


def tables_from_matrix(visit, full, device):
    """Padded row tables (+ transposed ones) from block-level bool matrices ``[nQ, nK]``."""

    def rows(mat, fl):
        cnt = mat.sum(1)
        width = max(int(cnt.max()) if cnt.numel() else 0, 1)
        order = torch.argsort((~mat).to(torch.int8), dim=1, stable=True)[:, :width]
        fl_rows = torch.gather(fl, 1, order) & (torch.arange(width)[None, :] < cnt[:, None])
        return (order.to(torch.int32).contiguous().to(device), cnt.to(torch.int32).to(device),
                fl_rows.to(torch.int32).contiguous().to(device))

    kv = rows(visit, full & visit)
    qv = rows(visit.t().contiguous(), (full & visit).t().contiguous())
    return kv + qv


# ---------------------------------------------------------------------------------------------
# planners: pattern name -> (layout, plan, number of extra key tokens) from plain ints/floats
# ---------------------------------------------------------------------------------------------

_PLANNERS = {}


def register_planner(name):
    """Register ``fn(ints: tuple, floats: tuple, block: int, device) -> (TileLayout, BlockPlan)``."""

    def deco(fn):
        _PLANNERS[name] = functools.lru_cache(maxsize=64)(fn)
        return fn

    return deco


def get_plan(pattern, ints, floats, block, device):
    if pattern not in _PLANNERS:
        raise ValueError(f"unknown block-sparse pattern {pattern!r}")
    return _PLANNERS[pattern](tuple(ints), tuple(floats), int(block), str(device))


def _slot_inputs(layout, plan, q, k, v, kx, vx):
    qs = layout.gather(q).contiguous()
    ks, vs = layout.gather(k), layout.gather(v)
    n_key_slots = plan.kflag.numel()
    if n_key_slots > ks.shape[1]:
        extra = n_key_slots - ks.shape[1]
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, extra - t.shape[1]))  # noqa: E731
        ks = torch.cat([ks, pad(kx)], dim=1)
        vs = torch.cat([vs, pad(vx)], dim=1)
    return qs, ks.contiguous(), vs.contiguous()


def default_block(q):
    """Tile (slots per block) of the patterns for ``q``'s device, dtype and head dim (``launch.py``)."""
    return attention_block(cuda_arch(q.device), q.dtype, q.shape[-1])


# ---------------------------------------------------------------------------------------------
# launchers shared by the static and the dynamic custom ops
# ---------------------------------------------------------------------------------------------

@dataclass
class _Tables:
    """Block tables of one call: static (``*_stride == 0``) or per batch*head, plus the selection bits."""

    kv_idx: torch.Tensor
    kv_cnt: torch.Tensor
    kv_full: torch.Tensor
    q_idx: torch.Tensor
    q_cnt: torch.Tensor
    q_full: torch.Tensor
    sel: torch.Tensor  # int32 [BH, Sq, W] for MODE_SELECT; any int32 tensor otherwise
    kv_stride: int = 0  # per batch*head stride of kv_idx / kv_full
    kv_cnt_stride: int = 0
    q_stride: int = 0
    q_cnt_stride: int = 0
    sel_stride: int = 0
    sel_words: int = 1

    @staticmethod
    def static(plan):
        return _Tables(plan.kv_idx, plan.kv_cnt, plan.kv_full, plan.q_idx, plan.q_cnt, plan.q_full, plan.kv_cnt)

    @staticmethod
    def dynamic(kv_idx, kv_cnt, kv_full, q_idx, q_cnt, q_full, sel):
        return _Tables(kv_idx, kv_cnt, kv_full, q_idx, q_cnt, q_full, sel,
                       kv_stride=kv_idx.shape[1] * kv_idx.shape[2], kv_cnt_stride=kv_cnt.shape[1],
                       q_stride=q_idx.shape[1] * q_idx.shape[2], q_cnt_stride=q_cnt.shape[1],
                       sel_stride=sel.shape[1] * sel.shape[2], sel_words=sel.shape[2])


def _run_fwd(layout, plan, tabs, q, k, v, kx, vx, scale, block):
    qs, ks, vs = _slot_inputs(layout, plan, q, k, v, kx, vx)
    B, SQ, H, D = qs.shape
    o = torch.empty_like(qs)
    lse = torch.empty((B, H, SQ), device=q.device, dtype=torch.float32)
    arch = cuda_arch(q.device)
    cfg = attention_launch(arch, q.dtype, D, "fwd", block)
    _bs_fwd_kernel[(SQ // cfg.rows, B * H)](
        qs, ks, vs, o, lse, tabs.kv_idx, tabs.kv_cnt, tabs.kv_full, plan.qflag, plan.kflag, plan.qlo, plan.qhi,
        plan.kpos, tabs.sel, scale, plan.r2, tabs.kv_stride, tabs.kv_cnt_stride, tabs.sel_stride, tabs.sel_words,
        qs.stride(0), qs.stride(1), qs.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, SQ, tabs.kv_idx.shape[-1], D,
        BLOCK=block, ROWS=cfg.rows, SUB=cfg.sub, BLOCK_D=max(16, triton.next_power_of_2(D)), MODE=plan.mode,
        PREC=_prec(q.dtype), UPCAST=_upcast(arch, q.dtype), **cfg.options(arch),
    )
    return layout.scatter(o), lse.index_select(2, layout.inv)


def _run_bwd(layout, plan, tabs, do, q, k, v, kx, vx, o, lse, scale, block):
    qs, ks, vs = _slot_inputs(layout, plan, q, k, v, kx, vx)
    valid = (layout.flag != PAD_FLAG)
    dos = (layout.gather(do) * valid[None, :, None, None]).contiguous()
    os_ = layout.gather(o)
    lses = torch.where(valid[None, None, :], lse.index_select(2, layout.perm), float("inf")).contiguous()
    delta = (dos.float() * os_.float()).sum(-1).transpose(1, 2).contiguous()
    B, SQ, H, D = qs.shape
    dq, dk, dv = torch.empty_like(qs), torch.empty_like(ks), torch.empty_like(vs)
    arch = cuda_arch(q.device)
    common = dict(BLOCK=block, BLOCK_D=max(16, triton.next_power_of_2(D)), MODE=plan.mode, PREC=_prec(q.dtype),
                  UPCAST=_upcast(arch, q.dtype))

    dkdv = attention_launch(arch, q.dtype, D, "dkdv", block)
    dqc = attention_launch(arch, q.dtype, D, "dq", block)

    strides = (qs.stride(0), qs.stride(1), qs.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
               vs.stride(0), vs.stride(1), vs.stride(2), dos.stride(0), dos.stride(1), dos.stride(2))
    meta = (plan.qflag, plan.kflag, plan.qlo, plan.qhi, plan.kpos, tabs.sel, scale, plan.r2)
    _bs_bwd_dkdv_kernel[(ks.shape[1] // dkdv.rows, B * H)](
        qs, ks, vs, dos, lses, delta, dk, dv, tabs.q_idx, tabs.q_cnt, tabs.q_full, *meta,
        tabs.q_stride, tabs.q_cnt_stride, tabs.sel_stride, tabs.sel_words,
        *strides, H, SQ, tabs.q_idx.shape[-1], D, **common, ROWS=dkdv.rows, SUB=dkdv.sub, **dkdv.options(arch))
    _bs_bwd_dq_kernel[(SQ // dqc.rows, B * H)](
        qs, ks, vs, dos, lses, delta, dq, tabs.kv_idx, tabs.kv_cnt, tabs.kv_full, *meta,
        tabs.kv_stride, tabs.kv_cnt_stride, tabs.sel_stride, tabs.sel_words,
        *strides, H, SQ, tabs.kv_idx.shape[-1], D, **common, ROWS=dqc.rows, SUB=dqc.sub, **dqc.options(arch))
    n = layout.num_slots
    grads = [layout.scatter(dq), layout.scatter(dk[:, :n]), layout.scatter(dv[:, :n])]
    if kx is not None:
        grads += [dk[:, n:n + kx.shape[1]], dv[:, n:n + kx.shape[1]]]
    return grads


# ---------------------------------------------------------------------------------------------
# torch custom ops: one opaque node each for torch.compile (static shapes: token order in and out)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("diffaccel::sparse_attn_fwd", mutates_args=())
def sparse_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kx: Optional[torch.Tensor],
                    vx: Optional[torch.Tensor], pattern: str, ints: List[int], floats: List[float], scale: float,
                    block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    layout, plan = get_plan(pattern, ints, floats, block, q.device)
    return _run_fwd(layout, plan, _Tables.static(plan), q, k, v, kx, vx, scale, block)


@sparse_attn_fwd.register_fake
def _(q, k, v, kx, vx, pattern, ints, floats, scale, block):
    B, S, H, D = q.shape
    return torch.empty_like(q), q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("diffaccel::sparse_attn_bwd", mutates_args=())
def sparse_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kx: Optional[torch.Tensor],
                    vx: Optional[torch.Tensor], o: torch.Tensor, lse: torch.Tensor, pattern: str, ints: List[int],
                    floats: List[float], scale: float, block: int) -> List[torch.Tensor]:
    layout, plan = get_plan(pattern, ints, floats, block, q.device)
    return _run_bwd(layout, plan, _Tables.static(plan), do, q, k, v, kx, vx, o, lse, scale, block)


@sparse_attn_bwd.register_fake
def _(do, q, k, v, kx, vx, o, lse, pattern, ints, floats, scale, block):
    grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
    if kx is not None:
        grads += [torch.empty_like(kx), torch.empty_like(vx)]
    return grads


def _setup_context(ctx, inputs, output):
    q, k, v, kx, vx, pattern, ints, floats, scale, block = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, kx, vx, o, lse)
    ctx.args = (pattern, ints, floats, scale, block)


def _backward(ctx, do, dlse):
    q, k, v, kx, vx, o, lse = ctx.saved_tensors
    grads = sparse_attn_bwd(do, q, k, v, kx, vx, o, lse, *ctx.args)
    gkx, gvx = (grads[3], grads[4]) if kx is not None else (None, None)
    return grads[0], grads[1], grads[2], gkx, gvx, None, None, None, None, None


sparse_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def sparse_attention(q, k, v, pattern, ints, floats=(), scale=None, kx=None, vx=None, block=None):
    """Block-sparse attention of ``[B, S, H, D]`` tensors for a registered pattern.

    ``ints``/``floats`` describe the pattern (see its planner); ``kx``/``vx``
    are optional extra key/value tokens ``[B, X, H, D]`` (e.g. pooled tokens).
    Differentiable (Triton backward); one opaque custom op under torch.compile.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    block = int(block or default_block(q))
    out, _ = sparse_attn_fwd(q, k, v, kx, vx, pattern, [int(i) for i in ints], [float(f) for f in floats], scale,
                             block)
    return out


# ---------------------------------------------------------------------------------------------
# dynamic (data-dependent) block tables: one table per batch*head, computed on every call
# ---------------------------------------------------------------------------------------------

def dynamic_tables(visit, full, static_width=False):
    """Per batch*head block tables from block-level bool matrices ``visit``/``full`` ``[BH, nQ, nK]``
    (on the device): ``(kv_idx, kv_cnt, kv_full, q_idx, q_cnt, q_full)``, int32.  Rows are padded to the
    widest row over every batch*head (one host synchronisation), or with ``static_width`` to the full
    ``nK`` / ``nQ`` (shapes known from the inputs' shapes: no synchronisation, traceable)."""

    def rows(mat, fl):
        cnt = mat.sum(-1, dtype=torch.int32)
        if static_width:
            width = mat.shape[-1]
        else:
            width = max(int(cnt.max()) if cnt.numel() else 0, 1)
        order = torch.argsort((~mat).to(torch.int8), dim=-1, stable=True)[..., :width]
        live = torch.arange(width, device=mat.device) < cnt[..., None]
        fl_rows = torch.gather(fl, -1, order) & live
        return order.to(torch.int32).contiguous(), cnt.contiguous(), fl_rows.to(torch.int32).contiguous()

    full = full & visit
    return rows(visit, full) + rows(visit.transpose(1, 2), full.transpose(1, 2))


@torch.library.custom_op("diffaccel::sparse_attn_dyn_fwd", mutates_args=())
def sparse_attn_dyn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_idx: torch.Tensor,
                        kv_cnt: torch.Tensor, kv_full: torch.Tensor, q_idx: torch.Tensor, q_cnt: torch.Tensor,
                        q_full: torch.Tensor, sel: torch.Tensor, pattern: str, ints: List[int], floats: List[float],
                        scale: float, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    layout, plan = get_plan(pattern, ints, floats, block, q.device)
    tabs = _Tables.dynamic(kv_idx, kv_cnt, kv_full, q_idx, q_cnt, q_full, sel)
    return _run_fwd(layout, plan, tabs, q, k, v, None, None, scale, block)


@sparse_attn_dyn_fwd.register_fake
def _(q, k, v, kv_idx, kv_cnt, kv_full, q_idx, q_cnt, q_full, sel, pattern, ints, floats, scale, block):
    B, S, H, D = q.shape
    return torch.empty_like(q), q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("diffaccel::sparse_attn_dyn_bwd", mutates_args=())
def sparse_attn_dyn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, kv_idx: torch.Tensor, kv_cnt: torch.Tensor, kv_full: torch.Tensor,
                        q_idx: torch.Tensor, q_cnt: torch.Tensor, q_full: torch.Tensor, sel: torch.Tensor,
                        pattern: str, ints: List[int], floats: List[float], scale: float,
                        block: int) -> List[torch.Tensor]:
    layout, plan = get_plan(pattern, ints, floats, block, q.device)
    tabs = _Tables.dynamic(kv_idx, kv_cnt, kv_full, q_idx, q_cnt, q_full, sel)
    return _run_bwd(layout, plan, tabs, do, q, k, v, None, None, o, lse, scale, block)


@sparse_attn_dyn_bwd.register_fake
def _(do, q, k, v, o, lse, kv_idx, kv_cnt, kv_full, q_idx, q_cnt, q_full, sel, pattern, ints, floats, scale, block):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _dyn_setup_context(ctx, inputs, output):
    q, k, v, *tables = inputs[:10]
    ctx.save_for_backward(q, k, v, output[0], output[1], *tables)
    ctx.args = inputs[10:]


def _dyn_backward(ctx, do, dlse):
    q, k, v, o, lse, *tables = ctx.saved_tensors
    dq, dk, dv = sparse_attn_dyn_bwd(do, q, k, v, o, lse, *tables, *ctx.args)
    return (dq, dk, dv) + (None,) * 12


sparse_attn_dyn_fwd.register_autograd(_dyn_backward, setup_context=_dyn_setup_context)


def sparse_attention_dynamic(q, k, v, pattern, ints, tables, sel, floats=(), scale=None, block=None):
    """Block-sparse attention with data-dependent block tables, one per batch*head.

    ``pattern``/``ints``/``floats`` name a registered planner that gives the slot
    layout and the static slot metadata (its own block tables are not used);
    ``tables`` is ``dynamic_tables(visit, full)`` for ``visit``/``full``
    ``[B*H, n_blocks, n_blocks]`` (batch-major: row ``b * H + h``); ``sel`` the
    int32 selection bits ``[B*H, slots, words]`` read by ``MODE_SELECT`` on
    partial blocks (any int32 tensor ``[B*H, 1, 1]`` for other modes).
    Differentiable in q, k, v (Triton backward); one custom op under torch.compile.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    block = int(block or default_block(q))
    B, _, H, _ = q.shape
    if any(t.shape[0] != B * H for t in tables) or sel.shape[0] != B * H:
        raise ValueError(f"dynamic tables must have B*H = {B * H} rows")
    out, _ = sparse_attn_dyn_fwd(q, k, v, *tables, sel, pattern, [int(i) for i in ints],
                                 [float(f) for f in floats], scale, block)
    return out
