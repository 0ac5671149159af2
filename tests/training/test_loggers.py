"""The logger group: wandb is offline unless an API key is set, a missing logger package fails in one line before any
data is built, and tensorboard is the default."""

from __future__ import annotations

import pytest

from kimi_lab.config import ConfigError
from kimi_lab.training.loggers import check_logger_installed, wandb_offline
from tests.helpers import compose_config

def test_wandb_is_offline_unless_a_key_is_set(monkeypatch):
    cfg = compose_config(["logger=wandb"])
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_offline(cfg)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not wandb_offline(cfg)
    assert wandb_offline(compose_config(["logger=wandb", "logger.offline=true"]))


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_logger_package_is_one_line(name, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a))
    with pytest.raises(ConfigError, match=rf"^Invalid config: logger={name}; .* is not installed: pip install"):
        check_logger_installed(compose_config([f"logger={name}"]))


def test_logger_default_is_tensorboard():
    for option in ("default", "tensorboard"):
        logger = compose_config([f"logger={option}"]).logger
        assert (logger.name.value, logger.tensorboard) == ("tensorboard", True)
    assert not compose_config(["logger=csv"]).logger.tensorboard
