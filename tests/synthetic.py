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


# ---------------------------------------------------------------- null factorial grids: norm x 4 lrs x seed

NULL_LRS = ("0.0005", "0.001", "0.002", "0.004")  # no 0.008: write_run puts a loss spike there
RUN_SD = 0.02  # run-to-run noise of a null grid's val loss; its seed x norm effect has the same SD


def write_null_grid_jobs(tmp_path: Path, name: str = "null") -> tuple[Path, dict[tuple[str, str, int], Path]]:
    """The folders of ``norm=layernorm,rmsnorm optimizer.lr=5e-4,1e-3,2e-3,4e-3 seed=1,2,3`` (24 completed jobs,
    multirun.yaml included) and {(norm, lr, seed): job folder}; ``set_grid_values`` gives them their losses."""
    root = _sweep_root(tmp_path / "multirun" / "2026-01-05" / f"10-00-00-000000-{name}", "5e-4,1e-3,2e-3,4e-3",
                       ("norm=layernorm,rmsnorm",))
    jobs = {}
    for index, (norm, lr, seed) in enumerate((n, lr, s) for n in NORMS for lr in NULL_LRS for s in SEEDS):
        jobs[norm, lr, seed] = root / str(index)
        write_run(jobs[norm, lr, seed], lr, seed, "completed", 3.0, extra=(f"norm={norm}",))
    return root, jobs


def set_grid_values(jobs: dict[tuple[str, str, int], Path], values: dict[tuple[str, str, int], float]) -> None:
    """Rewrite each job's results.json with ``values[norm, lr, seed]`` as its final val loss; every other field and
    file keeps what ``write_null_grid_jobs`` wrote (a val loss of 3.0: the curve reaches any target at step 10), so
    the null grid varies in val loss only and a batch of them stays fast."""
    for key, path in jobs.items():
        results = json.loads((path / "results.json").read_text())
        (path / "results.json").write_text(json.dumps(results | {"val_loss": values[key]}))


def null_grid_values(rng: np.random.Generator, seed_sd: float = 0.05) -> dict[tuple[str, str, int], float]:
    """(norm, lr, seed) -> val loss = 3 + an lr effect + a seed effect + a seed x norm effect + run noise, with
    no norm main effect: the seed x norm effect (SD RUN_SD, the run SD) makes one seed favour one norm at every lr,
    as a seed's initialisation and data order do."""
    lr_shift = dict(zip(NULL_LRS, (0.2, 0.0, 0.1, 0.3)))
    seed_effect = dict(zip(SEEDS, seed_sd * rng.standard_normal(len(SEEDS))))
    seed_norm = {(n, s): RUN_SD * float(rng.standard_normal()) for n in NORMS for s in SEEDS}
    return {(n, lr, s): 3.0 + lr_shift[lr] + seed_effect[s] + seed_norm[n, s] + RUN_SD * float(rng.standard_normal())
            for n in NORMS for lr in NULL_LRS for s in SEEDS}


# ---------------------------------------------------------------- a tune sweep (optimizer x lr x seed) and its confirm

TUNE_OPTIMIZERS, TUNE_LRS = ("adam", "adamw"), ("0.001", "0.002", "0.004")
TUNE_VAL = {  # (optimizer, lr) -> val loss of seeds 1, 2, 3: adam's optimum is inside its grid, adamw's at the top
    ("adam", "0.001"): (3.10, 3.12, 3.08), ("adam", "0.002"): (3.00, 3.04, 2.96), ("adam", "0.004"): (3.20, 3.25, 3.15),
    ("adamw", "0.001"): (3.30, 3.28, 3.35), ("adamw", "0.002"): (3.10, 3.12, 3.11),
    ("adamw", "0.004"): (2.95, 2.97, 2.99),
}


def write_tune_sweep(tmp_path: Path, values: dict[tuple[str, str], tuple[float, ...]] = TUNE_VAL,
                     status: dict[tuple[str, str, int], str] | None = None, name: str = "tune",
                     extra: tuple[str, ...] = ()) -> Path:
    """``[extra] optimizer=adam,adamw optimizer.lr=1e-3,2e-3,4e-3 seed=1,2,3`` with ``values[optimizer, lr][seed - 1]``
    as each job's final val loss; ``status`` makes a (optimizer, lr, seed) job ``diverged`` (NaN from step 7) or
    ``failed``."""
    status = status or {}
    root = _sweep_root(tmp_path / "multirun" / "2026-01-06" / f"10-00-00-000000-{name}", "1e-3,2e-3,4e-3",
                       (*extra, "optimizer=adam,adamw"))
    for index, (opt, lr, seed) in enumerate((o, lr, s) for o in TUNE_OPTIMIZERS for lr in TUNE_LRS for s in (1, 2, 3)):
        state = status.get((opt, lr, seed), "completed")
        write_run(root / str(index), lr, seed, state, values[opt, lr][seed - 1] if state == "completed" else None,
                  diverge_at=7 if state == "diverged" else None, extra=(*extra, f"optimizer={opt}"))
    return root


