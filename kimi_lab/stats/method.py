"""The Method section of report.md: how every number of the report was computed, at the report's alpha."""

from __future__ import annotations

from kimi_lab.stats import factorial
from kimi_lab.stats.compare import Comparison
from kimi_lab.stats.descriptive import COMPUTE_RTOL, TIMING_NOTE
from kimi_lab.stats.metrics import LOSS_SPIKE_REL, SPIKE_WINDOW, TIMING_METRICS

FACTORIAL_NOTE = (  # factorial.METHOD_NOTE, when that module states its own method, replaces it
    "- Factorial sweeps (two or more swept keys; `main_effects.csv`): the unit of inference is the seed, since the "
    "cells of one seed share its initialisation and data order. A main effect of `key=level` averages each seed's "
    "runs over the contexts (the other keys' levels) of a complete seeds x contexts block, at the level and at the "
    "baseline level, and runs the paired t-test on those per-seed means (n = seeds): the block means of a "
    "randomised complete block design, whose error is the seed x level interaction (Montgomery, Design and Analysis "
    "of Experiments, ch. 14). The primary metric's main effects are a confirmatory family (Holm), every other "
    "metric's one exploratory family (BH), with power, MDE, simultaneous CIs and TOST as for the arm rows. ANOVA: "
    "split-plot (repeated measures, `statsmodels` `AnovaRM`, the seed as the subject), each term tested against its "
    "own interaction with the seed; a main effect's `interaction p_holm` is the smallest Holm-adjusted p of the "
    "interaction terms holding its key. Skipped, with the reason, when fewer than 2 seeds have a value in every cell "
    "or nothing varies.")


def method_notes(comp: Comparison) -> list[str]:
    level, alpha = f"{100 * (1 - comp.alpha):.4g}", comp.alpha
    primary = comp.settings.primary_metric
    return [
        "- One run = one seed; metrics are final values (never the best step of a run). Steps of one run are never "
        "treated as samples.",
        "- Arms share seeds and data order is a function of the seed, so when both arms have the same seeds the test "
        "is a paired t-test (`scipy.stats.ttest_rel`); otherwise Welch's t-test (`ttest_ind(equal_var=False)`). "
        f"CI: {level} % t-interval of the difference from the same test.",
        "- d: Cohen's d_s = difference / pooled SD; g: Hedges' g = J(ν) d_s with the exact J and ν = n_a + n_b − 2. "
        "Both are the between-arm standardised difference on every row, paired rows included; d_z = mean / SD of the "
        "per-seed differences (paired rows only) is the paired test's own effect size (t = d_z √n).",
        f"- Families: the declared primary metric (`{primary}`, results.json `report.primary_metric` or `--primary`) "
        "x the arms is the confirmatory family, Holm-corrected (`multipletests(method=\"holm\")`); the rows of every "
        "other tested metric form one exploratory family, Benjamini-Hochberg over all of them (`method=\"fdr_bh\"`), "
        "labelled exploratory in every file: leads for the next study, not findings. `p_bonferroni`, `p_holm`, "
        "`p_fdr_bh` are computed within the row's family; `p_family` is the one its verdict reads. val_ppl (exp of "
        "val_loss) is summarised, never tested a second time; timings are described, never tested.",
        f"- Simultaneous CIs (confirmatory rows): Bonferroni, level 1 − {alpha}/m with m the family's tested rows "
        "(`scipy.stats.t.interval` on the row's difference, SE and df): all of them cover their true differences "
        f"together with probability >= {level} %. Exploratory rows keep the unadjusted CI only (BH controls the false "
        "discovery rate, not coverage).",
        "- Equivalence: two one-sided t-tests (TOST) against the smallest effect size of interest (SESOI, metric "
        "units; results.json `report.sesoi`, `--sesoi METRIC=VALUE`): `statsmodels` `ttost_paired` on paired rows, "
        "`ttost_ind(usevar=\"unequal\")` on Welch rows; the TOST p-values of a family are adjusted like its tests "
        "(Holm / BH). Metrics without a SESOI get no TOST.",
        f"- Verdict: `better` / `worse` when the family-adjusted p < {alpha}; `equivalent` when the family-adjusted "
        f"TOST p < {alpha}; otherwise `inconclusive`. Only a significant row is worded with a direction (lowers, "
        "raises, better, worse); an inconclusive row states the largest effect its interval leaves (the simultaneous "
        "CI on confirmatory rows, the unadjusted CI on exploratory ones). Not significant is not equal.",
        "- Power, MDE, n for 80 %: two-sided, 80 % power, `statsmodels` `TTestPower` on n pairs (effect size d_z) for "
        "paired rows, `TTestIndPower` on n_a vs n_b (d_s) for Welch rows, at the per-test level `mde_alpha`: "
        f"{alpha}/m in the confirmatory family (Bonferroni, the level of Holm's first step, so the MDE is "
        f"conservative for Holm), the unadjusted {alpha} in the exploratory family (BH's largest threshold, so its "
        "MDE is optimistic). MDE in the metric's units (`mde`) = `mde_d` x the SD of the paired differences (paired "
        "rows) or x the pooled SD (Welch rows); the noise floor lists those SDs. `power` is post-hoc power at the "
        "observed effect, a function of p: read the CI and the MDE. A primary-metric MDE above `report.mde_goal` "
        f"({comp.settings.mde_goal:g}) makes the report a pipeline check (its title says so).",
        "- Compute: `params_active`, `flops_per_token`, `tokens_seen` and `epochs` are arm means from results.json; "
        f"every arm row carries them and their ratio to the baseline; FLOPs/token or tokens more than "
        f"{COMPUTE_RTOL:.0%} from the baseline's are a warning (the arms are not compute-matched), and so is more than "
        "one epoch (repeated data).",
        f"- Timing ({', '.join(TIMING_METRICS)}): median and min..max per arm, {TIMING_NOTE}; the seed does not set a "
        "timing and a sweep's jobs run in blocks, so they are never tested.",
        "- Diverged runs (status `diverged`, or recorded completed with a non-finite final val/test loss or a "
        "non-finite train loss in metrics.csv) are in no mean; they are listed under jobs not counted, counted per "
        "arm, and every comparison of their arm carries a warning: dropping them flatters an unstable arm. So do "
        "diverged seeds re-run until they completed, seeds lost otherwise (failed, killed, missing), and completed "
        "runs without a value of the row's metric (time to target: never reached it, so that comparison is "
        "conditional on reaching it).",
        "- Jobs whose results.json records a different `data_manifest_key` (data) or `git_commit` (code) are named in "
        "the warnings.",
        getattr(factorial, "METHOD_NOTE", FACTORIAL_NOTE),
        "- Time to target (`tokens_to_target`, `train_time_to_target_s`): only for a declared target (results.json "
        "`report.target`, `--target val_loss=X`); the first validation with val loss <= the target (resolution: one "
        f"validation interval). Loss spike: a step with train loss > {1 + LOSS_SPIKE_REL:.2f} x the median of the "
        f"previous {SPIKE_WINDOW} steps; grad-norm spike: the largest ratio of grad norm to that running median.",
        "- MoE balance (Wang et al. 2024; DeepSeek-V3): MaxVio = max_i load_i / mean load − 1, mean over MoE layers; "
        "`moe_maxvio_val` counts the loads over the fixed validation windows at the end of training, "
        "`moe_maxvio_batch_late` averages the per-batch MaxVio over the last half of training. `val_loss@<L>`: the "
        "final model's val loss on windows of L tokens (results.json `val_loss_at_len`).",
    ]
