"""Checkpoint callbacks: ``last.ckpt`` for resume, ``best-step<N>.ckpt`` by val_loss (weights only), the simulated
preemption, and the random generators' state that makes a resumed run continue bit for bit. Which files a run writes
is ``trainer.save_checkpoints`` (``checkpoint_callbacks``). Every rank calls ``trainer.save_checkpoint`` (it gathers
the state and waits at a barrier); the strategy writes the file on global rank zero only.

Lightning runs ``Checkpoint`` callbacks after every other callback, in their list order: when these save, the
step's metrics row and validation are recorded (StepMetrics) and, for the ones listed after BestCheckpoint, the
best checkpoint has seen the step's validation. Lightning's ModelCheckpoint is not used: its step-triggered save
runs before the step's validation, and it never saves outside ``fit`` (the final validation of ``train``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from kimi_lab.training.callbacks import RunInterrupted


class StepEnd(Checkpoint):
    """Calls ``step_end(trainer)`` once per optimizer step, when the step is complete: after its validation when it
    validates (every ``val_every_n_steps``), else after its last micro-batch. A checkpoint written there holds the
    step's validation, so a run resumed from it neither loses that validation nor runs it again."""

    def __init__(self, val_every_n_steps: int):
        self.val_every_n_steps = val_every_n_steps
        self._step_before: int | None = None

    def step_end(self, trainer: L.Trainer) -> None:
        raise NotImplementedError

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = trainer.global_step != self._step_before  # not a micro-batch inside an accumulation
        if stepped and trainer.global_step % self.val_every_n_steps != 0:
            self.step_end(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.step_end(trainer)


class LastCheckpoint(StepEnd):
    """``last.ckpt`` every ``every_n_steps`` optimizer steps: what ``resume=true`` continues from."""

    def __init__(self, path: Path, every_n_steps: int, val_every_n_steps: int):
        super().__init__(val_every_n_steps)
        self.path, self.every_n_steps = Path(path), every_n_steps

    def step_end(self, trainer: L.Trainer) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            trainer.save_checkpoint(self.path, weights_only=False)  # full state (and no log line per save)


class InterruptAt(StepEnd):
    """After optimizer step ``step`` (and its validation, when it validates): write last.ckpt (unless
    ``last_ckpt`` is None: trainer.save_checkpoints=none) and stop abruptly, as a job preempted right after a
    checkpoint would (tests resume).

    Raising, rather than setting ``trainer.should_stop``, matters: a requested stop makes Lightning run one
    extra validation, which a real preemption never does.
    """

    def __init__(self, step: int, last_ckpt: Path | None, val_every_n_steps: int):
        super().__init__(val_every_n_steps)
        self.step, self.last_ckpt = step, last_ckpt

    def step_end(self, trainer: L.Trainer) -> None:
        if trainer.global_step >= self.step:
            if self.last_ckpt is not None:
                trainer.save_checkpoint(self.last_ckpt, weights_only=False)
            raise RunInterrupted(f"interrupted after step {trainer.global_step} (trainer.interrupt_at_step)")


class BestCheckpoint(Checkpoint):
    """``best-step<N>.ckpt``: the weights of the lowest finite val_loss so far, one file (ties keep the earlier step,
    as results.json's ``best_val_step`` does). Saved after every validation, the final one that ``train`` runs
    outside ``fit`` included; its score travels in last.ckpt, so a resumed run compares with the earlier ones.
    Weights only (Lightning's ``weights_only``: no optimizer, scheduler or callback state, a third of an AdamW
    checkpoint): init_from, the export and the downstream CLI read nothing else, and resume reads last.ckpt."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.best_loss, self.best_step = math.inf, None

    def path(self, step: int) -> Path:
        return self.folder / f"best-step{step}.ckpt"

    def on_validation_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("val_loss")
        if trainer.sanity_checking or loss is None or not float(loss) < self.best_loss:  # NaN is never the best
            return
        previous = self.best_step
        self.best_loss, self.best_step = float(loss), trainer.global_step
        trainer.save_checkpoint(self.path(self.best_step), weights_only=True)
        if previous is not None and previous != self.best_step:
            trainer.strategy.remove_checkpoint(self.path(previous))

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]


def last_checkpoint(policy: str, folder: Path) -> Path | None:
    """Where last.ckpt goes under ``trainer.save_checkpoints=policy``; None for none (no checkpoint at all)."""
    return None if policy == "none" else Path(folder) / "last.ckpt"


def checkpoint_callbacks(policy: str, folder: Path, every_n_steps: int, val_every_n_steps: int) -> list[Checkpoint]:
    """``trainer.save_checkpoints``: last -> LastCheckpoint; best -> BestCheckpoint too; none -> nothing. Listed in
    the order Lightning runs them: the best file is written before last.ckpt records BestCheckpoint's score."""
    last = last_checkpoint(policy, folder)
    if last is None:
        return []
    best = [BestCheckpoint(folder)] if policy == "best" else []
    return [*best, LastCheckpoint(last, every_n_steps, val_every_n_steps)]


def rng_states() -> dict:
    """The global generators' states: torch CPU (and CUDA), numpy, python ``random``."""
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]), "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(states["python"])


class RngState(L.Callback):
    """Saves the generators' states in every checkpoint; a resumed run puts them back just before its first training
    batch (after ``seed_everything`` and the dataloader set-up, which draws from torch's generator), so dropout
    masks go on as in the uninterrupted run instead of replaying the first steps'."""

    def __init__(self):
        self._restore: dict | None = None

    def state_dict(self) -> dict:
        return rng_states()

    def load_state_dict(self, state: dict) -> None:
        self._restore = state

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._restore is not None:
            set_rng_states(self._restore)
            self._restore = None
