"""The confirm command of a tune sweep: every tuned arm at its best LR on fresh seeds, with the tune sweep's other
overrides (kimi_lab.stats.tune writes it to confirm_command.txt); and what a confirm sweep's jobs recorded of it (the
LR each ran with, the tuned_lr.json they read), for kimi_lab.stats.tune.confirm_notes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from kimi_lab.config.schema import RUN_CONTROL_KEYS, override_key
from kimi_lab.stats.collect import SEED_KEY, Job, Sweep, as_number, natural_key

if TYPE_CHECKING:
    from kimi_lab.stats.tune import Tuning

LR_KEY = "optimizer.lr"
MIN_CONFIRM_SEEDS = 5  # the default confirm sweep's seed count (more when the tune sweep had more)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIRM_SUFFIX = "_confirm"  # the confirm sweep's folder: the tune sweep's folder + this
# keys the confirm command sets itself, or that only say how the tune sweep ran
DROPPED = {LR_KEY, SEED_KEY, "report.tuning_seeds", "report.tuning_sweep", "hydra.sweep.dir", "hydra.run.dir",
           "hydra.mode", *RUN_CONTROL_KEYS}


def tuned_json_path(out: Path) -> Path:
    return (out / "tuned_lr.json").resolve()


def confirm_seeds(tuning_seeds: list[int], chosen: list[int] | None, declared: list[int] | None = None) -> list[int]:
    """``chosen`` (--confirm-seeds), else ``declared`` (the confirm experiment's own seeds), else
    max(MIN_CONFIRM_SEEDS, number of tuning seeds) seeds counting up from the largest tuning seed + 1. Seeds shared
    with the tuning seeds are refused: the LRs were picked on those, so their runs flatter the tuned arms."""
    if chosen is None and declared is None:
        start = max(tuning_seeds, default=0) + 1
        return list(range(start, start + max(MIN_CONFIRM_SEEDS, len(tuning_seeds))))
    seeds = chosen if chosen is not None else declared
    shared = sorted(set(seeds) & set(tuning_seeds))
    if shared:
        where = (f"--confirm-seeds {','.join(map(str, chosen))}" if chosen is not None
                 else f"the confirm experiment's seeds {','.join(map(str, declared))}")
        raise ValueError(f"{where} share seed(s) {', '.join(map(str, shared))} with the tuning seeds "
                         f"{', '.join(map(str, tuning_seeds))}; allowed: seeds the tune sweep did not run "
                         "(--confirm-seeds 11,12,...)")
    return list(seeds)


def declared_confirm_seeds(carried: list[str]) -> list[int] | None:
    """The seeds a confirm experiment (``experiment=X_confirm`` among ``carried``) sweeps in its own
    ``hydra.sweeper.params`` (e.g. 8 seeds sized for the study's MDE); None when it declares none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    for item in carried:
        key, _, value = item.partition("=")
        path = CONF_DIR / "experiment" / f"{value}.yaml"
        if override_key(key) != "experiment" or not value.endswith("_confirm") or not path.is_file():
            continue
        params = (((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper") or {}).get("params")
        if not isinstance(params, dict) or SEED_KEY not in params:
            return None
        try:
            override = OverridesParser.create().parse_override(f"{SEED_KEY}={params[SEED_KEY]}")
            values = override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]
            return [int(v) for v in values]
        except (HydraException, TypeError, ValueError):
            return None
    return None


def sweep_overrides(sweep_dir: Path) -> list[tuple[list[str], list[str]]]:
    """(hydra.overrides.task, hydra.overrides.hydra) of every multirun.yaml under ``sweep_dir``, in folder order."""
    found = sorted(sweep_dir.rglob("multirun.yaml"), key=lambda p: natural_key(str(p)))
    out = []
    for path in found:
        overrides = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("overrides") or {}
        out.append(([str(o) for o in overrides.get("task") or []], [str(o) for o in overrides.get("hydra") or []]))
    return out


def carried_overrides(tuning: Tuning) -> list[str]:
    """The tune sweep's overrides minus the lr, the seed, the arm keys and run control; ``experiment=X_tune`` becomes
    ``experiment=X_confirm`` where conf/experiment/X_confirm.yaml exists. Sweeps without a multirun.yaml (hand-run
    folders): the overrides every completed job shares."""
    found = sweep_overrides(tuning.sweep.path)
    if found:
        task, hydra = found[0]
        items = [*hydra, *task]
    else:
        jobs = [j for j in tuning.sweep.jobs if j.usable]
        lists = [[str(o) for o in j.results.get("overrides") or []] for j in jobs]
        items = [o for o in lists[0] if all(o in other for other in lists[1:])] if lists else []
    dropped = DROPPED | set(tuning.keys)
    return [_confirm_experiment(o) for o in items if override_key(o) not in dropped]


def _confirm_experiment(item: str) -> str:
    key, _, value = item.partition("=")
    if override_key(key) == "experiment" and value.endswith("_tune"):
        confirm = value[: -len("_tune")] + "_confirm"
        if (CONF_DIR / "experiment" / f"{confirm}.yaml").is_file():
            return f"{key}={confirm}"
    return item


def arm_overrides(tuning: Tuning) -> list[str]:
    """``key=v1,v2`` for each arm key over the tuned arms (their cross product is the confirm grid)."""
    tuned = [a for a in tuning.arms if a.best is not None]
    return [f"{key}={','.join(dict.fromkeys(a.factors[key] for a in tuned))}" for key in tuning.keys]


def untuned_in_grid(tuning: Tuning) -> list[str]:
    """Arms the confirm grid (the cross product of ``arm_overrides``) launches that have no tuned LR."""
    import itertools

    tuned = [a for a in tuning.arms if a.best is not None]
    levels = [list(dict.fromkeys(a.factors[k] for a in tuned)) for k in tuning.keys]
    have = {tuple(a.factors[k] for k in tuning.keys) for a in tuned}
    return [", ".join(f"{k}={v}" for k, v in zip(tuning.keys, combo))
            for combo in itertools.product(*levels) if combo not in have]


def quoted(path: Path) -> str:
    """A path as a Hydra override value (and resolver argument): bare when plain, else single-quoted, so a comma or
    space in it is not a sweep or a separator."""
    text = str(path)
    if re.fullmatch(r"[\w./~+:-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def confirm_dir(tuning: Tuning) -> Path:
    path = tuning.sweep.path.resolve()
    return path.with_name(path.name + CONFIRM_SUFFIX)


def confirm_command(tuning: Tuning, tuned_json: Path, seeds: list[int]) -> str:
    """One shell line, run from the repository root: ``python train.py -m`` every tuned arm with
    ``optimizer.lr='${tuned_lr:<tuned_json>}'`` on ``seeds``, recording the tuning seeds and sweep in ``report``."""
    if not any(a.best is not None for a in tuning.arms):
        raise ValueError(f"{tuning.sweep.path}: no arm has an LR where every tuning seed completed, so there is "
                         "nothing to confirm; allowed: a tune sweep with completed, non-diverged cells")
    tuning_seeds = ",".join(map(str, tuning.tuning_seeds))
    items = [*carried_overrides(tuning), *arm_overrides(tuning), f"{LR_KEY}=${{tuned_lr:{quoted(tuned_json)}}}",
             f"{SEED_KEY}={','.join(map(str, seeds))}", f"report.tuning_seeds=[{tuning_seeds}]",
             f"report.tuning_sweep={quoted(tuning.sweep.path.resolve())}",
             f"hydra.sweep.dir={quoted(confirm_dir(tuning))}"]
    return shlex.join(["python", "train.py", "-m", *items])


def job_lr(job: Job) -> float | None:
    """The LR a job ran with: its config_resolved.yaml, else a numeric optimizer.lr override."""
    path = job.path / "config_resolved.yaml"
    try:
        value = ((yaml.safe_load(path.read_text()) or {}).get("optimizer") or {}).get("lr")
    except (OSError, yaml.YAMLError, AttributeError):
        value = None
    value = value if value is not None else as_number(job.overrides.get(LR_KEY, ""))
    return float(value) if isinstance(value, (int, float)) else None


def tuned_file(sweep: Sweep) -> dict:
    """The tuned_lr.json named by the jobs' ``optimizer.lr=${tuned_lr:...}`` override ({} when none is readable).
    Hydra records it escaped (``$\\{tuned_lr\\:/path\\}``); its own parser gives the value back."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for job in sweep.jobs:
        items = [str(o) for o in job.results.get("overrides") or [] if override_key(str(o)) == LR_KEY]
        for item in items:
            try:
                value = str(parser.parse_override(item).value())
            except HydraException:
                continue
            found = re.fullmatch(r"\$\{\s*tuned_lr\s*:\s*(.+?)\s*\}", value)
            if found is None:
                continue
            path = found.group(1)
            if len(path) > 1 and path[0] == path[-1] and path[0] in "'\"":  # a quoted resolver argument
                path = path[1:-1].replace("\\" + path[0], path[0]).replace("\\\\", "\\")
            try:
                return json.loads(Path(path).read_text())
            except (OSError, ValueError):
                return {}
    return {}
