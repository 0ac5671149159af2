"""Preflight pieces and unknown keys: a typo'd key fails at validation naming the closest key, every option file
defines only schema keys, the meta-device model size equals the real one, step timings are keyed by model (not by
seed or lr), the estimate counts every pass, and the dry run's summary lists totals and each error."""

from __future__ import annotations

import pytest
import torch

from kimi_lab.config import ConfigError, validate_config
from kimi_lab.config.unknown_keys import known_keys, unknown_keys
from kimi_lab.training import preflight
from kimi_lab.training.step_time import StepTime, estimated_seconds, model_key, model_size, parameters_on_meta
from tests.helpers import compose_config, group_options


def test_unknown_keys_name_each_key_and_its_closest_known_key():
    cfg = compose_config(["+modle.d_model=128", "+trainer.max_stpes=5", "+report.sesoi.val_acc=0.1"])
    assert unknown_keys(cfg) == ["trainer.max_stpes", "modle.d_model"]  # report.sesoi takes any metric key
    with pytest.raises(ConfigError, match=r"unknown keys trainer.max_stpes \(did you mean trainer.max_steps\?\), "
                                          r"modle.d_model \(did you mean model.d_model\?\)"):
        validate_config(cfg)
    assert {"model.d_model", "rope.scaling.factor", "dry_run", "logger.name"} <= set(known_keys())


@pytest.mark.parametrize("group", ["model", "attention", "moe", "rope", "data", "hardware", "eval", "logger",
                                   "experiment", "ablation"])
def test_every_config_group_option_defines_only_schema_keys(group):
    for option in group_options(group):
        assert unknown_keys(compose_config([f"{group}={option}"])) == [], f"{group}={option}"


def test_meta_model_matches_the_real_one_and_leaves_torch_as_it_was():
    from kimi_lab.model import build_model, flops_per_token, parameter_counts

    cfg = compose_config(["moe=deepseek_v3", "attention=mla"])
    real = build_model(cfg)
    expected = {**parameter_counts(real), "flops_per_token": flops_per_token(real, cfg.data.seq_len,
                                                                             cfg.model.d_model, cfg.model.n_layers)}
    assert model_size(cfg) == expected
    with parameters_on_meta():
        assert torch.nn.Linear(2, 2).weight.device.type == "meta"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"


def test_model_key_separates_models_not_seeds_or_learning_rates():
    base = model_key(compose_config([]))
    assert model_key(compose_config(["seed=7", "optimizer.lr=1e-4", "trainer.max_steps=3"])) == base
    assert model_key(compose_config(["model.d_model=128"])) != base
    assert model_key(compose_config(["optimizer=muon"])) != base


def test_estimate_counts_steps_and_every_evaluation_pass():
    cfg = compose_config(["trainer.val_check_interval=4", "trainer.accumulate_grad_batches=2",
                          "data.eval_lengths=[1.0,2.0]"])
    timing = StepTime(micro_batch_s=0.5, optimizer_s=0.1, eval_forward_s=0.2, device="cpu")
    batch = cfg.data.batch_size * cfg.data.seq_len
    # 10 steps: validations at 4, 8 and 10; two eval lengths; the test split
    eval_tokens = (3 + 2) * cfg.data.val_tokens + cfg.data.test_tokens
    expected = 10 * (2 * 0.5 + 0.1) + -(-eval_tokens // batch) * 0.2
    assert estimated_seconds(cfg, 10, timing) == pytest.approx(expected)


def test_summary_lists_totals_and_each_error():
    records = [{"job": 0, "overrides": ["a=1"], "params_active": 10, "params_total": 20, "flops_per_token": 1e6,
                "steps": 5, "tokens": 1000, "device": "cpu", "estimated_s": 61},
               {"job": 1, "overrides": ["a=2"], "error": "Invalid config: a=2; allowed: 1"}]
    lines = preflight.summary_lines(records)
    assert lines[0].startswith("[dry run] 2 job(s): 1 valid, 1 invalid | 1K tokens, 1G FLOP | ~1m01s")
    assert lines[1:] == ["error: job 1 (a=2): Invalid config: a=2; allowed: 1"]
    assert preflight.human(1_234_567) == "1.23M" and preflight.duration(3725) == "1h02m"
