"""Read a sweep folder into jobs and arms: no torch, no model or training code, only the files each run left.

A sweep is ``multirun/<date>/<time>-<tag>/<job>/`` (Hydra's layout, see conf/hydra/default.yaml) or any folder of
run folders. A job folder is one that holds ``.hydra/overrides.yaml``, ``status.json`` or ``results.json``. Jobs are
keyed by their overrides, never by number; an arm is the set of jobs whose overrides agree on every swept key once
``seed`` is removed. Jobs that did not complete are kept and listed, never dropped silently; a run whose loss went
non-finite is ``diverged`` whatever its status.json says (see ``classify_divergence``).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kimi_lab.config.schema import RUN_CONTROL_KEYS

log = logging.getLogger(__name__)

SEED_KEY = "seed"
DEFAULT_VALUE = "(default)"  # a swept key that a job did not override: the config's own value
JOB_MARKERS = (".hydra/overrides.yaml", "status.json", "results.json")
SKIP_DIRS = {"checkpoints", "tensorboard", ".hydra", "__pycache__"}
FINAL_LOSSES = ("val_loss", "test_loss")  # a non-finite value here means the run diverged


@dataclass
class Job:
    """One run folder (or a job the sweep defined that left no folder: status ``missing``)."""

    name: str  # path relative to the sweep folder
    path: Path
    overrides: dict[str, str]  # key -> value, as in .hydra/overrides.yaml
    status: str  # completed | diverged | failed | interrupted | running | missing | unreadable | duplicate
    error: str | None = None  # why the job is not counted (diverged: "diverged at step N ...")
    results: dict = field(default_factory=dict)
    train_rows: list[dict] = field(default_factory=list)  # metrics.csv rows of optimizer steps
    val_rows: list[dict] = field(default_factory=list)  # metrics.csv rows of validations
    arm: str | None = None
    diverged_at_step: int | None = None

    @property
    def seed(self) -> int | None:
        value = self.results.get("seed", self.overrides.get(SEED_KEY))
        try:
            return int(value)
        except (TypeError, ValueError):
            return None

    @property
    def usable(self) -> bool:
        return self.status == "completed"


@dataclass
class Arm:
    label: str  # "norm=rmsnorm, optimizer=adam": the values of the swept keys
    factors: dict[str, str]
    jobs: list[Job]

    @property
    def completed(self) -> list[Job]:
        return [j for j in self.jobs if j.usable]

    @property
    def diverged(self) -> list[Job]:
        """Diverged jobs, one per seed, whose seed has no completed run in this arm."""
        done = {j.seed for j in self.completed}
        by_seed = {j.seed: j for j in reversed(self.jobs) if j.status == "diverged" and j.seed not in done}
        return sorted(by_seed.values(), key=lambda j: natural_key(j.name))

    def divergence_warning(self) -> str | None:
        """'arm X: 1 of 3 seeds diverged (...) and is not in the mean, which flatters it'; None when none did."""
        if not self.diverged:
            return None
        k, n = len(self.diverged), len({j.seed for j in self.jobs})
        where = ", ".join(f"seed {j.seed} at step {j.diverged_at_step if j.diverged_at_step is not None else '?'}"
                          for j in self.diverged)
        return (f"arm {self.label}: {k} of {n} seeds diverged ({where}) and {'is' if k == 1 else 'are'} not in the "
                f"mean, which flatters it")

    def incomplete_warning(self) -> str | None:
        """'arm X: seed 2 failed, seed 3 missing: not in the mean'; seeds with no completed or diverged run."""
        counted = {j.seed for j in self.jobs if j.status in ("completed", "duplicate", "diverged")}
        lost = {j.seed: j.status for j in self.jobs if j.seed not in counted}
        if not lost:
            return None
        where = ", ".join(f"seed {seed} {status}" for seed, status in sorted(lost.items(), key=lambda x: str(x[0])))
        return f"arm {self.label}: {where}: not in the mean"

    def rerun_warning(self) -> str | None:
        """'arm X: seed 2 diverged (job 7) and its re-run completed (counted)': re-running diverged seeds until they
        finish flatters an unstable arm as dropping them does."""
        done = {j.seed: j.name for j in self.completed}
        reruns = sorted({(j.seed, j.name, done[j.seed]) for j in self.jobs if j.status == "diverged"
                         and j.seed in done}, key=lambda x: str(x))
        if not reruns:
            return None
        where = ", ".join(f"seed {seed} diverged (job {bad}), its re-run completed (job {good})"
                          for seed, bad, good in reruns)
        return f"arm {self.label}: {where}; the re-run is counted, the divergence is not"

    def row_warning(self) -> str:
        """Every reason this arm's mean may flatter it: diverged seeds left out or re-run, other lost seeds."""
        return "; ".join(w for w in (self.divergence_warning(), self.rerun_warning(), self.incomplete_warning()) if w)


