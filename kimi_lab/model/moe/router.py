"""Token-choice top-k router: one class for every ``moe.topk_method`` (the torchtitan shape: one router, options).

scores = score(x W^T) in fp32 (softmax or sigmoid); selection = top-k of the scores (+ the selection bias), inside
each token's ``topk_group`` best of ``n_group`` groups; gating weights = the selected unbiased scores, renormalised
over the k (``norm_topk_prob``), times ``routed_scaling_factor``. What each ``topk_method`` sets (``ROUTERS``):

| topk_method          | group score                     | selection bias | balance loss (times aux_loss_alpha) |
|----------------------|---------------------------------|----------------|-------------------------------------|
| greedy               | no groups                       | no             | Switch/GShard, batch-wise           |
| group_limited_greedy | its best expert (DeepSeek-V2)   | no             | Switch/GShard, batch-wise           |
| noaux_tc             | sum of its 2 best (DeepSeek-V3) | yes            | sequence-wise (V3 eqs. 17-20)       |
| aux_tc               | sum of its 2 best               | no             | sequence-wise                       |

Sources: Fedus et al. 2021 (Switch, eq. 4); DeepSeek-V3 report (arXiv 2412.19437) §2.1.2, eqs. 12-20; Wang et al.
2024 (arXiv 2408.15664, Alg. 1) for the bias update. Names follow transformers' ``DeepseekV3TopkRouter`` (``weight``,
``e_score_correction_bias``), so a gate's state dict loads there 1:1. Written by hand: the public DeepSeek and
transformers routers are inference-only (no bias update, no training-time balance loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lab.model.moe.recompute import is_recomputing


@dataclass
class Routing:
    expert_idx: torch.Tensor  # (N, k) int64 chosen experts per token
    weights: torch.Tensor  # (N, k) fp32 gating weights
    aux_loss: torch.Tensor  # scalar, already multiplied by aux_loss_alpha
    counts: torch.Tensor  # (E,) tokens routed to each expert in this batch


@dataclass(frozen=True)
class TopkMethod:
    """The router options one ``moe.topk_method`` sets.

    ``deepseek``: transformers' ``DeepseekV3TopkRouter`` conventions: the gate holds ``e_score_correction_bias`` in
    its state dict (all zeros unless ``selection_bias``), takes the top-k unsorted, and renormalises at k = 1 too
    (weight 1). Otherwise (greedy, as Switch/GShard): no bias buffer, each token's experts best first, renormalised
    only at k > 1, and the batch-wise loss takes softmax scores as they are (they sum to 1 already).
    """

    deepseek: bool
    group_score: str | None  # None: no groups; "max": a group's best expert; "top2": the sum of its two best
    selection_bias: bool  # select on score + e_score_correction_bias, moved by update_expert_biases
    balance_loss: str  # "batch": Switch/GShard over the batch; "sequence": DeepSeek-V3 per sequence


# registry: moe.topk_method -> the Router's options
ROUTERS: dict[str, TopkMethod] = {
    "greedy": TopkMethod(deepseek=False, group_score=None, selection_bias=False, balance_loss="batch"),
    "group_limited_greedy": TopkMethod(deepseek=True, group_score="max", selection_bias=False, balance_loss="batch"),
    "noaux_tc": TopkMethod(deepseek=True, group_score="top2", selection_bias=True, balance_loss="sequence"),
    "aux_tc": TopkMethod(deepseek=True, group_score="top2", selection_bias=False, balance_loss="sequence"),
}


def expert_counts(expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) int64 assignments per expert. ``torch.bincount`` would do, but on CUDA it reads the maximum id back to
    size its output (a host sync every forward); a scatter-add into a fixed-size vector never syncs."""
    flat = expert_idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch/GShard batch-wise loss E * sum_i f_i * P_i with f_i = share of the N*k assignments sent to i,
    P_i = mean router prob of i. Equals 1 for perfectly uniform routing and E under total collapse onto one expert.
    """
    n_assign = expert_idx.numel()
    counts = expert_counts(expert_idx, n_experts).to(probs.dtype)
    f = counts / n_assign  # (E,) no gradient: argmax is not differentiable
    p = probs.mean(dim=0)  # (E,)
    return n_experts * torch.sum(f * p)


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


def score(logits: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Router scores from fp32 logits (N, E): softmax over experts, or per-expert sigmoid (DeepSeek-V3)."""
    return logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()


