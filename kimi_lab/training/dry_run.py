"""Hydra callback behind ``dry_run=true`` (registered in conf/hydra/default.yaml; does nothing otherwise).

Hydra makes each job's folder (and its ``.hydra/`` files and log) before the job runs, so a dry run points
``hydra.run.dir`` / ``hydra.sweep.dir`` at a temporary folder, removed at the end, with no ``.hydra/`` output. A sweep
runs in this process on the dry-run launcher (hydra_plugins/kimi_lab_launcher/dry_run.py: whatever
``hydra/launcher`` says, nothing is submitted and a job that does not compose is recorded, not fatal). At the end it
prints the totals and every error, and exits with status 2 when any job is invalid.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from kimi_lab.training import preflight

LAUNCHER = "hydra_plugins.kimi_lab_launcher.dry_run.DryRunLauncher"
SWEEPER = "hydra_plugins.kimi_lab_launcher.dry_run.DryRunSweeper"


def _dry(config: DictConfig) -> bool:
    return bool(config.get("dry_run", False))


class DryRunCallback(Callback):
    def __init__(self) -> None:
        self.folder: str | None = None

    def _redirect(self, config: DictConfig, key: str) -> str:
        preflight.RECORDS.clear()
        self.folder = tempfile.mkdtemp(prefix="kimi_lab_dry_run_")
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)  # also when a sweep ends in an exception
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra[key].dir = self.folder
            config.hydra.output_subdir = None
        return self.folder

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if _dry(config):
            self._redirect(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not _dry(config):
            return
        folder = self._redirect(config, "sweep")
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.launcher = {"_target_": LAUNCHER}
            if str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):  # other sweepers as they are
                config.hydra.sweeper._target_ = SWEEPER
            # each job's config is composed again from these overrides: the jobs' folders follow the sweep's
            config.hydra.overrides.hydra.extend([f"hydra.sweep.dir={folder}", "hydra.output_subdir=null"])

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        if _dry(config):
            self._finish()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if _dry(config):
            self._finish()

    def _finish(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        lines = preflight.summary_lines(preflight.RECORDS)
        print(lines[0], flush=True)
        for line in lines[1:]:
            print(line, file=sys.stderr, flush=True)
        if len(lines) > 1:
            sys.exit(2)
