"""``--malloc retain|default`` for the CPU benchmarks: time under the allocator setting training uses
(``hardware.malloc_retain``, on by default; ``kimi_lab/training/malloc.py``) or under glibc as it comes."""

from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

from kimi_lab.training import malloc


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--malloc", choices=("retain", "default"), default="retain",
                        help="retain: glibc keeps freed memory, as CPU training does (hardware.malloc_retain); "
                             "default: glibc as it comes (a page fault per fresh page of every large tensor)")


@contextlib.contextmanager
def applied(args: argparse.Namespace) -> Iterator[str]:
    """Malloc as ``args.malloc`` asks (CPU only) for the block, released after it; yields what is in force."""
    try:
        yield malloc.configure(args.malloc == "retain" and getattr(args, "device", "cpu") == "cpu")
    finally:
        malloc.release()
