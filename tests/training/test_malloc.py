"""hardware.malloc_retain: glibc keeps freed memory for the job (no page faults on every step's fresh tensors),
is released after it, and the CPU memory metric counts malloc's in-use bytes, whatever the allocator keeps."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest
import torch

from kimi_lab.training import malloc

pytestmark = pytest.mark.skipif(malloc.current().startswith("unavailable"), reason="glibc only")

BIG = 48 * 2**20 // 4  # 48 MiB of fp32: above glibc's largest mmap threshold (32 MiB), so mmapped by default

# minor page faults per allocation + first write of a 48 MiB tensor after two warm-ups (the heap grows to hold one
# on the first or second), in a fresh process: the earlier tests' heap would decide where the block comes from
FAULTS = """
import resource, sys, torch
from kimi_lab.training import malloc
assert malloc.configure(sys.argv[1] == "retain") == sys.argv[1]
for _ in range(2):
    torch.ones({big}).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones({big}).sum()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults_per_fresh_tensor(setting: str) -> float:
    proc = subprocess.run([sys.executable, "-c", FAULTS.format(big=BIG), setting], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split()[-1])


def test_retain_stops_page_faults():
    pages = BIG * 4 / resource.getpagesize()
    assert _faults_per_fresh_tensor("default") > 0.5 * pages  # glibc unmaps the block on free: fresh pages each time
    assert _faults_per_fresh_tensor("retain") < 0.05 * pages  # the heap keeps it


def test_release_undoes_retain_and_false_touches_nothing():
    try:
        assert malloc.configure(True) == "retain"
    finally:
        assert malloc.release() == "released"
    assert malloc.configure(False) == "released" and malloc.release() == "released"


def test_in_use_reader_counts_a_live_tensor():
    in_use = malloc.in_use_reader()
    if in_use is None:
        pytest.skip(f"glibc {platform.libc_ver()[1]} has no mallinfo2")
    before = in_use()
    block = torch.ones(BIG)
    assert in_use() - before >= 0.99 * block.numel() * 4
    del block
    assert in_use() - before < 2**20


def test_job_memory_peak_counts_training_batches_only():
    """PeakRSS counts in-use bytes above its construction level, only while a window (a training batch) is open:
    a checkpoint write's buffer between batches is not the job's peak."""
    from kimi_lab.training.rundir import PeakRSS

    if malloc.in_use_reader() is None:
        pytest.skip(f"glibc {platform.libc_ver()[1]} has no mallinfo2")
    rss = PeakRSS()
    with rss:
        between_batches = torch.ones(BIG)  # e.g. Lightning's in-memory checkpoint buffer
        del between_batches
        rss.open_window()
        in_batch = torch.ones(BIG // 2)
        rss.close_window()
        del in_batch
    counted = rss.peak_in_use_bytes - rss.base_in_use_bytes
    assert BIG // 2 * 4 <= counted < BIG * 4, counted
