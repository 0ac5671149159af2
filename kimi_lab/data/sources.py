"""Document sources: the offline `default` corpus, local `text` files and HF `datasets`."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kimi_lab.config.validate import ConfigError
from kimi_lab.data import corpus, splits
from kimi_lab.data.documents import Document

__all__ = ["Document", "source_fingerprint", "stream_documents", "text_files", "local_source_bytes"]

TEXT_SUFFIXES = (".txt", ".md")
DEDUPE = "whitespace-normalised text"  # how build_cache drops repeated documents (part of the cache key)
DEFAULT_CORPUS_BYTES = 21_800_000  # SOTU + Brown + Shakespeare cleaned text (docs/data.md)


def _plain(x: Any) -> Any:
    """OmegaConf containers -> plain Python (for hashing and for `load_dataset`)."""
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


# ---------------------------------------------------------------- text

def text_files(paths: list[str]) -> list[tuple[str, Path]]:
    """(doc id, file) for each file in `paths`; folders are walked for *.txt / *.md, sorted."""
    if not paths:
        raise ConfigError("data.name=text needs data.paths: a list of text files or folders (got none)")
    found: list[tuple[str, Path]] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_file():
            found.append((os.path.normpath(given), path))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            found.extend((os.path.normpath(os.path.join(given, p.relative_to(path).as_posix())), p)
                         for p in files)
        else:
            raise FileNotFoundError(f"data.paths entry {given!r} is neither a file nor a folder")
    if not found:
        raise ConfigError(f"data.paths {list(paths)} contain no *.txt or *.md files")
    return found


BLOCK_CHARS = 1 << 22  # characters read at a time when a file is split on data.doc_separator


def _pieces(path: Path, separator: str):
    """The `separator`-delimited pieces of a file (CRLF read as LF), read a block at a time."""
    carry = ""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        while block := f.read(BLOCK_CHARS):
            while block.endswith("\r") and (more := f.read(1)):  # keep a CRLF pair within one block
                block += more
            parts = (carry + block.replace("\r\n", "\n")).split(separator)
            carry = parts.pop()
            yield from parts
    yield carry


def iter_text_documents(paths: list[str], doc_separator: str | None) -> Iterator[Document]:
    """One document per file, or per `doc_separator`-delimited piece (streamed: memory is one block, not the
    file); piece k of a file is document ``<file>#<k>``; empty pieces are skipped."""
    n_docs = 0
    for doc_id, path in text_files(paths):
        if not doc_separator:
            text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
            pieces = enumerate([text])
        else:
            pieces = enumerate(_pieces(path, doc_separator))
        for k, piece in pieces:
            if piece.strip():
                n_docs += 1
                yield Document("text", f"{doc_id}#{k}" if doc_separator else doc_id, piece)
    if not n_docs:
        raise ConfigError(f"data.paths {list(paths)}: all files are empty")


# ---------------------------------------------------------------- hf

def _hf_kwargs(hf: Any) -> dict:
    if not hf.path:
        raise ValueError("data.name=hf needs data.hf.path (e.g. 'text', 'json' or a hub dataset id)")
    kwargs = {"path": hf.path, "name": hf.name, "split": hf.split, "data_files": _plain(hf.data_files)}
    if hf.path == "text" and hf.sample_by:
        kwargs["sample_by"] = hf.sample_by
    return kwargs


def iter_hf_documents(hf: Any) -> Iterator[Document]:
    """One document per row of ``datasets.load_dataset(..., streaming=True)`` (rows are read as they are
    tokenized: no Arrow copy of the corpus), text from `data.hf.text_field`; empty rows are skipped."""
    import datasets

    kwargs = _hf_kwargs(hf)
    n_docs = 0
    for i, row in enumerate(datasets.load_dataset(**kwargs, streaming=True)):
        if i == 0 and hf.text_field not in row:
            raise KeyError(f"data.hf.text_field={hf.text_field!r} is not a column of {kwargs['path']!r}; "
                           f"available columns: {list(row)}")
        text = row[hf.text_field]
        if text and text.strip():
            n_docs += 1
            yield Document("hf", str(i), text)
    if not n_docs:
        raise ValueError(f"data.hf: dataset {kwargs['path']!r} has no non-empty {hf.text_field!r} rows")


def _local_files(item: Any) -> list[str]:
    """The local files a ``data_files`` entry or ``hf.path`` names: itself, every file under a folder, or a glob's
    matches (``**`` recursive, as ``datasets`` reads them); [] for a hub id or anything not on disk."""
    if not isinstance(item, str):
        return []
    path = os.path.expanduser(item)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
    if glob.has_magic(path):
        return sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    return []


