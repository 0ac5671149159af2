"""DDP: only global rank zero writes the run folder; validation, test and length-eval windows are split across the
processes and their sums added, so a 2-process gloo run's losses are the 1-process losses of its weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from kimi_lab.config import ConfigError
from kimi_lab.data import LMDataModule
from kimi_lab.training import train
from kimi_lab.training.rundir import RunDir
from tests.helpers import DATA_DIR, REPO_ROOT, compose_config, read_metrics

# odd window counts, so a mean of the processes' means would differ from the token mean: val 3 windows of 32 (2 + 1),
# test 5 (3 + 2); the length eval's one block of 64 is one window at 2x, which one process scores alone
COMMON = ["seed=0", "optimizer.warmup_steps=2", "data.val_tokens=96", "data.test_tokens=160", "data.eval_lengths=[1,2]",
          "trainer.save_checkpoints=best"]
DDP = [*COMMON, "hardware.devices=2", "hardware.strategy=ddp", "trainer.max_steps=6", "trainer.val_check_interval=3",
       "trainer.checkpoint_every_n_steps=3"]


def test_a_process_other_than_rank_zero_writes_nothing(tmp_path):
    other, zero = RunDir(tmp_path / "other", rank=1), RunDir(tmp_path / "zero", rank=0)
    for run in (other, zero):
        run.write_status("running", pid=1)
        run.write_config(compose_config(output_dir=tmp_path))
        run.write_results({"status": "completed"})
        run.write_failure(RuntimeError("boom"))
    assert not other.path.exists()
    assert {p.name for p in zero.path.iterdir()} == {"status.json", "config_resolved.yaml"}  # results: removed


def _datamodule(*overrides: str) -> LMDataModule:
    cfg = compose_config(list(overrides))
    datamodule = LMDataModule(cfg.data, cache_dir=str(DATA_DIR), seed=0, num_train_samples=4)
    datamodule.setup("fit")
    return datamodule


def test_eval_windows_are_split_across_processes_without_repeats():
    datamodule = _datamodule("data.val_tokens=320")  # 10 windows over 3 processes: 4, 3, 3
    shares = []
    for rank in range(3):
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=3)
        shares.append([i for batch in datamodule.val_dataloader().batch_sampler for i in batch])
    assert [len(s) for s in shares] == [4, 3, 3]
    assert sorted(i for s in shares for i in s) == list(range(len(datamodule.val_set)))
    datamodule.trainer = None
    assert [i for batch in datamodule.val_dataloader().batch_sampler for i in batch] == list(range(10))  # in order


def test_more_processes_than_eval_windows_fail_before_training():
    datamodule = _datamodule("data.val_tokens=64")  # 2 windows
    datamodule.check_eval_shards(2)
    with pytest.raises(ConfigError, match=r"data\.val_tokens=64; allowed: >= 3 windows of data\.seq_len=32"):
        datamodule.check_eval_shards(3)


def _run_ddp(run_dir, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), "model=tiny", f"paths.data_dir={DATA_DIR}", *DDP,
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.usefixtures("one_thread")  # ~16 s on 2 cores: two processes that each start torch and Lightning
def test_two_process_run_matches_one_process_evaluation_and_rank_zero_writes_alone(tmp_path):
    run = tmp_path / "ddp"
    proc = _run_ddp(run, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((run / "results.json").read_text())
    assert ddp["status"] == "completed" and ddp["tokens_seen"] == 6 * 2 * 4 * 32  # both processes' batches

    # only rank zero's files: rank 1 leaves its Hydra log alone, which says it wrote nothing
    assert {p.name for p in run.iterdir()} == {".hydra", "checkpoints", "config_resolved.yaml", "metrics.csv",
                                               "results.json", "status.json", "tensorboard", "train.log",
                                               "train_ddp_process_1.log"}
    assert "rank 1 wrote nothing" in (run / "train_ddp_process_1.log").read_text()
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.ckpt", f"best-step{ddp['best_val_step']}.ckpt"}
    train_rows, val_rows = read_metrics(run)
    assert [int(r["step"]) for r in train_rows] == list(range(1, 7)) and [int(r["step"]) for r in val_rows] == [3, 6]
    assert float(val_rows[-1]["val_loss"]) == ddp["val_loss"]

    # the same windows scored by one process on the run's final weights
    one = train(compose_config([*COMMON, "trainer.max_steps=0", f"init_from={run / 'checkpoints' / 'last.ckpt'}"],
                               output_dir=tmp_path / "one"))
    for key in ("val_loss", "val_acc", "test_loss", "test_acc"):
        assert math.isclose(ddp[key], one[key], rel_tol=1e-6, abs_tol=1e-9), (key, ddp[key], one[key])
    assert ddp["val_tokens_at_len"] == one["val_tokens_at_len"] == {"32": 64, "64": 64}
    for length, loss in one["val_loss_at_len"].items():
        assert math.isclose(ddp["val_loss_at_len"][length], loss, rel_tol=1e-6), length
    assert ddp["baseline_unigram_loss"] == one["baseline_unigram_loss"]
