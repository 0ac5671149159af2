"""The reference MoE forward: the per-expert loop of transformers' eager ``DeepseekV3MoE``, on a ``MoE``'s own gate
and weights. The dispatch parity tests compare ``MoE`` against it (float64: the segment form, float32: the grouped
GEMM), and ``make bench-moe`` times it as its ``loop`` column."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lab.model.moe import MoE


class MaskLoopMoE(nn.Module):
    """For each expert, the tokens that chose it (``torch.where`` on a one-hot mask), its SwiGLU on them from the
    bank slices ``gate_up_proj[e]`` / ``down_proj[e]``, scaled by their gate weights, ``index_add_`` into the
    output; plus the shared experts. No sort, no grouped GEMM, no hand-written backward: the dispatch ``MoE``
    replaces, written plainly. ``aux_loss`` holds the gate's balance loss of the last forward."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d_model = x.shape
        routing, experts = self.moe.gate(x), self.moe.experts
        self.aux_loss = routing.aux_loss
        x_flat = x.reshape(-1, d_model)  # (N, D)
        out = torch.zeros_like(x_flat)
        chosen = F.one_hot(routing.expert_idx, experts.num_experts).permute(2, 1, 0)  # (E, k, N)
        for expert in range(experts.num_experts):
            slot, token = torch.where(chosen[expert])  # (n_e,) each
            if token.numel() == 0:
                continue
            gate, up = F.linear(x_flat[token], experts.gate_up_proj[expert]).chunk(2, dim=-1)  # (n_e, I) each
            expert_out = F.linear(F.silu(gate) * up, experts.down_proj[expert])  # (n_e, D)
            out.index_add_(0, token, expert_out * routing.weights[token, slot].unsqueeze(-1))
        if self.moe.shared_experts is not None:
            out = out + self.moe.shared_experts(x_flat)
        return out.view(batch, seq_len, d_model)
