"""Norm layers' share of a training step: forward+backward of every norm at the run's shapes vs the whole model.

    python -m kimi_lab.bench norm [overrides ...]      e.g. model=small norm=layernorm

The CPU number is kernel-limited (torch.nn.RMSNorm is a composite there; see ``norm_kernel``): report it so a
study does not read a kernel difference as a method difference.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lab.bench._norm_profile import median_ms, norm_fwd_bwd_ms, norm_input_shapes, norm_kernel, norm_layers

def model_fwd_bwd_ms(model: nn.Module, batch_size: int, seq_len: int, repeats: int = 3) -> float:
    """Median ms of forward + cross-entropy backward of the whole model on (B, T) token ids."""
    device = next(model.parameters()).device
    vocab = model.lm_head.weight.shape[0]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        ids = torch.randint(0, vocab, (batch_size, seq_len + 1), device=device)

        def step():
            logits = model(ids[:, :-1]).logits  # (B, T, V)
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()

        ms = median_ms(step, device, repeats)
    model.zero_grad(set_to_none=True)
    return ms


def main(argv: list[str]) -> int:
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from kimi_lab.config import register_configs
    from kimi_lab.model import build_model

    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=argv)  # as train.py composes it
    torch.manual_seed(0)
    model = build_model(cfg)
    batch, seq = cfg.data.batch_size, cfg.data.seq_len
    norm_ms = norm_fwd_bwd_ms(norm_layers(model), norm_input_shapes(model, batch, seq))
    model_ms = model_fwd_bwd_ms(model, batch, seq)
    result = {"norm": cfg.norm.name, "eps": cfg.norm.eps, "batch_size": batch, "seq_len": seq,
              "threads": torch.get_num_threads(), "norm_kernel": norm_kernel(model.norm),
              "norm_fwd_bwd_ms": norm_ms, "model_fwd_bwd_ms": model_ms, "norm_time_share": norm_ms / model_ms}
    print(json.dumps(result, indent=2))
    return 0
