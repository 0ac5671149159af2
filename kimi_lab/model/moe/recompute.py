"""Activation-checkpoint recompute flag: a recomputed MoE forward routes again (same result) but must not count
its tokens twice in the load statistics, aux-loss sums or noaux_tc bias counts."""

from __future__ import annotations

import contextlib
import contextvars

_RECOMPUTING = contextvars.ContextVar("moe_recomputing", default=False)


@contextlib.contextmanager
def recomputing():
    """Context of ``torch.utils.checkpoint``'s recompute (its ``context_fn``'s second context)."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def is_recomputing() -> bool:
    return _RECOMPUTING.get()
