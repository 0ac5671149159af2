"""Performance options in tiny runs: hardware.compile=true trains through Lightning; bf16-mixed on CPU trains with a
falling loss and reads rows from the device every trainer.log_every_n_steps while every step keeps its row."""

from __future__ import annotations

import json
import math

import pytest

from kimi_lab.training import train
from tests.helpers import compose_config, read_metrics

FAST = ["trainer.max_steps=6", "trainer.val_check_interval=3", "optimizer.warmup_steps=2", "data.eval_lengths=[]"]


@pytest.mark.slow
def test_compile_true_trains_through_lightning(tmp_path, one_thread):
    results = train(compose_config([*FAST, "hardware.compile=true"], output_dir=tmp_path))
    assert results["status"] == "completed" and math.isfinite(results["val_loss"])


def test_bf16_mixed_on_cpu_trains_and_logs_every_n_steps(tmp_path, one_thread):
    """bf16-mixed on CPU: finite, decreasing loss; rows are read from the device every 4 steps but every step
    still has its own row (MoE columns included)."""
    cfg = compose_config([*FAST, "trainer.max_steps=8", "optimizer.lr=1e-2", "hardware.precision=bf16-mixed",
                          "trainer.log_every_n_steps=4"], output_dir=tmp_path)
    results = train(cfg)
    rows, vals = read_metrics(tmp_path)
    losses = [float(r["train_loss"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(1, 9)) and [int(r["step"]) for r in vals] == [3, 6, 8]
    assert all(math.isfinite(v) for v in losses) and sum(losses[-3:]) < sum(losses[:3])
    assert all(r["moe0_load"] and float(r["grad_norm"]) > 0 for r in rows)
    assert math.isclose(sum(json.loads(rows[-1]["moe0_load"])), 1.0, rel_tol=1e-4)
    assert results["status"] == "completed" and math.isfinite(results["val_loss"])
