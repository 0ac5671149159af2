"""``--malloc retain|default`` for the CPU benchmarks: time under the allocator setting training uses
(``hardware.malloc_retain``, on by default; ``kimi_lab/training/malloc.py``) or under glibc as it comes."""

from __future__ import annotations

import argparse
import contextlib

from kimi_lab.training import malloc


def add_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--malloc", choices=("retain", "default"), default="retain",
                        help="retain: glibc keeps freed memory, as CPU training does (hardware.malloc_retain); "
                             "default: glibc as it comes (a page fault per fresh page of every large tensor)")


def applied(args: argparse.Namespace) -> contextlib.AbstractContextManager[str]:
    """Malloc as ``args.malloc`` asks (CPU only) for the block, released after it; yields what is in force."""
    return malloc.retained(args.malloc == "retain" and getattr(args, "device", "cpu") == "cpu")
