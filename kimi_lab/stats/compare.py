"""Each arm vs the baseline arm, for every metric: t-test, 95 % CI, effect sizes, corrected p, power, MDE.

Statistics come from scipy.stats (Welch 1947 / paired t-test and their confidence intervals) and statsmodels
(``multipletests``; ``TTestPower`` for paired rows, ``TTestIndPower`` for Welch rows). Written here only what they
lack: Cohen's d_s with the pooled SD, Hedges' exact small-sample correction J = Γ(ν/2) / (√(ν/2) Γ((ν-1)/2))
(Hedges 1981, eq. 6e), and d_z = mean(a - b) / SD(a - b) of the paired differences (Cohen 1988, §2.3.5).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from scipy import special, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from kimi_lab.stats.collect import Sweep, as_number, parse_overrides
from kimi_lab.stats.metrics import METRICS, default_target_loss, job_metrics, missing_reason

ALPHA = 0.05
TARGET_POWER = 0.8
FLAT_RTOL = 1e-9  # "no variance": spread <= FLAT_RTOL x max(|value|, 1), i.e. floating-point noise only
CORRECTIONS = {"p_bonferroni": "bonferroni", "p_holm": "holm", "p_fdr_bh": "fdr_bh"}  # column -> method
COLUMNS = [
    "metric", "arm", "baseline", "test", "n_a", "n_b", "mean_a", "mean_b", "sd_a", "sd_b", "diff", "ci_low",
    "ci_high", "t", "df", "p", "cohens_d", "hedges_g", "d_z", *CORRECTIONS, "power", "mde_d", "n_for_80pct_power",
    "seeds_a", "seeds_b", "note", "warning",
]


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


def adjust_pvalues(p, method: str) -> np.ndarray:
    """multipletests over the finite p-values of one family (method always explicit: the default is Holm-Šidák)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = multipletests(p[finite], alpha=ALPHA, method=method)[1]
    return out


def add_corrected_p(family: list[dict]) -> None:
    """Set every CORRECTIONS column of the rows of one family from their ``p``."""
    for column, method in CORRECTIONS.items():
        for row, p_adj in zip(family, adjust_pvalues([r["p"] for r in family], method)):
            row[column] = float(p_adj)


def _power_setup(n_a: int, n_b: int, paired: bool) -> tuple:
    """(statsmodels power analysis, its size arguments): one-sample TTestPower on n pairs for a paired test (effect
    size d_z), two-sample TTestIndPower on n_a vs n_b for Welch (effect size d_s)."""
    return (TTestPower(), {"nobs": n_a}) if paired else (TTestIndPower(), {"nobs1": n_a, "ratio": n_b / n_a})


@cache
def mde_d(n_a: int, n_b: int, alpha: float = ALPHA, power: float = TARGET_POWER, paired: bool = False) -> float:
    """Smallest |d| the two-sided test detects with ``power`` at these sizes: d_s for Welch (3 vs 3: 3.07), d_z for
    a paired test (3 pairs: 3.26)."""
    if min(n_a, n_b) < 2:
        return math.nan
    analysis, sizes = _power_setup(n_a, n_b, paired)
    return float(analysis.solve_power(effect_size=None, alpha=alpha, power=power, alternative="two-sided", **sizes))


def power_at(d: float, n_a: int, n_b: int, alpha: float = ALPHA, paired: bool = False) -> float:
    """Power of the two-sided test at effect |d| (d_z when paired, d_s otherwise)."""
    if min(n_a, n_b) < 2 or not math.isfinite(d):
        return math.nan
    analysis, sizes = _power_setup(n_a, n_b, paired)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        power = float(analysis.power(effect_size=abs(d), alpha=alpha, alternative="two-sided", **sizes))
        if math.isnan(power):  # scipy's nct.cdf of the far lower tail is NaN at huge d: that tail is ~0
            power = float(analysis.power(effect_size=abs(d), alpha=alpha / 2, alternative="larger", **sizes))
    return power


