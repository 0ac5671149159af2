"""kimi-lab: controlled architecture ablations on small transformer-MoE language models.

``kimi_lab.train(cfg) -> dict`` runs one job; ``kimi_lab.build_model(cfg)`` builds the plain nn.Module.
Both import torch lazily so that ``python train.py --help`` stays fast.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "train":
        from kimi_lab.training import train

        return train
    if name == "build_model":
        from kimi_lab.model import build_model

        return build_model
    raise AttributeError(f"module 'kimi_lab' has no attribute {name!r}")


__all__ = ["__version__", "build_model", "train"]
