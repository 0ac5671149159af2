"""``python -m kimi_lab.stats.tune SWEEP``: each arm's learning rate, picked on a tune sweep's seeds, and the command
that confirms the tuned arms on fresh seeds (the tune -> confirm protocol; docs/reports.md).

A tune sweep is any sweep with an ``optimizer.lr`` axis; its arms are the combinations of the other swept keys (seed
and lr aside), so ``optimizer=adam,adamw optimizer.lr=1e-3,2e-3,4e-3 seed=1,2`` has two arms of three cells. An arm's
best LR is the cell with the lowest mean metric over the tuning seeds among the cells where every tuning seed
completed: a cell with a diverged seed is never best, since its mean would leave the divergence out. Selection uses
the tuning seeds only; the confirm sweep runs the picked LRs on fresh seeds, because the winner's tuning-seed mean is
biased low by the selection (Wortsman et al. 2023 plot these loss-vs-LR curves per arm; an optimum at a grid edge is
not bracketed). Writes reports/<sweep name>/: tuning.csv, tuning.md, lr_sensitivity.png, tuned_lr.json,
confirm_command.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kimi_lab.config.tuned import same_factors
from kimi_lab.stats.collect import DEFAULT_VALUE, Arm, Sweep, arm_label, as_number, collect_sweep
from kimi_lab.stats.metrics import Metric, _finite, _lookup, metric_named
from kimi_lab.stats.files import sweep_name, write_csv
from kimi_lab.stats.verdicts import fmt
from kimi_lab.stats.tune_command import (LR_KEY, carried_overrides, confirm_command, confirm_seeds,
                                         declared_confirm_seeds, job_lr, tuned_file, tuned_json_path, untuned_in_grid)

STATUS_LOST = "failed"  # tuning.csv's column of seeds lost otherwise (failed, interrupted, running, missing, no value)


@dataclass
class Cell:
    """One arm at one LR: the collect arm of that (arm, lr) and its metric per tuning seed."""

    lr: float
    jobs: Arm
    values: dict[int, float]  # seed -> metric of its completed run (finite values only)
    diverged: list[int]  # seeds with a diverged run (a completed re-run does not clear it)
    lost: list[int]  # tuning seeds with neither a value nor a divergence

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values()))) if self.values else math.nan

    @property
    def sd(self) -> float:
        return float(np.std(list(self.values.values()), ddof=1)) if self.n > 1 else math.nan

    @property
    def eligible(self) -> bool:
        return self.n > 0 and not self.diverged and not self.lost

    def why_not(self) -> str:
        """Why this cell cannot be best ('' when it can)."""
        parts = [f"seed {', '.join(map(str, self.diverged))} diverged"] if self.diverged else []
        parts += [f"seed {', '.join(map(str, self.lost))} not completed"] if self.lost else []
        return "; ".join(parts) or ("no completed seed" if not self.n else "")


@dataclass
class TunedArm:
    label: str
    factors: dict[str, str]  # the arm's keys (seed and lr aside) -> value, as collect spells them
    seeds: list[int]  # the tuning seeds of this arm: every seed any of its jobs ran
    cells: list[Cell]  # by lr, ascending
    best: Cell | None = None
    edge: str | None = None  # "low" / "high": the best LR is the grid's lowest / highest

    @property
    def grid(self) -> list[float]:
        return [c.lr for c in self.cells]

    def suggestion(self) -> float | None:
        """The LR to add beyond an edge optimum, one grid step out (the ratio of the two LRs at that edge)."""
        g = self.grid
        if self.edge == "low":
            return g[0] * g[0] / g[1]
        if self.edge == "high":
            return g[-1] * g[-1] / g[-2]
        return None

    def edge_warning(self) -> str | None:
        if self.edge is None:
            return None
        where = "lowest" if self.edge == "low" else "highest"
        return (f"arm {self.label}: best {LR_KEY} {fmt(self.best.lr)} is the {where} of its grid "
                f"({', '.join(fmt(x) for x in self.grid)}), so the optimum is not bracketed: add "
                f"{LR_KEY}={self.suggestion():.3g} and rerun the tune sweep")

    def gap_warning(self) -> str | None:
        """A neighbour of the best LR with no completed or diverged run does not bracket it either."""
        if self.best is None:
            return None
        at = self.cells.index(self.best)
        empty = [c for c in self.cells[max(at - 1, 0):at + 2] if c is not self.best and not c.values and not c.diverged]
        if not empty:
            return None
        return (f"arm {self.label}: best {LR_KEY} {fmt(self.best.lr)} has neighbour(s) "
                f"{', '.join(fmt(c.lr) for c in empty)} with no completed or diverged run, so the optimum is not "
                "bracketed there: rerun those jobs")


@dataclass
class Tuning:
    sweep: Sweep
    metric: str
    keys: list[str]  # the arm keys
    arms: list[TunedArm]
    tuning_seeds: list[int]

    @property
    def lower_is_better(self) -> bool:
        return metric_named(self.metric).lower_is_better

    def warnings(self) -> list[str]:
        """Edge optima and unbracketed ones, arms with no eligible LR, arms the confirm grid would launch without a
        tuned LR."""
        out = [w for a in self.arms for w in (a.edge_warning(), a.gap_warning()) if w]
        for arm in self.arms:
            if arm.best is None:
                cells = "; ".join(f"{fmt(c.lr)}: {c.why_not()}" for c in arm.cells)
                out.append(f"arm {arm.label}: no LR with every tuning seed completed ({cells}): no tuned LR, so the "
                           "confirm command leaves it out")
        return out + [f"the confirm grid (the cross product of the tuned arms' keys) holds arm {label}, which has no "
                      "tuned LR: its jobs fail at ${tuned_lr:...}" for label in untuned_in_grid(self)]


def tune_sweep(sweep: Sweep, metric: str = "val_loss") -> Tuning:
    """Group the sweep's cells into arms (the swept keys but ``optimizer.lr``), pick each arm's best LR, flag edges.
    Raises ValueError (one line) for a sweep without an lr axis, an arm with fewer than 2 LRs, no completed runs."""
    if LR_KEY not in sweep.factors:
        swept = ", ".join(sweep.factors) or "none"
        raise ValueError(f"{sweep.path}: no {LR_KEY} axis (swept keys: {swept}); allowed: a sweep with "
                         f"{LR_KEY}=a,b,... (at least 2 values per arm)")
    source = _metric(metric)
    _check_values(sweep, source)
    keys = [k for k in sweep.factors if k != LR_KEY]
    grouped: dict[str, list[Arm]] = {}
    for cell in sweep.arms:
        factors = {k: v for k, v in cell.factors.items() if k != LR_KEY}
        grouped.setdefault(arm_label(factors), []).append(cell)
    arms = [_tuned_arm(label, cells, source.source, keys) for label, cells in grouped.items()]
    for arm in arms:
        eligible = [c for c in arm.cells if c.eligible]
        if eligible:  # ties: the lower LR (first in grid order)
            arm.best = min(eligible, key=lambda c: c.mean if source.lower_is_better else -c.mean)
            arm.edge = "low" if arm.best.lr == arm.grid[0] else "high" if arm.best.lr == arm.grid[-1] else None
    seeds = sorted({j.seed for j in sweep.jobs if j.seed is not None})
    return Tuning(sweep=sweep, metric=metric, keys=keys, arms=arms, tuning_seeds=seeds)


def _metric(name: str) -> Metric:
    """The report metric ``name`` if results.json holds it (a curve metric needs a target: not tunable)."""
    try:
        metric = metric_named(name)
    except KeyError:
        metric = None
    if metric is None or metric.source == "curve":
        raise ValueError(f"--metric {name}: allowed: a final value of results.json, e.g. val_loss, test_loss, "
                         "val_acc, val_loss@<length>")
    return metric


def _check_values(sweep: Sweep, metric: Metric) -> None:
    lrs = sweep.factors[LR_KEY]
    bad = [v for v in lrs if v == DEFAULT_VALUE or as_number(v) is None or not as_number(v) > 0]
    if bad:
        raise ValueError(f"{sweep.path}: {LR_KEY} values {', '.join(bad)} (a job that does not set {LR_KEY} is "
                         f"{DEFAULT_VALUE}); allowed: every job sets {LR_KEY} to a number > 0")
    for key, values in sweep.factors.items():
        if DEFAULT_VALUE in values:
            raise ValueError(f"{sweep.path}: some jobs do not set the swept key {key} ({DEFAULT_VALUE}), so the "
                             f"confirm command cannot name their arm; allowed: every job sets {key}")
    if not any(math.isfinite(_finite(_lookup(j.results, metric.source))) for j in sweep.jobs if j.usable):
        counts = {}
        for job in sweep.jobs:
            counts[job.status] = counts.get(job.status, 0) + 1
        listed = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        raise ValueError(f"{sweep.path}: no completed run with a finite {metric.name} ({len(sweep.jobs)} jobs: "
                         f"{listed}); "
                         f"allowed: --metric naming a results.json value of its completed runs")


def _tuned_arm(label: str, cells: list[Arm], source: str, keys: list[str]) -> TunedArm:
    """The arm's cells by lr; a cell's values are its completed runs' finite ``source`` (results.json field)."""
    seeds = sorted({j.seed for c in cells for j in c.jobs if j.seed is not None})
    built = []
    for cell in cells:
        values = {j.seed: _finite(_lookup(j.results, source)) for j in cell.completed}
        values = {s: v for s, v in values.items() if math.isfinite(v)}
        diverged = sorted({j.seed for j in cell.jobs if j.status == "diverged"})
        lost = [s for s in seeds if s not in values and s not in diverged]
        built.append(Cell(lr=float(cell.factors[LR_KEY]), jobs=cell, values=values, diverged=diverged, lost=lost))
    built.sort(key=lambda c: c.lr)
    if len(built) < 2:
        raise ValueError(f"arm {label}: {len(built)} learning rate ({', '.join(fmt(c.lr) for c in built)}); allowed: "
                         f">= 2 values of {LR_KEY} per arm (about 2x apart, bracketing the optimum)")
    factors = {k: v for k, v in cells[0].factors.items() if k in keys}
    return TunedArm(label=label, factors=factors, seeds=seeds, cells=built)


