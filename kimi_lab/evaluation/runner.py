"""Run the configured downstream tasks with a scorer: items -> requests -> log-likelihoods -> metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from kimi_lab.evaluation.scoring import (Scorer, encode_pair, last_word_metrics, loglikelihoods,
                                         multiple_choice_metrics)
from kimi_lab.evaluation.tasks import SOURCE_DIST, SOURCES, Item, load_task, parse_task, source_version

log = logging.getLogger(__name__)

DELIMITER = " "  # lm-eval's target_delimiter between context and continuation


def score_items(scorer: Scorer, tokenizer, items: Sequence[Item], kind: str, *, max_len: int,
                batch_size: int, device: torch.device | str = "cpu") -> dict:
    """Metrics of one task's items: ``multiple_choice`` (acc, acc_norm) or ``last_word`` (LAMBADA acc, ppl).

    An item with a continuation longer than ``max_len`` tokens cannot be scored by the model and is left out
    (counted in ``n_skipped``; at seq_len 256 one PIQA item of 1,838, none from 512 on)."""
    per_item = [[encode_pair(tokenizer, item.context, DELIMITER + choice) for choice in item.choices]
                for item in items]
    fits = [all(len(r.continuation) <= max_len for r in reqs) for reqs in per_item]
    items = [item for item, ok in zip(items, fits) if ok]
    if not items:
        raise ValueError(f"no item fits the model's {max_len}-token context: nothing to score")
    requests = [r for reqs, ok in zip(per_item, fits) if ok for r in reqs]
    metrics = _metrics(scorer, tokenizer, items, requests, kind, max_len, batch_size, device)
    return {**metrics, "n_skipped": fits.count(False)}


def _metrics(scorer, tokenizer, items, requests, kind, max_len, batch_size, device) -> dict:
    results = loglikelihoods(scorer, requests, max_len=max_len, batch_size=batch_size, device=device,
                             pad_id=tokenizer.eot_id)
    if kind == "last_word":
        return last_word_metrics([ll for ll, _ in results], [g for _, g in results],
                                 [len(r.continuation) for r in requests])
    lls, offset = [], 0
    for item in items:
        lls.append([ll for ll, _ in results[offset:offset + len(item.choices)]])
        offset += len(item.choices)
    return multiple_choice_metrics(lls, [item.choices for item in items], [item.gold for item in items])


def evaluate(scorer: Scorer, tokenizer, tasks: Sequence, *, data_dir: str | Path, limit: int | None,
             max_len: int, batch_size: int, device: torch.device | str = "cpu") -> dict:
    """{task: metrics + n, split, source, seconds} for every task, in order (items cached under data_dir)."""
    out = {}
    for task in map(parse_task, tasks):
        kind, split, _ = SOURCES[task]
        items = load_task(task, data_dir, limit)
        start = time.perf_counter()
        metrics = score_items(scorer, tokenizer, items, kind, max_len=max_len, batch_size=batch_size,
                              device=device)
        metrics.update({"split": split, "source": f"{SOURCE_DIST}=={source_version()}", "max_len": max_len,
                        "seconds": time.perf_counter() - start})
        log.info("downstream %s: %s", task.value, {k: v for k, v in metrics.items() if k in ("acc", "acc_norm",
                                                                                            "ppl", "n")})
        out[task.value] = metrics
    return out


def evaluate_model(model: torch.nn.Module, eval_cfg, data_cfg, data_dir: str | Path,
                   device: torch.device | str = "cpu", forward_context=None) -> dict:
    """``evaluate`` for a kimi_lab ``Transformer`` trained with ``data_cfg`` (its tokenizer, its ``seq_len`` as the
    context limit); ``forward_context`` is e.g. Lightning's precision context (autocast)."""
    from contextlib import nullcontext

    from kimi_lab.data.tokenizer import tokenizer_for

    was_training = model.training
    model.eval()
    scorer = transformer_scorer(model, forward_context or nullcontext)
    try:
        return evaluate(scorer, tokenizer_for(data_cfg), list(eval_cfg.tasks), data_dir=data_dir,
                        limit=eval_cfg.limit, max_len=data_cfg.seq_len, batch_size=eval_cfg.batch_size,
                        device=device)
    finally:
        model.train(was_training)


def transformer_scorer(model: torch.nn.Module, forward_context=None) -> Scorer:
    """Scorer for a kimi_lab ``Transformer`` that runs the output head at the scored positions only.

    A forward hook on the final norm keeps the hidden states at (rows, cols), so ``lm_head`` (about 3/4 of the
    FLOPs of the small preset, vocabulary 32,768) computes N logits instead of B x T; the logits are the same
    (tests/evaluation/test_downstream.py checks it against the full forward)."""
    from contextlib import nullcontext

    context = forward_context or nullcontext

    def scorer(ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        handle = model.norm.register_forward_hook(lambda module, args, out: out[rows, cols][None])  # (1, N, D)
        try:
            with context():
                return model(ids).logits[0]  # (N, V)
        finally:
            handle.remove()

    return scorer
