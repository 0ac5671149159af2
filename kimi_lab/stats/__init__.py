"""Sweep statistics: read run folders (no torch, no model or training code), compare arms, write reports.

``collect_sweep(path)`` -> jobs and arms; ``compare_sweep(sweep)`` -> arm-vs-baseline statistics, the declared
primary metric's rows a confirmatory family and every other tested metric's an exploratory one, with verdicts;
``factorial.add_factorial(sweep, comparison)`` -> main effects over the grid and an ANOVA (two or more swept keys);
``python -m kimi_lab.stats.report [SWEEP]`` (or ``make report``) -> reports/<sweep>/.
"""

from kimi_lab.stats.collect import Arm, Job, Sweep, collect_sweep
from kimi_lab.stats.compare import Comparison, compare_samples, compare_sweep

__all__ = ["Arm", "Comparison", "Job", "Sweep", "collect_sweep", "compare_samples", "compare_sweep"]
