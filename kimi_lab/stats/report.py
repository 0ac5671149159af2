"""``python -m kimi_lab.stats.report [SWEEP]``: a sweep folder -> reports/<sweep>/ (comparisons.csv, report.json,
report.md with verdicts, report.tex, PNG plots when matplotlib is installed; factorial sweeps also main_effects.csv
and anova.csv). Idempotent; diverged, failed, missing
and running jobs are listed, never dropped silently."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from kimi_lab.stats.collect import Sweep, collect_sweep, natural_key, provenance, provenance_warnings
from kimi_lab.stats.compare import ALPHA, COLUMNS, Comparison, ci_label, compare_sweep
from kimi_lab.stats.factorial import ANOVA_COLUMNS, EFFECT_COLUMNS, add_factorial
from kimi_lab.stats.metrics import LOSS_SPIKE_REL, METRICS, METRICS_BY_NAME, SPIKE_WINDOW, TIMING_METRICS

SUMMARY_METRICS = ("val_loss", "test_loss", "val_acc", "tokens_per_s")  # columns of the arms table


def fmt(x, digits: int = 3) -> str:
    """Numbers for people: 3 significant digits below 100, no exponent for large values."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0]


def fmt_p(p) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def p_is(name: str, p) -> str:
    """'p_holm = 0.02', 'p_holm < 0.001', 'p_holm n/a'."""
    text = fmt_p(p)
    return f"{name} {text}" if text.startswith("<") or text == "n/a" else f"{name} = {text}"


