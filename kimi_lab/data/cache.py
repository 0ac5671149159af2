"""Tokenized token cache: document-level train/val/test split, uint16 memmaps + manifest.json."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kimi_lab.config.validate import ConfigError
from kimi_lab.config.schema import DataConfig
from kimi_lab.data.corpus import sha256_file
from kimi_lab.data.documents import Document
from kimi_lab.data.sources import enum_value, load_documents, source_fingerprint
from kimi_lab.data.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when cleaning, splitting or the file layout changes
SPLITS = ("train", "val", "test")
DTYPE = np.dtype("<u2")  # uint16, little-endian on disk


class CacheError(RuntimeError):
    """The token cache is unusable and could not be rebuilt."""


@dataclass
class TokenCache:
    path: Path
    manifest: dict
    train: np.ndarray  # (n_train_tokens,) uint16, read-only memmap
    val: np.ndarray  # (n_val_tokens,)
    test: np.ndarray  # (n_test_tokens,)

    def split(self, name: str) -> np.ndarray:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


# ---------------------------------------------------------------- naming

def cache_key(data_cfg: Any) -> str:
    """Short hash of everything that determines the cache content."""
    spec = {
        "format": CACHE_FORMAT,
        "data": enum_value(data_cfg.name),
        "tokenizer": enum_value(data_cfg.tokenizer),
        "split_seed": int(data_cfg.split_seed),
        "val_fraction": float(data_cfg.val_fraction),
        "test_fraction": float(data_cfg.test_fraction),
        "source": source_fingerprint(data_cfg),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_path(data_cfg: Any, cache_dir: str | os.PathLike) -> Path:
    name, tok = enum_value(data_cfg.name), enum_value(data_cfg.tokenizer)
    return Path(cache_dir) / f"{name}-{tok}-{cache_key(data_cfg)}"


def prepare_command(data_cfg: Any, cache_dir: str | os.PathLike) -> str:
    """The shell command that deletes and rebuilds this cache: every key of the cache key written out (prepare reads
    conf/data/<name>.yaml first, so a value equal to the schema's default may still differ from the option's)."""
    name = enum_value(data_cfg.name)
    args = ["python", "-m", "kimi_lab.data.prepare", f"data={name}"]
    keys = ["tokenizer", "split_seed", "val_fraction", "test_fraction"]
    keys += {"text": ["paths", "doc_separator"], "hf": [f"hf.{k}" for k in vars(DataConfig().hf)]}.get(name, [])
    for key in keys:
        value = _to_plain(enum_value(functools.reduce(getattr, key.split("."), data_cfg)))
        args.append(f"data.{key}={json.dumps(value)}")
    args += ["--cache-dir", str(cache_dir), "--force"]
    return " ".join(shlex.quote(a) for a in args)


def _to_plain(x: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(x) if isinstance(x, (DictConfig, ListConfig)) else x


# ---------------------------------------------------------------- splitting

def _order_key(split_seed: int, doc: Document) -> str:
    return hashlib.sha256(f"{split_seed}:{doc.source}:{doc.doc_id}".encode()).hexdigest()


def _n_held_out(fraction: float, n: int) -> int:
    return math.ceil(round(fraction * n, 9)) if fraction > 0 else 0


def drop_duplicates(docs: list[Document]) -> tuple[list[Document], list[str]]:
    """(documents without repeats, ids dropped): a document whose text equals an earlier one's up to whitespace is
    dropped, so a copied file or a repeated row cannot sit in train and in val/test at once."""
    kept, dropped, seen = [], [], set()
    for doc in docs:
        digest = hashlib.sha256(" ".join(doc.text.split()).encode()).digest()
        if digest in seen:
            dropped.append(f"{doc.source}:{doc.doc_id}")
        else:
            seen.add(digest)
            kept.append(doc)
    return kept, dropped


def split_documents(docs: list[Document], split_seed: int, val_fraction: float,
                    test_fraction: float) -> dict[str, list[Document]]:
    """Deterministic document-level split, stratified per source; each split in hash order."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} "
                         "must be in [0, 1) and sum to less than 1")
    by_source: dict[str, list[Document]] = {}
    for doc in docs:
        by_source.setdefault(doc.source, []).append(doc)
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for source, group in sorted(by_source.items()):
        ids = [d.doc_id for d in group]
        if len(set(ids)) != len(ids):
            raise ValueError(f"source {source!r} has duplicate document ids")
        group = sorted(group, key=lambda d: _order_key(split_seed, d))
        n, n_val, n_test = len(group), _n_held_out(val_fraction, len(group)), _n_held_out(test_fraction, len(group))
        if n - n_val - n_test < 1:
            raise ValueError(
                f"source {source!r} has only {n} document(s): with data.val_fraction={val_fraction} and "
                f"data.test_fraction={test_fraction} it needs at least {n_val + n_test + 1} (>= 1 per "
                "non-empty split); add documents (or set data.doc_separator) or lower the fractions")
        splits["val"] += group[:n_val]
        splits["test"] += group[n_val:n_val + n_test]
        splits["train"] += group[n_val + n_test:]
    return {s: sorted(d, key=lambda doc: _order_key(split_seed, doc)) for s, d in splits.items()}


# ---------------------------------------------------------------- building

def _tokenize(docs: list[Document], tokenizer) -> np.ndarray:
    """Concatenate the documents' tokens, each followed by eot -> (n_tokens,) uint16."""
    if not docs:
        return np.zeros(0, dtype=DTYPE)
    pieces = [np.asarray(ids + [tokenizer.eot_id], dtype=DTYPE)
              for ids in tokenizer.encode_batch([d.text for d in docs])]
    return np.concatenate(pieces)


