"""Pre-norm layers: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019), both from torch.nn."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# registry: norm.name -> factory(dim, eps)
NORMS: dict[str, Callable[[int, float], nn.Module]] = {
    "layernorm": lambda dim, eps: nn.LayerNorm(dim, eps=eps),
    "rmsnorm": lambda dim, eps: nn.RMSNorm(dim, eps=eps),
}


def build_norm(norm_cfg, dim: int) -> nn.Module:
    """Build the norm named by ``norm.name`` with ``norm.eps``."""
    return NORMS[norm_cfg.name](dim, norm_cfg.eps)