# ---------------------------------------------------------------- files


def f4(x: float) -> str:
    """Losses to 4 decimals: LR cells of one arm differ in the second or third."""
    return f"{x:.4f}" if math.isfinite(x) else "n/a"


def tuning_rows(tuning: Tuning) -> list[dict]:
    """tuning.csv: one row per (arm, lr)."""
    m = tuning.metric
    return [{"arm": a.label, **{k: a.factors[k] for k in tuning.keys}, "lr": c.lr, "n": c.n, f"{m}_mean": c.mean,
             f"{m}_sd": c.sd, "best": c is a.best, "edge": c is a.best and a.edge is not None,
             "diverged": len(c.diverged), STATUS_LOST: len(c.lost), "eligible": c.eligible,
             "seeds": " ".join(str(s) for s in sorted(c.values)), "note": c.why_not()}
            for a in tuning.arms for c in a.cells]


def tuned_json(tuning: Tuning) -> dict:
    """tuned_lr.json, read by the ``${tuned_lr:...}`` resolver (kimi_lab/config/tuned.py) and ``confirm_notes``."""
    tuned = [a for a in tuning.arms if a.best is not None]
    return {"keys": tuning.keys, "arms": {a.label: a.best.lr for a in tuned}, "tuning_seeds": tuning.tuning_seeds,
            "tuning_sweep": str(tuning.sweep.path.resolve()), "metric": tuning.metric,
            "factors": {a.label: a.factors for a in tuned}, "grid": {a.label: a.grid for a in tuning.arms},
            "edge": {a.label: a.edge for a in tuned if a.edge},
            "suggest": {a.label: float(f"{a.suggestion():.3g}") for a in tuned if a.edge}}


