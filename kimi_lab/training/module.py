"""LightningModule: next-token cross-entropy + MoE balance loss; token-weighted eval loss, perplexity and accuracy."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kimi_lab.model import build_model
from kimi_lab.model.loss import linear_cross_entropy
from kimi_lab.optim import build_optimizer, build_scheduler


def compile_model(model: torch.nn.Module) -> None:
    """``torch.compile`` in place (the module type and its state_dict keys stay as they are). With activation
    checkpointing each block is compiled on its own and the checkpoint stays outside the graphs (torchtitan's order):
    dynamo cannot trace a checkpoint whose ``context_fn`` marks the recompute for the MoE load counters."""
    if getattr(model, "activation_checkpointing", False):
        for layer in model.layers:
            layer.compile()
    else:
        model.compile()


class LanguageModelModule(L.LightningModule):
    """Wraps the plain ``nn.Module`` from ``build_model`` (compile or inspect ``self.model`` without Lightning)."""

    def __init__(self, cfg, max_steps: int):
        super().__init__()
        # the resolved config travels in every checkpoint (and TensorBoard's hparams)
        # logger=False: the run logs its hparams once, at the end, with its final metrics (TensorBoard HParams tab)
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)},
                                  logger=False)
        self.cfg = cfg
        self.max_steps = max_steps
        self.model = build_model(cfg)
        if cfg.hardware.compile:
            compile_model(self.model)
        self.loss_chunk_tokens = cfg.hardware.loss_chunk_tokens
        self._eval_sums = torch.zeros(3, dtype=torch.float64)  # [sum NLL, n correct, n tokens]

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids)

    def training_step(self, batch, batch_idx) -> dict[str, torch.Tensor]:
        """``loss`` (what backward runs on) and its parts, detached: StepMetrics reads ``ce_loss`` and ``aux_loss``
        from the step's outputs (Lightning divides ``loss`` by the accumulation count; the parts stay as computed)."""
        input_ids, targets = batch  # (B, T), (B, T)
        out = self.model(input_ids, return_hidden=True)  # (B, T, D): the loss applies the head, chunk by chunk
        ce = linear_cross_entropy(out.hidden, self.model.lm_head.weight, targets, self.loss_chunk_tokens)
        # progress bar only: StepMetrics logs train/loss and train/aux_loss, the means over the step's micro-batches
        self.log("train/loss", ce, prog_bar=True, logger=False)
        return {"loss": ce + out.aux_loss, "ce_loss": ce.detach(), "aux_loss": out.aux_loss.detach()}

    # ---- evaluation: sums over all tokens, so the loss is a true token mean whatever the batch split
    def _eval_step(self, batch) -> None:
        input_ids, targets = batch
        logits = self.model(input_ids).logits.float().flatten(0, 1)  # (B*T, V)
        nll = F.cross_entropy(logits, targets.flatten(), reduction="sum")
        correct = (logits.argmax(dim=-1) == targets.flatten()).sum()
        self._eval_sums += torch.stack([nll.double().cpu(), correct.double().cpu(),
                                        torch.tensor(float(targets.numel()), dtype=torch.float64)])

    def _eval_epoch_end(self, prefix: str) -> None:
        # DDP: each process scored its own windows (LMDataModule._eval_loader); the sums over processes are the
        # single-process sums, so the loss is the token mean over all windows
        sums = self.trainer.strategy.reduce(self._eval_sums.to(self.device), reduce_op="sum")  # one process: as is
        loss = (sums[0] / sums[2]).item()
        metrics = {f"{prefix}_loss": loss, f"{prefix}_ppl": math.exp(min(loss, 50.0)),
                   f"{prefix}_acc": (sums[1] / sums[2]).item()}
        # validation: callback metrics only; StepMetrics logs them at the optimizer step they belong to (Lightning's
        # logger step for an in-fit validation is one behind, so TensorBoard curves would not match metrics.csv)
        self.log_dict(metrics, sync_dist=False, logger=False if prefix == "val" else None)
        self._eval_sums.zero_()

    def on_validation_epoch_start(self) -> None:
        self._eval_sums.zero_()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_sums.zero_()

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.cfg.optimizer)
        scheduler = build_scheduler(optimizer, self.cfg.optimizer, self.max_steps)
        # interval="step": Lightning steps the scheduler once per optimizer step, after accumulation
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
