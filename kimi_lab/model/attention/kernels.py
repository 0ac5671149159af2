"""Causal attention kernels over (B, H, T, d) tensors; every kernel computes softmax(QK^T/sqrt(d) + causal)V.

Each kernel is a function ``(q, k, v, *, dropout_p, scale) -> out``, a label function that names the
implementation that actually ran (recorded in results.json) and the limits of the inputs it takes, which
``validate_config`` reads before a run and the kernel checks at run time; no kernel falls back silently to another.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kimi_lab.config.schema import AttentionKernel


@dataclass(frozen=True)
class KernelLimits:
    """The inputs a kernel takes, per device type ("cpu", "cuda"); the defaults are no limit."""

    max_head_dim: Mapping[str, int] = field(default_factory=dict)  # device type -> the largest q/k head dim
    no_dropout_on: tuple[str, ...] = ()  # device types whose kernel has no attention dropout
    one_head_dim: bool = False  # q/k and v heads of one width


# FlashAttention-2: flash-attn and SDPA's FLASH backend take head dims <= 256 on CUDA; PyTorch's CPU flash kernel
# has no dropout
FLASH_LIMITS = KernelLimits(max_head_dim={"cuda": 256}, no_dropout_on=("cpu",), one_head_dim=True)
_SDPA_BACKENDS = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


class FlashUnavailable(RuntimeError):
    """attention.kernel=flash cannot run here; the message says why and what to set."""


def standard_attention(q, k, v, *, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """Explicit reference (Vaswani et al. 2017, eq. 1): matmul, causal mask *applied* (-inf fill), softmax, matmul.

    q: (B, H, T, d_qk), k: (B, Hkv, T, d_qk), v: (B, Hkv, T, d_v); Hkv divides H (GQA).
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:  # (B, Hkv, T, d) -> (B, H, T, d): each kv head serves n_rep query heads
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, T)
    seq_len = q.shape[-2]
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)  # (B, H, T, d_v)


MATH_QUERY_BLOCK = 256  # queries per SDPA call when SDPA falls back to its math backend (see sdpa_attention)


def _sdpa_causal(q, k, v, *, dropout_p: float, scale: float | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sdpa_backend(q, k, v, *, dropout_p: float = 0.0) -> str | None:
    """The SDPA backend PyTorch dispatches these causal inputs to (``torch._fused_sdp_choice``, the function SDPA
    itself calls): ``flash``, ``math``, ...; None if this private API is unavailable."""
    try:
        choice = torch._fused_sdp_choice(q, k, v, None, dropout_p, True, scale=None,
                                         enable_gqa=q.shape[1] != k.shape[1])
    except (AttributeError, RuntimeError, TypeError):
        return None
    return _SDPA_BACKENDS.get(int(choice), str(int(choice)))


def _in_query_blocks(seq_len: int, backend: str | None) -> bool:
    return seq_len > MATH_QUERY_BLOCK and backend == "math"


def query_blocked_attention(q, k, v, *, block: int, dropout_p: float = 0.0,
                            scale: float | None = None) -> torch.Tensor:
    """Causal attention as one SDPA math call per query block [s, e) over keys [0, e) with its causal mask.

    Written by hand because SDPA's math backend (on CPU the only one that takes d_v != d_qk, e.g. MLA) builds the
    whole (T, T) score matrix and masks half of it; blocks skip the masked key range of every earlier block
    (3/8 of the work at 4 blocks) and hold one block's scores at a time. Exact: every query sees the same keys.
    q: (B, H, T, d_qk), k: (B, Hkv, T, d_qk), v: (B, Hkv, T, d_v) -> (B, H, T, d_v).
    """
    seq_len, outs = q.shape[-2], []
    with sdpa_kernel([SDPBackend.MATH]):  # the backend the label names, whatever a mask would make SDPA pick
        for start in range(0, seq_len, block):
            end = min(seq_len, start + block)
            allowed = torch.ones(end - start, end, dtype=torch.bool, device=q.device).tril(start)  # (Tq, Tk)
            outs.append(F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=allowed, dropout_p=dropout_p,
                scale=scale, enable_gqa=q.shape[1] != k.shape[1]))  # (B, H, Tq, d_v)
    return torch.cat(outs, dim=2)


