"""The run's callbacks run in the order ``trainer.ordered_callbacks`` states: Lightning keeps that list as it is."""

from __future__ import annotations

import pytest

from kimi_lab.training.rundir import RunDir
from kimi_lab.training.trainer import build_trainer
from tests.helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

RUN_ORDER = ["MemoryWindow", "ExpertLoadMonitor", "ExpertBiasUpdate", "StepMetrics", "OptimizerStepTimer",
             "DataPosition", "RngState", "LearningRateAtStep", "BestCheckpoint", "LastCheckpoint",
             "PreemptionCheckpoint", "InterruptAt"]


@pytest.mark.parametrize("policy", ["best", "none"])
def test_trainer_runs_callbacks_in_the_stated_order(tmp_path, policy):
    cfg = compose_config([f"trainer.save_checkpoints={policy}", "trainer.interrupt_at_step=3",
                          "logger.tensorboard=true"], output_dir=tmp_path)
    trainer, ours = build_trainer(cfg, RunDir(tmp_path, rank=0))
    names = [type(c).__name__ for c in trainer.callbacks]
    absent = set() if policy == "best" else {"BestCheckpoint", "LastCheckpoint", "PreemptionCheckpoint"}
    assert names == [n for n in RUN_ORDER if n not in absent]
    assert trainer.callbacks[0] is ours.memory and trainer.callbacks[-1] is ours.interrupt
