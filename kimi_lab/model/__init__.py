"""Model layer: plain torch.nn, no Lightning or data imports. ``build_model(cfg)`` is the entry point."""

from __future__ import annotations

from kimi_lab.model.stats import flops_per_token, parameter_counts
from kimi_lab.model.transformer import CausalLMOutput, Transformer


def build_model(cfg) -> Transformer:
    """Language model from a composed config: ``model(input_ids (B, T)) -> CausalLMOutput(.logits (B, T, V))``."""
    return Transformer(cfg, max_seq_len=cfg.data.seq_len)


__all__ = ["CausalLMOutput", "Transformer", "build_model", "flops_per_token", "parameter_counts"]
