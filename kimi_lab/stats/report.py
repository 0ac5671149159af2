"""``python -m kimi_lab.stats.report [SWEEP]``: a sweep folder -> reports/<sweep>/ (comparisons.csv, report.json,
report.md with verdicts, report.tex, PNG plots when matplotlib is installed; factorial sweeps also main_effects.csv
and anova.csv). Idempotent; diverged, failed, missing and running jobs are listed, never dropped silently. What every
file, column and section means: docs/reports.md."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from kimi_lab.stats.calibration import aa_calibration, calibration_json
from kimi_lab.stats.collect import Sweep, collect_sweep, natural_key
from kimi_lab.stats.compare import ALPHA, ARM_COLUMNS, Comparison, compare_sweep
from kimi_lab.stats.descriptive import noise_floor
from kimi_lab.stats.factorial import ANOVA_COLUMNS, EFFECT_COLUMNS, add_factorial
from kimi_lab.stats.families import apply_families
from kimi_lab.stats.files import sweep_name, write_csv
from kimi_lab.stats.markdown import first_line, markdown, pipeline_check, primary_mde, report_warnings
from kimi_lab.stats.provenance import provenance, provenance_warnings
from kimi_lab.stats.settings import parse_assignments
from kimi_lab.stats.tune import confirm_notes
from kimi_lab.stats.verdicts import fmt, fmt_p, p_is, verdict

__all__ = ["fmt", "fmt_p", "p_is", "verdict", "write_report", "main", "sweep_name", "write_csv", "first_line"]


def _clean(value):
    """JSON-safe: NaN/inf -> null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def latex(comp: Comparison) -> str:
    """A booktabs table of every comparison (exploratory rows marked), then (factorial sweeps) every main effect."""
    level = f"{100 * (1 - comp.alpha):.4g}"
    lines = [r"\begin{tabular}{lllrrrrrl}", r"\toprule",
             r"Metric & Arm & Family & $\Delta$ & " + level + r"\% CI & simultaneous CI & $p_\mathrm{family}$ & "
             r"MDE$^a$ & verdict \\", r"\midrule"]
    lines += _tex_rows(comp.rows)
    if comp.main_effects:
        title = r"\multicolumn{9}{l}{\emph{Main effects over the grid (vs the key's baseline level)}} \\"
        lines += [r"\midrule", title, r"\midrule"]
        lines += _tex_rows([{**r, "arm": f"{r['arm']} vs {r['base_level']}"} for r in comp.main_effects])
    notes = [r"\multicolumn{9}{l}{\footnotesize $^a$ minimum detectable effect, metric units, 80 \% power at "
             r"\texttt{mde\_alpha}; $p_\mathrm{family}$: Holm (confirmatory: "
             + _esc(comp.settings.primary_metric) + r"), Benjamini-Hochberg (exploratory)} \\"]
    return "\n".join([*lines, r"\bottomrule", *notes, r"\end{tabular}"]) + "\n"


def _esc(text) -> str:
    return str(text).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")


def _tex_rows(all_rows: list[dict]) -> list[str]:
    lines = []
    for name in dict.fromkeys(r["metric"] for r in all_rows):
        rows = [r for r in all_rows if r["metric"] == name]
        if lines:
            lines.append(r"\midrule")
        for r in rows:
            simultaneous = (f"[{fmt(r['ci_low_simultaneous'])}, {fmt(r['ci_high_simultaneous'])}]"
                            if math.isfinite(r.get("ci_low_simultaneous", math.nan)) else "")
            p = r.get("p_family", math.nan) if r.get("family") else r["p_holm"]
            lines.append(f"{_esc(name)} & {_esc(r['arm'])} & {r.get('family', '')} & {fmt(r['diff'])} & "
                         f"[{fmt(r['ci_low'])}, "
                         f"{fmt(r['ci_high'])}] & {simultaneous} & {_esc(fmt_p(p))} & {fmt(r.get('mde'))} & "
                         f"{_esc(r.get('verdict', ''))} \\\\")
    return lines


