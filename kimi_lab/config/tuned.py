"""The ``tuned_lr`` OmegaConf resolver: ``optimizer.lr='${tuned_lr:/abs/path/tuned_lr.json}'`` gives each job of a
confirm sweep the learning rate ``python -m kimi_lab.stats.tune`` picked for its arm on the tuning seeds.

The file (written by kimi_lab.stats.tune) holds ``keys`` (the swept keys that define an arm, seed and lr aside) and
``arms`` (arm label -> lr), labelled as kimi_lab.stats.collect labels arms: ``key=value`` joined by ", " in the order
of ``keys``, ``all runs`` when there are none. A job's value of a key is its Hydra choice for a config group
(``optimizer=muon``: HydraConfig's ``runtime.choices``) and the config value otherwise (``moe.topk_method``); numbers
match whatever their spelling (``1e-3`` = ``0.001``), as collect unifies them. Imports no torch and no stats code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

RESOLVER = "tuned_lr"
NO_KEYS_LABEL = "all runs"  # kimi_lab.stats.collect.arm_label of an arm with no swept key


def register_tuned_lr() -> None:
    """Register ``${tuned_lr:path}`` once per process (Hydra composes each job's config with it unresolved)."""
    if not OmegaConf.has_resolver(RESOLVER):
        # uncached (OmegaConf refuses a cache for resolvers that read _root_): each access reads the small file
        OmegaConf.register_new_resolver(RESOLVER, tuned_lr)


def tuned_lr(path: str, _root_: DictConfig) -> float:
    """The lr of the running job's arm in the tune file at ``path``; one-line ValueError when the arm is not in it."""
    tuned = _read(Path(str(path)))
    keys = list(tuned["keys"])
    values = job_values(keys, _root_)
    label = ", ".join(f"{k}={v}" for k, v in values.items()) or NO_KEYS_LABEL
    factors = tuned.get("factors") or {a: _split_label(a, keys) for a in tuned["arms"]}
    for arm, lr in tuned["arms"].items():
        if arm == label or same_factors(values, factors.get(arm, {})):
            return float(lr)
    raise ValueError(f"tuned_lr: arm '{label}' is not in {path}; its arms: {'; '.join(tuned['arms']) or 'none'} "
                     f"(allowed: the arms the tune sweep tuned; rerun python -m kimi_lab.stats.tune on a sweep "
                     f"that holds this arm)")


def job_values(keys: list[str], root: DictConfig) -> dict[str, str]:
    """key -> this job's value, spelled as in a command-line override: a config group's Hydra choice (its ``name``
    field when Hydra is not running), else the config value."""
    choices = _hydra_choices()
    out = {}
    for key in keys:
        if key in choices:
            out[key] = str(choices[key])
            continue
        value = OmegaConf.select(root, key, default=None)
        if isinstance(value, DictConfig):  # a config group composed without Hydra's runtime (compose API in tests)
            value = value.get("name")
        out[key] = _spell(value)
    return out


def _hydra_choices() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if v is not None}


def _spell(value) -> str:
    """A config value as Hydra writes it in overrides.yaml: true/false, null (a StrEnum member is its name)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return repr(value) if isinstance(value, float) else str(value)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def same_factors(job: dict[str, str], arm: dict[str, str]) -> bool:
    """Every key has the same value, numbers compared as numbers (collect writes ``1e-3`` and ``1000`` as floats)."""
    if job.keys() != arm.keys():
        return False
    for key, value in job.items():
        other = str(arm[key])
        a, b = _number(value), _number(other)
        if value != other and (a is None or b is None or a != b):
            return False
    return True


def _split_label(label: str, keys: list[str]) -> dict[str, str]:
    """``optimizer=adam, norm.eps=1e-06`` -> {optimizer: adam, norm.eps: 1e-06}, cut at the known keys."""
    if not keys:
        return {}
    pattern = ", ".join(f"{re.escape(k)}=(.*)" for k in keys)
    match = re.fullmatch(pattern, label)
    return dict(zip(keys, match.groups())) if match else {}


def _read(path: Path) -> dict:
    if not path.is_absolute():
        raise ValueError(f"tuned_lr: {path} is a relative path; allowed: the absolute path of a tuned_lr.json "
                         "(confirm_command.txt writes it)")
    try:
        tuned = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"tuned_lr: {path} not found; allowed: the tuned_lr.json that python -m "
                         "kimi_lab.stats.tune <sweep> wrote") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"tuned_lr: {path} is not readable JSON ({error})") from None
    if not isinstance(tuned, dict) or not isinstance(tuned.get("arms"), dict) or not isinstance(tuned.get("keys"),
                                                                                                 list):
        raise ValueError(f"tuned_lr: {path} has no 'keys' list and 'arms' mapping; allowed: a tuned_lr.json written "
                         "by python -m kimi_lab.stats.tune")
    return tuned
