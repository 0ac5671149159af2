"""CLI: ``python -m kimi_lab.export RUN_DIR OUT_DIR [--ckpt last|best|PATH]`` (kimi-lab -> transformers) and
``python -m kimi_lab.export --import HF_DIR RUN_DIR`` (transformers -> a kimi-lab run folder). ``--ckpt`` is named and
defaulted as in ``python -m kimi_lab.evaluation``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kimi_lab.cli import add_ckpt_argument, run_folder_error


def _source_error(source: Path, import_: bool) -> str | None:
    """Why ``source`` cannot be read, checked before transformers is imported (a missing folder would otherwise
    reach the hub-id check of ``from_pretrained``)."""
    if not import_:
        return run_folder_error(source)
    if not (source / "config.json").is_file():
        return (f"--import {source}: not a transformers folder (no config.json); allowed: a local folder written by "
                "save_pretrained (hub ids are not downloaded)")
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.export", description=__doc__)
    parser.add_argument("source", type=Path, help="run folder (export) or transformers folder (--import)")
    parser.add_argument("dest", type=Path, help="output transformers folder (export) or run folder (--import)")
    add_ckpt_argument(parser)
    parser.add_argument("--import", dest="import_", action="store_true",
                        help="transformers -> kimi-lab: write config_resolved.yaml + checkpoints/last.ckpt")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip tokenizer.json / TOKENIZER.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = _source_error(args.source, args.import_)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        from kimi_lab.export import export, load, write_run

        if args.import_:
            cfg, model = load(args.source)
            print(f"imported {args.source} -> {write_run(cfg, model, args.dest)}")
        else:
            out = export(args.source, args.dest, ckpt=args.ckpt, tokenizer=not args.no_tokenizer)
            info = json.loads((out / "kimi_lab_export.json").read_text())
            print(f"exported {info['checkpoint']} -> {out} ({info['architecture']})")
    except (ImportError, ValueError, OSError) as err:  # UnsupportedExport is a ValueError; FileNotFoundError an OSError
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
