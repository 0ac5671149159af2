"""kimi_lab.stats.factorial: main effects on per-seed means against a hand computation and scipy, the split-plot ANOVA
against a direct decomposition (each term over its interaction with the seed), a crossover interaction, incomplete
seeds and cells, and the report files (tests/synthetic.py writes the sweeps; its null-grid tests measure the
false-positive rate on tests/null_grids.py's grids)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from kimi_lab.stats import collect_sweep, compare_sweep
from kimi_lab.stats.factorial import (ANOVA_COLUMNS, EFFECT_COLUMNS, METHOD_NOTE, add_factorial, balanced_block,
                                      strongest_interaction)
from kimi_lab.stats.report import verdict, write_report
from tests.null_grids import N_GRIDS, frozen_gc, null_batch  # noqa: F401 (frozen_gc: a fixture)
from tests.synthetic import (GRID_LRS, NORMS, SEEDS, factorial_values, set_grid_values, write_factorial_sweep,
                             write_run)

TOL = 1e-10
UNIFORM = {"0.001": -0.05, "0.002": -0.05, "0.004": -0.05}  # rmsnorm lowers val loss by 0.05 at every lr
CROSSOVER = {"0.001": 0.1, "0.002": 0.0, "0.004": -0.1}  # worse at one lr, better at another: no main effect


pytestmark = pytest.mark.usefixtures("frozen_gc")  # statsmodels' Holm collects garbage on every call


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    return null_batch(tmp_path_factory.mktemp("null"))


def _analyse(root, baseline=None):
    sweep = collect_sweep(root)
    comp = compare_sweep(sweep, baseline=baseline)
    add_factorial(sweep, comp)
    effects = {(r["metric"], r["arm"]): r for r in comp.main_effects}
    return comp, effects, {(t["metric"], t["term"]): t for t in comp.anova}


def _seed_means(values, level, base, contexts, seeds, key="norm"):
    """Per-seed means at ``level`` and at ``base`` of ``key`` over ``contexts`` (levels of the other key), by hand."""
    at = (lambda lv, c, s: values[lv, c, s]) if key == "norm" else (lambda lv, c, s: values[c, lv, s])
    return ([np.mean([at(level, c, s) for c in contexts]) for s in seeds],
            [np.mean([at(base, c, s) for c in contexts]) for s in seeds])


def test_main_effects_test_per_seed_means_like_scipy(tmp_path):
    values = factorial_values(UNIFORM)
    root = write_factorial_sweep(tmp_path, values)
    comp, effects, _ = _analyse(root)
    rms = effects["val_loss", "norm=rmsnorm"]
    a, b = _seed_means(values, "rmsnorm", "layernorm", GRID_LRS, SEEDS)  # n = 3 seeds, not 9 (lr, seed) pairs
    ref = stats.ttest_rel(a, b)
    assert rms["test"] == "paired" and rms["n_a"] == rms["n_b"] == 3 and rms["df"] == 2
    assert rms["n_contexts"] == rms["grid_contexts"] == 3 and rms["seeds_a"] == "1 2 3"
    assert (rms["mean_a"], rms["mean_b"]) == pytest.approx((np.mean(a), np.mean(b)), abs=TOL)
    assert rms["diff"] == pytest.approx(np.mean(np.subtract(a, b)), abs=TOL)
    assert rms["p"] == pytest.approx(ref.pvalue, abs=TOL) and rms["t"] == pytest.approx(ref.statistic, rel=1e-10)
    ci = ref.confidence_interval()
    assert (rms["ci_low"], rms["ci_high"]) == pytest.approx((ci.low, ci.high), abs=TOL)
    diffs = np.subtract(a, b)
    assert rms["d_z"] == pytest.approx(diffs.mean() / diffs.std(ddof=1), rel=1e-10)
    assert rms["diff"] == pytest.approx(-0.05, abs=0.02) and rms["ci_high"] < 0
    per_lr = [np.mean([values["rmsnorm", lr, s] - values["layernorm", lr, s] for s in SEEDS]) for lr in GRID_LRS]
    assert (rms["context_min"], rms["context_max"]) == pytest.approx((min(per_lr), max(per_lr)), abs=TOL)
    assert rms["note"] == "paired over 3 seeds, each the mean of 3 contexts"
    assert np.isnan(rms["cohens_d"]) and np.isnan(rms["hedges_g"])
    flat = effects["peak_mem_mb", "norm=rmsnorm"]  # 500 MB in every run: constant differences, no test
    assert flat["test"] == "paired" and np.isnan(flat["p"]) and flat["note"].startswith("no variance across seeds")
    lr4 = effects["val_loss", "optimizer.lr=0.004"]  # each seed's mean over the two norms
    a4, b4 = _seed_means(values, "0.004", "0.001", NORMS, SEEDS, key="optimizer.lr")
    assert lr4["n_a"] == 3 and lr4["p"] == pytest.approx(stats.ttest_rel(a4, b4).pvalue, abs=TOL)
    arms = ("norm=rmsnorm", "optimizer.lr=0.002", "optimizer.lr=0.004")
    holm = multipletests([effects["val_loss", arm]["p"] for arm in arms], method="holm")[1]
    assert [effects["val_loss", arm]["p_holm"] for arm in arms] == pytest.approx(holm, abs=TOL)
    assert "Averaged over 3 of 3 contexts" in verdict(rms, comp.alpha) and "depends" not in verdict(rms, comp.alpha)
    sweep = collect_sweep(root)  # --no-pairing: Welch on the same per-seed means
    unpaired = compare_sweep(sweep, pairing=False)
    add_factorial(sweep, unpaired, pairing=False)
    welch = next(r for r in unpaired.main_effects if r["metric"] == "val_loss" and r["arm"] == "norm=rmsnorm")
    assert welch["test"] == "welch" and welch["note"] == "Welch; 3 seeds, each the mean of 3 contexts"
    assert welch["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, abs=TOL)


def _split_plot_reference(y):
    """{term: (df, den_df, F, p)} of a balanced (norm, lr, seed) array, each term over its interaction with the seed
    (Montgomery, Design and Analysis of Experiments, ch. 14): sums of squares from the marginal means."""
    n, k, s = y.shape  # norms, lrs, seeds
    g = y.mean()
    m_n, m_l, m_s = y.mean(axis=(1, 2)), y.mean(axis=(0, 2)), y.mean(axis=(0, 1))
    m_nl, m_ns, m_ls = y.mean(axis=2), y.mean(axis=1), y.mean(axis=0)
    ss = {"norm": k * s * ((m_n - g) ** 2).sum(), "lr": n * s * ((m_l - g) ** 2).sum(),
          "norm:lr": s * ((m_nl - m_n[:, None] - m_l[None, :] + g) ** 2).sum(),
          "norm:seed": k * ((m_ns - m_n[:, None] - m_s[None, :] + g) ** 2).sum(),
          "lr:seed": n * ((m_ls - m_l[:, None] - m_s[None, :] + g) ** 2).sum(),
          "norm:lr:seed": ((y - m_nl[:, :, None] - m_ns[:, None, :] - m_ls[None, :, :] + m_n[:, None, None]
                            + m_l[None, :, None] + m_s[None, None, :] - g) ** 2).sum()}
    df = {"norm": n - 1, "lr": k - 1, "norm:lr": (n - 1) * (k - 1)}
    out = {}
    for term, label in (("norm", "norm"), ("lr", "optimizer.lr"), ("norm:lr", "norm × optimizer.lr")):
        den = df[term] * (s - 1)
        f = (ss[term] / df[term]) / (ss[f"{term}:seed"] / den)
        out[label] = (df[term], den, f, stats.f.sf(f, df[term], den))
    return out


def test_the_anova_tests_each_term_against_its_interaction_with_the_seed(tmp_path):
    values = factorial_values(UNIFORM, noise=0.02)
    comp, _, terms = _analyse(write_factorial_sweep(tmp_path, values))
    y = np.array([[[values[n, lr, s] for s in SEEDS] for lr in GRID_LRS] for n in NORMS])  # (norm, lr, seed)
    for term, (df, den, f, p) in _split_plot_reference(y).items():
        row = terms["val_loss", term]
        assert (row["df"], row["den_df"], row["error_term"]) == (df, den, f"{term} × seed")
        assert row["F"] == pytest.approx(f, rel=1e-8) and row["p"] == pytest.approx(p, rel=1e-6)
    assert terms["val_loss", "residual"]["df"] == 1 * 2 * 2 and "val_loss" not in comp.anova_notes
    assert ("val_loss", "seed") not in terms  # the seed is the subject, never a tested term
    # a two-level key in a complete grid: F = t² of the main effect's paired t over the per-seed means
    rms = next(r for r in comp.main_effects if r["metric"] == "val_loss" and r["arm"] == "norm=rmsnorm")
    assert terms["val_loss", "norm"]["F"] == pytest.approx(rms["t"] ** 2, rel=1e-8)
    assert terms["val_loss", "norm"]["p"] == pytest.approx(rms["p"], rel=1e-8)


def test_a_crossover_interaction_is_flagged_and_its_main_effect_is_null(tmp_path):
    comp, effects, terms = _analyse(write_factorial_sweep(tmp_path, factorial_values(CROSSOVER)))
    rms = effects["val_loss", "norm=rmsnorm"]
    assert rms["ci_low"] < 0 < rms["ci_high"] and rms["p_holm"] > 0.05
    assert rms["context_min"] < -0.05 and rms["context_max"] > 0.05
    assert rms["interaction_term"] == "norm × optimizer.lr" and rms["interaction_p_holm"] < 1e-3
    assert terms["val_loss", "norm × optimizer.lr"]["p"] == rms["interaction_p_holm"]  # a family of one term
    assert "The effect depends on the other keys (ANOVA interaction norm × optimizer.lr, p_holm < 0.001)" in verdict(
        rms, comp.alpha)


def test_balanced_block_keeps_the_complete_seeds_x_contexts_block_with_most_pairs():
    assert balanced_block([{1, 2, 3}, {1, 2, 3}, {1, 3}]) == ([1, 2, 3], [0, 1])  # 6 pairs either way: more seeds
    twelve = set(range(1, 13))
    assert balanced_block([twelve, twelve - {5}, twelve, twelve]) == (sorted(twelve - {5}), [0, 1, 2, 3])  # 44 > 36
    assert balanced_block([{1, 2, 3}, {1, 2, 4}, {1, 2, 5}]) == ([1, 2], [0, 1, 2])  # an intersection: 6 > 3
    assert balanced_block([set(), {7}, {1, 2}]) == ([1, 2], [2])
    assert balanced_block([{1, 2}, {3, 4}]) == ([1, 2], [0])  # a tie of equal blocks: the smaller seeds
    assert balanced_block([set(), set()]) == ([], []) and balanced_block([]) == ([], [])


def test_a_seed_missing_one_run_leaves_out_a_context_or_the_seed_never_biasing_the_means(tmp_path):
    values = factorial_values(UNIFORM, noise=0.02)
    comp, effects, terms = _analyse(write_factorial_sweep(tmp_path, values, skip=(("rmsnorm", "0.002", 2),)))
    rms = effects["val_loss", "norm=rmsnorm"]  # 3 seeds x lr 0.001, 0.004 (6 pairs) beats 2 seeds x 3 lrs (6)
    a, b = _seed_means(values, "rmsnorm", "layernorm", ("0.001", "0.004"), SEEDS)
    assert (rms["n_a"], rms["n_contexts"], rms["grid_contexts"]) == (3, 2, 3)
    assert rms["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, abs=TOL)
    assert rms["note"] == ("paired over 3 seeds, each the mean of 2 contexts; 1 context(s) with pairs left out (not "
                           "every kept seed has a pair there)")
    lr2 = effects["val_loss", "optimizer.lr=0.002"]  # 2 seeds x both norms (4 pairs) beats 3 seeds x layernorm (3)
    a2, b2 = _seed_means(values, "0.002", "0.001", NORMS, (1, 3), key="optimizer.lr")
    assert (lr2["n_a"], lr2["n_contexts"], lr2["seeds_a"]) == (2, 2, "1 3")
    assert lr2["p"] == pytest.approx(stats.ttest_rel(a2, b2).pvalue, abs=TOL)
    assert lr2["note"] == ("paired over 2 seeds, each the mean of 2 contexts; seed(s) 2 left out (no pair in every "
                           "kept context)")
    # the ANOVA runs on the seeds with a value in every cell, and says which it left out
    assert comp.anova_notes["val_loss"] == ("seed(s) 2 left out: no value in every cell (AnovaRM needs every seed in "
                                            "every cell)")
    assert (terms["val_loss", "norm"]["den_df"], terms["val_loss", "optimizer.lr"]["den_df"]) == (1, 2)
    a13, b13 = _seed_means(values, "rmsnorm", "layernorm", GRID_LRS, (1, 3))
    assert terms["val_loss", "norm"]["F"] == pytest.approx(stats.ttest_rel(a13, b13).statistic ** 2, rel=1e-8)


def test_a_missing_cell_skips_the_anova_and_narrows_the_matched_contexts(tmp_path):
    failed = tuple(("rmsnorm", "0.004", s) for s in SEEDS) + (("layernorm", "0.002", 2),)
    comp, effects, terms = _analyse(write_factorial_sweep(tmp_path, factorial_values(UNIFORM), skip=failed))
    assert not terms and comp.anova_notes["val_loss"] == (
        "no completed run with a value of this metric in 1 cell(s) (norm=rmsnorm, optimizer.lr=0.004)")
    rms = effects["val_loss", "norm=rmsnorm"]  # lr 0.002 loses seed 2, lr 0.004 every rmsnorm seed
    assert (rms["n_a"], rms["n_contexts"], rms["grid_contexts"]) == (2, 2, 3)
    assert rms["note"] == ("paired over 2 seeds, each the mean of 2 contexts; seed(s) 2 left out (no pair in every "
                           "kept context)")
    # the context that gave no pair is on the row's warning
    assert "arm norm=rmsnorm, optimizer.lr=0.004: seed 1 failed, seed 2 failed, seed 3 failed" in rms["warning"]
    values = factorial_values(UNIFORM)
    a, b = _seed_means(values, "rmsnorm", "layernorm", ("0.001", "0.002"), (1, 3))
    assert rms["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, abs=TOL)
    assert rms["diff"] == pytest.approx(np.mean(np.subtract(a, b)), abs=TOL)
    lr4 = effects["val_loss", "optimizer.lr=0.004"]
    assert (lr4["n_a"], lr4["n_contexts"]) == (3, 1) and "Read in 1 of 2 contexts only." in verdict(lr4, comp.alpha)
    assert np.isnan(rms["interaction_p_holm"]) and "depends" not in verdict(rms, comp.alpha)


def test_fewer_than_two_complete_seeds_skip_the_anova(tmp_path):
    """Every sweep seed of one cell failed and a hand-written rerun filled it with a seed no other cell has: no seed
    has a value in every cell, so no term can be tested against its interaction with the seed."""
    values = factorial_values(UNIFORM)
    failed = tuple(("rmsnorm", "0.004", s) for s in SEEDS)
    root = write_factorial_sweep(tmp_path, values, skip=failed)
    write_run(root / "rerun" / "0", "4e-3", 7, "completed", 3.05, extra=("norm=rmsnorm",))
    comp, effects, terms = _analyse(root)
    assert not terms and comp.anova_notes["val_loss"] == (
        "0 of 4 seeds have a value in every cell; the split-plot ANOVA needs 2 (each term is tested against its "
        "interaction with the seed)")
    lr4 = effects["val_loss", "optimizer.lr=0.004"]  # seed 7 has no twin at lr 0.001: layernorm's 3 seeds only
    assert (lr4["n_a"], lr4["n_contexts"], lr4["seeds_a"]) == (3, 1, "1 2 3")


def test_a_partial_baseline_takes_the_other_keys_first_values(tmp_path):
    """`make report BASELINE=norm=rmsnorm` on a norm x lr grid (the README's example) names one arm: the other keys at
    their first value."""
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
        anova_rows = list(csv.DictReader(f))
    assert list(anova_rows[0]) == ANOVA_COLUMNS
    norm = next(r for r in anova_rows if r["metric"] == "val_loss" and r["term"] == "norm")
    assert (float(norm["df"]), float(norm["den_df"]), norm["error_term"]) == (1, 2, "norm × seed")
    report = json.loads((out / "report.json").read_text())
    assert len(report["main_effects"]) == len(rows) and report["anova"] and "val_loss" not in report["anova_notes"]
    assert report["anova_notes"]["peak_mem_mb"].startswith("no residual variance")  # 500 MB in every run
    md = (out / "report.md").read_text()
    assert "## Main effects over the grid (`norm`, `optimizer.lr` crossed)" in md
    assert "| `norm=rmsnorm` vs `layernorm` | 3 | 3 |" in md and "`norm × optimizer.lr` F = " in md
    assert METHOD_NOTE in md
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


def test_interaction_terms_are_matched_by_whole_key_and_holm_adjusted():
    terms = [{"term": "norm.eps", "p": 0.5}, {"term": "norm × optimizer.lr", "p": 0.04},
             {"term": "norm.eps × optimizer.lr", "p": 0.001}, {"term": "norm × norm.eps", "p": 0.03},
             {"term": "norm × norm.eps × optimizer.lr", "p": 0.2}, {"term": "residual", "p": math.nan}]
    holm = multipletests([0.04, 0.03, 0.2], method="holm")[1]  # the three terms that hold `norm`
    assert strongest_interaction(terms, "norm") == ("norm × norm.eps", pytest.approx(holm[1]))
    assert strongest_interaction(terms, "norm.eps")[0] == "norm.eps × optimizer.lr"
    assert strongest_interaction(terms[:1], "norm") == ("", pytest.approx(math.nan, nan_ok=True))


def test_null_grids_call_the_main_effect_significant_at_rate_alpha(batch):
    """2 x 4 grids, 3 seeds, no norm main effect, a seed x norm effect as large as the run noise: the seed-level test
    rejects in about alpha of the grids (each seed's mean difference is one normal draw, so its p is uniform)."""
    rate = float(np.mean(batch.p_seed < 0.05))
    assert len(batch.p_seed) == N_GRIDS >= 200 and 0.02 <= rate <= 0.07, rate
    assert stats.kstest(batch.p_seed, "uniform").pvalue > 0.01


def test_pooling_the_context_seed_pairs_fails_the_same_null_grids(batch):
    """The pooled paired t-test over the 12 (lr, seed) pairs (11 df from 3 seeds) on the same grids: the seed x norm
    effect is shared by a seed's 4 pairs, so the test calls the null effect significant far above alpha."""
    rate = float(np.mean(batch.p_pooled < 0.05))
    assert rate > 0.15, rate
    assert stats.kstest(batch.p_pooled, "uniform").pvalue < 1e-6


def test_the_null_rate_path_is_the_report_path(batch, tmp_path):
    """Grids of the batch written to results.json and run through collect_sweep -> compare_sweep -> add_factorial give
    the p the rate tests count; the split-plot F of the two-level norm term is the seed-level t squared; the report
    files carry the seed-level row."""
    for i in range(8):
        set_grid_values(batch.jobs, batch.values[i])
        comp, effects, terms = _analyse(batch.root)
        rms = effects["val_loss", "norm=rmsnorm"]
        assert rms["p"] == pytest.approx(batch.p_seed[i], abs=1e-12) and (rms["n_a"], rms["df"]) == (3, 2)
        norm = terms["val_loss", "norm"]
        assert (norm["df"], norm["den_df"]) == (1, 2) and norm["p"] == pytest.approx(rms["p"], rel=1e-8)
    assert rms["note"] == "paired over 3 seeds, each the mean of 4 contexts"
    out, _, comp = write_report(batch.root, tmp_path / "rep", plots=False)
    with (out / "main_effects.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["metric"] == "val_loss" and r["arm"] == "norm=rmsnorm")
    assert (row["n_a"], row["n_contexts"], row["grid_contexts"]) == ("3", "4", "4")
    assert float(row["p"]) == pytest.approx(batch.p_seed[7], rel=1e-6)
