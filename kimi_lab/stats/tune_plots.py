"""lr_sensitivity.png: the tuned metric vs learning rate per arm (Wortsman et al. 2023 read these curves: the
sensitivity itself is a result). Each seed's run is a dot, the mean over completed seeds a line (a hollow marker where
a seed diverged or failed, so the mean flatters that LR); the best LR is a star, an edge optimum is labelled with the
LR to add; diverged seeds are crosses at the top edge."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from kimi_lab.stats.plots import pyplot
from kimi_lab.stats.verdicts import fmt

if TYPE_CHECKING:
    from kimi_lab.stats.tune import Tuning


def figure_lr_sensitivity(tuning: Tuning):
    """One axes, log x: per-seed points, the mean line per arm, the best LR starred; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    top = ax.get_xaxis_transform()  # x in data units, y in axes units: diverged seeds sit at the top
    for index, arm in enumerate(tuning.arms):
        color = f"C{index % 10}"
        xs = [c.lr for c in arm.cells for _ in c.values]
        ys = [v for c in arm.cells for v in c.values.values()]
        ax.scatter(xs, ys, s=14, color=color, alpha=0.45, linewidths=0)
        means = [(c.lr, c.mean) for c in arm.cells if math.isfinite(c.mean)]
        if means:
            ax.plot(*zip(*means), "-", color=color, label=arm.label)
        for cell in arm.cells:  # hollow: a mean that leaves out a diverged or lost seed (never best)
            if math.isfinite(cell.mean):
                ax.scatter([cell.lr], [cell.mean], s=28, color=color, facecolors=color if cell.eligible else "white",
                           zorder=4)
        diverged = [c.lr for c in arm.cells for _ in c.diverged]
        if diverged:
            ax.scatter(diverged, [0.97] * len(diverged), marker="x", color=color, transform=top, clip_on=False)
        if arm.best is not None:
            ax.scatter([arm.best.lr], [arm.best.mean], marker="*", s=180, color=color, edgecolors="black", zorder=5)
            if arm.edge:
                ax.annotate(f"edge: add {arm.suggestion():.3g}", (arm.best.lr, arm.best.mean), color=color,
                            textcoords="offset points", xytext=(6, -14 if arm.edge == "low" else 8), fontsize=8,
                            fontweight="bold")
    ax.set_xscale("log")
    ax.set_xlabel("optimizer.lr (log scale)")
    ax.set_ylabel(f"final {tuning.metric} ({'lower' if tuning.lower_is_better else 'higher'} is better)")
    seeds = ", ".join(str(s) for s in tuning.tuning_seeds)
    ax.set_title(f"LR sensitivity on tuning seeds {seeds}\ndots = seeds, line = mean (hollow: a seed diverged or "
                 "failed), star = best, x = diverged seed", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    lrs = sorted({c.lr for a in tuning.arms for c in a.cells})
    ax.set_xticks(lrs, [fmt(x) for x in lrs], rotation=45, fontsize=8)
    ax.minorticks_off()
    return fig


def write_lr_sensitivity(tuning: Tuning, out: Path) -> Path | None:
    """out/lr_sensitivity.png; None without matplotlib."""
    fig = figure_lr_sensitivity(tuning)
    if fig is None:
        return None
    path = out / "lr_sensitivity.png"
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
