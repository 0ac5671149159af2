"""Preemption: a signalled job writes last.ckpt when its current optimizer step ends, then the launcher requeues it.

One mechanism, submitit's. hydra-submitit-launcher's sbatch asks SLURM for a warning signal before the time limit
(``--signal=USR2@<signal_delay_s>``; clusters with ``PreemptParameters=send_user_signal`` also send it on preemption).
submitit's handler calls the launcher's ``checkpoint()`` (a resubmission of the same job), requeues the job
(``scontrol requeue``, at most ``max_num_timeout`` times on timeouts) and exits. SLURM sets ``SLURM_RESTART_COUNT``
in the requeued job, which continues from the job folder's last.ckpt (``resume.resume_checkpoint``). Lightning's own
SLURM auto-requeue (SIGUSR1: an hpc checkpoint written inside the handler, its own ``scontrol requeue``) is off
(``cluster_plugins``), so nothing else requeues or writes a second kind of checkpoint.

Why not save inside the handler, as Lightning does: a handler runs between two bytecodes, possibly inside a backward
pass or an optimizer step, and a checkpoint written there can hold half-updated weights; the resume would not be bit
for bit. PreemptionCheckpoint only records the signal; when the step is complete (after its validation, where
LastCheckpoint saves) it writes last.ckpt, then runs the handler it deferred. SIGTERM (SLURM's preemption or time
limit without the warning, ``scancel``, a plain ``kill``) is deferred the same way; its handler is Lightning's
notice, after which the job ends ``interrupted``. A second signal before the step ends runs the handler at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

from kimi_lab.training.callbacks import RunInterrupted
from kimi_lab.training.checkpoints import StepEnd
from kimi_lab.training.lifecycle import Preempted

log = logging.getLogger(__name__)


def cluster_plugins() -> list:
    """Trainer plugins: under SLURM, Lightning's SLURMEnvironment with its auto-requeue off (submitit requeues)."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def preemption_signals() -> list[signal.Signals]:
    """submitit's warning signal (``SUBMITIT_PREEMPT_SIGNAL``, USR2 unless set, read as submitit reads it) and
    SIGTERM."""
    warning = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
    return [warning, signal.SIGTERM]


class PreemptionCheckpoint(StepEnd):
    """Defers the handlers installed on the preemption signals (submitit's, Lightning's SIGTERM notice) to the end of
    the optimizer step: there it writes ``last_ckpt`` and runs the deferred handler. Signals with no handler
    installed keep their default action."""

    def __init__(self, last_ckpt: Path, val_every_n_steps: int):
        super().__init__(val_every_n_steps)
        self.last_ckpt = Path(last_ckpt)
        self._deferred: dict[int, object] = {}  # signal number -> the handler it replaced
        self._pending: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        """After Lightning installed its SIGTERM notice (at fit start), so that one is deferred too."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            return
        for signum in preemption_signals():
            handler = signal.getsignal(signum)
            if callable(handler):
                self._deferred[signum] = handler
                signal.signal(signum, self._record)

    def _record(self, signum: int, frame) -> None:
        if self._pending is not None:  # a second signal: no more waiting for the step
            self._run_handler(self._deferred[signum], signum, frame, f"a second {signal.Signals(signum).name} before "
                              "the step ended: no last.ckpt written at this step")
            return
        self._pending = signum
        log.warning("%s received: last.ckpt is written when the current step ends, then the job stops",
                    signal.Signals(signum).name)

    def step_end(self, trainer) -> None:
        signum = self._pending or 0
        if trainer.world_size > 1:  # every rank stops at the same step, on the signal one of them received
            agreed = torch.tensor([signum], device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(agreed, reduce_op="max").item())
        if signum:
            self._stop(trainer, signum)

    def on_train_end(self, trainer, pl_module) -> None:
        """A signal after the last step's end: the training is complete, last.ckpt is written all the same."""
        try:
            if self._pending is not None:
                self._stop(trainer, self._pending)
        finally:
            self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _stop(self, trainer, signum: int) -> None:
        name = signal.Signals(signum).name
        self._pending = None
        trainer.save_checkpoint(self.last_ckpt, weights_only=False)
        message = f"{name} after step {trainer.global_step}: last.ckpt written"
        log.warning("%s; the job stops (a requeued job continues from it)", message)
        handler = self._deferred.get(signum)
        self._restore()
        if handler is not None:
            self._run_handler(handler, signum, None, message)
        raise RunInterrupted(f"interrupted by {message}")

    @staticmethod
    def _run_handler(handler, signum: int, frame, message: str) -> None:
        """Runs a deferred handler; submitit's requeues the job and exits, which ends the job as ``Preempted``."""
        try:
            handler(signum, frame)
        except SystemExit as exit_:
            raise Preempted(f"preempted ({message}; the launcher requeued the job)", exit_.code) from exit_

    def _restore(self) -> None:
        """Puts the deferred handlers back, unless Lightning's teardown already restored its own."""
        for signum, handler in self._deferred.items():
            if signal.getsignal(signum) == self._record:
                signal.signal(signum, handler)
        self._deferred = {}