def n_for_power(d: float, alpha: float = ALPHA, power: float = TARGET_POWER, paired: bool = False,
                n_max: int = 10**7) -> float:
    """Smallest n >= 2 (runs per arm, equal arms; pairs when paired) with power_at(d, n, n) >= ``power``; NaN when d
    is 0 or undefined, or n > n_max. Doubling then bisection over integers on statsmodels' power (monotone in n):
    its solve_power fails or returns a wrong n where scipy's nct.cdf gives NaN at large effects."""
    if not math.isfinite(d) or d == 0:
        return math.nan
    enough = lambda n: power_at(d, n, n, alpha, paired) >= power  # noqa: E731
    low, high = 1, 2  # not enough at ``low`` (or low = 1, below the minimum), enough at ``high``
    while not enough(high):
        low, high = high, 2 * high
        if high > n_max:
            return math.nan
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if enough(mid) else (mid, high)
    return float(high)


def is_flat(x: np.ndarray, scale: float) -> bool:
    """No variance: spread <= FLAT_RTOL x max(scale, 1), so a constant shift plus rounding noise is not a signal."""
    return bool(np.ptp(x) <= FLAT_RTOL * max(scale, 1.0))


def compare_samples(a: dict[int, float], b: dict[int, float], alpha: float = ALPHA, pairing: bool = True) -> dict:
    """Arm a vs baseline b from {seed: value}: every column of COLUMNS but names and corrected p-values.

    Paired t-test when both arms have the same seeds (data order is seed-determined, so seed noise cancels),
    else Welch. Fewer than 2 runs in an arm, or no variance (``is_flat``): estimates only, no test. cohens_d and
    hedges_g are always the between-arm d_s / g (ν = n_a + n_b - 2); power, MDE and n for 80 % use d_z on paired
    rows (``TTestPower``, n pairs), d_s on Welch rows (``TTestIndPower``)."""
    seeds_a, seeds_b = sorted(a), sorted(b)
    x, y = np.array([a[s] for s in seeds_a]), np.array([b[s] for s in seeds_b])
    n_a, n_b = len(x), len(y)
    row = {"n_a": n_a, "n_b": n_b, "seeds_a": " ".join(map(str, seeds_a)), "seeds_b": " ".join(map(str, seeds_b))}
    row |= {"mean_a": _mean(x), "mean_b": _mean(y), "sd_a": _sd(x), "sd_b": _sd(y)}
    row["diff"] = row["mean_a"] - row["mean_b"]
    nan_fields = ("ci_low", "ci_high", "t", "df", "p", "cohens_d", "hedges_g", "d_z", "power", "mde_d",
                  "n_for_80pct_power")
    row |= dict.fromkeys(nan_fields, math.nan) | {"warning": ""}
    if min(n_a, n_b) < 2:
        note = f"n = {n_a} vs {n_b}: estimate only, no test (needs >= 2 runs per arm)"
        if min(n_a, n_b) == 0:
            note = f"no completed run with a value in the {'arm' if n_a == 0 else 'baseline'}: nothing to compare"
        return row | {"test": "none", "note": note}
    paired = pairing and seeds_a == seeds_b
    row["test"] = "paired" if paired else "welch"
    row["note"] = f"paired on seeds {row['seeds_a']}" if paired else ("Welch: seeds differ" if pairing else "Welch")
    row["mde_d"] = mde_d(n_a, n_b, alpha, paired=paired)
    scale = float(max(np.abs(x).max(), np.abs(y).max()))
    if is_flat(x - y, scale) if paired else (is_flat(x, scale) and is_flat(y, scale)):
        what = "the paired differences are constant" if paired else "both arms are constant"
        return row | {"note": f"no variance across seeds ({what}): no test"}
    row |= {k: float(v) for k, v in t_test(x, y, paired, alpha).items()}
    d = float(cohens_d(x, y))
    row |= {"cohens_d": d, "hedges_g": d * float(hedges_correction(n_a + n_b - 2))}
    if paired:
        row["d_z"] = d_z(x, y)
    effect = row["d_z"] if paired else d
    row |= {"power": power_at(effect, n_a, n_b, alpha, paired),
            "n_for_80pct_power": n_for_power(effect, alpha, paired=paired)}
    return row


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else math.nan