def tuning_markdown(tuning: Tuning, command: str, plot: Path | None) -> str:
    m, name = tuning.metric, sweep_name(tuning.sweep.path)
    lines = [f"# LR tuning: {name}", "", f"- sweep: `{tuning.sweep.path.resolve()}`",
             f"- arms: {len(tuning.arms)} (keys: {', '.join(f'`{k}`' for k in tuning.keys) or 'none'}); "
             f"tuning seeds: {', '.join(map(str, tuning.tuning_seeds))}",
             f"- best LR: lowest mean {m} over the tuning seeds among the LRs where every tuning seed completed "
             "(a diverged seed rules its LR out); confirm the picks on fresh seeds, not on these",
             "- failed: tuning seeds of that LR with no completed run that did not diverge either (failed, "
             "interrupted, running, missing, or no value of the metric)"]
    warnings = tuning.warnings()
    if warnings:
        lines += ["", f"## Warnings ({len(warnings)})", ""] + [f"- **{w}**" for w in warnings]
    lines += ["", "| arm | lr | n | mean | SD | diverged | failed | best | note |", "|---" * 9 + "|"]
    for arm in tuning.arms:
        for c in arm.cells:
            mark = ("**best (edge)**" if arm.edge else "**best**") if c is arm.best else ""
            lines.append(f"| `{arm.label}` | {fmt(c.lr)} | {c.n} | {f4(c.mean)} | {f4(c.sd)} | "
                         f"{len(c.diverged)} | {len(c.lost)} | {mark} | {c.why_not()} |")
    if plot is not None:
        lines += ["", f"![{plot.stem}]({plot.name})"]
    lines += ["", "## Confirm command", "", "Run from the repository root:", "", "```", command, "```"]
    return "\n".join(lines) + "\n"


