"""LightningDataModule over the token cache: prefix-stable shuffled train windows, fixed eval windows spread
evenly over their split (under DDP each process scores its own disjoint share of them)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from kimi_lab.config.validate import ConfigError
from kimi_lab.data import baseline
from kimi_lab.data.cache import TokenCache, open_cache
from kimi_lab.data.tokenizer import Tokenizer, tokenizer_for

log = logging.getLogger(__name__)


def _window(tokens: np.ndarray, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (seq_len,) int64, from the seq_len + 1 tokens at `start`; y is x shifted by one."""
    chunk = torch.from_numpy(np.asarray(tokens[start:start + seq_len + 1], dtype=np.int64))
    return chunk[:-1], chunk[1:]


def check_split_length(tokens: np.ndarray, seq_len: int, split: str) -> None:
    if len(tokens) < seq_len + 1:
        raise ConfigError(f"data.seq_len={seq_len} is too long for the {split} split: it has "
                         f"{len(tokens)} tokens and one window needs seq_len + 1 = {seq_len + 1}; "
                         "lower data.seq_len or add data")


class TrainWindows(Dataset):
    """Item i -> a window chosen only by (seed, i, len(tokens), seq_len): epochs of shuffled,
    non-overlapping windows, each epoch with its own random offset. Prefix-stable in `length`."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, length: int):
        check_split_length(tokens, seq_len, "train")
        self.tokens, self.seq_len, self.seed, self.length = tokens, seq_len, seed, length
        full = len(tokens) // seq_len - 1  # windows that fit after any offset in [0, seq_len)
        if full >= 1:
            self.n_windows, self.max_offset = full, seq_len - 1
        else:  # shorter than 2 * seq_len: a single window, offset within the slack
            self.n_windows, self.max_offset = 1, len(tokens) - seq_len - 1
        self._epoch: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, permutation)

    def __len__(self) -> int:
        return self.length

    def _epoch_plan(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.max_offset + 1))
            self._epoch = (epoch, offset, rng.permutation(self.n_windows))
        return self._epoch[1], self._epoch[2]

    def window_start(self, i: int) -> int:
        if not 0 <= i < self.length:
            raise IndexError(i)
        offset, perm = self._epoch_plan(i // self.n_windows)
        return offset + int(perm[i % self.n_windows]) * self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _window(self.tokens, self.window_start(i), self.seq_len)


def eval_window_starts(n_tokens: int, seq_len: int, max_tokens: int, block: int) -> np.ndarray:
    """Starts of the scored windows: n = min(max_tokens // block, n_avail) of the n_avail = (n_tokens - 1) // block
    aligned blocks of `block` tokens, spread evenly (block i at index floor(i * n_avail / n): the first at 0, the last
    within n_avail / n blocks of the end), each tiled by block // seq_len windows -> (n * (block // seq_len),) int64,
    ascending, non-overlapping. Depends only on its arguments (the same windows for every model config)."""
    n_avail = (n_tokens - 1) // block  # a block scores tokens start+1 .. start+block: needs block + 1 tokens
    n = min(max_tokens // block, n_avail)  # >= 1: EvalWindows checked both
    blocks = np.arange(n, dtype=np.int64) * n_avail // n * block  # (n,) distinct, so disjoint
    return (blocks[:, None] + np.arange(block // seq_len, dtype=np.int64) * seq_len).ravel()


def _check_eval_budget(n_tokens: int, seq_len: int, max_tokens: int, block: int, split: str) -> None:
    """A clear error instead of scoring a window the budget does not pay for (validate_config checks
    data.{val,test}_tokens >= data.seq_len first; this covers data modules built from unvalidated configs)."""
    if block < seq_len:
        raise ValueError(f"eval block {block} is shorter than the window length {seq_len}")
    if max_tokens < block:
        raise ConfigError(f"Invalid config: data.{split}_tokens={max_tokens}; allowed: >= one eval window of "
                          f"{block} tokens (data.seq_len, or the longest of data.eval_lengths x data.seq_len)")
    if n_tokens < block + 1:
        raise ConfigError(f"the {split} split has {n_tokens} tokens, fewer than one eval window of {block} tokens "
                          f"needs ({block + 1}): lower data.eval_lengths or data.seq_len, or add data")


class EvalWindows(Dataset):
    """The fixed windows a val/test pass scores, in order: `max_tokens` (rounded down to whole blocks) spread
    evenly over the whole split in non-overlapping aligned windows (see eval_window_starts), so the scored text
    follows the split's per-source mix instead of the hash-ordered prefix. `block` (default seq_len, a length >=
    seq_len) is the spread unit: the length eval spreads blocks of its longest length and tiles them at each
    length, so every length that divides it scores the same targets."""

    def __init__(self, tokens: np.ndarray, seq_len: int, max_tokens: int, split: str, block: int | None = None):
        check_split_length(tokens, seq_len, split)
        block = seq_len if block is None else block
        _check_eval_budget(len(tokens), seq_len, max_tokens, block, split)
        self.tokens, self.seq_len = tokens, seq_len
        self.starts = eval_window_starts(len(tokens), seq_len, max_tokens, block)  # (n_windows,) int64
        self.n_windows = len(self.starts)

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n_windows:
            raise IndexError(i)
        return _window(self.tokens, int(self.starts[i]), self.seq_len)

    def targets(self) -> np.ndarray:
        """All scored targets, window by window in order: (n_windows * seq_len,) in the cache's dtype."""
        positions = self.starts[:, None] + np.arange(1, self.seq_len + 1)  # (n_windows, seq_len)
        return self.tokens[positions.ravel()]  # gathers only these positions (memmap / ShardedTokens)


