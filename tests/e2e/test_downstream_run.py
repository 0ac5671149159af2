"""eval=downstream in a tiny training run: results.json and TensorBoard's hparams hold each task's scores, and
`python -m kimi_lab.evaluation RUN` rebuilds the model from the run folder and gives the same numbers."""

from __future__ import annotations

import json
import math

import pytest

from kimi_lab.training import train
from tests.helpers import compose_config, needs_olmo_eval, tensorboard_hparams

pytestmark = pytest.mark.usefixtures("one_thread")


@needs_olmo_eval
def test_training_run_with_eval_downstream_writes_results(tmp_path):
    overrides = ["trainer.max_steps=2", "trainer.val_check_interval=2", "optimizer.warmup_steps=1",
                 "eval=downstream", "eval.tasks=[arc_easy,lambada]", "eval.limit=3", "data.eval_lengths=[]"]
    results = train(compose_config(overrides, output_dir=tmp_path / "on"))
    on_disk = json.loads((tmp_path / "on" / "results.json").read_text())
    assert list(on_disk["downstream"]) == ["arc_easy", "lambada"] == list(results["downstream"])
    assert on_disk["downstream"]["arc_easy"]["n"] == 3 and set(on_disk["downstream"]["lambada"]) >= {"acc", "ppl"}
    assert 0 <= on_disk["downstream"]["arc_easy"]["acc_norm"] <= 1
    assert on_disk["test_ppl"] == pytest.approx(math.exp(on_disk["test_loss"]), rel=1e-5)  # always computed
    hparams = tensorboard_hparams(tmp_path / "on" / "tensorboard")
    assert hparams["hp/downstream/arc_easy/acc_norm"] == pytest.approx(on_disk["downstream"]["arc_easy"]["acc_norm"])
    # the CLI rebuilds the model from the run folder and last.ckpt: the same numbers
    from kimi_lab.evaluation.__main__ import main

    cli = main([str(tmp_path / "on"), "--tasks", "arc_easy", "lambada", "--limit", "3", "--write"])["downstream"]
    for task, metrics in on_disk["downstream"].items():
        for key, value in metrics.items():
            if key != "seconds":
                assert cli[task][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    assert json.loads((tmp_path / "on" / "results.json").read_text())["downstream_checkpoint"].endswith("last.ckpt")
