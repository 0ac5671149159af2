"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6): down(silu(gate(x)) * up(x)).

The FFN of dense layers (``moe=dense``, the first ``first_k_dense_replace`` layers) and the MoE's shared experts;
names follow transformers' ``DeepseekV3MLP`` (``gate_proj``, ``up_proj``, ``down_proj``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
