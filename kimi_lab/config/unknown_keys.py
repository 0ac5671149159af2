"""Keys that no schema field defines. Hydra's ``+key=value`` adds a key anywhere, so a typo such as
``+modle.d_model=128`` or ``+trainer.max_stpes=5`` would compose and train the defaults; here it fails instead, naming
the key and the closest key the schema defines (``difflib``'s ratio, Ratcliff/Obershelp matching).

Every config group file is merged onto the schema (``config_schema`` is the root's first default), so the keys a
group may set are exactly the schema's; nodes typed ``dict`` or ``Any`` (``report.sesoi``, ``data.hf.data_files``)
hold keys of the user's choosing and are not looked into.
"""

from __future__ import annotations

import dataclasses
import difflib
from functools import cache

from omegaconf import DictConfig, OmegaConf


def check_unknown_keys(cfg: DictConfig) -> None:
    """Raise ConfigError naming every key of ``cfg`` that the schema does not define, each with the closest one
    that it does."""
    from kimi_lab.config.validate import ConfigError

    unknown = unknown_keys(cfg)
    if not unknown:
        return
    named = ", ".join(f"{key}{_closest(key)}" for key in unknown)
    raise ConfigError(f"Invalid config: unknown key{'s' if len(unknown) > 1 else ''} {named}; allowed: the keys "
                      "of kimi_lab/config/schema.py (`python train.py --cfg job` prints them)")


def _closest(key: str) -> str:
    close = difflib.get_close_matches(key, known_keys(), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Dotted paths of ``cfg``'s keys (leaves, for a whole unknown subtree) that ``kimi_lab.config.schema.Config``
    does not define; ``hydra`` (Hydra's own node, present under ``return_hydra_config``) is not checked."""
    from kimi_lab.config.schema import Config

    return _unknown(cfg, OmegaConf.structured(Config), "", top=True)


def _unknown(node: DictConfig, schema: DictConfig, prefix: str, top: bool = False) -> list[str]:
    found = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if top and key == "hydra":
            continue
        if key not in schema:
            found.extend(_leaves(node, key, path))
            continue
        child, schema_child = node._get_node(key), schema._get_node(key)
        if _closed(schema_child) and isinstance(child, DictConfig) and not child._is_none():
            found.extend(_unknown(child, schema_child, f"{path}."))
    return found


def _closed(schema_node) -> bool:
    """A node whose keys are a dataclass's fields (a ``dict``-typed node takes any key)."""
    return (isinstance(schema_node, DictConfig) and not schema_node._is_none()
            and dataclasses.is_dataclass(OmegaConf.get_type(schema_node)))


def _leaves(node: DictConfig, key, path: str) -> list[str]:
    child = node._get_node(key)
    if isinstance(child, DictConfig) and not child._is_none() and len(child) > 0:
        return [leaf for sub in child.keys() for leaf in _leaves(child, sub, f"{path}.{sub}")]
    return [path]


@cache
def known_keys() -> tuple[str, ...]:
    """Every dotted path the schema defines (nodes and leaves)."""
    from kimi_lab.config.schema import Config

    return tuple(_paths(OmegaConf.structured(Config), ""))


def _paths(schema: DictConfig, prefix: str) -> list[str]:
    out = []
    for key in schema.keys():
        path = f"{prefix}{key}"
        out.append(path)
        child = schema._get_node(key)
        if _closed(child):
            out.extend(_paths(child, f"{path}."))
    return out
