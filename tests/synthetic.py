"""Synthetic inputs with known answers, shared by several test files: a text corpus whose documents carry unique
markers (data tests) and a sweep folder with known losses and every job status (stats, report, downstream tests)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import yaml

from kimi_lab.stats.metrics import LOSS_SPIKE_REL

# ---------------------------------------------------------------- a corpus of marked documents

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone "
         "cloud forest lantern harbor meadow thunder velvet copper silver orchard").split()


def marker(k: int) -> str:
    return f"ZQXMARK{k:03d}"


def write_corpus(folder: Path, n_docs: int = 30, n_words: int = 300) -> Path:
    """n_docs text files, each a unique marker plus its own random word sequence."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n_docs):
        rng = np.random.default_rng(k)
        body = " ".join(rng.choice(WORDS, size=n_words))
        (folder / f"doc{k:03d}.txt").write_text(f"{marker(k)} {body}\n")
    return folder


# ---------------------------------------------------------------- a sweep with known numbers

LRS = ["0.001", "0.002", "0.004", "0.008"]  # as Hydra writes them in a job's overrides.yaml
VAL = {  # (lr, seed) -> final val loss; 0.002 is better by ~0.1 on every seed
    ("0.001", 1): 3.00, ("0.001", 2): 3.05, ("0.001", 3): 2.98,
    ("0.002", 1): 2.91, ("0.002", 2): 2.94, ("0.002", 3): 2.89,
    ("0.004", 1): 3.20, ("0.004", 3): 3.10, ("0.008", 1): 3.50,
}
FAILED, RUNNING, MISSING = ("0.004", 2), ("0.008", 2), ("0.008", 3)


def write_run(path: Path, lr: str, seed: int, status: str, val_loss: float | None = None) -> None:
    """One job folder as a run writes it: overrides, status.json and, when it has a val_loss, results.json and a
    metrics.csv history (the lr 0.008, seed 1 job with one loss spike and one grad-norm spike)."""
    (path / ".hydra").mkdir(parents=True)
    overrides = ["model=tiny", f"optimizer.lr={lr}", f"seed={seed}"]
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    extra = {"error": "RuntimeError: loss is nan\ntraceback..."} if status == "failed" else {}
    (path / "status.json").write_text(json.dumps({"status": status, **extra}))
    if val_loss is None:
        return
    results = {"status": "completed", "seed": seed, "overrides": overrides, "val_loss": val_loss,
               "val_ppl": math.exp(val_loss), "val_acc": 0.3 - val_loss / 10, "test_loss": val_loss + 0.01,
               "tokens_per_s": 1000.0 + seed, "peak_mem_mb": 500.0, "train_time_s": 10.0 + seed,
               "choices": {"hardware": "cpu"}}
    (path / "results.json").write_text(json.dumps(results))
    losses = [6.0 - 0.1 * s for s in range(10)]
    grads = [1.0] * 10
    if (lr, seed) == ("0.008", 1):
        losses[6], grads[6] = losses[5] * (1 + 2 * LOSS_SPIKE_REL), 5.0  # one loss spike, a 5x grad-norm spike
    fields = ["step", "tokens", "wall_time_s", "train_time_s", "train_loss", "grad_norm", "val_loss"]
    with (path / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for step in range(1, 11):
            writer.writerow({"step": step, "tokens": 100 * step, "wall_time_s": step, "train_time_s": 0.5 * step,
                             "train_loss": losses[step - 1], "grad_norm": grads[step - 1]})
            if step % 5 == 0:  # validations at steps 5 and 10: 4.0 then the final value
                writer.writerow({"step": step, "tokens": 100 * step, "wall_time_s": step + 0.1,
                                 "val_loss": 4.0 if step == 5 else val_loss})


def write_sweep(tmp_path: Path) -> Path:
    """A multirun folder of 4 learning rates x 3 seeds: 8 completed jobs (VAL), one failed, one still running, one
    missing, and a hand-written re-run of a completed arm and seed."""
    root = tmp_path / "multirun" / "2026-01-01" / "10-00-00-000000-lr"
    multirun = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                      "params": None},
                          "overrides": {"task": ["model=tiny", "optimizer.lr=1e-3,2e-3,4e-3,8e-3", "seed=1,2,3"]}}}
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    for index, (lr, seed) in enumerate((lr, s) for lr in LRS for s in (1, 2, 3)):
        if (lr, seed) == MISSING:
            continue
        status = "failed" if (lr, seed) == FAILED else "running" if (lr, seed) == RUNNING else "completed"
        write_run(root / str(index), lr, seed, status, VAL.get((lr, seed)) if status == "completed" else None)
    write_run(root / "rerun" / "0", "1e-3", 1, "completed", 9.99)  # same arm and seed, written by hand: counted once
    return root