def _clean(value):
    """JSON-safe: NaN/inf -> null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def verdict(row: dict, alpha: float) -> str:
    """'norm=rmsnorm lowers val loss by 0.031 [0.012, 0.050] vs norm=layernorm (better), d = 2.4, p_holm = 0.02 ...',
    plus 'Warning: arm X: 1 of 3 seeds diverged ...' when either arm lost seeds to divergence. A main-effect row
    (factorial sweeps) also says over how many contexts it averages and flags an interaction of its key."""
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
    metric = METRICS_BY_NAME[row["metric"]]
    arm, base, diff = row["arm"], row["baseline"], row["diff"]
    if not math.isfinite(diff):
        return f"{arm}: no {metric.words} to compare ({row['note']})."
    if diff == 0:
        head = f"{arm} leaves {metric.words} unchanged vs {base} ({fmt(row['mean_a'])})"
    else:
        better = (diff < 0) == metric.lower_is_better
        lo, hi = (-row["ci_high"], -row["ci_low"]) if diff < 0 else (row["ci_low"], row["ci_high"])
        ci = f" [{fmt(lo)}, {fmt(hi)}]" if math.isfinite(lo) else ""
        head = (f"{arm} {'lowers' if diff < 0 else 'raises'} {metric.words} by {fmt(abs(diff))}{ci} vs {base} "
                f"({'better' if better else 'worse'})")
    if row["test"] == "none" or not math.isfinite(row["p"]):
        return f"{head}; {row['note']}."
    d, dz, paired = row["cohens_d"], row.get("d_z", math.nan), row["test"] == "paired"
    stats_part = f"d = {fmt(abs(d), 2)}, " if math.isfinite(d) else ""
    stats_part += f"d_z = {fmt(abs(dz), 2)}, " if paired and math.isfinite(dz) else ""
    stats_part += f"{p_is('p_holm', row['p_holm'])} ({row['test']} t-test)"
    mde = (f"MDE d_z >= {row['mde_d']:.2f} with {row['n_a']} pairs" if paired
           else f"MDE d >= {row['mde_d']:.2f} with n = {row['n_a']} vs {row['n_b']}")
    mde += f" at unadjusted alpha = {alpha}"  # power analysis per comparison: Holm's family would ask for more
    if row["p_holm"] < alpha:
        return f"{head}, {stats_part}: significant after Holm at alpha = {alpha}. {mde}."
    main = "factor" in row
    more, pairs, runs = "", "matched pairs" if main else "paired seeds", "runs per level" if main else "seeds per arm"
    if math.isfinite(row["n_for_80pct_power"]):
        more = (f"; about {row['n_for_80pct_power']:.0f} {pairs} would detect d_z = {fmt(abs(dz), 2)}" if paired
                else f"; about {row['n_for_80pct_power']:.0f} {runs} would detect d = {fmt(abs(d), 2)}")
    return f"{head}, {stats_part}: not significant after Holm. {mde}{more}."


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(sweep: Sweep, comp: Comparison, name: str, plots: list[Path]) -> str:
    counts = {}
    for job in sweep.jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    hardware = sorted({str(j.results.get("choices", {}).get("hardware")) for j in sweep.jobs if j.usable})
    factors = "; ".join(f"`{k}` ∈ {{{', '.join(v)}}}" for k, v in sweep.factors.items()) or "none (one arm)"
    lines = [f"# Report: {name}", "", f"- sweep: `{sweep.path}`",
             f"- jobs: {len(sweep.jobs)} ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})",
             f"- swept factors: {factors}", f"- baseline arm: `{comp.baseline}` ({comp.baseline_rule})",
             f"- target val loss for time-to-target: {fmt(comp.target_loss, 4)}",
             f"- timing metrics ({', '.join(TIMING_METRICS)}) measured on hardware: {', '.join(hardware) or 'n/a'}"]
    warnings = report_warnings(sweep)
    if warnings:
        lines += ["", f"## Warnings ({len(warnings)})", ""] + [f"- **{w}**" for w in warnings]
    problems = sweep.problems
    lines += ["", f"## Jobs not counted ({len(problems)})", ""]
    if problems:
        lines += _table(["job", "arm", "seed", "status", "reason"],
                        [[j.name, j.arm or "", str(j.seed), j.status, first_line(j.error)[:160]]
                         for j in problems])
    else:
        lines.append("None: every job the sweep defined completed.")
    summary = {(s["metric"], s["arm"]): s for s in comp.summaries}
    lines += ["", "## Arms (mean ± SD over completed seeds; diverged seeds are not in the mean)", ""]
    lines += arms_table(sweep, summary)
    lines += ["", "## Comparisons vs the baseline", ""]
    for metric in METRICS:
        if (metric.name, comp.baseline) not in summary:
            continue  # an optional metric no run has
        rows = [r for r in comp.rows if r["metric"] == metric.name]
        base = summary[metric.name, comp.baseline]
        better = "lower" if metric.lower_is_better else "higher"
        lines += [f"### {metric.name} ({better} is better; baseline {fmt(base['mean'], 4)}, n = {base['n']})", ""]
        if metric.name in comp.censored:
            reasons = "; ".join(f"{why}: {', '.join(jobs)}" for why, jobs in comp.censored_reasons[metric.name].items())
            lines += [f"No value for {len(comp.censored[metric.name])} completed run(s): {reasons}.", ""]
        ci_column = f"diff [{ci_label(comp.alpha).replace(' %', '%')}]"
        lines += _table(["arm", "n", "mean", ci_column, "test", "p", "p_holm", "p_fdr_bh", "d", "g", "d_z",
                         "power", "MDE", "n for 80%"],
                        [[f"`{r['arm']}`", str(r["n_a"]), fmt(r["mean_a"], 4),
                          f"{fmt(r['diff'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]", r["test"], fmt_p(r["p"]),
                          fmt_p(r["p_holm"]), fmt_p(r["p_fdr_bh"]), fmt(r["cohens_d"], 2), fmt(r["hedges_g"], 2),
                          fmt(r["d_z"], 2), fmt(r["power"], 2), fmt(r["mde_d"], 3), fmt(r["n_for_80pct_power"])]
                         for r in rows])
        lines += [""] + [f"- {verdict(r, comp.alpha)}" for r in rows] + [""]
    lines += main_effects_section(sweep, comp)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## Method", "", *(n.replace("95 % t-interval", f"{100 * (1 - comp.alpha):.4g} % t-interval")
                                 for n in METHOD_NOTES)]
    return "\n".join(lines) + "\n"


def main_effects_section(sweep: Sweep, comp: Comparison) -> list[str]:
    """Factorial sweeps: per metric, each key's levels vs the baseline level over the grid, and the ANOVA."""
    if not comp.main_effects:
        return []
    keys = ", ".join(f"`{k}`" for k in sweep.factors)
    lines = [f"## Main effects over the grid ({keys} crossed)", "",
             "Each level vs the baseline arm's level of its key, matched on the other keys' levels and the seed and "
             "averaged over every context (the rows above read it at the baseline corner only). ANOVA: Type II, "
             "the seed as a block.", ""]
    for metric in METRICS:
        rows = [r for r in comp.main_effects if r["metric"] == metric.name]
        if not rows:
            continue
        lines += [f"### {metric.name} ({'lower' if metric.lower_is_better else 'higher'} is better)", ""]
        ci_column = f"diff [{ci_label(comp.alpha).replace(' %', '%')}]"
        lines += _table(["level vs baseline", "pairs", "contexts", ci_column, "per-context min..max", "test",
                         "p", "p_holm", "d_z", "interaction p_holm"],
                        [[f"`{r['arm']}` vs `{r['base_level']}`", str(r["n_a"]), str(r["n_contexts"]),
                          f"{fmt(r['diff'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                          f"{fmt(r['context_min'])} .. {fmt(r['context_max'])}", r["test"], fmt_p(r["p"]),
                          fmt_p(r["p_holm"]), fmt(r["d_z"], 2), fmt_p(r["interaction_p_holm"])] for r in rows])
        terms = [t for t in comp.anova if t["metric"] == metric.name and t["term"] != "residual"]
        residual = next((t for t in comp.anova if t["metric"] == metric.name and t["term"] == "residual"), None)
        if terms:
            listed = "; ".join(f"`{t['term']}` F = {fmt(t['F'])}, {p_is('p', t['p'])}" for t in terms)
            lines += ["", f"ANOVA: {listed} (residual df {residual['df']:.0f})."]
        elif metric.name in comp.anova_notes:
            lines += ["", f"ANOVA skipped: {comp.anova_notes[metric.name]}."]
        lines += [""] + [f"- {verdict(r, comp.alpha)}" for r in rows] + [""]
    return lines


