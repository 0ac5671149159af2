"""Export a run to a transformers checkpoint (no custom code) and import one back.

``export(run_dir, out_dir)``: best (or last / given) checkpoint -> ``out_dir`` with ``config.json``,
``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` (+ ``TOKENIZER.md``), loadable by
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``. ``load(hf_dir)``: a transformers folder of a
supported family -> (our config, our ``Transformer``). Targets and refusals: see ``convert.target``.
"""

from __future__ import annotations

import json
from pathlib import Path

from kimi_lab.export.common import UnsupportedExport
from kimi_lab.export.convert import FAMILIES, from_hf, require_transformers, target, to_hf
from kimi_lab.export.run import load_run, write_run


def export(run_dir: str | Path, out_dir: str | Path, ckpt: str = "best", tokenizer: bool = True) -> Path:
    """Write the run's model (checkpoint ``ckpt``: best, else last | last | path) as a transformers folder, plus
    ``kimi_lab_export.json`` (source run, checkpoint, architecture); returns the folder."""
    from kimi_lab.export.tokenizer import write_tokenizer

    cfg, model = load_run(run_dir, ckpt)
    hf_model = to_hf(cfg, model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out_dir))
    provenance = {"run_dir": str(Path(run_dir).resolve()), "checkpoint": str(model.checkpoint),
                  "architecture": type(hf_model).__name__}
    (out_dir / "kimi_lab_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if tokenizer:
        write_tokenizer(cfg.data.tokenizer, out_dir, cfg.data.seq_len)
    return out_dir


def load(hf_dir: str | Path):
    """(config, Transformer) from a transformers folder (``from_pretrained``; local files only)."""
    transformers = require_transformers()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), local_files_only=True)
    return from_hf(hf_model)


__all__ = ["FAMILIES", "UnsupportedExport", "export", "from_hf", "load", "load_run", "target", "to_hf", "write_run"]
