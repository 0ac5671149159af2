"""A resumed run's metrics.csv keeps the rows up to the checkpointed step in this run's columns: a column an older
run folder holds and this code does not write (a per-layer MoE counter) is left out, never a reason to fail."""

from __future__ import annotations

import csv

from kimi_lab.training.callbacks import METRIC_FIELDS, StepMetrics
from kimi_lab.training.moe_balance import ExpertLoadMonitor

MOE_FIELDS = ["moe0_load", "moe0_cv", "moe0_maxvio", "moe0_aux_loss", "moe0_bias"]


def test_resume_keeps_rows_to_the_checkpoint_and_drops_columns_no_longer_written(tmp_path):
    path = tmp_path / "metrics.csv"
    old_fields = [*METRIC_FIELDS, *MOE_FIELDS[:4], "moe0_tokens_dropped", "moe0_bias"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields)
        writer.writeheader()
        writer.writerows({"step": s, "train_loss": 10 - s, "moe0_tokens_dropped": 0, "moe0_cv": 0.1 * s}
                         for s in range(1, 5))
    metrics = StepMetrics(path, tokens_per_micro_batch=8, expert_monitor=ExpertLoadMonitor())
    metrics.fields = [*METRIC_FIELDS, *MOE_FIELDS]
    metrics._truncate_csv(after_step=2)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == metrics.fields
    assert [(r["step"], r["train_loss"], r["moe0_cv"]) for r in rows] == [("1", "9", "0.1"), ("2", "8", "0.2")]
    assert not list(tmp_path.glob(".metrics.csv.*"))  # the atomic replace left no temp file
