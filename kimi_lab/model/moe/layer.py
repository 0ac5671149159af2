"""Dropless mixture-of-experts FFN (Shazeer et al. 2017; DeepSeekMoE shared experts, Dai et al. 2024).

Token-choice dispatch without a capacity factor: the N*k (token, expert) assignments are sorted by expert once,
the experts run as grouped matmuls over their contiguous row blocks (``GroupedExperts``), and the outputs are
gathered back to token order and summed with their gate weights (one batched (1, k) @ (k, D) product per token).
Module names mirror transformers' ``DeepseekV3MoE`` (``gate``, ``experts``, ``shared_experts``), so a layer's
state dict loads there 1:1.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_lab.model.mlp import SwiGLU
from kimi_lab.model.moe.experts import GroupedExperts
from kimi_lab.model.moe.recompute import is_recomputing
from kimi_lab.model.moe.router import Router


class MoE(nn.Module):
    def __init__(self, d_model: int, moe_cfg):
        super().__init__()
        self.n_experts = moe_cfg.n_routed_experts
        self.top_k = moe_cfg.num_experts_per_tok
        hidden = moe_cfg.moe_intermediate_size
        self.gate = Router(d_model, moe_cfg)
        self.experts = GroupedExperts(self.n_experts, d_model, hidden)
        n_shared = moe_cfg.n_shared_experts
        self.shared_experts = SwiGLU(d_model, n_shared * hidden) if n_shared > 0 else None
        # read and zeroed once per optimizer step by the trainer (load metrics); training forwards only
        self.register_buffer("tokens_per_expert", torch.zeros(self.n_experts), persistent=False)  # (E,)
        self.register_buffer("aux_loss_sum", torch.zeros(()), persistent=False)  # sum of aux losses (detached)
        self.register_buffer("n_forwards", torch.zeros(()), persistent=False)  # micro-batches since last read
        # eval forwards' tokens per expert: zeroed and read around each validation pass (MaxVio on held-out data)
        self.register_buffer("eval_tokens_per_expert", torch.zeros(self.n_experts), persistent=False)  # (E,)
        self.aux_loss = torch.zeros(())

    def _apply(self, fn, recurse=True):
        """``.to(bf16)`` keeps the load statistics fp32 (bf16 counts round at 256: 8,229 tokens would read 8,256)."""
        super()._apply(fn, recurse)
        for name in ("tokens_per_expert", "aux_loss_sum", "n_forwards", "eval_tokens_per_expert"):
            self._buffers[name] = self._buffers[name].float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d_model = x.shape
        routing = self.gate(x)  # over N = B*T tokens; the gate sees (B, T, D) for sequence-wise losses
        x_flat = x.reshape(-1, d_model)  # (N, D)
        out = self._dispatch(x_flat, routing.expert_idx, routing.weights, routing.counts)
        if is_recomputing():  # activation checkpointing's backward pass: this forward was counted already
            return self._add_shared(out, x_flat).view(batch, seq_len, d_model)
        self.aux_loss = routing.aux_loss
        if self.training:
            self.tokens_per_expert += routing.counts.to(self.tokens_per_expert.dtype)
            self.aux_loss_sum += routing.aux_loss.detach().to(self.aux_loss_sum.dtype)
            self.n_forwards += 1
        else:
            self.eval_tokens_per_expert += routing.counts.to(self.eval_tokens_per_expert.dtype)
        return self._add_shared(out, x_flat).view(batch, seq_len, d_model)

    def _add_shared(self, out: torch.Tensor, x_flat: torch.Tensor) -> torch.Tensor:
        return out if self.shared_experts is None else out + self.shared_experts(x_flat)

    def _dispatch(self, x_flat, expert_idx, weights, counts) -> torch.Tensor:
        """x_flat (N, D), expert_idx/weights (N, k), counts (E,) -> output (N, D); every assignment runs (dropless)."""
        n_tokens, d_model = x_flat.shape
        order = expert_idx.reshape(-1).argsort(stable=True)  # (N*k,) assignments grouped by expert
        slots = torch.arange(order.numel(), device=order.device)
        position = torch.empty_like(order).scatter_(0, order, slots)  # (N*k,) sorted row of assignment j
        token_of = order // self.top_k  # (N*k,) source token of each sorted assignment
        # index_select, not x_flat[token_of]: its backward is index_add_, not the CPU's slow accumulating index_put_
        out_sorted = self.experts(x_flat.index_select(0, token_of), counts)  # (N*k, D)
        # back to token order (row t*k + j = token t's j-th expert), then the weighted sum over k as one batched
        # (1, k) @ (k, D) product: a gather, where index_add_ into zeros would scatter
        out_per_token = RowPermutation.apply(out_sorted, position, order).view(n_tokens, self.top_k, d_model)
        combine_w = weights.unsqueeze(1).to(out_sorted.dtype)  # (N, 1, k)
        return torch.bmm(combine_w, out_per_token).view(n_tokens, d_model)


class RowPermutation(torch.autograd.Function):
    """x.index_select(0, perm) for a permutation ``perm``; the backward gathers with ``inverse``, where autograd's
    index_select backward would zero-fill a gradient and scatter-add into it (no index repeats, so a gather does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None
