"""Decoder-only pre-norm transformer (GPT-2 layout, Radford et al. 2019) with pluggable attention, norm and FFN."""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimi_lab.model.attention import build_attention
from kimi_lab.model.moe import MoE, build_ffn, recomputing
from kimi_lab.model.norm import build_norm
from kimi_lab.model.rope import RotaryEmbedding


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None  # (B, T, vocab); None when the forward was asked for hidden states only
    aux_loss: torch.Tensor  # scalar: sum of the MoE balance losses (0 for dense models)
    hidden: torch.Tensor | None = None  # (B, T, D) final-norm output (the head's input), with return_hidden=True


class Block(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        d_model = cfg.model.d_model
        self.input_layernorm = build_norm(cfg.norm, d_model)
        self.self_attn = build_attention(d_model, cfg.attention, cfg.norm if cfg.norm.qk_norm else None, cfg.rope)
        self.post_attention_layernorm = build_norm(cfg.norm, d_model)
        self.mlp = build_ffn(d_model, cfg.model.d_ff, cfg.moe, layer_idx)
        self.dropout = nn.Dropout(cfg.model.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg, max_seq_len: int):
        super().__init__()
        d_model, vocab = cfg.model.d_model, cfg.model.vocab_size
        self.embed_tokens = nn.Embedding(vocab, d_model)
        self.dropout = nn.Dropout(cfg.model.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.model.n_layers))
        self.norm = build_norm(cfg.norm, d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        if cfg.model.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # each attention module declares the width RoPE rotates (MLA: qk_rope_head_dim, not d_model / n_heads) and
        # whether the shared cos/sin carry the rotary's YaRN attention factor (an attention that rotates only part
        # of q/k scales its softmax itself)
        attention = self.layers[0].self_attn
        self.rotary = RotaryEmbedding(attention.rope_head_dim, max_seq_len, cfg.rope)
        self.scale_rotary_tables = attention.scales_rope_tables
        # hardware.activation_checkpointing: keep only each block's input, recompute its inside in backward
        self.activation_checkpointing = cfg.hardware.activation_checkpointing
        self._init_weights(cfg.model.init_std, cfg.model.n_layers)

    def _init_weights(self, std: float, n_layers: int) -> None:
        """N(0, std) everywhere; residual output projections scaled by 1/sqrt(2L) (GPT-2).

        Each weight draws from its own generator, seeded by the run's seed and the parameter's name, not from the
        global stream that the modules' default inits consumed first: arms of a study that share a parameter
        (embeddings, the MLPs next to a swapped attention, ...) start from the same values for the same seed."""
        seed = torch.initial_seed()  # the run's seed (seed_everything), however much of the stream was consumed
        for name, param in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.dim() >= 2:
                is_residual_out = name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj"))
                generator = torch.Generator(param.device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()))
                                                                      % 2**63)
                nn.init.normal_(param, 0.0, std / math.sqrt(2 * n_layers) if is_residual_out else std,
                                generator=generator)
            elif "norm" in name and name.endswith("weight"):
                nn.init.ones_(param)

    def forward(self, input_ids: torch.Tensor, return_hidden: bool = False) -> CausalLMOutput:
        """Logits (B, T, V); with ``return_hidden`` the head's input (B, T, D) instead, for a loss that applies
        the head itself in chunks (``kimi_lab.model.loss.linear_cross_entropy``)."""
        _, seq_len = input_ids.shape  # (B, T)
        cos, sin = self.rotary(seq_len, apply_attention_scaling=self.scale_rotary_tables)
        x = self.dropout(self.embed_tokens(input_ids))  # (B, T, D)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # recomputing() tells the MoE layers not to count the recomputed forward in their load statistics
                x = checkpoint(layer, x, cos, sin, use_reentrant=False,
                               context_fn=lambda: (contextlib.nullcontext(), recomputing()))
            else:
                x = layer(x, cos, sin)
        hidden = self.norm(x)  # (B, T, D)
        if return_hidden:
            return CausalLMOutput(logits=None, aux_loss=self.aux_loss(hidden), hidden=hidden)
        logits = self.lm_head(hidden)  # (B, T, vocab)
        return CausalLMOutput(logits=logits, aux_loss=self.aux_loss(logits))

    def aux_loss(self, like: torch.Tensor) -> torch.Tensor:
        """Sum of this forward's MoE balance losses. The layers drop theirs, so the model holds no autograd graph
        between steps (and deep-copies, e.g. for an EMA)."""
        layers = self.moe_layers()
        if not layers:
            return like.new_zeros(())
        total = torch.stack([m.aux_loss for m in layers]).sum()
        for m in layers:
            m.aux_loss = total.new_zeros(())
        return total

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def attention_kernel(self, device_type: str | None = None) -> str:
        """Label of the attention kernel the last forward ran (e.g. ``sdpa_flash_cpu``); before any forward, or for
        an explicit ``device_type``, the one it will run there (raises if the requested kernel cannot run)."""
        return self.layers[0].self_attn.kernel_label(device_type)
