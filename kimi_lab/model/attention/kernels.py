"""Causal attention kernels over (B, H, T, d) tensors; every kernel computes softmax(QK^T/sqrt(d) + causal)V."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def standard_attention(q, k, v, *, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Explicit reference (Vaswani et al. 2017, eq. 1): matmul, causal mask *applied* (-inf fill), softmax, matmul.

    q: (B, H, T, d_qk), k: (B, Hkv, T, d_qk), v: (B, Hkv, T, d_v); Hkv divides H (GQA).
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # (B, Hkv, T, d) -> (B, H, T, d): each kv head serves n_rep query heads
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, T)
    seq_len = q.shape[-2]
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)  # (B, H, T, d_v)


def sdpa_attention(q, k, v, *, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention, causal, PyTorch picks the backend."""
    enable_gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(
        q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, enable_gqa=enable_gqa
    )


# registry: attention.name -> (kernel fn, label recorded in results.json as the kernel used)
KERNELS: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    "standard": (standard_attention, "math_explicit"),
    "sdpa": (sdpa_attention, "sdpa_auto"),
}
