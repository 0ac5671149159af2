"""kimi_lab.stats.factorial: main effects over a norm x lr grid against hand-matched pairs and scipy, the ANOVA
against a hand-computed balanced decomposition, a crossover interaction, a grid with a missing cell, and the report
files (tests/synthetic.py writes the sweeps)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from kimi_lab.stats import collect_sweep, compare_sweep
from kimi_lab.stats.factorial import ANOVA_COLUMNS, EFFECT_COLUMNS, add_factorial, strongest_interaction
from kimi_lab.stats.report import verdict, write_report
from tests.synthetic import GRID_LRS, NORMS, SEEDS, factorial_values, write_factorial_sweep, write_run

TOL = 1e-10
UNIFORM = {"0.001": -0.05, "0.002": -0.05, "0.004": -0.05}  # rmsnorm lowers val loss by 0.05 at every lr
CROSSOVER = {"0.001": 0.1, "0.002": 0.0, "0.004": -0.1}  # worse at one lr, better at another: no main effect


def _analyse(root, baseline=None):
    sweep = collect_sweep(root)
    comp = compare_sweep(sweep, baseline=baseline)
    add_factorial(sweep, comp)
    effects = {(r["metric"], r["arm"]): r for r in comp.main_effects}
    return comp, effects, {(t["metric"], t["term"]): t for t in comp.anova}


def test_main_effects_are_means_of_matched_pairs_tested_like_scipy(tmp_path):
    values = factorial_values(UNIFORM)
    comp, effects, _ = _analyse(write_factorial_sweep(tmp_path, values))
    rms = effects["val_loss", "norm=rmsnorm"]
    a = np.array([values["rmsnorm", lr, s] for lr in GRID_LRS for s in SEEDS])
    b = np.array([values["layernorm", lr, s] for lr in GRID_LRS for s in SEEDS])
    ref = stats.ttest_rel(a, b)
    assert rms["test"] == "paired" and rms["n_a"] == 9 and rms["n_contexts"] == rms["grid_contexts"] == 3
    assert rms["diff"] == pytest.approx((a - b).mean(), abs=TOL) and rms["p"] == pytest.approx(ref.pvalue, abs=TOL)
    ci = ref.confidence_interval()
    assert (rms["ci_low"], rms["ci_high"]) == pytest.approx((ci.low, ci.high), abs=TOL)
    assert rms["diff"] == pytest.approx(-0.05, abs=0.02) and rms["ci_high"] < 0
    per_lr = [np.mean([values["rmsnorm", lr, s] - values["layernorm", lr, s] for s in SEEDS]) for lr in GRID_LRS]
    assert (rms["context_min"], rms["context_max"]) == pytest.approx((min(per_lr), max(per_lr)), abs=TOL)
    assert rms["note"] == "paired on 9 matched (context, seed) pairs in 3 of 3 contexts"
    assert np.isnan(rms["cohens_d"]) and "d = " not in verdict(rms, comp.alpha)  # d_z only
    flat = effects["tokens_per_s", "norm=rmsnorm"]  # 1000 + seed in every arm: constant differences, no test
    assert flat["test"] == "paired" and np.isnan(flat["p"]) and flat["note"].startswith("no variance across seeds")
    lr4 = effects["val_loss", "optimizer.lr=0.004"]  # matched within each norm: 2 contexts x 3 seeds
    a4 = [values[n, "0.004", s] for n in NORMS for s in SEEDS]
    b4 = [values[n, "0.001", s] for n in NORMS for s in SEEDS]
    assert lr4["n_a"] == 6 and lr4["p"] == pytest.approx(stats.ttest_rel(a4, b4).pvalue, abs=TOL)
    family = [effects["val_loss", arm]["p"] for arm in ("norm=rmsnorm", "optimizer.lr=0.002", "optimizer.lr=0.004")]
    holm = multipletests(family, method="holm")[1]
    assert [effects["val_loss", arm]["p_holm"] for arm in ("norm=rmsnorm", "optimizer.lr=0.002",
                                                            "optimizer.lr=0.004")] == pytest.approx(holm, abs=TOL)
    assert "Averaged over 3 of 3 contexts" in verdict(rms, comp.alpha) and "depends" not in verdict(rms, comp.alpha)


def test_anova_matches_the_balanced_two_way_decomposition_with_seed_blocks(tmp_path):
    values = factorial_values(UNIFORM, noise=0.02)
    _, _, terms = _analyse(write_factorial_sweep(tmp_path, values))
    y = np.array([[[values[n, lr, s] for s in SEEDS] for lr in GRID_LRS] for n in NORMS])  # (norm, lr, seed)
    grand = y.mean()
    ss_norm = y[0].size * ((y.mean(axis=(1, 2)) - grand) ** 2).sum()
    ss_lr = y.shape[0] * y.shape[2] * ((y.mean(axis=(0, 2)) - grand) ** 2).sum()
    ss_seed = y.shape[0] * y.shape[1] * ((y.mean(axis=(0, 1)) - grand) ** 2).sum()
    cell = y.mean(axis=2)
    inter = cell - y.mean(axis=(1, 2))[:, None] - y.mean(axis=(0, 2))[None, :] + grand
    ss_inter = y.shape[2] * (inter ** 2).sum()
    ss_res = ((y - grand) ** 2).sum() - ss_norm - ss_lr - ss_seed - ss_inter
    df_res = y.size - 1 - 1 - 2 - 2 - 2
    expect = {"norm": (1, ss_norm), "optimizer.lr": (2, ss_lr), "seed": (2, ss_seed),
              "norm × optimizer.lr": (2, ss_inter)}
    for term, (df, ss) in expect.items():
        row = terms["val_loss", term]
        f = ss / df / (ss_res / df_res)
        assert (row["df"], row["sum_sq"], row["F"]) == pytest.approx((df, ss, f), rel=1e-8)
        assert row["p"] == pytest.approx(stats.f.sf(f, df, df_res), rel=1e-6)
    assert terms["val_loss", "residual"]["df"] == df_res


def test_a_crossover_interaction_is_flagged_and_its_main_effect_is_null(tmp_path):
    comp, effects, terms = _analyse(write_factorial_sweep(tmp_path, factorial_values(CROSSOVER)))
    rms = effects["val_loss", "norm=rmsnorm"]
    assert rms["ci_low"] < 0 < rms["ci_high"] and rms["p_holm"] > 0.05
    assert rms["context_min"] < -0.05 and rms["context_max"] > 0.05
    assert rms["interaction_term"] == "norm × optimizer.lr" and rms["interaction_p_holm"] < 1e-3
    assert terms["val_loss", "norm × optimizer.lr"]["p"] == rms["interaction_p_holm"]  # a family of one term
    assert "The effect depends on the other keys (ANOVA interaction norm × optimizer.lr, p_holm < 0.001)" in verdict(
        rms, comp.alpha)


def test_a_missing_cell_skips_the_anova_and_narrows_the_matched_contexts(tmp_path):
    failed = tuple(("rmsnorm", "0.004", s) for s in SEEDS) + (("layernorm", "0.002", 2),)
    comp, effects, terms = _analyse(write_factorial_sweep(tmp_path, factorial_values(UNIFORM), skip=failed))
    assert not terms and comp.anova_notes["val_loss"] == (
        "no completed run with a value of this metric in 1 cell(s) (norm=rmsnorm, optimizer.lr=0.004)")
    rms = effects["val_loss", "norm=rmsnorm"]  # lr 0.002 loses seed 2, lr 0.004 every rmsnorm seed
    assert (rms["n_a"], rms["n_contexts"], rms["grid_contexts"]) == (5, 2, 3)
    assert rms["note"] == "paired on 5 matched (context, seed) pairs in 2 of 3 contexts"
    # the context that gave no pair is on the row's warning (it used to list only arms that gave pairs)
    assert "arm norm=rmsnorm, optimizer.lr=0.004: seed 1 failed, seed 2 failed, seed 3 failed" in rms["warning"]
    values = factorial_values(UNIFORM)  # the pairs are matched by seed: lr 0.002 keeps seeds 1 and 3
    kept = [("0.001", 1), ("0.001", 2), ("0.001", 3), ("0.002", 1), ("0.002", 3)]
    ref = stats.ttest_rel([values["rmsnorm", lr, s] for lr, s in kept], [values["layernorm", lr, s] for lr, s in kept])
    assert rms["p"] == pytest.approx(ref.pvalue, abs=TOL)
    assert rms["diff"] == pytest.approx(np.mean([values["rmsnorm", lr, s] - values["layernorm", lr, s]
                                                 for lr, s in kept]), abs=TOL)
    lr4 = effects["val_loss", "optimizer.lr=0.004"]
    assert (lr4["n_a"], lr4["n_contexts"]) == (3, 1) and "Read in 1 of 2 contexts only." in verdict(lr4, comp.alpha)
    assert np.isnan(rms["interaction_p_holm"]) and "depends" not in verdict(rms, comp.alpha)


def test_a_partial_baseline_takes_the_other_keys_first_values(tmp_path):
    """`make report BASELINE=norm=rmsnorm` on a norm x lr grid (the README's example) names one arm: the other keys at
    their first value (it failed: 'matches 3 arms')."""
    comp = compare_sweep(collect_sweep(write_factorial_sweep(tmp_path, factorial_values(UNIFORM))),
                         baseline="norm=rmsnorm")
    assert comp.baseline == "norm=rmsnorm, optimizer.lr=0.001"
    assert comp.baseline_rule == "--baseline norm=rmsnorm, the other swept keys at their first value"


def test_the_baseline_arm_sets_each_keys_reference_level(tmp_path):
    _, effects, _ = _analyse(write_factorial_sweep(tmp_path, factorial_values(UNIFORM)),
                             baseline="norm=rmsnorm,optimizer.lr=0.002")
    assert set(a for m, a in effects if m == "val_loss") == {"norm=layernorm", "optimizer.lr=0.001",
                                                             "optimizer.lr=0.004"}
    assert effects["val_loss", "norm=layernorm"]["base_level"] == "rmsnorm"
    assert effects["val_loss", "norm=layernorm"]["diff"] == pytest.approx(0.05, abs=0.02)


def test_report_files_of_a_factorial_sweep_and_none_for_one_key(tmp_path, sweep_dir):
    root = write_factorial_sweep(tmp_path, factorial_values(UNIFORM))
    out, _, comp = write_report(root, tmp_path / "rep", plots=False)
    with (out / "main_effects.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == EFFECT_COLUMNS and len(rows) == len(comp.main_effects)
    with (out / "anova.csv").open() as f:
        assert next(csv.reader(f)) == ANOVA_COLUMNS
    report = json.loads((out / "report.json").read_text())
    assert len(report["main_effects"]) == len(rows) and report["anova"] and "val_loss" not in report["anova_notes"]
    assert report["anova_notes"]["peak_mem_mb"].startswith("no residual variance")  # 500 MB in every run
    md = (out / "report.md").read_text()
    assert "## Main effects over the grid (`norm`, `optimizer.lr` crossed)" in md
    assert "| `norm=rmsnorm` vs `layernorm` | 9 | 3 |" in md and "`norm × optimizer.lr` F = " in md
    assert r"norm=rmsnorm vs layernorm" in (out / "report.tex").read_text()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_report(root, out, plots=False)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}  # idempotent
    one_key, _, comp = write_report(sweep_dir, tmp_path / "one", plots=False)
    assert comp.main_effects == [] and not (one_key / "main_effects.csv").exists()
    assert "Main effects" not in (one_key / "report.md").read_text()


def test_main_effects_plot_shows_each_level_against_its_base_level(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need the `report` extra (matplotlib)")
    from kimi_lab.stats.plots import figure_main_effects, pyplot

    out, _, comp = write_report(write_factorial_sweep(tmp_path, factorial_values(UNIFORM)), tmp_path / "rep")
    assert (out / "main_effects.png").stat().st_size > 0
    assert "![main_effects](main_effects.png)" in (out / "report.md").read_text()
    fig = figure_main_effects(comp.main_effects, metrics=("val_loss",))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "norm=rmsnorm vs layernorm", "optimizer.lr=0.002 vs 0.001", "optimizer.lr=0.004 vs 0.001"]
    points = ax.lines[0].get_xdata()
    assert list(points) == pytest.approx([r["diff"] for r in comp.main_effects if r["metric"] == "val_loss"])
    pyplot().close(fig)
    assert figure_main_effects([]) is None


def test_a_design_that_cannot_separate_the_interaction_skips_the_anova(tmp_path):
    """Every sweep seed of one cell failed and a hand-written rerun filled it with a seed no other cell has: that
    cell's mean and that seed's block are one parameter, so no interaction can be estimated (statsmodels would still
    print an F)."""
    values = factorial_values(UNIFORM)
    failed = tuple(("rmsnorm", "0.004", s) for s in SEEDS)
    root = write_factorial_sweep(tmp_path, values, skip=failed)
    write_run(root / "rerun" / "0", "4e-3", 7, "completed", 3.05, extra=("norm=rmsnorm",))
    comp, _, terms = _analyse(root)
    assert not terms and comp.anova_notes["val_loss"].startswith("the design cannot separate every term (rank")


def test_interaction_terms_are_matched_by_whole_key_and_holm_adjusted():
    terms = [{"term": "norm.eps", "p": 0.5}, {"term": "norm × optimizer.lr", "p": 0.04},
             {"term": "norm.eps × optimizer.lr", "p": 0.001}, {"term": "norm × norm.eps", "p": 0.03},
             {"term": "norm × norm.eps × optimizer.lr", "p": 0.2}, {"term": "residual", "p": math.nan}]
    holm = multipletests([0.04, 0.03, 0.2], method="holm")[1]  # the three terms that hold `norm`
    assert strongest_interaction(terms, "norm") == ("norm × norm.eps", pytest.approx(holm[1]))
    assert strongest_interaction(terms, "norm.eps")[0] == "norm.eps × optimizer.lr"
    assert strongest_interaction(terms[:1], "norm") == ("", pytest.approx(math.nan, nan_ok=True))
