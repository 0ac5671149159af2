"""Attention registry: ``attention.name`` -> module factory."""

from __future__ import annotations

from typing import Callable

from torch import nn

from kimi_lab.model.attention.kernels import KERNELS
from kimi_lab.model.attention.mha import MultiHeadAttention
from kimi_lab.model.attention.mla import MultiHeadLatentAttention

# registry: attention.name -> factory(d_model, attn_cfg) -> nn.Module(x, cos, sin) with .rope_head_dim
ATTENTIONS: dict[str, Callable[..., nn.Module]] = {
    "standard": lambda d_model, cfg: MultiHeadAttention(d_model, cfg, kernel="standard"),
    "sdpa": lambda d_model, cfg: MultiHeadAttention(d_model, cfg, kernel="sdpa"),
    "flash": lambda d_model, cfg: MultiHeadAttention(d_model, cfg, kernel="flash"),
    "mla": lambda d_model, cfg: MultiHeadLatentAttention(d_model, cfg),  # kernel from attention.kernel
}


def build_attention(d_model: int, attn_cfg) -> nn.Module:
    name = getattr(attn_cfg.name, "value", attn_cfg.name)
    return ATTENTIONS[name](d_model, attn_cfg)


__all__ = ["ATTENTIONS", "KERNELS", "MultiHeadAttention", "MultiHeadLatentAttention", "build_attention"]
