"""Dispatch ``python -m kimi_lab.bench NAME [args]`` to the ``main(argv)`` of module ``kimi_lab.bench.NAME``."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import kimi_lab.bench as bench_pkg


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] not in names:
        print(f"usage: python -m kimi_lab.bench {{{','.join(names) or 'no benchmarks yet'}}} [args]", file=sys.stderr)
        return 2
    return importlib.import_module(f"kimi_lab.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
