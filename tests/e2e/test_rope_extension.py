"""The RoPE study's extension path on real tiny runs: a checkpoint pretrained with plain RoPE is evaluated without
training (trainer.max_steps=0 + init_from) with YaRN at factor = length / L, or fine-tuned at 2L from it; the
documented three commands chain through the pretraining sweep's theta<theta>_seed<seed> folders."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from kimi_lab.config import validate_config
from kimi_lab.config.validate import ConfigError
from kimi_lab.training import train
from tests.helpers import DATA_DIR, REPO_ROOT, compose_config, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["trainer.val_check_interval=5", "optimizer.warmup_steps=2", "logger.tensorboard=false"]  # tiny: L = 32


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple:
    """(run folder, results) of 10 steps of plain RoPE at L = 32, val loss at 16, 32, 64, 128."""
    folder = tmp_path_factory.mktemp("rope") / "pretrain"
    return folder, train(compose_config([*FAST, "trainer.max_steps=10"], output_dir=folder))


def _evaluate(pretrained_folder, out, *overrides):
    return train(compose_config([*FAST, "trainer.max_steps=0", f"init_from={pretrained_folder}", *overrides],
                                output_dir=out))


def test_training_free_yarn_evaluates_the_checkpoint_at_factor_length_over_l(pretrained, tmp_path):
    folder, plain = pretrained
    dynamic = _evaluate(folder, tmp_path / "dynamic", "rope=yarn", "rope.scaling.dynamic_factor=true")
    assert dynamic["status"] == "completed" and dynamic["steps"] == 0 and dynamic["tokens_seen"] == 0
    assert dynamic["val_loss"] == plain["val_loss"]  # the checkpoint's weights, plain RoPE at L: nothing trained
    assert dynamic["rope_factor_at_len"] == {"16": 1.0, "32": 1.0, "64": 2.0, "128": 4.0}
    mscale = dynamic["rope_attention_scaling_at_len"]
    assert mscale["32"] == 1.0 and mscale["64"] == pytest.approx(0.1 * math.log(2) + 1)
    assert mscale["128"] == pytest.approx(0.1 * math.log(4) + 1)
    assert dynamic["rope_scaling"] == "yarn" and dynamic["rope_attention_scaling"] == 1.0  # the training length's
    losses, base = dynamic["val_loss_at_len"], plain["val_loss_at_len"]
    assert losses["16"] == base["16"] and losses["32"] == base["32"]  # within L every method is plain RoPE
    assert losses["64"] != base["64"] and losses["128"] != base["128"]  # past L the scaling is applied
    # at 2L the per-length factor is exactly a static YaRN factor of 2 (and 4L a static 4)
    for factor, length in ((2, "64"), (4, "128")):
        static = _evaluate(folder, tmp_path / f"static{factor}", "rope=yarn", f"rope.scaling.factor={factor}",
                           "rope.scaling.original_max_position_embeddings=32")
        assert static["val_loss_at_len"][length] == losses[length]
        assert static["rope_factor_at_len"] == dict.fromkeys(("16", "32", "64", "128"), float(factor))


def test_finetune_at_2l_starts_from_the_checkpoint(pretrained, tmp_path):
    """init_from + 2 steps at seq 64 with YaRN factor 2 over the original 32: the first step starts at the
    pretrained loss, not a fresh model's, and the losses at L, 2L, 4L are recorded at the static factor."""
    folder, _ = pretrained
    common = ["data.seq_len=64", "data.eval_lengths=[0.5,1.0,2.0]", "rope=yarn", "rope.scaling.factor=2",
              "rope.scaling.original_max_position_embeddings=32", "trainer.max_steps=2", "data.val_tokens=2048"]
    tuned = train(compose_config([*FAST, *common, f"init_from={folder}"], output_dir=tmp_path / "ft"))
    train(compose_config([*FAST, *common], output_dir=tmp_path / "fresh"))  # the same run from a fresh init
    assert tuned["steps"] == 2 and list(tuned["val_loss_at_len"]) == ["32", "64", "128"]
    assert set(tuned["rope_factor_at_len"].values()) == {2.0}
    first = {name: float(read_metrics(tmp_path / name)[0][0]["train_loss"]) for name in ("ft", "fresh")}
    assert first["ft"] < first["fresh"] - 0.1  # fresh: ~ln(vocab); the checkpoint had learned ~0.3 nats


def test_evaluation_only_needs_weights_to_evaluate():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        validate_config(compose_config(["trainer.max_steps=0"]))


def test_mla_refuses_a_per_length_yarn_factor():
    from kimi_lab.model import build_model

    cfg = compose_config(["attention=mla", "rope=yarn", "rope.scaling.dynamic_factor=true"])
    with pytest.raises(ConfigError, match="rope.scaling.dynamic_factor"):
        build_model(cfg)


@pytest.mark.slow
def test_the_three_documented_commands_chain(tmp_path):
    """rope_pretrain_cpu -> rope_cpu (training-free) -> rope_finetune_cpu, as the study headers run them, with the
    pretraining sweep in $KIMI_LAB_ROPE_PRETRAIN (shortened: 4 pretraining steps, 2 fine-tuning steps)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KIMI_LAB_ROPE_PRETRAIN": str(tmp_path / "pretrain")}
    small = [f"paths.data_dir={DATA_DIR}", "data.val_tokens=1024", "data.test_tokens=1024", "rope.theta=10000",
             "seed=1", "logger.tensorboard=false"]
    stages = {"rope_pretrain_cpu": ["trainer.max_steps=4", "trainer.val_check_interval=2"],
              "rope_cpu": ["rope=default,yarn", f"hydra.sweep.dir={tmp_path / 'extend'}"],
              "rope_finetune_cpu": ["rope=yarn", "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path / 'finetune'}"]}
    for experiment, extra in stages.items():
        cmd = [sys.executable, str(REPO_ROOT / "train.py"), "-m", f"experiment={experiment}", *small, *extra]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    pretrain = json.loads((tmp_path / "pretrain" / "theta10000.0_seed1" / "results.json").read_text())
    extend = {r["choices"]["rope"]: r for r in (json.loads((tmp_path / "extend" / str(n) / "results.json")
                                                           .read_text()) for n in (0, 1))}
    assert extend["default"]["val_loss_at_len"] == pretrain["val_loss_at_len"]  # plain RoPE: the same numbers
    assert extend["yarn"]["rope_factor_at_len"] == {"64": 1.0, "128": 2.0, "256": 4.0}
    finetune = json.loads((tmp_path / "finetune" / "0" / "results.json").read_text())
    assert finetune["steps"] == 2 and list(finetune["val_loss_at_len"]) == ["64", "128", "256"]
