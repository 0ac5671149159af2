"""Aux-loss-free expert balancing (noaux_tc): move each gate's selection bias once per optimizer step.

The torchtitan ``_update_expert_bias`` pattern in a Lightning hook: ``on_before_optimizer_step`` runs once per
optimizer step, after all micro-batches of the accumulation window, so the counts each gate summed in its
``bias_counts`` buffer cover the whole step; they are summed over ranks with one all-reduce, then
``delta = gamma * sign(mean - n); delta -= delta.mean(); bias += delta; counts = 0``
(``Router.update_bias``).
The gate's own counts buffer keeps this independent of ``ExpertLoadMonitor``, which reads ``tokens_per_expert``.
"""

from __future__ import annotations

import lightning as L

from kimi_lab.model.moe import update_expert_biases


class ExpertBiasUpdate(L.Callback):
    def __init__(self):
        self.updates = 0  # optimizer steps that moved the biases (tests count them)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        reduce = lambda counts: trainer.strategy.reduce(counts, reduce_op="sum")  # noqa: E731  DDP: global batch
        if update_expert_biases(pl_module.model.moe_layers(), reduce=reduce):
            self.updates += 1
