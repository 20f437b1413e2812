"""Triton kernels for LinFusion's generalized (non-causal) linear attention.

Maths (see :mod:`linear_attention_ref` for the plain definition), per batch
``b`` and head ``h``, with ``phi(x) = elu(x) + 1`` and ``N`` keys::

    S = sum_j phi(k_j) v_j^T / N        z = sum_j phi(k_j) / N
    den_i = phi(q_i) . z + eps          out_i = phi(q_i)^T S / den_i

Forward, two passes:

1. ``_state_kernel``: one pass over k/v.  Program ``(bh, split, d-tile)``
   applies the feature map and accumulates a ``[BLOCK_D, BLOCK_D]`` tile of
   ``S`` and the matching slice of ``z`` over its share of the sequence in fp32,
   scaled by ``1/N`` at the end (fp32 sums of fp16/bf16 products cannot
   overflow; ``phi(k) / N`` itself could be subnormal in fp16).  The per-split
   partial states are summed afterwards.
2. ``_output_kernel``: program ``(bh, q-tile, dv-tile)`` computes
   ``phi(q) S / den``; it also stores ``den`` (fp32, ``[B*H, Sq]``) for the backward.

Backward (``dO`` = grad of out, ``delta_i = dO_i . out_i``)::

    dS   = sum_i phi(q_i) dO_i^T / den_i          dz = -sum_i phi(q_i) delta_i / den_i
    dq_i = phi'(q_i) * (S dO_i / den_i - z delta_i / den_i)
    dk_j = phi'(k_j) * (dS v_j + dz) / N           dv_j = dS^T phi(k_j) / N

in four kernels: ``_delta_kernel``, ``_dstate_kernel`` (same split-and-reduce
shape as the forward state), ``_dq_kernel`` and ``_dkv_kernel``.

Head dims are padded to a multiple of ``BLOCK_D`` (a power of two, >= 16);
padded feature columns are forced to ``phi = 0`` so they contribute nothing.
All tensors are read through their strides (non-contiguous inputs are fine).
Matrix products take their operands in the inputs' dtype (fp16/bf16: tensor
cores; the fp32 features and states are rounded to it) and accumulate in fp32;
fp32 inputs multiply in fp32 (``input_precision="ieee"``).  The feature map
keeps NaN (a NaN query gives a NaN output row, a NaN key NaN everywhere, as the
reference).  Outputs are stored in q's dtype; tiles and launch settings come
from ``launch.linear_launch``.

The kernels are exposed as two ``torch.library`` custom ops
(``diffaccel::linear_attention_fwd`` / ``diffaccel::linear_attention_bwd``)
with ``register_fake`` and ``register_autograd``: autograd works, and
``torch.compile`` traces through them without a graph break.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cuda_arch, linear_launch

_TARGET_PROGRAMS = 264  # ~2 waves on a 132-SM GPU for the split-over-sequence reductions


@triton.jit
def _phi(x):
    # elu(x) + 1; the exponential only sees x <= 0 (no overflow), and NaN stays NaN
    return tl.where(x > 0, x + 1.0, tl.exp(tl.where(x > 0, 0.0, x)))


@triton.jit
def _dphi(x):
    return tl.where(x > 0, 1.0, tl.exp(tl.where(x > 0, 0.0, x)))


@triton.jit
def _load_tile(base, rows, cols, s_stride, d_stride, n_rows, n_cols):
    """A tile in the tensor's own dtype, and its mask."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(base + rows[:, None] * s_stride + cols[None, :] * d_stride, mask=mask, other=0.0)
    return x, mask


@triton.jit
def _operand(x, PTR, EMULATE: tl.constexpr):
    """``x`` as a matrix-product operand: rounded to the dtype of ``PTR``'s elements (the inputs' dtype:
    16-bit inputs run on tensor cores, accumulating in fp32).  ``EMULATE`` (the CPU interpreter, whose
    bf16 products are wrong): kept in fp32 after the rounding, which gives the same products."""
    y = x.to(PTR.dtype.element_ty)
    if EMULATE:
        y = y.to(tl.float32)
    return y


