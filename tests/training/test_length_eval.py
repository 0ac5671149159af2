"""Length generalisation: every length scores the same targets, spread over the val split; the windows do not depend
on the model; bad data.eval_lengths fail at validation."""

from __future__ import annotations

import numpy as np
import pytest

from kimi_lab.config import validate_config
from kimi_lab.config.validate import ConfigError
from kimi_lab.data import LMDataModule
from kimi_lab.data.datamodule import EvalWindows
from kimi_lab.training.length_eval import length_windows
from tests.helpers import compose_config


def _datamodule(overrides: list[str]) -> tuple:
    cfg = compose_config(overrides)
    dm = LMDataModule(cfg.data, str(cfg.paths.data_dir), seed=0, num_train_samples=1)
    dm.setup()
    return cfg, dm


def test_every_length_scores_the_same_targets():
    cfg, dm = _datamodule([])  # tiny: seq_len 32, val_tokens 2048, lengths 16 .. 128
    windows = length_windows(dm, cfg.data)
    assert list(windows) == [16, 32, 64, 128]
    targets = windows[128].targets()
    assert len(targets) == 2048 and all(np.array_equal(w.targets(), targets) for w in windows.values())
    blocks = windows[128].starts  # 16 blocks of 128 spread over the val split (validation's rule at 128)
    assert np.array_equal(blocks, EvalWindows(dm._cache.val, 128, 2048, "val").starts)
    assert blocks[0] == 0 and blocks[-1] > dm.n_tokens("val") * 3 // 4
    assert np.array_equal(windows[32].starts, (blocks[:, None] + np.arange(4) * 32).ravel())
    # the longest length = seq_len: the 1x windows are validation's own
    cfg1, dm1 = _datamodule(["data.eval_lengths=[0.5,1.0]"])
    assert np.array_equal(length_windows(dm1, cfg1.data)[32].starts, dm1.val_set.starts)


def test_eval_windows_do_not_depend_on_the_model():
    """Arms differ in model options only: their val/test windows (and length-eval windows) are identical."""
    arms = [_datamodule(o) for o in ([], ["rope=dynamic", "attention=mla", "norm=layernorm"])]
    (cfg_a, a), (cfg_b, b) = arms
    assert cfg_a.rope != cfg_b.rope and cfg_a.attention != cfg_b.attention and cfg_a.data == cfg_b.data
    for split in ("val_set", "test_set"):
        assert np.array_equal(getattr(a, split).starts, getattr(b, split).starts)
    wa, wb = length_windows(a, cfg_a.data), length_windows(b, cfg_b.data)
    assert all(np.array_equal(wa[n].starts, wb[n].starts) for n in wa)


@pytest.mark.parametrize(("lengths", "key"), [("[0.5,1.01]", "data.eval_lengths"), ("[1,128]", "data.val_tokens")])
def test_bad_eval_lengths_fail_at_validation(lengths, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(compose_config([f"data.eval_lengths={lengths}"]))
