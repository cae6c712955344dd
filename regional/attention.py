"""Attention arithmetic of regionally controllable sampling (see :mod:`.patch` for the semantics)."""

from __future__ import annotations

import torch


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention of ``q`` ``[B, N, H*D]`` over ``k``/``v`` ``[B, T, H*D]``; returns ``[B, N, H*D]``."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.view(b, n, heads, d).transpose(1, 2)
    kh = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(b, n, inner)
