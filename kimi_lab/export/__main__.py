"""CLI: ``python -m kimi_lab.export RUN_DIR OUT_DIR [--ckpt best|last|PATH]`` (kimi-lab -> transformers) and
``python -m kimi_lab.export --import HF_DIR RUN_DIR`` (transformers -> a kimi-lab run folder)."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.export", description=__doc__)
    parser.add_argument("source", help="run folder (export) or transformers folder (--import)")
    parser.add_argument("dest", help="output transformers folder (export) or run folder (--import)")
    parser.add_argument("--ckpt", default="best", help="best (default: lowest val_loss), last, or a .ckpt path")
    parser.add_argument("--import", dest="import_", action="store_true",
                        help="transformers -> kimi-lab: write config_resolved.yaml + checkpoints/last.ckpt")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip tokenizer.json / TOKENIZER.md")
    args = parser.parse_args(argv)
    try:
        from kimi_lab.export import export, load, write_run

        if args.import_:
            cfg, model = load(args.source)
            print(f"imported {args.source} -> {write_run(cfg, model, args.dest)}")
        else:
            out = export(args.source, args.dest, ckpt=args.ckpt, tokenizer=not args.no_tokenizer)
            info = json.loads((out / "kimi_lab_export.json").read_text())
            print(f"exported {info['checkpoint']} -> {out} ({info['architecture']})")
    except (ImportError, ValueError, FileNotFoundError) as err:  # UnsupportedExport is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
