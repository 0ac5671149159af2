"""Every report.* key is used: it changes no run, so it must reach what the report reads.

The report (kimi_lab/stats) reads the block from results.json["report"], which training writes (the model and
eval keys are covered in tests/config/test_keys_used.py).
"""

from __future__ import annotations

import pytest
from omegaconf import DictConfig

from kimi_lab.config import validate_config
from tests.helpers import compose_config

# key -> (command-line override, the value the report must read)
REPORT_PERTURBATIONS = {
    "report.primary_metric": ("report.primary_metric=val_acc", "val_acc"),
    "report.sesoi": ("report.sesoi.val_loss=0.05", {"val_loss": 0.05}),
    "report.target": ("+report.target.val_loss=5.8", {"val_loss": 5.8}),
    "report.mde_goal": ("report.mde_goal=0.1", 0.1),
    "report.tuning_seeds": ("report.tuning_seeds=[3,4]", [3, 4]),
    "report.tuning_sweep": ("report.tuning_sweep=multirun/tune", "multirun/tune"),
}


def _report_settings(cfg: DictConfig):
    """The report's settings for a sweep of one completed run of ``cfg`` (its results.json report block)."""
    import json
    from pathlib import Path

    from kimi_lab.stats.collect import Job, Sweep
    from kimi_lab.stats.settings import resolve_settings
    from kimi_lab.training.results import report_block

    block = json.loads(json.dumps(report_block(cfg)))  # as results.json holds it
    job = Job(name="0", path=Path("0"), overrides={}, status="completed", results={"report": block, "seed": 1})
    return resolve_settings(Sweep(path=Path("sweep"), jobs=[job], factors={}, arms=[]))


def test_report_keys_are_all_in_the_table():
    keys = {f"report.{key}" for key in compose_config()["report"]}
    assert keys == set(REPORT_PERTURBATIONS), "add the new report.* key to REPORT_PERTURBATIONS"


@pytest.mark.parametrize("key", sorted(REPORT_PERTURBATIONS))
def test_every_report_key_reaches_the_report(key):
    override, new = REPORT_PERTURBATIONS[key]
    base, cfg = compose_config(), compose_config([override])
    validate_config(cfg)
    name = key.removeprefix("report.")
    before, after = getattr(_report_settings(base), name), getattr(_report_settings(cfg), name)
    assert after == new and after != before, f"{key} -> {new!r}: the report read {after!r}"