def arms_table(sweep: Sweep, summary: dict) -> list[str]:
    """Per arm: jobs, completed / diverged / failed-or-other counts, the counted seeds, mean ± SD of SUMMARY_METRICS."""
    rows = []
    for arm in sweep.arms:
        cells = [f"{fmt(summary[m, arm.label]['mean'], 4)} ± {fmt(summary[m, arm.label]['sd'], 2)}"
                 for m in SUMMARY_METRICS]
        done, diverged = len(arm.completed), len(arm.diverged)
        rows.append([f"`{arm.label}`", str(len(arm.jobs)), str(done), str(diverged),
                     str(len(arm.jobs) - done - diverged), " ".join(str(j.seed) for j in arm.completed), *cells])
    return _table(["arm", "jobs", "completed", "diverged", "failed/other", "seeds", *SUMMARY_METRICS], rows)


def report_warnings(sweep: Sweep) -> list[str]:
    """Arms that lost seeds to divergence, then jobs that ran on different data or code."""
    diverged = [w for w in (arm.divergence_warning() for arm in sweep.arms) if w]
    return diverged + provenance_warnings(sweep)


METHOD_NOTES = [
    "- One run = one seed; metrics are final values (never the best step of a run). Steps of one run are never "
    "treated as samples.",
    "- Arms share seeds and data order is a function of the seed, so when both arms have the same seeds the test is "
    "a paired t-test (`scipy.stats.ttest_rel`); otherwise Welch's t-test (`ttest_ind(equal_var=False)`). "
    "CI: 95 % t-interval of the difference from the same test.",
    "- d: Cohen's d_s = difference / pooled SD; g: Hedges' g = J(ν) d_s with the exact J and ν = n_a + n_b − 2. Both "
    "are the between-arm standardised difference on every row, paired rows included, so they compare across paired "
    "and Welch rows; d_z = mean / SD of the per-seed differences (paired rows only) is the paired test's own effect "
    "size (t = d_z √n).",
    "- power / MDE / n for 80 %: two-sided, `statsmodels`. Paired rows: `TTestPower` on n pairs, effect size d_z (n "
    "for 80 % = pairs of seeds); Welch rows: `TTestIndPower` on n_a vs n_b, effect size d_s (n for 80 % = runs per "
    "arm). `power` is post-hoc power at the observed effect: at given n it is a function of p (about 50 % at "
    "p = alpha), so it is not evidence by itself; read the CI and the MDE.",
    "- Diverged runs (status `diverged`, or recorded completed with a non-finite final val/test loss or a non-finite "
    "train loss in metrics.csv) are in no mean, since their numbers are meaningless; they are listed under jobs not "
    "counted, counted per arm, and every comparison of their arm carries a warning: dropping them flatters an "
    "unstable arm. So do diverged seeds re-run until they completed, seeds lost otherwise (failed, killed, "
    "missing), and completed runs without a value of the row's metric (time to target: never reached it, so that "
    "comparison is conditional on reaching it).",
    "- Jobs whose results.json records a different `data_manifest_key` (data) or `git_commit` (code) are named in "
    "the warnings at the top.",
    "- Corrections (`multipletests`, method passed explicitly): the family is all comparisons of one metric; "
    "Holm is the headline, Bonferroni and Benjamini-Hochberg FDR are listed too.",
    "- Factorial sweeps (two or more swept keys): a main effect compares a level with the baseline level of its key "
    "on runs matched by the other keys' levels and the seed, pooled over the grid (paired t-test over those pairs, "
    "so variation of the effect between contexts counts as error, and a context with more seeds weighs more; its own "
    "Holm family per metric; d_z only, since a between-arm SD would hold the other keys' effects). Pairs of one seed "
    "in different contexts share that seed's noise, so the n - 1 degrees of freedom can overstate the precision when "
    "seeds interact with the key. ANOVA: statsmodels OLS, `anova_lm(typ=2)`, value ~ all keys crossed + seed as a "
    "block; a main effect's `interaction p_holm` is the smallest Holm-adjusted p of the interaction terms holding its "
    "key. Skipped, with the reason, when a cell has no value, the design is rank-deficient or nothing varies.",
    f"- Time to target: first validation with val loss <= the target (resolution: one validation interval). "
    f"Loss spike: a step with train loss > {1 + LOSS_SPIKE_REL:.2f} x the median of the previous {SPIKE_WINDOW} "
    f"steps; grad-norm spike: the largest ratio of grad norm to that running median.",
]


