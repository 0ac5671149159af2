"""Length generalisation: results.json holds val loss at 0.5x, 1x, 2x, 4x the training length on one token budget,
the same targets at every length, spread over the val split."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kimi_lab.config import validate_config
from kimi_lab.config.validate import ConfigError
from kimi_lab.data import LMDataModule
from kimi_lab.data.datamodule import EvalWindows
from kimi_lab.training import train
from kimi_lab.training.length_eval import length_windows
from tests.helpers import compose_config

FAST = ["trainer.max_steps=4", "trainer.val_check_interval=2", "optimizer.warmup_steps=2", "logger.tensorboard=false"]


def test_results_hold_val_loss_at_each_length(tmp_path):
    by_rope = {}
    for rope in ("default", "dynamic"):
        results = train(compose_config([*FAST, f"rope={rope}"], output_dir=tmp_path / rope))
        saved = json.loads((tmp_path / rope / "results.json").read_text())
        assert saved["val_loss_at_len"] == results["val_loss_at_len"]
        losses, tokens = results["val_loss_at_len"], results["val_tokens_at_len"]
        assert list(losses) == ["16", "32", "64", "128"]  # tiny: seq_len 32
        assert set(tokens.values()) == {2048}  # the same budget at every length (tiny val_tokens=2048)
        assert all(math.isfinite(v) and 0 < v < 11 for v in losses.values())
        # every length scores the same targets (test_every_length_scores_the_same_targets), not validation's
        # 64 single windows: 1x is close to val_loss, not equal
        assert abs(losses["32"] - results["val_loss"]) < 0.5
        assert len(set(losses.values())) == 4  # context length changes the loss
        by_rope[rope] = losses
        assert results["rope_scaling"] == rope and results["rope_attention_scaling"] == 1.0
        # the factor each length ran at: plain within the training length; dynamic NTK's (HF factor 2) past it
        past = 1.0 if rope == "default" else 2.0
        assert results["rope_factor_at_len"] == {"16": 1.0, "32": 1.0, "64": past, "128": past}
        assert set(results["rope_attention_scaling_at_len"].values()) == {1.0}
    # dynamic NTK is plain RoPE up to the training length (same training run), and differs beyond it
    plain, dynamic = by_rope["default"], by_rope["dynamic"]
    assert plain["16"] == dynamic["16"] and plain["32"] == dynamic["32"]
    assert plain["64"] != dynamic["64"] and plain["128"] != dynamic["128"]


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


def test_too_short_val_split_fails_before_training(tmp_path):
    cfg = compose_config([*FAST, "data.val_tokens=100000000"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.eval_lengths"):
        train(cfg)
    assert not (tmp_path / "metrics.csv").exists() or len((tmp_path / "metrics.csv").read_text().splitlines()) <= 1


@pytest.mark.parametrize(("lengths", "key"), [("[0.5,1.01]", "data.eval_lengths"), ("[1,128]", "data.val_tokens")])
def test_bad_eval_lengths_fail_at_validation(lengths, key):
    with pytest.raises(ConfigError, match=key):
        validate_config(compose_config([f"data.eval_lengths={lengths}"]))


def test_empty_eval_lengths_skips(tmp_path):
    results = train(compose_config([*FAST, "data.eval_lengths=[]"], output_dir=tmp_path))
    assert "val_loss_at_len" not in results
