"""Mixture of block attention in portable eager PyTorch (any device, differentiable in q, k, v).

Block-major evaluation, as MoBA's own varlen formulation.  After the selection (``moba_ref``):

1. the selected (query, block) pairs are listed block-major (``nonzero`` of the transposed
   selection), so that every (batch*head, block) group holds the queries that selected it; groups
   sorted by size form at most 8 batches, each padded to its largest group;
2. every batch attends to its blocks' keys only, returning the log-sum-exp too: PyTorch's fused
   CPU flash kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``) when no gradient is
   needed, else plain matmuls that autograd differentiates;
3. the pairs of every query, plus one dense pair over the text keys, are merged query-major with a
   softmax over their log-sum-exps.

The work is the selected pairs only (plus the gate); memory is bounded by processing heads in
chunks, and nothing of size ``S x S`` is materialised.  Text queries attend densely to every key.
Without autograd on CPU, the two pair-sized buffers are kept per thread between calls (fresh large
CPU allocations cost a page fault per 4 KiB on first touch, as much as the copies themselves);
:func:`clear_workspace` (``kernels/workspace.py``) frees them.
"""
from __future__ import annotations

import torch

from .moba_select import block_partition, image_slices, select_blocks
from .nonfinite import clean, nan_rows, nonfinite_marks, unchecked_or_finite
from .workspace import clear_workspace, scratch  # noqa: F401  (clear_workspace: public here too)

# elements of the largest intermediate (attention scores of one chunk of heads)
_BUDGET = {"cpu": 1 << 25, "cuda": 1 << 28}
_BUCKETS = 8  # batches of (padded) groups per head chunk


def _budget(device):
    return _BUDGET.get(torch.device(device).type, 1 << 26)


def _dense(q, k, v, scale):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           scale=scale)
    return out.transpose(1, 2)


def _flash_cpu():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend(q, k, v, bias, scale, need_grad):
    """Attention of ``q`` ``[G, W, D]`` to ``k``/``v`` ``[G, M, D]`` with an additive ``bias``
    (``[G, 1, M]`` or None): returns ``(out [G, W, D], lse [G, W])``, fp32."""
    op = _flash_cpu()
    if not need_grad and q.device.type == "cpu" and op is not None:
        mask = None if bias is None else bias[:, None]
        # the fused kernel wants unit stride on the head dim
        o, lse = op(q.contiguous()[:, None], k.contiguous()[:, None], v.contiguous()[:, None], scale=scale,
                    attn_mask=mask)
        return o[:, 0].float(), lse[:, 0].float()
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, -1, keepdim=True)
    o = torch.matmul(torch.exp(s - lse).to(v.dtype), v).float()
    return o, lse.squeeze(-1)


