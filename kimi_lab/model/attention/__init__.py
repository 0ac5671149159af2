"""Attention registry: ``attention.name`` -> module factory."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kimi_lab.model.attention.kernels import KERNELS
from kimi_lab.model.attention.mha import MultiHeadAttention
from kimi_lab.model.attention.mla import MultiHeadLatentAttention

# registry: attention.name -> factory(d_model, attn_cfg) -> nn.Module(x, cos, sin) with .rope_head_dim
ATTENTIONS: dict[str, Callable[..., nn.Module]] = {
    "standard": lambda d_model, cfg, qk_norm: MultiHeadAttention(d_model, cfg, kernel="standard", qk_norm=qk_norm),
    "sdpa": lambda d_model, cfg, qk_norm: MultiHeadAttention(d_model, cfg, kernel="sdpa", qk_norm=qk_norm),
    "flash": lambda d_model, cfg, qk_norm: MultiHeadAttention(d_model, cfg, kernel="flash", qk_norm=qk_norm),
    "mla": lambda d_model, cfg, qk_norm: MultiHeadLatentAttention(d_model, cfg),  # kernel from attention.kernel
}


def build_attention(d_model: int, attn_cfg, qk_norm_cfg=None) -> nn.Module:
    """``qk_norm_cfg``: the norm config to apply per head to q and k (None: no QK-norm; validation keeps MLA off it)."""
    name = getattr(attn_cfg.name, "value", attn_cfg.name)
    return ATTENTIONS[name](d_model, attn_cfg, qk_norm_cfg)


__all__ = ["ATTENTIONS", "KERNELS", "MultiHeadAttention", "MultiHeadLatentAttention", "build_attention"]
