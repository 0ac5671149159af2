"""DeepSeek-V2/V3 gate: group-limited top-k, aux-loss-free bias balancing, sequence-wise balance loss.

DeepSeek-V3 technical report (arXiv 2412.19437) §2.1.2, eqs. 12-20, and Wang et al. 2024 (arXiv 2408.15664, Alg. 1).
Names follow transformers' ``DeepseekV3TopkRouter`` (``weight``, ``e_score_correction_bias``). Written by hand:
the public DeepSeek and transformers code is inference-only (no bias update, no training-time aux loss).

``topk_method``:
- ``group_limited_greedy`` (V2): group score = best expert score of the group; no bias; batch-wise balance loss.
- ``noaux_tc`` (V3): selection on ``score + e_score_correction_bias``, group score = sum of its top-2 biased scores;
  gating weights from the unbiased scores; the bias moves once per optimizer step (``update_expert_biases``);
  plus the complementary sequence-wise balance loss weighted by ``aux_loss_alpha`` (0 = purely loss-free).
- ``aux_tc``: the same selection without the bias, balanced by the sequence-wise loss with ``aux_loss_alpha``.
Groups that are not kept are masked with -inf, so a masked expert can never be chosen, whatever its bias.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lab.model.moe.recompute import is_recomputing
from kimi_lab.model.moe.router import Routing, expert_counts, load_balance_loss, score


def sequence_balance_loss(scores: torch.Tensor, expert_idx: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """DeepSeek-V3 eqs. 17-20, averaged over the sequences of the batch: sum_i f_i P_i with
    f_i = E/(K T) sum_t 1[i in topk(t)], P_i = (1/T) sum_t s'_{i,t}, s' = s / sum_j s_j (the alpha is applied outside).

    scores (N, E) unbiased router scores, expert_idx (N, K) chosen experts, N = n_seqs * T tokens in sequence order.
    Equals 1 when every sequence spreads its tokens and scores uniformly.
    """
    n_tokens, n_experts = scores.shape
    seq_len, top_k = n_tokens // n_seqs, expert_idx.shape[-1]
    normed = scores / scores.sum(dim=-1, keepdim=True)  # (N, E) s'
    p = normed.view(n_seqs, seq_len, n_experts).mean(dim=1)  # (B, E)
    hits = torch.zeros(n_seqs, n_experts, device=scores.device, dtype=scores.dtype)
    hits.scatter_add_(1, expert_idx.view(n_seqs, seq_len * top_k), torch.ones_like(hits[:, :1]).expand(
        n_seqs, seq_len * top_k))  # (B, E) assignments per expert in each sequence
    f = hits * (n_experts / (top_k * seq_len))  # no gradient: selection is not differentiable
    return (f * p).sum(dim=-1).mean()


class GroupLimitedRouter(nn.Module):
    """scores = score(x W^T) in fp32; top-k over the topk_group best of n_group groups; weights from the unbiased
    scores, renormalised over the k (norm_topk_prob), times routed_scaling_factor."""

    def __init__(self, d_model: int, moe_cfg):
        super().__init__()
        self.method = getattr(moe_cfg.topk_method, "value", moe_cfg.topk_method)
        self.scoring_func = getattr(moe_cfg.scoring_func, "value", moe_cfg.scoring_func)
        self.n_experts, self.top_k = int(moe_cfg.n_routed_experts), int(moe_cfg.num_experts_per_tok)
        self.n_group, self.topk_group = int(moe_cfg.n_group), int(moe_cfg.topk_group)
        self.norm_topk_prob = bool(moe_cfg.norm_topk_prob)
        self.scaling = float(moe_cfg.routed_scaling_factor)
        self.aux_loss_alpha = float(moe_cfg.aux_loss_alpha)
        self.bias_update_speed = float(moe_cfg.bias_update_speed)
        self.weight = nn.Parameter(torch.empty(self.n_experts, d_model))
        # selection-only bias: fp32, never a parameter (no gradient), saved in checkpoints
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        # tokens per expert since the last bias update (summed over micro-batches; read once per optimizer step)
        self.register_buffer("bias_counts", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        """``.to(bf16)``, ``.double()`` keep the bias and its counts fp32 (bf16 would swallow gamma steps)."""
        super()._apply(fn, recurse)
        for name in ("e_score_correction_bias", "bias_counts"):
            self._buffers[name] = self._buffers[name].float()
        return self

    @property
    def updates_bias(self) -> bool:
        return self.method == "noaux_tc"

    def forward(self, x: torch.Tensor) -> Routing:
        """x (B, T, D) or (N, D) -> Routing of N = B*T tokens (seq-wise loss: (N, D) is one sequence)."""
        n_seqs = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1])  # (N, D)
        with torch.autocast(device_type=x.device.type, enabled=False):  # routing stays fp32 under bf16 autocast
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = score(logits, self.scoring_func)  # (N, E)
        choice = scores.detach()
        if self.updates_bias:
            choice = choice + self.e_score_correction_bias
        expert_idx = self._group_limited(choice).topk(self.top_k, dim=-1, sorted=False)[1]  # (N, K)
        weights = scores.gather(1, expert_idx)  # (N, K) unbiased
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        counts = expert_counts(expert_idx, self.n_experts)  # (E,)
        if self.training and self.updates_bias and not is_recomputing():
            self.bias_counts += counts.to(self.bias_counts.dtype)
        return Routing(expert_idx, weights, self._aux_loss(scores, expert_idx, n_seqs), counts)

    def _group_limited(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (N, E) with the experts outside each token's topk_group best groups set to -inf."""
        if self.topk_group >= self.n_group:
            return choice  # every group kept
        n_tokens, per_group = choice.shape[0], self.n_experts // self.n_group
        grouped = choice.view(n_tokens, self.n_group, per_group)  # (N, G, E/G)
        if self.method == "group_limited_greedy":
            group_scores = grouped.amax(dim=-1)  # (N, G) DeepSeek-V2
        else:
            group_scores = grouped.topk(min(2, per_group), dim=-1)[0].sum(dim=-1)  # (N, G) DeepSeek-V3
        kept = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]  # (N, topk_group)
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)  # (N, G)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(n_tokens, self.n_experts)

    def _aux_loss(self, scores: torch.Tensor, expert_idx: torch.Tensor, n_seqs: int) -> torch.Tensor:
        if self.aux_loss_alpha == 0:
            return scores.new_zeros(())
        if self.method == "group_limited_greedy":
            normed = scores / scores.sum(dim=-1, keepdim=True)
            return self.aux_loss_alpha * load_balance_loss(normed, expert_idx, self.n_experts)
        return self.aux_loss_alpha * sequence_balance_loss(scores, expert_idx, n_seqs)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free update (arXiv 2408.15664, Alg. 1): bias_i += gamma * sign(mean load - load_i), centred.

        counts (E,): tokens routed to each expert over the whole global batch of one optimizer step."""
        counts = counts.to(self.e_score_correction_bias)
        delta = self.bias_update_speed * torch.sign(counts.mean() - counts)  # (E,)
        self.e_score_correction_bias += delta - delta.mean()
        self.bias_counts.zero_()


def update_expert_biases(moe_layers: Iterable[nn.Module],
                         reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Move the bias of every noaux_tc gate from its counts since the last call; ``reduce`` sums the stacked
    (L, E) counts over data-parallel ranks (one all-reduce for all layers). Returns the number of gates updated."""
    gates = [m.gate for m in moe_layers if getattr(m.gate, "updates_bias", False)]
    if not gates:
        return 0
    counts = torch.stack([gate.bias_counts for gate in gates])  # (L, E)
    if reduce is not None:
        counts = reduce(counts)
    for gate, layer_counts in zip(gates, counts):
        gate.update_bias(layer_counts)
    return len(gates)