def sdpa_attention(q, k, v, *, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention, causal, PyTorch picks the backend; where it picks the math
    backend and T > MATH_QUERY_BLOCK, the queries go in causal blocks (``query_blocked_attention``; eager only)."""
    seq_len = q.shape[-2]
    # ask only if long; never under torch.compile, whose graph picks the kernel (and the query would break it)
    asked = seq_len > MATH_QUERY_BLOCK and not torch.compiler.is_compiling()
    backend = sdpa_backend(q, k, v, dropout_p=dropout_p) if asked else None
    if _in_query_blocks(seq_len, backend):
        return query_blocked_attention(q, k, v, block=MATH_QUERY_BLOCK, dropout_p=dropout_p, scale=scale)
    return _sdpa_causal(q, k, v, dropout_p=dropout_p, scale=scale)


def sdpa_label(q, k, v, *, dropout_p: float = 0.0) -> str:
    """``sdpa_auto_<backend>_<device>`` (e.g. ``sdpa_auto_flash_cpu``), ``+query_blocks`` when the math backend
    runs in query blocks; plain ``sdpa_auto`` if the backend cannot be asked."""
    backend = sdpa_backend(q, k, v, dropout_p=dropout_p)
    if backend is None:
        return "sdpa_auto"
    blocks = "+query_blocks" if _in_query_blocks(q.shape[-2], backend) else ""
    return f"sdpa_auto_{backend}_{q.device.type}{blocks}"


# ------------------------------------------------------------------------------------------ FlashAttention-2


def _flash_attn_module():
    """The `flash` extra (flash-attn), imported lazily; None when it is not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.import_module("flash_attn")
    except ImportError as err:  # installed but broken (e.g. built for another torch/CUDA): say so, never reroute
        raise FlashUnavailable(f"flash-attn is installed but does not import ({err}); reinstall it for this torch, "
                               "or uninstall it to use SDPA's FLASH_ATTENTION backend, or set "
                               "attention.kernel=sdpa") from err


def flash_route(device_type: str) -> str:
    """Label of the FlashAttention-2 implementation used on ``device_type``; raises FlashUnavailable if none."""
    if device_type == "cpu":
        return "sdpa_flash_cpu"  # PyTorch's CPU flash kernel
    if device_type == "cuda":
        module = _flash_attn_module()
        return f"flash_attn_{module.__version__}" if module is not None else "sdpa_flash_cuda"
    raise FlashUnavailable(f"attention.kernel=flash cannot run on device '{device_type}' (FlashAttention-2 exists for "
                           "CUDA and, through PyTorch SDPA, CPU); set attention.kernel=sdpa or "
                           "attention.kernel=standard")


def check_flash(device_type: str, dtype: torch.dtype, qk_head_dim: int, v_head_dim: int, dropout_p: float) -> str:
    """Every reason FlashAttention-2 cannot take these inputs (FLASH_LIMITS), as one clear error; else the route
    label."""
    route = flash_route(device_type)
    fix = "set attention.kernel=sdpa (PyTorch picks a kernel) or attention.kernel=standard"
    if FLASH_LIMITS.one_head_dim and qk_head_dim != v_head_dim:
        raise FlashUnavailable(f"FlashAttention-2 needs equal q/k and v head dims, got {qk_head_dim} and "
                               f"{v_head_dim}; {fix}")
    if device_type in FLASH_LIMITS.no_dropout_on and dropout_p > 0:
        raise FlashUnavailable(f"PyTorch's CPU flash kernel has no dropout (attention.dropout={dropout_p}); "
                               f"set attention.dropout=0 or {fix}")
    if device_type == "cpu" and dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise FlashUnavailable(f"PyTorch's CPU flash kernel does not take {dtype}; {fix}")
    max_dim = FLASH_LIMITS.max_head_dim.get(device_type)
    if max_dim is not None and qk_head_dim > max_dim:
        raise FlashUnavailable(f"FlashAttention-2 on {device_type.upper()} supports head dims <= {max_dim}, got "
                               f"{qk_head_dim}; use more heads (attention.n_heads) or {fix}")
    return route


def _half_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype FA2 computes in on CUDA: the input's, else autocast's, else bf16 (fp16 before Ampere)."""
    if dtype in (torch.float16, torch.bfloat16):
        return dtype
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def flash_attention(q, k, v, *, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """FlashAttention-2 (Dao 2023) or an error, never another kernel: flash-attn's ``flash_attn_func`` on CUDA when
    the `flash` extra is installed, else SDPA restricted to its FLASH_ATTENTION backend (CUDA or CPU).
    On CUDA, fp32 q/k/v are cast to bf16/fp16 for the kernel and the output back to the input dtype."""
    device_type = q.device.type
    route = check_flash(device_type, q.dtype, q.shape[-1], v.shape[-1], dropout_p)
    out_dtype = q.dtype
    if device_type == "cuda":
        half = _half_dtype(device_type, q.dtype)
        q, k, v = q.to(half), k.to(half), v.to(half)
    if route.startswith("flash_attn_"):
        from flash_attn import flash_attn_func

        # flash-attn takes (B, T, H, d) and handles Hkv < H (GQA) itself
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                              softmax_scale=scale, causal=True).transpose(1, 2)
    else:
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                out = _sdpa_causal(q, k, v, dropout_p=dropout_p, scale=scale)
        except RuntimeError as err:  # SDPA's own refusal ("No available kernel"), with its warnings' reasons
            raise FlashUnavailable(f"SDPA's FLASH_ATTENTION backend refused these inputs (dtype {q.dtype}, shapes "
                                   f"{tuple(q.shape)}/{tuple(v.shape)}): {err}; set attention.kernel=sdpa or "
                                   "attention.kernel=standard") from err
    return out.to(out_dtype)


class Kernel(NamedTuple):
    fn: Callable[..., torch.Tensor]  # (q, k, v, *, dropout_p, scale) -> out
    label: Callable[..., str]  # (q, k, v, *, dropout_p) -> name of what actually ran
    limits: KernelLimits = KernelLimits()


# registry: attention.kernel -> Kernel (for either attention.type)
KERNELS: dict[AttentionKernel, Kernel] = {
    AttentionKernel.standard: Kernel(standard_attention, lambda q, k, v, dropout_p=0.0: "math_explicit"),
    AttentionKernel.sdpa: Kernel(sdpa_attention, sdpa_label),
    AttentionKernel.flash: Kernel(flash_attention, lambda q, k, v, dropout_p=0.0: flash_route(q.device.type),
                                  FLASH_LIMITS),
}


def kernel_limits(kernel: AttentionKernel) -> KernelLimits:
    """What ``kernel`` takes (``validate_config`` asks before a run; ``KeyError`` for an unknown kernel)."""
    return KERNELS[kernel].limits


def planned_label(kernel: AttentionKernel, device_type: str, dtype: torch.dtype, qk_head_dim: int, v_head_dim: int,
                  dropout_p: float) -> str:
    """The label a kernel will record on ``device_type`` before any forward; raises if flash cannot run there.
    SDPA's backend depends on the inputs, so before a forward it is ``sdpa_auto``."""
    if kernel == AttentionKernel.flash:
        return check_flash(device_type, dtype, qk_head_dim, v_head_dim, dropout_p)
    return {AttentionKernel.standard: "math_explicit", AttentionKernel.sdpa: "sdpa_auto"}[kernel]


class KernelRunner:
    """Calls one registered kernel and remembers the label of what ran (from training forwards, else the first)."""

    def __init__(self, name: AttentionKernel):
        self.name = name
        self.fn, self._label, _ = KERNELS[name]
        self.last: str | None = None

    def __call__(self, q, k, v, *, dropout_p: float, scale: float | None, training: bool) -> torch.Tensor:
        # under torch.compile the graph decides the kernel, and asking SDPA's dispatcher would break the graph
        if (training or self.last is None) and not torch.compiler.is_compiling():
            self.last = self._label(q, k, v, dropout_p=dropout_p)
        return self.fn(q, k, v, dropout_p=dropout_p, scale=scale)
