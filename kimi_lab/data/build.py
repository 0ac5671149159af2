"""Streaming tokenization: documents -> a process pool (tokenize, digest, split) -> per-split shard writers.

Memory is bounded whatever the corpus size: the main process holds the chunks in flight (IN_FLIGHT_PER_PROC x
num_proc chunks of ~CHUNK_CHARS characters and their tokens) and one 16-byte digest per document kept (the
duplicate set); each worker holds its tokenizer and one chunk. Tokens travel as numpy arrays (tiktoken's buffer
API): no Python int per token. The pattern is nanoGPT's fineweb.py (pool over documents, shards written as they
fill), with a bounded queue of futures instead of Pool.imap (which reads its whole input ahead of the workers)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from kimi_lab.config.validate import ConfigError
from kimi_lab.data.documents import Document
from kimi_lab.data.shards import ShardWriter
from kimi_lab.data.splits import DIGEST_BYTES, HASH_RULE, SPLITS, TEST, VAL, hash_unit, split_of_unit, text_digest
from kimi_lab.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CHUNK_CHARS = 1 << 20  # characters of text per pool task (~250 k tokens)
IN_FLIGHT_PER_PROC = 2  # tasks queued per worker: keeps every worker busy, bounds the main process's memory
PROGRESS_SECONDS = 30.0


@dataclass(frozen=True)
class Task:
    """One chunk of documents and what a worker needs to encode it (all picklable)."""

    texts: list[str]
    presets: list[int]  # split code per document, or HASH_RULE
    tokenizer: tuple  # load_tokenizer(name, file)
    split_rule: tuple[int, float, float]  # split_seed, val_fraction, test_fraction


@dataclass
class BuildStats:
    n_docs: int = 0  # documents read (before duplicate removal)
    n_duplicates: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    docs_per_source: Counter = field(default_factory=Counter)
    split_docs_per_source: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    num_proc: int = 1


def resolve_num_proc(num_proc: int | None) -> int:
    """data.num_proc, or the CPU cores this process may run on when null."""
    if num_proc is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_proc < 1:
        raise ConfigError(f"Invalid config: data.num_proc={num_proc}; allowed: >= 1 or null (all cores)")
    return num_proc


def encode_task(task: Task) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per chunk: (concatenated 16-byte digests, (n,) int8 split codes, (n,) float64 hash units (inf for a preset
    split), (n,) int64 token counts incl. eot, tokens): every document's ids followed by the tokenizer's eot id, in
    the tokenizer's storage dtype."""
    tokenizer = load_tokenizer(*task.tokenizer)
    arrays = tokenizer.encode_arrays(task.texts)
    digests = [text_digest(t) for t in task.texts]
    seed, val_fraction, test_fraction = task.split_rule
    units = np.array([hash_unit(d, seed) if p == HASH_RULE else np.inf
                      for p, d in zip(task.presets, digests, strict=True)], dtype=np.float64)
    codes = np.array([p if p != HASH_RULE else split_of_unit(u, val_fraction, test_fraction)
                      for p, u in zip(task.presets, units, strict=True)], dtype=np.int8)
    lengths = np.array([a.size + 1 for a in arrays], dtype=np.int64)
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    pieces = [x for a in arrays for x in (a, eot)]
    tokens = np.concatenate(pieces).astype(tokenizer.dtype, copy=False) if pieces else np.zeros(0, tokenizer.dtype)
    return b"".join(digests), codes, units, lengths, tokens


def chunk_stream(stream: Iterable[tuple[Document, int]], tokenizer: tuple, split_rule: tuple,
                 chunk_chars: int = CHUNK_CHARS) -> Iterator[tuple[list[Document], Task]]:
    """Group (document, preset) pairs into tasks of about `chunk_chars` characters, in stream order."""
    docs: list[Document] = []
    presets: list[int] = []
    size = 0
    for doc, preset in stream:
        docs.append(doc)
        presets.append(preset)
        size += len(doc.text)
        if size >= chunk_chars:
            yield docs, Task([d.text for d in docs], presets, tokenizer, split_rule)
            docs, presets, size = [], [], 0
    if docs:
        yield docs, Task([d.text for d in docs], presets, tokenizer, split_rule)


def encode_stream(chunks: Iterator[tuple[list[Document], Task]], num_proc: int) -> Iterator[tuple[list, tuple]]:
    """(documents, encode_task result) per chunk, in order. A corpus of one chunk, or num_proc=1, is encoded in
    this process; otherwise `num_proc` spawned workers (spawn: safe from a process that already runs threads),
    at most IN_FLIGHT_PER_PROC x num_proc chunks queued."""
    head = [c for c in (next(chunks, None), next(chunks, None)) if c is not None]
    if num_proc == 1 or len(head) < 2:
        for docs, task in chain(head, chunks):
            yield docs, encode_task(task)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(num_proc, mp_context=context) as pool:  # a dead worker raises BrokenProcessPool
        pending: deque = deque()
        for docs, task in chain(head, chunks):
            pending.append((docs, pool.submit(encode_task, task)))
            if len(pending) >= IN_FLIGHT_PER_PROC * num_proc:
                docs_done, future = pending.popleft()
                yield docs_done, future.result()
        while pending:
            docs_done, future = pending.popleft()
            yield docs_done, future.result()


