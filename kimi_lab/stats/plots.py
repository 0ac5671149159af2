"""PNG plots of a report, only when matplotlib is installed (the optional `report` extra)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kimi_lab.stats.collect import Arm, Sweep
from kimi_lab.stats.compare import Comparison

EFFECT_METRICS = ("val_loss", "test_loss", "val_acc", "tokens_per_s")


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


def write_plots(sweep: Sweep, comp: Comparison, out: Path) -> list[Path]:
    """val loss vs tokens and vs wall time per arm (mean, band = min..max over seeds); effect sizes with CIs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
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
    written.append(out / "val_loss_curves.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    height = (0.35 * max(len(sweep.arms) - 1, 1) + 1.0) * len(EFFECT_METRICS)
    fig, axes = plt.subplots(len(EFFECT_METRICS), 1, figsize=(8, height), constrained_layout=True)
    for ax, metric in zip(axes, EFFECT_METRICS):
        rows = [r for r in comp.rows if r["metric"] == metric]
        y = np.arange(len(rows))
        diff = np.array([r["diff"] for r in rows], dtype=float)
        err = np.array([[r["diff"] - r["ci_low"], r["ci_high"] - r["diff"]] for r in rows], dtype=float).T
        ax.errorbar(diff, y, xerr=np.nan_to_num(err.reshape(2, -1)), fmt="o", capsize=3)
        ax.axvline(0, color="grey", linewidth=1)
        ax.set_yticks(y, [r["arm"] for r in rows], fontsize=8)
        ax.set_title(metric, fontsize=10, loc="left")
    fig.suptitle(f"arm - baseline ({comp.baseline}), 95 % CI", fontsize=10)
    written.append(out / "effects.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
