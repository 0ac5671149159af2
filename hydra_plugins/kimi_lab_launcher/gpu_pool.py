"""``hydra/launcher=gpu_pool``: run a sweep's jobs concurrently, one per GPU, each pinned to its own device.

Hand-written because no maintained Hydra launcher pins jobs to devices: the joblib and submitit_local launchers put
every job on GPU 0 or on all GPUs (facebookresearch/hydra#2757, #1331). Each job is a fresh ``python train.py``
process (so CUDA state, seeds and compile caches never leak between jobs) whose ``CUDA_VISIBLE_DEVICES`` is the one
device of the slot it runs in; a slot takes the next job as soon as its previous job ends (a pool, not a round robin).
The job writes the same folder a basic-launcher job would (``<sweep dir>/<subdir>`` with ``.hydra/``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path
from collections.abc import Sequence
from typing import NamedTuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


def quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra override value: a folder named by ``override_dirname`` holds ``=`` and ``,``,
    which Hydra's grammar reads as syntax when unquoted."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # backslashes before a quote double
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped) + "'"  # ... and at the end (Hydra's rule)


class JobFailed(RuntimeError):
    """A pool job exited non-zero; its run folder's status.json holds the cause."""


class PoolJob(NamedTuple):  # not a dataclass: Hydra's plugin scan executes this module outside sys.modules
    index: int
    overrides: list[str]
    job_dir: Path


def visible_devices(devices: Sequence[int | str] | None) -> list[str]:
    """The devices of the pool: ``devices`` when given, else CUDA_VISIBLE_DEVICES, else every GPU torch sees."""
    if devices:
        return [str(d) for d in devices]
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if env and env != "-1":
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch  # only when auto-detecting: a pool with explicit devices never imports torch in the parent

    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError("Invalid config: hydra.launcher.devices=null found no GPU; allowed: a list of device ids, "
                         "e.g. hydra.launcher.devices=[0,1] (or run without hydra/launcher=gpu_pool on CPU)")
    return [str(i) for i in range(count)]


def pool_slots(devices: list[str], jobs_per_device: int) -> list[str]:
    """One slot per (device, job it may run at once), every device once before any twice (0, 1, 0, 1, not
    0, 0, 1, 1): slots start in this order, so a sweep smaller than the pool still spreads over every GPU."""
    return [d for _ in range(jobs_per_device) for d in devices]


class GpuPoolLauncher(Launcher):
    def __init__(self, devices: Sequence[int | str] | None = None, jobs_per_device: int = 1,
                 python: str | None = None, script: str | None = None) -> None:
        super().__init__()
        if int(jobs_per_device) < 1:
            raise ValueError(f"Invalid config: hydra.launcher.jobs_per_device={jobs_per_device}; allowed: an int >= 1")
        self.devices = list(devices) if devices else None
        self.jobs_per_device = int(jobs_per_device)
        self.python = python or sys.executable
        self.script = script  # the entry point each job runs; default: the script that started the sweep
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        slots = pool_slots(visible_devices(self.devices), self.jobs_per_device)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self._job(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        log.info("Launching %d jobs on a pool of %d slot(s): devices %s", len(jobs), len(slots), ",".join(slots))
        pending: queue.Queue[PoolJob] = queue.Queue()
        for job in jobs:
            pending.put(job)
        returns: dict[int, JobReturn] = {}
        threads = [threading.Thread(target=self._slot, args=(device, pending, returns), daemon=True)
                   for device in slots]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return [returns.get(job.index) or self._failed(job, RuntimeError("the launcher never ran it")) for job in jobs]

    def _job(self, index: int, overrides: list[str]) -> PoolJob:
        """Resolve the job's folder exactly as the basic launcher would (``hydra.sweep.dir/hydra.sweep.subdir``)."""
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = index
            sweep_config.hydra.job.num = index
        state = Singleton.get_state()
        try:
            HydraConfig.instance().set_config(sweep_config)  # ${hydra:...} in the dirs resolves against this job
            job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        finally:
            Singleton.set_state(state)
        return PoolJob(index, overrides, job_dir)

    def _command(self, job: PoolJob) -> list[str]:
        """The job as a single run in its sweep folder; the sweep's own hydra overrides carry over."""
        script = self.script or sys.argv[0]
        inherited = [o for o in self.config.hydra.overrides.hydra
                     if not o.split("=", 1)[0].lstrip("+~").startswith(("hydra.launcher", "hydra/launcher",
                                                                          "hydra.sweep", "hydra.run", "hydra.mode"))]
        return [self.python, script, *self._config_flags(), *job.overrides, *inherited,
                f"hydra.run.dir={quoted(str(job.job_dir))}", f"hydra.job.num={job.index}", f"hydra.job.id={job.index}"]

    def _config_flags(self) -> list[str]:
        """--config-name / --config-path / --config-dir of the sweep's command line: flags, not overrides, so they
        must be passed on explicitly (without them a job would run the default config)."""
        flags = [f"--config-name={self.config.hydra.job.config_name}"]
        for source in self.config.hydra.runtime.config_sources:
            if source.schema == "file" and source.provider == "main":
                flags.append(f"--config-path={source.path}")
            elif source.schema == "file" and source.provider == "command-line":
                flags.append(f"--config-dir={source.path}")
        return flags

    def _slot(self, device: str, pending: queue.Queue[PoolJob], returns: dict[int, JobReturn]) -> None:
        while True:
            try:
                job = pending.get_nowait()
            except queue.Empty:
                return
            try:
                returns[job.index] = self._run(job, device)
            except Exception as error:  # the slot goes on with the next job; this one is recorded as failed
                log.error("#%d (device %s) could not run: %s: %s", job.index, device, type(error).__name__, error)
                returns[job.index] = self._failed(job, error)

    @staticmethod
    def _failed(job: PoolJob, error: BaseException) -> JobReturn:
        ret = JobReturn(overrides=job.overrides, working_dir=str(job.job_dir), hydra_cfg=None)
        ret.cfg, ret.status, ret._return_value = OmegaConf.create({}), JobStatus.FAILED, error
        return ret

    def _run(self, job: PoolJob, device: str) -> JobReturn:
        log.info("\t#%d (device %s) : %s", job.index, device, " ".join(filter_overrides(job.overrides)))
        job.job_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
        with open(job.job_dir / "launcher.log", "a") as out:  # the job's console output, appended on re-runs
            code = subprocess.run(self._command(job), env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        ret = JobReturn(overrides=job.overrides, working_dir=str(job.job_dir), hydra_cfg=None)
        ret.cfg = OmegaConf.create({})
        if code == 0:  # the value a sweeper minimises, as train.py returns it in-process
            results = job.job_dir / "results.json"
            value = json.loads(results.read_text()).get("val_loss") if results.exists() else None
            ret.status, ret.return_value = JobStatus.COMPLETED, value
        else:
            ret.status = JobStatus.FAILED
            ret._return_value = JobFailed(f"job #{job.index} exited with {code}: see {job.job_dir}/status.json "
                                          f"and launcher.log")
        return ret
