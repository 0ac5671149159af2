"""Resume: a preempted run ends as the uninterrupted one (validations, best checkpoint), an interrupted Muon run
resumes bit for bit (weights and every optimizer state), and only the same config may resume a checkpoint."""

from __future__ import annotations

import pytest
import torch

from kimi_lab.config import ConfigError
from kimi_lab.training import train
from kimi_lab.training.callbacks import RunInterrupted
from kimi_lab.training.checkpoints import InterruptAt
from tests.helpers import compose_config, read_metrics

QUICK = ["data.eval_lengths=[]", "logger.tensorboard=false", "optimizer.warmup_steps=1", "seed=0"]


def best_files(run_dir) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").glob("best-step*.ckpt")}


def test_preempted_run_resumes_with_the_same_validations_and_best_checkpoint(tmp_path, monkeypatch):
    """Killed during step 3 (no checkpoint of its own): the resume starts from the periodic last.ckpt of step 2, a
    validation step, which must hold step 2's validation and best score."""
    overrides = [*QUICK, "trainer.max_steps=6", "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2",
                 "optimizer.lr=2.0", "optimizer.schedule=constant", "trainer.gradient_clip_val=null",
                 "trainer.save_checkpoints=best"]
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = train(compose_config(overrides, output_dir=full_dir))
    assert full["best_val_step"] == 2, "the scenario needs the best validation at the checkpointed step"

    def killed(self, trainer):  # a preemption: the job dies without writing a checkpoint
        if trainer.global_step >= self.step:
            raise RunInterrupted("killed")

    monkeypatch.setattr(InterruptAt, "step_end", killed)
    assert train(compose_config([*overrides, "trainer.interrupt_at_step=3"], output_dir=cut_dir))["status"] == \
        "interrupted"
    ckpt = torch.load(cut_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    assert [r["step"] for r in ckpt["callbacks"]["StepMetrics"]["val_history"]] == [2]
    assert ckpt["callbacks"]["BestCheckpoint"]["best_step"] == 2

    resumed = train(compose_config([*overrides, "resume=true"], output_dir=cut_dir))
    assert resumed["status"] == "completed"
    for key in ("best_val_loss", "best_val_step", "val_loss"):
        assert resumed[key] == full[key], key
    assert best_files(cut_dir) == best_files(full_dir) == {"best-step2.ckpt"}
    assert val_rows(cut_dir) == val_rows(full_dir)


def val_rows(run_dir) -> list[tuple]:
    return [(r["step"], r["tokens"], r["val_loss"], r["val_acc"]) for r in read_metrics(run_dir)[1]]


def test_resume_refuses_another_config_before_training(tmp_path):
    overrides = [*QUICK, "trainer.max_steps=4", "trainer.val_check_interval=2"]
    cut_dir = tmp_path / "cut"
    train(compose_config([*overrides, "trainer.interrupt_at_step=2"], output_dir=cut_dir))
    before = {name: (cut_dir / name).read_bytes() for name in ("metrics.csv", "config_resolved.yaml",
                                                               "checkpoints/last.ckpt")}
    defaults = compose_config(overrides)
    with pytest.raises(ConfigError) as error:
        train(compose_config([*overrides, "resume=true", "seed=7", "optimizer.lr=0.1", "moe.aux_loss_alpha=0.5"],
                             output_dir=cut_dir))
    message = str(error.value)
    assert "seed=7 (checkpoint: 0)" in message
    assert f"optimizer.lr=0.1 (checkpoint: {defaults.optimizer.lr!r})" in message
    assert f"moe.aux_loss_alpha=0.5 (checkpoint: {defaults.moe.aux_loss_alpha!r})" in message
    assert "trainer.interrupt_at_step" not in message.split("; allowed")[0]  # run control may differ
    assert before == {name: (cut_dir / name).read_bytes() for name in before}  # nothing trained or rewritten
    # the job-control keys may change: the resume goes on
    resumed = train(compose_config([*overrides, "resume=true", "hardware.num_threads=1",
                                    "trainer.log_every_n_steps=1", "logger.tensorboard=true"], output_dir=cut_dir))
    assert resumed["status"] == "completed" and resumed["steps"] == 4


def test_data_position_is_saved_globally_and_refuses_another_device_count():
    """The checkpoint holds the global samples consumed (steps x batch x accumulation x ranks); a resume on another
    number of processes is refused with the key; a checkpoint without the entry (older code) resumes at
    steps x batch x accumulation x this run's ranks, as that code did."""
    from types import SimpleNamespace

    from kimi_lab.training.callbacks import DataPosition

    starts = []
    datamodule = SimpleNamespace(set_train_start=starts.append)
    position = DataPosition(samples_per_rank_step=4 * 2)  # batch 4, accumulate 2
    checkpoint = {"global_step": 3}
    position.on_save_checkpoint(SimpleNamespace(global_step=3, world_size=2), None, checkpoint)
    assert checkpoint[DataPosition.KEY] == {"samples_consumed": 3 * 4 * 2 * 2, "world_size": 2}
    position.on_load_checkpoint(SimpleNamespace(world_size=2, datamodule=datamodule), None, checkpoint)
    assert starts == [48]
    with pytest.raises(ValueError, match=r"hardware\.devices"):
        position.on_load_checkpoint(SimpleNamespace(world_size=1, datamodule=datamodule), None, checkpoint)
    position.on_load_checkpoint(SimpleNamespace(world_size=2, datamodule=datamodule), None, {"global_step": 5})
    assert starts == [48, 80]


def test_a_wrong_resume_command_leaves_the_runs_record_alone(tmp_path):
    """resume=true on a finished run is refused; a resume with other overrides is refused: neither touches the
    folder's status.json, results.json or config (a finished run stays finished, its results kept).
    A run interrupted at its last step resumes with nothing to train: its peak memory is null, not negative."""
    overrides = [*QUICK, "trainer.max_steps=2", "trainer.val_check_interval=2"]
    done = tmp_path / "done"
    train(compose_config(overrides, output_dir=done))
    files = ("status.json", "results.json", "config_resolved.yaml")
    before = {name: (done / name).read_bytes() for name in files}
    with pytest.raises(ConfigError, match=r"resume=true; .* holds a completed run, nothing to resume"):
        train(compose_config([*overrides, "resume=true"], output_dir=done))
    assert before == {name: (done / name).read_bytes() for name in files}

    cut = tmp_path / "cut"
    train(compose_config([*overrides, "trainer.interrupt_at_step=2"], output_dir=cut))
    before = {name: (cut / name).read_bytes() for name in files}
    with pytest.raises(ConfigError, match="seed=5"):
        train(compose_config([*overrides, "resume=true", "seed=5"], output_dir=cut))
    assert before == {name: (cut / name).read_bytes() for name in files}
    resumed = train(compose_config([*overrides, "resume=true"], output_dir=cut))
    assert resumed["status"] == "completed" and resumed["steps"] == 2
    assert resumed["peak_mem_mb"] is None and resumed["peak_mem_kind"].startswith("unmeasured")


@pytest.mark.usefixtures("one_thread")
def test_interrupted_muon_run_resumes_bit_for_bit(tmp_path):
    overrides = ["optimizer=muon", "trainer.max_steps=6", "trainer.val_check_interval=3", "optimizer.warmup_steps=2",
                 "trainer.checkpoint_every_n_steps=2", "seed=0"]
    full = train(compose_config(overrides, output_dir=tmp_path / "full"))
    assert train(compose_config([*overrides, "trainer.interrupt_at_step=3"],
                                output_dir=tmp_path / "cut"))["status"] == "interrupted"
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    assert {g["kind"] for g in ckpt["optimizer_states"][0]["param_groups"]} == {"muon", "muon_expert_bank", "adamw"}
    resumed = train(compose_config([*overrides, "resume=true"], output_dir=tmp_path / "cut"))
    assert resumed["status"] == "completed"
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for (ka, va), (kb, vb) in zip(a["optimizer_states"][0]["state"].items(),
                                  b["optimizer_states"][0]["state"].items()):
        assert ka == kb and all(torch.equal(va[k], vb[k]) for k in va), ka
    assert resumed["val_loss"] == full["val_loss"]
    assert full["optimizer_params"]["muon"]["count"] > 0 and "embed_tokens.weight" in \
        full["optimizer_params"]["adamw"]["patterns"]
    assert 0 < full["optimizer_step_share"] < 1