def latex(comp: Comparison) -> str:
    """A booktabs table of every comparison, then (factorial sweeps) every main effect (requires booktabs)."""
    level = f"{100 * (1 - comp.alpha):.4g}"
    lines = [r"\begin{tabular}{llrrrrrr}", r"\toprule",
             r"Metric & Arm & $\Delta$ & " + level + r"\% CI & $d$ & $g$ & $p_\mathrm{Holm}$ & MDE$^a$ \\", r"\midrule"]
    lines += _tex_rows(comp.rows, "")
    if comp.main_effects:
        title = r"\multicolumn{8}{l}{\emph{Main effects over the grid (vs the key's baseline level)}} \\"
        lines += [r"\midrule", title, r"\midrule"]
        lines += _tex_rows([{**r, "arm": f"{r['arm']} vs {r['base_level']}"} for r in comp.main_effects], "")
    note = r"\multicolumn{8}{l}{\footnotesize $^a$ in units of $d_z$ on paired rows, of $d$ on Welch rows} \\"
    return "\n".join([*lines, r"\bottomrule", note, r"\end{tabular}"]) + "\n"


def _tex_rows(all_rows: list[dict], suffix: str) -> list[str]:
    esc = lambda s: str(s).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")  # noqa: E731
    lines = []
    for metric in METRICS:
        rows = [r for r in all_rows if r["metric"] == metric.name]
        if lines and rows:
            lines.append(r"\midrule")
        for r in rows:
            lines.append(f"{esc(metric.name)} & {esc(r['arm'])}{suffix} & {fmt(r['diff'])} & [{fmt(r['ci_low'])}, "
                         f"{fmt(r['ci_high'])}] & {fmt(r['cohens_d'], 2)} & {fmt(r['hedges_g'], 2)} & "
                         f"{esc(fmt_p(r['p_holm']))} & {fmt(r['mde_d'], 3)} \\\\")
    return lines


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> None:
    cell = lambda v: "" if isinstance(v, float) and not math.isfinite(v) else (repr(v) if isinstance(v, float) else v)  # noqa: E731
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: cell(r[k]) for k in columns} for r in rows)


def report_json(sweep: Sweep, comp: Comparison, name: str) -> dict:
    return _clean({
        "name": name, "sweep": str(sweep.path), "alpha": comp.alpha, "baseline": comp.baseline,
        "baseline_rule": comp.baseline_rule, "target_loss": comp.target_loss, "factors": sweep.factors,
        "warnings": report_warnings(sweep), "provenance": provenance(sweep),
        "arms": [{"label": a.label, "factors": a.factors, "jobs": [j.name for j in a.jobs],
                  "completed": [j.name for j in a.completed], "seeds": [j.seed for j in a.completed],
                  "diverged": [j.name for j in a.diverged], "diverged_seeds": [j.seed for j in a.diverged]}
                 for a in sweep.arms],
        "jobs": [{"name": j.name, "arm": j.arm, "seed": j.seed, "status": j.status, "error": j.error,
                  "diverged_at_step": j.diverged_at_step, "overrides": j.overrides} for j in sweep.jobs],
        "not_counted": [j.name for j in sweep.problems], "censored": comp.censored,
        "censored_reasons": comp.censored_reasons,
        "summaries": comp.summaries, "comparisons": comp.rows,
        "main_effects": comp.main_effects, "anova": comp.anova, "anova_notes": comp.anova_notes,
    })