class Router:
    """Routes each kept document's tokens to its split's writer. A document whose digest was seen before is dropped
    (duplicate removal in stream order: the first copy stays). The two hash-split documents with the smallest
    units are held back to the end: when val (or test) got no document, the smallest goes there (then the next
    to an empty test), so a small corpus still gets every split whose fraction is positive."""

    def __init__(self, writers: list[ShardWriter], stats: BuildStats, fractions: tuple[float, float]):
        self.writers, self.stats, self.fractions = writers, stats, fractions
        self.seen: set[bytes] = set()
        self.held: list[tuple[float, int, str, np.ndarray]] = []  # (unit, code, source, tokens), at most 2

    def add(self, docs: list[Document], digests: bytes, codes: np.ndarray, units: np.ndarray, lengths: np.ndarray,
            tokens: np.ndarray) -> None:
        codes, starts = codes.copy(), np.concatenate([[0], np.cumsum(lengths)])
        for i, doc in enumerate(docs):
            digest = digests[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES]
            self.stats.docs_per_source[doc.source] += 1
            if digest in self.seen:
                codes[i] = -1
                self.stats.n_duplicates += 1
                if len(self.stats.duplicate_examples) < 10:
                    self.stats.duplicate_examples.append(f"{doc.source}:{doc.doc_id}")
                continue
            self.seen.add(digest)
            if np.isfinite(units[i]) and (len(self.held) < 2 or units[i] < self.held[-1][0]):
                self._hold((float(units[i]), int(codes[i]), doc.source, tokens[starts[i]:starts[i + 1]].copy()))
                codes[i] = -1
            else:
                self.stats.split_docs_per_source[SPLITS[codes[i]]][doc.source] += 1
        self.stats.n_docs += len(docs)
        token_codes = np.repeat(codes, lengths) if len(set(codes.tolist())) > 1 else None
        for code, writer in enumerate(self.writers):
            n_docs = int(np.count_nonzero(codes == code))
            if n_docs:
                writer.write(tokens if token_codes is None else tokens[token_codes == code])
                writer.n_docs += n_docs

    def _hold(self, doc: tuple[float, int, str, np.ndarray]) -> None:
        self.held = sorted([*self.held, doc], key=lambda d: d[0])
        if len(self.held) > 2:
            self._write(*self.held.pop()[1:])

    def _write(self, code: int, source: str, tokens: np.ndarray) -> None:
        self.writers[code].write(tokens)
        self.writers[code].n_docs += 1
        self.stats.split_docs_per_source[SPLITS[code]][source] += 1

    def finish(self) -> None:
        """Write the held documents, the smallest units first moved into an empty val, then an empty test split
        (never emptying the split a document leaves)."""
        held = [list(d) for d in self.held]

        def count(code: int) -> int:
            return self.writers[code].n_docs + sum(d[1] == code for d in held)

        for code, fraction in zip((VAL, TEST), self.fractions, strict=True):
            if fraction > 0 and count(code) == 0:
                movable = [d for d in held if count(d[1]) > 1]
                if movable:
                    movable[0][1] = code
        for _, code, source, tokens in held:
            self._write(code, source, tokens)
        self.held = []


def tokenize_into(stream: Iterable[tuple[Document, int]], writers: list[ShardWriter], tokenizer: tuple,
                  split_rule: tuple[int, float, float], num_proc: int | None) -> BuildStats:
    """Tokenize the whole stream into `writers` (one per split, SPLITS order); counts of what was read."""
    stats = BuildStats(num_proc=resolve_num_proc(num_proc))
    chunk_chars = CHUNK_CHARS
    router = Router(writers, stats, split_rule[1:])
    started = last_log = time.perf_counter()
    for docs, encoded in encode_stream(chunk_stream(stream, tokenizer, split_rule, chunk_chars), stats.num_proc):
        router.add(docs, *encoded)
        if time.perf_counter() - last_log > PROGRESS_SECONDS:
            last_log = time.perf_counter()
            n_tokens = sum(int(w.counts.sum()) for w in writers)
            log.info("data: %s documents, %s tokens, %.2f M tokens/s", f"{stats.n_docs:,}", f"{n_tokens:,}",
                     n_tokens / (last_log - started) / 1e6)
    router.finish()
    return stats
