"""Each arm vs the baseline arm, for every tested metric: t-test, CI, effect sizes, family-corrected p, TOST,
power and MDE (in d and in the metric's units), a verdict; then the families (``kimi_lab.stats.families``).

Statistics come from scipy.stats (Welch 1947 / paired t-test and their confidence intervals) and statsmodels
(``multipletests``; ``TTestPower`` for paired rows, ``TTestIndPower`` for Welch rows; ``ttost_paired`` /
``ttost_ind(usevar="unequal")`` for equivalence). Written here only what they lack: Cohen's d_s with the pooled SD,
Hedges' exact small-sample correction J = Γ(ν/2) / (√(ν/2) Γ((ν-1)/2)) (Hedges 1981, eq. 6e), d_z = mean(a - b) /
SD(a - b) of the paired differences (Cohen 1988, §2.3.5), and the standard error of the difference (scipy's test
result does not expose it): SD(a - b) / √n paired, √(s_a²/n_a + s_b²/n_b) Welch.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import special, stats
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from kimi_lab.stats.collect import Sweep, as_number, parse_overrides
from kimi_lab.stats.descriptive import (COMPUTE_COLUMNS, compute_by_arm, compute_warnings, epoch_warning,
                                        timing_rows)
from kimi_lab.stats.families import (CORRECTIONS, FAMILY_DEFAULTS, add_corrected_p, adjust_pvalues,  # noqa: F401
                                     apply_families)
from kimi_lab.stats.metrics import (DESCRIPTIVE_METRICS, TIMING, Metric, job_metrics, missing_reason,
                                    sweep_metrics)
from kimi_lab.stats.power import ALPHA, TARGET_POWER, mde_d, n_for_power, power_at  # noqa: F401
from kimi_lab.stats.settings import Settings, resolve_settings

FLAT_RTOL = 1e-9  # "no variance": spread <= FLAT_RTOL x max(|value|, 1), i.e. floating-point noise only
COLUMNS = [
    "metric", "arm", "baseline", "family", "verdict", "test", "n_a", "n_b", "mean_a", "mean_b", "sd_a", "sd_b",
    "sd_diff", "sd_pooled", "diff", "se", "ci_low", "ci_high", "ci_low_simultaneous", "ci_high_simultaneous", "t",
    "df", "p", *CORRECTIONS, "p_family", "sesoi", "p_tost", "p_tost_family", "cohens_d", "hedges_g", "d_z", "power",
    "mde_d", "mde", "mde_alpha", "n_for_80pct_power", "seeds_a", "seeds_b", "note", "warning",
]
ARM_COLUMNS = [*COLUMNS, *COMPUTE_COLUMNS]  # comparisons.csv: every arm row also carries its arm's compute


def ci_label(alpha: float = ALPHA) -> str:
    """'95 % CI' at alpha 0.05: the level of the intervals ``t_test`` gives (1 - alpha)."""
    return f"{100 * (1 - alpha):.4g} % CI"


def t_test(a, b, paired: bool, alpha: float = ALPHA) -> dict:
    """t-test of mean(a) - mean(b) along the last axis (vectorised): Welch, or paired on aligned seeds.

    Returns t, df, p (two-sided) and the (1 - alpha) CI of the difference (of the paired differences' mean)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on near-constant samples; handled by caller
        res = stats.ttest_rel(a, b, axis=-1) if paired else stats.ttest_ind(a, b, axis=-1, equal_var=False)
        ci = res.confidence_interval(confidence_level=1.0 - alpha)
    return {"t": res.statistic, "df": res.df, "p": res.pvalue, "ci_low": ci.low, "ci_high": ci.high}


def cohens_d(a, b):
    """d_s = (mean(a) - mean(b)) / pooled SD (ddof=1 in each arm), along the last axis."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n_a, n_b = a.shape[-1], b.shape[-1]
    pooled = ((n_a - 1) * a.var(axis=-1, ddof=1) + (n_b - 1) * b.var(axis=-1, ddof=1)) / (n_a + n_b - 2)
    return (a.mean(axis=-1) - b.mean(axis=-1)) / np.sqrt(pooled)


def d_z(a, b) -> float:
    """Paired effect size d_z = mean(a - b) / SD(a - b) (ddof=1): the t of the paired test over √n."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(diff.mean() / diff.std(ddof=1))


def hedges_correction(dof):
    """Hedges' exact J(ν) for ν = n_a + n_b - 2; 1 - 3/(4ν - 1) is its usual approximation."""
    dof = np.asarray(dof, dtype=float)
    return np.exp(special.gammaln(dof / 2) - special.gammaln((dof - 1) / 2)) / np.sqrt(dof / 2)


def is_flat(x: np.ndarray, scale: float) -> bool:
    """No variance: spread <= FLAT_RTOL x max(scale, 1), so a constant shift plus rounding noise is not a signal."""
    return bool(np.ptp(x) <= FLAT_RTOL * max(scale, 1.0))


def compare_samples(a: dict[int, float], b: dict[int, float], alpha: float = ALPHA, pairing: bool = True,
                    sesoi: float = math.nan) -> dict:
    """Arm a vs baseline b from {seed: value}: every column of COLUMNS but names and corrected p-values; the family
    columns (FAMILY_DEFAULTS) are left for ``apply_families``.

    Paired t-test when both arms have the same seeds (data order is seed-determined, so seed noise cancels),
    else Welch. Fewer than 2 runs in an arm, or no variance (``is_flat``): estimates only, no test. cohens_d and
    hedges_g are always the between-arm d_s / g (ν = n_a + n_b - 2); power, MDE and n for 80 % use d_z on paired
    rows (``TTestPower``, n pairs), d_s on Welch rows (``TTestIndPower``), at ``alpha``; ``mde`` = ``mde_d`` x
    ``sd_diff`` (paired) or x ``sd_pooled`` (Welch). A finite ``sesoi`` adds the TOST p of |difference| < sesoi."""
    seeds_a, seeds_b = sorted(a), sorted(b)
    x, y = np.array([a[s] for s in seeds_a]), np.array([b[s] for s in seeds_b])
    n_a, n_b = len(x), len(y)
    row = {"n_a": n_a, "n_b": n_b, "seeds_a": " ".join(map(str, seeds_a)), "seeds_b": " ".join(map(str, seeds_b))}
    row |= {"mean_a": _mean(x), "mean_b": _mean(y), "sd_a": _sd(x), "sd_b": _sd(y)}
    row["diff"] = row["mean_a"] - row["mean_b"]
    nan_fields = ("ci_low", "ci_high", "t", "df", "p", "cohens_d", "hedges_g", "d_z", "power", "mde_d", "mde",
                  "n_for_80pct_power", "sd_diff", "sd_pooled", "se", "p_tost")
    row |= dict.fromkeys(nan_fields, math.nan) | FAMILY_DEFAULTS | {"warning": "", "sesoi": sesoi, "mde_alpha": alpha}
    if min(n_a, n_b) < 2:
        note = f"n = {n_a} vs {n_b}: estimate only, no test (needs >= 2 runs per arm)"
        if min(n_a, n_b) == 0:
            note = f"no completed run with a value in the {'arm' if n_a == 0 else 'baseline'}: nothing to compare"
        return row | {"test": "none", "note": note}
    paired = pairing and seeds_a == seeds_b
    row["test"] = "paired" if paired else "welch"
    row["note"] = f"paired on seeds {row['seeds_a']}" if paired else ("Welch: seeds differ" if pairing else "Welch")
    row["mde_d"] = mde_d(n_a, n_b, alpha, paired=paired)
    row["sd_pooled"] = math.sqrt(((n_a - 1) * x.var(ddof=1) + (n_b - 1) * y.var(ddof=1)) / (n_a + n_b - 2))
    if paired:
        row["sd_diff"] = float((x - y).std(ddof=1))
    scale = float(max(np.abs(x).max(), np.abs(y).max()))
    if is_flat(x - y, scale) if paired else (is_flat(x, scale) and is_flat(y, scale)):
        what = "the paired differences are constant" if paired else "both arms are constant"
        return row | {"note": f"no variance across seeds ({what}): no test"}
    row |= {k: float(v) for k, v in t_test(x, y, paired, alpha).items()}
    row["se"] = row["sd_diff"] / math.sqrt(n_a) if paired else math.sqrt(x.var(ddof=1) / n_a + y.var(ddof=1) / n_b)
    d = float(cohens_d(x, y))
    row |= {"cohens_d": d, "hedges_g": d * float(hedges_correction(n_a + n_b - 2))}
    if paired:
        row["d_z"] = d_z(x, y)
    effect = row["d_z"] if paired else d
    row |= {"power": power_at(effect, n_a, n_b, alpha, paired),
            "n_for_80pct_power": n_for_power(effect, alpha, paired=paired),
            "mde": row["mde_d"] * (row["sd_diff"] if paired else row["sd_pooled"])}
    if math.isfinite(sesoi):
        tost = ttost_paired(x, y, -sesoi, sesoi) if paired else ttost_ind(x, y, -sesoi, sesoi, usevar="unequal")
        row["p_tost"] = float(tost[0])
    return row


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else math.nan


def _sd(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else math.nan


@dataclass
class Comparison:
    baseline: str
    baseline_rule: str
    target_loss: float  # the declared val-loss target of tokens_to_target; NaN when none is declared
    alpha: float
    rows: list[dict] = field(default_factory=list)  # one per (tested metric, arm != baseline), ARM_COLUMNS
    summaries: list[dict] = field(default_factory=list)  # one per (metric, arm): n, mean, sd, median, min, max, seeds
    censored: dict[str, list[str]] = field(default_factory=dict)  # metric -> completed jobs without a value
    censored_reasons: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # metric -> reason -> jobs
    # factorial sweeps (kimi_lab.stats.factorial.add_factorial): main effects and Type II ANOVA terms per metric
    main_effects: list[dict] = field(default_factory=list)  # factorial.EFFECT_COLUMNS
    anova: list[dict] = field(default_factory=list)  # factorial.ANOVA_COLUMNS
    anova_notes: dict[str, str] = field(default_factory=dict)  # metric -> why its ANOVA was skipped
    settings: Settings = field(default_factory=Settings)  # primary metric, SESOI, target, MDE goal
    metrics: list[Metric] = field(default_factory=list)  # the tested metrics with a value in some run, in order
    families: dict[str, dict] = field(default_factory=dict)  # apply_families' summary of the arm rows' families
    compute: dict[str, dict[str, float]] = field(default_factory=dict)  # arm -> COMPUTE_COLUMNS
    timing: list[dict] = field(default_factory=list)  # descriptive.TIMING_COLUMNS
    warnings: list[str] = field(default_factory=list)  # settings, compute and epoch warnings
    calibration: dict | None = None  # one-arm sweeps: kimi_lab.stats.calibration.aa_calibration's result
    tuned_lrs: list[str] = field(default_factory=list)  # confirm sweeps: kimi_lab.stats.tune.confirm_notes' lines


def choose_baseline(sweep: Sweep, spec: str | None) -> tuple[str, str]:
    """(arm label, how it was chosen). ``spec`` like ``norm=layernorm,optimizer=adam`` must match one arm; its values
    are normalised as Hydra writes them, like the arm labels (``optimizer.lr=2e-3`` matches ``0.002``)."""
    if not spec:
        first = sweep.arms[0]
        if all(first.factors[k] == levels[0] for k, levels in sweep.factors.items()):
            return first.label, "the first value of each swept factor"
        return first.label, ("the first arm: no arm has the first value of every swept factor (several sweeps in "
                             "one folder?); name one with --baseline")
    wanted = parse_overrides([item.strip() for item in re.split(r",(?=[^,=]+=)", spec)])
    unknown = [k for k in wanted if k not in sweep.factors]
    if unknown:
        raise ValueError(f"--baseline {spec}: {unknown[0]!r} is not a swept key; allowed: {sorted(sweep.factors)}")
    for key, value in wanted.items():  # `--baseline theta=10000` names the arm the sweep writes 10000.0
        same = [level for level in sweep.factors[key] if as_number(level) is not None
                and as_number(level) == as_number(value)]
        wanted[key] = same[0] if value not in sweep.factors[key] and same else value
    matches = [a for a in sweep.arms if all(a.factors[k] == v for k, v in wanted.items())]
    if len(matches) > 1:  # a partial spec (norm=layernorm on a norm x lr grid): the other keys at their first value
        firsts = [a for a in matches if all(a.factors[k] == sweep.factors[k][0] for k in a.factors if k not in wanted)]
        if len(firsts) == 1:
            return firsts[0].label, f"--baseline {spec}, the other swept keys at their first value"
    if len(matches) != 1:
        raise ValueError(f"--baseline {spec} matches {len(matches)} arms; allowed: one of "
                         f"{[a.label for a in sweep.arms]}")
    return matches[0].label, f"--baseline {spec}"


def arm_values(sweep: Sweep, target_loss: float,
               metrics: list[Metric] | None = None) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> arm label -> {seed: value} over completed jobs with a finite value (default metrics: the sweep's
    tested ones and DESCRIPTIVE_METRICS)."""
    metrics = sweep_metrics(sweep.jobs) + DESCRIPTIVE_METRICS if metrics is None else metrics
    out = {m.name: {a.label: {} for a in sweep.arms} for m in metrics}
    for arm in sweep.arms:
        for job in arm.completed:
            for name, value in job_metrics(job, target_loss, metrics).items():
                if math.isfinite(value) and name in out:
                    out[name][arm.label][job.seed] = value
    return out


def compare_sweep(sweep: Sweep, baseline: str | None = None, target_loss: float | None = None,
                  alpha: float = ALPHA, pairing: bool = True, primary: str | None = None,
                  sesoi: dict[str, float] | None = None, target: dict[str, float] | None = None) -> Comparison:
    """All arms vs the baseline arm for every tested metric, in two families: the primary metric's rows
    (confirmatory) and every other metric's rows (exploratory). ``primary`` / ``sesoi`` / ``target`` override the
    study's declarations (``settings.resolve_settings``); ``target_loss`` is ``target={"val_loss": target_loss}``."""
    label, rule = choose_baseline(sweep, baseline)
    if target_loss is not None:
        target = {**(target or {}), "val_loss": float(target_loss)}
    settings = resolve_settings(sweep, primary, sesoi, target)
    result = Comparison(baseline=label, baseline_rule=rule, target_loss=settings.target_loss, alpha=alpha,
                        settings=settings)
    tested = sweep_metrics(sweep.jobs)
    values = arm_values(sweep, settings.target_loss, tested + DESCRIPTIVE_METRICS)
    result.compute = compute_by_arm(sweep, label)
    off = compute_warnings(result.compute, label)
    result.warnings = [*settings.warnings, *off.values(), *filter(None, [epoch_warning(result.compute)])]
    arm_warnings = {a.label: "; ".join(filter(None, (a.row_warning(), off.get(a.label)))) for a in sweep.arms}
    for metric in tested + DESCRIPTIVE_METRICS:
        per_arm = values[metric.name]
        if metric.optional and not any(per_arm.values()):
            continue  # e.g. downstream scores in a sweep run without eval=downstream
        result.summaries += [_summary(metric.name, a.label, per_arm[a.label]) for a in sweep.arms]
        if metric.kind == TIMING or metric not in tested:  # val_ppl and timings: summaries only
            continue
        result.metrics.append(metric)
        result.rows += _metric_rows(sweep, metric, per_arm, label, result, arm_warnings, pairing)
    result.families = apply_families(result.rows, settings.primary_metric, alpha, settings.sesoi)
    if len(sweep.arms) > 1 and settings.primary_metric not in {m.name for m in result.metrics}:
        result.warnings.append(f"no completed run records the primary metric {settings.primary_metric}: the "
                               f"confirmatory family is empty, every comparison is exploratory")
    result.rows = [{**{c: row[c] for c in COLUMNS}, **result.compute[row["arm"]]} for row in result.rows]
    timing = [m.name for m in DESCRIPTIVE_METRICS if m.kind == TIMING]
    result.timing = timing_rows(values, timing, [a.label for a in sweep.arms], label)
    return result


def _summary(metric: str, arm: str, values: dict[int, float]) -> dict:
    v = np.array(list(values.values()), dtype=float)
    return {"metric": metric, "arm": arm, "n": len(v), "mean": _mean(v), "sd": _sd(v),
            "median": float(np.median(v)) if len(v) else math.nan, "min": float(v.min()) if len(v) else math.nan,
            "max": float(v.max()) if len(v) else math.nan, "seeds": " ".join(map(str, sorted(values)))}


def _metric_rows(sweep: Sweep, metric: Metric, per_arm: dict[str, dict[int, float]], label: str,
                 result: Comparison, arm_warnings: dict[str, str], pairing: bool) -> list[dict]:
    """The rows of one tested metric (every arm vs ``label``), with the censoring of ``result`` filled in."""
    missing = [j for a in sweep.arms for j in a.completed if j.seed not in per_arm[a.label]]
    excluded: dict[str, dict[str, int]] = {}  # arm -> reason -> completed runs without a value
    if missing:
        result.censored[metric.name] = [j.name for j in missing]
        for job in missing:
            reason = missing_reason(job, metric, result.target_loss)
            result.censored_reasons.setdefault(metric.name, {}).setdefault(reason, []).append(job.name)
            excluded.setdefault(job.arm, {}).setdefault(reason, 0)
            excluded[job.arm][reason] += 1
    sesoi = result.settings.sesoi.get(metric.name, math.nan)
    rows = [{"metric": metric.name, "arm": arm.label, "baseline": label,
             **compare_samples(per_arm[arm.label], per_arm[label], result.alpha, pairing, sesoi)}
            for arm in sweep.arms if arm.label != label]
    for row in rows:  # dropping diverged (or failed) seeds can flatter an arm: say so on every row it touches
        lost = [f"arm {arm}: {k} completed run(s) excluded ({reason})" for arm in (row["arm"], label)
                for reason, k in excluded.get(arm, {}).items()  # e.g. never reached the target: conditional
                if per_arm[arm]]  # an arm with no value at all (a dense arm's expert load) has n = 0, no test
        row["warning"] = "; ".join(w for w in (arm_warnings[row["arm"]], arm_warnings[label], *lost) if w)
    return rows
