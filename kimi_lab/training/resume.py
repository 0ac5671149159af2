"""Resume: which checkpoint a job continues from, and the check that it continues the same experiment.

A job continues from a checkpoint when asked (``resume=true``, ``ckpt_path``) or when SLURM requeued it
(``SLURM_RESTART_COUNT`` > 0: after submitit's requeue on preemption or timeout, SLURM's own preemption requeue or a
node failure), from the last.ckpt its earlier attempt left in the same job folder. A fresh job (no restart count)
never resumes on its own, whatever its folder holds.

A checkpoint carries the resolved config it was trained with (``LanguageModelModule`` saves it as the hyper-parameter
``config``). Resuming with other values would keep the checkpoint's optimizer and schedule state, switch the data
order or the model's behaviour mid-run, and record the new values as if they had held from step 0, so every
difference is an error, except the keys in ``RESUME_MAY_CHANGE``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kimi_lab.config import ConfigError
from kimi_lab.config.schema import RUN_CONTROL_KEYS
from kimi_lab.config.stored import stored_config

log = logging.getLogger(__name__)

# keys (and whole groups) that control the job, not the experiment: they may differ between the interrupted run and
# its resume (docs/run-folder.md: "Resume, relaunch, fine-tune")
RESUME_MAY_CHANGE = (
    *sorted(RUN_CONTROL_KEYS),  # how this job continues: resume, ckpt_path, interrupt_at_step, sweep.skip_completed
    "trainer.checkpoint_every_n_steps", "trainer.log_every_n_steps",  # when last.ckpt is written / losses are read
    "paths",  # where the run folder, data cache and repository are on this machine
    "eval",  # benchmarks scored after training
    "logger",  # TensorBoard on or off
    "tags",  # labels
    "report",  # what the study declares to the report (kimi_lab/stats); training reads none of it
    "hardware.num_threads",  # CPU threads of this machine
)


def requeue_count() -> int:
    """How many times SLURM requeued this job (``SLURM_RESTART_COUNT``, which SLURM sets in a requeued job); 0 for a
    job in its first attempt or outside SLURM."""
    count = os.environ.get("SLURM_RESTART_COUNT", "").strip()
    return int(count) if count.isdigit() else 0


def resume_checkpoint(cfg: DictConfig, run_folder: Path) -> str | None:
    """The checkpoint this job continues from: in a requeued job its folder's last.ckpt (what its earlier attempt
    reached; without one the job starts over), else ``ckpt_path``, or with ``resume=true`` the folder's last.ckpt."""
    last = Path(run_folder) / "checkpoints" / "last.ckpt"
    restarts = requeue_count()
    if restarts and last.is_file():
        log.info("requeued job (SLURM_RESTART_COUNT=%d): continues from %s", restarts, last)
        return str(last)
    if cfg.ckpt_path is not None:
        path = Path(cfg.ckpt_path)
    elif cfg.resume:
        path = last
    else:
        if restarts:
            log.info("requeued job (SLURM_RESTART_COUNT=%d) with no %s: starts from step 0", restarts, last)
        return None
    if not path.is_file():
        raise ConfigError(f"Invalid config: resume=true but no checkpoint at {path}; allowed: "
                          "hydra.run.dir=<the interrupted run's folder> or ckpt_path=<file.ckpt>")
    return str(path)


def check_resume_config(cfg: DictConfig, ckpt_path: str) -> None:
    """Raise ConfigError naming every key (outside RESUME_MAY_CHANGE) whose value differs from the checkpoint's."""
    import torch  # lazy: train.py imports this module for every job, before the config is validated

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)  # the user's own run
    saved = ckpt.get("hyper_parameters", {}).get("config")
    if saved is None:
        raise ConfigError(f"Invalid config: ckpt_path={ckpt_path}; allowed: a kimi-lab training checkpoint (this one "
                          "holds no config to resume; init_from=<it> starts a new run from its weights)")
    now = _flat(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    before = _flat(stored_config(saved))
    differing = sorted(k for k in now.keys() | before.keys()
                       if not _may_change(k) and now.get(k, "<absent>") != before.get(k, "<absent>"))
    if differing:
        listed = ", ".join(f"{k}={now.get(k, '<absent>')!r} (checkpoint: {before.get(k, '<absent>')!r})"
                           for k in differing)
        raise ConfigError(f"Invalid config: resuming {ckpt_path} with a different config: {listed}; allowed: the "
                          "values the checkpoint was trained with (pass the interrupted run's overrides; only "
                          f"{', '.join(RESUME_MAY_CHANGE)} may change on resume)")


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def _flat(node: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested dict (lists are values)."""
    out = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + ".") if isinstance(value, dict) else {name: value})
    return out
