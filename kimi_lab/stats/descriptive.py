"""What a report describes without testing: compute per arm (active parameters, FLOPs/token, tokens, epochs; Hoffmann
et al. 2022 on matched compute), timings per arm (median and spread), and the noise floor of every tested metric (seed
SD, paired-difference SD, MDE in the metric's units)."""

from __future__ import annotations

import math

import numpy as np

from kimi_lab.stats.collect import Sweep

COMPUTE_FIELDS = ("params_active", "flops_per_token", "tokens_seen")  # results.json, mean over an arm's seeds
COMPUTE_COLUMNS = [*COMPUTE_FIELDS, *(f"{f}_ratio" for f in COMPUTE_FIELDS), "epochs"]  # every arm row carries them
COMPUTE_RTOL = 0.05  # FLOPs/token or tokens further than 5 % from the baseline's: the arms are not matched
COMPUTE_WORDS = {"flops_per_token": "FLOPs/token", "tokens_seen": "tokens"}
TIMING_NOTE = "measured while other work ran: compare with `make bench`"
TIMING_COLUMNS = ["metric", "arm", "n", "median", "min", "max", "median_ratio"]
NOISE_COLUMNS = ["metric", "arm", "n", "sd", "test", "sd_diff", "sd_pooled", "mde", "mde_alpha"]


def _mean_field(arm, key: str) -> float:
    values = []
    for job in arm.completed:
        try:
            value = float(job.results.get(key))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            values.append(value)
    return float(np.mean(values)) if values else math.nan


def compute_by_arm(sweep: Sweep, baseline: str) -> dict[str, dict[str, float]]:
    """arm -> COMPUTE_COLUMNS: arm means of COMPUTE_FIELDS and ``epochs``, each field's ratio to the baseline's."""
    out = {a.label: {k: _mean_field(a, k) for k in (*COMPUTE_FIELDS, "epochs")} for a in sweep.arms}
    base = out[baseline]
    for values in out.values():
        for key in COMPUTE_FIELDS:
            ok = math.isfinite(values[key]) and math.isfinite(base[key]) and base[key] != 0
            values[f"{key}_ratio"] = values[key] / base[key] if ok else math.nan
    return out


def compute_warnings(compute: dict[str, dict[str, float]], baseline: str) -> dict[str, str]:
    """arm -> 'arm X: FLOPs/token 1.18 x the baseline's: not compute-matched, ...' when FLOPs/token or tokens differ
    from the baseline's by more than COMPUTE_RTOL."""
    out = {}
    for arm, values in compute.items():
        off = [f"{words} {values[f'{key}_ratio']:.3g} x the baseline's" for key, words in COMPUTE_WORDS.items()
               if arm != baseline and math.isfinite(values[f"{key}_ratio"])
               and abs(values[f"{key}_ratio"] - 1) > COMPUTE_RTOL]
        if off:
            out[arm] = (f"arm {arm}: {', '.join(off)}: not compute-matched (more than {COMPUTE_RTOL:.0%} apart), so "
                        f"its differences mix the recipe with the compute")
    return out


def epoch_warning(compute: dict[str, dict[str, float]]) -> str | None:
    """'the arms saw repeated data: ...' when some arm ran more than one epoch over the training split."""
    repeated = {arm: v["epochs"] for arm, v in compute.items() if math.isfinite(v["epochs"]) and v["epochs"] > 1}
    if not repeated:
        return None
    listed = ", ".join(f"{arm} {epochs:.3g}" for arm, epochs in repeated.items())
    return (f"the arms saw repeated data: more than one epoch over the training split ({listed}); results after "
            f"several epochs over a small corpus favour fast early learners")


def timing_rows(values: dict[str, dict[str, dict[int, float]]], metrics: list[str], arms: list[str],
                baseline: str) -> list[dict]:
    """TIMING_COLUMNS per timing metric and arm: median and min..max over the arm's seeds, the ratio of its median to
    the baseline's. Never a test: the seed does not set a timing, and sweep jobs run in blocks."""
    rows = []
    for metric in metrics:
        per_arm = values.get(metric, {})
        if not any(per_arm.values()):
            continue
        base = float(np.median(list(per_arm[baseline].values()))) if per_arm.get(baseline) else math.nan
        for arm in arms:
            v = np.array(list(per_arm.get(arm, {}).values()), dtype=float)
            median = float(np.median(v)) if len(v) else math.nan
            rows.append({"metric": metric, "arm": arm, "n": len(v), "median": median,
                         "min": float(v.min()) if len(v) else math.nan, "max": float(v.max()) if len(v) else math.nan,
                         "median_ratio": median / base if math.isfinite(base) and base != 0 else math.nan})
    return rows


def noise_floor(summaries: list[dict], rows: list[dict], baseline: str) -> list[dict]:
    """NOISE_COLUMNS per tested metric: the baseline arm (n, seed SD), then each arm with its SD, the SD of its
    paired differences from the baseline (paired rows) or the pooled SD (Welch rows), and its MDE in the metric's
    units at the row's power level (``mde_alpha``)."""
    summary = {(s["metric"], s["arm"]): s for s in summaries}
    out = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        base = summary.get((metric, baseline))
        if base is not None:
            out.append({"metric": metric, "arm": baseline, "n": base["n"], "sd": base["sd"], "test": "baseline",
                        "sd_diff": math.nan, "sd_pooled": math.nan, "mde": math.nan, "mde_alpha": math.nan})
        out += [{"metric": metric, "arm": r["arm"], "n": r["n_a"], "sd": r["sd_a"], "test": r["test"],
                 "sd_diff": r["sd_diff"], "sd_pooled": r["sd_pooled"], "mde": r["mde"], "mde_alpha": r["mde_alpha"]}
                for r in rows if r["metric"] == metric]
    return out