@dataclass
class Sweep:
    path: Path
    jobs: list[Job]
    factors: dict[str, list[str]]  # swept key -> its values, first value first
    arms: list[Arm]

    @property
    def problems(self) -> list[Job]:
        return [j for j in self.jobs if not j.usable]

    def arm(self, label: str) -> Arm:
        return next(a for a in self.arms if a.label == label)


def natural_key(text: str) -> list:
    """'grid/10' after 'grid/9': Hydra numbers jobs 0..N-1."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def split_override(item: str) -> tuple[str, str]:
    key, _, value = str(item).partition("=")
    return key.strip(), value.strip()


def parse_overrides(items: list[str]) -> dict[str, str]:
    """key -> value as Hydra writes it for a sweep job (``1e-3`` -> ``0.001``), so hand-written runs and sweep jobs
    of the same setting land in one arm; a line Hydra's parser rejects is split at its first '='.

    Keys of RUN_CONTROL_KEYS (with any ``+``/``++``/``~`` prefix) are dropped: a relaunch with
    ``sweep.skip_completed=true``, or one job resumed with ``resume=true``, must not form an arm of its own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, out = OverridesParser.create(), {}
    for item in items:
        try:
            override = parser.parse_override(str(item))
            key, value = override.get_key_element(), override.get_value_element_as_str()
        except HydraException:
            key, value = split_override(item)
        key = key.lstrip("+")  # `++k=v` / `+k=v` set the same key as `k=v` (a `~k` deletion stays its own)
        if key.lstrip("~") not in RUN_CONTROL_KEYS:
            out[key] = value
    return out


def as_number(value: str) -> float | None:
    """``value`` as a float when it spells one (``1e4``, ``10000``), else None."""
    try:
        return float(value)
    except ValueError:
        return None


