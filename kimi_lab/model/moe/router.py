"""Top-k router (softmax or sigmoid scores) with the Switch/GShard balance loss (Fedus et al. 2021, eq. 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    expert_idx: torch.Tensor  # (N, k) int64 chosen experts per token
    weights: torch.Tensor  # (N, k) fp32 gating weights
    aux_loss: torch.Tensor  # scalar, already multiplied by aux_loss_alpha
    counts: torch.Tensor  # (E,) tokens routed to each expert in this batch


def expert_counts(expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) int64 assignments per expert. ``torch.bincount`` would do, but on CUDA it reads the maximum id back to
    size its output (a host sync every forward); a scatter-add into a fixed-size vector never syncs."""
    flat = expert_idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E * sum_i f_i * P_i with f_i = share of the N*k assignments sent to i, P_i = mean router prob of i.

    Equals 1 for perfectly uniform routing and E under total collapse onto one expert.
    """
    n_assign = expert_idx.numel()
    counts = expert_counts(expert_idx, n_experts).to(probs.dtype)
    f = counts / n_assign  # (E,) no gradient: argmax is not differentiable
    p = probs.mean(dim=0)  # (E,)
    return n_experts * torch.sum(f * p)


def score(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Router scores from fp32 logits (N, E): softmax over experts, or per-expert sigmoid (DeepSeek-V3)."""
    return logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()


class GreedyRouter(nn.Module):
    """score(x W^T) in fp32 (softmax or sigmoid), top-k, optional renormalisation over the k, times
    routed_scaling_factor. The balance loss uses scores normalised over experts (a no-op for softmax)."""

    def __init__(self, d_model: int, moe_cfg):
        super().__init__()
        self.n_experts = int(moe_cfg.n_routed_experts)
        self.top_k = int(moe_cfg.num_experts_per_tok)
        self.norm_topk_prob = bool(moe_cfg.norm_topk_prob)
        self.scaling = float(moe_cfg.routed_scaling_factor)
        self.aux_loss_alpha = float(moe_cfg.aux_loss_alpha)
        self.scoring_func = getattr(moe_cfg.scoring_func, "value", moe_cfg.scoring_func)
        self.weight = nn.Parameter(torch.empty(self.n_experts, d_model))

    def forward(self, x: torch.Tensor) -> Routing:
        x = x.reshape(-1, x.shape[-1])  # (N, D) from (B, T, D) or (N, D)
        with torch.autocast(device_type=x.device.type, enabled=False):  # routing stays fp32 under bf16 autocast
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        probs = score(logits, self.scoring_func)
        weights, expert_idx = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.scaling
        counts = expert_counts(expert_idx, self.n_experts)
        normed = probs if self.scoring_func == "softmax" else probs / probs.sum(dim=-1, keepdim=True)
        aux = self.aux_loss_alpha * load_balance_loss(normed, expert_idx, self.n_experts)
        return Routing(expert_idx, weights, aux, counts)
