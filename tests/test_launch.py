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