def _image_chunk(sel, q, kb, vb, kt, vt, part, scale, need_grad):
    """Attention of the image queries of a few heads.

    ``sel``: ``[BH, N, C]`` bool; ``q``: ``[BH, N, D]``; ``kb``/``vb``: blocks ``[BH * C, M, D]``;
    ``kt``/``vt``: text keys ``[BH, T, D]`` or None.  Returns fp32 ``[BH, N, D]``.
    """
    BH, N, D = q.shape
    C, M = part.members.shape
    dev = q.device
    cached = not need_grad
    # 1. pairs, block-major: (bh, c, n) grouped by (batch*head, block), queries ascending
    selT = sel.transpose(1, 2).contiguous()
    bh, c, n = selT.nonzero().unbind(1)
    group = bh * C + c
    g_cnt = selT.sum(-1).flatten()  # [BH * C]
    g_start = torch.cumsum(g_cnt, 0) - g_cnt
    rank = torch.arange(group.numel(), device=dev) - g_start[group]
    # groups sorted by size are split into at most _BUCKETS batches of consecutive groups; every group
    # of a batch is padded to the batch's largest (rounded up to 8) and gets that many buffer rows
    order = torch.argsort(g_cnt, stable=True)
    first = int((g_cnt == 0).sum())  # groups nobody selected sort first
    n_live = g_cnt.numel() - first
    n_buckets = min(_BUCKETS, n_live)
    bounds = [first + n_live * i // n_buckets for i in range(n_buckets + 1)]
    ends = torch.tensor([b - 1 for b in bounds[1:]], dtype=torch.int64, device=dev)
    widths = ((g_cnt[order[ends]] + 7) // 8 * 8).tolist()
    g_width = torch.zeros_like(g_cnt)
    for i, w in enumerate(widths):
        g_width[order[bounds[i]:bounds[i + 1]]] = w
    run = g_width[order]
    run_start = torch.empty_like(g_width)
    run_start[order] = torch.cumsum(run, 0) - run
    slot = run_start[group] + rank  # row of every pair in the buffer
    rows = int(g_width.sum())
    qrow = torch.zeros(rows, dtype=torch.int64, device=dev)
    qrow[slot] = bh * N + n
    if cached:
        qbuf = torch.index_select(q.reshape(BH * N, D), 0, qrow, out=scratch("moba_q", (rows, D), q.dtype, dev))
    else:
        qbuf = q.reshape(BH * N, D).index_select(0, qrow)
    # 2. the pairs of every query, query-major: src[query, r] = buffer row of its r-th pair (ascending
    #    blocks), then the text pair, padded with a dummy row (zero output, -inf log-sum-exp) for queries
    #    with fewer pairs (threshold / head selection)
    q_cnt = sel.sum(-1).flatten()  # [BH * N]
    kmax = int(q_cnt.max())
    K = kmax + (kt is not None)
    query = bh * N + n
    q_rank = (torch.cumsum(sel, dim=-1, dtype=torch.int32) - 1).flatten()[query * C + c].to(torch.int64)
    text_row = rows
    dummy = rows + (BH * N if kt is not None else 0)
    src = torch.full((BH * N, K), dummy, dtype=torch.int64, device=dev)
    src.view(-1)[query * K + q_rank] = slot
    # 3. block-major attention, bucket by bucket
    bias_all = None
    if not part.uniform:
        bias_all = torch.zeros(C, 1, M, device=dev).masked_fill(~part.valid[:, None, :], float("-inf"))
    offset = 0
    o_parts, lse_parts = [], []
    for i, w in enumerate(widths):
        gsel = order[bounds[i]:bounds[i + 1]]
        ng = gsel.numel()
        qg = qbuf[offset:offset + ng * w].view(ng, w, D)
        bias = None if bias_all is None else bias_all.index_select(0, gsel % C)
        o, lse = _attend(qg, kb.index_select(0, gsel), vb.index_select(0, gsel), bias, scale, need_grad)
        o_parts.append(o.reshape(-1, D))
        lse_parts.append(lse.reshape(-1))
        offset += ng * w
    if kt is not None:
        src[:, kmax] = text_row + torch.arange(BH * N, device=dev)
        ot, lse_t = _attend(q, kt, vt, None, scale, need_grad)
        o_parts.append(ot.reshape(-1, D))
        lse_parts.append(lse_t.reshape(-1))
    o_parts.append(o_parts[0].new_zeros(1, D))
    lse_parts.append(lse_parts[0].new_full((1,), float("-inf")))
    # 4. merge the pairs of every query by their log-sum-exp: a gather and weighted sum (embedding_bag)
    if cached:
        o_all = torch.cat(o_parts, out=scratch("moba_o", (dummy + 1, D), torch.float32, dev))
    else:
        o_all = torch.cat(o_parts)
    weights = torch.softmax(torch.cat(lse_parts)[src], dim=-1)
    out = torch.nn.functional.embedding_bag(src, o_all, mode="sum", per_sample_weights=weights)
    return out.view(BH, N, D)


def moba_torch(q, k, v, grid, block, topk, threshold, selection, text_len, text_first, scale):
    """Mixture of block attention (validated arguments, see ``diffaccel.ops.moba_attention``)."""
    B, S, H, D = q.shape
    part = block_partition(grid, block, q.device)
    N, (C, M) = part.n_tokens, part.members.shape
    img, txt = image_slices(N, text_len, text_first)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    cdt = q.dtype if q.device.type == "cuda" else torch.float32
    # non-finite inputs: select with them (the gate contains them), attend to cleaned copies, and mark as
    # NaN the outputs whose selected blocks (or the text) hold a bad key / value, and bad queries' rows
    q_in, marks = q, None
    if not unchecked_or_finite(q, k, v):
        marks = nonfinite_marks(k, v)
    q_sel, k_sel = q[:, img], k[:, img]
    if marks is not None:
        q, k, v = clean(q), clean(k), clean(v)
    q_img, k_img, v_img = q[:, img], k[:, img], v[:, img]

    budget = _budget(q.device)
    # heads per chunk: bounded by the gate [B, h, N, C] and by the scores of ~ the selected pairs
    if topk is not None and selection != "head":
        per_head = B * N * max(C, min(topk, C) * M)
    else:
        per_head = B * N * C * max(M // 2, 1)
    chunk = max(1, min(H, budget // max(per_head, 1)))
    outs = []
    for h0 in range(0, H, chunk):
        h1 = min(H, h0 + chunk)
        sel = select_blocks(q_sel[:, :, h0:h1], k_sel[:, :, h0:h1], part, topk, threshold, selection)
        h = h1 - h0
        qh = q_img[:, :, h0:h1].transpose(1, 2).to(cdt).reshape(B * h, N, D)
        members = part.members.flatten()
        kb = k_img[:, :, h0:h1].transpose(1, 2).to(cdt).reshape(B * h, N, D).index_select(1, members)
        vb = v_img[:, :, h0:h1].transpose(1, 2).to(cdt).reshape(B * h, N, D).index_select(1, members)
        kt = k[:, txt, h0:h1].transpose(1, 2).to(cdt).reshape(B * h, text_len, D) if text_len else None
        vt = v[:, txt, h0:h1].transpose(1, 2).to(cdt).reshape(B * h, text_len, D) if text_len else None
        out = _image_chunk(sel.reshape(B * h, N, C), qh, kb.view(B * h * C, M, D), vb.view(B * h * C, M, D),
                           kt, vt, part, scale, need_grad)
        if marks is not None:
            mb = marks[:, img, h0:h1].transpose(1, 2).reshape(B * h, N, D).index_select(1, members)
            mb = mb.view(B * h, C, M, D) * part.valid[None, :, :, None]
            seen = torch.matmul(sel.reshape(B * h, N, C).float(), mb.amax(2)) > 0  # [B*h, N, D]
            if text_len:
                seen = seen | (marks[:, txt, h0:h1].amax(1).reshape(B * h, 1, D) > 0)
            out = out.masked_fill(seen, float("nan"))
        outs.append(out.view(B, h, N, D))
    out_img = torch.cat(outs, dim=1).transpose(1, 2).to(q.dtype)  # [B, N, H, D]
    if text_len:
        out_txt = _dense(q[:, txt], k, v, scale).to(q.dtype)
        if marks is not None:  # text queries see every key
            out_txt = out_txt.masked_fill(marks.amax(1, keepdim=True) > 0, float("nan"))
        out_img = torch.cat([out_txt, out_img] if text_first else [out_img, out_txt], dim=1)
    return out_img if marks is None else nan_rows(out_img, q_in)
