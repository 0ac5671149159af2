"""What a study declared before it ran, as the report reads it: the ``report`` block that training copies into every
results.json (primary metric, smallest effect size of interest, targets, MDE goal, tuning seeds), with the CLI's
``--primary``, ``--sesoi METRIC=VALUE`` and ``--target METRIC=VALUE`` over it. Runs without the block get DEFAULTS."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from kimi_lab.stats.collect import Sweep
from kimi_lab.stats.metrics import CURVE_TARGETS, DERIVED, LENGTH_PREFIX, TIMING, metric_named, tested_metric_names

DEFAULTS = {"primary_metric": "val_loss", "sesoi": {"val_loss": 0.02}, "target": {}, "mde_goal": 0.05,
            "tuning_seeds": [], "tuning_sweep": None}


@dataclass
class Settings:
    primary_metric: str = "val_loss"
    sesoi: dict[str, float] = field(default_factory=lambda: dict(DEFAULTS["sesoi"]))
    target: dict[str, float] = field(default_factory=dict)  # metric -> declared target (val_loss only)
    mde_goal: float = 0.05  # primary-metric MDE above it: the report is a pipeline check
    tuning_seeds: list[int] = field(default_factory=list)
    tuning_sweep: str | None = None
    source: dict[str, str] = field(default_factory=dict)  # setting -> "default" | "results.json" | the CLI flag
    warnings: list[str] = field(default_factory=list)

    @property
    def target_loss(self) -> float:
        """The declared val-loss target of tokens_to_target, NaN when none is declared."""
        return float(self.target.get("val_loss", math.nan))


def check_metric(name: str, where: str) -> str:
    """``name`` when it is a tested metric, else ValueError naming ``where`` and what is allowed."""
    try:
        metric = metric_named(name)
    except KeyError:
        raise ValueError(f"{where}: unknown metric {name!r}; allowed: {', '.join(tested_metric_names())} or "
                         f"{LENGTH_PREFIX}<length>") from None
    if metric.kind == DERIVED:
        raise ValueError(f"{where}: {name} is a transform of val_loss and is not tested; use val_loss")
    if metric.kind == TIMING:
        raise ValueError(f"{where}: {name} is a timing metric, described per arm and never tested "
                         f"(compare timings with `make bench`)")
    return name


def parse_assignments(items: list[str] | None, flag: str) -> dict[str, float]:
    """['val_loss=0.02', ...] -> {'val_loss': 0.02}; ValueError naming ``flag`` on a malformed item."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        try:
            number = float(value) if sep and key.strip() else math.nan
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"{flag} {item!r}: expected METRIC=NUMBER, e.g. {flag} val_loss=0.02")
        out[key.strip()] = number
    return out


def _numbers(value, where: str) -> dict[str, float]:
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value.values()):
        raise ValueError(f"{where}: expected a mapping of metric -> number, got {value!r}")
    return {str(k): float(v) for k, v in value.items()}


def declared_block(sweep: Sweep) -> tuple[dict, str, list[str]]:
    """(the ``report`` block of the completed jobs, the job it was read from, warnings). Jobs that disagree: the
    block most of them carry, with a warning naming the others."""
    blocks = [(j.name, j.results["report"]) for j in sweep.jobs if j.usable and isinstance(j.results.get("report"),
                                                                                            dict)]
    if not blocks:
        return {}, "", []
    counts = Counter(json.dumps(b, sort_keys=True) for _, b in blocks)
    chosen = counts.most_common(1)[0][0]
    others = [name for name, b in blocks if json.dumps(b, sort_keys=True) != chosen]
    name = next(name for name, b in blocks if json.dumps(b, sort_keys=True) == chosen)
    listed = f"{', '.join(others[:8])}{', ...' * (len(others) > 8)}"
    warnings = [f"jobs declare different `report` blocks in results.json: read the one of {counts[chosen]} job(s) "
                f"(e.g. {name}); {listed} declare another"] if others else []
    return json.loads(chosen), name, warnings


def resolve_settings(sweep: Sweep, primary: str | None = None, sesoi: dict[str, float] | None = None,
                     target: dict[str, float] | None = None) -> Settings:
    """Defaults, then the completed jobs' ``report`` block, then the CLI (``primary``, ``sesoi``, ``target``)."""
    block, job, warnings = declared_block(sweep)
    where = f"report.{{}} (results.json of job {job})"
    settings = Settings(warnings=warnings)
    settings.source = dict.fromkeys(DEFAULTS, "default")
    for key in DEFAULTS:
        if block.get(key) is not None:
            settings.source[key] = "results.json"
    settings.primary_metric = check_metric(str(block.get("primary_metric") or DEFAULTS["primary_metric"]),
                                           where.format("primary_metric"))
    settings.sesoi = _numbers(block.get("sesoi", DEFAULTS["sesoi"]) or {}, where.format("sesoi"))
    settings.target = _numbers(block.get("target") or {}, where.format("target"))
    for name in [k for k in settings.target if k not in CURVE_TARGETS]:  # the config allows any metric's target
        del settings.target[name]
        settings.warnings.append(f"report.target declares {name}; the report computes time to target on the "
                                 f"metrics.csv curve of {', '.join(CURVE_TARGETS)} only, so it is ignored")
    goal = block.get("mde_goal")
    settings.mde_goal = float(goal) if isinstance(goal, (int, float)) else DEFAULTS["mde_goal"]
    settings.tuning_seeds = [int(s) for s in block.get("tuning_seeds") or []]
    settings.tuning_sweep = block.get("tuning_sweep")
    if primary:
        settings.primary_metric, settings.source["primary_metric"] = check_metric(primary, "--primary"), "--primary"
    if sesoi:
        settings.sesoi, settings.source["sesoi"] = {**settings.sesoi, **sesoi}, "--sesoi"
    if target:
        settings.target, settings.source["target"] = {**settings.target, **target}, "--target"
    _validate(settings, where)
    settings.warnings += tuning_warnings(sweep, settings)
    return settings


def _validate(settings: Settings, where: str) -> None:
    for name, value in settings.sesoi.items():
        flag = "--sesoi" if settings.source["sesoi"] == "--sesoi" else where.format("sesoi")
        check_metric(name, flag)
        if not value > 0:
            raise ValueError(f"{flag}: {name}={value}; allowed: a positive number (the smallest effect that matters, "
                             f"in the metric's units)")
    for name in settings.target:  # the declared ones are checked in resolve_settings: these came from --target
        if name not in CURVE_TARGETS:
            raise ValueError(f"--target: {name!r} has no curve in metrics.csv; allowed: {', '.join(CURVE_TARGETS)}")
    if not settings.mde_goal > 0:
        raise ValueError(f"{where.format('mde_goal')}: {settings.mde_goal}; allowed: a positive number")


def tuning_warnings(sweep: Sweep, settings: Settings) -> list[str]:
    """The counted seeds that were also tuning seeds: the tuned LRs were selected on them, which flatters the winner."""
    reused = sorted({j.seed for j in sweep.jobs if j.usable} & set(settings.tuning_seeds), key=str)
    if not reused:
        return []
    return [f"seed(s) {', '.join(map(str, reused))} of this sweep were also tuning seeds (report.tuning_seeds, "
            f"tuned on {settings.tuning_sweep or 'an unrecorded sweep'}): the learning rates were selected on them, "
            f"which flatters the tuned arms; confirm on fresh seeds"]
