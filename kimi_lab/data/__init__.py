"""Data layer: offline corpora, tokenizer, token cache and the Lightning datamodule."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LMDataModule", "get_tokenizer", "tokenizer_for", "build_or_load_cache", "open_cache",
           "unigram_baseline_loss"]

_LOCATIONS = {  # imported lazily so `python -m kimi_lab.data.prepare` does not load lightning
    "LMDataModule": "kimi_lab.data.datamodule",
    "get_tokenizer": "kimi_lab.data.tokenizer",
    "tokenizer_for": "kimi_lab.data.tokenizer",
    "build_or_load_cache": "kimi_lab.data.cache",
    "open_cache": "kimi_lab.data.cache",
    "unigram_baseline_loss": "kimi_lab.data.baseline",
}


def __getattr__(name: str) -> Any:
    if name in _LOCATIONS:
        return getattr(importlib.import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
