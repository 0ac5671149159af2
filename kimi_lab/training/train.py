"""``train(cfg) -> dict``: one job from start to its status.json (the lifecycle around ``fit.fit_and_evaluate``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from kimi_lab.config import ConfigError, validate_config
from kimi_lab.training.lifecycle import Preempted, check_device, completed_run, release_frames, resume_point
from kimi_lab.training.rundir import RunDir, git_commit, launcher_rank

log = logging.getLogger(__name__)


def resolve_output_dir(cfg: DictConfig) -> Path:
    """``paths.output_dir`` (Hydra's job folder by default; tests pass their own)."""
    return Path(cfg.paths.output_dir)


def train(cfg: DictConfig) -> dict:
    """Run one training job; always leaves status.json saying completed, diverged, interrupted or failed (a diverged
    run returns normally, so a sweep goes on). Under DDP every process runs it; only global rank zero writes the run
    folder and runs the single-process evaluations (the others return a short dict once the last collective ends)."""
    run = RunDir(resolve_output_dir(cfg), rank=launcher_rank())
    previous = completed_run(cfg, run)
    if previous is not None:
        log.info("skipping: %s already holds a completed run of these overrides (sweep.skip_completed)", run.path)
        return previous
    ckpt_path = resume_point(cfg, run)  # before anything in the folder is written
    commit = git_commit() if run.writes else None  # the code the job starts with, not what the tree holds at its end
    run.write_status("running", pid=os.getpid(), git_commit=commit)
    try:
        validate_config(cfg)
        check_device(cfg)
        run.write_config(cfg)
        from kimi_lab.training.fit import fit_and_evaluate  # lazy: torch and Lightning load once the config is valid

        results = {**fit_and_evaluate(cfg, run, ckpt_path), "git_commit": commit}
        run.write_results(results)
        run.write_status(results["status"], **{k: results[k] for k in ("diverged_at_step",) if k in results})
    except Preempted as stop:  # requeued by the launcher: the requeued job continues from last.ckpt
        run.write_status("interrupted", requeued=True, reason=str(stop))
        release_frames(stop)
        raise
    except BaseException as error:  # KeyboardInterrupt too: the folder must say it did not complete
        run.write_failure(error)
        if not isinstance(error, ConfigError):  # a refused config is reported in one line by the caller
            log.error("run failed: %s: %s (details in %s)", type(error).__name__, error, run.status_json)
        release_frames(error)
        raise
    if run.writes:
        log.info("%s: results in %s", results["status"], run.path)
    else:
        log.info("%s: rank %d wrote nothing; rank zero writes %s", results["status"], run.rank, run.path)
    return results