def unify_number_spellings(jobs: list[Job], grids: dict[Path, dict[str, list[str]]]) -> None:
    """A key whose values are all numbers and include a float: every value written as that float (``1000`` and
    ``1e3`` -> ``1000.0``), so an int spelling of a float setting does not form an arm of its own. In place."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for key, value in job.overrides.items():
            values.setdefault(key, set()).add(value)
    for grid in grids.values():
        for key, listed in grid.items():
            values.setdefault(key, set()).update(listed)
    floats = {k for k, vs in values.items() if k != SEED_KEY and all(as_number(v) is not None for v in vs)
              and any(not re.fullmatch(r"[+-]?\d+", v) for v in vs)}
    for job in jobs:
        for key in floats & job.overrides.keys():
            job.overrides[key] = repr(float(job.overrides[key]))
    for grid in grids.values():
        for key in floats & grid.keys():
            grid[key] = list(dict.fromkeys(repr(float(v)) for v in grid[key]))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _to_float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_metrics_csv(path: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of metrics.csv as floats; empty cells become NaN.

    A train row is one with a train_loss cell, a validation row one with a val_loss cell, whatever the value: a
    written ``nan`` / ``inf`` loss is kept, so divergence and loss spikes are seen."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        cells = list(csv.DictReader(f))
    rows = [{k: _to_float(v) for k, v in row.items()} for row in cells]
    train = [r for r, c in zip(rows, cells) if (c.get("train_loss") or "").strip()]
    val = [r for r, c in zip(rows, cells) if (c.get("val_loss") or "").strip()]
    return train, val


def _non_finite(value) -> bool:
    """A recorded loss that is NaN or infinite (None / absent: not recorded, not diverged)."""
    if value is None:
        return False
    try:
        return not math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def classify_divergence(job: Job, status: dict) -> None:
    """Mark ``job`` diverged: status ``diverged`` (status.json or results.json, with ``diverged_at_step``), or an
    older run recorded ``completed`` whose final val/test loss is non-finite or whose metrics.csv holds a non-finite
    train loss. The step is the recorded one, else the first non-finite train loss, else the first non-finite
    validation."""
    declared = "diverged" in (job.status, job.results.get("status"))
    bad_final = [k for k in FINAL_LOSSES if _non_finite(job.results.get(k))]
    bad_train = [r["step"] for r in job.train_rows if not math.isfinite(r["train_loss"])]
    if not (declared or (job.status == "completed" and (bad_final or bad_train))):
        return
    step = job.results.get("diverged_at_step", status.get("diverged_at_step"))
    bad_val = [r["step"] for r in job.val_rows if not math.isfinite(r["val_loss"])]
    if step is None and (bad_train or bad_val):
        step = (bad_train or bad_val)[0]
    job.diverged_at_step = int(step) if step is not None else None
    evidence = [f"{k} {job.results.get(k)}" for k in bad_final]
    evidence += [f"train_loss non-finite at step {bad_train[0]:.0f}"] if bad_train else []
    how = "" if declared else f" (recorded as {job.status}: {', '.join(evidence)})"
    job.status = "diverged"
    job.error = f"diverged at step {job.diverged_at_step if step is not None else '? (not recorded)'}{how}"


def read_job(path: Path, name: str) -> Job:
    """A job's overrides, status and results; its status says whether it may be counted."""
    overrides_file = path / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else None
    except (OSError, yaml.YAMLError):
        items = "unreadable"
    results = _read_json(path / "results.json") if (path / "results.json").exists() else {}
    results = results if isinstance(results, dict) or results is None else None  # valid JSON, but not an object
    if isinstance(results, dict) and isinstance(results.get("overrides"), list):
        # the overrides of the run that wrote these results: Hydra rewrites .hydra/ whenever a job starts in the
        # folder, also one that is then refused (a relaunch with another grid), so that file can name another job
        items = results["overrides"]
    readable_items = isinstance(items, list) or items is None
    overrides = parse_overrides(items if isinstance(items, list) else [])
    status_file = path / "status.json"
    status = _read_json(status_file) if status_file.exists() else {}
    status = status if isinstance(status, dict) or status is None else None
    job = Job(name=name, path=path, overrides=overrides, status="missing", results=results or {})
    if status is None or results is None or not readable_items:
        job.status, job.error = "unreadable", ("status.json or results.json is not a JSON object" if readable_items
                                               else ".hydra/overrides.yaml is not a readable list of overrides")
        job.results = {}
    elif not status:
        job.status = "missing" if not results else "unreadable"
        job.error = ("no status.json: the job never started training" if not results
                     else "results.json without status.json (a copied or half-deleted run folder)")
    else:
        job.status, job.error = status.get("status", "unreadable"), status.get("error") or status.get("reason")
        if job.status == "completed" and not results:
            job.status, job.error = "unreadable", "status completed but results.json is absent"
        elif job.status == "running":
            job.error = f"status.json says running (pid {status.get('pid')}); still running, or killed"
    if job.status in ("completed", "diverged"):
        job.train_rows, job.val_rows = read_metrics_csv(path / "metrics.csv")
        classify_divergence(job, status)
    return job


