"""Builds the Lightning Trainer (loggers, checkpoints, our step-level callbacks) from ``hardware``, ``trainer`` and
``logger``."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Checkpoint

from kimi_lab.training.callbacks import DataPosition, ExpertLoadMonitor, MemoryWindow, OptimizerStepTimer, StepMetrics
from kimi_lab.training.checkpoints import InterruptAt, RngState, checkpoint_callbacks, last_checkpoint
from kimi_lab.training.expert_bias import ExpertBiasUpdate
from kimi_lab.training.loggers import LearningRateAtStep, build_loggers
from kimi_lab.training.preemption import PreemptionCheckpoint, cluster_plugins
from kimi_lab.training.preflight import check_job_environment
from kimi_lab.training.rundir import RunDir


@dataclass
class RunCallbacks:
    metrics: StepMetrics
    experts: ExpertLoadMonitor
    data_position: DataPosition
    interrupt: InterruptAt | None
    optimizer_timer: OptimizerStepTimer | None = None
    memory: MemoryWindow | None = None
    last_ckpt: Path | None = None  # where train() saves the final state; None: trainer.save_checkpoints=none


def _single_lightning_log() -> None:
    """`import lightning` gives its logger a console handler *and* lets records propagate to the root logger:
    under Hydra (root already configured) every Lightning message would print twice."""
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()


class _NoBanner(logging.Filter):
    """Drops Lightning's per-job banner lines (an ad for its cloud logger, which accelerators exist): in a sweep they
    were most of every job's log. Warnings and errors pass."""

    BANNERS = ("💡 Tip", "GPU available", "TPU available", "HPU available")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not str(record.getMessage()).lstrip().startswith(self.BANNERS)


def _quiet_lightning() -> None:
    """No per-job banners; no warning that a short run has fewer batches than Lightning's logging interval (our
    metrics rows follow trainer.log_every_n_steps), about Lightning's deprecated pytree use, or that DDP eval metrics
    need sync_dist (the module sums them over the processes)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _NoBanner) for f in target.filters):
            target.addFilter(_NoBanner())
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # DDP: our eval metrics are sums over the processes already (LanguageModelModule._eval_epoch_end)
    warnings.filterwarnings("ignore", message=r".*self\.log\('(val|test)_\w+', \.\.\., sync_dist=True\)`.*")


def ordered_callbacks(ours: RunCallbacks, checkpoints: list[Checkpoint], val_every_n_steps: int,
                      with_loggers: bool) -> list[L.Callback]:
    """The run's callbacks in the order Lightning calls their hooks (it keeps list order and moves ``Checkpoint``
    subclasses after the rest; here they are last already, so the list is the run order).

    The rule: a callback that measures a window runs first, so its window closes before any other batch-end work;
    one that changes a step's state runs before the one that records the step; one that ends the step (a checkpoint
    write, the preemption save, the simulated interrupt) runs last, once the step's rows and validation exist.
    """
    callbacks: list[L.Callback] = [
        ours.memory,  # measures the batch window
        ours.experts,
        ExpertBiasUpdate(),  # changes the step: the metrics row records the bias after its update
        ours.metrics,  # records the step
        ours.optimizer_timer,  # after metrics: the grad-norm read is not optimizer time
        ours.data_position,
        RngState(),
    ]
    if with_loggers:
        callbacks.append(LearningRateAtStep())
    # ends the step: best-step<N>.ckpt after a validation, then last.ckpt (checkpoints.checkpoint_callbacks' order)
    callbacks.extend(checkpoints)
    if ours.last_ckpt is not None:
        # on a preemption signal: last.ckpt when the step ends, then the launcher's requeue (training/preemption.py)
        callbacks.append(PreemptionCheckpoint(ours.last_ckpt, val_every_n_steps))
    if ours.interrupt is not None:
        callbacks.append(ours.interrupt)  # after every save: the step's rows, validation and best checkpoint exist
    return callbacks


def build_trainer(cfg, run: RunDir) -> tuple[L.Trainer, RunCallbacks]:
    check_job_environment(cfg)  # first: a missing package fails in one line, before any data is built
    _single_lightning_log()
    _quiet_lightning()
    # Lightning cannot see that DataPosition restores the sampler position on resume; its warning is wrong here
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    accumulate = cfg.trainer.accumulate_grad_batches
    val_every = cfg.trainer.val_check_interval
    policy, ckpt_every = cfg.trainer.save_checkpoints, cfg.trainer.checkpoint_every_n_steps
    last_ckpt = last_checkpoint(policy, run.checkpoints)
    experts = ExpertLoadMonitor()
    ours = RunCallbacks(
        metrics=StepMetrics(run.metrics_csv, cfg.data.batch_size * cfg.data.seq_len, experts,
                            log_every_n_steps=cfg.trainer.log_every_n_steps,
                            checkpoint_every_n_steps=ckpt_every if last_ckpt is not None else 0),
        experts=experts,
        data_position=DataPosition(samples_per_rank_step=cfg.data.batch_size * accumulate),
        interrupt=(InterruptAt(cfg.trainer.interrupt_at_step, last_ckpt, val_every)
                   if cfg.trainer.interrupt_at_step is not None else None),
        optimizer_timer=OptimizerStepTimer(),
        memory=MemoryWindow(),
        last_ckpt=last_ckpt,
    )
    loggers = build_loggers(cfg, run.path)
    callbacks = ordered_callbacks(ours, checkpoint_callbacks(policy, run.checkpoints, ckpt_every, val_every),
                                  val_every, with_loggers=bool(loggers))
    trainer = L.Trainer(
        accelerator=cfg.hardware.accelerator,
        devices=cfg.hardware.devices,
        strategy=cfg.hardware.strategy,
        plugins=cluster_plugins() or None,  # under SLURM: Lightning's auto-requeue off, submitit requeues
        precision=cfg.hardware.precision,
        max_steps=cfg.trainer.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        # Lightning counts val_check_interval in micro-batches; ours is in optimizer steps
        val_check_interval=val_every * accumulate,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        deterministic=cfg.trainer.deterministic,
        use_distributed_sampler=False,  # our sampler shards by rank and resumes mid-run
        logger=loggers or False,
        callbacks=callbacks,
        # Lightning adds its own ModelCheckpoint when no Checkpoint callback is given (save_checkpoints=none)
        enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
        enable_progress_bar=sys.stderr.isatty(),
        enable_model_summary=False,
        default_root_dir=str(run.path),
    )
    return trainer, ours
