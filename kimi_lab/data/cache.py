"""Token cache: a folder of fixed-size token shards per split, unigram counts and manifest.json (counts and
digests, no per-document lists); built once by `python -m kimi_lab.data.prepare`, opened by every training job
with size checks only (no hashing: `prepare --verify` hashes)."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
import logging
import os
import resource
import shlex
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kimi_lab.config.schema import DataConfig
from kimi_lab.config.validate import ConfigError
from kimi_lab.data.build import tokenize_into
from kimi_lab.data.corpus import sha256_file
from kimi_lab.data.shards import SHARD_TOKENS, ShardedTokens, ShardWriter
from kimi_lab.data.sources import local_source_bytes, source_fingerprint, stream_documents
from kimi_lab.data.splits import SPLITS, check_fractions
from kimi_lab.data.tokenizer import tokenizer_for, tokenizer_identity

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when cleaning, splitting or the file layout changes
# a training job builds a missing cache itself only for sources up to this size (the default corpus, small local
# corpora: seconds); anything larger, or a hub dataset, fails with the prepare command instead
AUTO_BUILD_MAX_BYTES = 64 << 20


class CacheError(RuntimeError):
    """The token cache is unusable and could not be rebuilt."""


@dataclass
class TokenCache:
    path: Path
    manifest: dict
    train: ShardedTokens  # (n_train_tokens,) read-only, memory-mapped shards
    val: ShardedTokens  # (n_val_tokens,)
    test: ShardedTokens  # (n_test_tokens,)

    def split(self, name: str) -> ShardedTokens:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def unigram_counts(self, name: str) -> np.ndarray:
        """(n_vocab,) int64 token counts of split `name`, counted when the cache was built."""
        return np.load(self.path / self.manifest["splits"][name]["unigram"]["file"])


# ---------------------------------------------------------------- naming

def cache_key(data_cfg: Any) -> str:
    """Short hash of everything that determines the cache content (not data.num_proc: the tokens do not depend
    on it)."""
    spec = {
        "format": CACHE_FORMAT,
        "data": data_cfg.name,
        "tokenizer": tokenizer_identity(data_cfg)[1],
        "split_seed": data_cfg.split_seed,
        "val_fraction": data_cfg.val_fraction,
        "test_fraction": data_cfg.test_fraction,
        "source": source_fingerprint(data_cfg),
    }
    if spec["tokenizer"] == {"name": data_cfg.tokenizer}:
        spec["tokenizer"] = spec["tokenizer"]["name"]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_path(data_cfg: Any, cache_dir: str | os.PathLike) -> Path:
    name, tok = data_cfg.name, tokenizer_identity(data_cfg)[0]
    return Path(cache_dir) / f"{name}-{tok}-{cache_key(data_cfg)}"


def prepare_command(data_cfg: Any, cache_dir: str | os.PathLike, force: bool = True) -> str:
    """The shell command that builds this cache: every key of the cache key written out (prepare reads
    conf/data/<name>.yaml first, so a value equal to the schema's default may still differ from the option's)."""
    name = data_cfg.name
    args = ["python", "-m", "kimi_lab.data.prepare", f"data={name}"]
    keys = ["tokenizer", "tokenizer_file", "split_seed", "val_fraction", "test_fraction"]
    keys += {"text": ["paths", "doc_separator"], "hf": [f"hf.{k}" for k in vars(DataConfig().hf)]}.get(name, [])
    for key in keys:
        value = _to_plain(functools.reduce(getattr, key.split("."), data_cfg))
        args.append(f"data.{key}={json.dumps(value)}")
    args += ["--cache-dir", str(cache_dir)] + (["--force"] if force else [])
    return " ".join(shlex.quote(a) for a in args)


def _to_plain(x: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(x) if isinstance(x, (DictConfig, ListConfig)) else x


# ---------------------------------------------------------------- building

def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _content_digest(splits: dict) -> str:
    """sha256 over every data file's sha256 in manifest order: one digest of the whole cache content."""
    files = [f["sha256"] for s in SPLITS for f in [*splits[s]["shards"], splits[s]["unigram"]]]
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def split_rule(data_cfg: Any) -> str:
    """How documents were assigned to splits (kimi_lab/data/splits.py)."""
    name = data_cfg.name
    by_id = name == "default" or (name == "text" and not data_cfg.doc_separator)
    return "exact counts by document id" if by_id else "hash of the document text"


def _check_splits_filled(data_cfg: Any, split_info: dict, n_docs: int) -> None:
    """Every split with a positive fraction holds a document (the hash split is per document: a tiny corpus can
    leave one empty)."""
    for split, fraction in (("train", 1.0), ("val", data_cfg.val_fraction), ("test", data_cfg.test_fraction)):
        if fraction > 0 and split_info[split]["n_docs"] == 0:
            key = "" if split == "train" else f" data.{split}_fraction={fraction}"
            raise ConfigError(f"the {split} split got none of the {n_docs} document(s) (split by "
                              f"{split_rule(data_cfg)}, data.split_seed={data_cfg.split_seed}{key}): add documents, "
                              "raise the fraction or change data.split_seed")