def report_json(sweep: Sweep, comp: Comparison, name: str) -> dict:
    settings = comp.settings
    return _clean({
        "name": name, "title": pipeline_check(comp) or "", "sweep": str(sweep.path), "alpha": comp.alpha,
        "baseline": comp.baseline, "baseline_rule": comp.baseline_rule, "target_loss": comp.target_loss,
        "settings": {"primary_metric": settings.primary_metric, "sesoi": settings.sesoi, "target": settings.target,
                     "mde_goal": settings.mde_goal, "tuning_seeds": settings.tuning_seeds,
                     "tuning_sweep": settings.tuning_sweep, "source": settings.source},
        "primary_mde": primary_mde(comp), "families": comp.families, "factors": sweep.factors,
        "warnings": report_warnings(sweep, comp), "provenance": provenance(sweep),
        "arms": [{"label": a.label, "factors": a.factors, "jobs": [j.name for j in a.jobs],
                  "completed": [j.name for j in a.completed], "seeds": [j.seed for j in a.completed],
                  "diverged": [j.name for j in a.diverged], "diverged_seeds": [j.seed for j in a.diverged],
                  **comp.compute[a.label]}
                 for a in sweep.arms],
        "jobs": [{"name": j.name, "arm": j.arm, "seed": j.seed, "status": j.status, "error": j.error,
                  "diverged_at_step": j.diverged_at_step, "overrides": j.overrides} for j in sweep.jobs],
        "not_counted": [j.name for j in sweep.problems], "censored": comp.censored,
        "censored_reasons": comp.censored_reasons, "summaries": comp.summaries, "comparisons": comp.rows,
        "noise_floor": noise_floor(comp.summaries, comp.rows, comp.baseline), "timing": comp.timing,
        "main_effects": comp.main_effects, "anova": comp.anova, "anova_notes": comp.anova_notes,
        "aa_calibration": calibration_json(comp.calibration),
    })


def newest_sweep(root: Path = Path("multirun")) -> Path:
    """The sweep whose multirun.yaml is newest under ``root``."""
    found = sorted(root.glob("**/multirun.yaml"), key=lambda p: (p.stat().st_mtime, natural_key(str(p))))
    if not found:
        raise FileNotFoundError(f"no sweep under {root}/ (run `python train.py -m ...` first, or pass SWEEP=path)")
    return found[-1].parent


def write_report(sweep_path: Path, out: Path | None = None, baseline: str | None = None,
                 target_loss: float | None = None, alpha: float = ALPHA, pairing: bool = True,
                 plots: bool = True, primary: str | None = None, sesoi: dict[str, float] | None = None,
                 target: dict[str, float] | None = None) -> tuple[Path, Sweep, Comparison]:
    """Collect, compare and write every report file; returns (folder, sweep, comparison). ``primary``, ``sesoi`` and
    ``target`` override the study's declarations (results.json ``report``); ``target_loss`` is a val-loss target."""
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha {alpha}; allowed: 0 < alpha < 1")
    sweep = collect_sweep(sweep_path)
    if not any(job.usable for job in sweep.jobs):  # nothing to compare: one line, no empty report
        counts = Counter(job.status for job in sweep.jobs)
        listed = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        first = next((j for j in sweep.jobs if j.error), None)
        why = f"; first error ({first.name}): {first_line(first.error)[:160]}" if first else ""
        raise ValueError(f"no completed run in {sweep_path}: {len(sweep.jobs)} job(s) ({listed or 'none found'}){why}")
    comp = compare_sweep(sweep, baseline=baseline, target_loss=target_loss, alpha=alpha, pairing=pairing,
                         primary=primary, sesoi=sesoi, target=target)
    add_factorial(sweep, comp, pairing)
    comp.tuned_lrs, tune_warnings = confirm_notes(sweep)  # empty unless the jobs ran at ${tuned_lr:...}
    comp.warnings += tune_warnings
    if len(sweep.arms) == 1:  # seeds of one configuration: the A/A calibration of the report's own test
        comp.calibration = aa_calibration(sweep, alpha, metric=comp.settings.primary_metric)
    if comp.main_effects:  # the primary metric's main effects: confirmatory; every other metric's: exploratory
        comp.families["main_effects"] = apply_families(comp.main_effects, comp.settings.primary_metric, alpha,
                                                       comp.settings.sesoi)
    name = sweep_name(sweep.path)
    out = Path(out) if out is not None else Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    written_plots = []
    if plots:
        from kimi_lab.stats.plots import write_plots

        written_plots = write_plots(sweep, comp, out)
    write_csv(out / "comparisons.csv", comp.rows, ARM_COLUMNS)
    for stale in ("main_effects.csv", "anova.csv"):  # a rerun on a sweep that is no longer factorial
        (out / stale).unlink(missing_ok=True)
    if comp.main_effects:
        write_csv(out / "main_effects.csv", comp.main_effects, EFFECT_COLUMNS)
        write_csv(out / "anova.csv", comp.anova, ANOVA_COLUMNS)
    (out / "report.json").write_text(json.dumps(report_json(sweep, comp, name), indent=2) + "\n")
    (out / "report.md").write_text(markdown(sweep, comp, name, written_plots))
    (out / "report.tex").write_text(latex(comp))
    return out, sweep, comp


