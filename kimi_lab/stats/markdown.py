"""report.md: a short header, ONE summary table of the primary metric, then warnings, jobs not counted, arms with their
compute, the noise floor, every tested metric's comparisons (confirmatory first, the others labelled exploratory),
descriptive metrics (val_ppl, timings), main effects (factorial sweeps), plots and the method."""

from __future__ import annotations

import math
from pathlib import Path

from kimi_lab.stats.calibration import calibration_section
from kimi_lab.stats.collect import Sweep
from kimi_lab.stats.compare import Comparison, ci_label
from kimi_lab.stats.descriptive import TIMING_NOTE, noise_floor
from kimi_lab.stats.families import CONFIRMATORY, FAMILY_P
from kimi_lab.stats.method import method_notes
from kimi_lab.stats.metrics import DESCRIPTIVE_METRICS, DERIVED, TIMING, metric_named
from kimi_lab.stats.provenance import provenance_warnings
from kimi_lab.stats.verdicts import fmt, fmt_p, interval, p_is, units_of, verdict


def first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0]


def fmt_count(x) -> str:
    """1234567 -> '1.23M': parameters, FLOPs, tokens."""
    if x is None or not math.isfinite(x):
        return "n/a"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return fmt(x)


def fmt_ratio(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3g}×"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def primary_mde(comp: Comparison) -> float:
    """The largest MDE (metric units) of the confirmatory rows that have a test: what the study can detect in every
    arm; NaN when no confirmatory row has one."""
    mdes = [r["mde"] for r in comp.rows if r["family"] == CONFIRMATORY and math.isfinite(r["mde"])]
    return max(mdes) if mdes else math.nan


def pipeline_check(comp: Comparison) -> str | None:
    """'pipeline check (MDE 0.21 nats)' when the primary metric's MDE exceeds report.mde_goal (or none could be
    computed), else None; None without confirmatory rows."""
    if not any(r["family"] == CONFIRMATORY for r in comp.rows):
        return None
    mde = primary_mde(comp)
    if math.isfinite(mde) and mde <= comp.settings.mde_goal:
        return None
    return f"pipeline check (MDE {fmt(mde)}{units_of(comp.settings.primary_metric)})"


def report_warnings(sweep: Sweep, comp: Comparison | None = None) -> list[str]:
    """Arms that lost seeds to divergence, jobs that ran on different data or code, then the comparison's own
    (declarations, compute not matched, repeated data)."""
    diverged = [w for w in (arm.divergence_warning() for arm in sweep.arms) if w]
    return diverged + provenance_warnings(sweep) + (comp.warnings if comp is not None else [])


def markdown(sweep: Sweep, comp: Comparison, name: str, plots: list[Path]) -> str:
    check = pipeline_check(comp)
    lines = [f"# Report: {name}{f' — {check}' if check else ''}", "", *header(sweep, comp), "",
             *summary_section(comp)]
    warnings = report_warnings(sweep, comp)
    if warnings:
        lines += ["", f"## Warnings ({len(warnings)})", ""] + [f"- **{w}**" for w in warnings]
    problems = sweep.problems
    lines += ["", f"## Jobs not counted ({len(problems)})", ""]
    if problems:
        lines += table(["job", "arm", "seed", "status", "reason"],
                       [[j.name, j.arm or "", str(j.seed), j.status, first_line(j.error)[:160]] for j in problems])
    else:
        lines.append("None: every job the sweep defined completed.")
    lines += ["", "## Arms (mean ± SD over completed seeds; diverged seeds are not in the mean)", ""]
    lines += arms_table(sweep, comp)
    lines += ["", *noise_section(comp), *calibration_section(comp.calibration), *comp.tuned_lrs]
    lines += ["## Comparisons vs the baseline", ""]
    for metric in sorted(comp.metrics, key=lambda m: m.name != comp.settings.primary_metric):
        lines += metric_section(comp, metric.name)
    lines += descriptive_section(sweep, comp)
    lines += main_effects_section(sweep, comp)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## Method", "", *method_notes(comp)]
    return "\n".join(lines) + "\n"


