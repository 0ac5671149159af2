"""results.json of a run: outcome, final and best validation, compute, throughput, MoE balance, what ran, where."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kimi_lab.model import flops_per_token, parameter_counts
from kimi_lab.optim import describe_assignment
from kimi_lab.training import precision
from kimi_lab.training.malloc import current as malloc_current
from kimi_lab.training.rundir import PeakRSS, RunDir, host, now_iso, versions

if TYPE_CHECKING:  # annotations only
    from kimi_lab.data import LMDataModule
    from kimi_lab.training.module import LanguageModelModule
    from kimi_lab.training.trainer import RunCallbacks


@dataclass(frozen=True)
class RunOutcome:
    """What results.json is built from once training stopped (``status``: completed, diverged or interrupted)."""

    cfg: DictConfig
    run: RunDir
    module: LanguageModelModule
    callbacks: RunCallbacks
    datamodule: LMDataModule
    kernel: str  # the attention kernel planned before training (recorded when no training step ran)
    rss: PeakRSS
    norm_profile: dict  # norm_kernel and norm_fwd_bwd_ms (bench.norm_profile.profile_norms)
    overrides: list[str]
    status: str = "completed"


def run_results(outcome: RunOutcome) -> dict:
    """Every results.json field known once training stopped (test, length and downstream scores come after)."""
    cfg, module, callbacks, rss = outcome.cfg, outcome.module, outcome.callbacks, outcome.rss
    datamodule = outcome.datamodule
    vals = callbacks.metrics.val_history
    final = vals[-1] if vals else {}
    finite = [r for r in vals if math.isfinite(r["val_loss"])]  # a NaN row would make min() order-dependent
    best = min(finite, key=lambda r: r["val_loss"]) if finite else {}  # ties: the earlier step, as BestCheckpoint
    peak_mb, peak_kind = _peak_mem_mb(rss, callbacks.memory.cuda_peak_bytes)
    peak_rss_mb = rss.peak_bytes / 2**20
    if not callbacks.memory.batches:  # resumed at its last step: no training batch was measured in this process
        peak_mb, peak_kind, peak_rss_mb = None, "unmeasured: no training step in this process", None
    steps = callbacks.metrics.summary()
    return {
        "status": outcome.status,
        "seed": cfg.seed,
        "overrides": outcome.overrides,
        "choices": _choices(cfg),
        "tags": list(cfg.tags),
        "report": report_block(cfg),
        "output_dir": str(outcome.run.path),
        "val_loss": final.get("val_loss"), "val_ppl": final.get("val_ppl"), "val_acc": final.get("val_acc"),
        "best_val_loss": best.get("val_loss"), "best_val_ppl": best.get("val_ppl"),
        "best_val_acc": best.get("val_acc"), "best_val_step": best.get("step"),
        "baseline_unigram_loss": datamodule.unigram_baseline_loss(),
        **steps,
        "epochs": epochs(steps["tokens_seen"], datamodule),
        "steps": module.trainer.global_step,
        "max_steps": module.max_steps,
        "peak_mem_mb": peak_mb, "peak_mem_kind": peak_kind, "peak_rss_mb": peak_rss_mb,
        **parameter_counts(module.model),
        "flops_per_token": flops_per_token(module.model, cfg.data.seq_len, cfg.model.d_model, cfg.model.n_layers),
        "attention_kernel": module.model.attention_kernel() if module.trainer.global_step else outcome.kernel,
        **_rope_summary(module.model),
        **_norm_summary(cfg, outcome.norm_profile, callbacks),
        **_optimizer_summary(cfg, module, callbacks),
        **callbacks.experts.summary(),
        "data_manifest_key": datamodule.manifest.get("key"),
        "versions": versions(),
        "host": host(),
        "malloc": malloc_current(),
        "fp32_matmul_precision": precision.current(),
        "finished": now_iso(),
    }


def report_block(cfg: DictConfig) -> dict:
    """The resolved ``report`` config: what the study declares to the report (primary metric, SESOI, targets)."""
    return OmegaConf.to_container(cfg.report, resolve=True)


def epochs(tokens_seen: int, datamodule) -> float:
    """Passes over the training split: tokens trained on (all ranks) / tokens in the split."""
    return tokens_seen / len(datamodule.train_set.tokens)


def _peak_mem_mb(rss, cuda_peak_bytes: int) -> tuple[float, str]:
    """Training batches' peak: CUDA max allocated within them (``MemoryWindow``), else the CPU sampler's."""
    if cuda_peak_bytes > 0:
        return cuda_peak_bytes / 2**20, "cuda_max_allocated"
    if rss.peak_in_use_bytes is not None:
        return (rss.peak_in_use_bytes - rss.base_in_use_bytes) / 2**20, "cpu_peak_malloc_in_use"
    return rss.peak_bytes / 2**20, "cpu_peak_rss"


def _rope_summary(model) -> dict:
    """The RoPE scaling that ran (rope.name is only the option's label) and the factor its cos/sin carried (YaRN
    mscale; 1 where MLA keeps them plain and scales its softmax instead)."""
    rotary = getattr(model, "rotary", None)
    if rotary is None:
        return {}
    factor = rotary.attention_scaling if model.scale_rotary_tables else 1.0
    return {"rope_scaling": rotary.scaling_type, "rope_attention_scaling": factor}


def _norm_summary(cfg: DictConfig, profile: dict, callbacks) -> dict:
    step_ms = callbacks.metrics.summary()["step_time_ms"]
    per_step_ms = profile["norm_fwd_bwd_ms"] * cfg.trainer.accumulate_grad_batches
    return {**profile, "norm_time_share": per_step_ms / step_ms if step_ms > 0 else float("nan")}


def _optimizer_summary(cfg, module, callbacks) -> dict:
    """Which parameters each optimizer (part) updates, and the optimizer update's share of training step time."""
    name = OmegaConf.select(cfg, "optimizer.name")
    optimizers = module.trainer.optimizers
    params = describe_assignment(module.model, optimizers[0], default_kind=name) if optimizers else {}
    return {"optimizer_params": params, **callbacks.optimizer_timer.summary(callbacks.metrics.train_time_s)}


def _choices(cfg: DictConfig) -> dict:
    """The option each config group ran with (Hydra's choice: ``moe`` is ``greedy``, ``deepseek_v3`` or ``dense``;
    the group's ``name`` without Hydra), ``eval`` / ``ablation`` / ``experiment`` when selected, and
    ``moe.topk_method`` (a sweep may change the gate on either MoE option)."""
    selected = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    groups = ("model", "attention", "norm", "moe", "optimizer", "rope", "data", "hardware")
    out = {g: selected.get(g) or OmegaConf.select(cfg, f"{g}.name") for g in groups}
    out |= {g: selected[g] for g in ("eval", "ablation", "experiment") if selected.get(g) not in (None, "null")}
    out["moe.topk_method"] = cfg.moe.topk_method
    return out

