"""Print the README's study table from conf/experiment/*.yaml: `python docs/study_table.py` (repository root).

Per study: its stages' arms and grids (hydra.sweeper.params), jobs, training tokens per job and FLOPs per token (the
model built on the meta device, as `dry_run=true` counts them), and two time estimates:
- one H100: base-preset stages at an assumed 10 % MFU of the H100 SXM's 989 dense bf16 TFLOP/s (not measured);
  tiny-preset stages at an assumed 25 ms per step plus 5 s per job (a model this small is launch-bound on a GPU);
- 2 CPU cores, one job after another: base-preset stages at the 1,093 tokens/s `make bench-train` measured for
  `base` on 2 threads (docs/benchmarks.md), scaled by FLOPs per token; tiny-preset stages at the seconds per
  training token and per job measured on the README's sweep (docs/images/make_images.sh: 37.6 s of training per
  1,024,000 tokens, 7.0 s of evaluation and start-up per job).
An evaluation-only stage (trainer.max_steps=0) counts 60 s per job on the GPU and the per-job seconds on the CPU.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

H100_FLOPS = 0.10 * 989e12  # assumed MFU x H100 SXM dense bf16 peak
GPU_EVAL_JOB_S = 60.0
TINY_GPU_STEP_S, TINY_GPU_JOB_S = 0.025, 5.0  # assumed: launch-bound
CPU_BASE_TOKENS_PER_S = 1093.0  # docs/benchmarks.md: base, default arm, 2 threads, fp32
CPU_TINY_TOKEN_S, CPU_TINY_JOB_S = 37.6 / 1_024_000, 7.0  # measured: multirun/readme_norm (make_images.sh)

STUDIES = {  # row -> its stages, in the order they run
    "optimizer": ["optimizer_tune", "optimizer_confirm"],
    "optimizer_cpu": ["optimizer_cpu_tune", "optimizer_cpu_confirm"],
    "optimizer_momentum": ["optimizer_momentum_tune", "optimizer_momentum_confirm"],
    "optimizer_momentum_cpu": ["optimizer_momentum_cpu_tune", "optimizer_momentum_cpu_confirm"],
    "norm": ["norm_tune", "norm_confirm"],
    "norm_cpu": ["norm_cpu_tune", "norm_cpu_confirm"],
    "moe_routing": ["moe_routing_tune", "moe_routing_confirm"],
    "moe_routing_cpu": ["moe_routing_cpu_tune", "moe_routing_cpu_confirm"],
    "moe_routing_alpha": ["moe_routing_alpha"],
    "moe_routing_alpha_cpu": ["moe_routing_alpha_cpu"],
    "rope": ["rope_pretrain", "rope", "rope_finetune"],
    "rope_cpu": ["rope_pretrain_cpu", "rope_cpu", "rope_finetune_cpu"],
    "attention": ["attention"],
    "attention_cpu": ["attention_cpu"],
    "combined": ["combined_tune", "combined_confirm"],
    "combined_cpu": ["combined_cpu_tune", "combined_cpu_confirm"],
    "aa_cpu": ["aa_cpu"],
}


def axes_of(cfg) -> dict[str, list[str]]:
    from omegaconf import OmegaConf

    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    return {key: [v.strip() for v in str(values).split(",")] for key, values in params.items()}


def stage_cost(compose, stage: str) -> dict:
    """Jobs, tokens per job, FLOPs per token (mean over the arms) and the two time estimates of one stage."""
    from kimi_lab.training.step_time import model_size
    from kimi_lab.training.lifecycle import steps_and_tokens

    axes = axes_of(compose([f"experiment={stage}"], hydra=True))
    jobs = 1
    for values in axes.values():
        jobs *= len(values)
    shaping = {k: v for k, v in axes.items() if k not in ("seed", "optimizer.lr")}
    runs = []
    for combo in itertools.product(*shaping.values()):
        cfg = compose([f"experiment={stage}", "seed=1", *(f"{k}={v}" for k, v in zip(shaping, combo))])
        steps, tokens_per_step = steps_and_tokens(cfg, 1)
        runs.append((steps, steps * tokens_per_step, model_size(cfg)["flops_per_token"], cfg.model.name))
    steps = sum(r[0] for r in runs) / len(runs)
    tokens = sum(r[1] for r in runs) / len(runs)
    flops = sum(r[2] for r in runs) / len(runs)
    if runs[0][3] == "base":
        base_flops = model_size(compose(["+study=gpu", "hardware=cpu"]))["flops_per_token"]
        gpu_s = tokens * flops / H100_FLOPS if tokens else GPU_EVAL_JOB_S
        cpu_s = tokens * flops / (CPU_BASE_TOKENS_PER_S * base_flops) if tokens else CPU_TINY_JOB_S
    else:
        gpu_s = TINY_GPU_JOB_S + TINY_GPU_STEP_S * steps
        cpu_s = CPU_TINY_JOB_S + CPU_TINY_TOKEN_S * tokens
    return {"axes": axes, "jobs": jobs, "tokens": tokens, "gpu_h": jobs * gpu_s / 3600, "cpu_h": jobs * cpu_s / 3600,
            "primary": str(compose([f"experiment={stage}"]).report.primary_metric)}


def short(value: str) -> str:
    """10000 -> 10k; other values as written."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number / 1000:g}k" if number >= 1000 and number % 1000 == 0 else value


