"""Document sources: the offline `default` corpus, local `text` files and HF `datasets`."""

from __future__ import annotations

import glob
import os
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kimi_lab.config.validate import ConfigError
from kimi_lab.data import corpus
from kimi_lab.data.documents import Document

__all__ = ["Document", "enum_value", "source_fingerprint", "load_documents", "text_files"]

TEXT_SUFFIXES = (".txt", ".md")
DEDUPE = "whitespace-normalised text"  # how build_cache drops repeated documents (part of the cache key)


def enum_value(x: Any) -> Any:
    """Enum member -> its value; anything else unchanged (configs may carry either)."""
    return x.value if isinstance(x, Enum) else x


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


def text_documents(paths: list[str], doc_separator: str | None) -> list[Document]:
    """One document per file, or per `doc_separator`-delimited piece; empty pieces are dropped."""
    docs = []
    for doc_id, path in text_files(paths):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        pieces = text.split(doc_separator) if doc_separator else [text]
        for k, piece in enumerate(pieces):
            if piece.strip():
                docs.append(Document("text", f"{doc_id}#{k}" if doc_separator else doc_id, piece))
    if not docs:
        raise ConfigError(f"data.paths {list(paths)}: all files are empty")
    return docs


# ---------------------------------------------------------------- hf

def _hf_kwargs(hf: Any) -> dict:
    if not hf.path:
        raise ValueError("data.name=hf needs data.hf.path (e.g. 'text', 'json' or a hub dataset id)")
    kwargs = {"path": hf.path, "name": hf.name, "split": hf.split, "data_files": _plain(hf.data_files)}
    if hf.path == "text" and hf.sample_by:
        kwargs["sample_by"] = hf.sample_by
    return kwargs


def hf_documents(hf: Any) -> list[Document]:
    """One document per row of `datasets.load_dataset(...)`, text from `data.hf.text_field`."""
    import datasets

    kwargs = _hf_kwargs(hf)
    dataset = datasets.load_dataset(**kwargs)
    if hf.text_field not in dataset.column_names:
        raise KeyError(f"data.hf.text_field={hf.text_field!r} is not a column of {kwargs['path']!r}; "
                       f"available columns: {dataset.column_names}")
    docs = [Document("hf", str(i), t) for i, t in enumerate(dataset[hf.text_field]) if t and t.strip()]
    if not docs:
        raise ValueError(f"data.hf: dataset {kwargs['path']!r} has no non-empty {hf.text_field!r} rows")
    return docs


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
    name = enum_value(data_cfg.name)
    if name == "default":
        return {"archives": corpus.default_fingerprint()}
    if name == "text":
        files = text_files(list(data_cfg.paths))
        return {"doc_separator": data_cfg.doc_separator, "dedupe": DEDUPE,
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


def load_documents(data_cfg: Any, cache_dir: Path) -> tuple[list[Document], dict]:
    """(documents, per-source provenance) for the configured source."""
    name = enum_value(data_cfg.name)
    if name == "default":
        return corpus.default_documents(Path(cache_dir))
    if name == "text":
        docs = text_documents(list(data_cfg.paths), data_cfg.doc_separator)
        return docs, {"text": {"paths": list(data_cfg.paths), "n_docs": len(docs)}}
    if name == "hf":
        docs = hf_documents(data_cfg.hf)
        return docs, {"hf": {**_hf_kwargs(data_cfg.hf), "text_field": data_cfg.hf.text_field,
                             "n_docs": len(docs)}}
    raise ValueError(f"Unknown data.name {name!r}; expected one of default, text, hf")
