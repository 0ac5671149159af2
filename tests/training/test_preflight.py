"""Preflight (dry_run=true) and unknown keys: every job checked and priced, no run folder written, a non-zero exit
when any job is invalid; a typo'd key fails at validation naming the closest key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kimi_lab.config import ConfigError, validate_config
from kimi_lab.config.unknown_keys import known_keys, unknown_keys
from kimi_lab.training import preflight
from kimi_lab.training.step_time import StepTime, estimated_seconds, model_key, model_size, parameters_on_meta
from tests.helpers import DATA_DIR, REPO_ROOT, compose_config, group_options


def _train_py(args: list[str], cwd, tmp_dir) -> subprocess.CompletedProcess:
    """``python train.py args`` in ``cwd`` with TMPDIR=``tmp_dir`` (where the dry run's scratch folder goes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_dir), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def dirs(tmp_path):
    cwd, scratch = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    scratch.mkdir()
    return cwd, scratch


def _nothing_written(cwd, scratch) -> None:
    assert list(cwd.iterdir()) == [], "a dry run wrote under the working directory (outputs/, multirun/)"
    assert list(scratch.glob("kimi_lab_dry_run_*")) == [], "the dry run's scratch folder was left behind"


def test_dry_run_prices_a_job_and_writes_nothing(dirs):
    cwd, scratch = dirs
    overrides = ["model=tiny", f"paths.data_dir={DATA_DIR}", "trainer.max_steps=20"]
    proc = _train_py([*overrides, "dry_run=true"], cwd, scratch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _nothing_written(cwd, scratch)
    cfg = compose_config(overrides[1:])
    size = model_size(cfg)
    from kimi_lab.model import build_model, parameter_counts

    assert size["params_active"] == parameter_counts(build_model(cfg))["params_active"]  # meta == real
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("[dry run] |")]
    tokens = 20 * cfg.data.batch_size * cfg.data.seq_len
    assert f"| {' '.join(overrides)} |" in line
    assert f"{preflight.human(size['params_active'])} active / {preflight.human(size['params_total'])} params" in line
    assert f"{preflight.human(size['flops_per_token'])} FLOP/token" in line
    assert f"20 steps, {preflight.human(tokens)} tokens | ~" in line and line.endswith("on cpu")
    assert "1 job(s): 1 valid, 0 invalid" in proc.stdout and proc.stderr.strip() == ""


def test_dry_run_sweep_goes_through_every_job_and_exits_nonzero(dirs):
    """Job 1 fails validation, jobs 2-3 do not compose: all four get a line, the errors are listed at the end,
    the exit status is 2 and no folder is written whatever hydra/launcher says."""
    cwd, scratch = dirs
    proc = _train_py(["-m", "model=tiny", f"paths.data_dir={DATA_DIR}", "trainer.max_steps=3",
                      "attention=sdpa,bogus", "optimizer.lr=1e-3,-1", "hydra/launcher=gpu_pool", "dry_run=true"],
                     cwd, scratch)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _nothing_written(cwd, scratch)
    lines = {int(x.split(" | ")[0].split()[-1]): x for x in proc.stdout.splitlines() if x.startswith("[dry run] job")}
    assert sorted(lines) == [0, 1, 2, 3]
    assert "INVALID" not in lines[0] and "params" in lines[0]
    assert "INVALID: Invalid config: optimizer.lr=-1.0; allowed: > 0" in lines[1]
    assert all("Could not find 'attention/bogus'" in lines[n] for n in (2, 3))
    assert "4 job(s): 1 valid, 3 invalid" in proc.stdout
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: job")]
    assert [e.split()[2] for e in errors] == ["1", "2", "3"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_unknown_key_fails_before_training_naming_the_closest_key(dirs):
    cwd, scratch = dirs
    run = cwd / "run"
    proc = _train_py(["model=tiny", f"paths.data_dir={DATA_DIR}", "+trainer.max_stpes=5", f"hydra.run.dir={run}"],
                     cwd, scratch)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: Invalid config: unknown key trainer.max_stpes (did you mean trainer.max_steps?); allowed: the keys of "
        "kimi_lab/config/schema.py (`python train.py --cfg job` prints them)"]
    assert not run.exists()  # a refused single run leaves no folder behind


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


def test_help_says_cfg_job_does_not_validate_and_dry_run_does(dirs):
    cwd, scratch = dirs
    proc = _train_py(["--help"], cwd, scratch)
    assert proc.returncode == 0
    assert "--cfg job      prints the composed config only: it does not validate (use dry_run=true" in proc.stdout
    assert "logger=tensorboard (default), csv, wandb" in proc.stdout


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
