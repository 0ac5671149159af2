"""Preflight: ``python train.py ... dry_run=true`` (or ``-m``) checks every job and prices it without training.

Per job: compose (a job whose overrides do not compose is recorded by the dry-run launcher), validate
(``validate_config``, unknown keys included), the device and the packages the job needs, the model built on the meta
device (active / total parameters, training FLOPs per token), its tokens, and an estimated time on this machine from
one measured step (``kimi_lab.training.step_time``). ``kimi_lab.training.dry_run`` keeps Hydra from writing run
folders, prints the sweep's totals and exits non-zero when any job is invalid.
"""

from __future__ import annotations

import re

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kimi_lab.config import ConfigError, validate_config
from kimi_lab.training.lifecycle import check_device, overrides, steps_and_tokens
from kimi_lab.training.step_time import estimated_seconds, model_size, step_time

PREFIX = "[dry run]"
RECORDS: list[dict] = []  # this process's dry-run jobs, in launch order (the dry run's launcher is in-process)


def check_job_environment(cfg: DictConfig) -> None:
    """What a job needs besides a valid config, checked before any data is built: the logger's package and, for
    eval=downstream, the benchmark files' package. One ConfigError line naming the install command."""
    from kimi_lab.training.loggers import check_logger_installed  # lazy: Lightning loads only for a job that runs

    check_logger_installed(cfg)
    if cfg.eval.name == "downstream":
        # lazy: the evaluation package imports torch, and Hydra loads this module at every start (dry-run callback)
        from kimi_lab.evaluation.tasks import INSTALL_COMMAND, source_root

        try:
            source_root()
        except RuntimeError:
            raise ConfigError(f"Invalid config: eval=downstream; its benchmark files are not installed: run "
                              f"`{INSTALL_COMMAND}` (`make install` does); allowed without them: eval=none") from None


def preflight_job(cfg: DictConfig) -> dict:
    """Check and price one job; print its line; record it in ``RECORDS``. Never raises for a bad job: the sweep
    goes on and the dry run's summary lists every error."""
    record = {"job": _job_number(), "overrides": _overrides()}
    try:
        record |= _price(cfg)
    except Exception as error:  # any failure is the job's verdict, not the preflight's
        record["error"] = one_line(error)
    RECORDS.append(record)
    print(job_line(record), flush=True)
    return record


def _price(cfg: DictConfig) -> dict:
    validate_config(cfg)
    check_device(cfg)
    check_job_environment(cfg)
    steps, tokens_per_step = steps_and_tokens(cfg, _world_size(cfg))
    size = model_size(cfg)
    timing = step_time(cfg)
    return {**size, "steps": steps, "tokens": steps * tokens_per_step, "device": timing.device,
            "estimated_s": estimated_seconds(cfg, steps, timing)}


def _world_size(cfg: DictConfig) -> int:
    devices = cfg.hardware.devices
    if isinstance(devices, int):
        return devices
    if devices == "auto":
        import torch  # lazy: only devices=auto asks torch for the CUDA count

        gpu = cfg.hardware.accelerator == "gpu"
        return max(torch.cuda.device_count(), 1) if gpu else 1
    return len(devices)


def record_uncomposable(job: int, overrides: list[str], error: BaseException) -> None:
    """A sweep job whose overrides do not compose (unknown option, wrong type): recorded, the sweep goes on."""
    record = {"job": job, "overrides": [o for o in overrides if not o.startswith("dry_run=")],
              "error": one_line(error)}
    RECORDS.append(record)
    print(job_line(record), flush=True)


def one_line(error: BaseException) -> str:
    """The error on one line (Hydra's composition errors end with the config search path: dropped)."""
    text = re.sub(r"\s+", " ", str(error).split("Config search path")[0]).strip() or type(error).__name__
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def job_line(record: dict) -> str:
    job = f" job {record['job']}" if record.get("job") is not None else ""
    head = f"{PREFIX}{job} | {' '.join(record['overrides']) or 'no overrides'} | "
    if "error" in record:
        return head + f"INVALID: {record['error']}"
    return head + (f"{human(record['params_active'])} active / {human(record['params_total'])} params | "
                   f"{human(record['flops_per_token'])} FLOP/token | {record['steps']} steps, "
                   f"{human(record['tokens'])} tokens | ~{duration(record['estimated_s'])} on {record['device']}")


def summary_lines(records: list[dict]) -> list[str]:
    """The sweep's totals, then one ``error:`` line per invalid job."""
    valid = [r for r in records if "error" not in r]
    bad = [r for r in records if "error" in r]
    compute = sum(r["flops_per_token"] * r["tokens"] for r in valid)
    seconds = sum(r["estimated_s"] for r in valid)
    lines = [f"{PREFIX} {len(records)} job(s): {len(valid)} valid, {len(bad)} invalid | "
             f"{human(sum(r['tokens'] for r in valid))} tokens, {human(compute)} FLOP | ~{duration(seconds)} on this "
             "machine, one job after another | no run folder written"]
    for r in bad:
        job = f"job {r['job']} " if r.get("job") is not None else ""
        lines.append(f"error: {job}({' '.join(r['overrides']) or 'no overrides'}): {r['error']}")
    return lines


def human(value: float) -> str:
    """1234567 -> '1.23M' (SI prefixes, three significant digits)."""
    for factor, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _overrides() -> list[str]:
    """The job's overrides without dry_run itself."""
    return [o for o in overrides() if o.partition("=")[0].lstrip("+") != "dry_run"]


def _job_number() -> int | None:
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return int(HydraConfig.get().job.num)
