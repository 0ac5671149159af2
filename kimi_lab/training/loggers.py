"""The ``logger`` group (conf/logger/): Lightning's TensorBoardLogger, CSVLogger, WandbLogger and MLFlowLogger for a
run folder. Every one of them receives the same calls: ``StepMetrics`` logs train and validation metrics at the
optimizer step metrics.csv gives them, ``LearningRateAtStep`` the learning rate (at metrics.csv's steps too),
``trainer.test`` the test metrics.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from kimi_lab.config import ConfigError

PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow-skinny")}  # logger -> (module, distribution)


def logger_name(cfg: DictConfig) -> str:
    return cfg.logger.name


def check_logger_installed(cfg: DictConfig) -> None:
    """logger=wandb / mlflow without its package: one line naming the install command (before any data is built)."""
    name = logger_name(cfg)
    if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
        raise ConfigError(f"Invalid config: logger={name}; {PACKAGES[name][1]} is not installed: pip install -e "
                          f"'.[loggers]' (or {PACKAGES[name][1]}); allowed without it: logger=tensorboard or csv")


def wandb_offline(cfg: DictConfig) -> bool:
    """logger.offline, else offline unless WANDB_API_KEY is set (no account and no network needed by default)."""
    return cfg.logger.offline if cfg.logger.offline is not None else not os.environ.get("WANDB_API_KEY")


def mlflow_tracking_uri(cfg: DictConfig, run_dir: Path) -> str:
    """logger.tracking_uri, else a file store inside the run folder."""
    return cfg.logger.tracking_uri or f"file:{Path(run_dir).resolve() / 'mlruns'}"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """The loggers of ``cfg.logger`` writing under ``run_dir``; wandb / mlflow also get the resolved config as their
    hyperparameters (TensorBoard gets it at the end, with the final metrics: train.py's HParams)."""

    check_logger_installed(cfg)
    name, run_dir = logger_name(cfg), Path(run_dir)
    loggers = []
    if cfg.logger.tensorboard:  # the logger of logger=tensorboard; beside the others on request
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="",
                                         default_hp_metric=False))
    if name == "csv":
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    elif name == "wandb":
        loggers.append(_wandb(cfg, run_dir))
    elif name == "mlflow":
        loggers.append(_mlflow(cfg, run_dir))
    params = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params)
    return loggers


def _run_name(run_dir: Path) -> tuple[str, str | None]:
    """(run name, group): ``<parent folder>/<folder>``; a sweep job's group is its sweep folder, a single run has
    none."""

    in_sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return f"{run_dir.parent.name}/{run_dir.name}", run_dir.parent.name if in_sweep else None


def _wandb(cfg: DictConfig, run_dir: Path):
    import wandb  # lazy: an optional package (pip install -e .[loggers])

    if wandb.run is not None:  # a sweep's jobs share a process: each job is a run of its own
        wandb.finish()
    name, group = _run_name(run_dir)
    return WandbLogger(name=name, group=group, save_dir=str(run_dir), project=cfg.logger.project,
                       offline=wandb_offline(cfg), tags=[str(t) for t in cfg.tags] or None)


def _mlflow(cfg: DictConfig, run_dir: Path):
    name, group = _run_name(run_dir)
    uri = mlflow_tracking_uri(cfg, run_dir)
    if uri.startswith("file:"):  # recent MLflow refuses a file store unless asked (its SQL stores need SQLAlchemy,
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # which mlflow-skinny leaves out)
    return MLFlowLogger(experiment_name=cfg.logger.project, run_name=name,
                        tracking_uri=uri, tags={"group": group} if group else None)


class LearningRateAtStep(L.Callback):
    """Each param group's learning rate, logged at the optimizer step that uses it, every step: the steps and values
    of metrics.csv's lr column (a host float, no device sync). Lightning's LearningRateMonitor labels the same value
    with the count of steps taken before it, one behind metrics.csv; the names are its names (``lr-AdamW``,
    ``lr-AdamW/pg2``)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not trainer.loggers:
            return
        step = trainer.global_step + 1  # the step this update completes (global_step counts the steps before it)
        name, groups = f"lr-{type(optimizer).__name__}", optimizer.param_groups
        metrics = {name if len(groups) == 1 else f"{name}/pg{i + 1}": g["lr"] for i, g in enumerate(groups)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
