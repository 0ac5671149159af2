"""glibc malloc tuning for CPU training: keep freed memory in the process instead of handing it back to the OS.

PyTorch's CPU tensors come from plain ``malloc``. glibc serves large blocks (above a threshold of 128 KiB to 32 MiB)
with ``mmap`` and unmaps them on ``free``, and trims the top of the heap beyond its trim threshold, so each step's
activations come back as fresh pages: every page is faulted in and zeroed by the kernel again. Measured on the
2-core development machine: 6.6k page faults per MoE-layer forward+backward (4,096 tokens × d 256), and a small
model's CPU training step 1,185 ms with them, 881 ms without (``python -m kimi_lab.bench train``).

Written by hand because no library sets this for glibc: the usual fix is jemalloc or tcmalloc through ``LD_PRELOAD``
(``python -m torch.backends.xeon.run_cpu``), which needs a system package and a launcher. ``mallopt(M_MMAP_MAX, 0)``
(large blocks from the heap, never unmapped) plus ``M_TRIM_THRESHOLD=-1`` (mallopt(3): trimming disabled, so the
heap is never cut below its peak) gets the same effect: after the first steps, the heap holds the step's peak and
reuses it. The cost: the process keeps that memory (its RSS stays at its peak) until the setting is released.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # <malloc.h>
# -1 disables trimming (mallopt(3)); the largest positive int, 2 GiB - 1, still trimmed a freed top chunk of 2 GiB
# (full logits at 16k tokens x 32k vocab) every step, which refaulted it: plain reference at base 4.9-6.4 s vs 3.7 s
RETAIN = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1}
# glibc's dynamic thresholds cannot be switched back on; these are the values they converge to (mmap threshold at
# its 32 MiB ceiling, trim threshold twice that), the closest thing to "as before"
RELEASE = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}
_state = {"label": "default"}


@functools.cache
def _glibc():
    """The C library when it is glibc, else None (macOS, musl), where none of this applies."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def in_use_reader():
    """A function returning the bytes malloc has handed out and not taken back (glibc >= 2.33 ``mallinfo2``:
    ``uordblks + hblkhd``, all arenas): the CPU analogue of ``torch.cuda.memory_allocated``, whatever the
    allocator keeps. None off glibc or on older glibc."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def _apply(settings: dict[int, int]) -> None:
    for param, value in settings.items():
        if _glibc().mallopt(param, value) != 1:
            raise OSError(f"mallopt({param}, {value}) failed")


def configure(retain: bool) -> str:
    """``hardware.malloc_retain=true``: keep freed memory from now on (process-wide) until ``release()``; false
    leaves malloc as it is. Returns ``current()``."""
    if retain and _glibc() is not None:
        _apply(RETAIN)
        _state["label"] = "retain"
    return current()


def release() -> str:
    """Undo ``configure(True)`` and hand the free heap back to the OS (``malloc_trim``), so the next job in this
    process starts from a small resident set and its peak RSS is its own. Returns ``current()``."""
    if _state["label"] == "retain":
        _apply(RELEASE)
        _glibc().malloc_trim(0)
        _state["label"] = "released"
    return current()


def current() -> str:
    """What is in force, as results.json records it: ``retain``, ``default`` (never touched), ``released`` (an
    earlier job's retain undone: glibc's thresholds fixed at their converged values) or ``unavailable (<why>)``."""
    if _glibc() is None:
        return f"unavailable (not glibc: {platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    return _state["label"]


@contextlib.contextmanager
def retained(retain: bool) -> Iterator[str]:
    """``configure(retain)`` for the block and ``release()`` after it; yields what is in force."""
    try:
        yield configure(retain)
    finally:
        release()
