"""Rotary position embedding (Su et al. 2021, RoFormer eq. 34), HF ``rotate_half`` convention, with length scaling.

Scaling types follow ``transformers.modeling_rope_utils`` (tested against it, never imported here):
``linear`` position interpolation (Chen et al. 2023), ``dynamic`` NTK-aware scaling (bloc97/emozilla, as in HF),
``yarn`` (Peng et al. 2023, arXiv:2309.00071, eq. 19-20 ramp + sec. 3.4 attention factor).
``rope.scaling.dynamic_factor``: linear and yarn take factor s = max(1, T / original length) at each forward
length T (YaRN sec. 3.3 "Dynamic Scaling"; Dynamic-PI / Dynamic-YaRN, their training-free use on a model
pretrained with plain RoPE); dynamic NTK adapts its base to T by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn


def default_inv_freq(head_dim: int, theta: float, scaling_cfg=None, **_) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/d), i = 0 .. d/2-1 (no length scaling); float64 (d/2,)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return 1.0 / (theta**exponents)


def linear_inv_freq(head_dim: int, theta: float, scaling_cfg, **_) -> torch.Tensor:
    """Position interpolation (Chen et al. 2023): positions divided by factor == inv_freq / factor (HF 'linear')."""
    return default_inv_freq(head_dim, theta) / scaling_cfg.factor


def dynamic_inv_freq(head_dim: int, theta: float, scaling_cfg, *, seq_len: int, original_len: int) -> torch.Tensor:
    """Dynamic NTK: base' = base * (factor * L / L_orig - (factor - 1))^(d / (d - 2)), only when L > L_orig."""
    seq_len = max(seq_len, original_len)  # within the original length: plain RoPE
    factor = scaling_cfg.factor
    base = theta * (factor * seq_len / original_len - (factor - 1)) ** (head_dim / (head_dim - 2))
    return default_inv_freq(head_dim, base)


def _yarn_correction_dim(rotations: float, head_dim: int, theta: float, original_len: int) -> float:
    """Dimension index whose wavelength fits ``rotations`` full turns into the original length (YaRN eq. 17)."""
    return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(head_dim: int, theta: float, scaling_cfg, *, original_len: int, **_) -> torch.Tensor:
    """YaRN 'NTK-by-parts': extrapolate fast dims, interpolate (/factor) slow dims, linear ramp between.

    The ramp bounds come from beta_fast / beta_slow rotations over the ORIGINAL length (not the extended one,
    cf. Megatron-LM#1418); bounds floor/ceil-truncated as HF's default ``truncate=True``.
    """
    factor = scaling_cfg.factor
    low = math.floor(_yarn_correction_dim(scaling_cfg.beta_fast, head_dim, theta, original_len))
    high = math.ceil(_yarn_correction_dim(scaling_cfg.beta_slow, head_dim, theta, original_len))
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp (as HF)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)  # (d/2,)
    extrapolation = default_inv_freq(head_dim, theta)
    return extrapolation / factor * ramp + extrapolation * (1 - ramp)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's m(s) = 0.1 * mscale * ln(s) + 1 for s > 1, else 1 (Peng et al. 2023, sec. 3.4; DeepSeek's mscale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling_cfg) -> float:
    """Factor on cos/sin (so on q.k: its square). YaRN: 0.1 ln(s) + 1, or the mscale/mscale_all_dim ratio; else 1."""
    if scaling_cfg is None or scaling_type(scaling_cfg) != "yarn":
        return 1.0
    factor = scaling_cfg.factor
    mscale, mscale_all_dim = scaling_cfg.mscale, scaling_cfg.mscale_all_dim
    if mscale and mscale_all_dim:  # DeepSeek-V2/V3 convention
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


# registry: rope.scaling.type -> inv_freq builder (head_dim, theta, scaling_cfg, seq_len=, original_len=) -> (d/2,)
ROPE_INV_FREQ: dict[str, Callable[..., torch.Tensor]] = {
    "default": default_inv_freq,
    "linear": linear_inv_freq,
    "dynamic": dynamic_inv_freq,
    "yarn": yarn_inv_freq,
}


def scaling_type(scaling_cfg) -> str:
    """``rope.scaling.type`` (a StrEnum, equal to its string); ``default`` when there is no scaling."""
    return "default" if scaling_cfg is None else scaling_cfg.type


