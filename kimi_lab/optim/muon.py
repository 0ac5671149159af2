"""Muon (Jordan et al. 2024; Liu et al. 2025 "Muon is Scalable", eq. 4) for hidden matrices + AdamW for the rest,
as ONE ``torch.optim.Optimizer`` so Lightning's automatic optimisation (accumulation, clipping, LambdaLR,
LearningRateMonitor, checkpoints) works unchanged.

2-D hidden weights go to ``torch.optim.Muon``; 3-D expert banks (E, out, in) go to ``ExpertBankMuon``, written by
hand because torch.optim.Muon accepts only 2-D parameters: the same update, Newton-Schulz batched over experts.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr

NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)  # quintic (3.4445, -4.7750, 2.0315)
# AdamW, whatever the shape: embeddings, output head, norms, router gate (``...mlp.gate.weight``), biases
ADAMW_NAMES = re.compile(r"(embed_tokens|lm_head|norm|(^|\.)gate\.weight$|bias$)")
# expert banks whose dim 1 stacks two matrices (gate and up halves of SwiGLU): orthogonalised separately
SPLIT_BANKS = {"gate_up_proj": 2}


def batched_newton_schulz(grad: torch.Tensor, ns_steps: int, eps: float = EPS,
                          coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> torch.Tensor:
    """torch.optim.Muon's ``_zeropower_via_newtonschulz`` batched over the leading dim: (E, m, n) -> (E, m, n) bf16.

    X <- a X + (b A + c A^2) X with A = X X^T, after X / ||X||_F per slice (Jordan et al. 2024, quintic NS).
    """
    a, b, c = coefficients
    x = grad.bfloat16()
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = x.transpose(-2, -1)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.transpose(-2, -1)  # (E, m, m)
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.transpose(-2, -1) if tall else x


class ExpertBankMuon(torch.optim.Optimizer):
    """Muon on 3-D banks (E, out, in): per expert (and per half for ``split`` > 1), exactly torch.optim.Muon's rule:
    buf = lerp(buf, g, 1 - mu); u = lerp(g, buf, mu) if nesterov else buf; p *= 1 - lr wd; p -= lr' NS(u)."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, nesterov: bool, ns_steps: int,
                 adjust_lr_fn: str, eps: float = EPS):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, eps=eps, split=1)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 3 or p.shape[1] % group["split"]:
                    raise ValueError(f"expert bank must be (E, out, in) with out divisible by {group['split']}, "
                                     f"got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu, split = group["lr"], group["weight_decay"], group["momentum"], group["split"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                experts, out, inp = update.shape
                halves = update.reshape(experts * split, out // split, inp)  # (E*split, out/split, in)
                ortho = batched_newton_schulz(halves, group["ns_steps"], group["eps"]).reshape(experts, out, inp)
                adjusted = _adjust_lr(lr, group["adjust_lr_fn"], halves.shape[1:])
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-adjusted)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer object owning Muon (2-D), ExpertBankMuon (3-D) and AdamW; ``param_groups`` and ``state`` are
    the sub-optimizers' own (shared dicts), so schedulers, clipping and state_dict see every group."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        groups = [group for opt in optimizers for group in opt.param_groups]
        super().__init__(groups, defaults={})  # keeps the same group dicts (add_param_group appends them)
        for opt in optimizers:  # any state the sub-optimizers already hold (disjoint parameters) moves here
            self.state.update(opt.state)
        self._share_state()

    def _share_state(self) -> None:
        """Point every sub-optimizer at this object's groups and (one, disjoint-keyed) state dict."""
        start = 0
        for opt in self.optimizers:
            count = len(opt.param_groups)
            opt.param_groups = self.param_groups[start:start + count]
            start += count
            opt.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.param_groups / self.state with new objects
        self._share_state()


def _kind(name: str, param: nn.Parameter) -> str:
    if param.ndim < 2 or ADAMW_NAMES.search(name):
        return "adamw"
    if param.ndim == 2:
        return "muon"
    if param.ndim == 3:
        return "muon_expert_bank"
    raise ValueError(f"no optimizer rule for {name} with shape {tuple(param.shape)} (expected <= 3 dims)")


def split_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """kind -> [(name, param)]; tied weights once (under their first name)."""
    kinds: dict[str, list[tuple[str, nn.Parameter]]] = defaultdict(list)
    for name, param in model.named_parameters():  # named_parameters() already yields a tied tensor once
        if param.requires_grad:
            kinds[_kind(name, param)].append((name, param))
    return kinds


def build_muon(model: nn.Module, opt_cfg) -> MuonWithAdamW:
    kinds = split_parameters(model)
    # adjust_lr_fn as a plain str: param groups are pickled into checkpoints, whose weights_only load refuses enums
    muon_kw = dict(lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay, momentum=opt_cfg.momentum,
                   nesterov=opt_cfg.nesterov, ns_steps=opt_cfg.ns_steps, adjust_lr_fn=opt_cfg.adjust_lr_fn.value)
    optimizers: list[torch.optim.Optimizer] = []
    if kinds["muon"]:
        optimizers.append(torch.optim.Muon([{"params": [p for _, p in kinds["muon"]], "kind": "muon"}], **muon_kw))
    banks = kinds["muon_expert_bank"]
    if banks:
        by_split: dict[int, list] = defaultdict(list)
        for name, p in banks:
            parts = name.split(".")  # e.g. layers.0.mlp.experts.gate_up_proj (or ...gate_up_proj.weight)
            by_split[next((n for key, n in SPLIT_BANKS.items() if key in parts), 1)].append(p)
        groups = [{"params": ps, "split": split, "kind": "muon_expert_bank"} for split, ps in sorted(by_split.items())]
        optimizers.append(ExpertBankMuon(groups, **muon_kw))
    adamw = kinds["adamw"]
    decay = [p for _, p in adamw if p.ndim >= 2]  # embeddings / head decay, 1-D gains and biases do not
    no_decay = [p for _, p in adamw if p.ndim < 2]
    adamw_groups = [{"params": ps, "weight_decay": wd, "kind": "adamw"} for ps, wd in
                    ((decay, opt_cfg.weight_decay), (no_decay, 0.0)) if ps]
    if adamw_groups:
        optimizers.append(torch.optim.AdamW(adamw_groups, lr=opt_cfg.adamw_lr, betas=tuple(opt_cfg.betas),
                                            eps=opt_cfg.eps))
    return MuonWithAdamW(optimizers)


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def describe_assignment(model: nn.Module, optimizer: torch.optim.Optimizer, default_kind: str) -> dict:
    """kind -> {count, numel, patterns}: which parameters each optimizer (group kind) updates, for results.json."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict] = {}
    for group in optimizer.param_groups:
        entry = out.setdefault(group.get("kind", default_kind), {"count": 0, "numel": 0, "patterns": set()})
        for p in group["params"]:
            entry["count"] += 1
            entry["numel"] += p.numel()
            entry["patterns"].add(_pattern(names.get(id(p), "?")))
    return {k: {**v, "patterns": sorted(v["patterns"])} for k, v in out.items()}