def _local_stats(data_files: Any) -> list:
    """(path, size, mtime) of every local file data_files names (files, folders, globs), so adding, removing or
    editing one changes the cache key."""
    if isinstance(data_files, dict):
        return [_local_stats(v) for _, v in sorted(data_files.items())]
    items = data_files if isinstance(data_files, list) else [data_files]
    stats = []
    for item in items:
        for file in _local_files(item):
            st = os.stat(file)
            stats.append([os.path.abspath(file), st.st_size, st.st_mtime_ns])
    return stats


# ---------------------------------------------------------------- dispatch

def source_fingerprint(data_cfg: Any) -> dict:
    """Everything about the source that determines the documents (hashed into the cache key). Local and hub sources
    carry ``dedupe``: their caches built before duplicates were dropped are rebuilt (the default corpus has none)."""
    name = data_cfg.name
    if name == "default":
        return {"archives": corpus.default_fingerprint()}
    if name == "text":
        files = text_files(list(data_cfg.paths))
        return {"doc_separator": data_cfg.doc_separator, "dedupe": DEDUPE, "counts_over": "distinct documents",
                "files": [[doc_id, p.stat().st_size, p.stat().st_mtime_ns] for doc_id, p in files]}
    if name == "hf":
        kwargs = _hf_kwargs(data_cfg.hf)
        fingerprint = {"load_dataset": kwargs, "text_field": data_cfg.hf.text_field, "dedupe": DEDUPE,
                       "local_files": _local_stats(kwargs["data_files"])}
        local_path = _local_stats(kwargs["path"])  # a local dataset folder (or loading script), not a hub id
        if local_path:
            fingerprint["local_path"] = local_path
        return fingerprint
    raise ValueError(f"Unknown data.name {name!r}; expected one of default, text, hf")


def stream_documents(data_cfg: Any, cache_dir: Path) -> tuple[Iterator[tuple[Document, int]], dict]:
    """((document, preset split code) stream, per-source provenance) for the configured source. The code is
    splits.HASH_RULE for streamed sources; the default corpus (all of it known up front) carries its stratified
    split (splits.preset_stream)."""
    name = data_cfg.name
    if name == "default":
        docs, info = corpus.default_documents(Path(cache_dir))
        stream = splits.preset_stream(docs, data_cfg.split_seed, data_cfg.val_fraction, data_cfg.test_fraction)
        return iter(stream), info
    if name == "text":
        docs = iter_text_documents(list(data_cfg.paths), data_cfg.doc_separator)
        info = {"text": {"paths": list(data_cfg.paths)}}
        if data_cfg.doc_separator:
            return ((d, splits.HASH_RULE) for d in docs), info
        codes = _file_split_codes(data_cfg)
        return ((d, codes.get((d.source, d.doc_id), splits.TRAIN)) for d in docs), info
    if name == "hf":
        docs = iter_hf_documents(data_cfg.hf)
        info = {"hf": {**_hf_kwargs(data_cfg.hf), "text_field": data_cfg.hf.text_field, "streaming": True}}
        return ((d, splits.HASH_RULE) for d in docs), info
    raise ValueError(f"Unknown data.name {name!r}; expected one of default, text, hf")


def _file_split_codes(data_cfg: Any) -> dict[tuple[str, str], int]:
    """One document per file: the split is the exact stratified one (`splits.split_documents`) over the distinct
    documents, so dropping a copy can never empty a split. A first pass digests each file (16 bytes per document
    held; files read twice, which the one-file-per-document layout of small corpora affords); later copies in path
    order get no code of their own (TRAIN), and the builder drops them as it drops every repeated digest."""
    seen: set[bytes] = set()
    stubs = []
    for doc in iter_text_documents(list(data_cfg.paths), None):
        digest = splits.text_digest(doc.text)
        if digest not in seen:
            seen.add(digest)
            stubs.append(Document(doc.source, doc.doc_id, ""))
    return splits.preset_codes(stubs, data_cfg.split_seed, data_cfg.val_fraction, data_cfg.test_fraction)


def local_source_bytes(data_cfg: Any) -> int | None:
    """Bytes of the local files the source reads (the default corpus: its archives' text, about 22 MB); None for a
    hub dataset (size unknown until streamed)."""
    name = data_cfg.name
    if name == "default":
        return DEFAULT_CORPUS_BYTES
    if name == "text":
        return sum(p.stat().st_size for _, p in text_files(list(data_cfg.paths)))
    kwargs = _hf_kwargs(data_cfg.hf)
    stats = _local_stats(kwargs["data_files"]) or _local_stats(kwargs["path"])
    return _total_size(stats) if stats else None


def _total_size(stats: list) -> int:
    """Sum of the sizes in `_local_stats` output (nested per data_files key)."""
    return sum(_total_size(s) if s and isinstance(s[0], list) else s[1] for s in stats)
