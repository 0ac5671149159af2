"""Families of tests and what a row may claim: corrections, power at the family's level, simultaneous CIs, TOST,
the verdict.

- The confirmatory family is the declared primary metric x the arms (Holm 1979, ``multipletests(method="holm")``);
  every other tested metric's rows form one exploratory family (Benjamini & Hochberg 1995, ``method="fdr_bh"``).
- Per-test level of the power analysis: alpha / m in the confirmatory family (m = its tested rows: Bonferroni, the
  level of Holm's first step, so the MDE is conservative for Holm), the unadjusted alpha in the exploratory family
  (BH's largest threshold: an optimistic MDE). ``mde`` = ``mde_d`` x the SD that scales it (paired differences,
  else the pooled SD).
- Simultaneous CIs (confirmatory rows): the t-interval at level 1 - alpha / m (Bonferroni), ``scipy.stats.t.interval``
  on the row's difference, standard error and degrees of freedom, the same interval ``ttest_rel`` / ``ttest_ind``
  give at that level. BH controls the false discovery rate, not coverage: exploratory rows keep the unadjusted CI.
- Equivalence: two one-sided tests against the smallest effect size of interest (Schuirmann 1987; Lakens 2017);
  the TOST p-values of a family are adjusted like its difference tests.
- Verdict: ``better`` / ``worse`` when the family-adjusted p < alpha, ``equivalent`` when the family-adjusted TOST
  p < alpha, else ``inconclusive``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

from kimi_lab.stats.metrics import metric_named
from kimi_lab.stats.power import ALPHA, mde_d, n_for_power, power_at

CORRECTIONS = {"p_bonferroni": "bonferroni", "p_holm": "holm", "p_fdr_bh": "fdr_bh"}  # column -> method
CONFIRMATORY, EXPLORATORY = "confirmatory", "exploratory"
FAMILY_METHOD = {CONFIRMATORY: "holm", EXPLORATORY: "fdr_bh"}  # multipletests method of each family
FAMILY_P = {CONFIRMATORY: "p_holm", EXPLORATORY: "p_fdr_bh"}  # the column a family's verdicts read
VERDICTS = ("better", "worse", "equivalent", "inconclusive")
# columns compare_samples leaves at these values; apply_families fills them
FAMILY_DEFAULTS = {"family": "", "verdict": "", "p_family": math.nan, "p_tost_family": math.nan,
                   "ci_low_simultaneous": math.nan, "ci_high_simultaneous": math.nan}


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


def is_tested(row: dict) -> bool:
    """A t-test ran: two or more runs per arm and some variance."""
    return math.isfinite(row["p"])


def family_of(row: dict, primary: str) -> str:
    return CONFIRMATORY if row["metric"] == primary else EXPLORATORY


def apply_families(rows: list[dict], primary: str, alpha: float = ALPHA,
                   sesoi: dict[str, float] | None = None) -> dict[str, dict]:
    """Fill the family columns of ``rows`` (every FAMILY_DEFAULTS key, the CORRECTIONS within the family, ``sesoi``,
    ``p_tost`` where only the summary is at hand, and power, MDE and n for 80 % at the family's per-test level).
    Returns, per family, what the report says about it: method, m (tested rows), per-test level, metrics."""
    sesoi = sesoi or {}
    out = {}
    for family in (CONFIRMATORY, EXPLORATORY):
        members = [r for r in rows if family_of(r, primary) == family]
        m = sum(is_tested(r) for r in members)
        level = alpha / m if family == CONFIRMATORY and m else alpha
        for row in members:
            fill_tost(row, sesoi.get(row["metric"], math.nan))
        add_corrected_p(members)
        tost = adjust_pvalues([r["p_tost"] for r in members], FAMILY_METHOD[family])
        for row, p_tost in zip(members, tost):
            row |= {"family": family, "p_family": row[FAMILY_P[family]], "p_tost_family": float(p_tost)}
            power_at_level(row, level)
            if family == CONFIRMATORY:
                row["ci_low_simultaneous"], row["ci_high_simultaneous"] = t_interval(row, level)
            row["verdict"] = verdict_label(row, alpha)
        out[family] = {"method": FAMILY_METHOD[family], "m": m, "rows": len(members), "per_test_alpha": level,
                       "metrics": list(dict.fromkeys(r["metric"] for r in members))}
    return out


def t_interval(row: dict, level: float) -> tuple[float, float]:
    """(1 - level) t-interval of the row's difference from its SE and df; NaNs when untested."""
    if not is_tested(row) or not (row["se"] > 0):
        return math.nan, math.nan
    low, high = stats.t.interval(1.0 - level, row["df"], loc=row["diff"], scale=row["se"])
    return float(low), float(high)


def fill_tost(row: dict, sesoi: float) -> None:
    """Set ``sesoi`` and, when the row has none yet (compare_samples runs statsmodels' ttost on the samples; a row
    built elsewhere brings only its summary), the TOST p from the t distribution: max of P(T > (diff + sesoi) / se)
    and P(T < (diff - sesoi) / se), df of the row's test, the p ``ttost_paired`` / ``ttost_ind`` return."""
    if math.isfinite(row.get("sesoi", math.nan)):
        sesoi = row["sesoi"]
    row["sesoi"] = sesoi
    if math.isfinite(row.get("p_tost", math.nan)) or not math.isfinite(sesoi) or not is_tested(row) \
            or not (row["se"] > 0):
        row.setdefault("p_tost", math.nan)
        return
    lower = stats.t.sf((row["diff"] + sesoi) / row["se"], row["df"])
    upper = stats.t.cdf((row["diff"] - sesoi) / row["se"], row["df"])
    row["p_tost"] = float(max(lower, upper))


def power_at_level(row: dict, level: float) -> None:
    """``mde_alpha``, ``mde_d``, ``mde`` (metric units), ``power`` and ``n_for_80pct_power`` at ``level``."""
    row["mde_alpha"] = level
    if row["test"] not in ("paired", "welch"):
        return
    paired = row["test"] == "paired"
    sd = row["sd_diff"] if paired else row["sd_pooled"]
    row["mde_d"] = mde_d(row["n_a"], row["n_b"], level, paired=paired)
    if not is_tested(row) or not (sd > 0):
        return
    effect = row["diff"] / sd  # d_z on paired rows, d_s on Welch rows
    row |= {"mde": row["mde_d"] * sd, "power": power_at(effect, row["n_a"], row["n_b"], level, paired),
            "n_for_80pct_power": n_for_power(effect, level, paired=paired)}


def verdict_label(row: dict, alpha: float) -> str:
    """One of VERDICTS from the row's family-adjusted p and TOST p (``p_holm`` for a row outside any family)."""
    p = row.get("p_family", math.nan) if row.get("family") else row.get("p_holm", math.nan)
    if math.isfinite(p) and p < alpha and row["diff"] != 0:
        return "better" if (row["diff"] < 0) == metric_named(row["metric"]).lower_is_better else "worse"
    p_tost = row.get("p_tost_family", math.nan)
    return "equivalent" if math.isfinite(p_tost) and p_tost < alpha else "inconclusive"
