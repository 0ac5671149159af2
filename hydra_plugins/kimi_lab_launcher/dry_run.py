"""The launcher and sweeper of ``dry_run=true -m`` (set by kimi_lab.training.dry_run, never chosen by hand): Hydra's
basic ones, in this process, except that a job whose overrides do not compose (an unknown option, a wrong type) is
recorded as invalid and the sweep goes on, so one dry run lists every bad job."""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from omegaconf import open_dict


class DryRunLauncher(BasicLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """As ``BasicLauncher.launch`` (hydra-core 1.3), with composition errors recorded per job; each job prints
        its own line (kimi_lab.training.preflight), so the launcher logs none."""
        from kimi_lab.training.preflight import record_uncomposable

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        runs: list[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            try:
                sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except Exception as error:  # Hydra's composition errors have no common base class
                record_uncomposable(idx, list(overrides), error)
                continue
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            runs.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                config=sweep_config, job_dir_key="hydra.sweep.dir",
                                job_subdir_key="hydra.sweep.subdir"))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs


class DryRunSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Composes nothing ahead: ``BasicSweeper`` stops the sweep at the first job that does not compose, the
        dry-run launcher records it and goes on."""
