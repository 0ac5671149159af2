"""Length generalisation in tiny runs: results.json holds val loss at 0.5x, 1x, 2x, 4x the training length on one
token budget (plain RoPE and dynamic NTK), a val split too short for that budget fails before training, and an
empty data.eval_lengths skips the evaluation."""

from __future__ import annotations

import json
import math

import pytest

from kimi_lab.config.validate import ConfigError
from kimi_lab.training import train
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


def test_too_short_val_split_fails_before_training(tmp_path):
    cfg = compose_config([*FAST, "data.val_tokens=100000000"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.eval_lengths"):
        train(cfg)
    assert not (tmp_path / "metrics.csv").exists() or len((tmp_path / "metrics.csv").read_text().splitlines()) <= 1


def test_empty_eval_lengths_skips(tmp_path):
    results = train(compose_config([*FAST, "data.eval_lengths=[]"], output_dir=tmp_path))
    assert "val_loss_at_len" not in results
