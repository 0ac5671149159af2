"""How a run ends: the best checkpoint agrees with results.json, a diverged run is recorded as such, TensorBoard's
train/loss is the step mean, and a failure while writing the results still marks the run failed."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from kimi_lab.training import train
from kimi_lab.training.init_weights import find_checkpoint
from kimi_lab.training.module import LanguageModelModule
from tests.helpers import compose_config, read_metrics

QUICK = ["data.eval_lengths=[]", "logger.tensorboard=false", "optimizer.warmup_steps=1", "seed=0"]


def test_final_validation_outside_the_schedule_can_be_the_best_checkpoint(tmp_path):
    run = tmp_path / "run"
    results = train(compose_config([*QUICK, "trainer.max_steps=5", "trainer.val_check_interval=2",
                                    "trainer.save_checkpoints=best"], output_dir=run))
    assert [r["step"] for r in read_metrics(run)[1]] == ["2", "4", "5"]  # 5: train()'s validation after fit
    assert results["best_val_step"] == 5, "the scenario needs the loss still falling at the last step"
    assert {p.name for p in (run / "checkpoints").glob("best-step*.ckpt")} == {"best-step5.ckpt"}
    best = torch.load(find_checkpoint(run), weights_only=False)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert best["global_step"] == 5
    assert all(torch.equal(value, last["state_dict"][key]) for key, value in best["state_dict"].items())
    # the choice follows results.json, not the newest file
    shutil.copy(run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best-step4.ckpt")
    assert find_checkpoint(run) == run / "checkpoints" / "best-step5.ckpt"
    (run / "results.json").unlink()
    with pytest.raises(FileNotFoundError, match="which is best"):  # two candidates, nothing says which: no guess
        find_checkpoint(run)


def nan_train_loss_from_step_3(monkeypatch):
    from kimi_lab.training import module

    calls = []

    def loss(*args):
        calls.append(1)  # one training forward per optimizer step (no accumulation)
        return module.linear_cross_entropy.__wrapped__(*args) * (math.nan if len(calls) >= 3 else 1.0)

    loss.__wrapped__ = module.linear_cross_entropy
    monkeypatch.setattr(module, "linear_cross_entropy", loss)


def nan_val_loss_from_step_4(monkeypatch):
    scores = LanguageModelModule._eval_epoch_end

    def nan_at_step_4(self, prefix):
        if prefix == "val" and self.trainer.global_step >= 4:
            self._eval_sums[0] = math.nan
        scores(self, prefix)

    monkeypatch.setattr(LanguageModelModule, "_eval_epoch_end", nan_at_step_4)


DIVERGED = {  # make_nan, overrides, diverged_at_step, steps run, finite train losses, val steps, last.ckpt step
    # NaN from step 3, seen at step 3's flush: a checkpoint step (flushed though log_every is 8), so the run stops
    # before last.ckpt is written with NaN weights
    "train_loss": (nan_train_loss_from_step_3, ["trainer.log_every_n_steps=8", "trainer.checkpoint_every_n_steps=3"],
                   3, 3, [True, True, False], ["2"], None),
    "val_loss": (nan_val_loss_from_step_4, ["trainer.log_every_n_steps=4", "trainer.checkpoint_every_n_steps=2"],
                 4, 4, [True] * 4, ["2", "4"], 2),
}


@pytest.mark.parametrize("case", DIVERGED)
def test_a_non_finite_loss_stops_the_run_as_diverged(tmp_path, monkeypatch, case):
    make_nan, overrides, at_step, steps, finite_train, val_steps, last_step = DIVERGED[case]
    make_nan(monkeypatch)
    run = tmp_path / "run"
    results = train(compose_config([*QUICK, "trainer.max_steps=8", "trainer.val_check_interval=2", *overrides],
                                   output_dir=run))  # returns: a sweep goes on
    status = json.loads((run / "status.json").read_text())
    assert results["status"] == status["status"] == "diverged"
    assert results["diverged_at_step"] == status["diverged_at_step"] == at_step
    assert json.loads((run / "results.json").read_text())["diverged_at_step"] == at_step
    assert results["steps"] == steps and "test_loss" not in results
    train_rows, val_rows = read_metrics(run)  # the non-finite rows are kept
    assert [math.isfinite(float(r["train_loss"])) for r in train_rows] == finite_train
    assert [r["step"] for r in val_rows] == val_steps
    assert [math.isfinite(float(r["val_loss"])) for r in val_rows] == [int(r["step"]) < at_step for r in val_rows]
    assert results["best_val_step"] == 2 and results["best_val_loss"] == float(val_rows[0]["val_loss"])
    last = run / "checkpoints" / "last.ckpt"  # never holds the non-finite weights
    assert (torch.load(last, weights_only=False)["global_step"] if last.exists() else None) == last_step
    # a relaunched sweep keeps the outcome: training is deterministic, it would diverge again
    again = train(compose_config([*QUICK, "trainer.max_steps=8", "trainer.val_check_interval=2", *overrides,
                                  "sweep.skip_completed=true"], output_dir=run))
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)  # NaN != NaN in a dict compare


def test_tensorboard_train_loss_is_the_step_mean_under_accumulation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(compose_config([*QUICK, "logger.tensorboard=true", "trainer.max_steps=5", "trainer.val_check_interval=2",
                          "trainer.accumulate_grad_batches=2", "trainer.log_every_n_steps=1"], output_dir=run))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    train_rows, val_rows = read_metrics(run)
    assert logged == pytest.approx({int(r["step"]): float(r["train_loss"]) for r in train_rows}, rel=1e-6)
    # validations at the optimizer step metrics.csv gives them (Lightning's own logging put them one step early)
    for tag in ("val_loss", "val_acc"):
        logged = {e.step: e.value for e in events.Scalars(tag)}
        assert logged == pytest.approx({int(r["step"]): float(r[tag]) for r in val_rows}, rel=1e-6), tag


def test_a_failure_while_writing_the_results_marks_the_run_failed(tmp_path, monkeypatch):
    from kimi_lab.training.rundir import RunDir

    def disk_full(self, results):
        raise OSError("No space left on device")

    monkeypatch.setattr(RunDir, "write_results", disk_full)
    with pytest.raises(OSError):
        train(compose_config([*QUICK, "trainer.max_steps=1", "trainer.val_check_interval=1"], output_dir=tmp_path))
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


def test_a_failed_job_releases_its_model_while_the_sweep_holds_the_exception(tmp_path):
    """Hydra keeps a failed job's exception until the sweep ends; its frames must not keep the model alive (on a GPU
    that memory would sit under every later job)."""
    import gc

    from kimi_lab.model.transformer import Transformer

    gc.collect()
    before = sum(isinstance(o, Transformer) for o in gc.get_objects())
    with pytest.raises(FileNotFoundError) as held:  # fails after the model is built
        train(compose_config([*QUICK, f"init_from={tmp_path / 'no-such-run'}"], output_dir=tmp_path / "run"))
    gc.collect()
    assert held.value.__traceback__ is not None
    assert sum(isinstance(o, Transformer) for o in gc.get_objects()) == before


def test_run_files_are_readable_by_the_group_as_open_would_make_them(tmp_path):
    """results.json, status.json and config_resolved.yaml go through a temp file + rename: they must get the mode a
    plain open() gives (0666 less the umask), not mkstemp's 0600 (a teammate's `make report` could not read them)."""
    import os
    import stat

    from kimi_lab.training.rundir import atomic_write_json

    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "results.json", {"status": "completed"})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(previous)
    mode = stat.S_IMODE((tmp_path / "results.json").stat().st_mode)
    assert mode == 0o644 == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)


def test_step_timings_wait_for_the_device_at_their_edges(tmp_path, monkeypatch):
    """On CUDA a step's clock must stop after its kernels ran, not after their launch: the timers call
    wait_for_device at each edge (faked here as a 40 ms wait for queued work, on any machine)."""
    import time

    from kimi_lab.training import callbacks

    waits = []

    def queued_work(device):
        waits.append(time.perf_counter())
        time.sleep(0.04)

    monkeypatch.setattr(callbacks, "wait_for_device", queued_work)
    results = train(compose_config([*QUICK, "trainer.max_steps=2", "trainer.val_check_interval=2"],
                                   output_dir=tmp_path / "run"))
    assert len(waits) == 2 * 2 + 2 * 2  # per step: its start and end, the optimizer update's start and end
    # the end-of-step wait and both optimizer waits fall inside the step's window, the start wait before it
    assert results["step_time_ms"] >= 3 * 40 and results["optimizer_step_ms"] >= 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_hardware_gpu_without_cuda_is_a_one_line_config_error(tmp_path):
    from kimi_lab.config import ConfigError

    with pytest.raises(ConfigError, match=r"hardware\.accelerator=gpu .*allowed: cpu on this machine"):
        train(compose_config([*QUICK, "hardware=gpu"], output_dir=tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def test_lightning_banners_are_dropped_from_job_logs_but_warnings_pass():
    import logging

    from kimi_lab.training.trainer import _NoBanner

    def record(level, message):
        return logging.LogRecord("lightning.pytorch.utilities.rank_zero", level, __file__, 1, message, None, None)

    banner = _NoBanner()
    assert not banner.filter(record(logging.INFO, "💡 Tip: For seamless cloud logging and experiment tracking"))
    assert not banner.filter(record(logging.INFO, "GPU available: False, used: False"))
    assert banner.filter(record(logging.INFO, "Restoring states from the checkpoint path at last.ckpt"))
    assert banner.filter(record(logging.WARNING, "GPU available but not used."))
