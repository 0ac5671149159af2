"""FFN registry: ``moe.name`` -> factory(d_model, d_ff, moe_cfg)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kimi_lab.model.mlp import SwiGLU
from kimi_lab.model.moe.experts import GroupedExperts, grouped_linear, grouped_mm_runs
from kimi_lab.model.moe.layer import MoE
from kimi_lab.model.moe.recompute import recomputing
from kimi_lab.model.moe.router import (ROUTERS, Router, Routing, TopkMethod, load_balance_loss,
                                       sequence_balance_loss, update_expert_biases)

FFNS: dict[str, Callable[[int, int, object], nn.Module]] = {
    "dense": lambda d_model, d_ff, cfg: SwiGLU(d_model, d_ff),
    "moe": lambda d_model, d_ff, cfg: MoE(d_model, cfg),
}


def build_ffn(d_model: int, d_ff: int, moe_cfg, layer_idx: int) -> nn.Module:
    """Layers below ``first_k_dense_replace`` stay dense (DeepSeek-V3 layout)."""
    name = "dense" if layer_idx < moe_cfg.first_k_dense_replace else moe_cfg.name
    return FFNS[name](d_model, d_ff, moe_cfg)


__all__ = ["FFNS", "ROUTERS", "GroupedExperts", "MoE", "Router", "Routing", "TopkMethod", "build_ffn",
           "grouped_linear", "grouped_mm_runs", "load_balance_loss", "recomputing", "sequence_balance_loss",
           "update_expert_biases"]
