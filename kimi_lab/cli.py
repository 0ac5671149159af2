"""Command-line pieces the export and evaluation CLIs share, so the two name and default their flags alike."""

from __future__ import annotations

import argparse
from pathlib import Path

CKPT_DEFAULT = "last"  # the final weights: the ones results.json's test_loss and eval=downstream score


def add_ckpt_argument(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """``--ckpt best|last|PATH`` (``aliases`` are older names of the same flag)."""
    parser.add_argument("--ckpt", *aliases, dest="ckpt", default=CKPT_DEFAULT, metavar="best|last|PATH",
                        help=f"{CKPT_DEFAULT} (default: the final weights, which results.json's test_loss and "
                             "eval=downstream score), best (lowest val_loss; last when the run kept no best file), "
                             "or a .ckpt file")


def run_folder_error(path: Path) -> str | None:
    """Why ``path`` is not a kimi-lab run folder (None when it is one)."""
    if not path.is_dir():
        return (f"{path}: no such folder; allowed: a run folder (one holding config_resolved.yaml: "
                "outputs/<date>/<time>/, multirun/<sweep>/<job>/)")
    if not (path / "config_resolved.yaml").is_file():
        return (f"{path}: not a kimi-lab run folder (no config_resolved.yaml); allowed: a folder train.py wrote, "
                "or one `python -m kimi_lab.export --import` wrote")
    return None
