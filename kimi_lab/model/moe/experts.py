"""Routed experts as 3-D parameter banks, run as grouped matmuls over tokens sorted by expert.

Layout of transformers' ``DeepseekV3Experts`` (so a layer's state dict maps 1:1): ``gate_up_proj`` (E, 2I, H) holds
each expert's SwiGLU gate rows [0, I) and up rows [I, 2I); ``down_proj`` is (E, H, I). Expert e is the SwiGLU
``down[e] @ (silu(gate[e] @ x) * (up[e] @ x))`` (Shazeer 2020, eq. 6); every matrix is a plain 2-D slice of a bank,
so a per-expert optimizer (Muon) can orthogonalise ``gate_up_proj[e, :I]``, ``gate_up_proj[e, I:]``,
``down_proj[e]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# torch >= 2.10 exposes F.grouped_mm; torch 2.9 only the private op (CPU kernel from 2.9, CUDA sm80+)
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused grouped GEMM accepts these operands: fp32/bf16/fp16 (no float64), rows and base pointers
    aligned to 16 bytes, a CPU kernel (torch >= 2.9) or a CUDA device of compute capability >= 8.0."""
    if _GROUPED_MM is None or x.dtype not in _GROUPED_MM_DTYPES or weight.dtype != x.dtype:
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    if torch.compiler.is_compiling():  # traced (bf16, see grouped_linear): data_ptr() would break the graph, and
        return x.dtype == torch.bfloat16  # fresh activations and parameter banks are allocator-aligned
    size = x.element_size()
    strides = [st for st in (*x.stride(), *weight.stride()) if st != 1]
    aligned = all((n * size) % 16 == 0 for n in (*strides, x.shape[-1], weight.shape[-2]))
    return aligned and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row block e of x (rows offsets[e-1]:offsets[e]) times weight[e]^T.

    x (S, in) sorted by expert; weight (E, out, in); offsets (E,) int32 cumulative row ends; counts (E,) rows per
    expert -> (S, out). Fused grouped GEMM where it runs, else the segment form (one matmul per contiguous slice:
    float64 parity tests, sizes that break the 16-byte alignment, torch < 2.9).
    """
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return _grouped_linear_eager(x, weight, offsets, counts)  # one graph break, then the eager route below
    if grouped_mm_runs(x, weight):
        return _GROUPED_MM(x, weight.transpose(-2, -1), offs=offsets)
    segments = x.split(counts.tolist())
    return torch.cat([F.linear(seg, w) for seg, w in zip(segments, weight)])


# torch.compile traces the grouped GEMM in bf16 only (its meta kernel's rule); other dtypes run it outside the graph
_grouped_linear_eager = torch.compiler.disable(grouped_linear, reason="grouped_mm is traceable in bf16 only")


class PackedSwiGLU(torch.autograd.Function):
    """silu(h[:, :I]) * h[:, I:] for h (S, 2I) = the packed gate | up projections (Shazeer 2020, eq. 6).

    Written by hand so that one grouped GEMM computes gate and up together: its backward writes both halves of one
    (S, 2I) gradient, where autograd's backward of the two slices would zero-fill and copy it (with that, one fused
    GEMM measured no faster than two; with this, the MoE layer's fwd+bwd is 1-3 % faster).
    """

    @staticmethod
    def forward(ctx, packed: torch.Tensor) -> torch.Tensor:
        gate, up = packed.chunk(2, dim=-1)  # (S, I) views
        silu_gate = F.silu(gate)
        ctx.save_for_backward(packed, silu_gate)
        return silu_gate * up  # (S, I)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        packed, silu_gate = ctx.saved_tensors
        gate, up = packed.chunk(2, dim=-1)
        grad_packed = torch.empty_like(packed)  # (S, 2I)
        grad_gate, grad_up = grad_packed.chunk(2, dim=-1)
        torch.mul(grad, silu_gate, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_packed


class GroupedExperts(nn.Module):
    """E SwiGLU experts of width I over model width H; ``forward(x_sorted, counts)`` runs each on its slice."""

    def __init__(self, n_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = n_experts, d_model, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))  # (E, 2I, H)
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))  # (E, H, I)

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted (S, H): rows grouped by expert, counts (E,) rows per expert -> (S, H), row-aligned."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(x_sorted.device.type):  # grouped_mm is not autocast-aware: cast as F.linear would
            dtype = torch.get_autocast_dtype(x_sorted.device.type)
            x_sorted, gate_up, down = x_sorted.to(dtype), gate_up.to(dtype), down.to(dtype)
        offsets = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's block
        packed = grouped_linear(x_sorted, gate_up, offsets, counts)  # (S, 2I): gate | up
        if torch.compiler.is_compiling():  # inductor fuses autograd's version; the hand-written out= would not trace
            gate, up = packed.chunk(2, dim=-1)
            return grouped_linear(F.silu(gate) * up, down, offsets, counts)
        return grouped_linear(PackedSwiGLU.apply(packed), down, offsets, counts)  # (S, H)

    def expert_params(self) -> int:
        """Parameters of one expert (3 H I)."""
        return (self.gate_up_proj.numel() + self.down_proj.numel()) // self.num_experts

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"