class ResumableShardSampler(Sampler[int]):
    """Yields start_index + k * world_size + rank; the same count on every rank.

    `start_index` (global samples already consumed) is read when iteration starts, so a
    resumed run skips exactly what was consumed before. ``len`` is the whole epoch's count whatever the start:
    Lightning sizes the epoch once and counts a resumed run's earlier batches in it."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.start_index = 0

    def __len__(self) -> int:
        return self.length // self.world_size

    def __iter__(self) -> Iterator[int]:
        start, end = self.start_index, len(self) * self.world_size  # end: every rank gets the same count
        return iter(range(start + self.rank, end, self.world_size))


class LMDataModule(L.LightningDataModule):
    """Token-cache backed language-modelling data: (x, y) int64 windows of data.seq_len."""

    def __init__(self, data_cfg: Any, cache_dir: str, seed: int, num_train_samples: int):
        super().__init__()
        if num_train_samples < 1:
            raise ValueError(f"num_train_samples must be >= 1, got {num_train_samples}")
        self.cfg, self.cache_dir = data_cfg, str(cache_dir)
        self.seed, self.num_train_samples = int(seed), int(num_train_samples)
        self.seq_len = data_cfg.seq_len
        self._cache: TokenCache | None = None
        self._train_start = 0
        self._restored_key: str | None = None
        self.train_set: TrainWindows | None = None
        self.val_set: EvalWindows | None = None
        self.test_set: EvalWindows | None = None
        self.sampler: ResumableShardSampler | None = None

    # ------------------------------------------------------------ properties

    @property
    def tokenizer(self) -> Tokenizer:
        return tokenizer_for(self.cfg)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def manifest(self) -> dict:
        return self._require_setup().manifest

    def _require_setup(self) -> TokenCache:
        if self._cache is None:
            raise RuntimeError("LMDataModule.setup() has not been called yet")
        return self._cache

    # ------------------------------------------------------------ lifecycle

    def prepare_data(self) -> None:
        open_cache(self.cfg, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._cache is None:
            cache = open_cache(self.cfg, self.cache_dir)
            self.train_set = TrainWindows(cache.train, self.seq_len, self.seed, self.num_train_samples)
            if len(cache.val):
                self.val_set = EvalWindows(cache.val, self.seq_len, self.cfg.val_tokens, "val")
            if len(cache.test):
                self.test_set = EvalWindows(cache.test, self.seq_len, self.cfg.test_tokens, "test")
            self._cache = cache
            self._check_restored_key()
        # (re)shard on every setup: a call made before the Trainer (and its ranks) existed must not stick
        self.sampler = ResumableShardSampler(self.num_train_samples, *self._rank_and_world())
        self.sampler.start_index = self._train_start

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def check_eval_shards(self, world_size: int) -> None:
        """Each of ``world_size`` processes scores its own val/test windows and needs at least one (a process with
        none would skip the loop and leave the others waiting in the reduction): checked before training."""
        for split, dataset in (("val", self.val_set), ("test", self.test_set)):
            if dataset is not None and len(dataset) < world_size:
                budget = getattr(self.cfg, f"{split}_tokens")
                raise ConfigError(
                    f"Invalid config: data.{split}_tokens={budget}; allowed: >= {world_size} windows of "
                    f"data.seq_len={self.seq_len} tokens ({world_size * self.seq_len}), one per process "
                    f"(hardware.devices), within the {split} split")

    def set_train_start(self, global_samples_consumed: int) -> None:
        """Skip the first `global_samples_consumed` training samples (all ranks together)."""
        self._train_start = int(global_samples_consumed)
        if self.sampler is not None:
            self.sampler.start_index = self._train_start

    # ------------------------------------------------------------ loaders

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        workers = self.cfg.num_workers
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, sampler=self.sampler,
                          drop_last=True, num_workers=workers, pin_memory=False,
                          persistent_workers=workers > 0)

    def _eval_set(self, split: str) -> EvalWindows:
        self._require_setup()
        dataset = self.val_set if split == "val" else self.test_set
        if dataset is None:
            raise RuntimeError(f"the {split} split is empty (data.{split}_fraction=0)")
        return dataset

    def _eval_loader(self, split: str) -> DataLoader:
        """This process's windows: every world_size-th from its rank, none repeated (Lightning's distributed sampler
        would pad with repeats, counting some windows twice); one process scores them all, in order. The module sums
        NLL and tokens over processes, so the loss is the single-process one."""
        dataset = self._eval_set(split)
        rank, world = self._rank_and_world()
        self.check_eval_shards(world)
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.cfg.batch_size, sampler=sampler, drop_last=False,
                          num_workers=0, pin_memory=False)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def eval_windows(self, split: str, seq_len: int, max_tokens: int, block: int | None = None) -> EvalWindows:
        """Windows of another length over the same split (length-generalisation evals); see EvalWindows."""
        cache = self._require_setup()
        return EvalWindows(cache.val if split == "val" else cache.test, seq_len, max_tokens, split, block)

    def n_tokens(self, split: str) -> int:
        cache = self._require_setup()
        return len(cache.val if split == "val" else cache.test)

    def val_targets(self) -> np.ndarray:
        """The (n_val_windows * seq_len,) tokens scored by validation, window by window in order."""
        return self._eval_set("val").targets()

    def test_targets(self) -> np.ndarray:
        return self._eval_set("test").targets()

    def unigram_baseline_loss(self) -> float:
        """Add-one unigram loss (nats) of the val targets under the train split's counts (stored by the build: no
        pass over the train tokens): the floor a model must beat."""
        return baseline.unigram_loss_from_counts(self._require_setup().unigram_counts("train"), self.val_targets())

    # ------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict:
        return {"cache_key": self._cache.manifest["key"] if self._cache is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_key = state_dict.get("cache_key")
        if self._cache is not None:
            self._check_restored_key()

    def _check_restored_key(self) -> None:
        key = self._cache.manifest["key"] if self._cache is not None else None
        if self._restored_key is not None and key is not None and self._restored_key != key:
            log.warning("Resuming with different data: checkpoint cache key %s, current %s (%s)",
                        self._restored_key, key, self._cache.path)  # type: ignore[union-attr]
