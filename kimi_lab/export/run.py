"""Run folders <-> (config, inner model): read a training run's checkpoint, or write an imported model as a run.

A run folder holds ``config_resolved.yaml`` and ``checkpoints/{last.ckpt, best-step<N>.ckpt}``
(see ``kimi_lab.training.init_weights``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kimi_lab.config.schema import Config
from kimi_lab.config.stored import stored_config
from kimi_lab.model import Transformer, build_model
from kimi_lab.training.init_weights import MODEL_PREFIX, load_model_weights

MODEL_GROUPS = ("model", "attention", "norm", "moe", "rope", "data")  # what build_model reads


def structured_config(groups: dict) -> DictConfig:
    """The schema's defaults with ``groups`` merged in (Enums checked, unknown keys rejected)."""
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(groups))


def read_config(run_dir: Path) -> DictConfig:
    path = run_dir / "config_resolved.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be a kimi-lab run folder (outputs/<date>/<time>/ or "
                                "multirun/<sweep>/<job>/)")
    raw = stored_config(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    return structured_config({group: raw[group] for group in MODEL_GROUPS if group in raw})


def load_run(run_dir: str | Path, ckpt: str = "best") -> tuple[DictConfig, Transformer]:
    """(config, Transformer in eval mode with the checkpoint's weights) of a run folder; ``best`` falls back to
    ``last`` when the run has no best checkpoint (never validated, or imported). ``model.checkpoint`` names the file."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    model = build_model(cfg)
    model.checkpoint = load_model_weights(model, run_dir, ckpt)
    return cfg, model.eval()


def architecture_overrides(cfg: DictConfig) -> list[str]:
    """``group.key=value`` for every key of the architecture groups: with them ``train.py`` builds this model."""
    lines: list[str] = []

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                lines.append(f"{prefix}{key}={_hydra_value(value)}")

    groups = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for group in ("model", "attention", "norm", "moe", "rope"):
        walk(f"{group}.", groups[group])
    return lines


def _hydra_value(value) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def write_run(cfg: DictConfig, model: Transformer, run_dir: str | Path) -> Path:
    """A run folder (``config_resolved.yaml`` + ``checkpoints/last.ckpt``) that ``load_run``, the export CLI and
    ``train.py init_from=...`` read (weights and config only: no optimizer or loop state), plus ``overrides.txt``:
    the architecture as train.py overrides (``python train.py $(cat RUN/overrides.txt) init_from=RUN``)."""
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    cfg = structured_config({g: OmegaConf.to_container(cfg[g], resolve=True) for g in MODEL_GROUPS})  # no ${hydra:}
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "overrides.txt").write_text("\n".join(architecture_overrides(cfg)) + "\n")
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    state = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": config}}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir
