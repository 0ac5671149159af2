"""Configs that runs stored (``config_resolved.yaml``, a checkpoint's ``hyper_parameters.config``) in the schema's keys.

An attention group without ``type`` selects its module by ``name``: ``standard | sdpa | flash`` are multi-head
attention on that kernel (``kernel`` null), ``mla`` is latent attention on ``kernel``, whose projection bias is
``attention_bias`` (``bias`` false). Its parameter names are the same, so such a run's checkpoints load as they are.
"""

from __future__ import annotations

from typing import Any


def attention_group(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` in the keys ``type``, ``kernel`` and ``bias`` (a copy; a group that has ``type`` is returned)."""
    if "type" in group:
        return group
    out = {key: value for key, value in group.items() if key != "attention_bias"}
    if group.get("name") == "mla":
        return out | {"type": "mla", "bias": bool(group.get("attention_bias"))}
    return out | {"type": "mha", "kernel": group.get("name", "sdpa")}


def stored_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config (plain dict, as ``OmegaConf.to_container`` gives) with its attention group in the schema's
    keys, ready to merge onto ``Config``."""
    if not isinstance(raw.get("attention"), dict):
        return raw
    return raw | {"attention": attention_group(raw["attention"])}
