"""Attention kernel benchmark: fwd+bwd time, achieved TFLOP/s and peak memory of the attention core per option and
sequence length, KV-cache bytes per token and layer, and the kernel that ran.
``python -m kimi_lab.bench attention [-h]``.

FLOPs follow the FlashAttention benchmarks (Dao 2023): causal forward = 2 * B * H * T^2 * (d_qk + d_v) / 2,
fwd+bwd = 3.5 x forward; useful FLOPs only (MLA's zero padding of v for flash is not counted as work).
MHA and MLA run at equal heads: MHA head dim d; MLA qk = d + d/2 (nope + rope), v = d (DeepSeek-V3's 128+64 / 128).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import statistics
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kimi_lab.bench import _malloc
from kimi_lab.config.schema import AttentionConfig
from kimi_lab.model.attention import build_attention

DEFAULT_SEQ_LENS = (256, 512, 1024, 2048, 4096)
QUICK_SEQ_LENS = (256, 1024)
OPTIONS = (("standard", None), ("sdpa", None), ("flash", None), ("mla", "standard"), ("mla", "sdpa"), ("mla", "flash"))
MLA_CHECK = (1024, 1.3)  # seq len, max MLA/MHA core time ratio at equal heads (the CPU check)
COLUMNS = ("option", "kernel", "seq_len", "batch", "heads", "qk_head_dim", "v_head_dim", "dtype", "fwd_bwd_ms",
           "tflops", "peak_mem_mb", "peak_mem_kind", "kv_cache_bytes_per_token")


def _parse(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.bench attention", description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help=f"default {DEFAULT_SEQ_LENS}")
    parser.add_argument("--quick", action="store_true", help=f"seq lens {QUICK_SEQ_LENS}, fewer repeats")
    parser.add_argument("--batch", type=int, default=8 if cuda else 1)
    parser.add_argument("--heads", type=int, default=16 if cuda else 8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        default="bfloat16" if cuda else "float32")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed fwd+bwd calls (median); default 10 GPU, 3 CPU")
    parser.add_argument("--options", nargs="+", default=None, help="subset, e.g. sdpa flash mla:sdpa")
    parser.add_argument("--out", default="bench_out")
    _malloc.add_flag(parser)
    args = parser.parse_args(argv)
    args.seq_lens = args.seq_lens or (QUICK_SEQ_LENS if args.quick else DEFAULT_SEQ_LENS)
    args.repeats = args.repeats or (10 if args.device == "cuda" else (2 if args.quick else 3))
    return args


def _label(name: str, kernel: str | None) -> str:
    return name if kernel is None else f"{name}:{kernel}"


def _module(name: str, kernel: str | None, heads: int, head_dim: int):
    """An attention module at equal heads: MHA with head_dim, MLA with qk = head_dim * 1.5, v = head_dim."""
    cfg = AttentionConfig(type="mla" if name == "mla" else "mha", kernel=kernel or name, n_heads=heads,
                          kv_lora_rank=4 * head_dim, qk_nope_head_dim=head_dim, qk_rope_head_dim=head_dim // 2,
                          v_head_dim=head_dim)
    return build_attention(heads * head_dim, OmegaConf.structured(cfg))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class HeapPeak:
    """CPU peak of bytes in use by malloc (glibc ``mallinfo2``: uordblks + hblkhd), sampled every 0.5 ms while active
    and reported above the level at entry; RSS would miss memory the allocator reuses. CUDA uses its own counters."""

    def __init__(self):
        from kimi_lab.training.malloc import in_use_reader

        self.in_use = in_use_reader()
        if self.in_use is None:  # off glibc >= 2.33: the caller reports no memory
            raise OSError("malloc in-use bytes need glibc >= 2.33 (mallinfo2)")
        self._stop = threading.Event()
        self.base = self.peak = self.in_use()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.in_use())
            time.sleep(0.0005)

    def __enter__(self) -> HeapPeak:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.in_use())


def _step_fn(module, args, seq_len: int):
    """A closure running one fwd+bwd of the core (``module.attend``) on fixed random q, k, v."""
    dtype, device = getattr(torch, args.dtype), args.device
    shape = (args.batch, module.n_heads, seq_len)
    q = torch.randn(*shape, module.qk_head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(*shape, module.qk_head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(*shape, module.v_head_dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(*shape, module.v_head_dim, device=device, dtype=dtype)

    def step() -> float:
        start = time.perf_counter()
        module.attend(q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None
        _sync(device)
        return time.perf_counter() - start

    return step


def _measure(module, args, seq_len: int) -> dict:
    """Median fwd+bwd time of the core (no memory sampler running), and its peak memory above the inputs' in one
    more step."""
    step = _step_fn(module, args, seq_len)
    step()  # warm-up (and the kernel label)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = statistics.median(step() for _ in range(args.repeats))
        peak, kind = (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda_max_allocated"
    else:  # timed without the heap sampler (its thread takes malloc's locks and a core); memory in one more step
        seconds = statistics.median(step() for _ in range(args.repeats))
        try:
            heap = HeapPeak()
        except (OSError, AttributeError):
            heap, kind = None, "unmeasured"
        with heap or contextlib.nullcontext():
            step()
        peak, kind = ((heap.peak - heap.base) / 2**20, "cpu_malloc_sampled") if heap else (float("nan"), kind)
    flops = 3.5 * 2 * args.batch * module.n_heads * seq_len**2 * (module.qk_head_dim + module.v_head_dim) / 2
    return {"fwd_bwd_ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "peak_mem_mb": peak, "peak_mem_kind": kind}


def paired_mla_check(args, rounds: int) -> list[str]:
    """MLA/MHA core time at equal heads and MLA_CHECK's seq len, per kernel, as the median of per-round ratios of
    interleaved calls (MHA, MLA, MHA, ...): robust to load from other processes on a shared machine."""
    seq_len, limit = MLA_CHECK
    lines = []
    for kernel in ("standard", "sdpa", "flash"):
        mha = _module(kernel, None, args.heads, args.head_dim).to(args.device)
        mla = _module("mla", kernel, args.heads, args.head_dim).to(args.device)
        try:
            steps = _step_fn(mha, args, seq_len), _step_fn(mla, args, seq_len)
            steps[0](), steps[1]()  # warm-up
            ratio = statistics.median(1 / steps[0]() * steps[1]() for _ in range(rounds))  # MHA, then MLA
        except RuntimeError as err:
            lines.append(f"MLA/MHA check, kernel {kernel}: not measured: {str(err).splitlines()[0]}")
            continue
        verdict = "PASS" if ratio <= limit else "over"
        lines.append(f"MLA/MHA core fwd+bwd time at seq {seq_len}, equal heads, kernel {kernel}: {ratio:.2f}x "
                     f"({mla.kernel_label()} vs {mha.kernel_label()}; median of {rounds} interleaved pairs; "
                     f"limit {limit}x: {verdict})")
    return lines


def _rows(args) -> list[dict]:
    wanted = set(args.options) if args.options else None
    rows = []
    for name, kernel in OPTIONS:
        if wanted and _label(name, kernel) not in wanted and name not in wanted:
            continue
        module = _module(name, kernel, args.heads, args.head_dim).to(args.device)
        for seq_len in args.seq_lens:
            try:
                result = _measure(module, args, seq_len)
            except (RuntimeError, torch.OutOfMemoryError) as err:  # e.g. flash refused, or out of memory
                print(f"{_label(name, kernel)} seq {seq_len}: not measured: {str(err).splitlines()[0]}")
                continue
            bytes_per_value = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
            rows.append({"option": _label(name, kernel), "kernel": module.kernel_label(), "seq_len": seq_len,
                         "batch": args.batch, "heads": module.n_heads, "qk_head_dim": module.qk_head_dim,
                         "v_head_dim": module.v_head_dim, "dtype": args.dtype, **result,
                         "kv_cache_bytes_per_token": module.kv_cache_values_per_token() * bytes_per_value})
            print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict) -> str:
    return (f"{row['option']:<14} {row['kernel']:<34} {row['seq_len']:>6} {row['fwd_bwd_ms']:>11.2f} "
            f"{row['tflops']:>8.3f} {row['peak_mem_mb']:>10.1f} {row['kv_cache_bytes_per_token']:>8}")


def _write(rows: list[dict], out: Path, title: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "attention.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    notes = [f"wrote {out / 'attention.csv'}"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [*notes, "no PNG: matplotlib is not installed (pip install matplotlib, or the `notebook` extra)"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for option in dict.fromkeys(r["option"] for r in rows):
        sub = [r for r in rows if r["option"] == option]
        for ax, key in zip(axes, ("fwd_bwd_ms", "tflops")):
            ax.plot([r["seq_len"] for r in sub], [r[key] for r in sub], marker="o",
                    label=f"{option} ({sub[0]['kernel']})")
    for ax, ylabel in zip(axes, ("fwd+bwd time (ms)", "achieved TFLOP/s")):
        ax.set_xscale("log", base=2), ax.set_xlabel("sequence length"), ax.set_ylabel(ylabel), ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "attention.png", dpi=120)
    plt.close(fig)
    return [*notes, f"wrote {out / 'attention.png'}"]


def main(argv: list[str]) -> int:
    args = _parse(argv)
    with _malloc.applied(args) as malloc:
        device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                       else f"CPU, {torch.get_num_threads()} threads, malloc {malloc}")
        title = (f"attention core fwd+bwd, batch {args.batch}, {args.heads} heads, MHA d={args.head_dim}, MLA qk/v="
                 f"{args.head_dim * 3 // 2}/{args.head_dim}, {args.dtype}, {device_name}, torch {torch.__version__}")
        print(title)
        print(f"{'option':<14} {'kernel':<34} {'seq':>6} {'fwd+bwd ms':>11} {'TFLOP/s':>8} {'peak MiB':>10} "
              f"{'KV B/tok':>8}")
        rows = _rows(args)
        checks = paired_mla_check(args, rounds=args.repeats * 3) if MLA_CHECK[0] in args.seq_lens else []
    for line in [*checks, *_write(rows, Path(args.out), title)]:
        print(line)
    return 0 if rows else 1
