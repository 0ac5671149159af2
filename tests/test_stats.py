"""kimi_lab.stats: every statistic against scipy.stats / statsmodels, A/A calibration, a synthetic sweep with known
numbers (failed, running, missing and duplicate jobs), and one real tiny sweep end to end through `make report`."""

from __future__ import annotations

import csv
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower

from kimi_lab.stats import collect_sweep, compare_samples, compare_sweep
from kimi_lab.stats.compare import adjust_pvalues, cohens_d, hedges_correction, mde_d, n_for_power, t_test
from kimi_lab.stats.report import main as report_main
from kimi_lab.stats.report import newest_sweep, verdict, write_report
from tests.helpers import DATA_DIR, REPO_ROOT
from tests.synthetic import LRS, VAL

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


def test_collect_lists_every_job_and_groups_arms(sweep_dir):
    sweep = collect_sweep(sweep_dir)
    assert sweep.factors == {"optimizer.lr": LRS}  # model=tiny is not swept, seed pairs arms
    assert [a.label for a in sweep.arms] == [f"optimizer.lr={lr}" for lr in LRS]
    status = {j.name: j.status for j in sweep.jobs}
    assert status == {**{str(i): "completed" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)}, "7": "failed", "10": "running",
                      "11": "missing", "rerun/0": "duplicate"}
    assert [len(a.completed) for a in sweep.arms] == [3, 3, 2, 1]


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_report_on_the_synthetic_sweep(sweep_dir, tmp_path):
    out, sweep, comp = write_report(sweep_dir, tmp_path / "rep", target_loss=3.1, plots=False)
    rows = {(r["metric"], r["arm"]): r for r in _rows(out / "comparisons.csv")}
    assert len(rows) == 11 * 3
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
    assert "optimizer.lr=0.002 lowers val loss by 0.0967 [" in md and "paired t-test" in md
    assert "MDE d >= 3.07 with n = 3 vs 3" in md and "estimate only" in md
    tex = (out / "report.tex").read_text()
    assert tex.startswith(r"\begin{tabular}") and r"val\_loss & optimizer.lr=0.002" in tex
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_report(sweep_dir, tmp_path / "rep", target_loss=3.1, plots=False)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}  # idempotent


def test_verdict_words_follow_the_metric_direction(sweep_dir):
    comp = compare_sweep(collect_sweep(sweep_dir))
    row = next(r for r in comp.rows if r["metric"] == "val_acc" and r["arm"] == "optimizer.lr=0.002")
    assert verdict(row, 0.05).startswith("optimizer.lr=0.002 raises val accuracy by 0.00967 [") and "(better)" in \
        verdict(row, 0.05)


def test_baseline_choice_and_cli(sweep_dir, tmp_path, capsys, monkeypatch):
    comp = compare_sweep(collect_sweep(sweep_dir), baseline="optimizer.lr=0.002")
    assert comp.baseline == "optimizer.lr=0.002" and {r["arm"] for r in comp.rows} == {
        "optimizer.lr=0.001", "optimizer.lr=0.004", "optimizer.lr=0.008"}
    with pytest.raises(ValueError, match="'norm' is not a swept key; allowed: \\['optimizer.lr'\\]"):
        compare_sweep(collect_sweep(sweep_dir), baseline="norm=rmsnorm")
    monkeypatch.chdir(tmp_path)  # the default sweep is the newest under ./multirun, the default output ./reports/
    assert newest_sweep() == Path("multirun/2026-01-01/10-00-00-000000-lr")
    assert report_main(["--no-plots"]) == 0
    assert "not counted: 7 [failed] RuntimeError: loss is nan" in capsys.readouterr().out
    assert (tmp_path / "reports" / "2026-01-01_10-00-00-000000-lr" / "report.md").is_file()
    assert report_main([str(tmp_path / "nowhere")]) == 2


# ---------------------------------------------------------------- a real tiny sweep end to end


def test_real_sweep_through_make_report(tmp_path):
    """2 arms x 3 seeds of the tiny model plus one job made to fail, then `make report` on the folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "model=tiny", f"paths.data_dir={DATA_DIR}",
              "trainer.max_steps=3", "trainer.val_check_interval=3", "optimizer.warmup_steps=1"]
    grid = subprocess.run([*common, "norm=layernorm,rmsnorm", "seed=1,2,3", f"hydra.sweep.dir={tmp_path}/sweep/grid"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert grid.returncode == 0, grid.stderr[-3000:]
    failing = subprocess.run([*common, "norm=rmsnorm", "optimizer.lr=-1", "seed=1",
                              f"hydra.sweep.dir={tmp_path}/sweep/fail"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert failing.returncode != 0
    proc = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "-o", "install", "report", f"PYTHON={sys.executable}",
                           f"SWEEP={tmp_path}/sweep", f"OUT={tmp_path}/rep"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(r["metric"], r["arm"]): r for r in _rows(tmp_path / "rep" / "comparisons.csv")}
    val = rows["val_loss", "norm=rmsnorm, optimizer.lr=(default)"]
    assert val["baseline"] == "norm=layernorm, optimizer.lr=(default)"
    assert (val["test"], val["n_a"], val["n_b"], val["seeds_a"]) == ("paired", "3", "3", "1 2 3")
    assert 0 <= float(val["p"]) <= 1 and float(val["mde_d"]) == pytest.approx(3.0709, abs=1e-4)
    assert rows["val_loss", "norm=rmsnorm, optimizer.lr=-1"]["n_a"] == "0"
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    failed = [j for j in report["jobs"] if j["status"] == "failed"]
    assert [j["name"] for j in failed] == ["fail/0"] and "optimizer.lr" in failed[0]["error"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Jobs not counted (1)" in md and "MDE d >= 3.07 with n = 3 vs 3" in md
