"""Multi-head causal self-attention with RoPE and grouped-query heads (Ainslie et al. 2023, GQA)."""

from __future__ import annotations

import torch
from torch import nn

from kimi_lab.model.attention.kernels import KernelRunner, planned_label
from kimi_lab.model.norm import build_norm
from kimi_lab.model.rope import apply_rotary


class MultiHeadAttention(nn.Module):
    """One parameter layout (q/k/v/o_proj, as in HF Llama) shared by every kernel, so checkpoints move between them."""

    # RoPE rotates all of q and k, so the rotary's YaRN attention factor on cos/sin scales q.k by its square
    scales_rope_tables = True

    def __init__(self, d_model: int, attn_cfg, qk_norm=None, rope_cfg=None):
        """``qk_norm``: the norm config applied per head to q and k (None: no QK-norm); ``rope_cfg`` is not read
        (the scaling reaches MHA through cos/sin)."""
        super().__init__()
        self.n_heads = attn_cfg.n_heads
        self.n_kv_heads = attn_cfg.n_kv_heads or attn_cfg.n_heads
        self.head_dim = d_model // self.n_heads
        self.qk_head_dim = self.v_head_dim = self.rope_head_dim = self.head_dim  # RoPE on the whole head
        self.dropout = attn_cfg.dropout
        self.kernel = KernelRunner(attn_cfg.kernel)
        bias = attn_cfg.bias
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=bias)
        # QK-norm (Dehghani et al. 2023; names as HF Qwen3 / OLMo-2): one norm over head_dim, shared by the heads
        self.q_norm = build_norm(qk_norm, self.head_dim) if qk_norm is not None else nn.Identity()
        self.k_norm = build_norm(qk_norm, self.head_dim) if qk_norm is not None else nn.Identity()

    def kernel_label(self, device_type: str | None = None) -> str:
        """What the last forward ran; before one (or for another ``device_type``), what it will run there."""
        if device_type is None and self.kernel.last is not None:
            return self.kernel.last
        param = self.q_proj.weight
        return planned_label(self.kernel.name, device_type or param.device.type, param.dtype, self.head_dim,
                             self.head_dim, self.dropout)

    def kv_cache_values_per_token(self) -> int:
        """Values an inference KV cache holds per token and layer: k and v of every kv head."""
        return 2 * self.n_kv_heads * self.head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # (B, T, H*d) -> (B, T, H, d) -> norm per head (QK-norm, or identity) -> (B, H, T, d)
        q = self.q_norm(self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attend(q, k, v).transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core: q (B, H, T, d), k/v (B, Hkv, T, d) -> (B, H, T, d)."""
        dropout_p = self.dropout if self.training else 0.0
        return self.kernel(q, k, v, dropout_p=dropout_p, scale=None, training=self.training)