def build_cache(data_cfg: Any, final: Path, num_proc: int | None = None, shard_tokens: int = SHARD_TOKENS) -> dict:
    """Stream, tokenize and write the cache into a temporary folder, then move it to `final` in one rename;
    returns the manifest."""
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    check_fractions(data_cfg.val_fraction, data_cfg.test_fraction)
    tokenizer = tokenizer_for(data_cfg)
    stream, sources = stream_documents(data_cfg, final.parent)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        writers = [ShardWriter(tmp, s, tokenizer.dtype, tokenizer.n_vocab, shard_tokens) for s in SPLITS]
        rule = (data_cfg.split_seed, data_cfg.val_fraction, data_cfg.test_fraction)
        spec = (data_cfg.tokenizer, data_cfg.tokenizer_file)
        num_proc = num_proc if num_proc is not None else data_cfg.num_proc
        stats = tokenize_into(stream, writers, spec, rule, num_proc)
        split_info = {s: w.close() for s, w in zip(SPLITS, writers, strict=True)}
        for split in SPLITS:
            split_info[split]["docs_per_source"] = dict(stats.split_docs_per_source[split])
        _check_splits_filled(data_cfg, split_info, stats.n_docs - stats.n_duplicates)
        for name, count in stats.docs_per_source.items():
            sources.setdefault(name, {})["n_docs"] = count
        manifest = _manifest(data_cfg, final, tokenizer, sources, split_info, stats, shard_tokens,
                             time.perf_counter() - started, _cpu_seconds() - cpu_started)
        _write_manifest(tmp, manifest)
        previous = _set_aside(final)  # two renames, so `final` is missing only between them
        os.replace(tmp, final)
    finally:
        _remove(tmp)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)  # open memmaps of the old files stay readable (POSIX unlink)
    if stats.n_duplicates:
        log.warning("data: %d duplicate document(s) dropped, e.g. %s", stats.n_duplicates,
                    ", ".join(stats.duplicate_examples[:3]))
    build = manifest["build"]
    log.info("Built token cache %s: %s tokens in %.1fs (%.2f M tokens/s, num_proc %d); (docs, tokens) per split: %s",
             final, f"{build['n_tokens']:,}", build["seconds"], build["tokens_per_s"] / 1e6, build["num_proc"],
             {s: (v["n_docs"], v["n_tokens"]) for s, v in split_info.items()})
    return manifest


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the pool's workers)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _manifest(data_cfg: Any, final: Path, tokenizer, sources: dict, split_info: dict, stats, shard_tokens: int,
              seconds: float, cpu_seconds: float) -> dict:
    n_tokens = sum(info["n_tokens"] for info in split_info.values())
    return {
        "format": CACHE_FORMAT, "key": final.name.rsplit("-", 1)[-1],
        "data": data_cfg.name, "dtype": tokenizer.dtype.name,
        "tokenizer": {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab, "eot_id": tokenizer.eot_id,
                      **tokenizer_identity(data_cfg)[1]},
        "split_seed": data_cfg.split_seed, "val_fraction": data_cfg.val_fraction,
        "test_fraction": data_cfg.test_fraction,
        "split_rule": split_rule(data_cfg),
        "sources": sources, "fingerprint": source_fingerprint(data_cfg), "splits": split_info,
        "digest": _content_digest(split_info), "shard_tokens": int(shard_tokens),
        "duplicates_dropped": {"n": stats.n_duplicates, "examples": stats.duplicate_examples},
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # tokens_per_cpu_s: throughput per busy core, what a shared machine's wall clock does not show
        "build": {"seconds": round(seconds, 2), "num_proc": stats.num_proc, "n_tokens": n_tokens,
                  "tokens_per_s": round(n_tokens / max(seconds, 1e-9)), "cpu_seconds": round(cpu_seconds, 2),
                  "tokens_per_cpu_s": round(n_tokens / max(cpu_seconds, 1e-9))},
    }


def _set_aside(path: Path) -> Path | None:
    """Rename a folder to a hidden trash name (one atomic step); the trash path, or None when there was none."""
    if not path.exists():
        return None
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    return trash


def _remove(path: Path) -> None:
    """Delete a folder without leaving it half-deleted under its real name."""
    trash = _set_aside(path)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------- checking and loading

def _read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _files(manifest: dict) -> Iterator[tuple[str, int | None, str]]:
    """(file name, expected bytes or None, sha256) of every data file the manifest lists."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in SPLITS:
        info = manifest["splits"][split]
        for shard in info["shards"]:
            yield shard["file"], shard["n_tokens"] * itemsize, shard["sha256"]
        yield info["unigram"]["file"], None, info["unigram"]["sha256"]


def check_cache(folder: Path, full: bool = False) -> str | None:
    """None if the cache at `folder` is complete, else what is wrong. The job-start check reads manifest.json and
    stats each file (sizes against the manifest; no file content is read); `full` also hashes every file and
    checks the manifest's digest (`prepare --verify`)."""
    return _inspect(folder, full)[0]


