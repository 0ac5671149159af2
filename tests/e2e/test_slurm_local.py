"""The SLURM path without a cluster: a sweep through submitit (hydra/launcher=slurm_local, submitit's LocalExecutor),
and a preempted job that SLURM requeues (SLURM_RESTART_COUNT > 0) continuing from last.ckpt to the uninterrupted
run's results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from kimi_lab.training import train
from kimi_lab.training.module import LanguageModelModule
from kimi_lab.training.lifecycle import Preempted
from kimi_lab.training.preemption import cluster_plugins
from kimi_lab.training.resume import resume_checkpoint
from tests.helpers import DATA_DIR, REPO_ROOT, compose_config, read_metrics

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional `slurm` extra is not installed")

TINY = ["trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.checkpoint_every_n_steps=4",
        "optimizer.warmup_steps=2", "model.dropout=0.1", "data.eval_lengths=[]", "logger.tensorboard=false", "seed=0"]


def test_slurm_local_sweep_runs_each_job_through_submitit_and_the_report_reads_it(tmp_path):
    from kimi_lab.stats.collect import collect_sweep

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "hydra/launcher=slurm_local", "model=tiny",
           f"paths.data_dir={DATA_DIR}", "trainer.max_steps=3", "trainer.val_check_interval=3",
           "optimizer.warmup_steps=1", "data.eval_lengths=[]", "logger.tensorboard=false", "seed=1,2",
           f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_RESTART_COUNT", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {n: json.loads((sweep / str(n) / "results.json").read_text()) for n in (0, 1)}
    assert [(r["status"], r["seed"], r["steps"]) for r in results.values()] == [("completed", 1, 3),
                                                                                ("completed", 2, 3)]
    # each job ran as a submitit job: its pickled call, its result and its log in the sweep's .submitit folder
    submitted = sorted((sweep / ".submitit").glob("*/*_submitted.pkl"))
    assert len(submitted) == 2 and len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    jobs = {j.name: j.status for j in collect_sweep(sweep).jobs}  # .submitit/ is not taken for a job
    assert jobs == {"0": "completed", "1": "completed"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same job trained to the end without a stop."""
    folder = tmp_path_factory.mktemp("full")
    return train(compose_config(TINY, output_dir=folder)), folder


@pytest.fixture
def counted_steps(monkeypatch):
    """Training batches this process ran (one per optimizer step here)."""
    calls = []
    step = LanguageModelModule.training_step

    def counting(self, batch, batch_idx):
        calls.append(self.global_step)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelModule, "training_step", counting)
    return calls


def _ends_as_uninterrupted(resumed: dict, folder, uninterrupted) -> None:
    full, full_folder = uninterrupted
    assert resumed["status"] == "completed" and resumed["steps"] == 8
    for key in ("val_loss", "best_val_loss", "best_val_step", "test_loss", "tokens_seen"):
        assert resumed[key] == full[key], key
    rows = [[(r["step"], r["train_loss"], r["val_loss"]) for r in part] for part in read_metrics(folder)]
    assert rows == [[(r["step"], r["train_loss"], r["val_loss"]) for r in part] for part in read_metrics(full_folder)]


def test_requeued_job_continues_from_last_ckpt_to_the_uninterrupted_results(tmp_path, monkeypatch, uninterrupted,
                                                                           counted_steps):
    folder = tmp_path / "job"
    cut = train(compose_config([*TINY, "trainer.interrupt_at_step=5"], output_dir=folder))
    assert cut["status"] == "interrupted" and torch.load(folder / "checkpoints" / "last.ckpt",
                                                         weights_only=False)["global_step"] == 5
    counted_steps.clear()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # as SLURM sets it in the requeued job; same overrides, no resume
    resumed = train(compose_config(TINY, output_dir=folder))
    assert counted_steps == [5, 6, 7]  # steps 6..8 only: it did not start again from step 0
    _ends_as_uninterrupted(resumed, folder, uninterrupted)