def _write_split(folder: Path, split: str, docs: list[Document], tokens: np.ndarray) -> dict:
    raw = tokens.tobytes()
    (folder / f"{split}.bin").write_bytes(raw)
    per_source: dict[str, int] = {}
    for d in docs:
        per_source[d.source] = per_source.get(d.source, 0) + 1
    return {"file": f"{split}.bin", "n_docs": len(docs), "n_tokens": int(tokens.size),
            "sha256": hashlib.sha256(raw).hexdigest(), "docs_per_source": per_source,
            "doc_ids": [f"{d.source}/{d.doc_id}" for d in docs]}


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def build_cache(data_cfg: Any, final: Path) -> None:
    """Build the cache into a temporary folder, then move it to `final` in one rename."""
    started = time.perf_counter()
    tokenizer = get_tokenizer(data_cfg.tokenizer)
    assert tokenizer.n_vocab <= np.iinfo(DTYPE).max + 1, "token ids must fit in uint16"
    docs, sources = load_documents(data_cfg, final.parent)
    docs, duplicates = drop_duplicates(docs)
    if duplicates:
        log.warning("data: %d duplicate document(s) dropped before the split, e.g. %s", len(duplicates),
                    ", ".join(duplicates[:3]))
    splits = split_documents(docs, int(data_cfg.split_seed), float(data_cfg.val_fraction),
                             float(data_cfg.test_fraction))
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        split_info = {s: _write_split(tmp, s, splits[s], _tokenize(splits[s], tokenizer)) for s in SPLITS}
        manifest = {
            "format": CACHE_FORMAT, "key": final.name.rsplit("-", 1)[-1],
            "data": enum_value(data_cfg.name), "dtype": "uint16",
            "tokenizer": {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab, "eot_id": tokenizer.eot_id},
            "split_seed": int(data_cfg.split_seed), "val_fraction": float(data_cfg.val_fraction),
            "test_fraction": float(data_cfg.test_fraction),
            "sources": sources, "fingerprint": source_fingerprint(data_cfg), "splits": split_info,
            "duplicates_dropped": {"n": len(duplicates), "doc_ids": duplicates[:100]},
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        _write_manifest(tmp, manifest)
        previous = _set_aside(final)  # two renames, so `final` is missing only between them
        os.replace(tmp, final)
    finally:
        _remove(tmp)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)  # open memmaps of the old files stay readable (POSIX unlink)
    counts = {s: (v["n_docs"], v["n_tokens"]) for s, v in split_info.items()}
    log.info("Built token cache %s in %.1fs (docs, tokens) per split: %s", final,
             time.perf_counter() - started, counts)


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


# ---------------------------------------------------------------- loading

def _read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def verify_cache(folder: Path) -> str | None:
    """None if the cache at `folder` is complete and intact, else what is wrong."""
    if not folder.is_dir():
        return "it does not exist"
    try:
        manifest = _read_manifest(folder)
    except (OSError, ValueError) as e:
        return f"manifest.json is missing or unreadable ({e})"
    if manifest.get("format") != CACHE_FORMAT:
        return f"format {manifest.get('format')} != {CACHE_FORMAT}"
    try:
        for split in SPLITS:
            info = manifest["splits"][split]
            path = folder / info["file"]
            expected = info["n_tokens"] * DTYPE.itemsize
            if not path.is_file():
                return f"{path.name} is missing"
            if path.stat().st_size != expected:
                return f"{path.name} has {path.stat().st_size} bytes, expected {expected}"
            if sha256_file(path) != info["sha256"]:
                return f"{path.name} sha256 does not match the manifest"
    except (KeyError, TypeError) as e:
        return f"manifest.json is incomplete ({e!r})"
    return None


def load_cache(folder: Path) -> TokenCache:
    manifest = _read_manifest(folder)
    arrays = {}
    for split in SPLITS:
        n = manifest["splits"][split]["n_tokens"]
        path = folder / manifest["splits"][split]["file"]
        arrays[split] = np.memmap(path, dtype=DTYPE, mode="r") if n else np.zeros(0, dtype=DTYPE)
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


def build_or_load_cache(data_cfg: Any, cache_dir: str | os.PathLike, force: bool = False) -> TokenCache:
    """Load the cache for `data_cfg` from `cache_dir`; build (or rebuild) it when missing or corrupt."""
    final = cache_path(data_cfg, cache_dir)
    if not force and verify_cache(final) is None:
        return load_cache(final)
    with _file_lock(final.parent / f".{final.name}.lock"):
        problem = "a rebuild was forced" if force else verify_cache(final)  # another process may have built it
        if problem is not None:
            if final.exists() or force:
                log.warning("Rebuilding token cache %s: %s", final, problem)
            for prefix in (".tmp", ".trash"):  # left by a build or a deletion that was killed
                for stale in final.parent.glob(f"{prefix}-{final.name}-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            try:
                build_cache(data_cfg, final)
            except ConfigError:
                raise  # a wrong setting, not a broken cache: the message already names the key
            except Exception as e:
                raise CacheError(
                    f"Could not build the token cache {final} ({problem}): {e}\n"
                    f"Fix the cause, then delete and rebuild it with:\n  {prepare_command(data_cfg, cache_dir)}"
                ) from e
    problem = verify_cache(final)
    if problem is not None:
        raise CacheError(f"Token cache {final} is still unusable after a rebuild ({problem}); run:\n"
                         f"  {prepare_command(data_cfg, cache_dir)}")
    return load_cache(final)