def write_tuning(sweep_path: Path, out: Path | None = None, seeds: list[int] | None = None,
                 metric: str = "val_loss", plots: bool = True) -> tuple[Path, Tuning, str]:
    """Collect, tune and write every file; returns (folder, tuning, confirm command)."""
    tuning = tune_sweep(collect_sweep(sweep_path), metric)
    out = Path(out) if out is not None else Path("reports") / sweep_name(tuning.sweep.path)
    chosen = confirm_seeds(tuning.tuning_seeds, seeds, declared_confirm_seeds(carried_overrides(tuning)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuned_lr.json").write_text(json.dumps(tuned_json(tuning), indent=2) + "\n")
    command = confirm_command(tuning, tuned_json_path(out), chosen)
    rows = tuning_rows(tuning)
    write_csv(out / "tuning.csv", rows, list(rows[0]))
    plot = None
    (out / "lr_sensitivity.png").unlink(missing_ok=True)  # a rerun with --no-plots leaves no stale figure
    if plots:
        from kimi_lab.stats.tune_plots import write_lr_sensitivity

        plot = write_lr_sensitivity(tuning, out)
    (out / "confirm_command.txt").write_text(command + "\n")
    (out / "tuning.md").write_text(tuning_markdown(tuning, command, plot))
    return out, tuning, command


# ---------------------------------------------------------------- the confirm sweep's report


def confirm_notes(sweep: Sweep) -> tuple[list[str], list[str]]:
    """(markdown lines: a "Tuned LRs" table arm -> lr -> tuning sweep, warnings) for a confirm sweep, whose jobs'
    results.json record ``report.tuning_sweep`` / ``report.tuning_seeds``; ([], []) for any other sweep.

    Warnings: tuned arms whose LR was at an edge of its tuning grid (per tuned_lr.json), arms that ran at more than one
    LR (confirm seeds that are also tuning seeds are the report settings' warning, stats.settings). A confirm arm maps
    to the tuned arm of its values of tuned_lr.json's keys (a confirm sweep may add a key, e.g. norm.eps at each
    norm's LR)."""
    ran = [j for j in sweep.jobs if j.status in ("completed", "diverged")]
    blocks = [j.results.get("report") or {} for j in ran]
    if not any(b.get("tuning_sweep") or b.get("tuning_seeds") for b in blocks):
        return [], []
    tuned, warnings, edges = tuned_file(sweep), [], {}
    tuning_seeds = sorted({int(s) for b in blocks for s in b.get("tuning_seeds") or []})
    rows = []
    for arm in sweep.arms:
        jobs = [j for j in ran if j.arm == arm.label]
        lrs = sorted({lr for j in jobs if (lr := job_lr(j)) is not None})
        sweeps = sorted({str((j.results.get("report") or {}).get("tuning_sweep")) for j in jobs})
        source = _tuned_label(jobs[0], tuned) if jobs else None
        edge = (tuned.get("edge") or {}).get(source)
        if len(lrs) > 1:
            warnings.append(f"arm {arm.label} ran at {len(lrs)} learning rates ({', '.join(fmt(x) for x in lrs)})")
        if edge:
            edges[source] = _edge_note(source, edge, tuned)
        rows.append(f"| `{arm.label}` | {', '.join(fmt(x) for x in lrs) or 'n/a'} | `{source or 'n/a'}` | "
                    f"{', '.join(f'`{s}`' for s in sweeps) or 'n/a'} | {'yes: ' + edge if edge else 'no'} |")
    lines = ["## Tuned LRs", "", f"Each arm ran at the LR picked on the tuning seeds "
             f"{', '.join(map(str, tuning_seeds)) or '(not recorded)'} (python -m kimi_lab.stats.tune); "
             f"this sweep's seeds: {', '.join(str(s) for s in sorted({j.seed for j in ran}))}.", "",
             "| arm | lr | tuned arm | tuning sweep | grid edge |", "|---|---|---|---|---|", *rows, ""]
    return lines, warnings + list(edges.values())


def _tuned_label(job, tuned: dict) -> str | None:
    """The tuned_lr.json arm whose factors equal this job's values of the file's keys (numbers as numbers)."""
    values = {k: job.overrides.get(k, DEFAULT_VALUE) for k in tuned.get("keys") or []}
    return next((label for label, factors in (tuned.get("factors") or {}).items() if same_factors(values, factors)),
                None)


def _edge_note(label: str, edge: str, tuned: dict) -> str:
    grid = ", ".join(fmt(x) for x in (tuned.get("grid") or {}).get(label, []))
    add = (tuned.get("suggest") or {}).get(label)
    return (f"arm {label}: its tuned LR is the {'lowest' if edge == 'low' else 'highest'} of its tuning grid ({grid}), "
            "so the optimum was not bracketed" + (f"; add {LR_KEY}={add:.3g} to the tune sweep" if add else ""))


# ---------------------------------------------------------------- CLI


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--confirm-seeds {text}: allowed: comma-separated integers, e.g. 11,12,13") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--confirm-seeds {text}: allowed: one or more distinct integers, e.g. 11,12,13")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.stats.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the tune sweep's folder (a multirun folder with an optimizer.lr axis)")
    parser.add_argument("--out", help="output folder (default: reports/<sweep name>)")
    parser.add_argument("--confirm-seeds", help="seeds of the confirm sweep, e.g. 11,12,13 (default: at least 5, "
                                                "counting up from the largest tuning seed + 1)")
    parser.add_argument("--metric", default="val_loss", help="results.json value the LR is picked on "
                                                             "(default: val_loss)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        seeds = parse_seeds(args.confirm_seeds) if args.confirm_seeds is not None else None
        out, tuning, command = write_tuning(Path(args.sweep), args.out, seeds, args.metric, not args.no_plots)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for arm in tuning.arms:
        best = f"best {LR_KEY} {fmt(arm.best.lr)} ({tuning.metric} {f4(arm.best.mean)}, n = {arm.best.n})" \
            if arm.best else "no tuned LR"
        print(f"  {arm.label}: {best}")
    for warning in tuning.warnings():
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"tuning: {out}/tuning.md\nconfirm (from the repository root):\n{command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
