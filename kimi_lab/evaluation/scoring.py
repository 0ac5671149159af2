"""Log-likelihood scoring of (context, continuation) pairs with any causal LM callable, and the task metrics.

Conventions of EleutherAI's lm-evaluation-harness (``HFLM._encode_pair``, ``_loglikelihood_tokens`` and the
``multiple_choice`` / ``loglikelihood`` output types), so zero-shot numbers are comparable:

- continuation tokens are the tokens of ``context + continuation`` after the tokens of ``context`` (trailing spaces of
  the context move to the continuation); an empty context is replaced by the end-of-text token;
- a request longer than the model's context keeps its last ``max_len + 1`` tokens (left truncation of the context);
- ``acc``: the choice with the highest summed continuation log-likelihood; ``acc_norm``: the highest log-likelihood
  divided by the choice's length in **characters** (without the leading space), lm-eval's ``acc_norm``;
- LAMBADA: ``acc`` = the greedy (argmax) token at every target position equals the target token; ``ppl`` =
  ``exp(-mean over items of the target word's log-likelihood)`` (lm-eval's ``perplexity`` aggregation: per word,
  not per token); ``ppl_token`` = ``exp(-total log-likelihood / total target tokens)`` is reported next to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# scorer(input_ids (B, T) long, rows (N,), cols (N,)) -> logits (N, V) at positions (rows[i], cols[i]) only
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def from_logits(logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> Scorer:
    """A scorer from any callable returning all logits (B, T, V), e.g. ``lambda ids: hf_model(ids).logits``."""
    return lambda ids, rows, cols: logits_fn(ids)[rows, cols]


@dataclass(frozen=True)
class Request:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Token ids of one (context, continuation) pair (lm-eval ``HFLM._encode_pair``)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return Request((tokenizer.eot_id,), tuple(tokenizer.encode(continuation)))
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return Request(tuple(context_ids), tuple(whole[len(context_ids):]))


def model_inputs(request: Request, max_len: int) -> list[int]:
    """The ids fed to the model: context + continuation minus the last token, left-truncated to ``max_len``.

    The logits at the last ``len(continuation)`` positions predict the continuation."""
    n_cont = len(request.continuation)
    if n_cont == 0:
        raise ValueError("empty continuation: nothing to score")
    if n_cont > max_len:
        raise ValueError(f"continuation of {n_cont} tokens does not fit the model's {max_len}-token context")
    return list((request.context + request.continuation)[-(max_len + 1):-1])


@torch.no_grad()
def loglikelihoods(scorer: Scorer, requests: Sequence[Request], max_len: int, batch_size: int,
                   device: torch.device | str = "cpu", pad_id: int = 0) -> list[tuple[float, bool]]:
    """(sum of continuation log-probabilities, every continuation token is the argmax) for each request.

    Batches are built longest-first and right-padded (a causal model's logits at a position do not depend on the
    tokens after it); log-softmax in float32 at the continuation positions only, sums in float64."""
    inputs = [model_inputs(r, max_len) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(inputs[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, i in enumerate(chunk):
            n_in, cont = len(inputs[i]), requests[i].continuation
            ids[b, :n_in] = torch.tensor(inputs[i])
            rows += [b] * len(cont)
            cols += range(n_in - len(cont), n_in)
            targets += cont
        picked = scorer(ids.to(device), torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logp = torch.log_softmax(picked.float(), dim=-1)  # (N, V): continuation positions only
        target = torch.tensor(targets, device=logp.device)
        token_ll = logp.gather(-1, target[:, None])[:, 0].double().cpu()
        token_greedy = (logp.argmax(dim=-1) == target).cpu()
        offset = 0
        for i in chunk:
            n = len(requests[i].continuation)
            out[i] = (float(token_ll[offset:offset + n].sum()), bool(token_greedy[offset:offset + n].all()))
            offset += n
    return out  # type: ignore[return-value]


def _stderr(values: np.ndarray) -> float | None:
    """Standard error of a mean: sample SD (ddof 1) / sqrt(n), lm-eval's ``mean_stderr``; None for n < 2."""
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def multiple_choice_metrics(lls: Sequence[Sequence[float]], choices: Sequence[Sequence[str]],
                            golds: Sequence[int]) -> dict:
    """acc / acc_norm (lm-eval): argmax of log-likelihood, and of log-likelihood / len(choice in characters)."""
    acc, acc_norm = [], []
    for ll, texts, gold in zip(lls, choices, golds, strict=True):
        ll = np.asarray(ll, dtype=np.float64)
        lengths = np.array([float(len(t)) for t in texts])
        acc.append(float(np.argmax(ll) == gold))
        acc_norm.append(float(np.argmax(ll / lengths) == gold))
    acc_a, norm_a = np.array(acc), np.array(acc_norm)
    return {"acc": float(acc_a.mean()), "acc_norm": float(norm_a.mean()), "acc_stderr": _stderr(acc_a),
            "acc_norm_stderr": _stderr(norm_a), "n": len(acc)}


def last_word_metrics(lls: Sequence[float], greedy: Sequence[bool], n_tokens: Sequence[int]) -> dict:
    """LAMBADA: last-word accuracy (greedy decode of every target token), per-word and per-token perplexity."""
    ll, hit = np.asarray(lls, dtype=np.float64), np.asarray(greedy, dtype=np.float64)
    return {"acc": float(hit.mean()), "acc_stderr": _stderr(hit), "ppl": _exp(-ll.mean()),
            "ppl_token": _exp(-ll.sum() / float(np.sum(n_tokens))), "n": len(ll)}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