def values_text(key: str, values: list[str]) -> str:
    minus = [v.removeprefix("minus_") for v in values if v.startswith("minus_")]
    shown = [short(v) for v in values if not v.startswith("minus_")]
    if minus:
        shown.append("minus_{" + ",".join(minus) + "}")
    prefix = {"rope.theta": "θ ", "optimizer.momentum": "momentum ", "moe.aux_loss_alpha": "α "}.get(key, "")
    return prefix + "/".join(shown)


def grid_text(axes: dict[str, list[str]]) -> str:
    parts = []
    for key, values in axes.items():
        if key == "seed":
            parts.append(f"seeds {values[0]}–{values[-1]}" if len(values) > 2 else f"seeds {','.join(values)}")
        elif key == "optimizer.lr":
            parts.append(f"lr {values[0]}…{values[-1]} ({len(values)})")
        elif key not in ARM_KEYS:
            parts.append(f"{key} {'/'.join(short(v) for v in values)}")
    return " × ".join(parts)


ARM_KEYS = ("optimizer", "norm", "routing", "attention", "ablation", "rope.theta", "rope", "optimizer.momentum",
            "moe.aux_loss_alpha")


def hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def tokens_text(value: float) -> str:
    return f"{value / 1e6:,.0f} M" if value >= 1e7 else (f"{value / 1e6:.2f} M" if value else "eval only")


def row(compose, study: str, stages: list[str]) -> str:
    costs = [stage_cost(compose, stage) for stage in stages]
    arm_axes = {}
    for cost in costs:  # a later stage may add arms (the rope study's extension methods)
        arm_axes |= {k: v for k, v in cost["axes"].items() if k in ARM_KEYS and k not in arm_axes}
    arms = " × ".join(values_text(k, v) for k, v in arm_axes.items()) or "one configuration"
    primaries = list(dict.fromkeys(c["primary"] for c in costs))
    grid = " → ".join(grid_text(c["axes"]) for c in costs)
    jobs = " + ".join(str(c["jobs"]) for c in costs)
    tokens = " / ".join(tokens_text(c["tokens"]) for c in costs)
    gpu, cpu = sum(c["gpu_h"] for c in costs), sum(c["cpu_h"] for c in costs)
    return (f"| `{study}` | {arms} | {grid} | {jobs} | {tokens} | {hours(gpu)} | {hours(cpu)} | "
            f"{' → '.join(f'`{p}`' for p in primaries)} |")


def main() -> int:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kimi_lab.config.schema import register_configs

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        def compose(overrides, hydra=False):
            return hydra_compose("config", overrides=overrides, return_hydra_config=hydra)

        print("| study | arms | grid (stage → stage) | jobs | tokens per job | H100 h | 2-core h | primary metric |")
        print("|---|---|---|---|---|---|---|---|")
        for study, stages in STUDIES.items():
            print(row(compose, study, stages), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
