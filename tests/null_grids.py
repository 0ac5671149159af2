"""Null factorial grids for the false-positive checks of tests/stats/test_factorial.py: a batch of 2 x 4 x 3 grids
(``norm`` x ``optimizer.lr`` x seed; tests/synthetic.py ``null_grid_values``: a seed x norm effect, no norm main
effect) and, per grid, the p of the norm main effect read at the seed level (``factorial.main_effect``, the function
``add_factorial`` calls) and of the pooled (context, seed) paired t-test (``scipy.stats.ttest_rel``).

The grids share one sweep folder in the real job format, collected once by ``collect_sweep`` (its arms and the twin
arms of the norm effect); each grid's val losses are matched to that sweep's jobs by folder, as ``arm_values`` reads
them once ``set_grid_values`` has written the grid, so a batch of 400 takes seconds, where the whole report path
(files, collect, compare, ANOVA) takes about 0.15 s a grid.
``test_the_null_rate_path_is_the_report_path`` runs grids of the same batch through the files and the whole path and
checks that it gives the same p."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from kimi_lab.stats import collect_sweep, compare_sweep
from kimi_lab.stats.compare import arm_values
from kimi_lab.stats.factorial import main_effect, twin_arms
from tests.synthetic import NULL_LRS, SEEDS, null_grid_values, set_grid_values, write_null_grid_jobs

N_GRIDS, BATCH_SEED = 400, 20260105  # a fixed batch: the rates below are deterministic


@pytest.fixture
def frozen_gc():
    """statsmodels' Holm (``multipletests``, stats/multitest.py) calls ``gc.collect()`` on every call: 0.1-0.4 s in a
    test process that holds many objects, most of a report's run time. Frozen objects (``gc.freeze``) are skipped by
    the collector, so each call scans only what the test made; the statistics are unaffected."""
    gc.freeze()
    yield
    gc.unfreeze()


@dataclass
class NullBatch:
    root: Path  # the sweep folder, holding the values of the last grid written
    jobs: dict[tuple[str, str, int], Path]  # (norm, lr, seed) -> job folder
    values: list[dict[tuple[str, str, int], float]]  # per grid: (norm, lr, seed) -> val loss
    p_seed: np.ndarray  # per grid: the norm main effect's p, paired over the 3 seeds' means
    p_pooled: np.ndarray  # per grid: the paired t-test's p over the 12 (lr, seed) pairs as if independent


def null_batch(tmp_path: Path, n: int = N_GRIDS, seed: int = BATCH_SEED) -> NullBatch:
    root, jobs = write_null_grid_jobs(tmp_path)
    rng = np.random.default_rng(seed)
    values = [null_grid_values(rng) for _ in range(n)]
    set_grid_values(jobs, values[0])
    sweep = collect_sweep(root)
    comp = compare_sweep(sweep)
    assert comp.baseline == f"norm=layernorm, optimizer.lr={sweep.factors['optimizer.lr'][0]}"
    twins = twin_arms(sweep, "norm", "rmsnorm", "layernorm")
    key_of = {path: key for key, path in jobs.items()}
    assert arm_values(sweep, comp.target_loss, comp.metrics)["val_loss"] == _per_arm(sweep, key_of, values[0])
    p_seed, p_pooled = [], []
    for grid in values:
        per_arm = _per_arm(sweep, key_of, grid)
        p_seed.append(main_effect(sweep, per_arm, "norm", "rmsnorm", "layernorm", twins, comp.alpha)["p"])
        pairs = [(grid["rmsnorm", lr, s], grid["layernorm", lr, s]) for lr in NULL_LRS for s in SEEDS]
        p_pooled.append(stats.ttest_rel(*zip(*pairs)).pvalue)
    return NullBatch(root, jobs, values, np.array(p_seed), np.array(p_pooled))



def _per_arm(sweep, key_of: dict[Path, tuple[str, str, int]], grid: dict) -> dict[str, dict[int, float]]:
    """arm label -> {seed: val loss} of ``grid``: what ``arm_values`` reads from results.json once the grid is there."""
    return {arm.label: {job.seed: grid[key_of[job.path]] for job in arm.completed} for arm in sweep.arms}
