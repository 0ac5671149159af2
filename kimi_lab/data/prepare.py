"""Build (or verify) a token cache, before any training job reads it:

    python -m kimi_lab.data.prepare data=<default|text|hf|fineweb_edu> [data.<field>=<value> ...] [--force]
    python -m kimi_lab.data.prepare data=hf data.hf.data_files=/corpus/*.txt data.num_proc=16
    python -m kimi_lab.data.prepare data=default --verify      # hash every file against the manifest
"""

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
DATA_OPTIONS = sorted(p.stem for p in (REPO_ROOT / "conf" / "data").glob("*.yaml"))


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
    parser = argparse.ArgumentParser(prog="python -m kimi_lab.data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help=f"data=<{'|'.join(DATA_OPTIONS)}>, data.<field>=<value>")
    parser.add_argument("--data", choices=DATA_OPTIONS, help="same as data=<name>")
    parser.add_argument("--paths", nargs="+", help="text source: files or folders (data.paths)")
    parser.add_argument("--cache-dir", default=None, help="default: $KIMI_LAB_DATA_DIR or <repo>/data")
    parser.add_argument("--force", action="store_true", help="delete and rebuild the cache")
    parser.add_argument("--verify", action="store_true",
                        help="hash every file of an existing cache against its manifest (exit 1 if any differs)")
    parser.add_argument("--shard-tokens", type=int, default=None,
                        help="tokens per shard file (default 2**27); does not change the tokens or the cache key")
    return parser.parse_args(argv)


def summary(manifest: dict, path: Path) -> str:
    lines = [f"cache    {path}", f"data     {manifest['data']}  tokenizer {manifest['tokenizer']['name']} "
             f"(n_vocab {manifest['tokenizer']['n_vocab']}, {manifest['dtype']})  split_seed {manifest['split_seed']}"]
    for name, info in manifest["sources"].items():
        lines.append(f"source   {name:<12} {info.get('n_docs', 0):>9,} docs  {info.get('spec', '')}")
    for split, info in manifest["splits"].items():
        lines.append(f"split    {split:<12} {info['n_docs']:>9,} docs  {info['n_tokens']:>14,} tokens  "
                     f"{len(info['shards'])} shard(s)")
    total = sum(info["n_tokens"] for info in manifest["splits"].values())
    lines.append(f"total    {total:,} tokens  ({manifest['duplicates_dropped']['n']:,} duplicate documents dropped)")
    return "\n".join(lines)


def _verify(cfg: DictConfig, cache_dir: str) -> int:
    from kimi_lab.data.cache import cache_path, prepare_command, verify_cache

    folder = cache_path(cfg, cache_dir)
    started = time.perf_counter()
    problem = verify_cache(folder)
    if problem is not None:
        print(f"cache {folder}: {problem}; rebuild it with: {prepare_command(cfg, cache_dir)}", file=sys.stderr)
        return 1
    print(f"cache {folder}: every file matches the manifest ({time.perf_counter() - started:.1f}s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = data_config(args.overrides, args.data)
    if args.paths:
        cfg.paths = args.paths
    cache_dir = args.cache_dir or default_cache_dir()
    if args.verify:
        return _verify(cfg, cache_dir)
    from kimi_lab.data.cache import SHARD_TOKENS, build_or_load_cache, cache_path, check_cache

    started = time.perf_counter()
    builds = args.force or check_cache(cache_path(cfg, cache_dir)) is not None
    cache = build_or_load_cache(cfg, cache_dir, force=args.force, shard_tokens=args.shard_tokens or SHARD_TOKENS)
    print(summary(cache.manifest, cache.path))
    build = cache.manifest["build"]
    if builds:
        print(f"built {build['n_tokens']:,} tokens in {build['seconds']:.1f}s: "
              f"{build['tokens_per_s'] / 1e6:.2f} M tokens/s with num_proc {build['num_proc']} "
              f"({build['tokens_per_cpu_s'] / 1e6:.2f} M tokens per CPU second)")
    print(f"ready in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

