"""Parameter counts and analytic FLOPs per token (Kaplan et al. 2020, C = 6N + attention term)."""

from __future__ import annotations

from torch import nn


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """total (tied weights once), embedding, and active per token (routed experts counted k of E)."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    inactive = 0
    for moe in model.moe_layers():
        per_expert = moe.experts.expert_params()  # routed experts live in (E, ...) banks
        inactive += per_expert * (moe.n_experts - moe.top_k)
    return {"params_total": total, "params_embedding": embedding, "params_active": total - inactive}


def flops_per_token(model: nn.Module, seq_len: int, d_model: int, n_layers: int, causal: bool = False) -> int:
    """Training FLOPs per token: 6 * (active non-embedding matmul params + lm_head) + 12 * L * T * D (PaLM, App. B),
    the attention term read from each layer's head dims (6 * T * H * (d_qk + d_v), so MLA is counted right;
    ``d_model`` and ``n_layers`` give the same number for MHA and stay in the signature for callers).

    The input embedding is a lookup (no FLOPs); the output head is a matmul, so it counts even when tied.
    ``causal=True`` halves the attention term (the masked half of QK^T and PV is not useful work: the MFU count).
    """
    counts = parameter_counts(model)
    tied = model.lm_head.weight is model.embed_tokens.weight  # else params_active already holds the head
    matmul_params = counts["params_active"] - counts["params_embedding"] + (model.lm_head.weight.numel() if tied else 0)
    # QK^T and PV, fwd + bwd, causal mask not discounted: 6 * T * H * (d_qk + d_v) per layer (= 12 * T * D for MHA)
    attention = sum(6 * seq_len * a.n_heads * (a.qk_head_dim + a.v_head_dim)
                    for a in (layer.self_attn for layer in model.layers))
    return int(6 * matmul_params + (attention // 2 if causal else attention))
