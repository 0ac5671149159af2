"""Per-run metrics compared across arms: final values from results.json, time-to-target and stability from
metrics.csv. Final values only (never the best step per run: that would select on noise)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kimi_lab.stats.collect import Job

SPIKE_WINDOW = 20  # steps of history a spike is measured against
SPIKE_MIN_HISTORY = 3  # steps needed before the first step that can count as a spike
LOSS_SPIKE_REL = 0.10  # a loss spike: train loss > (1 + 10 %) x median of the previous SPIKE_WINDOW steps


@dataclass(frozen=True)
class Metric:
    name: str
    words: str  # for verdicts: "<arm> lowers <words> by ..."
    lower_is_better: bool
    source: str  # results.json field (dotted for nested: downstream.piqa.acc), or "curve" (from metrics.csv)
    optional: bool = False  # compared only when some completed run has it (downstream: runs with eval=downstream)


METRICS = [
    Metric("val_loss", "val loss", True, "val_loss"),
    Metric("val_ppl", "val perplexity", True, "val_ppl"),
    Metric("val_acc", "val accuracy", False, "val_acc"),
    Metric("test_loss", "test loss", True, "test_loss"),
    Metric("tokens_per_s", "throughput (tokens/s)", False, "tokens_per_s"),
    Metric("peak_mem_mb", "peak memory (MB)", True, "peak_mem_mb"),
    Metric("train_time_s", "training time (s)", True, "train_time_s"),
    Metric("tokens_to_target", "tokens to the target val loss", True, "curve"),
    Metric("train_time_to_target_s", "training time to the target val loss (s)", True, "curve"),
    Metric("grad_norm_spike", "largest grad-norm spike (x running median)", True, "curve"),
    Metric("loss_spikes", "number of loss spikes", True, "curve"),
]
# eval=downstream (kimi_lab/evaluation): zero-shot benchmark scores of the final weights
DOWNSTREAM_TASKS = {"hellaswag": "HellaSwag", "piqa": "PIQA", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
METRICS += [Metric(f"downstream.{task}.{key}", f"{label} {words}", False, f"downstream.{task}.{key}", optional=True)
            for task, label in DOWNSTREAM_TASKS.items()
            for key, words in (("acc_norm", "accuracy (length-normalised)"), ("acc", "accuracy"))]
METRICS += [Metric("downstream.lambada.acc", "LAMBADA last-word accuracy", False, "downstream.lambada.acc",
                   optional=True),
            Metric("downstream.lambada.ppl", "LAMBADA perplexity", True, "downstream.lambada.ppl", optional=True)]
# MoE runs: load balance over the run (per layer in results.json; a list is averaged over the MoE layers)
METRICS += [Metric("expert_load_cv", "expert-load CV (mean over MoE layers)", True, "expert_load_cv", optional=True),
            Metric("moe_maxvio_batch_mean", "mean per-step MaxVio (load imbalance)", True, "moe_maxvio_batch_mean",
                   optional=True)]
METRICS_BY_NAME = {m.name: m for m in METRICS}
TIMING_METRICS = ("tokens_per_s", "train_time_s", "train_time_to_target_s")


def _finite(value) -> float:
    if isinstance(value, list):  # per-layer values: their mean
        value = float(np.mean(value)) if value else math.nan
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def default_target_loss(jobs: list[Job]) -> float:
    """The worst final val loss of the completed runs: every completed run reaches it, none is censored."""
    finals = [_finite(j.results.get("val_loss")) for j in jobs if j.usable]
    finals = [v for v in finals if not math.isnan(v)]
    return max(finals) if finals else math.nan


def time_to_target(job: Job, target: float) -> tuple[float, float]:
    """(tokens, training seconds) at the first validation with val_loss <= target; NaN if never reached.

    Resolution is one validation interval (trainer.val_check_interval)."""
    train_time = {r["step"]: r.get("train_time_s", math.nan) for r in job.train_rows}
    for row in job.val_rows:
        if row["val_loss"] <= target:
            return row.get("tokens", math.nan), train_time.get(row["step"], math.nan)
    return math.nan, math.nan


def _spike_ratios(values: list[float]) -> np.ndarray:
    """values[t] / median(values[t-SPIKE_WINDOW : t]) for every t with >= SPIKE_MIN_HISTORY earlier steps."""
    x = np.asarray(values, dtype=float)
    ratios = [x[t] / np.median(x[max(0, t - SPIKE_WINDOW):t]) for t in range(SPIKE_MIN_HISTORY, len(x))]
    return np.asarray(ratios, dtype=float)


def stability(job: Job) -> tuple[float, float]:
    """(largest grad-norm / running-median ratio, count of loss spikes); NaN for runs too short to tell."""
    grad = [r.get("grad_norm", math.nan) for r in job.train_rows]
    loss = [r.get("train_loss", math.nan) for r in job.train_rows]
    if len(loss) <= SPIKE_MIN_HISTORY:
        return math.nan, math.nan
    grad_ratio = _spike_ratios(grad)
    loss_ratio = _spike_ratios(loss)
    spikes = int(np.sum(~(loss_ratio <= 1.0 + LOSS_SPIKE_REL)))  # a non-finite loss counts as a spike
    return float(np.nanmax(grad_ratio)) if np.isfinite(grad_ratio).any() else math.nan, float(spikes)


def job_metrics(job: Job, target_loss: float) -> dict[str, float]:
    """Every metric of METRICS for one completed job (NaN where the run does not define it)."""
    values = {m.name: _finite(_lookup(job.results, m.source)) for m in METRICS if m.source != "curve"}
    values["tokens_to_target"], values["train_time_to_target_s"] = time_to_target(job, target_loss)
    values["grad_norm_spike"], values["loss_spikes"] = stability(job)
    return values


def missing_reason(job: Job, metric: Metric, target: float) -> str:
    """Why a counted (completed, not diverged) job has no value of ``metric``; the report groups jobs by it."""
    if metric.source != "curve":
        return f"results.json records no finite {metric.source}"
    if metric.name in ("grad_norm_spike", "loss_spikes"):
        if len(job.train_rows) <= SPIKE_MIN_HISTORY:
            return f"{len(job.train_rows)} logged step(s) in metrics.csv; a spike needs > {SPIKE_MIN_HISTORY}"
        return "no grad_norm logged in metrics.csv"
    finals = [r["val_loss"] for r in job.val_rows if math.isfinite(r["val_loss"])]
    if not finals:
        return "no validation in metrics.csv"
    if min(finals) > target:
        return f"never reached the target val loss {target:.4g}"
    return f"no {'tokens' if metric.name == 'tokens_to_target' else 'train_time_s'} logged at that validation's step"


def _lookup(results: dict, source: str):
    """results[source], or the nested value for a dotted source (``downstream.piqa.acc``); None when absent."""
    if source in results:
        return results[source]
    value = results
    for part in source.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
