"""Dropless mixture-of-experts FFN (Shazeer et al. 2017; DeepSeekMoE shared experts, Dai et al. 2024).

Tokens are grouped by expert with one argsort, each expert runs on its contiguous slice, and the
weighted outputs are summed back with index_add_ (no capacity factor, no token dropped).
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lab.model.moe.mlp import SwiGLU
from kimi_lab.model.moe.router import GreedyRouter

# registry: moe.topk_method -> router class
ROUTERS: dict[str, type[nn.Module]] = {"greedy": GreedyRouter}


class MoE(nn.Module):
    def __init__(self, d_model: int, moe_cfg):
        super().__init__()
        method = getattr(moe_cfg.topk_method, "value", moe_cfg.topk_method)
        self.n_experts = int(moe_cfg.n_routed_experts)
        self.top_k = int(moe_cfg.num_experts_per_tok)
        hidden = int(moe_cfg.moe_intermediate_size)
        self.gate = ROUTERS[method](d_model, moe_cfg)
        self.experts = nn.ModuleList(SwiGLU(d_model, hidden) for _ in range(self.n_experts))
        n_shared = int(moe_cfg.n_shared_experts)
        self.shared_experts = SwiGLU(d_model, n_shared * hidden) if n_shared > 0 else None
        # tokens routed to each expert since the trainer last read them (load metrics)
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts), persistent=False)
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d_model = x.shape
        x_flat = x.reshape(-1, d_model)  # (N, D), N = B*T
        routing = self.gate(x_flat)
        self.aux_loss = routing.aux_loss
        if self.training:
            self.tokens_per_expert += routing.counts.to(self.tokens_per_expert.dtype)
        out = self._dispatch(x_flat, routing.expert_idx, routing.weights, routing.counts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)
        return out.view(batch, seq_len, d_model)

    def _dispatch(self, x_flat, expert_idx, weights, counts) -> torch.Tensor:
        flat_expert = expert_idx.reshape(-1)  # (N*k,)
        order = flat_expert.argsort(stable=True)  # assignments grouped by expert
        token_of = order // self.top_k  # (N*k,) source token of each sorted assignment
        x_sorted = x_flat[token_of]  # (N*k, D)
        out_sorted = torch.empty_like(x_sorted)
        start = 0
        for expert, n_tokens in zip(self.experts, counts.tolist()):
            if n_tokens:
                out_sorted[start : start + n_tokens] = expert(x_sorted[start : start + n_tokens])
            start += n_tokens
        gate_w = weights.reshape(-1)[order].unsqueeze(-1).to(x_flat.dtype)  # (N*k, 1)
        return torch.zeros_like(x_flat).index_add_(0, token_of, out_sorted * gate_w)
