"""MoE layer forward+backward time / dense SwiGLU with the same active parameters (``make bench-moe``).

Each case times the whole MoE layer (router, sort, grouped expert matmuls, weighted combine) against a dense
SwiGLU of width k * moe_intermediate_size, on the same tokens: median of ``--repeats`` fwd+bwd passes after
warm-up, the variants interleaved. The ``segment`` column forces the fallback (one matmul per expert slice), the
``loop`` column times the per-expert loop the issue compares against (``MaskLoopMoE``). Runs the ``small`` and
``base`` sizes (``--sizes``), prints a table per size and writes ``bench_out/moe.csv``. Targets from the issue (CPU,
fp32): <= 1.10 at 8 experts top-2, <= 2.0 at 64 experts top-6.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from kimi_lab.bench import _malloc
from kimi_lab.model.moe import MoE, SwiGLU
from kimi_lab.model.moe import experts as experts_module

# --sizes: name -> (d_model, batch, seq_len, cases); a case is (n_routed_experts, num_experts_per_tok,
# moe_intermediate_size, target ratio) with the dense width k * I of the model preset: `small` (CPU studies, 768)
# and `base` (the reference size of the studies, 1536). The ratio falls with size: the dispatch moves O(k N d)
# bytes, the GEMMs do O(k N d I).
SIZES = {
    "small": (256, 16, 256, [(8, 2, 384, 1.10), (64, 6, 128, 2.0)]),
    "base": (384, 16, 512, [(8, 2, 768, 1.10), (64, 6, 256, 2.0)]),
}


def _moe_cfg(n_experts: int, top_k: int, hidden: int, method: str):
    return OmegaConf.create({
        "topk_method": method, "scoring_func": "sigmoid" if method != "greedy" else "softmax",
        "n_routed_experts": n_experts, "num_experts_per_tok": top_k, "moe_intermediate_size": hidden,
        "n_shared_experts": 0, "norm_topk_prob": True, "routed_scaling_factor": 1.0, "aux_loss_alpha": 1e-4,
        "n_group": 1, "topk_group": 1, "bias_update_speed": 1e-3,
    })


def _init_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)


class MaskLoopMoE(nn.Module):
    """The per-expert loop dispatch of transformers' eager MoE forward, on ``moe``'s gate and weights: for each
    expert, the tokens that chose it (``torch.where`` on a one-hot mask), its SwiGLU on them, scaled by their gate
    weights, ``index_add_`` into the output. A timing reference only; its parity with ``MoE`` is tested."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d_model = x.shape
        routing, experts = self.moe.gate(x), self.moe.experts
        self.aux_loss = routing.aux_loss
        x_flat = x.reshape(-1, d_model)  # (N, D)
        out = torch.zeros_like(x_flat)
        chosen = F.one_hot(routing.expert_idx, experts.num_experts).permute(2, 1, 0)  # (E, k, N)
        for expert in range(experts.num_experts):
            slot, token = torch.where(chosen[expert])  # (n_e,) each
            if token.numel() == 0:
                continue
            gate, up = F.linear(x_flat[token], experts.gate_up_proj[expert]).chunk(2, dim=-1)  # (n_e, I) each
            expert_out = F.linear(F.silu(gate) * up, experts.down_proj[expert])  # (n_e, D)
            out.index_add_(0, token, expert_out * routing.weights[token, slot].unsqueeze(-1))
        return self.moe._add_shared(out, x_flat).view(batch, seq_len, d_model)


