"""A/A calibration: seeds of one configuration split at random into two pseudo-arms and compared with the report's
own test (``compare.compare_samples``). No true effect exists, so the share of significant splits is the test's
false-positive rate on these runs; the same seeds give the seed SD and the minimum detectable effect (MDE) in the
metric's units.

Statistics from scipy (Clopper-Pearson binomial CI via ``binomtest``; chi-square CI of an SD) and statsmodels
(``TTestIndPower`` / ``TTestPower``, Cohen 1988). ``python -m kimi_lab.stats.calibration SWEEP`` prints the section.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
from pathlib import Path

import numpy as np
from scipy import stats
from statsmodels.stats.power import TTestIndPower, TTestPower

from kimi_lab.stats.collect import Sweep, collect_sweep
from kimi_lab.stats.compare import compare_samples

log = logging.getLogger(__name__)

ALPHA = 0.05
TARGET_POWER = 0.8  # the MDE is the effect detected with this power
MIN_SEEDS = 6
MIN_SPLITS = 200  # fewer distinct splits (<= 10 seeds) give a coarse rate: the section says so
CONFIDENCE = 0.95  # level of the calibration's own CIs (FPR, seed SD), whatever alpha is tested


def n_distinct_splits(n: int) -> int:
    """Distinct splits of n seeds into halves of n // 2 and n - n // 2 (unordered when equal: 12 seeds -> 462)."""
    return math.comb(n, n // 2) // (2 if n % 2 == 0 else 1)


def _canonical(group: tuple[int, ...], n: int) -> tuple[int, ...]:
    """One name per unordered split: for even n the half holding index 0 (its mirror is the same split)."""
    if n % 2 or 0 in group:
        return tuple(sorted(group))
    return tuple(i for i in range(n) if i not in group)


def balanced_splits(n: int, n_splits: int = 1000, rng_seed: int = 0) -> tuple[list[tuple[int, ...]], bool]:
    """(index sets of pseudo-arm A, enumerated?): every distinct split when there are <= n_splits, else n_splits
    distinct ones drawn with ``np.random.default_rng(rng_seed)``. Arm B is the complement."""
    k = n // 2
    if n_distinct_splits(n) <= n_splits:
        return [c for c in itertools.combinations(range(n), k) if _canonical(c, n) == c], True
    rng, found = np.random.default_rng(rng_seed), {}
    while len(found) < n_splits:
        found.setdefault(_canonical(tuple(int(i) for i in rng.permutation(n)[:k]), n), None)
    return list(found), False


def _lookup(results: dict, metric: str) -> float:
    """results.json value of ``metric``: a field, a dotted path (``downstream.piqa.acc``), ``val_loss@L`` from
    ``val_loss_at_len``; a per-layer list is averaged (as the report does). NaN when absent or not finite."""
    value = results.get(metric)
    if value is None and "@" in metric:
        base, length = metric.split("@", 1)
        value = (results.get(f"{base}_at_len") or {}).get(length)
    elif value is None:
        value = results
        for part in metric.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, list):
        value = float(np.mean(value)) if value else None
    try:
        return float(value) if math.isfinite(float(value)) else math.nan
    except (TypeError, ValueError):
        return math.nan


def seed_values(sweep: Sweep, metric: str = "val_loss") -> tuple[dict[int, float], str | None]:
    """({seed: metric} over the completed runs of a one-arm sweep, None) or ({}, why no A/A calibration)."""
    if len(sweep.arms) != 1:
        return {}, (f"{len(sweep.arms)} arms (swept keys: {', '.join(sweep.factors)}): A/A calibration needs one "
                    "configuration run on several seeds")
    values = {j.seed: _lookup(j.results, metric) for j in sweep.arms[0].completed if j.seed is not None}
    values = {s: v for s, v in values.items() if math.isfinite(v)}
    if len(values) < MIN_SEEDS:
        return values, (f"{len(values)} completed seed(s) with a finite {metric}; A/A calibration needs >= "
                        f"{MIN_SEEDS}")
    return values, None


