"""kimi_lab.stats: it imports without torch; every statistic against scipy.stats / statsmodels, A/A calibration, and a
synthetic sweep with known numbers (failed, running, missing, duplicate and diverged jobs) through collect, compare and
the report."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from kimi_lab.stats import collect_sweep, compare_samples, compare_sweep
from kimi_lab.stats.compare import adjust_pvalues, cohens_d, hedges_correction, mde_d, n_for_power, t_test
from kimi_lab.stats.report import main as report_main
from kimi_lab.stats.report import newest_sweep, verdict, write_report
from tests.helpers import REPO_ROOT, csv_rows
from tests.synthetic import LRS, VAL, write_run

TOL = 1e-10


def test_import_is_torch_free():
    code = ("import sys, kimi_lab.stats, kimi_lab.stats.report, kimi_lab.stats.plots; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning') "
            "or m.startswith(('kimi_lab.model', 'kimi_lab.training', 'kimi_lab.data'))]; print(bad); assert not bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- statistics vs scipy / statsmodels


def test_welch_matches_scipy_and_the_textbook_ci():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 0.3, 3), rng.normal(0.5, 0.1, 5)  # unequal n and variances; seeds differ -> Welch
    row = compare_samples(dict(zip([1, 2, 3], a)), dict(zip([1, 2, 3, 4, 5], b)))
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert row["test"] == "welch" and (row["n_a"], row["n_b"]) == (3, 5)
    for key, value in (("t", ref.statistic), ("df", ref.df), ("p", ref.pvalue), ("diff", a.mean() - b.mean())):
        assert row[key] == pytest.approx(value, abs=TOL, rel=TOL), key
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 5
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 4)  # Welch-Satterthwaite
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert row["ci_low"] == pytest.approx(a.mean() - b.mean() - half, abs=TOL)
    assert row["ci_high"] == pytest.approx(a.mean() - b.mean() + half, abs=TOL)


def test_paired_when_seeds_pair_and_welch_when_told_not_to():
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 1, 4)
    a, b = seed_effect + 0.3 + rng.normal(0, 0.05, 4), seed_effect + rng.normal(0, 0.05, 4)
    seeds = [7, 3, 5, 1]  # order must not matter: pairs are matched by seed
    row = compare_samples(dict(zip(seeds, a)), dict(zip(seeds[::-1], b[::-1])))
    ref = stats.ttest_rel(a, b)
    assert row["test"] == "paired" and row["df"] == 3 and row["seeds_a"] == "1 3 5 7"
    assert row["t"] == pytest.approx(ref.statistic, abs=TOL) and row["p"] == pytest.approx(ref.pvalue, abs=TOL)
    d = a - b
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((d.mean() - half, d.mean() + half), abs=TOL)
    assert row["p"] < 1e-3 < stats.ttest_ind(a, b, equal_var=False).pvalue  # the seed noise cancels
    welch = compare_samples(dict(zip(seeds, a)), dict(zip(seeds, b)), pairing=False)
    assert welch["test"] == "welch" and welch["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue,
                                                                       abs=TOL)


def test_effect_sizes_power_and_mde_match_statsmodels():
    a, b = np.array([3.1, 2.9, 3.3]), np.array([2.5, 2.8, 2.6, 2.4])
    row = compare_samples(dict(enumerate(a)), dict(enumerate(b, start=10)))
    pooled = math.sqrt((2 * a.var(ddof=1) + 3 * b.var(ddof=1)) / 5)
    d = (a.mean() - b.mean()) / pooled
    assert row["cohens_d"] == pytest.approx(d, abs=TOL) and cohens_d(a, b) == pytest.approx(d, abs=TOL)
    assert hedges_correction(4) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-12)  # Γ(2) / (√2 Γ(3/2))
    assert abs(hedges_correction(5) - (1 - 3 / (4 * 5 - 1))) < 2e-3  # the usual approximation
    assert row["hedges_g"] == pytest.approx(d * hedges_correction(5), abs=TOL)
    power = TTestIndPower()
    assert row["power"] == pytest.approx(power.power(effect_size=abs(d), nobs1=3, alpha=0.05, ratio=4 / 3), abs=TOL)
    assert row["mde_d"] == pytest.approx(power.solve_power(effect_size=None, nobs1=3, alpha=0.05, power=0.8,
                                                           ratio=4 / 3), abs=TOL)
    assert mde_d(3, 3) == pytest.approx(3.0709, abs=1e-4)  # the MDE with 3 seeds per arm
    assert power.power(effect_size=mde_d(3, 3), nobs1=3, alpha=0.05, ratio=1.0) == pytest.approx(0.8, abs=1e-6)
    n = row["n_for_80pct_power"]
    assert power.power(abs(d), nobs1=n, alpha=0.05, ratio=1.0) >= 0.8 > power.power(abs(d), nobs1=n - 1,
                                                                                      alpha=0.05, ratio=1.0)
    assert n_for_power(50.0) == 2 and math.isnan(n_for_power(0.0))


def test_paired_power_mde_and_n_use_d_z_and_ttestpower():
    """Paired rows: one-sample TTestPower on n pairs at d_z = mean(diff) / SD(diff), not the pooled two-sample d."""
    a, b = np.array([3.10, 2.95, 3.30, 3.02]), np.array([3.00, 2.90, 3.12, 2.99])
    row = compare_samples(dict(enumerate(a)), dict(enumerate(b)))
    diff = a - b
    dz = diff.mean() / diff.std(ddof=1)
    power = TTestPower()
    assert row["test"] == "paired" and row["d_z"] == pytest.approx(dz, abs=TOL)
    assert row["d_z"] == pytest.approx(row["t"] / 2, abs=TOL)  # t = d_z * sqrt(n)
    assert row["cohens_d"] == pytest.approx(cohens_d(a, b), abs=TOL)  # d / g stay the between-arm d_s
    assert row["power"] == pytest.approx(power.power(effect_size=dz, nobs=4, alpha=0.05), abs=TOL)
    assert row["mde_d"] == pytest.approx(power.solve_power(effect_size=None, nobs=4, alpha=0.05, power=0.8), abs=1e-8)
    assert mde_d(3, 3, paired=True) == pytest.approx(3.2640, abs=1e-4) != pytest.approx(mde_d(3, 3), abs=0.1)
    n = row["n_for_80pct_power"]
    assert power.power(dz, nobs=n, alpha=0.05) >= 0.8 > power.power(dz, nobs=n - 1, alpha=0.05)
    welch = compare_samples(dict(enumerate(a)), dict(enumerate(b)), pairing=False)
    assert math.isnan(welch["d_z"]) and welch["power"] == pytest.approx(
        TTestIndPower().power(effect_size=abs(cohens_d(a, b)), nobs1=4, alpha=0.05, ratio=1.0), abs=TOL)
    # statsmodels' solve_power returns n = 2 here (power 0.54: its nct is NaN at 2.5 and 3 pairs); the search does not
    assert n_for_power(6.64, paired=True) == 3 and power.power(6.64, nobs=2, alpha=0.05) < 0.8


@pytest.mark.parametrize("method", ["bonferroni", "holm", "fdr_bh"])
def test_corrections_match_multipletests_and_skip_untested(method):
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.5, 0.002])
    ours = adjust_pvalues(p, method)
    ref = multipletests(p[~np.isnan(p)], alpha=0.05, method=method)[1]
    assert np.isnan(ours[1]) and np.allclose(ours[~np.isnan(p)], ref, atol=TOL, rtol=0)
    if method == "holm":  # by hand: sorted p x (m, m-1, ...), running max
        assert np.allclose(ours[[5, 0, 3, 2, 4]], [0.01, 0.04, 0.09, 0.09, 0.5], atol=TOL)


def test_single_seed_gives_estimates_without_tests_and_zero_variance_says_so():
    row = compare_samples({1: 2.0}, {1: 1.5, 2: 1.7})
    assert row["test"] == "none" and row["diff"] == pytest.approx(0.4) and math.isnan(row["p"])
    assert "estimate only" in row["note"] and math.isnan(row["mde_d"])
    flat = compare_samples({1: 5.0, 2: 5.0}, {1: 4.0, 2: 4.0})
    assert math.isnan(flat["p"]) and "no variance" in flat["note"] and flat["diff"] == 1.0


def test_a_constant_shift_with_rounding_noise_is_no_variance_not_p_1e_32():
    x = [0.3, 0.7, 1.1]
    y = [v + 0.2 for v in x]  # differences 0.2 +- 1e-16: scipy's paired t is ~1e16
    with pytest.warns(RuntimeWarning, match="catastrophic cancellation"):  # scipy itself distrusts its answer
        assert np.ptp(np.subtract(y, x)) > 0 and stats.ttest_rel(y, x).pvalue < 1e-20
    row = compare_samples(dict(enumerate(y)), dict(enumerate(x)))
    assert row["test"] == "paired" and math.isnan(row["p"]) and math.isnan(row["t"]) and "no variance" in row["note"]
    assert row["diff"] == pytest.approx(0.2, abs=1e-12)
    noisy = compare_samples({1: 1000.0, 2: 1000.0 + 1e-10}, {1: 999.0, 2: 999.0})  # both arms flat (Welch)
    assert math.isnan(noisy["p"]) and "no variance" in noisy["note"]
    real = compare_samples(dict(enumerate(y)), {0: 0.3, 1: 0.7, 2: 1.1 + 1e-6})  # a real 1e-6 spread is tested
    assert math.isfinite(real["p"])


# ---------------------------------------------------------------- A/A calibration


def test_aa_calibration_holm_family_wise_error_rate(monkeypatch):
    """Identical arms (5 vs the baseline, 3 shared seeds, seed noise + run noise): the Holm-corrected family-wise
    false-positive rate of the test the report runs (paired: arms share seeds) is alpha +- 0.02."""
    monkeypatch.setattr(gc, "collect", lambda *args: 0)  # statsmodels' holm calls gc.collect() (~60 ms) per family
    rng = np.random.default_rng(2024)
    sims, arms, seeds, alpha = 4000, 6, 3, 0.05
    y = rng.normal(0, 1.0, (sims, 1, seeds)) + rng.normal(0, 0.2, (sims, arms, seeds))  # seed effect shared by arms
    base = np.broadcast_to(y[:, :1], (sims, arms - 1, seeds))
    p_paired = t_test(y[:, 1:], base, paired=True)["p"]  # (sims, 5)
    assert abs((p_paired < alpha).mean() - alpha) < 0.01  # each comparison alone is calibrated
    fwer = np.mean([(adjust_pvalues(p, "holm") < alpha).any() for p in p_paired])
    assert abs(fwer - alpha) <= 0.02, fwer
    bh = np.mean([(adjust_pvalues(p, "fdr_bh") < alpha).any() for p in p_paired])  # under the global null FDR = FWER
    assert abs(bh - alpha) <= 0.02, bh
    # Welch (no shared seeds) with 3 runs per arm is conservative: it controls the rate but stays below alpha
    y_ind = rng.normal(0, 1.0, (sims, arms, seeds))
    p_welch = t_test(y_ind[:, 1:], np.broadcast_to(y_ind[:, :1], (sims, arms - 1, seeds)), paired=False)["p"]
    fwer_welch = np.mean([(adjust_pvalues(p, "holm") < alpha).any() for p in p_welch])
    assert 0.005 < fwer_welch <= alpha + 0.02, fwer_welch


def test_report_on_the_synthetic_sweep(sweep_dir, tmp_path):
    out, sweep, comp = write_report(sweep_dir, tmp_path / "rep", target_loss=3.1, plots=False)
    rows = {(r["metric"], r["arm"]): r for r in csv_rows(out / "comparisons.csv")}
    assert len(rows) == 7 * 3  # val_loss val_acc test_loss peak_mem_mb tokens_to_target grad_norm_spike loss_spikes
    v = {k: np.array([VAL[lr, s] for s in (1, 2, 3) if (lr, s) in VAL]) for k, lr in zip("abcd", LRS)}
    paired = rows["val_loss", "optimizer.lr=0.002"]  # same seeds as the baseline -> paired
    ref_paired = stats.ttest_rel(v["b"], v["a"])
    assert paired["test"] == "paired" and float(paired["p"]) == pytest.approx(ref_paired.pvalue, abs=TOL)
    assert float(paired["diff"]) == pytest.approx(v["b"].mean() - v["a"].mean(), abs=TOL)
    welch = rows["val_loss", "optimizer.lr=0.004"]  # seed 2 failed -> seeds differ -> Welch
    ref_welch = stats.ttest_ind(v["c"], v["a"], equal_var=False)
    assert welch["test"] == "welch" and float(welch["p"]) == pytest.approx(ref_welch.pvalue, abs=TOL)
    holm = multipletests([ref_paired.pvalue, ref_welch.pvalue], method="holm")[1]
    assert (float(paired["p_holm"]), float(welch["p_holm"])) == pytest.approx(tuple(holm), abs=TOL)
    single = rows["val_loss", "optimizer.lr=0.008"]
    assert single["test"] == "none" and single["p"] == "" and "estimate only" in single["note"]
    # time to target 3.1: the first validation (4.0) misses it, the final one reaches it unless final > 3.1
    assert float(rows["tokens_to_target", "optimizer.lr=0.002"]["mean_a"]) == 1000.0
    assert comp.censored["tokens_to_target"] == ["6", "9"]  # lr 0.004 and 0.008, seed 1, end above 3.1
    assert float(rows["loss_spikes", "optimizer.lr=0.008"]["mean_a"]) == 1.0
    assert float(rows["loss_spikes", "optimizer.lr=0.002"]["mean_a"]) == 0.0
    assert float(rows["grad_norm_spike", "optimizer.lr=0.008"]["mean_a"]) == pytest.approx(5.0)

    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] == "optimizer.lr=0.001" and report["target_loss"] == 3.1
    assert sorted(report["not_counted"]) == ["10", "11", "7", "rerun/0"]
    md = (out / "report.md").read_text()
    assert "## Jobs not counted (4)" in md and "RuntimeError: loss is nan" in md and "| 11 |" in md
    assert "optimizer.lr=0.002 lowers val loss by 0.0967 nats [" in md and "paired t-test" in md
    # confirmatory val_loss: 2 tested arms, power at alpha / 2; exploratory test_loss: at alpha
    assert "MDE 0.0522 nats (d_z 4.52) with 3 pairs at alpha = 0.025" in md and "estimate only" in md
    assert "MDE 0.196 nats (d 3.89) with n = 2 vs 3 at alpha = 0.05" in md
    assert float(paired["mde_d"]) == pytest.approx(TTestPower().solve_power(None, nobs=3, alpha=0.025, power=0.8))
    assert "No value for 2 completed run(s): never reached the target val loss 3.1: 6, 9." in md
    assert "run too short" not in md
    assert "Warning: arm optimizer.lr=0.004: seed 2 failed: not in the mean." in md  # a lost seed is on its rows
    assert "Warning: arm optimizer.lr=0.008: seed 2 running, seed 3 missing: not in the mean." in md
    to_target = rows["tokens_to_target", "optimizer.lr=0.004"]["warning"]  # conditional on reaching the target
    assert "arm optimizer.lr=0.004: 1 completed run(s) excluded (never reached the target val loss 3.1)" in to_target
    assert "excluded" not in rows["val_loss", "optimizer.lr=0.004"]["warning"]
    assert report["warnings"] == [] and report["provenance"]["git_commit"] == {
        "c90c2add7571d7a6af90a35972d26043ccc5453e": [str(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]}
    tex = (out / "report.tex").read_text()
    assert tex.startswith(r"\begin{tabular}") and r"val\_loss & optimizer.lr=0.002" in tex
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_report(sweep_dir, tmp_path / "rep", target_loss=3.1, plots=False)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}  # idempotent


def test_interval_labels_follow_alpha(sweep_dir, tmp_path):
    """--alpha 0.01 gives 99 % intervals (t_test's 1 - alpha): every label says so, none says 95 %."""
    out, _, comp = write_report(sweep_dir, tmp_path / "a01", alpha=0.01, plots=False)
    row = next(r for r in comp.rows if r["metric"] == "val_loss" and r["arm"] == "optimizer.lr=0.002")
    ref = stats.ttest_rel([VAL["0.002", s] for s in (1, 2, 3)], [VAL["0.001", s] for s in (1, 2, 3)])
    assert row["ci_low"] == pytest.approx(ref.confidence_interval(0.99).low, abs=1e-12)
    md, tex = (out / "report.md").read_text(), (out / "report.tex").read_text()
    assert "diff [99% CI]" in md and "99 % t-interval" in md and r"99\% CI" in tex
    assert "95" not in md.split("## Method")[1].split("- d:")[0] and "95% CI" not in md and r"95\%" not in tex


def test_verdict_words_follow_the_metric_direction(sweep_dir):
    """Higher val accuracy is better, lower val loss is: each significant row says so in its own direction."""
    comp = compare_sweep(collect_sweep(sweep_dir))
    acc = next(r for r in comp.rows if r["metric"] == "val_acc" and r["arm"] == "optimizer.lr=0.002")
    loss = next(r for r in comp.rows if r["metric"] == "val_loss" and r["arm"] == "optimizer.lr=0.002")
    assert acc["verdict"] == loss["verdict"] == "better" and acc["diff"] > 0 > loss["diff"]
    assert verdict(acc, 0.05).startswith("optimizer.lr=0.002 raises val accuracy by 0.00967 [")
    assert verdict(loss, 0.05).startswith("optimizer.lr=0.002 lowers val loss by 0.0967 nats [")


def test_baseline_choice_and_cli(sweep_dir, tmp_path, capsys, monkeypatch):
    comp = compare_sweep(collect_sweep(sweep_dir), baseline="optimizer.lr=0.002")
    assert comp.baseline == "optimizer.lr=0.002" and {r["arm"] for r in comp.rows} == {
        "optimizer.lr=0.001", "optimizer.lr=0.004", "optimizer.lr=0.008"}
    assert compare_sweep(collect_sweep(sweep_dir), baseline="optimizer.lr=2e-3").baseline == "optimizer.lr=0.002"
    with pytest.raises(ValueError, match="'norm' is not a swept key; allowed: \\['optimizer.lr'\\]"):
        compare_sweep(collect_sweep(sweep_dir), baseline="norm=rmsnorm")
    monkeypatch.chdir(tmp_path)  # the default sweep is the newest under ./multirun, the default output ./reports/
    assert newest_sweep() == Path("multirun/2026-01-01/10-00-00-000000-lr")
    assert report_main(["--no-plots"]) == 0
    assert "not counted: 7 [failed] RuntimeError: loss is nan" in capsys.readouterr().out
    assert (tmp_path / "reports" / "2026-01-01_10-00-00-000000-lr" / "report.md").is_file()
    assert report_main([str(tmp_path / "nowhere")]) == 2


def test_report_on_a_sweep_with_no_completed_run_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):

    sweep = tmp_path / "all_failed"
    for job, seed in enumerate((1, 2, 3)):
        write_run(sweep / str(job), "0.001", seed, "failed")
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no completed run" in err[0] and "3 failed" in err[0] and "RuntimeError" in err[0]
    assert not out.exists()
