"""A/A calibration (kimi_lab.stats.calibration) on one-arm sweeps written in the job-folder format runs leave."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import TTestIndPower, TTestPower

from kimi_lab.stats.calibration import (aa_calibration, aa_reason, balanced_splits, calibration_json,
                                        calibration_section, main, n_distinct_splits)
from kimi_lab.stats.collect import collect_sweep
from tests.synthetic import write_run


def write_aa_sweep(root: Path, values: list[float], lr: str = "0.001") -> Path:
    """One configuration (optimizer.lr=lr) on seeds 1..len(values), every job completed with val_loss values[i]."""
    for index, value in enumerate(values):
        write_run(root / str(index), lr, index + 1, "completed", float(value))
    return root


def normal_values(seed: int, n: int = 12) -> list[float]:
    return list(3.0 + 0.02 * np.random.default_rng(seed).standard_normal(n))


def test_split_enumeration_counts_every_balanced_split_once():
    splits, enumerated = balanced_splits(12)
    assert enumerated and n_distinct_splits(12) == len(splits) == math.comb(12, 6) // 2 == 462
    halves = {frozenset(s) for s in splits} | {frozenset(set(range(12)) - set(s)) for s in splits}
    assert len(halves) == 924 and all(len(s) == 6 for s in splits)  # no split is listed with its mirror
    assert n_distinct_splits(11) == len(balanced_splits(11)[0]) == math.comb(11, 5)  # 5 vs 6: no mirror


def test_more_splits_than_asked_are_drawn_distinct_and_reproducible():
    splits, enumerated = balanced_splits(14, n_splits=300, rng_seed=3)
    assert not enumerated and len(set(splits)) == 300 and all(0 in s for s in splits)  # canonical: index 0 in A
    assert splits == balanced_splits(14, n_splits=300, rng_seed=3)[0] != balanced_splits(14, 300, rng_seed=4)[0]


def test_fpr_counts_welch_tests_as_scipy_computes_them(tmp_path):
    values = normal_values(7)
    result = aa_calibration(write_aa_sweep(tmp_path / "aa", values))
    x = np.array(values)
    groups = [c for c in itertools.combinations(range(12), 6) if 0 in c]
    p = [stats.ttest_ind(x[list(g)], np.delete(x, list(g)), equal_var=False).pvalue for g in groups]
    hits = int(np.sum(np.array(p) < 0.05))
    assert (result["n_splits"], result["n_significant"], result["test"]) == (462, hits, "welch")
    ci = stats.binomtest(hits, 462, 0.05).proportion_ci(confidence_level=0.95)
    assert result["fpr"] == pytest.approx(hits / 462) and result["fpr_ci_low"] == pytest.approx(ci.low)
    assert result["calibrated"] == (ci.low <= 0.05 <= ci.high)


def test_normal_seeds_give_a_false_positive_rate_near_alpha(tmp_path):
    """Over 30 sweeps of 12 normal seeds the split rate averages to the test's size (Welch at 6 vs 6, slightly
    below 5 %): pooled, it lies in the binomial band around alpha; few single sweeps read mis-calibrated."""
    results = [aa_calibration(write_aa_sweep(tmp_path / f"aa{k}", normal_values(100 + k)), n_splits=100,
                              rng_seed=k) for k in range(30)]
    hits, total = sum(r["n_significant"] for r in results), sum(r["n_splits"] for r in results)
    band = stats.binomtest(hits, total, 0.05).proportion_ci(confidence_level=0.99)
    assert total == 3000 and band.low <= 0.05 <= band.high, hits / total
    flagged = [r["direction"] for r in results if not r["calibrated"]]  # chance flags are conservative ones
    assert len(flagged) <= 5 and "anticonservative" not in flagged, flagged
    assert all(calibration_json(r)["verdict"].endswith(": calibrated.") for r in results if r["calibrated"])


def test_seeds_in_two_batches_are_flagged_anticonservative(tmp_path):
    """Six seeds at 3.0 and six at 3.5 (a batch effect, e.g. two commits): a split is significant when it puts
    >= 5 of one batch in one pseudo-arm, 74 of the 924 ordered splits (hypergeometric), 8 % > alpha."""
    rng = np.random.default_rng(0)
    values = [3.0] * 6 + [3.5] * 6 + 1e-3 * rng.standard_normal(12)
    result = aa_calibration(write_aa_sweep(tmp_path / "aa", values))
    separated = 2 * (stats.hypergeom.pmf(6, 12, 6, 6) + stats.hypergeom.pmf(5, 12, 6, 6))
    assert result["fpr"] == pytest.approx(separated) == pytest.approx(74 / 924)
    assert not result["calibrated"] and result["direction"] == "anticonservative" and result["fpr_ci_low"] > 0.05
    section = "\n".join(calibration_section(result))
    assert "mis-calibrated, anticonservative" in section and "8.0 % (37 of 462)" in section


def test_one_outlying_seed_is_flagged_conservative(tmp_path):
    """An outlier 100 SDs out inflates the SD of whichever pseudo-arm holds it: t stays near 1, no split is
    significant."""
    values = normal_values(2)
    values[4] += 2.0
    result = aa_calibration(write_aa_sweep(tmp_path / "aa", values))
    assert result["n_significant"] == 0 and result["direction"] == "conservative"
    assert "mis-calibrated, conservative" in calibration_json(result)["verdict"]


def test_seed_sd_mean_and_mde_match_scipy_and_statsmodels(tmp_path):
    values = normal_values(5)
    result = aa_calibration(write_aa_sweep(tmp_path / "aa", values))
    x, n = np.array(values), 12
    assert result["mean"] == pytest.approx(x.mean()) and result["sd"] == pytest.approx(x.std(ddof=1))
    # the CI ends are where (n-1) s^2 / sigma^2 sits at the chi-square's 97.5 % and 2.5 % points
    q = [(n - 1) * result["sd"] ** 2 / end ** 2 for end in (result["sd_ci_low"], result["sd_ci_high"])]
    assert stats.chi2.sf(q[0], n - 1) == pytest.approx(0.025) and stats.chi2.cdf(q[1], n - 1) == pytest.approx(0.025)
    d = TTestIndPower().solve_power(nobs1=6, ratio=1.0, alpha=0.05, power=0.8)
    assert result["mde_welch"] == pytest.approx(d * x.std(ddof=1))
    nc, t_crit = d * math.sqrt(6 / 2), stats.t.ppf(0.975, 10)  # power of the two-sample t at that d: 80 %
    assert stats.nct.sf(t_crit, 10, nc) + stats.nct.cdf(-t_crit, 10, nc) == pytest.approx(0.8, abs=1e-6)
    dz = TTestPower().solve_power(nobs=6, alpha=0.05, power=0.8)
    assert result["mde_paired_uncorrelated"] == pytest.approx(dz * math.sqrt(2) * x.std(ddof=1))


def test_too_few_seeds_or_several_arms_give_none_with_a_reason(tmp_path):
    few = collect_sweep(write_aa_sweep(tmp_path / "few", normal_values(0, n=5)))
    assert aa_calibration(few) is None and "5 completed seed(s)" in aa_reason(few) and ">= 6" in aa_reason(few)
    two = tmp_path / "two"
    write_aa_sweep(two / "a", normal_values(0, n=6), lr="0.001")
    write_aa_sweep(two / "b", normal_values(1, n=6), lr="0.002")
    assert aa_calibration(two) is None and aa_reason(collect_sweep(two)).startswith("2 arms (swept keys: optimizer.lr)")
    many = write_aa_sweep(tmp_path / "many", normal_values(0))
    assert aa_calibration(many, metric="no_such_metric") is None
    assert aa_reason(collect_sweep(many), "no_such_metric") == ("0 completed seed(s) with a finite no_such_metric; "
                                                                "A/A calibration needs >= 6")
    assert calibration_section(None) == [] and calibration_json(None) is None
    with pytest.raises(ValueError, match="alpha must lie in"):
        aa_calibration(few, alpha=1.5)


def test_few_seeds_enumerate_every_split_and_say_the_rate_is_coarse(tmp_path):
    result = aa_calibration(write_aa_sweep(tmp_path / "aa", normal_values(3, n=8)))
    assert (result["n_splits"], result["enumerated"], result["n_a"]) == (35, True, 4)
    assert any("Only 35 distinct splits" in line for line in calibration_section(result))


def test_section_json_and_cli(tmp_path, capsys):
    path = write_aa_sweep(tmp_path / "aa", normal_values(0))  # FPR 5.4 %: calibrated
    result = aa_calibration(path)
    lines = calibration_section(result)
    assert lines[0] == "## A/A calibration" and any(line.startswith("Verdict: the test's false-positive rate is")
                                                     for line in lines)
    blob = json.loads(json.dumps(calibration_json(result), allow_nan=False))
    assert blob["n_seeds"] == 12 and blob["seeds"] == list(range(1, 13)) and blob["verdict"].endswith("calibrated.")
    assert main([str(path)]) == 0 and capsys.readouterr().out.startswith("## A/A calibration")
    assert main([str(write_aa_sweep(tmp_path / "few", normal_values(0, n=3)))]) == 1
    assert "no A/A calibration: 3 completed seed(s)" in capsys.readouterr().out


def test_loss_at_length_and_per_layer_metrics_are_read_from_results_json(tmp_path):
    """``val_loss@512`` is results.json's val_loss_at_len["512"]; a per-layer list is averaged over layers."""
    values = normal_values(4, n=6)
    root = write_aa_sweep(tmp_path / "aa", values)
    for index, value in enumerate(values):
        path = root / str(index) / "results.json"
        results = json.loads(path.read_text())
        results |= {"val_loss_at_len": {"512": value + 1.0}, "moe_maxvio_val": [value, 3 * value]}
        path.write_text(json.dumps(results))
    at_len = aa_calibration(root, metric="val_loss@512")
    assert at_len["mean"] == pytest.approx(np.mean(values) + 1.0)
    assert at_len["sd"] == pytest.approx(np.std(values, ddof=1))
    assert aa_calibration(root, metric="moe_maxvio_val")["mean"] == pytest.approx(2 * np.mean(values))


def test_make_report_on_a_one_arm_sweep_writes_the_aa_section(tmp_path):
    """The report of an A/A sweep (experiment=aa_cpu) carries the calibration in report.md and report.json."""
    from kimi_lab.stats.report import write_report

    sweep = write_aa_sweep(tmp_path / "aa", normal_values(3))
    out, _, comp = write_report(sweep, tmp_path / "report", plots=False)
    expected = aa_calibration(collect_sweep(sweep), metric="val_loss")
    assert comp.calibration["n_significant"] == expected["n_significant"]
    assert "## A/A calibration" in (out / "report.md").read_text()
    saved = json.loads((out / "report.json").read_text())["aa_calibration"]
    assert saved["n_splits"] == 462 and saved["fpr"] == pytest.approx(expected["fpr"])