def aa_reason(sweep: Sweep, metric: str = "val_loss") -> str | None:
    """Why ``aa_calibration`` gives None for this sweep (None: it gives a result)."""
    return seed_values(sweep, metric)[1]


def aa_calibration(sweep: Sweep | str | Path, alpha: float = ALPHA, n_splits: int = 1000, rng_seed: int = 0,
                   metric: str = "val_loss") -> dict | None:
    """False-positive rate of ``compare_samples`` over random balanced splits of one arm's seeds, the seed SD and
    the MDE in metric units; None (reason logged, and given by ``aa_reason``) for a sweep that does not qualify."""
    if not 0 < alpha < 1 or n_splits < 1:
        raise ValueError(f"alpha must lie in (0, 1) and n_splits be >= 1; got alpha={alpha}, n_splits={n_splits}")
    sweep = sweep if isinstance(sweep, Sweep) else collect_sweep(sweep)
    values, reason = seed_values(sweep, metric)
    if reason:
        log.info("no A/A calibration for %s: %s", sweep.path, reason)
        return None
    seeds = sorted(values)
    x = np.array([values[s] for s in seeds])
    n, k = len(seeds), len(seeds) // 2
    splits, enumerated = balanced_splits(n, n_splits, rng_seed)
    rows = []
    for group in splits:
        rest = [i for i in range(n) if i not in group]
        rows.append(compare_samples({seeds[i]: x[i] for i in group}, {seeds[i]: x[i] for i in rest}, alpha))
    tests = sorted({r["test"] for r in rows})
    hits = sum(1 for r in rows if r["p"] < alpha)  # NaN p (no variance) is not significant
    ci = stats.binomtest(hits, len(rows), alpha).proportion_ci(confidence_level=CONFIDENCE)
    fpr = hits / len(rows)
    sd = float(x.std(ddof=1))
    tail = (1 - CONFIDENCE) / 2  # chi-square CI of a normal SD: (n-1) s^2 / sigma^2 ~ chi2(n-1)
    sd_ci = [float(np.sqrt((n - 1) * sd**2 / stats.chi2.ppf(q, n - 1))) for q in (1 - tail, tail)]
    d_welch = float(TTestIndPower().solve_power(nobs1=k, ratio=(n - k) / k, alpha=alpha, power=TARGET_POWER))
    d_paired = float(TTestPower().solve_power(nobs=k, alpha=alpha, power=TARGET_POWER))
    calibrated = ci.low <= alpha <= ci.high
    return {
        "metric": metric, "alpha": alpha, "confidence": CONFIDENCE, "power": TARGET_POWER, "n_seeds": n,
        "seeds": seeds, "n_a": k, "n_b": n - k, "n_splits": len(rows), "n_distinct_splits": n_distinct_splits(n),
        "enumerated": enumerated, "rng_seed": rng_seed, "test": "/".join(tests), "n_significant": hits,
        "fpr": fpr, "fpr_ci_low": float(ci.low), "fpr_ci_high": float(ci.high), "calibrated": calibrated,
        "direction": "calibrated" if calibrated else "anticonservative" if fpr > alpha else "conservative",
        "mean": float(x.mean()), "sd": sd, "sd_ci_low": sd_ci[0], "sd_ci_high": sd_ci[1],
        "mde_welch_d": d_welch, "mde_welch": d_welch * sd,
        "mde_paired_dz": d_paired, "mde_paired_uncorrelated": d_paired * math.sqrt(2) * sd,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def verdict(result: dict) -> str:
    """One sentence: the false-positive rate with its CI, and calibrated / mis-calibrated (which way)."""
    r = result
    head = (f"the test's false-positive rate is {_pct(r['fpr'])} ({100 * r['confidence']:.4g} % CI "
            f"{_pct(r['fpr_ci_low'])} to {_pct(r['fpr_ci_high'])}) at alpha {100 * r['alpha']:.4g} %")
    if r["calibrated"]:
        return f"{head}: calibrated."
    if r["direction"] == "anticonservative":
        return (f"{head}: mis-calibrated, anticonservative (the CI lies above alpha): the report's p-values "
                "overstate the evidence; seeds falling into groups (another commit, data or machine) do this.")
    return (f"{head}: mis-calibrated, conservative (the CI lies below alpha): the report's p-values understate the "
            "evidence; an outlying seed does this, and so does chance (see the notes).")


def calibration_section(result: dict | None) -> list[str]:
    """Markdown lines of the "A/A calibration" section of report.md ([] for None)."""
    if result is None:
        return []
    r, m = result, result["metric"]
    how = (f"all {r['n_splits']} distinct splits" if r["enumerated"] else
           f"{r['n_splits']} of {r['n_distinct_splits']} distinct splits, drawn with rng seed {r['rng_seed']}")
    lines = ["## A/A calibration", "",
             f"{r['n_seeds']} seeds of one configuration, split at random into two pseudo-arms of {r['n_a']} and "
             f"{r['n_b']} seeds ({how}); each split is compared on `{m}` with the report's own test "
             f"({r['test']}: the pseudo-arms have different seeds). No true effect exists, so the share of "
             "significant splits is the test's false-positive rate on these runs.", "",
             "| quantity | value |", "| --- | --- |",
             f"| false-positive rate at alpha {r['alpha']:.4g} | {_pct(r['fpr'])} ({r['n_significant']} of "
             f"{r['n_splits']}), {100 * r['confidence']:.4g} % CI {_pct(r['fpr_ci_low'])} to "
             f"{_pct(r['fpr_ci_high'])} |",
             f"| seed mean of {m} | {r['mean']:.5g} |",
             f"| seed SD of {m} | {r['sd']:.4g} ({100 * r['confidence']:.4g} % CI {r['sd_ci_low']:.4g} to "
             f"{r['sd_ci_high']:.4g}, chi-square) |",
             f"| MDE, two arms of {r['n_a']} seeds (Welch, {100 * r['power']:.0f} % power) | {r['mde_welch']:.4g} "
             f"(d = {r['mde_welch_d']:.3g}) |",
             f"| MDE, {r['n_a']} seed-paired pairs | d_z = {r['mde_paired_dz']:.3g}; {r['mde_paired_uncorrelated']:.4g}"
             " if the arms' seed noise is uncorrelated, less where pairing on the seed correlates it |", "",
             f"Verdict: {verdict(r)}", "",
             "- The splits share seeds, so they are not independent draws: the binomial (Clopper-Pearson) CI treats "
             "them as independent and is indicative. With 12 normal seeds an honest sweep reads conservative about "
             "6 % of the time and anticonservative almost never (2000 simulated sweeps): an anticonservative "
             "verdict is a finding, a conservative one a reason to look at the seeds.",
             "- A paired A/A check is impossible here: each seed has one run, so there is nothing to pair; the SD of "
             "seed-paired differences needs two configurations run on the same seeds."]
    if r["n_distinct_splits"] < MIN_SPLITS:
        lines.append(f"- Only {r['n_distinct_splits']} distinct splits exist for {r['n_seeds']} seeds (11 seeds "
                     f"give 462): the rate moves in steps of {_pct(1 / r['n_splits'])}.")
    return lines + [""]


def calibration_json(result: dict | None) -> dict | None:
    """The result as a JSON-ready dict (non-finite numbers -> None) plus its ``verdict`` sentence."""
    if result is None:
        return None
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}
    return clean | {"verdict": verdict(result)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A/A calibration of the report's test on a one-arm sweep.")
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--metric", default="val_loss")
    parser.add_argument("--alpha", type=float, default=ALPHA)
    parser.add_argument("--splits", type=int, default=1000, help="most splits tested (all when fewer exist)")
    parser.add_argument("--json", action="store_true", help="print calibration_json instead of markdown")
    args = parser.parse_args(argv)
    try:
        sweep = collect_sweep(args.sweep)
    except FileNotFoundError as error:
        parser.error(str(error))
    result = aa_calibration(sweep, args.alpha, args.splits, metric=args.metric)
    if result is None:
        print(f"no A/A calibration: {aa_reason(sweep, args.metric)}")
        return 1
    print(json.dumps(calibration_json(result), indent=1) if args.json else "\n".join(calibration_section(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
