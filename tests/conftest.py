"""Shared fixtures (helpers live in tests/helpers.py); GPU tests skip, saying why, without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import data_cfg
from tests.synthetic import write_corpus, write_sweep


def pytest_collection_modifyitems(config, items):
    e2e_dir = Path(__file__).parent / "e2e"
    for item in items:  # tests/e2e/ holds the full train() runs and CLI jobs: `-m "not e2e"` is the quick unit suite
        if e2e_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest and avoids OpenMP stalls on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of 30 text documents, each with a unique marker (tests/synthetic.py)."""
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def text_cfg(corpus):
    """``data`` config of the text source over ``corpus``: tiny windows, 10 % val and test documents."""
    return data_cfg(name="text", paths=[str(corpus)], seq_len=32, batch_size=4, val_fraction=0.1,
                    test_fraction=0.1, val_tokens=256, test_tokens=256)


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    """A synthetic multirun folder with known losses and every job status (tests/synthetic.py)."""
    return write_sweep(tmp_path)
