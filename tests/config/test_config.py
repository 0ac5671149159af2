"""Config composition for every option of every group, schema errors, and cross-key validation."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from kimi_lab.config import ConfigError, validate_config
from tests.helpers import CONF_DIR, compose_config, group_options

GROUPS = ["model", "attention", "norm", "moe", "optimizer", "rope", "data", "hardware", "eval"]
ALL_OPTIONS = [(group, option) for group in GROUPS for option in group_options(group)]
SOURCE_PRESETS = {("data", "fineweb_edu"): "hf"}  # options that preset another option's source: its name


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_validates(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "text":
        overrides.append(f"data.paths=[{tmp_path}]")
    cfg = compose_config(overrides, output_dir=tmp_path)
    validate_config(cfg)
    value = OmegaConf.select(cfg, f"{group}.name")
    routed = group == "moe" and option in ("greedy", "deepseek_v3")  # routed FFN + the option's router
    expected = "moe" if routed else SOURCE_PRESETS.get((group, option), option)
    assert getattr(value, "value", value) == expected


@pytest.mark.parametrize("option", group_options("model"))
def test_every_option_builds_a_model(option, tmp_path):
    import torch

    from kimi_lab.model import build_model

    cfg = compose_config([f"model={option}", "data.seq_len=16"], output_dir=tmp_path)
    model = build_model(cfg)
    logits = model(torch.zeros(1, 16, dtype=torch.long)).logits
    assert logits.shape == (1, 16, cfg.model.vocab_size)


def test_model_presets_have_their_documented_sizes():
    small = compose_config(["model=small"])
    assert (small.model.d_model, small.model.n_layers, small.attention.n_heads) == (256, 3, 4)
    assert (small.moe.n_routed_experts, small.moe.num_experts_per_tok, small.data.seq_len) == (8, 2, 256)
    base = compose_config(["model=base"])
    assert (base.model.d_model, base.model.n_layers, base.attention.n_heads, base.model.d_ff) == (384, 6, 8, 1536)
    assert (base.moe.n_routed_experts, base.moe.num_experts_per_tok) == (8, 2)
    assert (base.data.seq_len, base.data.batch_size) == (512, 24)
    tiny = compose_config(["model=tiny", "data=default"])
    assert (tiny.data.seq_len, tiny.data.val_tokens) == (32, 2048)  # later groups must not reset preset sizes


@pytest.mark.parametrize("option", group_options("experiment"))
def test_experiments_only_override_and_compose(option, tmp_path):
    assert (CONF_DIR / "experiment" / f"{option}.yaml").read_text().startswith("# @package _global_")
    cfg = compose_config([f"experiment={option}"], output_dir=tmp_path)
    validate_config(cfg)


def test_demo_experiment_trains_the_small_model():
    cfg = compose_config(["experiment=demo"], model=None)
    assert cfg.model.name == "small" and cfg.data.seq_len == 256 and "demo" in cfg.tags


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("attention.type=gqa", "attention.type", "mha, mla"),
        ("norm.name=batchnorm", "norm.name", "layernorm, rmsnorm"),
        ("moe.topk_method=noaux", "moe.topk_method", "greedy, group_limited_greedy, noaux_tc, aux_tc"),
        ("optimizer.name=lion", "optimizer.name", "adam, adamw"),
        ("data.name=web", "data.name", "default, text, hf"),
    ],
)
def test_bad_enum_value_names_key_and_choices(override, key, allowed):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override])
    message = str(info.value.__cause__ or info.value)
    assert f"full_key: {key}" in message
    assert allowed in message


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigCompositionException):
        compose_config(["attention.n_head=4"])  # typo of n_heads


def test_wrong_type_is_rejected():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_config(["model.d_model=big"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.d_model=66"], "attention.n_heads"),  # 66 not divisible by 4 heads
        (["attention.n_heads=3", "model.d_model=66"], "attention.n_heads"),  # head dim 22... odd? no: 22 even -> ok
        (["attention.n_kv_heads=3"], "attention.n_kv_heads"),
        (["moe.num_experts_per_tok=5"], "moe.num_experts_per_tok"),  # tiny has 4 experts
        (["moe.first_k_dense_replace=3"], "moe.first_k_dense_replace"),  # tiny has 2 layers
        (["optimizer.lr=0"], "optimizer.lr"),
        (["optimizer.lr=-1e-3"], "optimizer.lr"),
        (["optimizer.momentum=0.9"], "optimizer.momentum"),  # adamw uses betas
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas"),
        (["model.vocab_size=1000"], "model.vocab_size"),
        (["norm.eps=0"], "norm.eps"),
        (["data.val_fraction=0.7"], "data.val_fraction"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["hardware.precision=fp8"], "hardware.precision"),
        (["hardware.loss_chunk_tokens=0"], "hardware.loss_chunk_tokens"),
        (["rope.theta=-1"], "rope.theta"),
        (["seed=-1"], "seed"),
        (["attention=mla", "attention.kernel=flash", "attention.v_head_dim=128"], "attention.v_head_dim"),
        (["attention=sdpa", "attention.name=flash"], "attention.name"),  # a label alone: the kernel stays sdpa
        (["attention=standard", "attention.type=mla"], "attention.name"),  # MLA is the mla preset (its dims)
        (["hardware.num_threads=0"], "hardware.num_threads"),
        (["hardware.devices=0"], "hardware.devices"),
        (["report.primary_metric=val_los"], "report.primary_metric"),
        (["report.primary_metric=val_loss@0"], "report.primary_metric"),  # a length is >= 1 token
        (["report.sesoi.val_loss=0"], "report.sesoi.val_loss"),
        (["report.sesoi.val_loss=inf"], "report.sesoi.val_loss"),
        (["+report.sesoi.val_los=0.1"], "report.sesoi.val_los"),  # a key the report would never read
        (["+report.target.val_loss=nan"], "report.target.val_loss"),
        (["+report.target.val_acc=0.3"], "report.target.val_acc"),  # tokens_to_target reads the val-loss curve
        (["report.mde_goal=0"], "report.mde_goal"),
        (["report.tuning_seeds=[1,-2]"], "report.tuning_seeds"),
    ],
)
def test_impossible_configs_fail_with_the_key(overrides, key):
    cfg = compose_config(overrides)
    if overrides == ["attention.n_heads=3", "model.d_model=66"]:
        validate_config(cfg)  # 66 / 3 = 22: a valid even head dim, no error
        return
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    message = str(info.value)
    assert f"{key}=" in message and "allowed:" in message
    assert "\n" not in message


def test_seed_zero_is_valid():
    cfg = compose_config(["seed=0"])
    validate_config(cfg)
    assert cfg.seed == 0
