"""Where a report's files go and how its CSV cells are written (shared by the report and the LR tuning)."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def sweep_name(path: Path) -> str:
    """multirun/2026-11-23/12-00-00-000000-norm -> 2026-11-23_12-00-00-000000-norm; else the folder name."""
    parts = path.resolve().parts
    if "multirun" in parts[:-1]:
        return "_".join(parts[len(parts) - parts[::-1].index("multirun"):])
    return path.resolve().name


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    cell = lambda v: "" if isinstance(v, float) and not math.isfinite(v) else (repr(v) if isinstance(v, float) else v)  # noqa: E731
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: cell(r[k]) for k in columns} for r in rows)