DYNAMIC_FACTOR_TYPES = ("linear", "yarn")  # the scalings ``dynamic_factor`` applies to


def dynamic_factor(scaling_cfg) -> bool:
    """Whether the scaling's factor follows the forward length (``rope.scaling.dynamic_factor``, linear/yarn)."""
    return scaling_type(scaling_cfg) in DYNAMIC_FACTOR_TYPES and scaling_cfg.dynamic_factor


def scaling_at_length(scaling_cfg, seq_len: int, original_len: int):
    """The scaling applied to a ``seq_len``-token forward: with ``dynamic_factor``, a copy whose factor is
    max(1, seq_len / original_len) (YaRN sec. 3.3); otherwise ``scaling_cfg`` itself."""
    if not dynamic_factor(scaling_cfg):
        return scaling_cfg
    keys = ("type", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    return SimpleNamespace(**{k: getattr(scaling_cfg, k) for k in keys}, dynamic_factor=False,
                           factor=max(1.0, seq_len / original_len), original_max_position_embeddings=original_len)


class RotaryEmbedding(nn.Module):
    """cos/sin tables, built for 0..max_seq_len-1 and extended on demand (then cached) for longer sequences.

    ``forward(seq_len)`` returns (cos, sin), each (seq_len, head_dim), multiplied by ``attention_scaling``
    (the YaRN mscale; 1 otherwise), which is right where all of q and k are rotated. An attention that rotates only
    part of q/k passes ``apply_attention_scaling=False`` and scales its softmax itself. ``max_seq_len`` is the
    training length: the default ``original_max_position_embeddings`` of dynamic NTK and YaRN. Dynamic NTK and
    ``dynamic_factor`` scalings build one table per forward length past the original length (``applied_factor`` /
    ``attention_scaling`` follow it).
    """

    def __init__(self, head_dim: int, max_seq_len: int, rope_cfg):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, rope_cfg.theta
        self.scaling = rope_cfg.scaling
        self.scaling_type = scaling_type(self.scaling)
        original = self.scaling.original_max_position_embeddings if self.scaling else None
        self.original_max_seq_len = original or max_seq_len
        self.attention_scaling = attention_factor(scaling_at_length(self.scaling, 0, self.original_max_seq_len))
        self.per_length = self.scaling_type == "dynamic" or dynamic_factor(self.scaling)
        self._table_key = -1  # seq_len the per-length table was built for (-1: the static table)
        cos, sin = self._tables(max_seq_len, self._inv_freq(0), torch.device("cpu"))  # dynamic: plain within L_orig
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _inv_freq(self, seq_len: int) -> torch.Tensor:
        scaling = scaling_at_length(self.scaling, seq_len, self.original_max_seq_len)
        return ROPE_INV_FREQ[self.scaling_type](self.head_dim, self.theta, scaling, seq_len=seq_len,
                                                original_len=self.original_max_seq_len)

    @property
    def applied_factor(self) -> float:
        """The scaling factor of the table in use: 1 for plain RoPE and for dynamic NTK within the original length,
        max(1, T / original) with ``dynamic_factor``, else ``rope.scaling.factor``."""
        if self.scaling_type == "default" or (self.scaling_type == "dynamic" and self._table_key < 0):
            return 1.0
        scaling = scaling_at_length(self.scaling, max(self._table_key, 0), self.original_max_seq_len)
        return scaling.factor

    @staticmethod
    def _tables(length: int, inv_freq: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (T, d/2), float64
        angles = torch.cat([freqs, freqs], dim=-1)  # (T, d)
        return angles.cos().float().to(device), angles.sin().float().to(device)

    def forward(self, seq_len: int, apply_attention_scaling: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_length and seq_len > self.original_max_seq_len:
            key = seq_len  # NTK base / dynamic factor depend on the current length: one table per length
        else:
            key = -1
        if key != self._table_key or seq_len > self.cos.shape[0]:
            length = seq_len if key > 0 else max(seq_len, self.cos.shape[0])
            self.cos, self.sin = self._tables(length, self._inv_freq(max(key, 0)), self.cos.device)
            self._table_key = key
            self.attention_scaling = attention_factor(scaling_at_length(self.scaling, max(key, 0),
                                                                        self.original_max_seq_len))
        cos, sin = self.cos[:seq_len], self.sin[:seq_len]
        if apply_attention_scaling and self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, d); cos/sin: (T, d). Computed in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin
