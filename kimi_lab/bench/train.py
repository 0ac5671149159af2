"""End-to-end training benchmark: ``python -m kimi_lab.bench train [--quick] [--sizes small base] [--arms ...]``.

For each model size and each major option (one option changed from the defaults at a time: attention kernel, norm,
MoE method, optimizer) it builds the real ``LanguageModelModule`` from the composed config and times training steps
(its ``training_step``, backward, clipping, ``optimizer.step``; warm-up steps excluded) on batches from the real data
loader. Reported per arm: median step time, tokens/s, peak memory the arm adds (``ArmMemory``: CPU malloc bytes in
use, CUDA max allocated, above the level before the arm was built), model FLOPs/token, MFU, the optimizer step's
share of the step. Plus, per size, a plain-PyTorch dense reference of the same shape (``PlainGPT``, nanoGPT-style)
timed step-interleaved with the framework's dense arm, so the framework's overhead ratio is robust to a shared
machine, and the data loader's tokens/s. Writes ``benchmarks/<date>-<device>.json`` and ``.md``.

FLOPs/token (Kaplan et al. 2020 / PaLM App. B with the causal half):
    6 * N_matmul + 3 * L * T * H * (d_qk + d_v),
N_matmul = active non-embedding parameters per token incl. the output head (routed experts counted k of E; the head
counts even when tied), the second term = QK^T and PV, forward + backward, of a causal mask (half of T^2).
MFU = FLOPs/token * tokens/s / peak, the peak measured in the same run by a large matmul in the training dtype
(CPU fp32 2048^3, CUDA bf16 8192^3; best of several, re-measured before every arm, the run's maximum used).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig

from kimi_lab.bench import _malloc
from kimi_lab.bench._plain import PlainGPT, plain_step_fn
from kimi_lab.bench._train_report import markdown

ARMS: dict[str, list[str]] = {  # arm -> overrides on top of the defaults (sdpa, rmsnorm, greedy 8e top-2, adamw)
    "default": [],
    "attention=standard": ["attention=standard"],
    "attention=flash": ["attention=flash"],
    "attention=mla": ["attention=mla"],
    "norm=layernorm": ["norm=layernorm"],
    "moe=dense": ["moe=dense"],
    "moe=deepseek_v3": ["moe=deepseek_v3"],
    "optimizer=adam": ["optimizer=adam"],
    "optimizer=muon": ["optimizer=muon"],
}
# GPU only: 64 experts top-6 with the dense arm's active width (6 * I = d_ff); the d768 size runs its dense arm only
GPU_ARMS = {"moe 64e top-6": lambda d_ff: ["moe.n_routed_experts=64", "moe.num_experts_per_tok=6",
                                           f"moe.moe_intermediate_size={d_ff // 6}"]}
GPU_SIZES = {"d768-12L-seq1024": ["model.d_model=768", "model.n_layers=12", "attention.n_heads=12", "model.d_ff=3072",
                                  "data.seq_len=1024"]}
GPU_SIZE_ARMS = ("moe=dense",)
QUICK_ARMS = ("default", "moe=dense")


def _parse(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.bench train", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small size, default + dense arms, 2 timed steps")
    parser.add_argument("--tiny", action="store_true", help="tiny size (tests)")
    parser.add_argument("--sizes", nargs="+", default=None, help="model presets (default: small base)")
    parser.add_argument("--arms", nargs="+", default=None, help=f"subset of {list(ARMS)}")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default: 8 on CPU, the preset's on GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm (default 4 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first, the first measuring memory (default 3 CPU, 5 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--loss-only", action="store_true", help="only the chunked-vs-full loss check")
    _malloc.add_flag(parser)
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.sizes = args.sizes or (["tiny"] if args.tiny else ["small"] if args.quick else
                                ["small", "base", *(GPU_SIZES if gpu else [])])
    if not args.arms:
        args.arms = list(QUICK_ARMS) if args.quick or args.tiny else [*ARMS, *(GPU_ARMS if gpu else [])]
    args.steps = args.steps or (2 if args.quick or args.tiny else 20 if gpu else 4)
    # CPU: the memory step (sampled, so not timed) plus two plain steps, so that timed steps reuse a grown heap
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 3)
    return args


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of an n^3 matmul in ``dtype`` (the MFU denominator, measured, not a datasheet number)."""
    n = n or (8192 if device == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def causal_flops_per_token(model, seq_len: int) -> int:
    """6 * active non-embedding matmul params (incl. the head) + causal attention 3 * L * T * H * (d_qk + d_v)."""
    from kimi_lab.model import flops_per_token

    return flops_per_token(model, seq_len, 0, 0, causal=True)


def compose(size: str, overrides: list[str], args) -> DictConfig:
    """conf/config.yaml composed as train.py would, at ``size`` (a preset or a GPU_SIZES entry), plus overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kimi_lab.config import register_configs, validate_config

    register_configs()
    conf = Path(__file__).resolve().parents[2] / "conf"
    extra = GPU_SIZES.get(size, [])
    base = ["model=base" if size in GPU_SIZES else f"model={size}", *extra, f"paths.output_dir={args.out}"]
    if args.device == "cuda":
        base += ["hardware=gpu"]
    if args.batch or args.device == "cpu":
        base += [f"data.batch_size={args.batch or 8}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[*base, *overrides])
    GlobalHydra.instance().clear()
    validate_config(cfg)
    return cfg


def _batches(cfg, n: int, device: str) -> tuple[list, float]:
    """``n`` training batches from the real data loader, and the loader's tokens/s producing them."""
    from kimi_lab.data import LMDataModule

    data = LMDataModule(cfg.data, cache_dir=cfg.paths.data_dir, seed=cfg.seed,
                        num_train_samples=n * cfg.data.batch_size)
    data.prepare_data()
    data.setup("fit")
    start = time.perf_counter()
    batches = [batch for _, batch in zip(range(n), data.train_dataloader())]
    loader_s = time.perf_counter() - start
    tokens = sum(b[0].numel() for b in batches)
    return [(x.to(device), y.to(device)) for x, y in batches], tokens / loader_s


def module_step_fn(cfg, batches: list, device: str):
    """(model, step) for the framework's LanguageModelModule: step(i) runs one optimizer step on batch i and
    returns (step seconds, optimizer seconds)."""
    from kimi_lab.training.module import LanguageModelModule

    torch.manual_seed(cfg.seed)
    module = LanguageModelModule(cfg, max_steps=1000).to(device)
    module.train()
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    precision = cfg.hardware.precision
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    clip = cfg.trainer.gradient_clip_val

    def step(i: int) -> tuple[float, float]:
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = module.training_step(batches[i % len(batches)], i)["loss"]
        loss.backward()
        _sync(device)
        opt_start = time.perf_counter()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), float(clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        end = time.perf_counter()
        return end - start, end - opt_start

    return module.model, step


class ArmMemory:
    """Peak memory an arm adds to the process: created before the arm's model is built, ``step_peak_mb(step)`` runs
    one step (its first: the optimizer state is allocated there too) and returns the peak above that starting level,
    i.e. parameters, gradients, optimizer state and activations of this arm alone. CPU: malloc bytes in use
    (``HeapPeak``, glibc mallinfo2 sampled every 0.5 ms); CUDA: ``max_memory_allocated``."""

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            self.base = torch.cuda.memory_allocated()
            return
        from kimi_lab.bench.attention import HeapPeak

        self.heap = HeapPeak()

    def step_peak_mb(self, step) -> float:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(0)
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        with self.heap:
            step(0)
        return (self.heap.peak - self.heap.base) / 2**20


def run_arm(name: str, cfg, batches: list, args, peaks: list[float], plain: bool = False) -> dict:
    """One arm's row; with ``plain`` the framework arm and the plain reference are timed step-interleaved.
    Each arm's first step measures its memory (and counts as a warm-up step)."""
    from kimi_lab.training.precision import configure_matmul_precision

    configure_matmul_precision(cfg)  # as train() does: TF32 for fp32 matmuls under hardware=gpu, IEEE on CPU
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peaks.append(matmul_peak_flops(args.device, dtype))
    memory = ArmMemory(args.device)
    model, step = module_step_fn(cfg, batches, args.device)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    rows = {name: (step, causal_flops_per_token(model, cfg.data.seq_len), memory.step_peak_mb(step))}
    if plain:
        memory = ArmMemory(args.device)
        ref = PlainGPT.from_config(cfg).to(args.device)
        ref_step = plain_step_fn(ref, cfg, batches, args.device)
        rows["plain_pytorch_dense"] = (ref_step, ref.flops_per_token(), memory.step_peak_mb(ref_step))
    for i in range(1, args.warmup):
        for fn, _, _ in rows.values():
            fn(i)
    timed = {arm: [] for arm in rows}
    for i in range(args.steps):  # interleaved: both arms see the same machine load
        for arm, (fn, _, _) in rows.items():
            timed[arm].append(fn(max(args.warmup, 1) + i))
    out = {}
    for arm, (fn, arm_flops, mem_mb) in rows.items():
        step_s = statistics.median(t[0] for t in timed[arm])
        opt_s = statistics.median(t[1] for t in timed[arm])
        out[arm] = {"arm": arm, "size": cfg.model.name, "batch": cfg.data.batch_size,
                    "seq_len": cfg.data.seq_len, "step_time_ms": 1000 * step_s, "tokens_per_s": tokens / step_s,
                    "optimizer_step_ms": 1000 * opt_s, "optimizer_step_share": opt_s / step_s,
                    "flops_per_token": arm_flops, "achieved_tflops": arm_flops * tokens / step_s / 1e12,
                    "peak_mem_mb": mem_mb, "matmul_peak_tflops_adjacent": peaks[-1] / 1e12}
    return out


def loss_chunking_check(device: str, n_tokens: int = 16384, vocab: int = 32768, dim: int = 384,
                        chunk: int = 2048, repeats: int = 3) -> dict:
    """The loss check: chunked head + CE vs full logits at B*T = 16k tokens, vocab 32k (d 384, base's width),
    forward + backward: median time of each (interleaved) and the loss's peak memory (``ArmMemory``)."""
    from kimi_lab.model.loss import linear_cross_entropy

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_tokens, dim, generator=gen).to(device, dtype).requires_grad_()
    weight = (0.02 * torch.randn(vocab, dim, generator=gen)).to(device, dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), generator=gen).to(device)

    def run(chunk_tokens):
        def step(_: int = 0) -> float:
            hidden.grad = weight.grad = None
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = linear_cross_entropy(hidden, weight, targets, chunk_tokens)
            loss.backward()
            _sync(device)
            return time.perf_counter() - start
        return step

    full, chunked = run(None), run(chunk)
    memory = {name: ArmMemory(device).step_peak_mb(fn) for name, fn in (("full", full), ("chunked", chunked))}
    times = {"full": [], "chunked": []}
    for _ in range(repeats):
        times["full"].append(full())
        times["chunked"].append(chunked())
    full_s, chunked_s = statistics.median(times["full"]), statistics.median(times["chunked"])
    return {"tokens": n_tokens, "vocab": vocab, "dim": dim, "chunk_tokens": chunk, "full_ms": 1000 * full_s,
            "chunked_ms": 1000 * chunked_s, "time_ratio": chunked_s / full_s, "full_peak_mb": memory["full"],
            "chunked_peak_mb": memory["chunked"], "memory_ratio": memory["chunked"] / memory["full"]}


