"""Main effects and interactions of a factorial sweep (two or more swept keys crossed), for every tested metric.

The arm-vs-baseline rows of ``compare`` read a key at one corner of the grid (``norm=rmsnorm`` vs ``norm=layernorm``
at the first lr only). Here each key is read over the whole grid, with the seed as the unit of inference: runs that
share a seed share its initialisation and data order, so the cells of one seed are correlated, and a seed that
favours one level does so in every context. Pooling the (context, seed) pairs of a 2 x 4 grid with 3 seeds into one
paired test claims 11 degrees of freedom from 3 independent units; with a seed x level variance equal to the run
variance it calls a null main effect significant in about 27 % of grids at alpha 0.05, the seed-level test in about
5 %, its p uniform (tests/stats/test_factorial.py measures both on 400 null grids).

- Main effect of ``key=level`` vs the baseline arm's level of that key: in each context (the levels of the other
  swept keys) the run at ``level`` is matched with the run at the base level with the same seed. The pairs used form
  a complete seeds x contexts block, every kept seed paired in every kept context, so a seed that lacks a context
  cannot shift the mean (``balanced_block``: of the complete blocks, the one with the most pairs, ties to more
  seeds; the ``note`` says which contexts and seeds it left out). Each seed's runs are averaged over the block's
  contexts at ``level`` and at the base level, and ``compare_samples`` tests those per-seed means: a paired t over
  the seeds (n_a = n_b = seeds; Welch with ``pairing=False``). This is the split-plot test of the contrast, the seed
  the block and the seed x key interaction its error term: for a two-level key in a complete grid, F of the ANOVA's
  term = t² (Montgomery, *Design and Analysis of Experiments*, ch. 14, nested and split-plot designs). CI, d_z and
  power as for the arm rows, corrections over one metric's main effects; d and g are left empty: the SD of per-seed
  means over several contexts is smaller than a run's SD, so they would not compare with the arm rows' d.
  ``context_min`` / ``context_max``: the smallest and largest per-context effect (mean over the block's seeds), to
  see whether it changes sign.
- ANOVA: repeated measures with the seed as the subject and every swept key within it
  (``statsmodels.stats.anova.AnovaRM``), i.e. a split-plot ANOVA: each term (a key or an interaction) is tested
  against its own interaction with the seed (``error_term``, ``den_df``), not against a pooled residual (Montgomery,
  ch. 14). AnovaRM needs every seed it uses in every cell: seeds missing a cell are left out and ``anova_notes``
  names them; with fewer than 2 complete seeds, no value in a cell, or no variance beyond the cell and seed effects,
  the metric's ANOVA is skipped and ``anova_notes`` says why. ``interaction_p_holm``: the smallest Holm-adjusted p of
  the interaction terms that hold a key (one family per key); below alpha, the key's main effects average effects
  that differ between contexts: read the per-cell rows too.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from kimi_lab.stats.collect import Arm, Sweep
from kimi_lab.stats.compare import (ALPHA, COLUMNS, Comparison, add_corrected_p, adjust_pvalues, arm_values,
                                    compare_samples, is_flat)

EFFECT_COLUMNS = ["factor", "level", "base_level", *COLUMNS, "n_contexts", "grid_contexts", "context_min",
                  "context_max", "interaction_term", "interaction_p_holm"]
# df: the term's (numerator) degrees of freedom; den_df: those of its error term, the term's interaction with the
# seed. The ``residual`` row is the model's residual stratum (the seed x the highest-order interaction, the error
# term of that interaction): df only.
ANOVA_COLUMNS = ["metric", "term", "df", "den_df", "error_term", "F", "p"]
CROSS = " × "  # interaction terms: "norm × optimizer.lr"
SEED = "seed"  # the subject of the repeated-measures ANOVA, in its error terms: "norm × seed"
METHOD_NOTE = (  # the report's Method section (kimi_lab.stats.method)
    "- Factorial sweeps (two or more swept keys): the seed is the unit of inference. A main effect compares a level "
    "with the baseline level of its key on each seed's runs averaged over the contexts (the other keys' levels) in "
    "which every kept seed has both (the most complete seeds x contexts block; `note` names what it left out): a "
    "paired t-test over the seeds' means, n = seeds (`main_effects.csv`; d_z, no d or g). ANOVA: split-plot / "
    "repeated measures, `statsmodels` `AnovaRM` with the seed as the subject, each key and interaction tested "
    "against its interaction with the seed (`anova.csv`: `df`, `den_df`, `error_term`; Montgomery, Design and "
    "Analysis of Experiments, ch. 14), on the seeds with a value in every cell; a main effect's `interaction p_holm` "
    "is the smallest Holm-adjusted p of the interaction terms holding its key. Skipped, with the reason, when a "
    "cell has no value, fewer than 2 seeds have every cell, or nothing varies.")


def is_factorial(sweep: Sweep) -> bool:
    """Two or more swept keys (the seed aside): one-key sweeps have nothing to average over."""
    return len(sweep.factors) >= 2


def add_factorial(sweep: Sweep, comp: Comparison, pairing: bool = True) -> None:
    """Fill ``comp.main_effects``, ``comp.anova`` and ``comp.anova_notes`` for a factorial sweep (else leave them
    empty), with the baseline levels of ``comp.baseline`` and the values of the metrics ``compare_sweep`` tested
    (``comp.metrics``); ``p_holm`` and the other corrections: one family per metric."""
    if not is_factorial(sweep):
        return
    base_levels = sweep.arm(comp.baseline).factors
    values = arm_values(sweep, comp.target_loss, comp.metrics)
    comparisons = [(key, level, twin_arms(sweep, key, level, base_levels[key]))  # the matching is metric-free
                   for key, levels in sweep.factors.items() for level in levels if level != base_levels[key]]
    for metric in comp.metrics:  # the metrics compare_sweep tested (timing and derived ones are only described)
        per_arm = values[metric.name]
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


def balanced_block(seeds_in: list[set[int]]) -> tuple[list[int], list[int]]:
    """(seeds, context indices) of the complete block with the most matched pairs, ties to more seeds, then to the
    smaller seeds: every kept seed has a pair in every kept context. ``seeds_in[c]``: the seeds paired in context c.

    A best block's seeds are the intersection of its contexts' seed sets, so the candidates are the intersections of
    the seed sets (closed under intersection); exhaustive over them, exact."""
    found = {frozenset(s) for s in seeds_in if s}
    new = set(found)
    while new:
        new = {a & b for a in new for b in found if a & b} - found
        found |= new
    if not found:
        return [], []

    def contexts(seeds: frozenset) -> list[int]:
        return [c for c, s in enumerate(seeds_in) if seeds <= s]

    best = max(found, key=lambda t: (len(t) * len(contexts(t)), len(t), [-s for s in sorted(t)]))
    return sorted(best), contexts(best)


def seed_means(per_arm: dict[str, dict[int, float]], twins: list[tuple[Arm, Arm]], seeds: list[int],
               kept: list[int]) -> tuple[dict[int, float], dict[int, float]]:
    """({seed: mean at the level}, {seed: mean at the base level}) over the contexts ``kept`` (indices of ``twins``)."""
    at_level = {s: float(np.mean([per_arm[twins[c][0].label][s] for c in kept])) for s in seeds}
    at_base = {s: float(np.mean([per_arm[twins[c][1].label][s] for c in kept])) for s in seeds}
    return at_level, at_base


def main_effect(sweep: Sweep, per_arm: dict[str, dict[int, float]], key: str, level: str, base: str,
                twins: list[tuple[Arm, Arm]], alpha: float = ALPHA, pairing: bool = True) -> dict:
    """``key=level`` vs ``key=base`` on the per-seed means over the balanced block of ``twins`` (``twin_arms``) (every
    EFFECT_COLUMNS field but the metric, corrected p-values and the interaction)."""
    seeds_in = [set(per_arm[arm.label]) & set(per_arm[twin.label]) for arm, twin in twins]
    seeds, kept = balanced_block(seeds_in)
    at_level, at_base = seed_means(per_arm, twins, seeds, kept)
    row = compare_samples(at_level, at_base, alpha, pairing)
    per_context = [float(np.mean([per_arm[twins[c][0].label][s] - per_arm[twins[c][1].label][s] for s in seeds]))
                   for c in kept]
    contexts = math.prod(len(v) for k, v in sweep.factors.items() if k != key)
    if not seeds:
        row["note"] = f"no run at {key}={level} has a twin at {key}={base} with the same other keys and seed"
    elif row["test"] == "paired" and math.isfinite(row["p"]):
        row["note"] = block_note(seeds_in, seeds, kept, "paired over ")
    else:  # Welch (--no-pairing), or no test (no variance, < 2 seeds): keep compare_samples' reason
        row["note"] = f"{row['note']}; {block_note(seeds_in, seeds, kept)}"
    row["cohens_d"] = row["hedges_g"] = math.nan  # an SD of per-seed means over contexts is not a run's SD
    # every arm at either level, not only those that gave pairs: a context whose runs all diverged gives none
    involved = [a for a in sweep.arms if a.factors[key] in (level, base)]
    found = dict.fromkeys(w for w in (a.row_warning() for a in involved) if w)
    return row | {"factor": key, "level": level, "base_level": base, "arm": f"{key}={level}",
                  "baseline": f"{key}={base}", "n_contexts": len(kept), "grid_contexts": contexts,
                  "context_min": min(per_context, default=math.nan),
                  "context_max": max(per_context, default=math.nan), "warning": "; ".join(found)}


def block_note(seeds_in: list[set[int]], seeds: list[int], kept: list[int], lead: str = "") -> str:
    """'paired over 3 seeds, each the mean of 4 contexts', plus what the balanced block left out."""
    n, k = len(seeds), len(kept)
    text = f"{lead}{n} seed{'s' * (n != 1)}, each the mean of {k} context{'s' * (k != 1)}"
    paired = [c for c, s in enumerate(seeds_in) if s]
    if len(paired) > k:
        text += f"; {len(paired) - k} context(s) with pairs left out (not every kept seed has a pair there)"
    lost = sorted(set().union(*seeds_in) - set(seeds))
    if lost:
        text += f"; seed(s) {', '.join(map(str, lost))} left out (no pair in every kept context)"
    return text


def anova(sweep: Sweep, per_arm: dict[str, dict[int, float]]) -> tuple[list[dict], str]:
    """Split-plot ANOVA of one metric (``AnovaRM``): (rows of ANOVA_COLUMNS but the metric, a note: "" or the seeds
    left out), or ([], why it was skipped)."""
    cells = math.prod(len(v) for v in sweep.factors.values())
    if len(sweep.arms) < cells:
        return [], f"the grid has {cells} cells, the sweep {len(sweep.arms)} arms"
    empty = [arm.label for arm in sweep.arms if not per_arm[arm.label]]
    if empty:
        listed = "; ".join(empty[:4]) + "; ..." * (len(empty) > 4)
        return [], f"no completed run with a value of this metric in {len(empty)} cell(s) ({listed})"
    seeds = sorted(set().union(*(per_arm[arm.label] for arm in sweep.arms)))
    complete = [s for s in seeds if all(s in per_arm[arm.label] for arm in sweep.arms)]
    lost = ", ".join(str(s) for s in seeds if s not in complete)
    if len(complete) < 2:
        return [], (f"{len(complete)} of {len(seeds)} seeds have a value in every cell; the split-plot ANOVA needs "
                    f"2 (each term is tested against its interaction with the seed)")
    table = np.array([[per_arm[arm.label][s] for arm in sweep.arms] for s in complete])  # seeds x cells
    # no variance beyond the cell and seed effects (two-way double centring): every error term would be 0
    if is_flat(table - table.mean(0) - table.mean(1)[:, None] + table.mean(), float(np.abs(table).max())):
        return [], "no residual variance (every run equals its cell and seed effects)"
    out = rm_anova(sweep, per_arm, complete)
    return out, (f"seed(s) {lost} left out: no value in every cell (AnovaRM needs every seed in every cell)"
                 if lost else "")


def rm_anova(sweep: Sweep, per_arm: dict[str, dict[int, float]], seeds: list[int]) -> list[dict]:
    """``AnovaRM(value ~ every key crossed, subject=seed)`` on ``seeds`` (each with a value in every cell): one row per
    term, then the residual stratum."""
    import pandas as pd
    from statsmodels.stats.anova import AnovaRM

    names = {f"f{i}": key for i, key in enumerate(sweep.factors)}  # formula-safe column names: keys hold dots
    frame = pd.DataFrame([{**{c: arm.factors[k] for c, k in names.items()}, SEED: seed,
                           "value": per_arm[arm.label][seed]} for arm in sweep.arms for seed in seeds])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an error term of 0 gives F = inf
        table = AnovaRM(frame, depvar="value", subject=SEED, within=list(names)).fit().anova_table
    out = []
    for term, rec in table.iterrows():
        label = CROSS.join(names[p] for p in str(term).split(":"))
        out.append({"term": label, "df": float(rec["Num DF"]), "den_df": float(rec["Den DF"]),
                    "error_term": f"{label}{CROSS}{SEED}", "F": float(rec["F Value"]), "p": float(rec["Pr > F"])})
    top = max(out, key=lambda t: t["term"].count(CROSS))  # the interaction of every key
    return out + [{"term": "residual", "df": top["den_df"], "den_df": math.nan, "error_term": "", "F": math.nan,
                   "p": math.nan}]


def strongest_interaction(terms: list[dict], key: str) -> tuple[str, float]:
    """The interaction term holding ``key`` with the smallest Holm-adjusted p over all such terms (a key is in 2^(K-1)
    - 1 of them in a K-key grid); ("", NaN) when there is none or no ANOVA."""
    found = [t for t in terms if CROSS in t["term"] and key in t["term"].split(CROSS) and math.isfinite(t["p"])]
    if not found:
        return "", math.nan
    adjusted = adjust_pvalues([t["p"] for t in found], "holm")
    best = min(range(len(found)), key=lambda i: (adjusted[i], found[i]["p"]))  # Holm ties: the smaller raw p
    return found[best]["term"], float(adjusted[best])
