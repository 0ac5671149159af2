"""The package's layers hold (pyproject.toml [tool.importlinter], checked by import-linter over every import,
function-local ones included): tools over runs > training > evaluation, optim > model, data > config, and stats
never imports torch, Lightning or the training code."""

from __future__ import annotations

import tomllib
from pathlib import Path

from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"


def test_every_import_keeps_the_declared_layers(monkeypatch):
    monkeypatch.chdir(REPO)
    assert lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True) == 0


def test_an_import_back_up_a_layer_breaks_the_contract(tmp_path, monkeypatch):
    """Without its declared exception, training's import of bench's norm profiler is reported: the contract reads
    the real import graph."""
    exception = '    "kimi_lab.training.fit -> kimi_lab.bench._norm_profile",\n'
    text = PYPROJECT.read_text()
    assert exception in text
    config = tmp_path / "pyproject.toml"
    config.write_text(text.replace(exception, ""))
    assert tomllib.loads(config.read_text())["tool"]["importlinter"]["root_package"] == "kimi_lab"
    monkeypatch.chdir(REPO)
    assert lint_imports(config_filename=str(config), no_cache=True, no_logo=True) == 1
