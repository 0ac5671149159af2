"""The unit every source yields: one document, split as a whole into train/val/test."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Document:
    source: str  # corpus part, the stratum of the split (e.g. "sotu", "text", "hf")
    doc_id: str  # unique within its source, stable across machines
    text: str
