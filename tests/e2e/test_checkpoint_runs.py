"""trainer.save_checkpoints in tiny runs: which files checkpoints/ holds (last | best | none), what reads them, that
results.json does not depend on the choice, and that a run without checkpoints refuses resume=true in one line."""

from __future__ import annotations

import json

import pytest
import torch

from kimi_lab.config import ConfigError
from kimi_lab.model import build_model
from kimi_lab.training import train
from kimi_lab.training.init_weights import find_checkpoint, load_model_weights
from tests.helpers import compose_config, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["data.eval_lengths=[]", "logger.tensorboard=false", "optimizer.warmup_steps=1", "seed=0",
         "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2"]


def _files(run) -> set[str]:
    folder = run / "checkpoints"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.mark.parametrize("policy", ["last", "best", "none"])
def test_each_policy_keeps_its_files_and_the_same_results(tmp_path, policy):
    run = tmp_path / policy
    results = train(compose_config([*QUICK, f"trainer.save_checkpoints={policy}"], output_dir=run))
    assert results["status"] == "completed"
    vals = [float(r["val_loss"]) for r in read_metrics(run)[1]]
    assert results["best_val_loss"] == min(vals) and results["best_val_step"] in (2, 4)  # no file needed
    best = f"best-step{results['best_val_step']}.ckpt"
    assert _files(run) == {"last": {"last.ckpt"}, "best": {"last.ckpt", best}, "none": set()}[policy]
    if policy == "none":
        return
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 4 and "optimizer_states" in last and "callbacks" in last  # resume needs them
    if policy == "best":
        weights = torch.load(run / "checkpoints" / best, weights_only=False)
        assert weights["global_step"] == results["best_val_step"]
        assert "optimizer_states" not in weights and "callbacks" not in weights  # weights only
        assert weights["state_dict"].keys() == last["state_dict"].keys()
    # init_from and the export read the run folder: best where kept, else last
    assert find_checkpoint(run, "last").name == "last.ckpt"
    read = load_model_weights(build_model(compose_config(QUICK)), run)
    assert read.name == (best if policy == "best" else "last.ckpt")


def test_resume_without_checkpoints_fails_in_one_line_and_touches_nothing(tmp_path):
    run = tmp_path / "run"
    cut = train(compose_config([*QUICK, "trainer.save_checkpoints=none", "trainer.interrupt_at_step=2"],
                               output_dir=run))
    assert cut["status"] == "interrupted" and _files(run) == set()  # the simulated preemption writes none either
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError) as error:
        train(compose_config([*QUICK, "trainer.save_checkpoints=none", "resume=true"], output_dir=run))
    message = str(error.value)
    assert "\n" not in message and message.startswith("Invalid config: trainer.save_checkpoints='none'")
    assert "resume=true" in message and "last or best" in message
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
