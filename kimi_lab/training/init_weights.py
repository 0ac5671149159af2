"""Model weights from a run folder or a Lightning checkpoint: ``init_from`` (fine-tuning) and the export.

A run folder holds ``checkpoints/{last.ckpt, best-step<N>.ckpt}``: Lightning checkpoints of ``LanguageModelModule``,
whose inner ``Transformer`` is ``self.model`` (state-dict keys ``model.<name>``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MODEL_PREFIX = "model."  # LanguageModelModule.model


def find_checkpoint(source: str | Path, which: str = "best") -> Path:
    """A run folder's ``best`` (checkpoints/best-step<N>.ckpt, lowest val_loss) or ``last`` checkpoint, or ``which``
    itself as a path; ``source`` may also be a .ckpt file."""
    source = Path(source)
    if source.is_file():
        return source
    folder = source / "checkpoints"
    if which == "last":
        path = folder / "last.ckpt"
    elif which == "best":
        best = sorted(folder.glob("best-step*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not best:
            raise FileNotFoundError(f"no best-step*.ckpt in {folder} (the run never validated?); use last")
        path = best[-1]
    else:
        path = Path(which)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (a run folder with checkpoints/, or a .ckpt file)")
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


def load_model_weights(model: nn.Module, source: str | Path, which: str = "best") -> Path:
    """Copy the weights of ``source`` (run folder: its best checkpoint, else last; or a .ckpt) into ``model``;
    a different architecture fails with the missing / unexpected / mis-shaped names. Returns the checkpoint used."""
    try:
        path = find_checkpoint(source, which)
    except FileNotFoundError:
        if which != "best":
            raise
        path = find_checkpoint(source, "last")
    try:
        model.load_state_dict(model_state(path), strict=True)
    except RuntimeError as err:
        raise ValueError(f"the weights of {path} do not fit this model's config (pass the overrides the source was "
                         f"built with, e.g. its overrides.txt): {str(err)[:600]}") from err
    return path
