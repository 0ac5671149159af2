"""MoE load balance of a run: per-step expert loads (metrics.csv), run summaries and the two balance measures of
Wang et al. 2024 ("Auxiliary-Loss-Free Load Balancing", Sec. 4.1) as DeepSeek-V3 reports them:

- MaxVio_global (``moe_maxvio_val``): the loads counted over the fixed validation windows at the end of training;
- MaxVio_batch (``moe_maxvio_batch_late``): each training batch's MaxVio, averaged over the last half of the steps
  (steps > max_steps / 2, once the router has settled; warm-up imbalance is not averaged in).

MaxVio = max_i load_i / mean(load) - 1 (Wang et al. 2024, Eq. 6), load_i = the top-k selections of expert i.
"""

from __future__ import annotations

import json
import statistics

import lightning as L
import torch


def load_stats(counts: torch.Tensor) -> tuple[float, float]:
    """(coefficient of variation, MaxVio = (max - mean) / mean) of per-expert token counts."""
    counts = counts.double()
    mean = counts.mean()
    if mean <= 0:
        return 0.0, 0.0
    return (counts.std(unbiased=False) / mean).item(), ((counts.max() - mean) / mean).item()


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


class ExpertLoadMonitor(L.Callback):
    """Reads each MoE layer's token counts once per optimizer step, keeps run totals (summed over ranks).

    Per MoE layer j (the j-th MoE layer of the model) it also records, per step, the load fractions, CV, MaxVio,
    mean aux loss over the micro-batches and the noaux_tc selection bias (after this step's update):
    columns ``moe{j}_*`` of metrics.csv, scalars ``moe/layer{j}/*`` in TensorBoard, run summaries in results.json.
    ``collect`` keeps each step's counts on the device; ``flush`` (every ``trainer.log_every_n_steps`` steps, driven
    by StepMetrics) copies the pending steps to the host in one transfer, so no step waits on the GPU for logging.
    Each validation pass's counts (the layers' eval counters, summed over ranks) give MaxVio on held-out data.
    """

    def __init__(self):
        self.run_counts: list[torch.Tensor] = []  # per layer (E,)
        # per layer, sum of the per-step MaxVio over steps > max_steps / 2 (None: unknown, see load_state_dict)
        self.late_maxvio_sums: list[float] | None = []
        self.n_late_steps = 0
        self.aux_loss_sums: list[float] = []  # per layer, sum over steps of the per-step mean aux loss
        self.n_steps = 0
        self.val_counts: list[list[float]] = []  # per layer, tokens per expert of the latest validation pass
        self.last_step: dict[str, float] = {}
        self.last_bias: list[list[float] | None] = []
        # per collected, not yet flushed step: (logger step, late?, (L_moe, E + 1) counts | aux, biases)
        self._pending: list[tuple[int, bool, torch.Tensor, list[torch.Tensor | None]]] = []
        self._rows: list[dict] = []  # flushed steps' metrics.csv fragments, until StepMetrics takes them
        self._trainer: L.Trainer | None = None

    @staticmethod
    def csv_fields(model) -> list[str]:
        """Per-layer metrics.csv columns (load and bias are JSON lists)."""
        keys = ("load", "cv", "maxvio", "aux_loss", "bias")
        return [f"moe{j}_{key}" for j in range(len(model.moe_layers())) for key in keys]

    def collect(self, trainer: L.Trainer, model) -> None:
        """Snapshot and zero the step's counters (device tensors only: no host sync)."""
        layers = model.moe_layers()
        self._trainer = trainer
        if not layers:
            return
        per_layer = torch.stack([torch.cat([layer.tokens_per_expert, layer.aux_loss_sum.view(1)]).detach().float()
                                 for layer in layers])
        per_layer[:, -1] /= layers[0].n_forwards.clamp_min(1.0) * trainer.world_size  # mean aux loss per forward
        per_layer = trainer.strategy.reduce(per_layer, reduce_op="sum")  # (L_moe, E + 1), one all-reduce
        for layer in layers:
            for buffer in (layer.tokens_per_expert, layer.aux_loss_sum, layer.n_forwards):
                buffer.zero_()
        biases = [layer.gate.e_score_correction_bias.detach().clone() if getattr(layer.gate, "updates_bias", False)
                  else None for layer in layers]
        step = trainer.global_step + 1  # the step this optimizer step completes
        self._pending.append((step, 2 * step > trainer.max_steps, per_layer, biases))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        for layer in pl_module.model.moe_layers():
            layer.eval_tokens_per_expert.zero_()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        """Keep the pass's loads; summed over ranks (MaxVio is scale-free, so a rank that scored every window too
        leaves it unchanged)."""
        layers = pl_module.model.moe_layers()
        if trainer.sanity_checking or not layers:
            return
        counts = torch.stack([layer.eval_tokens_per_expert.detach().float() for layer in layers])  # (L_moe, E)
        self.val_counts = trainer.strategy.reduce(counts, reduce_op="sum").double().cpu().tolist()

    def flush(self) -> None:
        """Host-side statistics of every pending step, in order; their metrics.csv fragments wait in ``take_rows``."""
        if not self._pending:
            return
        host = torch.stack([p[2] for p in self._pending]).cpu()  # (S, L_moe, E + 1): one device-to-host copy
        biases = [[None if b is None else b.cpu() for b in p[3]] for p in self._pending]
        steps = [(p[0], p[1]) for p in self._pending]
        self._pending = []
        self._rows += [self._record(step, late, per_layer, bias)
                       for (step, late), per_layer, bias in zip(steps, host, biases)]

    def take_rows(self) -> list[dict]:
        """The flushed steps' metrics.csv fragments not yet taken (StepMetrics writes them into its rows)."""
        rows, self._rows = self._rows, []
        return rows

    def _record(self, step: int, late: bool, per_layer: torch.Tensor, biases: list[torch.Tensor | None]) -> dict:
        counts, aux = per_layer[:, :-1], per_layer[:, -1]
        if not self.run_counts:
            self.run_counts = [torch.zeros_like(c, dtype=torch.float64) for c in counts]
            self.late_maxvio_sums = [0.0] * len(counts)
            self.aux_loss_sums = [0.0] * len(counts)
        stats = [load_stats(c) for c in counts]
        for total, c in zip(self.run_counts, counts):
            total += c.double()
        self.n_steps += 1
        self.n_late_steps += int(late)
        self.last_step = {"moe_cv": sum(s[0] for s in stats) / len(stats),
                          "moe_maxvio": sum(s[1] for s in stats) / len(stats)}
        self.last_bias = [None if b is None else [round(v, 8) for v in b.tolist()] for b in biases]
        scalars = {}  # TensorBoard: the same per-layer values as the metrics.csv columns
        for j, c in enumerate(counts):
            load = [round(v, 6) for v in (c / c.sum().clamp_min(1)).tolist()]
            values = {"cv": stats[j][0], "maxvio": stats[j][1], "aux_loss": aux[j].item()}
            if late and self.late_maxvio_sums is not None:
                self.late_maxvio_sums[j] += values["maxvio"]
            self.aux_loss_sums[j] += values["aux_loss"]
            self.last_step.update({f"moe{j}_{k}": v for k, v in values.items()})
            self.last_step[f"moe{j}_load"] = json.dumps(load)
            self.last_step[f"moe{j}_bias"] = json.dumps(self.last_bias[j]) if self.last_bias[j] is not None else ""
            scalars.update({f"moe/layer{j}/{k}": v for k, v in values.items()})
            for name, vector in (("load", load), ("bias", self.last_bias[j] or [])):
                scalars.update({f"moe/layer{j}/{name}/expert{e}": v for e, v in enumerate(vector)})
        for logger in (self._trainer.loggers if self._trainer is not None else []):
            logger.log_metrics(scalars, step=step)
        return dict(self.last_step)

    def summary(self) -> dict:
        """results.json fields of a MoE run ({} for a dense one); a balance measure with nothing counted is null."""
        self.flush()
        late = [v / self.n_late_steps for v in self.late_maxvio_sums or []] if self.n_late_steps else []
        val = [load_stats(torch.tensor(c, dtype=torch.float64))[1] for c in self.val_counts]
        balance = {"moe_maxvio_val": _mean(val), "moe_maxvio_val_per_layer": val or None,
                   "moe_maxvio_batch_late": _mean(late), "moe_maxvio_batch_late_per_layer": late or None}
        if not self.run_counts:  # dense, or no training step (an evaluation-only run still has its held-out loads)
            return balance if val else {}
        steps = max(self.n_steps, 1)
        run_stats = [load_stats(c) for c in self.run_counts]
        return {
            "expert_load": [(c / c.sum().clamp_min(1)).tolist() for c in self.run_counts],  # per layer, run shares
            "expert_load_cv": [s[0] for s in run_stats],
            "moe_maxvio_run": [s[1] for s in run_stats],
            **balance,
            "moe_aux_loss": [v / steps for v in self.aux_loss_sums],  # per layer, mean over steps
            "expert_bias": self.last_bias,  # per layer final noaux_tc bias, null for layers without one
        }

    def state_dict(self) -> dict:
        self.flush()  # a checkpoint holds every collected step
        return {"run_counts": self.run_counts, "late_maxvio_sums": self.late_maxvio_sums,
                "n_late_steps": self.n_late_steps, "aux_loss_sums": self.aux_loss_sums,
                "n_steps": self.n_steps, "last_bias": self.last_bias,
                "val_counts": self.val_counts}

    def load_state_dict(self, state: dict) -> None:
        self.run_counts, self.aux_loss_sums = state["run_counts"], state["aux_loss_sums"]
        self.n_steps = state["n_steps"]
        self.last_bias = state.get("last_bias", [])  # a resume with no step left still reports the final bias
        self.val_counts = state.get("val_counts", [])  # none: the resumed run's own validation counts them
        if "n_late_steps" in state:
            self.late_maxvio_sums, self.n_late_steps = state["late_maxvio_sums"], state["n_late_steps"]
        else:  # a checkpoint without the late-half sums: the steps before it are unknown, so is their mean (null)
            self.late_maxvio_sums, self.n_late_steps = None, 0
