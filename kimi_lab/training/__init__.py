"""Training layer: LightningModule, callbacks, run folder. ``train(cfg) -> dict`` is the entry point."""

from kimi_lab.training.train import train

__all__ = ["train"]
