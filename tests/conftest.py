"""Shared fixtures (helpers live in tests/helpers.py)."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import compose_config


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str):
        return compose_config(list(overrides), output_dir=tmp_path / "run")

    return _make


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()