def write_confirm_sweep(tmp_path: Path, tuned_json: Path, lrs: dict[str, float], seeds: tuple[int, ...],
                        tuning_seeds: list[int], tuning_sweep: str, axis: tuple[str, ...] = ()) -> Path:
    """A confirm sweep as ``python train.py -m optimizer=... 'optimizer.lr=${tuned_lr:...}' seed=...`` leaves it:
    each job's overrides hold the interpolation (escaped, as Hydra records it), its config_resolved.yaml the LR
    ``lrs[optimizer]`` it resolved to, its results.json the ``report`` block with the tuning seeds and sweep.
    ``axis``: overrides of a key the tune sweep did not sweep (``norm.eps=1e-6``), each run with every optimizer."""
    root = tmp_path / "multirun" / "2026-01-06" / "10-00-00-000000-tune_confirm"
    jobs = [(o, a, s) for o in lrs for a in (axis or (None,)) for s in seeds]
    for index, (opt, other, seed) in enumerate(jobs):
        path = root / str(index)
        escaped = f"$\\{{tuned_lr\\:{tuned_json}\\}}"  # as Hydra's basic sweeper writes an interpolation
        write_run(path, escaped, seed, "completed", 3.0 + 0.01 * seed,
                  extra=(f"optimizer={opt}", *([other] if other else [])))
        results = json.loads((path / "results.json").read_text())
        report = {"primary_metric": "val_loss", "tuning_seeds": tuning_seeds, "tuning_sweep": tuning_sweep}
        (path / "results.json").write_text(json.dumps(results | {"report": report}))
        (path / "config_resolved.yaml").write_text(yaml.safe_dump({"optimizer": {"name": opt, "lr": lrs[opt]},
                                                                   "seed": seed}))
    return root


# ---------------------------------------------------------------- a one-key study: chosen losses, extra results fields


def study_values(effects: dict[str, float], seeds: tuple[int, ...] = (1, 2, 3, 4, 5, 6),
                 noise: dict[str, float] | float = 0.003, seed_sd: float = 0.05,
                 rng_seed: int = 0) -> dict[tuple[str, int], float]:
    """(lr, seed) -> val loss = 3 + effects[lr] + a seed effect shared by every arm (SD ``seed_sd``: what pairing
    removes) + run noise (SD ``noise``, or ``noise[lr]`` per arm). The first lr of ``effects`` is the baseline."""
    rng = np.random.default_rng(rng_seed)
    seed_effect = dict(zip(seeds, seed_sd * rng.standard_normal(len(seeds))))
    sd = noise if isinstance(noise, dict) else dict.fromkeys(effects, noise)
    return {(lr, s): 3.0 + effect + seed_effect[s] + sd[lr] * float(rng.standard_normal())
            for lr, effect in effects.items() for s in seeds}


def write_study_sweep(tmp_path: Path, values: dict[tuple[str, int], float],
                      fields: dict[tuple[str, int], dict] | None = None, name: str = "study") -> Path:
    """A folder of run folders (no multirun.yaml; arms in the order of ``values``), one completed job per
    ``optimizer.lr=<lr> seed=<seed>`` with final val loss ``values[lr, seed]`` (the other fields as ``write_run``
    writes them: test loss = val loss + 0.01, throughput 1000 + seed), plus ``fields[lr, seed]`` merged into its
    results.json: a ``report`` block, compute (params_active, flops_per_token, tokens_seen, epochs), MoE balance,
    ``val_loss_at_len``."""
    root = tmp_path / name
    for index, (lr, seed) in enumerate(values):
        path = root / str(index)
        write_run(path, lr, seed, "completed", values[lr, seed])
        if fields and (lr, seed) in fields:
            results = json.loads((path / "results.json").read_text())
            (path / "results.json").write_text(json.dumps(results | fields[lr, seed]))
    return root
