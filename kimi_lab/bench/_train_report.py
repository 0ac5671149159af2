"""Markdown table of a ``python -m kimi_lab.bench train`` report (benchmarks/<date>-<device>.md)."""

from __future__ import annotations

COLUMNS = (("size", "size", "{}"), ("arm", "arm", "`{}`"), ("step ms", "step_time_ms", "{:.0f}"),
           ("tokens/s", "tokens_per_s", "{:.0f}"), ("GFLOP/s", "achieved_tflops", None),
           ("MFU", "mfu", "{:.1%}"), ("peak mem MiB", "peak_mem_mb", "{:.0f}"), ("opt share", "optimizer_step_share",
                                                                              "{:.1%}"),
           ("FLOPs/token", "flops_per_token", "{:,}"))


def _cell(row: dict, key: str, fmt: str | None) -> str:
    if fmt is None:
        return f"{row[key] * 1e3:.1f}"
    return fmt.format(row[key])


def markdown(report: dict) -> str:
    lines = [f"# Training benchmark {report['date']}", "",
             f"{report['device']}, torch {report['torch']}, {report['dtype']}, {report['threads']} threads, "
             f"malloc {report.get('malloc', 'default')}. "
             f"Matmul peak (best measured, {report['dtype']}): {report['matmul_peak_tflops'] * 1e3:.1f} GFLOP/s "
             f"(per arm: {', '.join(f'{p * 1e3:.0f}' for p in report['matmul_peaks_tflops'])}).",
             f"FLOPs/token = {report['flops_formula']}.", "",
             "| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in COLUMNS) + " |")
    lines.append("")
    for size in dict.fromkeys(r["size"] for r in report["rows"]):
        rows = {r["arm"]: r for r in report["rows"] if r["size"] == size}
        plain, dense = rows.get("plain_pytorch_dense"), rows.get("moe=dense") or rows.get("default")
        if plain and dense:
            lines.append(f"- {size}: plain PyTorch / framework `{dense['arm']}` tokens/s = "
                         f"{plain['tokens_per_s'] / dense['tokens_per_s']:.2f}x (step-interleaved)")
        for moe in ("default", "moe 64e top-6"):
            if moe in rows and "moe=dense" in rows:
                lines.append(f"- {size}: MoE (`{moe}`) / dense (`moe=dense`) step time = "
                             f"{rows[moe]['step_time_ms'] / rows['moe=dense']['step_time_ms']:.2f}x")
        if "optimizer=muon" in rows:
            lines.append(f"- {size}: Muon's share of the step: {rows['optimizer=muon']['optimizer_step_share']:.1%}")
        loader = report["loader_tokens_per_s_by_size"][size]
        fastest = max(r["tokens_per_s"] for r in rows.values())
        lines.append(f"- {size}: data loader {loader:,.0f} tokens/s = {loader / fastest:,.0f}x the fastest arm's "
                     f"training tokens/s ({'>=' if loader >= 10 * fastest else '<'} 10x)")
    loss = report.get("loss_chunking")
    if loss:
        lines.append(f"- loss at {loss['tokens']:,} tokens x vocab {loss['vocab']:,} (d {loss['dim']}), fwd+bwd: "
                     f"chunked ({loss['chunk_tokens']}) / full logits: peak memory {loss['memory_ratio']:.2f}x "
                     f"({loss['chunked_peak_mb']:.0f} vs {loss['full_peak_mb']:.0f} MiB, <= 0.25x required), time "
                     f"{loss['time_ratio']:.2f}x ({loss['chunked_ms']:.0f} vs {loss['full_ms']:.0f} ms, "
                     "<= 1.1x required)")
    return "\n".join(lines) + "\n"
