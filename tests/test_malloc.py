"""hardware.malloc_retain: glibc keeps freed memory for the job (no page faults on every step's fresh tensors),
is released after it, and the CPU memory metric counts malloc's in-use bytes, whatever the allocator keeps."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from kimi_lab.training import malloc

pytestmark = pytest.mark.skipif(malloc.current().startswith("unavailable"), reason="glibc only")

BIG = 48 * 2**20 // 4  # 48 MiB of fp32: above glibc's largest mmap threshold (32 MiB), so mmapped by default


def _faults_per_fresh_tensor(repeats: int = 5) -> float:
    """Minor page faults per allocation + first write of a 48 MiB tensor, after two warm-up allocations (the heap
    grows to hold one on the first or second)."""
    for _ in range(2):
        torch.ones(BIG).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.ones(BIG).sum()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats


def test_retain_stops_page_faults_and_release_brings_them_back():
    pages = BIG * 4 / resource.getpagesize()
    try:
        assert malloc.configure(True) == "retain"
        assert _faults_per_fresh_tensor() < 0.05 * pages  # the heap keeps the block: no fresh pages
    finally:
        assert malloc.release() == "released"
    assert _faults_per_fresh_tensor() > 0.5 * pages  # unmapped on free, faulted in again (the control)
    assert malloc.configure(False) == "released" and malloc.release() == "released"  # false touches nothing


def test_in_use_reader_counts_a_live_tensor():
    in_use = malloc.in_use_reader()
    if in_use is None:
        pytest.skip(f"glibc {platform.libc_ver()[1]} has no mallinfo2")
    before = in_use()
    block = torch.ones(BIG)
    assert in_use() - before >= 0.99 * block.numel() * 4
    del block
    assert in_use() - before < 2**20
