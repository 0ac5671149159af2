"""PNG plots of a report, only when matplotlib is installed (the optional `report` extra).

Each ``figure_*`` function returns a matplotlib Figure (or None when the sweep has nothing to show), so
``notebooks/analysis.ipynb`` redraws exactly what ``make report`` wrote."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from kimi_lab.stats.collect import Arm, Sweep
from kimi_lab.stats.compare import Comparison, ci_label
from kimi_lab.stats.metrics import _finite

EFFECT_METRICS = ("val_loss", "test_loss", "val_acc")  # after the primary metric; timings are never tested
ABLATION_KEY = "ablation"  # the combined study's factor: full, baseline, minus_<component>
LEAVE_ONE_OUT_METRICS = ("val_loss", "test_loss", "peak_mem_mb")


def pyplot():
    """matplotlib.pyplot with the file-only backend, or None without matplotlib."""
    try:
        import matplotlib

        if "matplotlib.pyplot" not in sys.modules:  # a notebook's inline backend stays as it is
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def comparison_rows(report: dict) -> list[dict]:
    """report.json's comparisons with its nulls back to NaN, as ``figure_effects`` / ``figure_leave_one_out`` take."""
    return [{k: math.nan if v is None else v for k, v in row.items()} for row in report["comparisons"]]


def _mean_band(arm: Arm, x_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(x, mean, min, max) of val loss over the arm's seeds at the validation steps all seeds share."""
    curves = [{r["step"]: (r.get(x_key, math.nan), r["val_loss"]) for r in j.val_rows} for j in arm.completed]
    curves = [c for c in curves if c]
    if not curves:
        return None
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    x = np.array([[c[s][0] for s in steps] for c in curves]).mean(axis=0)  # same tokens; wall time varies
    y = np.array([[c[s][1] for s in steps] for c in curves])
    return x, y.mean(axis=0), y.min(axis=0), y.max(axis=0)


def figure_curves(sweep: Sweep):
    """val loss vs training tokens and vs wall time per arm: mean over seeds, band = min..max."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, (x_key, x_label) in zip(axes, (("tokens", "training tokens"), ("wall_time_s", "wall time (s)"))):
        for arm in sweep.arms:
            band = _mean_band(arm, x_key)
            if band is None:
                continue
            x, mean, low, high = band
            (line,) = ax.plot(x, mean, marker=".", label=f"{arm.label} (n={len(arm.completed)})")
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(xlabel=x_label, ylabel="val loss", title=f"val loss vs {x_label} (band: seed min..max)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def effect_metrics(rows: list[dict], primary: str = "val_loss", metrics=EFFECT_METRICS) -> tuple[str, ...]:
    """The primary metric, then ``metrics``, each only when some row has it."""
    present = {r["metric"] for r in rows}
    return tuple(m for m in dict.fromkeys((primary, *metrics)) if m in present)


def _panel_title(metric: str, rows: list[dict]) -> str:
    """'val_loss (confirmatory)' / 'test_loss (exploratory)' from the rows' family."""
    family = next((r.get("family") for r in rows if r.get("family")), "")
    return f"{metric} ({family})" if family else metric


def _error_bars(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    diff = np.array([r["diff"] for r in rows], dtype=float)
    err = np.array([[r["diff"] - r["ci_low"], r["ci_high"] - r["diff"]] for r in rows], dtype=float).reshape(-1, 2)
    return diff, np.nan_to_num(err.T)  # no CI (one seed): a bare point


def figure_effects(rows: list[dict], baseline: str, metrics=EFFECT_METRICS, title: str | None = None,
                   alpha: float = 0.05):
    """Each arm minus the baseline with its (1 - alpha) CI, one panel per metric (``rows``: the report's
    comparisons), titled with the metric's family (confirmatory / exploratory); metrics without rows are left out,
    and None when no metric has one."""
    metrics = [m for m in metrics if any(r["metric"] == m for r in rows)]
    if not metrics:
        return None
    plt = pyplot()
    n_arms = max(len({r["arm"] for r in rows}), 1)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, (0.35 * n_arms + 1.0) * len(metrics)),
                             constrained_layout=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        metric_rows = [r for r in rows if r["metric"] == metric]
        y = np.arange(len(metric_rows))
        diff, err = _error_bars(metric_rows)
        ax.errorbar(diff, y, xerr=err, fmt="o", capsize=3)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_yticks(y, [r["arm"] for r in metric_rows], fontsize=8)
        ax.set_title(_panel_title(metric, metric_rows), fontsize=10, loc="left")
    fig.suptitle(title or f"arm - baseline ({baseline}), {ci_label(alpha)}", fontsize=10)
    return fig


def figure_main_effects(rows: list[dict], metrics=EFFECT_METRICS, alpha: float = 0.05):
    """Factorial sweeps: each level minus its key's baseline level over the grid, (1 - alpha) CI (``rows``: the
    report's main effects); None for a one-key sweep."""
    if not rows:
        return None
    labelled = [{**r, "arm": f"{r['arm']} vs {r['base_level']}"} for r in rows]
    return figure_effects(labelled, "", metrics,
                          f"main effects over the grid (level - baseline level), {ci_label(alpha)}")


def ablation_name(arm_label: str) -> str | None:
    """'ablation=minus_norm' -> 'minus_norm'; None for arms of sweeps without the ablation factor."""
    for part in arm_label.split(", "):
        key, _, value = part.partition("=")
        if key == ABLATION_KEY:
            return value
    return None


def figure_leave_one_out(rows: list[dict], baseline: str, metrics=LEAVE_ONE_OUT_METRICS, alpha: float = 0.05):
    """The combined study: what removing each component (arm ``minus_<c>``) and all of them (``baseline``) costs
    relative to the full combination, with (1 - alpha) CIs. None unless the baseline arm is an ``ablation`` arm."""
    if ablation_name(baseline) is None:
        return None
    metrics = [m for m in metrics if any(r["metric"] == m for r in rows)]
    if not metrics:
        return None
    plt = pyplot()
    n_arms = len({r["arm"] for r in rows})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.45 * n_arms + 1.8),
                             constrained_layout=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        metric_rows = [r for r in rows if r["metric"] == metric]
        names = [ablation_name(r["arm"]) or r["arm"] for r in metric_rows]
        labels = [f"without {n.removeprefix('minus_')}" if n.startswith("minus_") else n for n in names]
        diff, err = _error_bars(metric_rows)
        y = np.arange(len(metric_rows))
        ax.barh(y, np.nan_to_num(diff), xerr=err, capsize=3, color="tab:red", alpha=0.7)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{_panel_title(metric, metric_rows)}: arm - {ablation_name(baseline)}", fontsize=10,
                     loc="left")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"leave-one-out ablation ({ci_label(alpha)})", fontsize=10)
    return fig


