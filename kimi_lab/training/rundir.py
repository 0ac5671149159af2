"""The run folder contract: status.json (atomic), results.json, config_resolved.yaml, versions and git commit,
written by global rank zero only."""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import platform
import subprocess
import tempfile
import threading
import socket
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kimi_lab.training.malloc import in_use_reader


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it, even briefly, races with threads
    that create files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file. The file gets the mode
    a plain ``open`` would (0666 less the umask; mkstemp's 0600 would hide results from the group on a cluster)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any):
    if hasattr(value, "value"):  # Enum
        return value.value
    if hasattr(value, "item"):  # numpy / torch scalar
        return value.item()
    return str(value)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def launcher_rank() -> int:
    """This process's global rank as its launcher set it in the environment (RANK, LOCAL_RANK, SLURM_PROCID: Lightning
    reads them into ``rank_zero_only.rank`` when it is imported); 0 in a single process. Known before any Trainer
    exists, so a DDP job's other processes write nothing from their first line on."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only  # lazy: a refused config never loads Lightning

    return int(getattr(rank_zero_only, "rank", 0) or 0)


class RunDir:
    """One run's output folder. ``status.json`` goes running -> completed | diverged | failed | interrupted.

    Only global rank zero writes (``rank``): under DDP every process runs ``train``, and the folder must hold one
    process's record, not the last writer's."""

    def __init__(self, path: str | Path, rank: int = 0):
        self.path = Path(path)
        self.rank = int(rank)
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_csv = self.path / "metrics.csv"
        self.results_json = self.path / "results.json"
        self.status_json = self.path / "status.json"
        self.started = now_iso()

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def write_status(self, status: str, **extra: Any) -> None:
        if not self.writes:
            return
        payload = {"status": status, "started": self.started, "updated": now_iso(), **extra}
        atomic_write_json(self.status_json, payload)

    def write_failure(self, error: BaseException) -> None:
        if not self.writes:
            return
        tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        self.write_status("failed", error=f"{type(error).__name__}: {error}", traceback=tb)
        if self.results_json.exists():  # never leave a completed-looking results.json behind
            self.results_json.unlink()

    def write_config(self, cfg: DictConfig) -> None:
        if self.writes:
            atomic_write_text(self.path / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def write_results(self, results: dict) -> None:
        if self.writes:
            atomic_write_json(self.results_json, results)


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD commit of the source tree (with '+dirty' when it has uncommitted changes), or None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("torch", "lightning", "hydra-core", "omegaconf", "kimi_lab", "tiktoken", "datasets"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def host() -> dict:
    """Where the run ran: host name, CPU threads, the devices it could see (gpu_pool / SLURM pin them)."""
    import torch  # lazy: train.py and the dry run import this module before (or without) torch

    cuda = torch.cuda.is_available()
    return {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


class PeakRSS:
    """Samples this process's resident memory and malloc's in-use bytes every 10 ms while a window is open (a
    training batch, opened and closed by ``MemoryWindow``): a per-job CPU peak even when sweep jobs share one
    process (ru_maxrss would only ever grow). The window keeps out checkpoint writes (Lightning serialises the
    whole checkpoint into memory first), so the peak does not depend on whether a sample caught one. The in-use
    peak counts from the level at construction, after collecting the garbage earlier jobs left (train() creates it
    just before the model): what the job's model, optimizer and activations needed, as CUDA's max-allocated
    counts on a GPU. RSS (absolute) also counts the data pipeline and what the allocator keeps."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s, self.peak_bytes = interval_s, 0
        self._in_use = in_use_reader()
        self.peak_in_use_bytes = None if self._in_use is None else 0
        gc.collect()
        self.base_in_use_bytes = self._in_use() if self._in_use is not None else 0
        self._stop, self._window = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._has_statm = os.path.exists("/proc/self/statm")  # Linux

    @staticmethod
    def current_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sample(self) -> None:
        if not self._has_statm:
            return
        self.peak_bytes = max(self.peak_bytes, self.current_bytes())
        if self._in_use is not None:
            self.peak_in_use_bytes = max(self.peak_in_use_bytes, self._in_use())

    def open_window(self) -> None:
        self.sample()
        self._window.set()

    def close_window(self) -> None:
        self._window.clear()
        self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._window.wait(self.interval_s):
                self.sample()
                self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        if self._has_statm:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
