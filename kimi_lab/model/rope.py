"""Rotary position embedding (Su et al. 2021, RoFormer eq. 34), HF ``rotate_half`` convention."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def default_inv_freq(head_dim: int, theta: float, scaling_cfg=None) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/d), i = 0 .. d/2-1 (no length scaling)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return 1.0 / (theta**exponents)


def linear_inv_freq(head_dim: int, theta: float, scaling_cfg) -> torch.Tensor:
    """Position interpolation (Chen et al. 2023): positions divided by factor == inv_freq / factor (HF 'linear')."""
    return default_inv_freq(head_dim, theta) / float(scaling_cfg.factor)


# registry: rope.scaling.type -> inv_freq builder (head_dim, theta, scaling_cfg) -> (head_dim/2,)
ROPE_INV_FREQ: dict[str, Callable[..., torch.Tensor]] = {"none": default_inv_freq, "linear": linear_inv_freq}


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for positions 0..max_seq_len-1."""

    def __init__(self, head_dim: int, max_seq_len: int, rope_cfg):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        scaling = rope_cfg.scaling
        scaling_type = "none" if scaling is None else getattr(scaling.type, "value", scaling.type)
        inv_freq = ROPE_INV_FREQ[scaling_type](head_dim, float(rope_cfg.theta), scaling)
        positions = torch.arange(max_seq_len, dtype=torch.float64)
        freqs = torch.outer(positions, inv_freq)  # (T, d/2)
        angles = torch.cat([freqs, freqs], dim=-1)  # (T, d)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cos.shape[0]:
            raise ValueError(f"sequence length {seq_len} > RoPE table length {self.cos.shape[0]}")
        return self.cos[:seq_len], self.sin[:seq_len]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, d); cos/sin: (T, d). Computed in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