def header(sweep: Sweep, comp: Comparison) -> list[str]:
    counts: dict[str, int] = {}
    for job in sweep.jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    s, fam = comp.settings, comp.families.get(CONFIRMATORY, {})
    factors = "; ".join(f"`{k}` ∈ {{{', '.join(v)}}}" for k, v in sweep.factors.items()) or "none (one arm)"
    sesoi = ", ".join(f"{k} ±{fmt(v)}{units_of(k)}" for k, v in s.sesoi.items()) or "none declared"
    target = (", ".join(f"{k} <= {fmt(v, 4)}" for k, v in s.target.items()) if s.target
              else "none declared (no tokens_to_target)")
    lines = [f"- sweep: `{sweep.path}`",
             f"- jobs: {len(sweep.jobs)} ({', '.join(f'{n} {st}' for st, n in sorted(counts.items()))})",
             f"- swept factors: {factors}", f"- baseline arm: `{comp.baseline}` ({comp.baseline_rule})",
             f"- primary metric: `{s.primary_metric}` ({s.source.get('primary_metric', 'default')}); confirmatory "
             f"family: {s.primary_metric} × {fam.get('m', 0)} tested arm(s), Holm; every other metric: one "
             f"exploratory family (Benjamini-Hochberg)",
             f"- SESOI (equivalence margin): {sesoi} ({s.source.get('sesoi', 'default')}); target: {target}"]
    if s.tuning_seeds:
        lines.append(f"- learning rates tuned on seeds {', '.join(map(str, s.tuning_seeds))} of "
                     f"`{s.tuning_sweep or 'an unrecorded sweep'}`")
    return lines


def summary_section(comp: Comparison) -> list[str]:
    """One table: per arm, the primary metric's effect with its CI and simultaneous CI, verdict, MDE, compute."""
    primary, base = comp.settings.primary_metric, comp.baseline
    units = units_of(primary)
    summary = {(s["metric"], s["arm"]): s for s in comp.summaries}
    level = ci_label(comp.alpha).replace(" %", "%")
    lines = [f"## Summary: {primary} (confirmatory){units and f', {units.strip()}'}", ""]
    if (primary, base) not in summary:
        return lines + [f"No completed run has `{primary}`: nothing to compare.", ""]
    b, c = summary[primary, base], comp.compute[base]
    rows = [[f"`{base}` (baseline)", str(b["n"]), f"{fmt(b['mean'], 4)} ± {fmt(b['sd'], 2)}", "", "", "", "", "",
             fmt_ratio(c["flops_per_token_ratio"]), fmt_ratio(c["tokens_seen_ratio"])]]
    for r in (r for r in comp.rows if r["metric"] == primary):
        rows.append([f"`{r['arm']}`", str(r["n_a"]), f"{fmt(r['mean_a'], 4)} ± {fmt(r['sd_a'], 2)}",
                     f"{fmt(r['diff'])} {interval(r['ci_low'], r['ci_high'])}",
                     interval(r["ci_low_simultaneous"], r["ci_high_simultaneous"]), f"**{r['verdict']}**",
                     fmt_p(r["p_family"]), fmt(r["mde"]), fmt_ratio(r["flops_per_token_ratio"]),
                     fmt_ratio(r["tokens_seen_ratio"])])
    m = comp.families.get(CONFIRMATORY, {}).get("m", 0)
    lines += table(["arm", "n", "mean ± SD", f"diff [{level}]", f"simultaneous [1 − α/{max(m, 1)}]", "verdict",
                    "p_holm", "MDE", "FLOPs/token vs baseline", "tokens vs baseline"], rows)
    check = pipeline_check(comp)
    if check:
        lines += ["", f"This sweep is a {check}: its primary-metric MDE is above the study's goal "
                      f"{fmt(comp.settings.mde_goal)}{units} (report.mde_goal), so it checks the pipeline, not "
                      f"effects of that size."]
    return lines + [""]


def arms_table(sweep: Sweep, comp: Comparison) -> list[str]:
    """Per arm: jobs, completed / diverged / failed-or-other counts, the counted seeds, the primary metric's mean ±
    SD, active parameters, FLOPs/token, tokens (with their ratio to the baseline) and epochs."""
    primary = comp.settings.primary_metric
    summary = {(s["metric"], s["arm"]): s for s in comp.summaries}
    rows = []
    for arm in sweep.arms:
        s, c = summary.get((primary, arm.label)), comp.compute[arm.label]
        done, diverged = len(arm.completed), len(arm.diverged)
        cells = [f"{fmt(s['mean'], 4)} ± {fmt(s['sd'], 2)}" if s else "n/a"]
        cells += [f"{fmt_count(c[k])} ({fmt_ratio(c[f'{k}_ratio'])})" for k in
                  ("params_active", "flops_per_token", "tokens_seen")]
        rows.append([f"`{arm.label}`", str(len(arm.jobs)), str(done), str(diverged),
                     str(len(arm.jobs) - done - diverged), " ".join(str(j.seed) for j in arm.completed), *cells,
                     fmt(c["epochs"])])
    return table(["arm", "jobs", "completed", "diverged", "failed/other", "seeds", primary, "params_active",
                  "FLOPs/token", "tokens", "epochs"], rows)