def find_job_dirs(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if any((here / marker).exists() for marker in JOB_MARKERS):
            found.append(here)
            dirnames[:] = []  # a job folder holds no jobs
            continue
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
    return sorted(found, key=lambda p: natural_key(str(p.relative_to(root))))


def sweep_grid(multirun_yaml: Path) -> dict[str, list[str]] | None:
    """key -> values, in the order Hydra's basic sweeper expands this sweep's command line (None: another sweeper).

    Uses Hydra's own override parser, so ``a=1,2``, ``range(1,4)``, ``choice(...)`` and quoted lists expand exactly
    as they did when the sweep ran (as in hydra._internal.core_plugins.basic_sweeper.split_arguments)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    cfg = yaml.safe_load(multirun_yaml.read_text()) or {}
    hydra = cfg.get("hydra") or {}
    sweeper = hydra.get("sweeper") or {}
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    task = (hydra.get("overrides") or {}).get("task") or []
    grid: dict[str, list[str]] = {}
    try:
        for override in OverridesParser.create().parse_overrides([*params, *task]):
            if override.key_or_group in RUN_CONTROL_KEYS:
                continue
            key = override.get_key_element().lstrip("+")
            if override.is_sweep_override():
                grid[key] = list(override.sweep_string_iterator())
            else:
                grid[key] = [override.get_value_element_as_str()]
    except HydraException as error:  # e.g. glob(...) needs the config tree to expand: jobs are still read
        log.warning("%s: its grid cannot be expanded here (%s); jobs it never started are not listed",
                    multirun_yaml, error)
        return None
    return grid


def find_grids(root: Path) -> dict[Path, dict[str, list[str]]]:
    """sweep folder -> its grid, for every multirun.yaml of the basic sweeper under ``root``."""
    grids = {p.parent: sweep_grid(p) for p in sorted(root.rglob("multirun.yaml"), key=lambda p: natural_key(str(p)))}
    return {d: g for d, g in grids.items() if g is not None}


def _missing_jobs(root: Path, jobs: list[Job], grids: dict[Path, dict[str, list[str]]]) -> list[Job]:
    """Jobs a sweep's grid defines that have no folder: a killed or still queued sweep."""
    missing = []
    for sweep_dir, grid in grids.items():
        inside = [j for j in jobs if sweep_dir in j.path.parents]
        present = {tuple(sorted(j.overrides.items())) for j in inside}
        for index, values in enumerate(itertools.product(*grid.values())):
            overrides = dict(zip(grid, values))
            if tuple(sorted(overrides.items())) not in present:
                missing.append(Job(name=str((sweep_dir / str(index)).relative_to(root)), path=sweep_dir / str(index),
                                   overrides=overrides, status="missing",
                                   error="defined by the sweep but no run folder"))
    return missing


def swept_factors(jobs: list[Job], declared: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Keys (seed aside) whose value differs between jobs. Value order: as the sweep command listed them
    (``declared``), then the config's own value (a job that does not override the key), then first appearance."""
    declared = declared or {}
    keys = [k for j in jobs for k in j.overrides if k != SEED_KEY]
    factors = {}
    for key in dict.fromkeys(keys):
        values = [j.overrides.get(key, DEFAULT_VALUE) for j in jobs]
        distinct = set(values)
        if len(distinct) > 1:
            order = [*declared.get(key, []), DEFAULT_VALUE, *values]
            factors[key] = [v for v in dict.fromkeys(order) if v in distinct]
    return factors


def arm_label(factors: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in factors.items()) or "all runs"


def group_arms(jobs: list[Job], factors: dict[str, list[str]]) -> list[Arm]:
    """Arms ordered by the factors' value order (the first arm has the first value of every factor)."""
    arms: dict[str, Arm] = {}
    for job in jobs:
        levels = {k: job.overrides.get(k, DEFAULT_VALUE) for k in factors}
        job.arm = arm_label(levels)
        arms.setdefault(job.arm, Arm(job.arm, levels, [])).jobs.append(job)
    for arm in arms.values():  # a second run of the same arm and seed is the same run: count it once
        seen: dict[int, str] = {}
        for job in arm.completed:
            if job.seed in seen:
                job.status, job.error = "duplicate", f"same arm and seed as {seen[job.seed]}; counted once"
            else:
                seen[job.seed] = job.name
    order = lambda a: [factors[k].index(v) for k, v in a.factors.items()]  # noqa: E731
    return sorted(arms.values(), key=order)


def collect_sweep(path: str | Path) -> Sweep:
    """Every job under ``path`` (plus the ones its multirun.yaml defines but that left no folder), grouped in arms."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {root}")
    jobs = [read_job(d, str(d.relative_to(root)) if d != root else ".") for d in find_job_dirs(root)]
    grids = find_grids(root)
    unify_number_spellings(jobs, grids)
    jobs += _missing_jobs(root, jobs, grids)
    if not jobs:
        raise FileNotFoundError(f"no run folders under {root} (a run folder holds status.json or .hydra/)")
    jobs.sort(key=lambda j: natural_key(j.name))
    declared: dict[str, list[str]] = {}
    for grid in grids.values():  # keys a sweep command swept (k=a,b): their listed order decides the baseline
        for key, values in grid.items():
            if len(values) > 1:
                declared.setdefault(key, values)
    factors = swept_factors(jobs, declared)
    return Sweep(path=root, jobs=jobs, factors=factors, arms=group_arms(jobs, factors))
