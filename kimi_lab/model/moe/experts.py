"""Routed experts as 3-D parameter banks, run over tokens sorted by expert (contiguous row block per expert).

Layout of transformers' ``DeepseekV3Experts`` (so a layer's state dict maps 1:1): ``gate_up_proj`` (E, 2I, H) holds
each expert's SwiGLU gate rows [0, I) and up rows [I, 2I); ``down_proj`` is (E, H, I). Expert e is the SwiGLU
``down[e] @ (silu(gate[e] @ x) * (up[e] @ x))`` (Shazeer 2020, eq. 6); every matrix is a plain 2-D slice of a bank,
so a per-expert optimizer (Muon) can orthogonalise ``gate_up_proj[e, :I]``, ``gate_up_proj[e, I:]``,
``down_proj[e]``.

Two routes (``expert_route``), equal up to float summation order (tested):
- ``grouped``: stage by stage over all experts, each GEMM one ``torch._grouped_mm`` (``F.grouped_mm``) where it runs
  (CPU, CUDA sm80+; fp32/bf16/fp16, 16-byte aligned), else one matmul per expert slice (``segment``). Used on CUDA and
  under ``torch.compile``.
- ``expert_major`` (CPU, eager): expert by expert, its gate|up GEMM, SwiGLU and down GEMM back to back on its row
  block, and the same in the backward (``ExpertMajorSwiGLU``). On CPU ``_grouped_mm`` is itself a loop of ``mm``
  calls over the slices, so this runs the same GEMMs; an expert's intermediates (~1,000 rows) are still in cache for
  the next op instead of being evicted by the other experts' GEMMs (MoE fwd+bwd / dense at 8 experts top-2, small
  size, ``make bench-moe``: 1.12 -> 1.08-1.12, depending on the load on the shared L3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# torch >= 2.10 exposes F.grouped_mm; torch 2.9 only the private op (CPU kernel from 2.9, CUDA sm80+)
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


ROUTES = ("expert_major", "grouped")
_forced_route: str | None = None


@contextlib.contextmanager
def forced_route(route: str) -> Iterator[None]:
    """Run every ``GroupedExperts`` through ``route`` (one of ``ROUTES``) inside the block: benchmarks, parity tests."""
    global _forced_route
    if route not in ROUTES:
        raise ValueError(f"expert route {route!r}; allowed: {', '.join(ROUTES)}")
    saved, _forced_route = _forced_route, route
    try:
        yield
    finally:
        _forced_route = saved


def expert_route(x: torch.Tensor) -> str:
    """``expert_major`` for CPU tensors in eager mode, ``grouped`` otherwise (CUDA, ``torch.compile``)."""
    if _forced_route is not None:
        return _forced_route
    return "expert_major" if x.device.type == "cpu" and not torch.compiler.is_compiling() else "grouped"


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused grouped GEMM accepts these operands: fp32/bf16/fp16 (no float64), rows and base pointers
    aligned to 16 bytes, a CPU kernel (torch >= 2.9) or a CUDA device of compute capability >= 8.0."""
    if _GROUPED_MM is None or x.dtype not in _GROUPED_MM_DTYPES or weight.dtype != x.dtype:
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
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
    if grouped_mm_runs(x, weight):
        return _GROUPED_MM(x, weight.transpose(-2, -1), offs=offsets)
    segments = x.split(counts.tolist())
    return torch.cat([F.linear(seg, w) for seg, w in zip(segments, weight)])


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


