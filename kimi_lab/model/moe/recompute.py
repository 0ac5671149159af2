"""Activation-checkpoint recompute flag: a recomputed MoE forward routes again (same result) but must not count
its tokens twice in the load statistics, aux-loss sums or noaux_tc bias counts.

A module global, not a ``ContextVar``: ``torch.compile`` cannot trace ``ContextVar.get`` (a graph break in every MoE
layer) but reads a global and guards on its value, so a compiled forward and its recompute are two graph variants.
The flag is set and read by one forward at a time (the recompute runs inside the backward that needs it)."""

from __future__ import annotations

import contextlib

_recomputing = False


@contextlib.contextmanager
def recomputing():
    """Context of ``torch.utils.checkpoint``'s recompute (its ``context_fn``'s second context)."""
    global _recomputing
    saved, _recomputing = _recomputing, True
    try:
        yield
    finally:
        _recomputing = saved


def is_recomputing() -> bool:
    return _recomputing