def sweep_name(path: Path) -> str:
    """multirun/2026-11-23/12-00-00-000000-norm -> 2026-11-23_12-00-00-000000-norm; else the folder name."""
    parts = path.resolve().parts
    if "multirun" in parts[:-1]:
        return "_".join(parts[len(parts) - parts[::-1].index("multirun"):])
    return path.resolve().name


def newest_sweep(root: Path = Path("multirun")) -> Path:
    """The sweep whose multirun.yaml is newest under ``root``."""
    found = sorted(root.glob("**/multirun.yaml"), key=lambda p: (p.stat().st_mtime, natural_key(str(p))))
    if not found:
        raise FileNotFoundError(f"no sweep under {root}/ (run `python train.py -m ...` first, or pass SWEEP=path)")
    return found[-1].parent


def write_report(sweep_path: Path, out: Path | None = None, baseline: str | None = None,
                 target_loss: float | None = None, alpha: float = ALPHA, pairing: bool = True,
                 plots: bool = True) -> tuple[Path, Sweep, Comparison]:
    """Collect, compare and write every report file; returns (folder, sweep, comparison)."""
    sweep = collect_sweep(sweep_path)
    comp = compare_sweep(sweep, baseline=baseline, target_loss=target_loss, alpha=alpha, pairing=pairing)
    add_factorial(sweep, comp, pairing)
    name = sweep_name(sweep.path)
    out = Path(out) if out is not None else Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    written_plots = []
    if plots:
        from kimi_lab.stats.plots import write_plots

        written_plots = write_plots(sweep, comp, out)
    write_csv(out / "comparisons.csv", comp.rows)
    for stale in ("main_effects.csv", "anova.csv"):  # a rerun on a sweep that is no longer factorial
        (out / stale).unlink(missing_ok=True)
    if comp.main_effects:
        write_csv(out / "main_effects.csv", comp.main_effects, EFFECT_COLUMNS)
        write_csv(out / "anova.csv", comp.anova, ANOVA_COLUMNS)
    (out / "report.json").write_text(json.dumps(report_json(sweep, comp, name), indent=2) + "\n")
    (out / "report.md").write_text(markdown(sweep, comp, name, written_plots))
    (out / "report.tex").write_text(latex(comp))
    return out, sweep, comp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.stats.report", description=__doc__)
    parser.add_argument("sweep", nargs="?", help="sweep folder (default: the newest under multirun/)")
    parser.add_argument("--baseline", help="the baseline arm, e.g. norm=layernorm,optimizer=adamw "
                                           "(default: the first value of each swept factor)")
    parser.add_argument("--out", help="output folder (default: reports/<sweep name>)")
    parser.add_argument("--target-loss", type=float, help="val loss for time-to-target (default: the worst final "
                                                          "val loss of the completed runs)")
    parser.add_argument("--alpha", type=float, default=ALPHA)
    parser.add_argument("--no-pairing", action="store_true", help="always Welch, even when the arms share seeds")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        sweep_path = Path(args.sweep) if args.sweep else newest_sweep()
        out, sweep, comp = write_report(sweep_path, args.out, args.baseline, args.target_loss, args.alpha,
                                        not args.no_pairing, not args.no_plots)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(sweep.jobs)} jobs, {len(sweep.arms)} arms, {len(sweep.problems)} not counted; baseline "
          f"{comp.baseline}")
    for warning in provenance_warnings(sweep):
        print(f"  warning: {warning}")
    for job in sweep.problems:
        print(f"  not counted: {job.name} [{job.status}] {first_line(job.error)[:120]}")
    for row in comp.rows + comp.main_effects:
        if row["metric"] == "val_loss":
            print(f"  {'main effect: ' if 'factor' in row else ''}{verdict(row, comp.alpha)}")
    print(f"report: {out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