class Router(nn.Module):
    """``forward(x) -> Routing``: the options of ``ROUTERS[moe.topk_method]`` plus ``moe.scoring_func``,
    ``n_group``/``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``, ``aux_loss_alpha``, and
    ``bias_update_speed`` (gamma of ``update_bias``). Groups not kept are masked with -inf, so a masked expert can
    never be chosen, whatever its bias."""

    def __init__(self, d_model: int, moe_cfg):
        super().__init__()
        self.method = moe_cfg.topk_method
        self.options = ROUTERS[self.method]
        self.scoring_func = moe_cfg.scoring_func
        self.n_experts, self.top_k = moe_cfg.n_routed_experts, moe_cfg.num_experts_per_tok
        self.n_group, self.topk_group = moe_cfg.n_group, moe_cfg.topk_group
        self.renormalise = moe_cfg.norm_topk_prob and (self.top_k > 1 or self.options.deepseek)
        self.scaling = moe_cfg.routed_scaling_factor
        self.aux_loss_alpha = moe_cfg.aux_loss_alpha
        self.bias_update_speed = moe_cfg.bias_update_speed
        self.weight = nn.Parameter(torch.empty(self.n_experts, d_model))  # (E, D)
        if self.options.deepseek:
            # selection-only bias: fp32, never a parameter (no gradient), saved in checkpoints
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
            # tokens per expert since the last bias update (summed over micro-batches; read once per optimizer step)
            self.register_buffer("bias_counts", torch.zeros(self.n_experts, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        """``.to(bf16)``, ``.double()`` keep the bias and its counts fp32 (bf16 would swallow gamma steps)."""
        super()._apply(fn, recurse)
        for name in ("e_score_correction_bias", "bias_counts"):
            if name in self._buffers:
                self._buffers[name] = self._buffers[name].float()
        return self

    @property
    def updates_bias(self) -> bool:
        return self.options.selection_bias

    def forward(self, x: torch.Tensor) -> Routing:
        """x (B, T, D) or (N, D) -> Routing of N = B*T tokens (sequence-wise loss: (N, D) is one sequence)."""
        n_seqs = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1])  # (N, D)
        with torch.autocast(device_type=x.device.type, enabled=False):  # routing stays fp32 under bf16 autocast
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = score(logits, self.scoring_func)  # (N, E)
        choice = scores.detach()
        if self.options.selection_bias:
            choice = choice + self.e_score_correction_bias
        expert_idx = self._group_limited(choice).topk(self.top_k, dim=-1, sorted=not self.options.deepseek)[1]
        weights = scores.gather(1, expert_idx)  # (N, K) unbiased
        if self.renormalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        counts = expert_counts(expert_idx, self.n_experts)  # (E,)
        if self.training and self.options.selection_bias and not is_recomputing():
            self.bias_counts += counts.to(self.bias_counts.dtype)
        return Routing(expert_idx, weights, self._aux_loss(scores, expert_idx, n_seqs), counts)

    def _group_limited(self, choice: torch.Tensor) -> torch.Tensor:
        """choice (N, E) with the experts outside each token's topk_group best groups set to -inf."""
        if self.options.group_score is None or self.topk_group >= self.n_group:
            return choice  # every group kept
        n_tokens, per_group = choice.shape[0], self.n_experts // self.n_group
        grouped = choice.view(n_tokens, self.n_group, per_group)  # (N, G, E/G)
        if self.options.group_score == "max":
            group_scores = grouped.amax(dim=-1)  # (N, G) DeepSeek-V2
        else:
            group_scores = grouped.topk(min(2, per_group), dim=-1)[0].sum(dim=-1)  # (N, G) DeepSeek-V3
        kept = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]  # (N, topk_group)
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)  # (N, G)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(n_tokens, self.n_experts)

    def _aux_loss(self, scores: torch.Tensor, expert_idx: torch.Tensor, n_seqs: int) -> torch.Tensor:
        if self.aux_loss_alpha == 0:
            return scores.new_zeros(())
        if self.options.balance_loss == "sequence":
            return self.aux_loss_alpha * sequence_balance_loss(scores, expert_idx, n_seqs)
        # P_i over scores normalised across experts; greedy's softmax scores sum to 1 already and are taken as they are
        softmax_greedy = self.scoring_func == "softmax" and not self.options.deepseek
        normed = scores if softmax_greedy else scores / scores.sum(dim=-1, keepdim=True)
        return self.aux_loss_alpha * load_balance_loss(normed, expert_idx, self.n_experts)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free update (arXiv 2408.15664, Alg. 1): bias_i += gamma * sign(mean load - load_i), centred.

        counts (E,): tokens routed to each expert over the whole global batch of one optimizer step."""
        counts = counts.to(self.e_score_correction_bias)
        delta = self.bias_update_speed * torch.sign(counts.mean() - counts)  # (E,)
        self.e_score_correction_bias += delta - delta.mean()
        self.bias_counts.zero_()

    def extra_repr(self) -> str:
        return f"topk_method={self.method}, scoring_func={self.scoring_func}, experts={self.n_experts}, k={self.top_k}"


def update_expert_biases(moe_layers: Iterable[nn.Module],
                         reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Move the bias of every noaux_tc gate from its counts since the last call; ``reduce`` sums the stacked
    (L, E) counts over data-parallel ranks (one all-reduce for all layers). Returns the number of gates updated."""
    gates = [m.gate for m in moe_layers if m.gate.updates_bias]
    if not gates:
        return 0
    counts = torch.stack([gate.bias_counts for gate in gates])  # (L, E)
    if reduce is not None:
        counts = reduce(counts)
    for gate, layer_counts in zip(gates, counts):
        gate.update_bias(layer_counts)
    return len(gates)
