"""Build (or verify) a token cache: `python -m kimi_lab.data.prepare data=default [--force]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kimi_lab.config.schema import DataConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_cache_dir() -> str:
    """$KIMI_LAB_DATA_DIR, else <repo root>/data."""
    return os.environ.get("KIMI_LAB_DATA_DIR") or str(REPO_ROOT / "data")


def data_config(overrides: list[str], data: str | None = None) -> DictConfig:
    """The ``data`` node train.py composes, from Hydra-style overrides (`data=text`, `data.paths=[a,b]`,
    `data.hf.path=json`): the DataConfig schema, then the group's option file ``conf/data/<name>.yaml`` (its split
    fractions and hf defaults: the same cache key as training), then the field overrides."""
    name, dotlist = "default", []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not of the form key=value")
        if key == "data":
            name = value
        elif key.startswith("data."):
            dotlist.append(f"{key[len('data.'):]}={value}")
        else:
            raise SystemExit(f"override {item!r}: only data=... and data.<field>=... are understood here")
    name = data if data is not None else name
    cfg = OmegaConf.structured(DataConfig)
    option = REPO_ROOT / "conf" / "data" / f"{name}.yaml"
    if option.is_file():
        cfg.merge_with(OmegaConf.load(option))
    else:
        cfg.name = name  # the schema's Enum names the allowed values
    cfg.merge_with_dotlist(dotlist)
    return cfg


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.data.prepare", description=__doc__)
    parser.add_argument("overrides", nargs="*", help="data=<default|text|hf>, data.<field>=<value>")
    parser.add_argument("--data", choices=["default", "text", "hf"], help="same as data=<name>")
    parser.add_argument("--paths", nargs="+", help="text source: files or folders (data.paths)")
    parser.add_argument("--cache-dir", default=None, help="default: $KIMI_LAB_DATA_DIR or <repo>/data")
    parser.add_argument("--force", action="store_true", help="delete and rebuild the cache")
    return parser.parse_args(argv)


def summary(manifest: dict, path: Path) -> str:
    lines = [f"cache    {path}", f"data     {manifest['data']}  tokenizer {manifest['tokenizer']['name']} "
             f"(n_vocab {manifest['tokenizer']['n_vocab']})  split_seed {manifest['split_seed']}"]
    for name, info in manifest["sources"].items():
        lines.append(f"source   {name:<12} {info['n_docs']:>7,} docs  {info.get('spec', '')}")
    for split, info in manifest["splits"].items():
        lines.append(f"split    {split:<12} {info['n_docs']:>7,} docs  {info['n_tokens']:>12,} tokens")
    total = sum(info["n_tokens"] for info in manifest["splits"].values())
    lines.append(f"total    {total:,} tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = data_config(args.overrides, args.data)
    if args.paths:
        cfg.paths = args.paths
    from kimi_lab.data.cache import build_or_load_cache

    started = time.perf_counter()
    cache = build_or_load_cache(cfg, args.cache_dir or default_cache_dir(), force=args.force)
    print(summary(cache.manifest, cache.path))
    print(f"ready in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
