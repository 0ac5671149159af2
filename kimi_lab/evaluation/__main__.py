"""Score an existing run folder's checkpoint on the downstream tasks.

    python -m kimi_lab.evaluation RUN_DIR [--tasks piqa lambada] [--limit N] [--ckpt last|best|PATH]
                                          [--batch-size 32] [--device cpu] [--data-dir DIR] [--write]

The model is rebuilt from ``RUN_DIR/config_resolved.yaml`` (same tokenizer, same ``data.seq_len`` context) and the
checkpoint's weights (``last``, the default: the final weights, as ``eval=downstream`` scores them; ``best``: the
lowest-val-loss checkpoint). ``--ckpt`` is named and defaulted as in ``python -m kimi_lab.export``; ``--checkpoint``
is the same flag. Prints ``{"checkpoint": ..., "downstream": {task: metrics}}`` as JSON; ``--write`` also stores it in
``RUN_DIR/results.json`` under ``downstream`` (so ``make report`` compares it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from kimi_lab.cli import add_ckpt_argument, run_folder_error
from kimi_lab.config.schema import EvalConfig, EvalTask


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    tasks = [t.value for t in EvalTask]
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.evaluation", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (holds config_resolved.yaml and checkpoints/)")
    parser.add_argument("--tasks", nargs="+", default=tasks, choices=tasks, metavar="TASK",
                        help=f"tasks to score (default: all of {', '.join(tasks)})")
    parser.add_argument("--limit", type=int, default=None, help="score N items per task, spread over it")
    add_ckpt_argument(parser, "--checkpoint")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--data-dir", default=None,
                        help="item cache folder (default: $KIMI_LAB_DATA_DIR, else the run's paths.data_dir)")
    parser.add_argument("--write", action="store_true", help="store the result in RUN_DIR/results.json")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: allowed: >= 1")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: allowed: >= 1")
    return args


def load_run(run_dir: Path, checkpoint: Path):
    """(config, Transformer with the checkpoint's weights) of a run folder: the whole resolved config (data and
    paths too), the weights read as ``init_from`` and the export read them."""
    from omegaconf import OmegaConf

    from kimi_lab.config import Config
    from kimi_lab.config.stored import stored_config
    from kimi_lab.model import build_model
    from kimi_lab.training.init_weights import model_state

    config_file = run_dir / "config_resolved.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: RUN_DIR must be a kimi_lab run folder")
    stored = stored_config(OmegaConf.to_container(OmegaConf.load(config_file)))
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(stored))
    model = build_model(cfg)
    model.load_state_dict(model_state(checkpoint))
    return cfg, model


def _checkpoint(run_dir: Path, which: str) -> Path:
    """``which`` of the run folder; ``best`` is ``last`` in a run that never validated (as the export reads it)."""
    from kimi_lab.training.init_weights import NoBestCheckpoint, find_checkpoint

    try:
        return find_checkpoint(run_dir, which)
    except NoBestCheckpoint:
        return find_checkpoint(run_dir, "last")


def main(argv: list[str] | None = None) -> dict:
    from omegaconf import OmegaConf

    from kimi_lab.evaluation.runner import evaluate_model
    from kimi_lab.evaluation.tasks import source_root
    from kimi_lab.training.rundir import atomic_write_json

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:  # what is missing, in one line, before the model is built
        problem = run_folder_error(args.run_dir)
        if problem:
            raise FileNotFoundError(problem)
        source_root()  # the benchmark files' package
        checkpoint = _checkpoint(args.run_dir, args.ckpt)
    except (FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"error: {error}") from None
    cfg, model = load_run(args.run_dir, checkpoint)
    model.to(args.device)
    data_dir = args.data_dir or os.environ.get("KIMI_LAB_DATA_DIR") or cfg.paths.data_dir
    eval_cfg = OmegaConf.structured(EvalConfig(tasks=args.tasks, limit=args.limit, batch_size=args.batch_size))
    downstream = evaluate_model(model, eval_cfg, cfg.data, data_dir, device=args.device)
    out = {"checkpoint": str(checkpoint), "downstream": downstream}
    if args.write:
        results_json = args.run_dir / "results.json"
        results = json.loads(results_json.read_text()) if results_json.exists() else {}
        atomic_write_json(results_json, {**results, "downstream": downstream, "downstream_checkpoint": str(checkpoint)})
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return out


if __name__ == "__main__":
    main()