def fwd_bwd_seconds(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> float:
    """Seconds of one forward + backward (gradients of the input and all parameters)."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    outputs, grads = [module(x)], [upstream]
    aux_loss = getattr(module, "aux_loss", None)
    if isinstance(aux_loss, torch.Tensor) and aux_loss.requires_grad:  # the balance loss is a term of a step's loss
        outputs.append(aux_loss)
        grads.append(torch.ones_like(aux_loss))
    torch.autograd.backward(outputs, grads)
    return time.perf_counter() - start


@contextlib.contextmanager
def segment_form():
    """Force the segment fallback (one matmul per expert slice) instead of the fused grouped GEMM."""
    saved, experts_module._GROUPED_MM = experts_module._GROUPED_MM, None
    try:
        yield
    finally:
        experts_module._GROUPED_MM = saved


def run_case(n_experts, top_k, hidden, target, args) -> dict:
    torch.manual_seed(0)
    moe = MoE(args.d_model, _moe_cfg(n_experts, top_k, hidden, args.method)).train()
    dense = SwiGLU(args.d_model, top_k * hidden)
    _init_(moe), _init_(dense)
    x = torch.randn(args.batch, args.seq_len, args.d_model, requires_grad=True)
    upstream = torch.randn_like(x)
    mask_loop = MaskLoopMoE(moe)
    times: dict[str, list[float]] = {"dense": [], "moe": [], "segment": [], "loop": []}
    for i in range(args.warmup + args.repeats):  # interleaved, so load drift on a shared machine hits all of them
        sample = {"dense": fwd_bwd_seconds(dense, x, upstream), "moe": fwd_bwd_seconds(moe, x, upstream)}
        with segment_form():
            sample["segment"] = fwd_bwd_seconds(moe, x, upstream)
        sample["loop"] = fwd_bwd_seconds(mask_loop, x, upstream)
        if i >= args.warmup:
            for key, seconds in sample.items():
                times[key].append(seconds)
    t_dense, t_moe, t_segment, t_loop = (statistics.median(times[k]) for k in ("dense", "moe", "segment", "loop"))
    fused = experts_module.grouped_mm_runs(x.reshape(-1, args.d_model), moe.experts.down_proj)
    return {"experts": n_experts, "top_k": top_k, "moe_intermediate_size": hidden, "dense_d_ff": top_k * hidden,
            "tokens": args.batch * args.seq_len, "d_model": args.d_model, "method": args.method,
            "dense_ms": round(1e3 * t_dense, 3), "moe_ms": round(1e3 * t_moe, 3),
            "segment_ms": round(1e3 * t_segment, 3), "loop_ms": round(1e3 * t_loop, 3),
            "ratio": round(t_moe / t_dense, 3), "segment_ratio": round(t_segment / t_dense, 3),
            "loop_ratio": round(t_loop / t_dense, 3), "target": target, "ok": t_moe / t_dense <= target,
            "kernel": "grouped_mm" if fused else "segment", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": "cpu", "dtype": "float32"}


def _run_size(size: str, cli: argparse.Namespace, malloc: str) -> list[dict]:
    """Time and print every case of one size; --batch / --seq-len / --d-model override the size's."""
    d_model, batch, seq_len, cases = SIZES[size]
    args = argparse.Namespace(**{**vars(cli), "d_model": cli.d_model or d_model, "batch": cli.batch or batch,
                                 "seq_len": cli.seq_len or seq_len})
    rows = [{"size": size, **run_case(*case, args), "malloc": malloc} for case in cases]
    print(f"MoE fwd+bwd / dense SwiGLU, size {size}, CPU fp32, {rows[0]['tokens']} tokens x d_model "
          f"{args.d_model}, {rows[0]['threads']} threads, malloc {malloc}, torch {torch.__version__}")
    print(f"{'experts':>7} {'top_k':>5} {'I':>4} {'dense ms':>9} {'moe ms':>8} {'ratio':>6} {'target':>6} "
          f"{'segment':>8} {'loop':>6} {'kernel':>10} {'verdict':>7}")
    for r in rows:
        print(f"{r['experts']:>7} {r['top_k']:>5} {r['moe_intermediate_size']:>4} {r['dense_ms']:>9.2f} "
              f"{r['moe_ms']:>8.2f} {r['ratio']:>6.3f} {r['target']:>6.2f} {r['segment_ratio']:>8.3f} "
              f"{r['loop_ratio']:>6.3f} {r['kernel']:>10} {'ok' if r['ok'] else 'over':>7}")
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.bench moe", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["small", "base"],
                        help="model presets whose d_model, FFN width and tokens per batch are timed")
    parser.add_argument("--batch", type=int, default=None, help="default: the size's")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the size's")
    parser.add_argument("--d-model", type=int, default=None, help="default: the size's")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--method", default="noaux_tc",
                        choices=["greedy", "group_limited_greedy", "noaux_tc", "aux_tc"])
    parser.add_argument("--out", type=Path, default=Path("bench_out") / "moe.csv")
    _malloc.add_flag(parser)
    args = parser.parse_args(argv)
    rows = []
    with _malloc.applied(args) as malloc:
        for size in args.sizes:
            rows += _run_size(size, args, malloc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0
