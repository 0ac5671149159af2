"""MoE layer forward+backward time / dense SwiGLU with the same active parameters (``make bench-moe``).

Each case times the whole MoE layer (router, sort, grouped expert matmuls, weighted combine) against a dense
SwiGLU of width k * moe_intermediate_size, on the same tokens: median of ``--repeats`` fwd+bwd passes after
warm-up, the variants interleaved. The ``segment`` column forces the fallback (one matmul per expert slice), the
``loop`` column times the reference MoE, the per-expert loop of transformers' eager forward
(``kimi_lab.bench._reference.MaskLoopMoE``). Runs the ``small`` and
``base`` sizes (``--sizes``), prints a table per size and writes ``bench_out/moe.csv``. Targets (CPU,
fp32): <= 1.10 at 8 experts top-2, <= 2.0 at 64 experts top-6. On CUDA (the default where one is visible) the
forwards run under bf16 autocast, as bf16-mixed training does, and every timed pass is synchronised.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kimi_lab.bench import _malloc
from kimi_lab.bench._reference import MaskLoopMoE
from kimi_lab.config.schema import MoEConfig
from kimi_lab.model.mlp import SwiGLU
from kimi_lab.model.moe import MoE
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
    return OmegaConf.structured(MoEConfig(
        topk_method=method, scoring_func="sigmoid" if method != "greedy" else "softmax",
        n_routed_experts=n_experts, num_experts_per_tok=top_k, moe_intermediate_size=hidden,
        n_shared_experts=0, norm_topk_prob=True, routed_scaling_factor=1.0, aux_loss_alpha=1e-4,
        n_group=1, topk_group=1, bias_update_speed=1e-3,
    ))


def _init_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.02)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd_seconds(module: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor,
                    autocast: torch.dtype | None = None) -> float:
    """Seconds of one forward + backward (gradients of the input and all parameters); ``autocast``: the forward
    under ``torch.autocast`` in that dtype (bf16-mixed training), None: in the tensors' dtype."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    _sync(x.device)
    start = time.perf_counter()
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = module(x)
    outputs, grads = [out], [upstream.to(out.dtype)]
    aux_loss = getattr(module, "aux_loss", None)
    if isinstance(aux_loss, torch.Tensor) and aux_loss.requires_grad:  # the balance loss is a term of a step's loss
        outputs.append(aux_loss)
        grads.append(torch.ones_like(aux_loss))
    torch.autograd.backward(outputs, grads)
    _sync(x.device)
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
    device = torch.device(args.device)
    autocast = torch.bfloat16 if args.dtype == "bfloat16" else None  # fp32 weights, bf16 matmuls, as training
    moe = MoE(args.d_model, _moe_cfg(n_experts, top_k, hidden, args.method)).train().to(device)
    dense = SwiGLU(args.d_model, top_k * hidden).to(device)
    _init_(moe), _init_(dense)
    x = torch.randn(args.batch, args.seq_len, args.d_model, device=device, requires_grad=True)
    upstream = torch.randn_like(x)
    mask_loop = MaskLoopMoE(moe)
    times: dict[str, list[float]] = {"dense": [], "moe": [], "segment": [], "loop": []}
    for i in range(args.warmup + args.repeats):  # interleaved, so load drift on a shared machine hits all of them
        sample = {"dense": fwd_bwd_seconds(dense, x, upstream, autocast),
                  "moe": fwd_bwd_seconds(moe, x, upstream, autocast)}
        with segment_form():
            sample["segment"] = fwd_bwd_seconds(moe, x, upstream, autocast)
        sample["loop"] = fwd_bwd_seconds(mask_loop, x, upstream, autocast)
        if i >= args.warmup:
            for key, seconds in sample.items():
                times[key].append(seconds)
    t_dense, t_moe, t_segment, t_loop = (statistics.median(times[k]) for k in ("dense", "moe", "segment", "loop"))
    compute = autocast or torch.float32
    fused = experts_module.grouped_mm_runs(x.reshape(-1, args.d_model).to(compute),
                                           moe.experts.down_proj.to(compute))
    return {"experts": n_experts, "top_k": top_k, "moe_intermediate_size": hidden, "dense_d_ff": top_k * hidden,
            "tokens": args.batch * args.seq_len, "d_model": args.d_model, "method": args.method,
            "dense_ms": round(1e3 * t_dense, 3), "moe_ms": round(1e3 * t_moe, 3),
            "segment_ms": round(1e3 * t_segment, 3), "loop_ms": round(1e3 * t_loop, 3),
            "ratio": round(t_moe / t_dense, 3), "segment_ratio": round(t_segment / t_dense, 3),
            "loop_ratio": round(t_loop / t_dense, 3), "target": target, "ok": t_moe / t_dense <= target,
            "kernel": "grouped_mm" if fused else "segment", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": _device_name(device), "dtype": args.dtype}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _run_size(size: str, cli: argparse.Namespace, malloc: str) -> list[dict]:
    """Time and print every case of one size; --batch / --seq-len / --d-model override the size's."""
    d_model, batch, seq_len, cases = SIZES[size]
    args = argparse.Namespace(**{**vars(cli), "d_model": cli.d_model or d_model, "batch": cli.batch or batch,
                                 "seq_len": cli.seq_len or seq_len})
    rows = [{"size": size, **run_case(*case, args), "malloc": malloc} for case in cases]
    print(f"MoE fwd+bwd / dense SwiGLU, size {size}, {rows[0]['device']} {args.dtype}, {rows[0]['tokens']} tokens "
          f"x d_model {args.d_model}, {rows[0]['threads']} threads, malloc {malloc}, torch {torch.__version__}")
    print(f"{'experts':>7} {'top_k':>5} {'I':>4} {'dense ms':>9} {'moe ms':>8} {'ratio':>6} {'target':>6} "
          f"{'segment':>8} {'loop':>6} {'kernel':>10} {'verdict':>7}")
    for r in rows:
        print(f"{r['experts']:>7} {r['top_k']:>5} {r['moe_intermediate_size']:>4} {r['dense_ms']:>9.2f} "
              f"{r['moe_ms']:>8.2f} {r['ratio']:>6.3f} {r['target']:>6.2f} {r['segment_ratio']:>8.3f} "
              f"{r['loop_ratio']:>6.3f} {r['kernel']:>10} {'ok' if r['ok'] else 'over':>7}")
    return rows


def _parse(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="bfloat16: forwards under bf16 autocast (fp32 weights); default bfloat16 on CUDA, "
                             "float32 on CPU")
    parser.add_argument("--out", type=Path, default=Path("bench_out") / "moe.csv")
    _malloc.add_flag(parser)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
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
