"""Launchers: hydra/launcher=gpu_pool runs jobs concurrently, each pinned to its own device; hydra/launcher=slurm
composes into hydra-submitit-launcher's SLURM launcher."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from hydra_plugins.kimi_lab_launcher.gpu_pool import GpuPoolLauncher, visible_devices
from kimi_lab.stats.collect import collect_sweep
from tests.helpers import CONF_DIR, DATA_DIR, REPO_ROOT


def _interval(job_dir) -> tuple[dt.datetime, dt.datetime]:
    started = json.loads((job_dir / "status.json").read_text())["started"]
    finished = json.loads((job_dir / "results.json").read_text())["finished"]
    return dt.datetime.fromisoformat(started), dt.datetime.fromisoformat(finished)


def test_gpu_pool_pins_each_job_to_one_device_and_runs_them_concurrently(tmp_path):
    """3 jobs (one made to fail) on a pool of devices 5 and 7: each job sees exactly its slot's device, the two
    slots overlap in time, the failed job is recorded and the sweep exits non-zero after every job ran."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "hydra/launcher=gpu_pool",
           "hydra.launcher.devices=[5,7]", "model=tiny", f"paths.data_dir={DATA_DIR}", "trainer.max_steps=2",
           "trainer.val_check_interval=2", "optimizer.lr=1e-3,2e-3,-1", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "JobFailed" in proc.stderr, proc.stderr[-3000:]
    results = {n: json.loads((sweep / str(n) / "results.json").read_text()) for n in (0, 1)}
    devices = [results[n]["host"]["cuda_visible_devices"] for n in (0, 1)]
    assert sorted(devices) == ["5", "7"]  # one job per device, never both on one
    (start0, end0), (start1, end1) = _interval(sweep / "0"), _interval(sweep / "1")
    assert start1 < end0 and start0 < end1  # the two slots ran at the same time
    assert results[0]["overrides"] == ["model=tiny", f"paths.data_dir={DATA_DIR}", "trainer.max_steps=2",  # as the
                                       "trainer.val_check_interval=2", "optimizer.lr=0.001"]  # basic sweeper writes it
    failed = json.loads((sweep / "2" / "status.json").read_text())
    assert failed["status"] == "failed" and "optimizer.lr" in failed["error"]
    jobs = {j.name: j.status for j in collect_sweep(sweep).jobs}  # the report sees the sweep as usual
    assert jobs == {"0": "completed", "1": "completed", "2": "failed"}


def test_visible_devices(monkeypatch):
    assert visible_devices([2, 3]) == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert visible_devices(None) == ["4", "6"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"hydra.launcher.devices=null found no GPU; allowed: a list"):
        visible_devices(None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert visible_devices(None) == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"hydra.launcher.jobs_per_device=0; allowed: an int >= 1"):
        GpuPoolLauncher(devices=[0], jobs_per_device=0)


def _qualname(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _launcher_config(name: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg.hydra.launcher


def test_slurm_launcher_config_instantiates_submitit():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the optional `slurm` extra is not installed")
    from hydra.core.plugins import Plugins
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    launcher_cfg = _launcher_config("slurm")
    assert (launcher_cfg.gpus_per_node, launcher_cfg.tasks_per_node, launcher_cfg.array_parallelism) == (1, 1, 64)
    launcher = Plugins.instance()._instantiate(launcher_cfg)  # what Hydra does at launch, short of calling sbatch
    # Hydra's plugin scan loads its own copy of the module: compare classes by qualified name
    assert _qualname(launcher) == _qualname(SlurmLauncher) and launcher.params["timeout_min"] == 720


def test_gpu_pool_config_instantiates_the_plugin():
    from hydra.core.plugins import Plugins

    launcher = Plugins.instance()._instantiate(_launcher_config("gpu_pool"))
    assert _qualname(launcher) == _qualname(GpuPoolLauncher)
    assert launcher.devices is None and launcher.jobs_per_device == 1


def test_pool_fills_every_device_before_doubling_up_and_survives_a_job_it_cannot_start(tmp_path, monkeypatch):
    """Slots alternate devices (2 jobs on [0,1] x 2 per device land on 0 and 1, not both on 0); a job the slot
    cannot even start (a missing python, an unreadable results.json) is a FAILED return and the slot goes on."""
    import queue

    from hydra.core.utils import JobStatus

    from hydra_plugins.kimi_lab_launcher.gpu_pool import PoolJob, pool_slots

    assert pool_slots(["0", "1"], 2)[:2] == ["0", "1"] and sorted(pool_slots(["0", "1"], 2)) == ["0", "0", "1", "1"]
    launcher = GpuPoolLauncher(devices=[0])
    ran = []

    def run(job, device):
        ran.append(job.index)
        if job.index == 0:
            raise FileNotFoundError("/nonexistent/python")
        return "ok"

    monkeypatch.setattr(launcher, "_run", run)
    pending, returns = queue.Queue(), {}
    for index in range(3):
        pending.put(PoolJob(index, [f"seed={index}"], tmp_path / str(index)))
    launcher._slot("0", pending, returns)
    assert ran == [0, 1, 2] and returns[1] == returns[2] == "ok"
    assert returns[0].status == JobStatus.FAILED and isinstance(returns[0]._return_value, FileNotFoundError)


def test_run_dir_is_quoted_for_hydra():
    """A folder named by ${hydra.job.override_dirname} holds '=' and ',': the job's hydra.run.dir must parse back
    to the same path (unquoted, Hydra rejected it and every job failed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.kimi_lab_launcher.gpu_pool import quoted

    parser = OverridesParser.create()
    for path in ["/s/lr=0.001,seed=1", "/s/it's", "/s/back\\slash", "/s/end\\", "/s/q\\'x"]:
        assert parser.parse_override(f"hydra.run.dir={quoted(path)}").value() == path


def test_jobs_run_the_sweeps_config_not_the_default(tmp_path):
    """-cn / --config-path / --config-dir are flags, not overrides: each job's command carries them (without, a job
    of `train.py -m -cn alt ...` ran the default config)."""
    from omegaconf import OmegaConf

    from hydra_plugins.kimi_lab_launcher.gpu_pool import PoolJob

    launcher = GpuPoolLauncher(devices=[0], script="train.py")
    sources = [{"path": "/repo/conf", "schema": "file", "provider": "main"},
               {"path": "/mine", "schema": "file", "provider": "command-line"},
               {"path": "hydra.conf", "schema": "pkg", "provider": "hydra"}]
    launcher.config = OmegaConf.create({"hydra": {"job": {"config_name": "alt"}, "overrides": {"hydra": []},
                                                  "runtime": {"config_sources": sources}}})
    command = launcher._command(PoolJob(3, ["seed=1"], tmp_path / "lr=0.1,seed=1"))
    assert command[2:6] == ["--config-name=alt", "--config-path=/repo/conf", "--config-dir=/mine", "seed=1"]
    assert f"hydra.run.dir='{tmp_path / 'lr=0.1,seed=1'}'" in command
