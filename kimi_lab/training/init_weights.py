"""Model weights from a run folder or a Lightning checkpoint: ``init_from`` (fine-tuning) and the export.

A run folder holds ``checkpoints/{last.ckpt, best-step<N>.ckpt}``: Lightning checkpoints of ``LanguageModelModule``,
whose inner ``Transformer`` is ``self.model`` (state-dict keys ``model.<name>``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

MODEL_PREFIX = "model."  # LanguageModelModule.model


class NoBestCheckpoint(FileNotFoundError):
    """The run folder holds no best-step*.ckpt (never validated, or imported): ``load_model_weights`` takes last."""


def find_checkpoint(source: str | Path, which: str = "best") -> Path:
    """A run folder's ``best`` (checkpoints/best-step<N>.ckpt of results.json's ``best_val_step``, the lowest
    val_loss) or ``last`` checkpoint, or ``which`` itself as a path; ``source`` may also be a .ckpt file."""
    source = Path(source)
    if source.is_file():
        return source
    folder = source / "checkpoints"
    if which == "last":
        path = folder / "last.ckpt"
    elif which == "best":
        path = best_checkpoint(source)
    else:
        path = Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (a run folder with checkpoints/, or a .ckpt file)")
    return path


def best_checkpoint(run_folder: Path) -> Path:
    """best-step<N>.ckpt with N = results.json's best_val_step; without results.json (a run still going, or failed)
    the folder's only best-step*.ckpt. Anything else is an error, never a guess (the newest file need not be it)."""
    folder = run_folder / "checkpoints"
    found = sorted(folder.glob("best-step*.ckpt"))
    if not found:
        raise NoBestCheckpoint(f"no best-step*.ckpt in {folder} (the run never validated?); use last")
    results = run_folder / "results.json"
    if results.is_file():
        step = json.loads(results.read_text()).get("best_val_step")
        path = folder / f"best-step{step}.ckpt"
        if step is None or not path.is_file():
            raise FileNotFoundError(f"{results} names best_val_step={step} but {folder} holds "
                                    f"{[p.name for p in found]}; pass last or a .ckpt file")
        return path
    if len(found) > 1:
        raise FileNotFoundError(f"{folder} holds {[p.name for p in found]} and there is no {results.name} to say "
                                "which is best; pass one of them as a path, or last")
    return found[0]


def model_state(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The inner model's state dict from a Lightning checkpoint (``state_dict`` keys ``model.*``)."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # the user's own run: hparams, loop state
    state = ckpt.get("state_dict", ckpt)
    inner = {k.removeprefix(MODEL_PREFIX): v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    if not inner:
        raise ValueError(f"{ckpt_path} holds no '{MODEL_PREFIX}*' weights (not a kimi-lab LanguageModelModule "
                         "checkpoint)")
    return {k.removeprefix("_orig_mod."): v for k, v in inner.items()}  # torch.compile'd modules


def load_model_weights(model: nn.Module, source: str | Path, which: str = "best") -> Path:
    """Copy the weights of ``source`` (run folder: its best checkpoint, last when it has none; or a .ckpt) into
    ``model``; another architecture fails with the missing / unexpected / mis-shaped names. Returns the file used."""
    try:
        path = find_checkpoint(source, which)
    except NoBestCheckpoint:
        path = find_checkpoint(source, "last")
    try:
        model.load_state_dict(model_state(path), strict=True)
    except RuntimeError as err:
        raise ValueError(f"the weights of {path} do not fit this model's config (pass the overrides the source was "
                         f"built with, e.g. its overrides.txt): {str(err)[:600]}") from err
    return path
