"""Callbacks that record what a run did, once per *optimizer* step (never per micro-batch)."""

from __future__ import annotations

import csv
import io
import math
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from kimi_lab.training.moe_balance import ExpertLoadMonitor
from kimi_lab.training.rundir import atomic_write_text

METRIC_FIELDS = [
    "step", "tokens", "wall_time_s", "train_time_s", "lr", "train_loss", "aux_loss", "grad_norm",
    "step_time_ms", "moe_cv", "moe_maxvio", "val_loss", "val_ppl", "val_acc",
]


class StepMetrics(L.Callback):
    """Aggregates micro-batches into one metrics.csv row per optimizer step, plus a row per validation.

    Losses, grad norm and expert counts stay on the device until ``flush``, every ``log_every_n_steps`` optimizer
    steps (and before validation, checkpoint steps and the end of training): one device-to-host copy per N steps
    instead of several synchronising ``.item()`` calls per step. Every step still gets its own row (and its step-mean
    ``train/loss`` in TensorBoard). A non-finite train loss seen at a flush, or a non-finite validation loss, stops
    the run with ``RunDiverged`` once its rows are written (``diverged_at_step``: the first such step).
    """

    def __init__(self, csv_path: Path, tokens_per_micro_batch: int, expert_monitor: ExpertLoadMonitor,
                 log_every_n_steps: int = 1, checkpoint_every_n_steps: int = 0):
        self.csv_path = Path(csv_path)
        self.log_every_n_steps = max(log_every_n_steps, 1)
        self.checkpoint_every_n_steps = checkpoint_every_n_steps  # those steps flush anyway (state_dict)
        self._pending: list[tuple[dict, torch.Tensor]] = []  # (row without losses, [ce, aux, grad_norm])
        self._trainer: L.Trainer | None = None
        self.tokens_per_micro_batch = tokens_per_micro_batch
        self.experts = expert_monitor
        self.tokens = 0
        self.train_time_s = 0.0
        self.wall_offset_s = 0.0  # wall time of earlier (interrupted) segments
        self.step_times_ms: list[float] = []
        self.val_history: list[dict] = []
        self.diverged_at_step: int | None = None
        self._micro: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._grad_norm = torch.full((), float("nan"))
        self._lr = float("nan")
        self._step_start: float | None = None
        self._fit_start = time.perf_counter()
        self.fields = list(METRIC_FIELDS)  # + per-MoE-layer columns, known once the model exists

    # -- resume support: everything needed to continue the curve is in the checkpoint
    def state_dict(self) -> dict:
        self.flush()  # a checkpoint holds every finished step's row
        return {"tokens": self.tokens, "train_time_s": self.train_time_s, "step_times_ms": self.step_times_ms,
                "val_history": self.val_history, "wall_time_s": self._wall_time()}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.train_time_s = state["tokens"], state["train_time_s"]
        self.step_times_ms, self.val_history = state["step_times_ms"], state["val_history"]
        self.wall_offset_s = state["wall_time_s"]

    def _wall_time(self) -> float:
        return self.wall_offset_s + time.perf_counter() - self._fit_start

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:  # after Lightning restored global_step on resume
        self.fields = METRIC_FIELDS + self.experts.csv_fields(pl_module.model)
        if trainer.global_rank == 0:
            self._truncate_csv(after_step=trainer.global_step)

    def _truncate_csv(self, after_step: int) -> None:
        """Keep rows up to the checkpointed step (a resumed run rewrites what came after it), in this run's columns
        (a column the file has and this code does not write is left out); replaced atomically, so a failure here
        never loses the rows."""
        rows = []
        if self.csv_path.exists() and after_step > 0:
            with self.csv_path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= after_step]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.csv_path, text.getvalue())

    def _append(self, trainer, row: dict) -> None:
        if trainer.global_rank != 0:
            return
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(row)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._step_start is None:
            wait_for_device(pl_module.device)  # earlier work (a validation, the last step) is not this step's
            self._step_start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        # before clipping; a device tensor, read at the next flush
        self._grad_norm = torch.nn.utils.get_total_norm(grads).detach() if grads else torch.zeros(())
        self._lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (the scheduler steps after it)
        self.experts.collect(trainer, pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._micro.append((outputs["ce_loss"], outputs["aux_loss"]))  # LanguageModelModule.training_step's parts
        self.tokens += self.tokens_per_micro_batch * trainer.world_size
        if len(self._micro) < trainer.accumulate_grad_batches:
            return  # optimizer step not taken yet
        wait_for_device(pl_module.device)  # the step's kernels, not only their launches
        step_ms = 1000.0 * (time.perf_counter() - self._step_start)
        self.train_time_s += step_ms / 1000.0
        self.step_times_ms.append(step_ms)
        ce = torch.stack([m[0] for m in self._micro]).float().mean()
        aux = torch.stack([m[1] for m in self._micro]).float().mean().to(ce.device)
        ce, aux = trainer.strategy.reduce(torch.stack([ce, aux]), reduce_op="mean")  # both over ranks (DDP)
        self._micro, self._step_start, self._trainer = [], None, trainer
        row = {"step": trainer.global_step, "tokens": self.tokens, "wall_time_s": round(self._wall_time(), 4),
               "train_time_s": round(self.train_time_s, 4), "lr": self._lr, "step_time_ms": round(step_ms, 3)}
        losses = torch.stack([ce.float(), aux.float(), self._grad_norm.float().to(ce.device)])
        self._pending.append((row, losses))
        if self._flush_due(trainer.global_step):
            self.flush()
            self._stop_if_diverged()  # before last.ckpt could be written with the non-finite weights

    def _flush_due(self, step: int) -> bool:
        every = self.checkpoint_every_n_steps
        return step % self.log_every_n_steps == 0 or (every > 0 and step % every == 0)

    def flush(self) -> None:
        """Write the rows of the pending steps (one host copy of their losses and grad norms)."""
        self.experts.flush()
        moe = self.experts.take_rows()
        if not self._pending:
            return
        values = torch.stack([p[1] for p in self._pending]).cpu().tolist()  # (S, 3)
        for i, ((row, _), (ce, aux, grad_norm)) in enumerate(zip(self._pending, values)):
            row.update({"train_loss": ce, "aux_loss": aux, "grad_norm": grad_norm, **(moe[i] if moe else {})})
            self._append(self._trainer, row)
            for logger in self._trainer.loggers:  # the step mean, as in metrics.csv (not the last micro-batch's)
                logger.log_metrics({"train/loss": ce, "train/aux_loss": aux}, step=row["step"])
            if not (math.isfinite(ce) and math.isfinite(aux)):
                self._diverged(row["step"])
        self._pending = []

    def _diverged(self, step: int) -> None:
        if self.diverged_at_step is None:
            self.diverged_at_step = step

    def _stop_if_diverged(self) -> None:
        if self.diverged_at_step is not None:
            raise RunDiverged(f"loss is not finite at step {self.diverged_at_step}",
                              diverged_at_step=self.diverged_at_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.flush()  # train rows before the validation row
        self._stop_if_diverged()  # never validate (or checkpoint) NaN weights

    def on_train_end(self, trainer, pl_module) -> None:
        self.flush()
        self._stop_if_diverged()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or "val_loss" not in trainer.callback_metrics:
            return
        record = {"step": trainer.global_step, "tokens": self.tokens}
        record.update({k: trainer.callback_metrics[k].item() for k in ("val_loss", "val_ppl", "val_acc")})
        if self.val_history and self.val_history[-1]["step"] == record["step"]:
            return  # the same step validated twice (end-of-run check): keep one row
        self.val_history.append(record)
        self._append(trainer, {**record, "wall_time_s": round(self._wall_time(), 4)})
        for logger in trainer.loggers:  # at the step metrics.csv gives it
            logger.log_metrics({k: record[k] for k in ("val_loss", "val_ppl", "val_acc")}, step=record["step"])
        if not math.isfinite(record["val_loss"]):
            self._diverged(record["step"])
        self._stop_if_diverged()

    def summary(self) -> dict:
        self.flush()
        median_ms = statistics.median(self.step_times_ms) if self.step_times_ms else float("nan")
        return {"tokens_seen": self.tokens, "train_time_s": self.train_time_s,
                "tokens_per_s": self.tokens / self.train_time_s if self.train_time_s > 0 else 0.0,
                "step_time_ms": median_ms, "wall_time_s": self._wall_time()}


class DataPosition(L.Callback):
    """A resumed run continues the data where the checkpoint left it: the global samples consumed (all ranks) are
    saved in the checkpoint and given to the sampler when the checkpoint is loaded, which Lightning does before it
    builds the train loader's iterator (worker processes start reading the sampler then, so ``on_train_start`` is
    too late with ``data.num_workers > 0``). A different device count is refused: it changes the global batch."""

    KEY = "data_position"

    def __init__(self, samples_per_rank_step: int):
        self.samples_per_rank_step = samples_per_rank_step  # data.batch_size * trainer.accumulate_grad_batches

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.KEY] = {"samples_consumed": trainer.global_step * self.samples_per_rank_step
                                * trainer.world_size, "world_size": trainer.world_size}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        saved = checkpoint.get(self.KEY)
        if saved is None:  # checkpoints written before the position was saved: assume this run's process count
            saved = {"samples_consumed": checkpoint["global_step"] * self.samples_per_rank_step * trainer.world_size,
                     "world_size": trainer.world_size}
        if saved["world_size"] != trainer.world_size:
            raise ValueError(f"resume: the checkpoint was trained on {saved['world_size']} process(es), this run has "
                             f"{trainer.world_size}; allowed: hardware.devices giving {saved['world_size']} (another "
                             "count changes the global batch, data order and max_tokens' step count)")
        trainer.datamodule.set_train_start(int(saved["samples_consumed"]))


class RunStopped(Exception):
    """Ends a job early with a result: ``train`` catches it and records ``status`` and ``extra`` in the run folder."""

    status = "stopped"

    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.extra = extra


class RunInterrupted(RunStopped):
    """Raised by InterruptAt: the job stops abruptly after writing last.ckpt (a simulated preemption)."""

    status = "interrupted"


class RunDiverged(RunStopped):
    """A training or validation loss went NaN / inf: training stops, the job is recorded ``diverged``."""

    status = "diverged"


def wait_for_device(device: torch.device) -> None:
    """On CUDA, wait for the queued kernels before reading the clock: without it a step's wall time is how fast the
    host launched its kernels, and tokens/s compares launch rates, not arms. A no-op on CPU (eager is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OptimizerStepTimer(L.Callback):
    """Wall time of each optimizer update: from the end of backward (after the grad-norm read, incl. clipping)
    to the end of ``optimizer.step`` (a step post-hook). Lightning runs forward/backward inside step's closure,
    so timing step() alone would count them too. Its place in the run order: ``trainer.ordered_callbacks``."""

    def __init__(self):
        self.times_ms: list[float] = []
        self._start: float | None = None
        self._hooked: set[int] = set()
        self._device = torch.device("cpu")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if id(optimizer) not in self._hooked:
            optimizer.register_step_post_hook(self._stop)
            self._hooked.add(id(optimizer))
        self._device = pl_module.device
        wait_for_device(self._device)  # backward's kernels are not the optimizer's
        self._start = time.perf_counter()

    def _stop(self, optimizer, args, kwargs) -> None:
        if self._start is not None:
            wait_for_device(self._device)
            self.times_ms.append(1000.0 * (time.perf_counter() - self._start))
            self._start = None

    def state_dict(self) -> dict:
        return {"times_ms": self.times_ms}

    def load_state_dict(self, state: dict) -> None:
        self.times_ms = state["times_ms"]

    def summary(self, train_time_s: float) -> dict:
        total_s = sum(self.times_ms) / 1000.0
        return {"optimizer_step_ms": statistics.median(self.times_ms) if self.times_ms else float("nan"),
                "optimizer_step_share": total_s / train_time_s if train_time_s > 0 else float("nan")}


class MemoryWindow(L.Callback):
    """Peak memory of training batches only (forward, backward and optimizer step), not of validation, test or
    checkpoint writes: opens the job's CPU memory sampler (``rundir.PeakRSS``, set as ``.rss`` once it runs) for each
    training batch, and on CUDA resets the allocator's peak at the batch start and reads it at the end
    (``cuda_peak_bytes``). First in the run order (``trainer.ordered_callbacks``): its window closes before any
    checkpoint is saved."""

    def __init__(self):
        self.rss = None
        self.cuda_peak_bytes = 0
        self.batches = 0  # training batches this process ran (0: a resume at the last step only evaluates)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1
        if self.rss is not None:
            self.rss.open_window()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rss is not None:
            self.rss.close_window()
        if pl_module.device.type == "cuda":
            self.cuda_peak_bytes = max(self.cuda_peak_bytes, torch.cuda.max_memory_allocated(pl_module.device))
