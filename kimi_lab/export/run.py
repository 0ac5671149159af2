"""Run folders <-> (config, inner model): read a training run's checkpoint, or write an imported model as a run.

A run folder holds ``config_resolved.yaml`` and ``checkpoints/{last.ckpt, best-step<N>.ckpt}``: Lightning
checkpoints of ``LanguageModelModule``, whose inner ``Transformer`` is ``self.model`` (keys ``model.<name>``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from kimi_lab.config.schema import Config
from kimi_lab.model import Transformer, build_model

MODEL_PREFIX = "model."  # LanguageModelModule.model
MODEL_GROUPS = ("model", "attention", "norm", "moe", "rope", "data")  # what build_model reads


def structured_config(groups: dict) -> DictConfig:
    """The schema's defaults with ``groups`` merged in (Enums checked, unknown keys rejected)."""
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(groups))


def read_config(run_dir: Path) -> DictConfig:
    path = run_dir / "config_resolved.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be a kimi-lab run folder (outputs/<date>/<time>/ or "
                                "multirun/<sweep>/<job>/)")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return structured_config({group: raw[group] for group in MODEL_GROUPS if group in raw})


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """``best`` (lowest val_loss: checkpoints/best-step<N>.ckpt), ``last`` (checkpoints/last.ckpt) or a path."""
    folder = run_dir / "checkpoints"
    if which == "last":
        path = folder / "last.ckpt"
    elif which == "best":
        best = sorted(folder.glob("best-step*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not best:
            raise FileNotFoundError(f"no best-step*.ckpt in {folder} (the run never validated?); use --ckpt last")
        path = best[-1]
    else:
        path = Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (--ckpt: best, last or a file)")
    return path


def model_state(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The inner model's state dict from a Lightning checkpoint (``state_dict`` keys ``model.*``)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # the user's own run: hparams, loop state
    state = ckpt.get("state_dict", ckpt)
    inner = {k.removeprefix(MODEL_PREFIX): v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    if not inner:
        raise ValueError(f"{ckpt_path} holds no '{MODEL_PREFIX}*' weights (not a kimi-lab LanguageModelModule "
                         "checkpoint)")
    return {k.removeprefix("_orig_mod."): v for k, v in inner.items()}  # torch.compile'd modules


def load_run(run_dir: str | Path, ckpt: str = "best") -> tuple[DictConfig, Transformer]:
    """(config, Transformer in eval mode with the checkpoint's weights) of a training run."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    model = build_model(cfg)
    model.load_state_dict(model_state(find_checkpoint(run_dir, ckpt)), strict=True)
    return cfg, model.eval()


def write_run(cfg: DictConfig, model: Transformer, run_dir: str | Path) -> Path:
    """A run folder (``config_resolved.yaml`` + ``checkpoints/last.ckpt``) that ``load_run`` and the export CLI
    read; the checkpoint holds weights and config only (no optimizer or loop state)."""
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    state = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"config": config}}, run_dir / "checkpoints" / "last.ckpt")
    return run_dir
