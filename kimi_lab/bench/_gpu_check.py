"""``python -m kimi_lab.bench._gpu_check OUT``: summary.md and gpu_check.png of a ``make gpu-check`` folder.

Reads what ``benchmarks/gpu_check.sh`` left in OUT (steps.tsv, environment.txt, pytest_gpu.xml, attention/attention.csv,
moe.csv, train/<date>-<device>.json|md, sweep/<job>/results.json, sweep/nvidia_smi.csv); a missing piece (a step that
failed) is reported as missing and the rest is still summarised. No torch import: it runs after the GPU work.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SDPA_FLASH_TARGET_TFLOPS = 250.0  # bf16, seq 2048, head dim 128 (docs/benchmarks.md)
MEMORY_HEADROOM = 0.9  # share of the device's memory that packed jobs may fill


def _csv(path: Path, delimiter: str = ",") -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def steps_section(out: Path) -> list[str]:
    rows = _csv(out / "steps.tsv", delimiter="\t")
    total, allowed = sum(int(r["seconds"]) for r in rows), sum(int(r["limit_s"]) for r in rows)
    body = [[r["step"], "ok" if r["rc"] == "0" else f"failed (exit {r['rc']})", r["seconds"], r["limit_s"]]
            for r in rows]
    env = (out / "environment.txt").read_text().strip().splitlines() if (out / "environment.txt").exists() else []
    return ["# GPU check", "", next((line for line in env if line.startswith("torch ")), "torch: unknown"), "",
            f"Steps before this summary: {total} s of the {allowed} s their limits allow.", "",
            *_table(["step", "outcome", "seconds", "limit s"], body), ""]


def pytest_section(out: Path) -> list[str]:
    path = out / "pytest_gpu.xml"
    if not path.exists():
        return ["## `pytest -m gpu`", "", "missing: no pytest_gpu.xml", ""]
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return ["## `pytest -m gpu`", "",
            f"{counts['tests']} tests: {counts['failures']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped.", *(f"- failed: `{name}`" for name in failed), ""]


def attention_section(out: Path) -> list[str]:
    rows = _csv(out / "attention" / "attention.csv")
    if not rows:
        return ["## Attention (`bench attention`)", "", "missing: no attention/attention.csv", ""]
    body = [[r["option"], f"`{r['kernel']}`", r["seq_len"], f"{float(r['fwd_bwd_ms']):.2f}",
             f"{float(r['tflops']):.1f}", f"{float(r['peak_mem_mb']):.0f}"] for r in rows]
    flash = [float(r["tflops"]) for r in rows if r["option"] in ("sdpa", "flash") and r["seq_len"] == "2048"
             and "flash" in r["kernel"] and r["dtype"] == "bfloat16" and r["qk_head_dim"] == "128"]
    check = (f"SDPA/flash at seq 2048, head dim 128, bf16: best {max(flash):.1f} TFLOP/s "
             f"({'>=' if max(flash) >= SDPA_FLASH_TARGET_TFLOPS else '<'} {SDPA_FLASH_TARGET_TFLOPS:.0f})"
             if flash else "SDPA/flash at seq 2048, head dim 128, bf16: no row (not run or refused)")
    return ["## Attention (`bench attention`)", "", f"batch {rows[0]['batch']}, {rows[0]['heads']} heads, "
            f"{rows[0]['dtype']}; figure: `attention/attention.png`.", "",
            *_table(["option", "kernel", "seq", "fwd+bwd ms", "TFLOP/s", "peak MiB"], body), "", f"- {check}", ""]


def moe_section(out: Path) -> list[str]:
    rows = _csv(out / "moe.csv")
    if not rows:
        return ["## MoE layer (`bench moe`)", "", "missing: no moe.csv", ""]
    body = [[r["size"], f"{r['experts']} / {r['top_k']}", r["tokens"], f"{float(r['dense_ms']):.2f}",
             f"{float(r['moe_ms']):.2f}", r["ratio"], r["segment_ratio"], r["loop_ratio"], r["kernel"]] for r in rows]
    return ["## MoE layer (`bench moe`)", "", f"{rows[0]['device']}, {rows[0]['dtype']}; ratio = MoE / dense SwiGLU "
            "of the same active width, forward + backward.", "",
            *_table(["size", "experts / top-k", "tokens", "dense ms", "MoE ms", "ratio", "segment", "loop", "kernel"],
                    body), ""]


def _train_report(out: Path) -> dict | None:
    reports = sorted((out / "train").glob("*.json"))
    return json.loads(reports[-1].read_text()) if reports else None


def train_section(out: Path) -> list[str]:
    mds = sorted((out / "train").glob("*.md"))
    if not mds:
        return ["## Training step (`bench train`)", "", "missing: no train/*.md", ""]
    body = mds[-1].read_text().strip().splitlines()[1:]  # its own title dropped
    return ["## Training step (`bench train`)", "", f"From `train/{mds[-1].name}` (and its `.json`):", *body, ""]


def _sweep_jobs(out: Path) -> list[dict]:
    jobs = []
    for path in sorted((out / "sweep").glob("*/results.json"), key=lambda p: int(p.parent.name)):
        jobs.append({"job": path.parent.name, **json.loads(path.read_text())})
    return jobs


def _smi(out: Path) -> list[tuple[float, float, float]]:
    """(utilization.gpu %, memory.used MiB, memory.total MiB) samples of the sweep, 0.5 s apart."""
    samples = []
    path = out / "sweep" / "nvidia_smi.csv"
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = [p.strip() for p in line.split(",")]
        try:
            samples.append((float(parts[1]), float(parts[2]), float(parts[3])))
        except (IndexError, ValueError):
            continue  # a partial last line when the sampler was stopped
    return samples


def _alone_tokens_per_s(out: Path) -> float | None:
    report = _train_report(out)
    rows = [r for r in (report or {}).get("rows", []) if r["size"] == "base" and r["arm"] == "default"]
    return rows[0]["tokens_per_s"] if rows else None


def sweep_section(out: Path) -> list[str]:
    jobs = _sweep_jobs(out)
    head = ["## Two jobs packed on one GPU (`hydra/launcher=gpu_pool`, `jobs_per_device=2`)", ""]
    if not jobs:
        return [*head, "missing: no sweep/<job>/results.json", ""]
    body = [[j["job"], j.get("seed"), j["host"].get("cuda_visible_devices"), j["status"], j.get("steps"),
             _fmt(j.get("tokens_per_s"), "{:,.0f}"), _fmt(j.get("step_time_ms"), "{:.1f}"),
             _fmt(j.get("peak_mem_mb"), "{:,.0f}"), _fmt(j.get("val_loss"), "{:.3f}")] for j in jobs]
    lines = [*head, *_table(["job", "seed", "device", "status", "steps", "tokens/s", "step ms", "peak MiB (allocated)",
                             "val_loss"], body), ""]
    return lines + packing_lines(jobs, _smi(out), _alone_tokens_per_s(out)) + [""]


def packing_lines(jobs: list[dict], smi: list[tuple[float, float, float]], alone: float | None) -> list[str]:
    """The jobs_per_device evidence: summed tokens/s of the packed jobs against one job alone (bench train's base
    `default` arm, the same model and batch), GPU utilisation and memory while they ran."""
    lines = []
    rates = [j["tokens_per_s"] for j in jobs if j.get("tokens_per_s")]
    if rates and alone:
        lines.append(f"- packed: {sum(rates):,.0f} tokens/s summed over {len(rates)} jobs vs {alone:,.0f} for one "
                     f"job alone (`bench train`, base `default`): {sum(rates) / alone:.2f}x the throughput of one job "
                     "per GPU (bench steps exclude validation and logging, so this understates packing)")
    if smi:
        util = [s[0] for s in smi]
        used, total = max(s[1] for s in smi), smi[0][2]
        per_job = used / max(len(jobs), 1)
        lines.append(f"- nvidia-smi every 0.5 s while the sweep ran: GPU busy {statistics.mean(util):.0f} % on "
                     f"average ({_pct(util, 0.9):.0f} % at the 90th percentile); memory used at most {used:,.0f} of "
                     f"{total:,.0f} MiB, {per_job:,.0f} MiB per job with its CUDA context")
        lines.append(f"- memory allows up to {math.floor(MEMORY_HEADROOM * total / per_job)} such jobs per device "
                     f"({MEMORY_HEADROOM:.0%} of it); pack while GPU busy < ~90 % and the summed tokens/s still rises")
    return lines


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _fmt(value, spec: str) -> str:
    return "–" if value is None else spec.format(value)


def figure(out: Path) -> str | None:
    """gpu_check.png: MoE/dense ratio per case, tokens/s per training arm, GPU busy % and memory of the sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    moe = _csv(out / "moe.csv")
    axes[0].bar([f"{r['size']} {r['experts']}/{r['top_k']}" for r in moe], [float(r["ratio"]) for r in moe])
    axes[0].set_ylabel("MoE / dense step time"), axes[0].set_title("MoE layer", fontsize=9)
    rows = (_train_report(out) or {}).get("rows", [])
    axes[1].barh([f"{r['size']} {r['arm']}" for r in rows], [r["tokens_per_s"] for r in rows])
    axes[1].set_xlabel("tokens/s"), axes[1].set_title("training step (bench train)", fontsize=9)
    smi = _smi(out)
    seconds = [0.5 * i for i in range(len(smi))]
    axes[2].plot(seconds, [s[0] for s in smi], label="GPU busy %")
    axes[2].plot(seconds, [100 * s[1] / s[2] for s in smi], label="memory used %")
    axes[2].set_xlabel("s"), axes[2].set_ylim(0, 105), axes[2].legend(fontsize=7)
    axes[2].set_title("2 packed sweep jobs (nvidia-smi)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "gpu_check.png", dpi=110)
    plt.close(fig)
    return "gpu_check.png"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m kimi_lab.bench._gpu_check <make gpu-check output folder>", file=sys.stderr)
        return 2
    out = Path(argv[0])
    lines = [*steps_section(out), *pytest_section(out), *attention_section(out), *moe_section(out),
             *train_section(out), *sweep_section(out)]
    png = figure(out)
    lines.append(f"Figure: `{png}`." if png else "No figure: matplotlib is not installed.")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'summary.md'}" + (f" and {out / png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
