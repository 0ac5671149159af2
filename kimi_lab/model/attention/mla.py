"""DeepSeek-V3 multi-head latent attention (MLA; DeepSeek-V2 paper, arXiv 2405.04434, eqs. 9-19).

Module and parameter names follow transformers' ``DeepseekV3Attention`` (q_a_proj, q_a_layernorm, q_b_proj or
q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), so state dicts move between the two.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lab.config import ConfigError
from kimi_lab.model.attention.kernels import KernelRunner, planned_label
from kimi_lab.model.rope import dynamic_factor, scaling_type, yarn_mscale

LATENT_NORM_EPS = 1e-6  # RMSNorm eps on the latents, as DeepSeek-V3 and HF's DeepseekV3RMSNorm default


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek's layout; HF ``rope_interleave=True``, the
    DeepseekV3Config default); output in HF's order: rotated evens then rotated odds.

    x: (B, H, T, d); cos/sin: (T, d) laid out as cat(freqs, freqs), so the first half holds one angle per pair.
    """
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].to(x.dtype), sin[..., :half].to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


def scales_rope_tables(scaling_cfg) -> bool:
    """Whether MLA's cos/sin take the rotary's YaRN attention factor: only with both ``mscale`` and
    ``mscale_all_dim`` set (the DeepSeek-V2/V3 configs), where that factor is their ratio m(s, mscale) /
    m(s, mscale_all_dim) on the rope slice, as in transformers' DeepseekV3; otherwise (DeepSeek's rule) cos/sin stay
    plain and only the softmax scales (``softmax_mscale``)."""
    return scaling_type(scaling_cfg) == "yarn" and bool(scaling_cfg.mscale) and bool(scaling_cfg.mscale_all_dim)


def softmax_mscale(scaling_cfg) -> float:
    """DeepSeek-V3 MLA under YaRN (inference/model.py; HF DeepseekV3Attention): softmax scale x mscale^2 with
    mscale = 0.1 * mscale_all_dim * ln(factor) + 1 (mscale_all_dim defaults to 1); 1 without YaRN. Fixed at build
    time, so a per-length YaRN factor (``rope.scaling.dynamic_factor``) is refused (``validate_config`` asks this
    function too)."""
    if scaling_type(scaling_cfg) != "yarn":
        return 1.0
    if dynamic_factor(scaling_cfg):
        raise ConfigError("Invalid config: rope.scaling.dynamic_factor=True; allowed: false with attention.type=mla "
                          "and rope.scaling.type=yarn (MLA's softmax mscale is fixed at build time), or "
                          "attention.type=mha")
    return yarn_mscale(scaling_cfg.factor, scaling_cfg.mscale_all_dim or 1.0)


class MultiHeadLatentAttention(nn.Module):
    """q from x (or from a LoRA latent), k/v from one shared latent of width kv_lora_rank, plus one rope key shared
    by all heads; qk head dim = qk_nope_head_dim + qk_rope_head_dim, v head dim = v_head_dim."""

    def __init__(self, d_model: int, attn_cfg, qk_norm=None, rope_cfg=None):
        """``rope_cfg``: the rope group, whose YaRN scaling MLA applies itself (``softmax_mscale``,
        ``scales_rope_tables``); ``qk_norm`` must be None (MLA normalises its latents instead)."""
        super().__init__()
        if qk_norm is not None:
            raise ValueError("MLA takes no QK-norm (it normalises its latents); set norm.qk_norm=false")
        self.n_heads = attn_cfg.n_heads
        self.q_lora_rank = attn_cfg.q_lora_rank
        self.kv_lora_rank = attn_cfg.kv_lora_rank
        self.qk_nope_head_dim = attn_cfg.qk_nope_head_dim
        self.qk_rope_head_dim = self.rope_head_dim = attn_cfg.qk_rope_head_dim  # RoPE table width
        self.v_head_dim = attn_cfg.v_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.dropout = attn_cfg.dropout
        self.base_scale = self.qk_head_dim**-0.5
        scaling = None if rope_cfg is None else rope_cfg.scaling
        self.rope_mscale = softmax_mscale(scaling)  # YaRN: the softmax scale takes its square
        self.scales_rope_tables = scales_rope_tables(scaling)  # read by the Transformer for the shared cos/sin
        self.kernel = KernelRunner(attn_cfg.kernel)
        bias = attn_cfg.bias
        n_q = self.n_heads * self.qk_head_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, n_q, bias=False)
        else:
            self.q_a_proj = nn.Linear(d_model, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, n_q, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d_model, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, d_model, bias=bias)

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times mscale^2 under YaRN: DeepSeek scales the softmax, not cos/sin, because
        only the rope slice of q/k is rotated (scaling cos/sin would miss the nope slice)."""
        return self.base_scale * self.rope_mscale**2

    @property
    def pads_v(self) -> bool:
        """FlashAttention-2 needs one head dim: v is zero-padded to the qk dim and the output sliced back."""
        return self.kernel.name == "flash" and self.v_head_dim != self.qk_head_dim

    def kernel_label(self, device_type: str | None = None) -> str:
        """What the last forward ran (``+pad_v`` when v was padded for flash); before one, what it will run."""
        if device_type is None and self.kernel.last is not None:
            label = self.kernel.last
        else:
            param = self.kv_b_proj.weight
            v_dim = self.qk_head_dim if self.pads_v else self.v_head_dim
            label = planned_label(self.kernel.name, device_type or param.device.type, param.dtype,
                                  self.qk_head_dim, v_dim, self.dropout)
        return f"{label}+pad_v" if self.pads_v else label

    def kv_cache_values_per_token(self) -> int:
        """MLA caches the normed latent and the one shared rope key per token and layer (DeepSeek-V2, sec. 2.1.2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, seq_len, self.n_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, T, dqk)
        q_nope, q_rot = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))  # (B, T, H*(dn+dv))
        kv = kv.view(batch, seq_len, self.n_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # (B, H, T, dn), (B, H, T, dv)

        q_rot = apply_rotary_interleaved(q_rot, cos, sin)
        k_rot = apply_rotary_interleaved(k_rot.view(batch, 1, seq_len, self.qk_rope_head_dim), cos, sin)
        q = torch.cat([q_nope, q_rot], dim=-1)  # (B, H, T, dqk)
        k = torch.cat([k_nope, k_rot.expand(-1, self.n_heads, -1, -1)], dim=-1)  # one rope key for all heads

        out = self.attend(q, k, v).transpose(1, 2)  # (B, T, H, dv)
        return self.o_proj(out.reshape(batch, seq_len, self.n_heads * self.v_head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention core: q, k (B, H, T, dqk), v (B, H, T, dv) -> (B, H, T, dv). standard and sdpa take
        dv != dqk as is (SDPA's math/efficient/cuDNN backends allow it); flash gets v zero-padded, then sliced."""
        if self.pads_v:  # (B, H, T, dv) -> (B, H, T, dqk)
            v = nn.functional.pad(v, (0, self.qk_head_dim - self.v_head_dim))
        dropout_p = self.dropout if self.training else 0.0
        out = self.kernel(q, k, v, dropout_p=dropout_p, scale=self.softmax_scale, training=self.training)
        return out[..., : self.v_head_dim]