def expert_load_by_arm(sweep: Sweep) -> dict[str, np.ndarray]:
    """arm -> (MoE layers, experts) share of routed tokens, mean over the arm's completed seeds."""
    loads = {}
    for arm in sweep.arms:
        per_seed = [np.asarray(j.results["expert_load"], dtype=float) for j in arm.completed
                    if j.results.get("expert_load")]
        if per_seed and len({a.shape for a in per_seed}) == 1:
            loads[arm.label] = np.mean(per_seed, axis=0)
    return loads


def expert_load_cv_by_arm(sweep: Sweep) -> dict[str, float]:
    """arm -> mean over its completed seeds of each run's ``expert_load_cv`` (the report's metric), else of the CV
    of each run's ``expert_load``: per-seed imbalance, which the CV of the seed-mean load would average away."""
    out = {}
    for arm in sweep.arms:
        per_seed = []
        for job in arm.completed:
            cv = _finite(job.results.get("expert_load_cv"))  # per layer -> their mean, as the metric reads it
            if not math.isfinite(cv) and job.results.get("expert_load"):
                load = np.asarray(job.results["expert_load"], dtype=float)
                cv = float((load.std(axis=1) / load.mean(axis=1)).mean())
            if math.isfinite(cv):
                per_seed.append(cv)
        if per_seed:
            out[arm.label] = float(np.mean(per_seed))
    return out


def figure_expert_load(sweep: Sweep):
    """One heat map per MoE arm: load of each expert in each layer relative to uniform (1 = balanced)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    loads = expert_load_by_arm(sweep)
    if not loads:
        return None
    cv_by_arm = expert_load_cv_by_arm(sweep)
    plt = pyplot()
    cols = min(3, len(loads))
    rows = math.ceil(len(loads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 2.6 * rows), constrained_layout=True, squeeze=False)
    top = max(2.0, max(float((load * load.shape[1]).max()) for load in loads.values()))
    for ax, (label, load) in zip(axes.flat, loads.items()):
        relative = load * load.shape[1]  # share x experts: 1 everywhere when balanced
        image = ax.imshow(relative, aspect="auto", cmap="coolwarm", norm=TwoSlopeNorm(1.0, 0.0, top))
        cv = cv_by_arm.get(label, math.nan)
        ax.set(xlabel="expert", ylabel="MoE layer", title=f"{label}\nexpert_load_cv {cv:.2f} (mean over seeds)")
        ax.title.set_fontsize(8)
        ax.set_yticks(range(load.shape[0]))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(loads):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label="load / uniform load", shrink=0.8)
    return fig


def write_plots(sweep: Sweep, comp: Comparison, out: Path) -> list[Path]:
    """Every figure the sweep has data for, as PNGs in ``out``; [] without matplotlib."""
    plt = pyplot()
    if plt is None:
        return []
    primary = comp.settings.primary_metric
    figures = {"val_loss_curves": figure_curves(sweep),
               "effects": figure_effects(comp.rows, comp.baseline, effect_metrics(comp.rows, primary),
                                         alpha=comp.alpha),
               "main_effects": figure_main_effects(comp.main_effects, effect_metrics(comp.main_effects, primary),
                                                   alpha=comp.alpha),
               "leave_one_out": figure_leave_one_out(comp.rows, comp.baseline, effect_metrics(
                   comp.rows, primary, LEAVE_ONE_OUT_METRICS[1:]), alpha=comp.alpha),
               "expert_load": figure_expert_load(sweep)}
    written = []
    for name, fig in figures.items():
        if fig is None:
            continue
        written.append(out / f"{name}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
