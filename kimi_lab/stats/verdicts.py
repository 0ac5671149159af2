"""One sentence per comparison, worded by its verdict (``families.verdict_label``): a direction ("lowers", "raises",
"better", "worse") only when the difference is significant in its family; an equivalence only when TOST is; otherwise
what the interval rules out. Numbers for people: ``fmt``, ``fmt_p``."""

from __future__ import annotations

import math

from kimi_lab.stats.families import CONFIRMATORY, FAMILY_P, verdict_label
from kimi_lab.stats.metrics import metric_named


def fmt(x, digits: int = 3) -> str:
    """Numbers for people: 3 significant digits below 100, no exponent for large values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def signed(x, digits: int = 3) -> str:
    """'+0.0123' / '-0.0123': a difference without a direction word."""
    text = fmt(x, digits)
    return text if text.startswith("-") or text in ("n/a", "0") else f"+{text}"


def fmt_p(p) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def p_is(name: str, p) -> str:
    """'p_holm = 0.02', 'p_holm < 0.001', 'p_holm n/a'."""
    text = fmt_p(p)
    return f"{name} {text}" if text.startswith("<") or text == "n/a" else f"{name} = {text}"


def units_of(metric: str) -> str:
    """' nats' (with its space) or '' for a metric without units."""
    units = metric_named(metric).units
    return f" {units}" if units else ""


def interval(low, high) -> str:
    return f"[{fmt(low)}, {fmt(high)}]"


def exclusion_bound(row: dict) -> tuple[float, str]:
    """(X, which interval) such that the interval rules out every effect with |effect| > X: the simultaneous CI on a
    confirmatory row, the unadjusted CI otherwise."""
    if row.get("family") == CONFIRMATORY and math.isfinite(row.get("ci_low_simultaneous", math.nan)):
        low, high, which = row["ci_low_simultaneous"], row["ci_high_simultaneous"], "simultaneous CI"
    else:
        low, high, which = row["ci_low"], row["ci_high"], "CI, unadjusted"
    return max(abs(low), abs(high)), which


def verdict(row: dict, alpha: float) -> str:
    """The sentence of one arm or main-effect row, plus 'Warning: ...' when either side lost seeds or compute differs.
    A main-effect row (factorial sweeps) also says over how many contexts it averages and flags an interaction."""
    text, warning = _verdict(row, alpha), row.get("warning")
    if "factor" in row and row["n_contexts"]:
        n, grid = row["n_contexts"], row["grid_contexts"]
        text += (f" Averaged over {n} of {grid} contexts (per-context effect {fmt(row['context_min'])} to "
                 f"{fmt(row['context_max'])})." if n > 1 else f" Read in 1 of {grid} contexts only.")
        if math.isfinite(row["interaction_p_holm"]) and row["interaction_p_holm"] < alpha:
            text += (f" The effect depends on the other keys (ANOVA interaction {row['interaction_term']}, "
                     f"{p_is('p_holm', row['interaction_p_holm'])}): read the per-cell comparisons too.")
    return f"{text} Warning: {warning}." if isinstance(warning, str) and warning else text


def _verdict(row: dict, alpha: float) -> str:
    metric, units = metric_named(row["metric"]), units_of(row["metric"])
    arm, base, diff = row["arm"], row["baseline"], row["diff"]
    if not math.isfinite(diff):
        return f"{arm}: no {metric.words} to compare ({row['note']})."
    label, family = row.get("verdict") or verdict_label(row, alpha), row.get("family") or ""
    if row["test"] == "none" or not math.isfinite(row["p"]):
        where = f" ({family})" if family else ""
        return f"{arm} vs {base}: {metric.words} difference {signed(diff)}{units}; {row['note']}: inconclusive{where}."
    p_name = FAMILY_P.get(family, "p_holm")
    p_family = row["p_family"] if family else row["p_holm"]
    tests = _stats_part(row, p_name, p_family, family)
    ci = interval(row["ci_low"], row["ci_high"])
    simultaneous = (f"; simultaneous {interval(row['ci_low_simultaneous'], row['ci_high_simultaneous'])}"
                    if math.isfinite(row.get("ci_low_simultaneous", math.nan)) else "")
    tost = _tost_part(row, p_name, units)
    if label in ("better", "worse"):
        low, high = (-row["ci_high"], -row["ci_low"]) if diff < 0 else (row["ci_low"], row["ci_high"])
        if simultaneous:
            s_low, s_high = row["ci_low_simultaneous"], row["ci_high_simultaneous"]
            s_low, s_high = (-s_high, -s_low) if diff < 0 else (s_low, s_high)
            simultaneous = f"; simultaneous {interval(s_low, s_high)}"
        head = (f"{arm} {'lowers' if diff < 0 else 'raises'} {metric.words} by {fmt(abs(diff))}{units} "
                f"{interval(low, high)}{simultaneous} vs {base}")
        small = (f" The difference is also within ±{fmt(row['sesoi'])}{units} ({tost}): too small to matter."
                 if row.get("p_tost_family", math.nan) < alpha else "")
        return f"{head}: {label} ({tests}).{small} {_mde_part(row, units)}."
    body = f"{arm} vs {base}: {metric.words} difference {signed(diff)}{units} {ci}{simultaneous}"
    if label == "equivalent":
        return (f"{body}: equivalent within ±{fmt(row['sesoi'])}{units} ({tost}; {tests}). "
                f"{_mde_part(row, units)}.")
    bound, which = exclusion_bound(row)
    tost = f"; {tost}" if tost else ""
    return (f"{body}: inconclusive ({tests}{tost}). Effects larger than {fmt(bound)}{units} are excluded ({which}). "
            f"{_mde_part(row, units)}{_more_seeds(row)}.")


def _stats_part(row: dict, p_name: str, p_family: float, family: str) -> str:
    """'confirmatory, d = 0.43, d_z = 0.27, p_holm = 0.69, paired t-test'."""
    d, dz, paired = row["cohens_d"], row.get("d_z", math.nan), row["test"] == "paired"
    parts = [family] if family else []
    parts += [f"d = {fmt(abs(d), 2)}"] if math.isfinite(d) else []
    parts += [f"d_z = {fmt(abs(dz), 2)}"] if paired and math.isfinite(dz) else []
    return ", ".join([*parts, p_is(p_name, p_family), f"{row['test']} t-test"])


def _tost_part(row: dict, p_name: str, units: str) -> str:
    """'TOST at ±0.02 nats: p_holm = 0.03' ('' without a SESOI)."""
    if not math.isfinite(row.get("sesoi", math.nan)) or not math.isfinite(row.get("p_tost", math.nan)):
        return ""
    p = row["p_tost_family"] if row.get("family") else row["p_tost"]
    return f"TOST at ±{fmt(row['sesoi'])}{units}: {p_is(p_name if row.get('family') else 'p', p)}"


def _mde_part(row: dict, units: str) -> str:
    """'MDE 0.031 nats (d_z 3.26) with 3 pairs at alpha = 0.05 / 2'."""
    paired = row["test"] == "paired"
    unit = "seeds" if "factor" in row else "pairs"  # a main effect pairs per-seed means over its contexts
    size = f"with {row['n_a']} {unit}" if paired else f"with n = {row['n_a']} vs {row['n_b']}"
    level = row.get("mde_alpha", math.nan)
    level_text = f"alpha = {fmt(level, 3)}" if math.isfinite(level) else "alpha n/a"
    return f"MDE {fmt(row.get('mde', math.nan))}{units} ({'d_z' if paired else 'd'} {fmt(row['mde_d'], 3)}) " \
           f"{size} at {level_text}, 80 % power"


def observed_effect(row: dict) -> float:
    """The row's standardised difference: d_z (paired) or d_s (Welch) from its difference and SD columns."""
    sd = row.get("sd_diff" if row["test"] == "paired" else "sd_pooled", math.nan)
    if math.isfinite(sd) and sd > 0:
        return row["diff"] / sd
    return row.get("d_z", math.nan) if row["test"] == "paired" else row.get("cohens_d", math.nan)


def _more_seeds(row: dict) -> str:
    """'; about 110 paired seeds would detect the observed d_z = 0.27' (runs per arm on Welch rows)."""
    n = row["n_for_80pct_power"]
    if not math.isfinite(n):
        return ""
    main, effect = "factor" in row, fmt(abs(observed_effect(row)), 2)
    if row["test"] == "paired":
        return f"; about {n:.0f} paired seeds would detect the observed d_z = {effect}"
    return f"; about {n:.0f} {'seeds per level' if main else 'seeds per arm'} would detect the observed d = {effect}"