def noise_section(comp: Comparison) -> list[str]:
    """Per tested metric: each arm's seed SD, the SD of its paired differences from the baseline (pooled SD on Welch
    rows) and its MDE in the metric's units at this n."""
    entries = noise_floor(comp.summaries, comp.rows, comp.baseline)
    lines = ["## Noise floor", "",
             "Seed-to-seed SD of each arm, SD of its per-seed differences from the baseline (paired rows; the pooled "
             "SD on Welch rows), and the minimum detectable effect in the metric's units at this number of seeds "
             "(80 % power, two-sided, at the per-test level `mde_alpha`: alpha / m in the confirmatory family, alpha "
             "in the exploratory one).", ""]
    for metric in dict.fromkeys(e["metric"] for e in entries):
        units = units_of(metric)
        lines += [f"### {metric}{units and f' ({units.strip()})'}", ""]
        lines += table(["arm", "n seeds", "seed SD", "paired-diff SD vs baseline", "MDE", "at alpha"],
                       [[f"`{e['arm']}`", str(e["n"]), fmt(e["sd"]),
                         "baseline" if e["test"] == "baseline" else fmt(e["sd_diff"]) if e["test"] == "paired"
                         else f"{fmt(e['sd_pooled'])} (pooled, Welch)" if e["test"] == "welch" else "n/a",
                         fmt(e["mde"]), fmt(e["mde_alpha"], 3)] for e in entries if e["metric"] == metric])
        lines.append("")
    return lines


def metric_section(comp: Comparison, name: str) -> list[str]:
    metric = metric_named(name)
    summary = {(s["metric"], s["arm"]): s for s in comp.summaries}
    rows = [r for r in comp.rows if r["metric"] == name]
    base = summary[name, comp.baseline]
    family = rows[0]["family"] if rows else ""
    better = "lower" if metric.lower_is_better else "higher"
    lines = [f"### {name} ({better} is better; {family}; baseline {fmt(base['mean'], 4)}, n = {base['n']})", ""]
    if name in comp.censored:
        reasons = "; ".join(f"{why}: {', '.join(jobs)}" for why, jobs in comp.censored_reasons[name].items())
        lines += [f"No value for {len(comp.censored[name])} completed run(s): {reasons}.", ""]
    level = ci_label(comp.alpha).replace(" %", "%")
    simultaneous = family == CONFIRMATORY
    header = ["arm", "n", "mean", f"diff [{level}]", *(["simultaneous CI"] * simultaneous), "test", "p",
              FAMILY_P.get(family, "p_holm"), "TOST p", "d", "d_z", "MDE", "verdict"]
    body = [[f"`{r['arm']}`", str(r["n_a"]), fmt(r["mean_a"], 4),
             f"{fmt(r['diff'])} {interval(r['ci_low'], r['ci_high'])}",
             *([interval(r["ci_low_simultaneous"], r["ci_high_simultaneous"])] * simultaneous), r["test"],
             fmt_p(r["p"]), fmt_p(r["p_family"]), fmt_p(r["p_tost_family"]), fmt(r["cohens_d"], 2),
             fmt(r["d_z"], 2), fmt(r["mde"]), r["verdict"]] for r in rows]
    return lines + table(header, body) + [""] + [f"- {verdict(r, comp.alpha)}" for r in rows] + [""]


