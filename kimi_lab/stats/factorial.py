"""Main effects and interactions of a factorial sweep (two or more swept keys crossed), for every metric.

The arm-vs-baseline rows of ``compare`` read a factor at one corner of the grid (``norm=rmsnorm`` vs
``norm=layernorm`` at the first lr only). Here each factor is read over the whole grid:

- Main effect of ``key=level`` vs the baseline arm's level of that key: every run at ``level`` is matched with the run
  at the baseline level in the same context (the levels of the other swept keys) and with the same seed; the mean of
  the matched differences is the effect averaged over the grid. Test, CI, effect sizes, power and corrections as for
  the arm rows (``compare_samples`` on the matched pairs; family: one metric's main effects), except d and g, left
  empty: their SD would hold the other keys' effects. The pairs of different contexts are pooled (a context with more
  seeds weighs more), so a variation of the effect between contexts is part of its error: the test asks whether the
  effect holds on average over the grid. ``context_min`` / ``context_max``: the smallest and largest per-context
  effect (mean over that context's pairs), to see whether it changes sign.
- ANOVA (statsmodels OLS + ``anova_lm``, Type II sums of squares; Montgomery, *Design and Analysis of Experiments*,
  ch. 5): ``value ~ C(key1) * C(key2) * ... + C(seed)`` over the completed runs, the seed an additive block (data
  order and init are functions of the seed). ``interaction_p_holm``: the smallest Holm-adjusted p of the interaction
  terms that hold a key (one family per key); below alpha, the key's main effects average effects that differ
  between contexts: read the per-cell rows too. Needs a value in every cell of the grid, a design that separates every
  term (full rank) and residual variance; otherwise the metric's ANOVA is skipped and ``anova_notes`` says why.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from kimi_lab.stats.collect import Arm, Sweep
from kimi_lab.stats.compare import (ALPHA, COLUMNS, Comparison, add_corrected_p, adjust_pvalues, arm_values,
                                    compare_samples, is_flat)
from kimi_lab.stats.metrics import METRICS

EFFECT_COLUMNS = ["factor", "level", "base_level", *COLUMNS, "n_contexts", "grid_contexts", "context_min",
                  "context_max", "interaction_term", "interaction_p_holm"]
ANOVA_COLUMNS = ["metric", "term", "df", "sum_sq", "F", "p"]
CROSS = " × "  # interaction terms: "norm × optimizer.lr"


def is_factorial(sweep: Sweep) -> bool:
    """Two or more swept keys (the seed aside): one-key sweeps have nothing to average over."""
    return len(sweep.factors) >= 2


def add_factorial(sweep: Sweep, comp: Comparison, pairing: bool = True) -> None:
    """Fill ``comp.main_effects``, ``comp.anova`` and ``comp.anova_notes`` for a factorial sweep (else leave them
    empty), with the baseline levels of ``comp.baseline`` and the values ``compare_sweep`` compared."""
    if not is_factorial(sweep):
        return
    base_levels = sweep.arm(comp.baseline).factors
    values = arm_values(sweep, comp.target_loss)
    comparisons = [(key, level, twin_arms(sweep, key, level, base_levels[key]))  # the matching is metric-free
                   for key, levels in sweep.factors.items() for level in levels if level != base_levels[key]]
    for metric in METRICS:
        per_arm = values[metric.name]
        if metric.optional and not any(per_arm.values()):
            continue
        terms, note = anova(sweep, per_arm)
        if note:
            comp.anova_notes[metric.name] = note
        comp.anova += [{"metric": metric.name, **t} for t in terms]
        rows = [main_effect(sweep, per_arm, key, level, base_levels[key], twins, comp.alpha, pairing)
                for key, level, twins in comparisons]
        for row in rows:
            row["metric"] = metric.name
            row["interaction_term"], row["interaction_p_holm"] = strongest_interaction(terms, row["factor"])
        add_corrected_p(rows)
        comp.main_effects += [{c: row[c] for c in EFFECT_COLUMNS} for row in rows]


def twin_arms(sweep: Sweep, key: str, level: str, base: str) -> list[tuple[Arm, Arm]]:
    """(arm at ``key=level``, the arm with the same other keys at ``key=base``) for every context that has both."""
    arms = {tuple(sorted(a.factors.items())): a for a in sweep.arms}
    twins = [(arm, arms.get(tuple(sorted((arm.factors | {key: base}).items()))))
             for arm in sweep.arms if arm.factors[key] == level]
    return [(arm, twin) for arm, twin in twins if twin is not None]


def main_effect(sweep: Sweep, per_arm: dict[str, dict[int, float]], key: str, level: str, base: str,
                twins: list[tuple[Arm, Arm]], alpha: float = ALPHA, pairing: bool = True) -> dict:
    """``key=level`` vs ``key=base`` on the runs of ``twins`` (``twin_arms``) matched by seed (every EFFECT_COLUMNS
    field but the metric, corrected p-values and the interaction)."""
    at_level, at_base, per_context = {}, {}, []
    for arm, twin in twins:
        seeds = sorted(set(per_arm[arm.label]) & set(per_arm[twin.label]))
        for seed in seeds:
            pair = len(at_level)
            at_level[pair], at_base[pair] = per_arm[arm.label][seed], per_arm[twin.label][seed]
        if seeds:
            per_context.append(float(np.mean([per_arm[arm.label][s] - per_arm[twin.label][s] for s in seeds])))
    row = compare_samples(at_level, at_base, alpha, pairing)
    contexts = math.prod(len(v) for k, v in sweep.factors.items() if k != key)
    pairs = len(at_level)
    where = f"{pairs} matched (context, seed) pairs in {len(per_context)} of {contexts} contexts"
    if not pairs:
        row["note"] = f"no run at {key}={level} has a twin at {key}={base} with the same other keys and seed"
    elif row["test"] == "paired" and math.isfinite(row["p"]):
        row["note"] = f"paired on {where}"
    else:  # Welch (--no-pairing), or no test (no variance, < 2 pairs): keep compare_samples' reason
        row["note"] = f"{row['note']}; {where}"
    row["cohens_d"] = row["hedges_g"] = math.nan  # a between-arm SD here would hold the other keys' effects
    # every arm at either level, not only those that gave pairs: a context whose runs all diverged gives none
    involved = [a for a in sweep.arms if a.factors[key] in (level, base)]
    found = dict.fromkeys(w for w in (a.row_warning() for a in involved) if w)
    return row | {"factor": key, "level": level, "base_level": base, "arm": f"{key}={level}",
                  "baseline": f"{key}={base}", "seeds_a": "", "seeds_b": "", "n_contexts": len(per_context),
                  "grid_contexts": contexts,
                  "context_min": min(per_context, default=math.nan),
                  "context_max": max(per_context, default=math.nan), "warning": "; ".join(found)}


def anova(sweep: Sweep, per_arm: dict[str, dict[int, float]]) -> tuple[list[dict], str]:
    """Type II ANOVA of one metric: (rows of ANOVA_COLUMNS but the metric, "" ) or ([], why it was skipped)."""
    keys = list(sweep.factors)
    rows = [(arm.factors, seed, value) for arm in sweep.arms for seed, value in per_arm[arm.label].items()]
    empty = [arm.label for arm in sweep.arms if not per_arm[arm.label]]
    cells = math.prod(len(v) for v in sweep.factors.values())
    if len(sweep.arms) < cells:
        return [], f"the grid has {cells} cells, the sweep {len(sweep.arms)} arms"
    if empty:
        listed = "; ".join(empty[:4]) + "; ..." * (len(empty) > 4)
        return [], f"no completed run with a value of this metric in {len(empty)} cell(s) ({listed})"
    seeds = sorted({seed for _, seed, _ in rows})
    residual_df = len(rows) - cells - (len(seeds) - 1)
    if residual_df < 1:
        return [], f"no residual degree of freedom ({len(rows)} runs, {cells} cells, {len(seeds)} seeds)"
    import pandas as pd
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    names = {f"f{i}": key for i, key in enumerate(keys)}  # formula-safe column names: keys hold dots
    frame = pd.DataFrame([{**{c: factors[k] for c, k in names.items()}, "seed": str(seed), "value": value}
                          for factors, seed, value in rows])
    formula = "value ~ " + " * ".join(f"C({c})" for c in names) + (" + C(seed)" if len(seeds) > 1 else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an exact fit warns: caught below
        fit = ols(formula, data=frame).fit()
        if round(fit.df_resid) != residual_df:  # e.g. a cell whose only run has a seed no other cell has
            rank = round(fit.nobs - fit.df_resid)
            return [], f"the design cannot separate every term (rank {rank} of {cells + len(seeds) - 1} parameters)"
        if is_flat(fit.resid.to_numpy(), float(frame["value"].abs().max())):
            return [], "no residual variance (every run equals its cell and seed effects)"
        table = anova_lm(fit, typ=2)
    out = []
    for term, rec in table.iterrows():
        parts = [p.removeprefix("C(").removesuffix(")") for p in str(term).split(":")]
        label = "residual" if term == "Residual" else CROSS.join(names.get(p, p) for p in parts)
        out.append({"term": label, "df": float(rec["df"]), "sum_sq": float(rec["sum_sq"]),
                    "F": float(rec.get("F", math.nan)), "p": float(rec.get("PR(>F)", math.nan))})
    return out, ""


def strongest_interaction(terms: list[dict], key: str) -> tuple[str, float]:
    """The interaction term holding ``key`` with the smallest Holm-adjusted p over all such terms (a key is in 2^(K-1)
    - 1 of them in a K-key grid); ("", NaN) when there is none or no ANOVA."""
    found = [t for t in terms if CROSS in t["term"] and key in t["term"].split(CROSS) and math.isfinite(t["p"])]
    if not found:
        return "", math.nan
    adjusted = adjust_pvalues([t["p"] for t in found], "holm")
    best = min(range(len(found)), key=lambda i: (adjusted[i], found[i]["p"]))  # Holm ties: the smaller raw p
    return found[best]["term"], float(adjusted[best])