def parser() -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser(prog="python -m kimi_lab.stats.report", description=__doc__)
    cli.add_argument("sweep", nargs="?", help="sweep folder (default: the newest under multirun/)")
    cli.add_argument("--baseline", help="the baseline arm, e.g. norm=layernorm,optimizer=adamw "
                                        "(default: the first value of each swept factor)")
    cli.add_argument("--out", help="output folder (default: reports/<sweep name>)")
    cli.add_argument("--primary", help="the primary metric: its rows are the confirmatory family (default: "
                                       "results.json report.primary_metric, else val_loss)")
    cli.add_argument("--sesoi", action="append", metavar="METRIC=VALUE",
                     help="smallest effect size of interest in metric units, for equivalence (TOST); repeatable; "
                          "over results.json report.sesoi (default val_loss=0.02)")
    cli.add_argument("--target", action="append", metavar="METRIC=VALUE",
                     help="declared target for tokens_to_target, e.g. val_loss=5.8 (default: results.json "
                          "report.target; none: no tokens_to_target)")
    cli.add_argument("--target-loss", type=float, help="the same as --target val_loss=X")
    cli.add_argument("--alpha", type=float, default=ALPHA)
    cli.add_argument("--no-pairing", action="store_true", help="always Welch, even when the arms share seeds")
    cli.add_argument("--no-plots", action="store_true")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        sweep_path = Path(args.sweep) if args.sweep else newest_sweep()
        out, sweep, comp = write_report(sweep_path, args.out, args.baseline, args.target_loss, args.alpha,
                                        not args.no_pairing, not args.no_plots, primary=args.primary,
                                        sesoi=parse_assignments(args.sesoi, "--sesoi"),
                                        target=parse_assignments(args.target, "--target"))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    check = pipeline_check(comp)
    print(f"{len(sweep.jobs)} jobs, {len(sweep.arms)} arms, {len(sweep.problems)} not counted; baseline "
          f"{comp.baseline}; primary metric {comp.settings.primary_metric}{f' ({check})' if check else ''}")
    for warning in provenance_warnings(sweep) + comp.warnings:
        print(f"  warning: {warning}")
    for job in sweep.problems:
        print(f"  not counted: {job.name} [{job.status}] {first_line(job.error)[:120]}")
    for row in comp.rows + comp.main_effects:
        if row["metric"] == comp.settings.primary_metric:
            print(f"  {'main effect: ' if 'factor' in row else ''}{verdict(row, comp.alpha)}")
    print(f"report: {out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
