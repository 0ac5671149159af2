"""Attention registry: ``attention.type`` -> module class; ``attention.kernel`` picks the core inside either."""

from __future__ import annotations

from torch import nn

from kimi_lab.config.schema import AttentionType
from kimi_lab.model.attention.kernels import KERNELS, kernel_limits
from kimi_lab.model.attention.mha import MultiHeadAttention
from kimi_lab.model.attention.mla import MultiHeadLatentAttention

# registry: attention.type -> class(d_model, attn_cfg, qk_norm, rope_cfg) -> nn.Module(x, cos, sin), declaring
# .rope_head_dim (the width RoPE rotates) and .scales_rope_tables (whether cos/sin carry the YaRN factor)
ATTENTIONS: dict[AttentionType, type[nn.Module]] = {
    AttentionType.mha: MultiHeadAttention,
    AttentionType.mla: MultiHeadLatentAttention,
}


def build_attention(d_model: int, attn_cfg, qk_norm_cfg=None, rope_cfg=None) -> nn.Module:
    """``qk_norm_cfg``: the norm config to apply per head to q and k (None: no QK-norm; validation keeps MLA off
    it); ``rope_cfg``: the rope group, for an attention that applies its YaRN scaling itself (MLA)."""
    return ATTENTIONS[attn_cfg.type](d_model, attn_cfg, qk_norm=qk_norm_cfg, rope_cfg=rope_cfg)


__all__ = ["ATTENTIONS", "KERNELS", "MultiHeadAttention", "MultiHeadLatentAttention", "build_attention",
           "kernel_limits"]