def _inspect(folder: Path, full: bool = False) -> tuple[str | None, dict | None]:
    """(check_cache's answer, the manifest read for it)."""
    if not folder.is_dir():
        return "it does not exist", None
    try:
        manifest = _read_manifest(folder)
    except (OSError, ValueError) as e:
        return f"manifest.json is missing or unreadable ({e})", None
    if manifest.get("format") != CACHE_FORMAT:
        return f"format {manifest.get('format')} != {CACHE_FORMAT}", manifest
    try:
        if manifest["key"] != folder.name.rsplit("-", 1)[-1]:
            return f"manifest key {manifest['key']} does not match the folder name", manifest
        for name, expected, sha in _files(manifest):
            path = folder / name
            if not path.is_file():
                return f"{name} is missing", manifest
            if expected is not None and path.stat().st_size != expected:
                return f"{name} has {path.stat().st_size} bytes, expected {expected}", manifest
            if full and sha256_file(path) != sha:
                return f"{name} sha256 does not match the manifest", manifest
        if full and _content_digest(manifest["splits"]) != manifest["digest"]:
            return "the manifest's digest does not match its files", manifest
    except (KeyError, TypeError, ValueError) as e:
        return f"manifest.json is incomplete ({e!r})", manifest
    return None, manifest


def verify_cache(folder: Path) -> str | None:
    """Full verification: `check_cache` plus the sha256 of every file."""
    return check_cache(folder, full=True)


def load_cache(folder: Path, manifest: dict | None = None) -> TokenCache:
    """The cache at `folder` (its manifest read here unless given), each split's shards memory-mapped lazily."""
    manifest = _read_manifest(folder) if manifest is None else manifest
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    arrays = {split: ShardedTokens([folder / s["file"] for s in manifest["splits"][split]["shards"]],
                                   [s["n_tokens"] for s in manifest["splits"][split]["shards"]], dtype)
              for split in SPLITS}
    return TokenCache(path=folder, manifest=manifest, **arrays)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_or_load_cache(data_cfg: Any, cache_dir: str | os.PathLike, force: bool = False,
                        num_proc: int | None = None, shard_tokens: int = SHARD_TOKENS) -> TokenCache:
    """Load the cache for `data_cfg` from `cache_dir`; build (or rebuild) it under a file lock when missing,
    incomplete or `force`d (what `prepare` runs)."""
    final = cache_path(data_cfg, cache_dir)
    if not force and check_cache(final) is None:
        return load_cache(final)
    with _file_lock(final.parent / f".{final.name}.lock"):
        problem = "a rebuild was forced" if force else check_cache(final)  # another process may have built it
        if problem is not None:
            if final.exists() or force:
                log.warning("Rebuilding token cache %s: %s", final, problem)
            for prefix in (".tmp", ".trash"):  # left by a build or a deletion that was killed
                for stale in final.parent.glob(f"{prefix}-{final.name}-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            try:
                build_cache(data_cfg, final, num_proc=num_proc, shard_tokens=shard_tokens)
            except ConfigError:
                raise  # a wrong setting, not a broken cache: the message already names the key
            except Exception as e:
                raise CacheError(
                    f"Could not build the token cache {final} ({problem}): {e}\n"
                    f"Fix the cause, then delete and rebuild it with:\n  {prepare_command(data_cfg, cache_dir)}"
                ) from e
    problem = check_cache(final)
    if problem is not None:
        raise CacheError(f"Token cache {final} is still unusable after a rebuild ({problem}); run:\n"
                         f"  {prepare_command(data_cfg, cache_dir)}")
    return load_cache(final)


def builds_in_job(data_cfg: Any) -> bool:
    """Whether a training job may build this cache itself: the default corpus and local sources up to
    AUTO_BUILD_MAX_BYTES (a build of seconds); not a hub dataset or a larger corpus."""
    size = local_source_bytes(data_cfg)
    return size is not None and size <= AUTO_BUILD_MAX_BYTES


def open_cache(data_cfg: Any, cache_dir: str | os.PathLike) -> TokenCache:
    """The cache a training job reads: checked by size against its manifest (never hashed); a missing or
    incomplete cache is built here only when `builds_in_job`, else one line names the prepare command."""
    final = cache_path(data_cfg, cache_dir)
    problem, manifest = _inspect(final)
    if problem is None:
        return load_cache(final, manifest)
    if not builds_in_job(data_cfg):
        raise CacheError(f"Token cache {final} is not usable ({problem}) and a training job does not build a "
                         f"corpus over {AUTO_BUILD_MAX_BYTES >> 20} MiB or a hub dataset; build it once with: "
                         f"{prepare_command(data_cfg, cache_dir, force=final.exists())}")
    return build_or_load_cache(data_cfg, cache_dir)
