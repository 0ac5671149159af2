"""A run's lifecycle around fit: skip a finished job (``sweep.skip_completed``), find the resume point, check the
device, record a failure, and ``Preempted``, the end of a job the launcher requeued. Light at import (no torch, no
Lightning): the dry run and ``train.py --help`` load it."""

from __future__ import annotations

import gc
import json
import traceback

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kimi_lab.config import ConfigError
from kimi_lab.config.schema import RUN_CONTROL_KEYS, override_key
from kimi_lab.config.validate import check_resume_policy
from kimi_lab.training.resume import check_resume_config, resume_checkpoint
from kimi_lab.training.rundir import RunDir

FINISHED = ("completed", "diverged")  # outcomes sweep.skip_completed keeps; failed and interrupted jobs run again


class Preempted(SystemExit):
    """Ends a job the launcher requeued (at the end of a step, once last.ckpt is written; at once on a second signal),
    with the exit code of the handler that requeued it (submitit's local executor reads its requeue request from the
    exit code); the requeued job continues from the newest last.ckpt."""

    def __init__(self, message: str, code):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def completed_run(cfg: DictConfig, run: RunDir) -> dict | None:
    """Under ``sweep.skip_completed``: the folder's results when it holds a finished run of this job's overrides;
    None when the job should run. A finished run of other overrides is refused (another grid's folder)."""
    if not cfg.sweep.skip_completed:
        return None
    previous = finished_results(run)
    if previous is None:
        return None
    if not _same_job(previous):  # job folders are numbered by grid position: another grid lands on finished runs
        raise ConfigError(
            f"Invalid config: sweep.skip_completed=true; {run.path} holds a finished run of other overrides "
            f"({_listed(previous.get('overrides', []))}), this job is ({_listed(overrides())}); allowed: "
            "relaunch the sweep's own command (same grid, same order) or another hydra.sweep.dir (its results "
            "are untouched; Hydra rewrote its .hydra/ files, the report identifies it by results.json)")
    return previous


def resume_point(cfg: DictConfig, run: RunDir) -> str | None:
    """The checkpoint a resume continues from, checked before the folder is touched: a wrong resume command (other
    overrides, a finished run) leaves the run's status, results and config as they were. Only a folder with no run
    record (no results.json) gets status failed, as any job that fails."""
    try:
        check_resume_policy(cfg)  # resume=true with trainer.save_checkpoints=none: the cause, not "no last.ckpt"
        previous = finished_results(run)
        if cfg.resume and cfg.ckpt_path is None and previous is not None:
            raise ConfigError(f"Invalid config: resume=true; {run.path} holds a {previous['status']} run, nothing to "
                              "resume; allowed: resume=true on an interrupted or failed run's folder (the finished "
                              "run's record is kept)")
        ckpt_path = resume_checkpoint(cfg, run.path)
        if ckpt_path is not None:
            check_resume_config(cfg, ckpt_path)  # before config_resolved.yaml is rewritten with other values
        return ckpt_path
    except BaseException as error:
        if not run.results_json.exists():
            run.write_failure(error)
        raise


def check_device(cfg: DictConfig) -> None:
    """hardware=gpu/ddp on a machine without CUDA: one line naming the key (Lightning's own error is a traceback)."""
    import torch  # lazy: the dry run and --help paths import this module without torch

    if cfg.hardware.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError(f"Invalid config: hardware.accelerator=gpu (hardware={cfg.hardware.name}); allowed: cpu on "
                          "this machine, torch sees no CUDA device (hardware=cpu)")


def steps_and_tokens(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(max optimizer steps, tokens per optimizer step); a token budget overrides max_steps."""
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.accumulate_grad_batches * world_size
    if cfg.trainer.max_tokens is None:
        return cfg.trainer.max_steps, tokens_per_step
    max_steps = cfg.trainer.max_tokens // tokens_per_step
    if max_steps < 1:
        raise ConfigError(f"Invalid config: trainer.max_tokens={cfg.trainer.max_tokens}; allowed: >= one step "
                          f"of {tokens_per_step} tokens (batch_size * seq_len * accumulate * devices)")
    return max_steps, tokens_per_step


def release_frames(error: BaseException) -> None:
    """A sweep keeps a failed job's exception (Hydra's JobReturn) until it ends: clear its frames' locals, so the
    model, optimizer and activations they hold do not stay in (GPU) memory under the jobs that follow."""
    import torch  # lazy: loaded already when a job got as far as holding tensors

    traceback.clear_frames(error.__traceback__)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def finished_results(run: RunDir) -> dict | None:
    """The folder's results.json if it records a finished run (completed, or diverged: deterministic, it would
    diverge again)."""
    if not run.results_json.exists() or not run.status_json.exists():
        return None
    try:
        status = json.loads(run.status_json.read_text())["status"]
        previous = json.loads(run.results_json.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return previous if isinstance(previous, dict) and status in FINISHED and previous.get("status") == status else None


def overrides() -> list[str]:
    """The job's command-line overrides (Hydra's task overrides; none outside Hydra)."""
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []


def without_run_control(items: list[str]) -> list[str]:
    """The overrides that say what a job trains (sweep.skip_completed, resume=true, ... dropped)."""
    return [o for o in items if override_key(o) not in RUN_CONTROL_KEYS]


def _listed(items: list[str]) -> str:
    return " ".join(without_run_control(items)) or "no overrides"


def _same_job(previous: dict) -> bool:
    """Whether a finished run had this job's overrides (run-control ones such as sweep.skip_completed aside)."""
    return without_run_control(previous.get("overrides", [])) == without_run_control(overrides())