class ExpertMajorSwiGLU(torch.autograd.Function):
    """All experts' SwiGLU over x sorted by expert, one expert's row block at a time (the CPU route, see above).
    Written by hand: no PyTorch op chains an expert's GEMMs and SwiGLU, and autograd over per-expert slices of the
    banks would zero-fill a whole bank gradient for every expert.

    forward(x (S, H), gate_up (E, 2I, H), down (E, H, I), counts: list of E ints) -> (S, H). Saves the packed
    gate|up (S, 2I) and the SwiGLU output (S, I); the backward recomputes silu(gate) on the block it is working on.
    """

    @staticmethod
    def forward(ctx, x, gate_up, down, counts: list[int]):
        hidden = down.shape[-1]
        packed = x.new_empty(x.shape[0], 2 * hidden)  # (S, 2I) gate | up
        act = x.new_empty(x.shape[0], hidden)  # (S, I) silu(gate) * up
        out = x.new_empty(x.shape)  # (S, H)
        silu_gate = x.new_empty(max(counts, default=0), hidden)  # scratch reused by every block: stays in cache
        for expert, rows in _blocks(counts):
            torch.mm(x[rows], gate_up[expert].t(), out=packed[rows])
            gate, up = packed[rows].chunk(2, dim=-1)  # (n_e, I) views
            block_silu = silu_gate[: gate.shape[0]]
            torch.ops.aten.silu.out(gate, out=block_silu)
            torch.mul(block_silu, up, out=act[rows])
            torch.mm(act[rows], down[expert].t(), out=out[rows])
        ctx.counts = counts
        ctx.save_for_backward(x, gate_up, down, packed, act)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, gate_up, down, packed, act = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x)
        grad_gate_up, grad_down = torch.empty_like(gate_up), torch.empty_like(down)
        for expert in (e for e, n_rows in enumerate(ctx.counts) if n_rows == 0):  # no rows: zero gradient
            grad_gate_up[expert].zero_(), grad_down[expert].zero_()
        max_rows, hidden = max(ctx.counts, default=0), down.shape[-1]
        # scratch reused by every block (same addresses, so still in cache): grad of act, silu(gate), grad of packed
        grad_act_buf, silu_buf = x.new_empty(max_rows, hidden), x.new_empty(max_rows, hidden)
        grad_packed_buf = x.new_empty(max_rows, 2 * hidden)
        for expert, rows in _blocks(ctx.counts):
            n_rows = rows.stop - rows.start
            grad_act, silu_gate, grad_packed = grad_act_buf[:n_rows], silu_buf[:n_rows], grad_packed_buf[:n_rows]
            torch.mm(grad_out[rows].t(), act[rows], out=grad_down[expert])  # (H, I)
            torch.mm(grad_out[rows], down[expert], out=grad_act)  # (n_e, I)
            gate, up = packed[rows].chunk(2, dim=-1)
            grad_gate, grad_up = grad_packed.chunk(2, dim=-1)
            torch.ops.aten.silu.out(gate, out=silu_gate)
            torch.mul(grad_act, silu_gate, out=grad_up)
            torch.mul(grad_act, up, out=grad_act)  # d loss / d silu(gate), in place
            torch.ops.aten.silu_backward.grad_input(grad_act, gate, grad_input=grad_gate)
            torch.mm(grad_packed.t(), x[rows], out=grad_gate_up[expert])  # (2I, H)
            torch.mm(grad_packed, gate_up[expert], out=grad_x[rows])  # (n_e, H)
        return grad_x, grad_gate_up, grad_down, None


def _blocks(counts: list[int]) -> Iterator[tuple[int, slice]]:
    """(expert, its row slice) for every expert with rows, from the rows per expert of x sorted by expert."""
    start = 0
    for expert, n_rows in enumerate(counts):
        if n_rows:
            yield expert, slice(start, start + n_rows)
        start += n_rows


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
        if torch.is_autocast_enabled(x_sorted.device.type):  # neither route is autocast-aware: cast as F.linear would
            dtype = torch.get_autocast_dtype(x_sorted.device.type)
            x_sorted, gate_up, down = x_sorted.to(dtype), gate_up.to(dtype), down.to(dtype)
        if expert_route(x_sorted) == "expert_major":
            return ExpertMajorSwiGLU.apply(x_sorted, gate_up, down, counts.tolist())
        offsets = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's block
        packed = grouped_linear(x_sorted, gate_up, offsets, counts)  # (S, 2I): gate | up
        return grouped_linear(PackedSwiGLU.apply(packed), down, offsets, counts)  # (S, H)

    def expert_params(self) -> int:
        """Parameters of one expert (3 H I)."""
        return (self.gate_up_proj.numel() + self.down_proj.numel()) // self.num_experts

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"
