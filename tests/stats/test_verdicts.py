"""Report verdicts a reviewer would sign: MDE in metric units, TOST, simultaneous CIs and the two families against
scipy / statsmodels; verdict wording; a declared primary metric; compute columns; descriptive-only timings and
val_ppl; declared targets; MoE balance and loss-at-length metrics (synthetic sweeps from tests/synthetic.py)."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from kimi_lab.stats import collect_sweep, compare_samples, compare_sweep
from kimi_lab.stats.descriptive import TIMING_NOTE
from kimi_lab.stats.families import fill_tost
from kimi_lab.stats.metrics import TIMING_METRICS
from kimi_lab.stats.report import main as report_main
from kimi_lab.stats.report import verdict, write_report
from kimi_lab.stats.verdicts import fmt
from tests.synthetic import study_values, write_study_sweep

TOL = 1e-10
DIRECTION = re.compile(r"\b(lowers|raises|better|worse)\b")
EFFECTS = {"0.001": 0.0, "0.002": -0.1, "0.004": 0.0, "0.0005": 0.03}  # baseline, better, equivalent, unclear
NOISE = {"0.001": 0.003, "0.002": 0.003, "0.004": 0.003, "0.0005": 0.05}


@pytest.fixture
def study(tmp_path):
    """6 shared seeds: lr 0.002 lowers val loss by 0.1, 0.004 changes nothing (low noise), 0.0005 is noisy."""
    values = study_values(EFFECTS, noise=NOISE)
    return write_study_sweep(tmp_path, values), values


def _arm(values, lr):
    return np.array([values[lr, s] for s in range(1, 7)])


def _rows(comp, metric):
    return {r["arm"]: r for r in comp.rows if r["metric"] == metric}


# ---------------------------------------------------------------- numbers against scipy / statsmodels


def test_mde_in_metric_units_is_statsmodels_solve_power_times_the_sd():
    rng = np.random.default_rng(3)
    seed = rng.normal(0, 0.1, 5)
    a, b = seed + 0.03 + rng.normal(0, 0.01, 5), seed + rng.normal(0, 0.01, 5)
    paired = compare_samples(dict(enumerate(a)), dict(enumerate(b)))
    sd = (a - b).std(ddof=1)
    assert paired["sd_diff"] == pytest.approx(sd, abs=TOL) and paired["se"] == pytest.approx(sd / math.sqrt(5))
    d_mde = TTestPower().solve_power(effect_size=None, nobs=5, alpha=0.05, power=0.8)
    assert paired["mde"] == pytest.approx(d_mde * sd, rel=1e-8)
    welch = compare_samples(dict(enumerate(a)), dict(enumerate(b, start=10)))  # seeds differ
    pooled = math.sqrt((4 * a.var(ddof=1) + 4 * b.var(ddof=1)) / 8)
    d_ind = TTestIndPower().solve_power(effect_size=None, nobs1=5, alpha=0.05, power=0.8, ratio=1.0)
    assert welch["test"] == "welch" and welch["mde"] == pytest.approx(d_ind * pooled, rel=1e-8)
    assert math.isnan(welch["sd_diff"]) and welch["sd_pooled"] == pytest.approx(pooled, abs=TOL)


def test_confirmatory_power_uses_alpha_over_m_and_exploratory_the_unadjusted_alpha(study):
    root, values = study
    comp = compare_sweep(collect_sweep(root))
    val, test = _rows(comp, "val_loss"), _rows(comp, "test_loss")
    assert comp.families["confirmatory"]["m"] == 3 and comp.families["confirmatory"]["per_test_alpha"] == 0.05 / 3
    row = val["optimizer.lr=0.0005"]
    sd = (_arm(values, "0.0005") - _arm(values, "0.001")).std(ddof=1)
    d_mde = TTestPower().solve_power(effect_size=None, nobs=6, alpha=0.05 / 3, power=0.8)
    assert row["mde_alpha"] == pytest.approx(0.05 / 3) and row["mde"] == pytest.approx(d_mde * sd, rel=1e-8)
    assert row["power"] == pytest.approx(TTestPower().power(row["d_z"], nobs=6, alpha=0.05 / 3), rel=1e-8)
    other = test["optimizer.lr=0.0005"]  # same differences (test loss = val loss + 0.01), exploratory: alpha
    d_expl = TTestPower().solve_power(effect_size=None, nobs=6, alpha=0.05, power=0.8)
    assert other["mde_alpha"] == 0.05 and other["mde"] == pytest.approx(d_expl * sd, rel=1e-6)
    assert other["mde"] < row["mde"]


def test_simultaneous_ci_is_the_scipy_t_interval_at_alpha_over_m(study):
    root, values = study
    comp = compare_sweep(collect_sweep(root))
    base = _arm(values, "0.001")
    for lr, row in ((lr, _rows(comp, "val_loss")[f"optimizer.lr={lr}"]) for lr in ("0.002", "0.004", "0.0005")):
        ref = stats.ttest_rel(_arm(values, lr), base)
        wide, narrow = ref.confidence_interval(1 - 0.05 / 3), ref.confidence_interval(0.95)
        assert (row["ci_low_simultaneous"], row["ci_high_simultaneous"]) == pytest.approx((wide.low, wide.high),
                                                                                          abs=1e-12)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((narrow.low, narrow.high), abs=1e-12)
        assert row["ci_low_simultaneous"] < row["ci_low"] < row["ci_high"] < row["ci_high_simultaneous"]
    assert all(math.isnan(r["ci_low_simultaneous"]) for r in comp.rows if r["family"] == "exploratory")


def test_welch_simultaneous_ci_matches_ttest_ind(tmp_path):
    values = study_values({"0.001": 0.0, "0.002": -0.05}, seeds=(1, 2, 3, 4))
    values.pop(("0.002", 4))  # seeds differ: Welch
    comp = compare_sweep(collect_sweep(write_study_sweep(tmp_path, values)))
    row = _rows(comp, "val_loss")["optimizer.lr=0.002"]
    a = np.array([values["0.002", s] for s in (1, 2, 3)])
    b = np.array([values["0.001", s] for s in (1, 2, 3, 4)])
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(1 - 0.05 / 1)  # m = 1
    assert row["test"] == "welch" and (row["ci_low_simultaneous"], row["ci_high_simultaneous"]) == pytest.approx(
        (ci.low, ci.high), abs=1e-12)


def test_tost_matches_statsmodels_and_two_one_sided_scipy_tests():
    rng = np.random.default_rng(5)
    seed = rng.normal(0, 0.05, 6)
    a, b, sesoi = seed + 0.004 + rng.normal(0, 0.004, 6), seed + rng.normal(0, 0.004, 6), 0.02
    paired = compare_samples(dict(enumerate(a)), dict(enumerate(b)), sesoi=sesoi)
    d = a - b
    scipy_p = max(stats.ttest_1samp(d, -sesoi, alternative="greater").pvalue,
                  stats.ttest_1samp(d, sesoi, alternative="less").pvalue)
    assert paired["p_tost"] == pytest.approx(ttost_paired(a, b, -sesoi, sesoi)[0], abs=TOL)
    assert paired["p_tost"] == pytest.approx(scipy_p, abs=TOL) and paired["p_tost"] < 0.01
    welch = compare_samples(dict(enumerate(a)), dict(enumerate(b, start=10)), sesoi=sesoi)
    scipy_welch = max(stats.ttest_ind(a + sesoi, b, equal_var=False, alternative="greater").pvalue,
                      stats.ttest_ind(a - sesoi, b, equal_var=False, alternative="less").pvalue)
    assert welch["p_tost"] == pytest.approx(ttost_ind(a, b, -sesoi, sesoi, usevar="unequal")[0], abs=TOL)
    assert welch["p_tost"] == pytest.approx(scipy_welch, abs=TOL)
    for row in (paired, welch):  # a row that brings only its summary (a main effect) gets the same p
        bare = {**row, "p_tost": math.nan, "sesoi": math.nan}
        fill_tost(bare, sesoi)
        assert bare["p_tost"] == pytest.approx(row["p_tost"], abs=1e-12)


def test_families_are_holm_over_the_primary_and_bh_over_every_other_metric(study):
    root, _ = study
    comp = compare_sweep(collect_sweep(root))
    confirmatory = [r for r in comp.rows if r["family"] == "confirmatory"]
    exploratory = [r for r in comp.rows if r["family"] == "exploratory"]
    assert {r["metric"] for r in confirmatory} == {"val_loss"} and len(confirmatory) == 3
    assert {r["metric"] for r in exploratory} >= {"test_loss", "val_acc", "peak_mem_mb"}
    holm = multipletests([r["p"] for r in confirmatory], method="holm")[1]
    assert [r["p_holm"] for r in confirmatory] == pytest.approx(list(holm), abs=TOL)
    assert [r["p_family"] for r in confirmatory] == pytest.approx(list(holm), abs=TOL)
    tested = [r for r in exploratory if math.isfinite(r["p"])]
    bh = multipletests([r["p"] for r in tested], method="fdr_bh")[1]  # one family across metrics, not per metric
    assert len({r["metric"] for r in tested}) >= 2
    assert [r["p_family"] for r in tested] == pytest.approx(list(bh), abs=TOL)
    tost = multipletests([r["p_tost"] for r in confirmatory], method="holm")[1]
    assert [r["p_tost_family"] for r in confirmatory] == pytest.approx(list(tost), abs=TOL)
    assert all(math.isnan(r["p_tost"]) for r in exploratory)  # no SESOI declared for them


# ---------------------------------------------------------------- verdicts and their words


def test_verdicts_and_direction_words_only_on_significant_rows(study):
    root, _ = study
    comp = compare_sweep(collect_sweep(root))
    val = _rows(comp, "val_loss")
    labels = {arm: r["verdict"] for arm, r in val.items()}
    assert labels == {"optimizer.lr=0.002": "better", "optimizer.lr=0.004": "equivalent",
                      "optimizer.lr=0.0005": "inconclusive"}
    better = verdict(val["optimizer.lr=0.002"], comp.alpha)
    assert better.startswith("optimizer.lr=0.002 lowers val loss by 0.103 nats [")
    assert ": better (confirmatory" in better
    equivalent = verdict(val["optimizer.lr=0.004"], comp.alpha)
    assert "equivalent within ±0.02 nats" in equivalent and not DIRECTION.search(equivalent)
    row = val["optimizer.lr=0.0005"]
    unclear = verdict(row, comp.alpha)
    bound = max(abs(row["ci_low_simultaneous"]), abs(row["ci_high_simultaneous"]))
    assert f"Effects larger than {fmt(bound)} nats are excluded (simultaneous CI)" in unclear
    assert not DIRECTION.search(unclear) and ": inconclusive (confirmatory" in unclear
    for r in comp.rows:  # every row, every metric: a direction word only with a better/worse verdict
        assert bool(DIRECTION.search(verdict(r, comp.alpha))) == (r["verdict"] in ("better", "worse")), r
    exploratory = verdict(_rows(comp, "test_loss")["optimizer.lr=0.0005"], comp.alpha)
    assert "(exploratory" in exploratory and "(CI, unadjusted)" in exploratory


def test_a_constant_difference_is_untested_and_worded_without_a_direction(tmp_path):
    values = {(lr, s): 3.0 + 0.01 * s + (0.05 if lr == "0.002" else 0.0) for lr in ("0.001", "0.002")
              for s in (1, 2, 3)}
    comp = compare_sweep(collect_sweep(write_study_sweep(tmp_path, values)))
    row = _rows(comp, "val_loss")["optimizer.lr=0.002"]
    text = verdict(row, comp.alpha)
    assert row["verdict"] == "inconclusive" and math.isnan(row["p"]) and not DIRECTION.search(text)
    assert "val loss difference +0.05 nats; no variance across seeds" in text


# ---------------------------------------------------------------- what is and is not tested


def test_timings_and_val_ppl_are_described_never_tested(sweep_dir, tmp_path):
    out, _, comp = write_report(sweep_dir, tmp_path / "rep", plots=False)
    tested = {r["metric"] for r in comp.rows}
    assert not tested & {*TIMING_METRICS, "val_ppl"} and "val_loss" in tested
    assert {"val_ppl", "tokens_per_s"} <= {s["metric"] for s in comp.summaries}
    timing = {(t["metric"], t["arm"]): t for t in comp.timing}
    assert timing["tokens_per_s", "optimizer.lr=0.001"]["median"] == 1002.0  # 1000 + seed, seeds 1..3
    assert timing["train_time_s", "optimizer.lr=0.004"]["median"] == pytest.approx(12.0)  # seeds 1 and 3
    assert set(timing["tokens_per_s", "optimizer.lr=0.001"]) == {"metric", "arm", "n", "median", "min", "max",
                                                                 "median_ratio"}
    md = (out / "report.md").read_text()
    assert TIMING_NOTE in md and "### val_ppl (exp of val_loss" in md and "### tokens_per_s" not in md
    report = json.loads((out / "report.json").read_text())
    assert {t["metric"] for t in report["timing"]} == {"tokens_per_s", "train_time_s"}
    with (out / "comparisons.csv").open() as f:
        assert not {r["metric"] for r in csv.DictReader(f)} & {*TIMING_METRICS, "val_ppl"}


def test_tokens_to_target_only_for_a_declared_target(sweep_dir, tmp_path, capsys):
    out, _, comp = write_report(sweep_dir, tmp_path / "none", plots=False)
    names = {r["metric"] for r in comp.rows + comp.summaries + comp.timing}
    assert not names & {"tokens_to_target", "train_time_to_target_s"} and math.isnan(comp.target_loss)
    assert "target: none declared (no tokens_to_target)" in (out / "report.md").read_text()
    assert report_main([str(sweep_dir), "--out", str(tmp_path / "cli"), "--target", "val_loss=3.1", "--no-plots"]) == 0
    report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert report["target_loss"] == 3.1 and report["settings"]["source"]["target"] == "--target"
    assert "tokens_to_target" in {r["metric"] for r in report["comparisons"]}
    assert report_main([str(sweep_dir), "--target", "test_loss=3", "--no-plots"]) == 2
    assert "--target: 'test_loss' has no curve in metrics.csv; allowed: val_loss" in capsys.readouterr().err
    for path in sweep_dir.rglob("results.json"):  # a study may declare targets the report has no curve for
        results = json.loads(path.read_text())
        path.write_text(json.dumps(results | {"report": {"target": {"val_loss": 3.1, "val_loss@1024": 3.5}}}))
    comp = compare_sweep(collect_sweep(sweep_dir))
    assert comp.settings.target == {"val_loss": 3.1} and comp.settings.source["target"] == "results.json"
    assert "report.target declares val_loss@1024" in comp.warnings[0]
    assert "tokens_to_target" in {r["metric"] for r in comp.rows}


@pytest.mark.parametrize("flag, message", [
    (["--primary", "val_ppl"], "--primary: val_ppl is a transform of val_loss and is not tested; use val_loss"),
    (["--primary", "tokens_per_s"], "--primary: tokens_per_s is a timing metric"),
    (["--primary", "val_los"], "--primary: unknown metric 'val_los'; allowed: val_loss, val_acc"),
    (["--sesoi", "val_loss"], "--sesoi 'val_loss': expected METRIC=NUMBER, e.g. --sesoi val_loss=0.02"),
    (["--sesoi", "val_loss=0"], "--sesoi: val_loss=0.0; allowed: a positive number"),
    (["--alpha", "1.5"], "--alpha 1.5; allowed: 0 < alpha < 1"),
])
def test_bad_report_flags_fail_with_one_line(flag, message, sweep_dir, capsys):
    assert report_main([str(sweep_dir), "--no-plots", *flag]) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- the declared primary metric


def test_primary_metric_from_results_json_and_the_cli_override(study, tmp_path):
    root, _ = study
    for path in root.glob("*/results.json"):
        results = json.loads(path.read_text())
        path.write_text(json.dumps(results | {"report": {"primary_metric": "val_acc", "sesoi": {"val_acc": 0.002}}}))
    comp = compare_sweep(collect_sweep(root))
    assert comp.settings.primary_metric == "val_acc" and comp.settings.source["primary_metric"] == "results.json"
    assert {r["metric"] for r in comp.rows if r["family"] == "confirmatory"} == {"val_acc"}
    assert comp.settings.sesoi == {"val_acc": 0.002} and math.isnan(_rows(comp, "val_loss")["optimizer.lr=0.004"]
                                                                    ["p_tost"])
    out, _, comp = write_report(root, tmp_path / "rep", plots=False, primary="test_loss",
                                sesoi={"test_loss": 0.02})
    assert {r["metric"] for r in comp.rows if r["family"] == "confirmatory"} == {"test_loss"}
    assert _rows(comp, "val_loss")["optimizer.lr=0.002"]["family"] == "exploratory"
    md = (out / "report.md").read_text()
    assert "## Summary: test_loss (confirmatory), nats" in md and "- primary metric: `test_loss` (--primary)" in md
    assert md.index("## Summary") < md.index("## Jobs not counted") < md.index("## Noise floor")
    assert "### val_loss (lower is better; exploratory;" in md


def test_summary_table_opens_the_report_and_pipeline_check_titles(study, tmp_path):
    root, _ = study
    out, _, comp = write_report(root, tmp_path / "rep", plots=False)
    md = (out / "report.md").read_text()
    mde = max(r["mde"] for r in comp.rows if r["family"] == "confirmatory")
    assert mde > 0.05 and md.startswith(f"# Report: study — pipeline check (MDE {fmt(mde)} nats)\n")
    row = _rows(comp, "val_loss")["optimizer.lr=0.002"]
    assert (f"| `optimizer.lr=0.002` | 6 | {fmt(row['mean_a'], 4)} ± {fmt(row['sd_a'], 2)} | {fmt(row['diff'])} "
            f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}] | [{fmt(row['ci_low_simultaneous'])}, "
            f"{fmt(row['ci_high_simultaneous'])}] | **better** |") in md
    quiet = study_values({"0.001": 0.0, "0.002": -0.1}, noise=0.003)  # MDE well below 0.05 nats
    out, _, _ = write_report(write_study_sweep(tmp_path, quiet, name="quiet"), tmp_path / "quiet", plots=False)
    assert (out / "report.md").read_text().startswith("# Report: quiet\n")
    report = json.loads((out / "report.json").read_text())
    assert report["title"] == "" and report["primary_mde"] < 0.05


# ---------------------------------------------------------------- compute, MoE balance, loss at length


def test_compute_columns_ratios_and_warnings(tmp_path):
    values = study_values({"0.001": 0.0, "0.002": -0.05}, seeds=(1, 2, 3))
    fields = {(lr, s): {"params_active": 1_000_000, "flops_per_token": 6e6 * (1.18 if lr == "0.002" else 1.0),
                        "tokens_seen": 1e6 * (1.02 if lr == "0.002" else 1.0), "epochs": 1.5}
              for lr, s in values}
    out, _, comp = write_report(write_study_sweep(tmp_path, values, fields), tmp_path / "rep", plots=False)
    row = _rows(comp, "val_loss")["optimizer.lr=0.002"]
    assert (row["params_active"], row["flops_per_token"], row["tokens_seen"]) == pytest.approx((1e6, 7.08e6, 1.02e6))
    assert (row["flops_per_token_ratio"], row["tokens_seen_ratio"], row["epochs"]) == pytest.approx((1.18, 1.02, 1.5))
    flops = ("arm optimizer.lr=0.002: FLOPs/token 1.18 x the baseline's: not compute-matched (more than 5% apart), "
             "so its differences mix the recipe with the compute")
    assert flops in row["warning"] and "tokens 1.02" not in row["warning"]
    report = json.loads((out / "report.json").read_text())
    assert flops in report["warnings"] and any(w.startswith("the arms saw repeated data") for w in report["warnings"])
    assert report["arms"][1]["flops_per_token_ratio"] == pytest.approx(1.18)
    with (out / "comparisons.csv").open() as f:
        first = next(csv.DictReader(f))
    assert float(first["flops_per_token_ratio"]) == pytest.approx(1.18) and first["verdict"] and first["mde"]
    md = (out / "report.md").read_text()
    assert "| `optimizer.lr=0.002` | 3 | 3 | 0 | 0 | 1 2 3 |" in md and "7.08M (1.18×)" in md


def test_moe_balance_and_loss_at_length_metrics(tmp_path):
    values = study_values({"0.001": 0.0, "0.002": -0.05}, seeds=(1, 2, 3))
    fields = {(lr, s): {"moe_maxvio_val": 0.5 + 0.1 * s, "moe_maxvio_batch_late": [0.3, 0.5],
                        "moe_maxvio_batch_mean": 9.0,
                        "val_loss_at_len": {"256": v + 0.1, "1024": v + 0.3 + (0.02 * s if lr == "0.002" else 0)}}
              for (lr, s), v in values.items()}
    fields["0.001", 3].pop("val_loss_at_len")  # a run without the length evaluation simply lacks the metric
    root = write_study_sweep(tmp_path, values, fields)
    comp = compare_sweep(collect_sweep(root), primary="val_loss@1024")
    tested = {r["metric"] for r in comp.rows}
    assert {"moe_maxvio_val", "moe_maxvio_batch_late", "val_loss@256", "val_loss@1024"} <= tested
    assert "moe_maxvio_batch_mean" not in tested
    assert _rows(comp, "moe_maxvio_batch_late")["optimizer.lr=0.002"]["mean_a"] == pytest.approx(0.4)
    at_1024 = _rows(comp, "val_loss@1024")["optimizer.lr=0.002"]
    assert at_1024["family"] == "confirmatory" and _rows(comp, "val_loss")["optimizer.lr=0.002"]["family"] == \
        "exploratory"
    a = [values["0.002", s] + 0.3 + 0.02 * s for s in (1, 2, 3)]
    b = [values["0.001", s] + 0.3 for s in (1, 2)]
    assert at_1024["test"] == "welch" and at_1024["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert comp.censored["val_loss@1024"] == ["2"]
    absent = compare_sweep(collect_sweep(root), primary="val_loss@2048")  # declared, but no run evaluated 2048
    assert not any(r["family"] == "confirmatory" for r in absent.rows)
    assert "no completed run records the primary metric val_loss@2048" in absent.warnings[-1]
    assert verdict(at_1024, comp.alpha).startswith("optimizer.lr=0.002 ")
    assert "val loss at length 1024" in verdict(at_1024, comp.alpha)


# ---------------------------------------------------------------- declarations and files


def test_declarations_that_disagree_and_reused_tuning_seeds_are_warned(study):
    root, _ = study
    for path in sorted(root.glob("*/results.json")):
        results = json.loads(path.read_text())
        block = {"primary_metric": "val_loss", "tuning_seeds": [5, 6, 7], "tuning_sweep": "multirun/tune"}
        if path.parent.name == "0":
            block["primary_metric"] = "test_loss"
        path.write_text(json.dumps(results | {"report": block}))
    comp = compare_sweep(collect_sweep(root))
    assert comp.settings.primary_metric == "val_loss"  # 23 jobs declare it, job 0 another
    assert comp.warnings[0].startswith("jobs declare different `report` blocks in results.json: read the one of 23")
    assert comp.warnings[1].startswith("seed(s) 5, 6 of this sweep were also tuning seeds (report.tuning_seeds, "
                                       "tuned on multirun/tune)")


def test_report_json_and_tex_carry_families_verdicts_and_mde(study, tmp_path):
    root, _ = study
    out, _, comp = write_report(root, tmp_path / "rep", plots=False)
    report = json.loads((out / "report.json").read_text())
    row = report["comparisons"][0]
    assert {"family", "verdict", "mde", "mde_alpha", "ci_low_simultaneous", "p_tost", "p_family"} <= set(row)
    assert report["settings"]["primary_metric"] == "val_loss" and report["families"]["confirmatory"]["m"] == 3
    assert report["noise_floor"][0] == {**report["noise_floor"][0], "metric": "val_loss", "arm": "optimizer.lr=0.001",
                                        "test": "baseline"}
    tex = (out / "report.tex").read_text()
    assert r"val\_loss & optimizer.lr=0.002 & confirmatory & " in tex and r"test\_loss & optimizer.lr=0.002 & " \
        r"exploratory & " in tex and "better" in tex
    md = (out / "report.md").read_text()
    assert "## Noise floor" in md and "| `optimizer.lr=0.0005` | 6 |" in md
