"""Reference loss: add-one smoothed unigram model of the train split, scored on eval targets."""

from __future__ import annotations

import numpy as np


def unigram_loss_from_counts(train_counts: np.ndarray, eval_tokens: np.ndarray) -> float:
    """Mean NLL (nats) of `eval_tokens` under Laplace-smoothed (add-one) unigram probabilities
    p(v) = (c_v + 1) / (N + V) from `train_counts` (V,), the per-id counts of the train split."""
    counts = np.asarray(train_counts, dtype=np.float64)  # (V,)
    targets = np.asarray(eval_tokens, dtype=np.int64)  # (n_eval,)
    if targets.size == 0:
        raise ValueError("unigram_baseline_loss: no eval tokens")
    vocab_size = counts.size
    if int(targets.max()) >= vocab_size:
        raise ValueError(f"token id >= vocab_size={vocab_size}")
    log_probs = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)  # (V,)
    return float(-log_probs[targets].mean())


def unigram_baseline_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """`unigram_loss_from_counts` with the counts of `train_tokens` (the build stores them: see TokenCache)."""
    train = np.asarray(train_tokens)  # (n_train,)
    if train.size and int(train.max()) >= vocab_size:
        raise ValueError(f"token id >= vocab_size={vocab_size}")
    return unigram_loss_from_counts(np.bincount(train.astype(np.int64), minlength=vocab_size), eval_tokens)
