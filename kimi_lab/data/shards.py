"""Token shards: a split is a run of fixed-size little-endian files ``<split>-NNNNN.bin`` (every shard but the last
holds exactly `shard_tokens` tokens), written as they fill and read back as one memory-mapped array."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from kimi_lab.data.corpus import sha256_file

SHARD_TOKENS = 1 << 27  # 134,217,728 tokens: 256 MiB of uint16, 512 MiB of uint32


class ShardWriter:
    """Appends one split's tokens to its shards, hashing (sha256) and counting (unigram counts) as it writes:
    nothing is read back after the build. Memory: the counts (8 bytes x n_vocab) and the piece being written."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, n_vocab: int, shard_tokens: int = SHARD_TOKENS):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.folder, self.split, self.dtype = Path(folder), split, np.dtype(dtype)
        self.n_vocab, self.shard_tokens = int(n_vocab), int(shard_tokens)
        self.counts = np.zeros(self.n_vocab, dtype=np.int64)  # (n_vocab,)
        self.shards: list[dict] = []
        self.n_docs = 0
        self._file = None
        self._hash = None
        self._in_shard = 0

    def write(self, tokens: np.ndarray) -> None:
        """Append `tokens` (any integer dtype; ids < n_vocab) to the split."""
        if not tokens.size:
            return
        counts = np.bincount(tokens, minlength=self.n_vocab)
        if counts.size > self.n_vocab:
            raise ValueError(f"token id {counts.size - 1} >= the tokenizer's n_vocab {self.n_vocab}")
        self.counts += counts
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None:
                self._open()
            part, tokens = tokens[:self.shard_tokens - self._in_shard], tokens[self.shard_tokens - self._in_shard:]
            part.tofile(self._file)
            self._hash.update(memoryview(part).cast("B"))
            self._in_shard += part.size
            if self._in_shard == self.shard_tokens:
                self._close_shard()

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file, self._hash, self._in_shard = open(self.folder / name, "wb"), hashlib.sha256(), 0
        self.shards.append({"file": name, "n_tokens": 0, "sha256": None})

    def _close_shard(self) -> None:
        self._file.close()
        self.shards[-1].update(n_tokens=self._in_shard, sha256=self._hash.hexdigest())
        self._file = self._hash = None

    def close(self) -> dict:
        """Finish the last shard and write the unigram counts; the split's manifest entry."""
        if self._file is not None:
            self._close_shard()
        counts_file = f"{self.split}-unigram.npy"
        np.save(self.folder / counts_file, self.counts)
        return {"n_docs": self.n_docs, "n_tokens": int(self.counts.sum()), "shards": self.shards,
                "unigram": {"file": counts_file, "sha256": sha256_file(self.folder / counts_file)}}


class ShardedTokens:
    """A split's shards as one read-only token array: len, int / slice / integer-array indexing and np.asarray.
    Each shard is memory-mapped on first use; pickling keeps only the paths, so a DataLoader worker maps the
    files itself instead of receiving a copy of the tokens."""

    def __init__(self, paths: list[Path], sizes: list[int], dtype: np.dtype):
        self.paths, self.sizes, self.dtype = [Path(p) for p in paths], [int(n) for n in sizes], np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])  # (n_shards + 1,)
        self._maps: list[np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def _shards(self) -> list[np.ndarray]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(n,)) if n else np.zeros(0, self.dtype)
                          for p, n in zip(self.paths, self.sizes, strict=True)]
        return self._maps

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def size(self) -> int:
        return len(self)

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self._shards()) if self.sizes else np.zeros(0, self.dtype)
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self._slice(*key.indices(len(self)))
        if isinstance(key, (int, np.integer)):
            i = int(key) + len(self) if key < 0 else int(key)
            if not 0 <= i < len(self):
                raise IndexError(key)
            shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self._shards()[shard][i - self.offsets[shard]]
        return self._take(np.asarray(key))

    def _slice(self, start: int, stop: int, step: int) -> np.ndarray:
        if step != 1:
            return self._take(np.arange(start, stop, step))
        if stop <= start:
            return np.zeros(0, self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left")) - 1
        maps = self._shards()
        if first == last:  # within one shard: a view of its memmap
            return maps[first][start - self.offsets[first]:stop - self.offsets[first]]
        return np.concatenate([maps[s][max(start - self.offsets[s], 0):min(stop, self.offsets[s + 1])
                                       - self.offsets[s]] for s in range(first, last + 1)])

    def _take(self, index: np.ndarray) -> np.ndarray:
        """Tokens at integer positions `index` (any shape; negatives count from the end)."""
        flat = index.astype(np.int64).ravel()
        flat = np.where(flat < 0, flat + len(self), flat)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"index out of range for a split of {len(self)} tokens")
        out = np.empty(flat.size, dtype=self.dtype)
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        for s in np.unique(shard_of):
            mask = shard_of == s
            out[mask] = self._shards()[s][flat[mask] - self.offsets[s]]
        return out.reshape(index.shape)

    def __repr__(self) -> str:
        return f"ShardedTokens({len(self)} tokens, {len(self.paths)} shard(s), {self.dtype})"
