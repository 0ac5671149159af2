"""A plain-PyTorch dense GPT of the framework's shape (nanoGPT-style: Karpathy's model.py, SwiGLU FFN, RMSNorm, fused
QKV, SDPA, tied head, no RoPE), the reference the training benchmark prints the framework's overhead against."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


class PlainBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_up, self.down = nn.Linear(d, 2 * d_ff, bias=False), nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)  # (B, T, H, hd)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainGPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_layers: int, n_heads: int, d_ff: int, seq_len: int):
        super().__init__()
        self.shape = (vocab, d, n_layers, n_heads, d_ff, seq_len)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PlainBlock(d, n_heads, d_ff) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    @classmethod
    def from_config(cls, cfg) -> PlainGPT:
        return cls(cfg.model.vocab_size, cfg.model.d_model, cfg.model.n_layers,
                   cfg.attention.n_heads, cfg.model.d_ff, cfg.data.seq_len)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # (B, T, V)

    def flops_per_token(self) -> int:
        """The benchmark's formula: 6 * (L * (4 d^2 + 3 d d_ff) + V d) + 3 * L * T * 2 d (causal attention)."""
        vocab, d, n_layers, _, d_ff, seq_len = self.shape
        return 6 * (n_layers * (4 * d * d + 3 * d * d_ff) + vocab * d) + 3 * n_layers * seq_len * 2 * d


def plain_step_fn(model: PlainGPT, cfg, batches: list, device: str):
    """step(i) -> (step seconds, optimizer seconds): full-logits CE, clipping, AdamW (as the framework's default)."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                            weight_decay=cfg.optimizer.weight_decay)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.hardware.precision == "bf16-mixed")

    def step(i: int) -> tuple[float, float]:
        ids, targets = batches[i % len(batches)]
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(ids).float().flatten(0, 1), targets.flatten())
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        opt_start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        return end - start, end - opt_start

    return step
