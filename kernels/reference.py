"""Plain PyTorch references shared by every pattern.

These are deliberately simple (a dense boolean mask and a masked softmax in
fp32); they define the semantics the fast backends are tested against.
"""
from __future__ import annotations

import torch


def masked_attention_reference(q, k, v, mask, scale):
    """Dense attention with a boolean ``mask`` ``[Sq, Sk]`` (True = visible).

    ``q``: ``[B, Sq, H, D]``, ``k``/``v``: ``[B, Sk, H, D]``.  The mask may also
    be ``[B or 1, H or 1, Sq, Sk]``.  Computed in fp32, returned in q's dtype.
    Every query must see at least one key.

    Non-finite inputs stay inside the pattern: a masked-out key or value never
    reaches a query (masked logits are replaced, not added to, and masked values
    are not multiplied by a zero probability).  A non-finite query, or a visible
    non-finite key, makes the query's output NaN; a non-finite value ``v[j, d]``
    makes output ``d`` NaN for every query that sees ``j``.
    """
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    logits = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    finite = torch.isfinite(vf)
    out = torch.matmul(torch.softmax(logits, dim=-1), torch.where(finite, vf, 0.0))
    bad = ~finite | ~torch.isfinite(kf).all(-1, keepdim=True)
    if bool(bad.any()):
        seen = torch.matmul(mask.to(torch.float32), bad.to(torch.float32)) > 0
        out = out.masked_fill(seen, float("nan"))
    out = out.masked_fill(~torch.isfinite(qf).all(-1, keepdim=True), float("nan"))
    return out.transpose(1, 2).to(q.dtype)


def join_text_mask(image_mask, text_len, text_first, image_queries_see_text=True):
    """Embed an image->image mask ``[N, N]`` into the joint [text; image] (or
    [image; text]) sequence: text queries see every key, image queries see every
    text key plus ``image_mask``."""
    n = image_mask.shape[0]
    s = n + text_len
    full = torch.ones(s, s, dtype=torch.bool, device=image_mask.device)
    img = slice(text_len, s) if text_first else slice(0, n)
    full[img, img] = image_mask
    if not image_queries_see_text:
        txt = slice(0, text_len) if text_first else slice(n, s)
        full[img, txt] = False
    return full
