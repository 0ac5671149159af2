"""Optimizer registry and the LR schedule (counted in optimizer steps, never micro-batches)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from kimi_lab.optim.muon import MuonWithAdamW, build_muon, describe_assignment


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (incl. embeddings); no decay on norm gains, biases and other 1-D tensors."""
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _adam(model: nn.Module, opt_cfg) -> torch.optim.Optimizer:
    # Adam's weight_decay is an L2 term added to the gradient (Kingma & Ba 2015 + L2).
    groups = param_groups(model, opt_cfg.weight_decay)
    return torch.optim.Adam(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)


def _adamw(model: nn.Module, opt_cfg) -> torch.optim.Optimizer:
    # Decoupled weight decay (Loshchilov & Hutter 2019).
    groups = param_groups(model, opt_cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps)


# registry: optimizer.name -> builder(model, opt_cfg)
OPTIMIZERS: dict[str, Callable[[nn.Module, object], torch.optim.Optimizer]] = {
    "adam": _adam,
    "adamw": _adamw,
    "muon": build_muon,  # Muon (hidden matrices, expert banks) + AdamW (the rest) in one optimizer object
}


def build_optimizer(model: nn.Module, opt_cfg) -> torch.optim.Optimizer:
    return OPTIMIZERS[opt_cfg.name](model, opt_cfg)


def lr_multiplier(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float, schedule: str) -> float:
    """Multiplier of the peak lr before optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps`` (step 0 already trains at lr/warmup), then cosine decay that
    reaches ``min_lr_ratio`` exactly at the last step ``max_steps - 1`` (or constant).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, opt_cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    kwargs = dict(warmup_steps=opt_cfg.warmup_steps, max_steps=max_steps, min_lr_ratio=opt_cfg.min_lr_ratio,
                  schedule=opt_cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, **kwargs))


__all__ = ["OPTIMIZERS", "MuonWithAdamW", "build_optimizer", "build_scheduler", "describe_assignment", "lr_multiplier",
           "param_groups"]