def _preempted_run(folder, monkeypatch, at_step: int, n_signals: int) -> tuple[Preempted, list[int | None]]:
    """Train TINY with ``n_signals`` warning signals sent before the forward pass of step ``at_step + 1``, under a
    stand-in for submitit's handler (it exits as submitit's does after its requeue); the job's ``Preempted`` and the
    step of last.ckpt when the handler ran (None: no last.ckpt)."""
    requeues = []

    def submitit_handler(signum, frame):  # submitit: checkpoint(), scontrol requeue, sys.exit(-1)
        ckpt = folder / "checkpoints" / "last.ckpt"
        requeues.append(torch.load(ckpt, weights_only=False)["global_step"] if ckpt.exists() else None)
        sys.exit(-1)

    step = LanguageModelModule.training_step

    def signalled(self, batch, batch_idx):
        if self.global_step == at_step:
            for _ in range(n_signals):
                os.kill(os.getpid(), signal.SIGUSR2)
        return step(self, batch, batch_idx)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        monkeypatch.setattr(LanguageModelModule, "training_step", signalled)
        with pytest.raises(Preempted) as stop:
            train(compose_config(TINY, output_dir=folder))
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # put back for the rest of the job
    finally:
        signal.signal(signal.SIGUSR2, previous)
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "interrupted" and status["requeued"] is True  # not failed: it continues
    return stop.value, requeues


def test_preemption_signal_writes_last_ckpt_when_the_step_ends_then_the_requeued_job_finishes(
        tmp_path, monkeypatch, uninterrupted):
    """The warning signal arrives in the middle of step 4 (in its forward pass): the step completes, last.ckpt holds
    step 4, then submitit's handler runs."""
    folder = tmp_path / "job"
    stop, requeues = _preempted_run(folder, monkeypatch, at_step=3, n_signals=1)
    assert requeues == [4] and stop.code == -1  # the process exits with submitit's code
    assert "SIGUSR2 after step 4: last.ckpt written" in json.loads((folder / "status.json").read_text())["reason"]

    monkeypatch.undo()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    resumed = train(compose_config(TINY, output_dir=folder))
    _ends_as_uninterrupted(resumed, folder, uninterrupted)


def test_a_second_warning_signal_in_the_same_step_requeues_at_once(tmp_path, monkeypatch):
    """Two warning signals before step 3 ends: the second runs submitit's handler at once, before any last.ckpt
    (checkpoint_every_n_steps=4), and the job still ends interrupted and requeued with submitit's exit code."""
    folder = tmp_path / "job"
    stop, requeues = _preempted_run(folder, monkeypatch, at_step=2, n_signals=2)
    assert requeues == [None] and stop.code == -1
    assert "a second SIGUSR2 before the step ended" in json.loads((folder / "status.json").read_text())["reason"]


def test_sigterm_mid_step_ends_the_job_interrupted_with_last_ckpt_of_that_step(tmp_path, monkeypatch):
    """SIGTERM (SLURM's preemption without the warning signal, scancel): Lightning's notice waits for the step's end,
    where last.ckpt is written; the job ends interrupted (results.json written), not failed."""
    step = LanguageModelModule.training_step

    def signalled(self, batch, batch_idx):
        if self.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelModule, "training_step", signalled)
    folder = tmp_path / "job"
    before = signal.getsignal(signal.SIGTERM)
    stopped = train(compose_config(TINY, output_dir=folder))
    assert signal.getsignal(signal.SIGTERM) == before
    assert stopped["status"] == "interrupted" and stopped["steps"] == 3
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_only_a_requeued_job_resumes_on_its_own(tmp_path, monkeypatch):
    """A fresh job (no SLURM_RESTART_COUNT, or 0) never picks up a checkpoint its folder holds; a requeued one takes
    its folder's last.ckpt, also over ckpt_path (what the earlier attempt reached), and starts over without one."""
    cfg, folder = compose_config(TINY), tmp_path / "job"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_checkpoint(cfg, folder) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_checkpoint(cfg, folder) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert resume_checkpoint(cfg, folder) == str(folder / "checkpoints" / "last.ckpt")
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"")
    assert resume_checkpoint(compose_config([*TINY, f"ckpt_path={other}"]), folder) == str(
        folder / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(cfg, tmp_path / "empty") is None


def test_lightning_auto_requeue_is_off_under_slurm(monkeypatch):
    """submitit requeues; Lightning's SLURM plugin must not register its own requeue (SIGUSR1, hpc checkpoint)."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    assert cluster_plugins() == []
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    (plugin,) = cluster_plugins()
    assert plugin.auto_requeue is False
