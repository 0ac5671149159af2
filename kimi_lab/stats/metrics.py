"""Per-run metrics of a report: final values from results.json, time-to-target and stability from metrics.csv.
Final values only (never the best step per run: that would select on noise).

``METRICS`` are tested arm vs baseline (each in the confirmatory or the exploratory family); ``DESCRIPTIVE_METRICS``
are summarised per arm only: ``val_ppl`` (exp of val_loss, a second test of the same numbers) and the timings (the seed
does not set them; the jobs of a sweep run in blocks while other work shares the machine). ``val_loss@<L>``: the
loss at evaluation length L from results.json ``val_loss_at_len`` (``length_metric``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from kimi_lab.stats.collect import Job

SPIKE_WINDOW = 20  # steps of history a spike is measured against
SPIKE_MIN_HISTORY = 3  # steps needed before the first step that can count as a spike
LOSS_SPIKE_REL = 0.10  # a loss spike: train loss > (1 + 10 %) x median of the previous SPIKE_WINDOW steps
TESTED, TIMING, DERIVED = "tested", "timing", "derived"  # Metric.kind


@dataclass(frozen=True)
class Metric:
    name: str
    words: str  # for verdicts: "<arm> lowers <words> by ..."
    lower_is_better: bool
    source: str  # results.json field (dotted for nested: downstream.piqa.acc), or "curve" (from metrics.csv)
    optional: bool = False  # compared only when some completed run has it (downstream: runs with eval=downstream)
    units: str = ""  # of differences, MDE and SESOI: "nats", "MB", "tokens"; "" for ratios and fractions
    kind: str = TESTED  # TESTED: arm vs baseline test; TIMING / DERIVED (val_ppl): described per arm, never tested


METRICS = [
    Metric("val_loss", "val loss", True, "val_loss", units="nats"),
    Metric("val_acc", "val accuracy", False, "val_acc"),
    Metric("test_loss", "test loss", True, "test_loss", units="nats"),
    Metric("peak_mem_mb", "peak memory (MB)", True, "peak_mem_mb", units="MB"),
    Metric("tokens_to_target", "tokens to the target val loss", True, "curve", optional=True, units="tokens"),
    Metric("grad_norm_spike", "largest grad-norm spike (x running median)", True, "curve"),
    Metric("loss_spikes", "number of loss spikes", True, "curve", units="spikes"),
]
# eval=downstream (kimi_lab/evaluation): zero-shot benchmark scores of the final weights
DOWNSTREAM_TASKS = {"hellaswag": "HellaSwag", "piqa": "PIQA", "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
METRICS += [Metric(f"downstream.{task}.{key}", f"{label} {words}", False, f"downstream.{task}.{key}", optional=True)
            for task, label in DOWNSTREAM_TASKS.items()
            for key, words in (("acc_norm", "accuracy (length-normalised)"), ("acc", "accuracy"))]
METRICS += [Metric("downstream.lambada.acc", "LAMBADA last-word accuracy", False, "downstream.lambada.acc",
                   optional=True),
            Metric("downstream.lambada.ppl", "LAMBADA perplexity", True, "downstream.lambada.ppl", optional=True)]
# MoE runs, balance as Wang et al. 2024 / DeepSeek-V3 measure it (MaxVio = max_i load_i / mean load - 1; a per-layer
# list is averaged over the MoE layers): global MaxVio on the fixed validation windows at the end of training, and the
# per-batch MaxVio averaged over the last half of training; expert_load_cv over the whole run
METRICS += [Metric("expert_load_cv", "expert-load CV (mean over MoE layers)", True, "expert_load_cv", optional=True),
            Metric("moe_maxvio_val", "global MaxVio on the validation windows (load imbalance)", True,
                   "moe_maxvio_val", optional=True),
            Metric("moe_maxvio_batch_late", "per-batch MaxVio over the last half of training", True,
                   "moe_maxvio_batch_late", optional=True)]
DESCRIPTIVE_METRICS = [
    Metric("val_ppl", "val perplexity", True, "val_ppl", kind=DERIVED),
    Metric("tokens_per_s", "throughput (tokens/s)", False, "tokens_per_s", units="tokens/s", kind=TIMING),
    Metric("step_time_ms", "median step time (ms)", True, "step_time_ms", optional=True, units="ms", kind=TIMING),
    Metric("optimizer_step_ms", "median optimizer step (ms)", True, "optimizer_step_ms", optional=True, units="ms",
           kind=TIMING),
    Metric("train_time_s", "training time (s)", True, "train_time_s", units="s", kind=TIMING),
    Metric("train_time_to_target_s", "training time to the target val loss (s)", True, "curve", optional=True,
           units="s", kind=TIMING),
]
METRICS_BY_NAME = {m.name: m for m in METRICS}  # the tested metrics: what report.primary_metric / sesoi may name
_ALL_BY_NAME = {m.name: m for m in METRICS + DESCRIPTIVE_METRICS}
TIMING_METRICS = tuple(m.name for m in DESCRIPTIVE_METRICS if m.kind == TIMING)
LENGTH_PREFIX = "val_loss@"  # val_loss@1024: results.json val_loss_at_len["1024"]
CURVE_TARGETS = ("val_loss",)  # metrics a declared target may name: the metrics.csv validation curve


def length_metric(length: int | str) -> Metric:
    """``val_loss@<L>``: final val loss scored on windows of L tokens (results.json ``val_loss_at_len``)."""
    return Metric(f"{LENGTH_PREFIX}{int(length)}", f"val loss at length {int(length)}", True,
                  f"val_loss_at_len.{int(length)}", optional=True, units="nats")


def metric_named(name: str) -> Metric:
    """The Metric called ``name`` (a ``val_loss@<L>`` too); KeyError for an unknown name."""
    if name in _ALL_BY_NAME:
        return _ALL_BY_NAME[name]
    found = re.fullmatch(re.escape(LENGTH_PREFIX) + r"(\d+)", name)
    if found and int(found.group(1)) > 0:
        return length_metric(found.group(1))
    raise KeyError(name)


def tested_metric_names() -> list[str]:
    """What --primary / --sesoi may name (besides ``val_loss@<L>``)."""
    return list(METRICS_BY_NAME)


def sweep_metrics(jobs: list[Job]) -> list[Metric]:
    """The tested metrics of a sweep: METRICS, then ``val_loss@<L>`` for every length a completed job recorded."""
    lengths = {int(k) for j in jobs if j.usable and isinstance(j.results.get("val_loss_at_len"), dict)
               for k in j.results["val_loss_at_len"] if str(k).isdigit()}
    return METRICS + [length_metric(length) for length in sorted(lengths)]


def _finite(value) -> float:
    if isinstance(value, list):  # per-layer values: their mean
        value = float(np.mean(value)) if value else math.nan
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


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


def job_metrics(job: Job, target_loss: float, metrics: list[Metric] | None = None) -> dict[str, float]:
    """Every metric of ``metrics`` (default: METRICS and DESCRIPTIVE_METRICS) for one completed job, NaN where the run
    does not define it; the time to target is NaN for every run when ``target_loss`` is NaN (none declared)."""
    metrics = METRICS + DESCRIPTIVE_METRICS if metrics is None else metrics
    values = {m.name: _finite(_lookup(job.results, m.source)) for m in metrics if m.source != "curve"}
    values["tokens_to_target"], values["train_time_to_target_s"] = (
        time_to_target(job, target_loss) if math.isfinite(target_loss) else (math.nan, math.nan))
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
