"""Resume: which checkpoint a job continues from, and the check that it continues the same experiment.

A checkpoint carries the resolved config it was trained with (``LanguageModelModule`` saves it as the hyper-parameter
``config``). Resuming with other values would keep the checkpoint's optimizer and schedule state, switch the data
order or the model's behaviour mid-run, and record the new values as if they had held from step 0, so every
difference is an error, except the keys in ``RESUME_MAY_CHANGE``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kimi_lab.config import ConfigError
from kimi_lab.config.schema import RUN_CONTROL_KEYS

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


def resume_checkpoint(cfg: DictConfig, run_folder: Path) -> str | None:
    """The checkpoint this job continues from: ``ckpt_path``, or with ``resume=true`` the run folder's last.ckpt."""
    if cfg.ckpt_path is not None:
        path = Path(cfg.ckpt_path)
    elif cfg.resume:
        path = Path(run_folder) / "checkpoints" / "last.ckpt"
    else:
        return None
    if not path.is_file():
        raise ConfigError(f"Invalid config: resume=true but no checkpoint at {path}; allowed: "
                          "hydra.run.dir=<the interrupted run's folder> or ckpt_path=<file.ckpt>")
    return str(path)


def check_resume_config(cfg: DictConfig, ckpt_path: str) -> None:
    """Raise ConfigError naming every key (outside RESUME_MAY_CHANGE) whose value differs from the checkpoint's."""
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)  # the user's own run
    saved = ckpt.get("hyper_parameters", {}).get("config")
    if saved is None:
        raise ConfigError(f"Invalid config: ckpt_path={ckpt_path}; allowed: a kimi-lab training checkpoint (this one "
                          "holds no config to resume; init_from=<it> starts a new run from its weights)")
    now = _flat(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    before = _flat(saved)
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