def descriptive_section(sweep: Sweep, comp: Comparison) -> list[str]:
    """val_ppl (a transform of val_loss) and the timings: per arm, never tested."""
    summary = {(s["metric"], s["arm"]): s for s in comp.summaries}
    lines = ["## Descriptive metrics (never tested)", ""]
    for metric in (m for m in DESCRIPTIVE_METRICS if m.kind == DERIVED and (m.name, comp.baseline) in summary):
        lines += [f"### {metric.name} (exp of val_loss: its comparison is val_loss's)", ""]
        lines += table(["arm", "n", "mean ± SD", "median"],
                       [[f"`{a.label}`", str(s["n"]), f"{fmt(s['mean'], 4)} ± {fmt(s['sd'], 2)}", fmt(s["median"], 4)]
                        for a in sweep.arms for s in [summary[metric.name, a.label]]]) + [""]
    hardware = sorted({str(j.results.get("choices", {}).get("hardware")) for j in sweep.jobs if j.usable})
    timing = [m for m in DESCRIPTIVE_METRICS if m.kind == TIMING and any(t["metric"] == m.name for t in comp.timing)]
    if timing:
        lines += [f"### Timing ({TIMING_NOTE}; hardware: {', '.join(hardware) or 'n/a'})", ""]
        for metric in timing:
            lines += [f"{metric.name} ({metric.words}):", ""]
            lines += table(["arm", "n", "median", "min .. max", "median vs baseline"],
                           [[f"`{t['arm']}`", str(t["n"]), fmt(t["median"]), f"{fmt(t['min'])} .. {fmt(t['max'])}",
                             fmt_ratio(t["median_ratio"])] for t in comp.timing if t["metric"] == metric.name])
            lines.append("")
    return lines


def main_effects_section(sweep: Sweep, comp: Comparison) -> list[str]:
    """Factorial sweeps: per metric, each key's levels vs the baseline level over the grid, and the ANOVA."""
    if not comp.main_effects:
        return []
    keys = ", ".join(f"`{k}`" for k in sweep.factors)
    lines = [f"## Main effects over the grid ({keys} crossed)", "",
             "Each level vs the baseline arm's level of its key over the contexts (the rows above read it at the "
             "baseline corner only), tested on per-seed means (n = seeds); the primary metric's main effects are one "
             "confirmatory family (Holm), the other metrics' one exploratory family (Benjamini-Hochberg). ANOVA: "
             "split-plot, each term against its interaction with the seed.", ""]
    level = ci_label(comp.alpha).replace(" %", "%")
    for name in dict.fromkeys(r["metric"] for r in comp.main_effects):
        rows = [r for r in comp.main_effects if r["metric"] == name]
        metric, family = metric_named(name), rows[0].get("family", "")
        lines += [f"### {name} ({'lower' if metric.lower_is_better else 'higher'} is better"
                  f"{f'; {family}' if family else ''})", ""]
        lines += table(["level vs baseline", "n", "contexts", f"diff [{level}]", "per-context min..max", "test", "p",
                        FAMILY_P.get(family, "p_holm"), "d_z", "MDE", "verdict", "interaction p_holm"],
                       [[f"`{r['arm']}` vs `{r['base_level']}`", str(r["n_a"]), str(r["n_contexts"]),
                         f"{fmt(r['diff'])} {interval(r['ci_low'], r['ci_high'])}",
                         f"{fmt(r['context_min'])} .. {fmt(r['context_max'])}", r["test"], fmt_p(r["p"]),
                         fmt_p(r["p_family"] if family else r["p_holm"]), fmt(r["d_z"], 2), fmt(r.get("mde")),
                         r.get("verdict") or "", fmt_p(r["interaction_p_holm"])] for r in rows])
        terms = [t for t in comp.anova if t["metric"] == name and t["term"] != "residual"]
        if terms:
            listed = "; ".join(f"`{t['term']}` F = {fmt(t['F'])}{_anova_df(t)}, {p_is('p', t['p'])}" for t in terms)
            lines += ["", f"ANOVA: {listed}."]
            lines += [f"ANOVA note: {comp.anova_notes[name]}."] if name in comp.anova_notes else []
        elif name in comp.anova_notes:
            lines += ["", f"ANOVA skipped: {comp.anova_notes[name]}."]
        lines += [""] + [f"- {verdict(r, comp.alpha)}" for r in rows] + [""]
    return lines


def _anova_df(term: dict) -> str:
    """' (df 1, 2; error norm × seed)' when the term names its error term, else ''."""
    den, error = term.get("den_df"), term.get("error_term")
    if den is None or not math.isfinite(den) or not error:
        return ""
    return f" (df {term['df']:.0f}, {den:.0f}; error {error})"