def main(argv: list[str]) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with _malloc.applied(args) as args.malloc_in_force:
        if args.loss_only:
            print(json.dumps(loss_chunking_check(args.device), indent=2))
            return 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
            rows, loader, peaks = _run_all(args)
        report = _report(args, rows, loader, peaks)
        if not (args.quick or args.tiny):
            report["loss_chunking"] = loss_chunking_check(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{dt.date.today().isoformat()}-{_device_slug(args.device)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def _run_all(args) -> tuple[list[dict], dict[str, float], list[float]]:
    peaks: list[float] = []
    rows, loader = [], {}
    for n_size, size in enumerate(args.sizes):
        cfg0 = compose(size, [], args)
        batches, loader[size] = _batches(cfg0, max(args.warmup, 1) + args.steps, args.device)
        if n_size == 0 and args.device == "cpu":  # the process's first arm ran 15-20 % slow (heap growth): discard one
            run_arm("process warm-up", cfg0, batches, args, [])
        for arm in [a for a in args.arms if size not in GPU_SIZES or a in GPU_SIZE_ARMS]:
            overrides = ARMS[arm] if arm in ARMS else GPU_ARMS[arm](cfg0.model.d_ff)
            cfg = compose(size, overrides, args)
            result = run_arm(arm, cfg, batches, args, peaks, plain=arm == "moe=dense")
            for row in result.values():
                row["size"] = size
                rows.append(row)
                print(f"{size:>8} {row['arm']:>20} {row['step_time_ms']:9.1f} ms {row['tokens_per_s']:9.0f} tok/s "
                      f"{row['achieved_tflops'] * 1e3:7.1f} GFLOP/s peak-mem {row['peak_mem_mb']:8.0f} MiB "
                      f"opt {100 * row['optimizer_step_share']:4.1f}%", flush=True)
    return rows, loader, peaks


def _report(args, rows: list[dict], loader: dict[str, float], peaks: list[float]) -> dict:
    peak = max(peaks)
    for row in rows:
        row["mfu"] = row["achieved_tflops"] * 1e12 / peak
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "device": _device_name(args.device),
        "threads": torch.get_num_threads(), "malloc": args.malloc_in_force, "torch": torch.__version__,
        "dtype": "bf16-mixed" if args.device == "cuda" else "fp32", "matmul_peak_tflops": peak / 1e12,
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "matmul_peaks_tflops": [p / 1e12 for p in peaks], "loader_tokens_per_s": min(loader.values()),
        "loader_tokens_per_s_by_size": loader, "args": {k: v for k, v in vars(args).items()}, "rows": rows,
        "flops_formula": "6 * (active non-embedding matmul params incl. output head) + 3 * L * T * H * (d_qk + d_v)",
    }


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _device_slug(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return f"cpu{torch.get_num_threads()}t"
