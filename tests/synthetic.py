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
DATA_KEY, COMMIT = "88c13da1a57a", "c90c2add7571d7a6af90a35972d26043ccc5453e"  # results.json provenance
UNSTABLE = {("0.008", 2): 7, ("0.008", 3): 8}  # write_divergent_sweep: (lr, seed) -> step its loss went NaN


def write_run(path: Path, lr: str, seed: int, status: str, val_loss: float | None = None,
              diverge_at: int | None = None, extra: tuple[str, ...] = ()) -> None:
    """One job folder as a run writes it: overrides, status.json and, when it has a val_loss or diverged,
    results.json and a metrics.csv history (the lr 0.008, seed 1 job with one loss spike and one grad-norm spike).

    ``diverge_at``: losses are NaN from that step on; with status ``diverged`` the folder follows the training side's
    contract (``diverged_at_step``, val_loss null), with ``completed`` it is an older run that recorded NaN losses.
    ``extra``: more overrides (``norm=rmsnorm``), placed before the lr as a sweep job lists them."""
    (path / ".hydra").mkdir(parents=True)
    overrides = ["model=tiny", *extra, f"optimizer.lr={lr}", f"seed={seed}"]
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    extra = {"error": "RuntimeError: loss is nan\ntraceback..."} if status == "failed" else {}
    extra |= {"diverged_at_step": diverge_at} if status == "diverged" else {}
    (path / "status.json").write_text(json.dumps({"status": status, **extra}))
    if val_loss is None and diverge_at is None:
        return
    final = None if status == "diverged" else math.nan if diverge_at is not None else val_loss
    results = {"status": status, "seed": seed, "overrides": overrides, "val_loss": final,
               "val_ppl": math.exp(final) if final is not None else None,
               "test_loss": final + 0.01 if final is not None else None,
               "val_acc": 0.3 - final / 10 if final is not None else None,
               "tokens_per_s": 1000.0 + seed, "peak_mem_mb": 500.0, "train_time_s": 10.0 + seed,
               "choices": {"hardware": "cpu"}, "data_manifest_key": DATA_KEY, "git_commit": COMMIT, **extra}
    (path / "results.json").write_text(json.dumps(results))
    _write_metrics(path / "metrics.csv", lr, seed, final, diverge_at)


def _write_metrics(path: Path, lr: str, seed: int, final: float | None, diverge_at: int | None) -> None:
    losses = [6.0 - 0.1 * s for s in range(10)]
    grads = [1.0] * 10
    if (lr, seed) == ("0.008", 1):
        losses[6], grads[6] = losses[5] * (1 + 2 * LOSS_SPIKE_REL), 5.0  # one loss spike, a 5x grad-norm spike
    if diverge_at is not None:
        losses[diverge_at - 1:] = [math.nan] * (11 - diverge_at)
    fields = ["step", "tokens", "wall_time_s", "train_time_s", "train_loss", "grad_norm", "val_loss"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for step in range(1, 11):
            writer.writerow({"step": step, "tokens": 100 * step, "wall_time_s": step, "train_time_s": 0.5 * step,
                             "train_loss": losses[step - 1], "grad_norm": grads[step - 1]})
            if step % 5 == 0:  # validations at steps 5 and 10: 4.0 then the final value (NaN once diverged)
                value = 4.0 if step == 5 else final
                value = math.nan if diverge_at is not None and step >= diverge_at else value
                writer.writerow({"step": step, "tokens": 100 * step, "wall_time_s": step + 0.1, "val_loss": value})


def _sweep_root(root: Path, lrs: str, extra: tuple[str, ...] = ()) -> Path:
    """The sweep folder with the multirun.yaml Hydra's basic sweeper writes for ``[extra] optimizer.lr=<lrs>
    seed=1,2,3``."""
    multirun = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                      "params": None},
                          "overrides": {"task": ["model=tiny", *extra, f"optimizer.lr={lrs}", "seed=1,2,3"]}}}
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    return root


def write_sweep(tmp_path: Path) -> Path:
    """A multirun folder of 4 learning rates x 3 seeds: 8 completed jobs (VAL), one failed, one still running, one
    missing, and a hand-written re-run of a completed arm and seed."""
    root = _sweep_root(tmp_path / "multirun" / "2026-01-01" / "10-00-00-000000-lr", "1e-3,2e-3,4e-3,8e-3")
    for index, (lr, seed) in enumerate((lr, s) for lr in LRS for s in (1, 2, 3)):
        if (lr, seed) == MISSING:
            continue
        status = "failed" if (lr, seed) == FAILED else "running" if (lr, seed) == RUNNING else "completed"
        write_run(root / str(index), lr, seed, status, VAL.get((lr, seed)) if status == "completed" else None)
    write_run(root / "rerun" / "0", "1e-3", 1, "completed", 9.99)  # same arm and seed, written by hand: counted once
    return root


def write_divergent_sweep(tmp_path: Path) -> Path:
    """lr 0.001 vs 0.008 x seeds 1-3 with every job ended: lr 0.008 seed 2 says ``diverged`` at step 7 (the training
    side's contract), lr 0.008 seed 3 is an older run recorded ``completed`` with NaN losses from step 8."""
    root = _sweep_root(tmp_path / "multirun" / "2026-01-03" / "10-00-00-000000-unstable", "1e-3,8e-3")
    for index, (lr, seed) in enumerate((lr, s) for lr in ("0.001", "0.008") for s in (1, 2, 3)):
        status = "diverged" if (lr, seed) == ("0.008", 2) else "completed"
        write_run(root / str(index), lr, seed, status, VAL.get((lr, seed)), UNSTABLE.get((lr, seed)))
    return root


# ---------------------------------------------------------------- a factorial sweep: norm x lr x seed

NORMS, GRID_LRS, SEEDS = ("layernorm", "rmsnorm"), ("0.001", "0.002", "0.004"), (1, 2, 3)
LR_SHIFT = {"0.001": 0.20, "0.002": 0.0, "0.004": 0.10}  # val loss added by each lr
SEED_SHIFT = {1: 0.0, 2: 0.05, 3: -0.04}  # shared by every arm: what pairing on the seed removes


def factorial_values(rms_effect: dict[str, float], noise: float = 0.01) -> dict[tuple[str, str, int], float]:
    """(norm, lr, seed) -> val loss = 3 + LR_SHIFT + SEED_SHIFT + rms_effect[lr] for rmsnorm + small noise."""
    rng = np.random.default_rng(0)
    return {(norm, lr, seed): 3.0 + LR_SHIFT[lr] + SEED_SHIFT[seed] + (rms_effect[lr] if norm == "rmsnorm" else 0.0)
            + noise * float(rng.standard_normal())
            for norm in NORMS for lr in GRID_LRS for seed in SEEDS}


def write_factorial_sweep(tmp_path: Path, values: dict[tuple[str, str, int], float], name: str = "grid",
                          skip: tuple[tuple[str, str, int], ...] = ()) -> Path:
    """``norm=layernorm,rmsnorm optimizer.lr=1e-3,2e-3,4e-3 seed=1,2,3``, every job completed with ``values``
    but the (norm, lr, seed) in ``skip``, which failed."""
    root = _sweep_root(tmp_path / "multirun" / "2026-01-04" / f"10-00-00-000000-{name}", "1e-3,2e-3,4e-3",
                       ("norm=layernorm,rmsnorm",))
    for index, (norm, lr, seed) in enumerate(values):
        status = "failed" if (norm, lr, seed) in skip else "completed"
        write_run(root / str(index), lr, seed, status, values[norm, lr, seed] if status == "completed" else None,
                  extra=(f"norm={norm}",))
    return root
