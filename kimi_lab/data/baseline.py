"""Reference loss: add-one smoothed unigram model of the train split, scored on eval targets."""

from __future__ import annotations

import numpy as np


def unigram_baseline_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Mean NLL (nats) of `eval_tokens` under Laplace-smoothed unigram counts of `train_tokens`."""
    train = np.asarray(train_tokens, dtype=np.int64)  # (n_train,)
    targets = np.asarray(eval_tokens, dtype=np.int64)  # (n_eval,)
    if targets.size == 0:
        raise ValueError("unigram_baseline_loss: no eval tokens")
    if max(int(train.max(initial=0)), int(targets.max())) >= vocab_size:
        raise ValueError(f"token id >= vocab_size={vocab_size}")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0  # (vocab_size,)
    log_probs = np.log(counts) - np.log(train.size + vocab_size)  # (vocab_size,)
    return float(-log_probs[targets].mean())