@triton.jit
def _state_kernel(K, V, S_PART, Z_PART,
                  skb, sks, skh, skd, svb, svs, svh, svd,
                  H, N, D, inv_n, tiles_per_split, n_dblk,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_splits = tl.num_programs(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    dk = (pid_d // n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    dv = (pid_d % n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    zacc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = split * tiles_per_split * BLOCK_N
    for t in range(0, tiles_per_split):
        rows = start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        kt, kmask = _load_tile(k_base, rows, dk, sks, skd, N, D)
        fk = tl.where(kmask, _phi(kt.to(tl.float32)), 0.0)
        vt, _ = _load_tile(v_base, rows, dv, svs, svd, N, D)
        acc += tl.dot(tl.trans(_operand(fk, K, EMULATE)), _operand(vt, V, EMULATE), input_precision=PREC)
        zacc += tl.sum(fk, axis=0)
    dp = n_dblk * BLOCK_D
    part = pid_bh.to(tl.int64) * n_splits + split
    # the 1/N after the sums: 16-bit operands keep their precision (phi(k) / N can be subnormal in fp16)
    tl.store(S_PART + (part * dp + dk[:, None]) * dp + dv[None, :], acc * inv_n)
    if pid_d % n_dblk == 0:
        tl.store(Z_PART + part * dp + dk, zacc * inv_n)


@triton.jit
def _output_kernel(Q, S, Z, O, DEN,
                   sqb, sqs, sqh, sqd, sob, sos, soh, sod,
                   H, M, D, eps, n_dblk,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_dv = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    dp = n_dblk * BLOCK_D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dv = pid_dv * BLOCK_D + tl.arange(0, BLOCK_D)
    q_base = Q + b * sqb + h * sqh
    num = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for kb in range(0, n_dblk):
        dk = kb * BLOCK_D + tl.arange(0, BLOCK_D)
        qt, qmask = _load_tile(q_base, rows, dk, sqs, sqd, M, D)
        fq = tl.where(qmask, _phi(qt.to(tl.float32)), 0.0)
        st = tl.load(S + (bh * dp + dk[:, None]) * dp + dv[None, :])
        zt = tl.load(Z + bh * dp + dk)
        num += tl.dot(_operand(fq, Q, EMULATE), _operand(st, Q, EMULATE), input_precision=PREC)
        den += tl.sum(fq * zt[None, :], axis=1)
    den = den + eps
    out = num / den[:, None]
    omask = (rows[:, None] < M) & (dv[None, :] < D)
    o_ptr = O + b * sob + h * soh + rows[:, None] * sos + dv[None, :] * sod
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=omask)
    if pid_dv == 0:
        tl.store(DEN + bh * M + rows, den, mask=rows < M)


@triton.jit
def _delta_kernel(DO, O, DEN, DELTA,
                  sdb, sds, sdh, sdd, sob, sos, soh, sod,
                  H, M, D, n_dblk,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta_i / den_i, where delta_i = dO_i . out_i
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for db in range(0, n_dblk):
        d = db * BLOCK_D + tl.arange(0, BLOCK_D)
        g, _ = _load_tile(DO + b * sdb + h * sdh, rows, d, sds, sdd, M, D)
        o, _ = _load_tile(O + b * sob + h * soh, rows, d, sos, sod, M, D)
        acc += tl.sum(g.to(tl.float32) * o.to(tl.float32), axis=1)
    den = tl.load(DEN + bh * M + rows, mask=rows < M, other=1.0)
    tl.store(DELTA + bh * M + rows, acc / den, mask=rows < M)


@triton.jit
def _dstate_kernel(Q, DO, DEN, DELTA, DS_PART, DZ_PART,
                   sqb, sqs, sqh, sqd, sdb, sds, sdh, sdd,
                   H, M, D, tiles_per_split, n_dblk,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_splits = tl.num_programs(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    dk = (pid_d // n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    dv = (pid_d % n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    zacc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = split * tiles_per_split * BLOCK_M
    for t in range(0, tiles_per_split):
        rows = start + t * BLOCK_M + tl.arange(0, BLOCK_M)
        qt, qmask = _load_tile(Q + b * sqb + h * sqh, rows, dk, sqs, sqd, M, D)
        fq = tl.where(qmask, _phi(qt.to(tl.float32)), 0.0)
        g, _ = _load_tile(DO + b * sdb + h * sdh, rows, dv, sds, sdd, M, D)
        den = tl.load(DEN + bh * M + rows, mask=rows < M, other=1.0)
        dl = tl.load(DELTA + bh * M + rows, mask=rows < M, other=0.0)
        acc += tl.dot(tl.trans(_operand(fq / den[:, None], Q, EMULATE)), _operand(g, DO, EMULATE),
                      input_precision=PREC)
        zacc -= tl.sum(fq * dl[:, None], axis=0)
    dp = n_dblk * BLOCK_D
    part = bh * n_splits + split
    tl.store(DS_PART + (part * dp + dk[:, None]) * dp + dv[None, :], acc)
    if pid_d % n_dblk == 0:
        tl.store(DZ_PART + part * dp + dk, zacc)


@triton.jit
def _dq_kernel(Q, DO, S, Z, DEN, DELTA, DQ,
               sqb, sqs, sqh, sqd, sdb, sds, sdh, sdd, sgb, sgs, sgh, sgd,
               H, M, D, n_dblk,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_dk = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    dp = n_dblk * BLOCK_D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dk = pid_dk * BLOCK_D + tl.arange(0, BLOCK_D)
    g_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for vb in range(0, n_dblk):
        dv = vb * BLOCK_D + tl.arange(0, BLOCK_D)
        g, _ = _load_tile(DO + b * sdb + h * sdh, rows, dv, sds, sdd, M, D)
        st = tl.load(S + (bh * dp + dk[:, None]) * dp + dv[None, :])
        g_acc += tl.dot(_operand(g, DO, EMULATE), tl.trans(_operand(st, DO, EMULATE)), input_precision=PREC)
    den = tl.load(DEN + bh * M + rows, mask=rows < M, other=1.0)
    dl = tl.load(DELTA + bh * M + rows, mask=rows < M, other=0.0)
    zt = tl.load(Z + bh * dp + dk)
    dfq = g_acc / den[:, None] - dl[:, None] * zt[None, :]
    qt, qmask = _load_tile(Q + b * sqb + h * sqh, rows, dk, sqs, sqd, M, D)
    dq = dfq * _dphi(qt.to(tl.float32))
    tl.store(DQ + b * sgb + h * sgh + rows[:, None] * sgs + dk[None, :] * sgd, dq.to(DQ.dtype.element_ty), mask=qmask)


@triton.jit
def _dkv_kernel(K, V, DS, DZ, DK, DV,
                skb, sks, skh, skd, svb, svs, svh, svd, sgb, sgs, sgh, sgd,
                H, N, D, inv_n, n_dblk,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, EMULATE: tl.constexpr):
    # program (bh, key tile, c): c < n_dblk -> dk columns block c, else dv columns block c - n_dblk.
    # DK and DV share the strides (sgb, ...): both are allocated contiguous [B, N, H, D].
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    dp = n_dblk * BLOCK_D
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if pid_c < n_dblk:
        dk = pid_c * BLOCK_D + tl.arange(0, BLOCK_D)
        for vb in range(0, n_dblk):
            dv = vb * BLOCK_D + tl.arange(0, BLOCK_D)
            vt, _ = _load_tile(V + b * svb + h * svh, rows, dv, svs, svd, N, D)
            dst = tl.load(DS + (bh * dp + dk[:, None]) * dp + dv[None, :])
            acc += tl.dot(_operand(vt, V, EMULATE), tl.trans(_operand(dst, V, EMULATE)), input_precision=PREC)
        dzt = tl.load(DZ + bh * dp + dk)
        kt, kmask = _load_tile(K + b * skb + h * skh, rows, dk, sks, skd, N, D)
        gk = (acc + dzt[None, :]) * inv_n * _dphi(kt.to(tl.float32))
        tl.store(DK + b * sgb + h * sgh + rows[:, None] * sgs + dk[None, :] * sgd,
                 gk.to(DK.dtype.element_ty), mask=kmask)
    else:
        dv = (pid_c - n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
        for kb in range(0, n_dblk):
            dk = kb * BLOCK_D + tl.arange(0, BLOCK_D)
            kt, kmask = _load_tile(K + b * skb + h * skh, rows, dk, sks, skd, N, D)
            fk = tl.where(kmask, _phi(kt.to(tl.float32)), 0.0)
            dst = tl.load(DS + (bh * dp + dk[:, None]) * dp + dv[None, :])
            acc += tl.dot(_operand(fk, K, EMULATE), _operand(dst, K, EMULATE), input_precision=PREC)
        vmask = (rows[:, None] < N) & (dv[None, :] < D)
        tl.store(DV + b * sgb + h * sgh + rows[:, None] * sgs + dv[None, :] * sgd,
                 (acc * inv_n).to(DV.dtype.element_ty), mask=vmask)


def _block_d(d, arch, dtype):
    return min(linear_launch(arch, dtype, "state").sub, max(16, triton.next_power_of_2(d)))


def _splits(n_rows, block, programs_per_split):
    tiles = triton.cdiv(n_rows, block)
    splits = max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, programs_per_split)))
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split


def _settings(q):
    """``(arch, dtype-dependent constexprs, launch of each kernel)`` of one call."""
    arch = cuda_arch(q.device)
    consts = dict(PREC="ieee", EMULATE=arch is None)
    return arch, consts, lambda kernel: linear_launch(arch, q.dtype, kernel)


def _forward(q, k, v, eps):
    b, m, h, d = q.shape
    n = k.shape[1]
    arch, consts, cfg = _settings(q)
    bd = _block_d(d, arch, q.dtype)
    nd = triton.cdiv(d, bd)
    dp = nd * bd
    bh = b * h
    st, out_cfg = cfg("state"), cfg("output")
    n_splits, per_split = _splits(n, st.block, bh * nd * nd)
    s_part = torch.empty((bh, n_splits, dp, dp), device=q.device, dtype=torch.float32)
    z_part = torch.empty((bh, n_splits, dp), device=q.device, dtype=torch.float32)
    _state_kernel[(bh, n_splits, nd * nd)](
        k, v, s_part, z_part, *k.stride(), *v.stride(),
        h, n, d, 1.0 / n, per_split, nd, BLOCK_N=st.block, BLOCK_D=bd, **consts, **st.options(arch))
    state = s_part.sum(dim=1) if n_splits > 1 else s_part[:, 0].contiguous()
    norm = z_part.sum(dim=1) if n_splits > 1 else z_part[:, 0].contiguous()
    out = torch.empty((b, m, h, d), device=q.device, dtype=q.dtype)
    den = torch.empty((bh, m), device=q.device, dtype=torch.float32)
    _output_kernel[(bh, triton.cdiv(m, out_cfg.block), nd)](
        q, state, norm, out, den, *q.stride(), *out.stride(),
        h, m, d, float(eps), nd, BLOCK_M=out_cfg.block, BLOCK_D=bd, **consts, **out_cfg.options(arch))
    return out, state, norm, den


def _backward(do, q, k, v, out, state, norm, den):
    b, m, h, d = q.shape
    n = k.shape[1]
    arch, consts, cfg = _settings(q)
    bd = _block_d(d, arch, q.dtype)
    nd = triton.cdiv(d, bd)
    dp = nd * bd
    bh = b * h
    de, dst, dqc, dkv = cfg("delta"), cfg("dstate"), cfg("dq"), cfg("dkv")
    delta = torch.empty((bh, m), device=q.device, dtype=torch.float32)
    _delta_kernel[(bh, triton.cdiv(m, de.block))](
        do, out, den, delta, *do.stride(), *out.stride(),
        h, m, d, nd, BLOCK_M=de.block, BLOCK_D=bd, **de.options(arch))
    n_splits, per_split = _splits(m, dst.block, bh * nd * nd)
    ds_part = torch.empty((bh, n_splits, dp, dp), device=q.device, dtype=torch.float32)
    dz_part = torch.empty((bh, n_splits, dp), device=q.device, dtype=torch.float32)
    _dstate_kernel[(bh, n_splits, nd * nd)](
        q, do, den, delta, ds_part, dz_part, *q.stride(), *do.stride(),
        h, m, d, per_split, nd, BLOCK_M=dst.block, BLOCK_D=bd, **consts, **dst.options(arch))
    dstate = ds_part.sum(dim=1) if n_splits > 1 else ds_part[:, 0].contiguous()
    dnorm = dz_part.sum(dim=1) if n_splits > 1 else dz_part[:, 0].contiguous()
    dq = torch.empty((b, m, h, d), device=q.device, dtype=q.dtype)
    _dq_kernel[(bh, triton.cdiv(m, dqc.block), nd)](
        q, do, state, norm, den, delta, dq, *q.stride(), *do.stride(), *dq.stride(),
        h, m, d, nd, BLOCK_M=dqc.block, BLOCK_D=bd, **consts, **dqc.options(arch))
    dk = torch.empty((b, n, h, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, n, h, d), device=q.device, dtype=v.dtype)
    _dkv_kernel[(bh, triton.cdiv(n, dkv.block), 2 * nd)](
        k, v, dstate, dnorm, dk, dv, *k.stride(), *v.stride(), *dk.stride(),
        h, n, d, 1.0 / n, nd, BLOCK_N=dkv.block, BLOCK_D=bd, **consts, **dkv.options(arch))
    return dq, dk, dv


def _padded_dim(q):
    bd = _block_d(q.shape[-1], cuda_arch(q.device), q.dtype)
    return triton.cdiv(q.shape[-1], bd) * bd


@torch.library.custom_op("diffaccel::linear_attention_fwd", mutates_args=())
def linear_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out, S, z, den)``; the last three (fp32, padded head dim) are saved for the backward."""
    return _forward(q, k, v, eps)


@linear_attention_fwd.register_fake
def _(q, k, v, eps):
    b, m, h, d = q.shape
    dp = _padded_dim(q)
    return (q.new_empty((b, m, h, d)),
            q.new_empty((b * h, dp, dp), dtype=torch.float32),
            q.new_empty((b * h, dp), dtype=torch.float32),
            q.new_empty((b * h, m), dtype=torch.float32))


@torch.library.custom_op("diffaccel::linear_attention_bwd", mutates_args=())
def linear_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, state: torch.Tensor, norm: torch.Tensor, den: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, out, state, norm, den)


@linear_attention_bwd.register_fake
def _(do, q, k, v, out, state, norm, den):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, _eps = inputs
    out, state, norm, den = output
    ctx.mark_non_differentiable(state, norm, den)
    ctx.save_for_backward(q, k, v, out, state, norm, den)


def _backward_rule(ctx, dout, _dstate, _dnorm, _dden):
    q, k, v, out, state, norm, den = ctx.saved_tensors
    if dout is None:
        return None, None, None, None
    dq, dk, dv = linear_attention_bwd(dout, q, k, v, out, state, norm, den)
    return dq, dk, dv, None


linear_attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


def linear_attention_triton(q, k, v, eps):
    """``[B, Sq, H, D]`` x ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]`` in q's dtype (differentiable)."""
    return linear_attention_fwd(q, k, v, float(eps))[0]