def _sd(x: np.ndarray) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else math.nan


@dataclass
class Comparison:
    baseline: str
    baseline_rule: str
    target_loss: float
    alpha: float
    rows: list[dict] = field(default_factory=list)  # one per (metric, arm != baseline), COLUMNS
    summaries: list[dict] = field(default_factory=list)  # one per (metric, arm): n, mean, sd, min, max, seeds
    censored: dict[str, list[str]] = field(default_factory=dict)  # metric -> completed jobs without a value
    censored_reasons: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # metric -> reason -> jobs
    # factorial sweeps (kimi_lab.stats.factorial.add_factorial): main effects and Type II ANOVA terms per metric
    main_effects: list[dict] = field(default_factory=list)  # factorial.EFFECT_COLUMNS
    anova: list[dict] = field(default_factory=list)  # factorial.ANOVA_COLUMNS
    anova_notes: dict[str, str] = field(default_factory=dict)  # metric -> why its ANOVA was skipped


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


def arm_values(sweep: Sweep, target_loss: float) -> dict[str, dict[str, dict[int, float]]]:
    """metric -> arm label -> {seed: value} over completed jobs with a finite value."""
    out = {m.name: {a.label: {} for a in sweep.arms} for m in METRICS}
    for arm in sweep.arms:
        for job in arm.completed:
            for name, value in job_metrics(job, target_loss).items():
                if math.isfinite(value):
                    out[name][arm.label][job.seed] = value
    return out


def compare_sweep(sweep: Sweep, baseline: str | None = None, target_loss: float | None = None,
                  alpha: float = ALPHA, pairing: bool = True) -> Comparison:
    """All arms vs the baseline arm for every metric; the correction family is one metric's comparisons."""
    label, rule = choose_baseline(sweep, baseline)
    target = default_target_loss(sweep.jobs) if target_loss is None else float(target_loss)
    result = Comparison(baseline=label, baseline_rule=rule, target_loss=target, alpha=alpha)
    values = arm_values(sweep, target)
    warnings_ = {arm.label: arm.row_warning() for arm in sweep.arms}
    for metric in METRICS:
        per_arm = values[metric.name]
        if metric.optional and not any(per_arm.values()):
            continue  # e.g. downstream scores in a sweep run without eval=downstream
        missing = [j for a in sweep.arms for j in a.completed if j.seed not in per_arm[a.label]]
        excluded: dict[str, dict[str, int]] = {}  # arm -> reason -> completed runs without a value
        if missing:
            result.censored[metric.name] = [j.name for j in missing]
            for job in missing:
                reason = missing_reason(job, metric, target)
                result.censored_reasons.setdefault(metric.name, {}).setdefault(reason, []).append(job.name)
                excluded.setdefault(job.arm, {}).setdefault(reason, 0)
                excluded[job.arm][reason] += 1
        for arm in sweep.arms:
            v = np.array(list(per_arm[arm.label].values()))
            result.summaries.append({"metric": metric.name, "arm": arm.label, "n": len(v), "mean": _mean(v),
                                     "sd": _sd(v), "min": float(v.min()) if len(v) else math.nan,
                                     "max": float(v.max()) if len(v) else math.nan,
                                     "seeds": " ".join(map(str, sorted(per_arm[arm.label])))})
        rows = [{"metric": metric.name, "arm": arm.label, "baseline": label,
                 **compare_samples(per_arm[arm.label], per_arm[label], alpha, pairing)}
                for arm in sweep.arms if arm.label != label]
        for row in rows:  # dropping diverged (or failed) seeds can flatter an arm: say so on every row it touches
            lost = [f"arm {arm}: {k} completed run(s) excluded ({reason})" for arm in (row["arm"], label)
                    for reason, k in excluded.get(arm, {}).items()  # e.g. never reached the target: conditional
                    if per_arm[arm]]  # an arm with no value at all (a dense arm's expert load) has n = 0, no test
            row["warning"] = "; ".join(w for w in (warnings_[row["arm"]], warnings_[label], *lost) if w)
        add_corrected_p(rows)
        result.rows += [{c: row[c] for c in COLUMNS} for row in rows]
    return result
