"""The attention group's config: type x kernel, the preset label, one-line errors for impossible settings (the kernel's
own limits), and run folders whose attention group selects the module by name."""

from __future__ import annotations

import re

import pytest
import torch
from omegaconf import OmegaConf

from kimi_lab.config import ConfigError, validate_config
from kimi_lab.config.stored import stored_config
from kimi_lab.model import build_model
from kimi_lab.model.attention import kernels
from kimi_lab.model.attention.kernels import FlashUnavailable, check_flash
from tests.helpers import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("overrides", "want"), [
    (["attention=standard"], ("standard", "mha", "standard")), (["attention=sdpa"], ("sdpa", "mha", "sdpa")),
    (["attention=flash"], ("flash", "mha", "flash")), (["attention=mla"], ("mla", "mla", "sdpa")),
    (["attention=mla", "attention.kernel=flash"], ("mla", "mla", "flash")),
    (["attention=sdpa", "attention.kernel=standard"], ("standard", "mha", "standard")),  # the label follows
])
def test_presets_set_type_kernel_and_label(overrides, want):
    cfg = compose_config(overrides)
    validate_config(cfg)
    attn = cfg.attention
    assert (attn.name, attn.type, attn.kernel) == want
    assert f"{attn.type}:{attn.kernel}" == f"{want[1]}:{want[2]}"  # StrEnums format as their values


@pytest.mark.parametrize(("overrides", "message"), [
    (["attention.name=flash"], "attention.name='flash'; allowed: 'sdpa', the label of attention.type=mha "
                               "attention.kernel=sdpa"),  # a label override cannot leave the kernel as it was
    (["attention=mla", "attention.type=mha"], "attention.name='mla'; allowed: 'sdpa'"),
    (["attention=flash", "attention.dropout=0.1"], "attention.dropout=0.1; allowed: 0 with attention.kernel=flash on "
                                                   "CPU"),
    (["attention=mla", "attention.kernel=flash", "attention.dropout=0.1"], "attention.kernel=flash on CPU"),
    (["attention=flash", "hardware=gpu", "attention.n_heads=1", "model.d_model=512"],
     "attention.n_heads=1; allowed: a value giving a head dim <= 256"),
    (["attention=mla", "attention.kernel=flash", "hardware=gpu", "attention.qk_nope_head_dim=240"],
     "attention.qk_nope_head_dim=240; allowed: qk_nope + qk_rope head dims <= 256"),
    (["attention=mla", "attention.kernel=flash", "attention.v_head_dim=128"], "attention.v_head_dim=128; allowed: <= "
                                                                              "qk_nope_head_dim + qk_rope_head_dim"),
    (["attention=mla", "attention.kv_lora_rank=null"], "attention.kv_lora_rank=None; allowed: > 0"),
    (["attention=mla", "attention.v_head_dim=0"], "attention.v_head_dim=0; allowed: > 0"),
    (["attention=mla", "attention.qk_rope_head_dim=7"], "attention.qk_rope_head_dim=7; allowed: an even value"),
    (["attention=mla", "attention.q_lora_rank=0"], "attention.q_lora_rank=0; allowed: null"),
    (["attention=mla", "attention.n_kv_heads=2"], "attention.n_kv_heads=2; allowed: null for attention.type=mla"),
    (["attention=mla", "norm.qk_norm=true"], "norm.qk_norm=True; allowed: false for attention.type=mla"),
    (["attention=mla", "rope=yarn", "rope.scaling.dynamic_factor=true"],
     "rope.scaling.dynamic_factor=True; allowed: false with attention.type=mla"),
])
def test_impossible_attention_configs_fail_with_one_line(overrides, message):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)


def test_validation_reads_the_kernels_own_limits(monkeypatch):
    """One place states flash's CUDA head-dim limit: lowering it there moves the kernel's check and validation's."""
    cfg = compose_config(["attention=flash", "hardware=gpu", "model.d_model=512", "attention.n_heads=4"])  # d 128
    validate_config(cfg)
    assert check_flash("cuda", torch.bfloat16, 128, 128, 0.0)
    monkeypatch.setitem(kernels.FLASH_LIMITS.max_head_dim, "cuda", 64)
    with pytest.raises(ConfigError, match="attention.n_heads=4; allowed: a value giving a head dim <= 64"):
        validate_config(cfg)
    with pytest.raises(FlashUnavailable, match="head dims <= 64, got 128"):
        check_flash("cuda", torch.bfloat16, 128, 128, 0.0)


@pytest.mark.parametrize(("override", "allowed"), [
    ("attention.kernel=fast", "Invalid value 'fast', expected one of [standard, sdpa, flash]"),
    ("attention.type=gqa", "Invalid value 'gqa', expected one of [mha, mla]"),
    ("attention.kernel=null", "field 'attention.kernel' is not Optional"),
])
def test_bad_type_or_kernel_is_rejected_at_compose(override, allowed):
    for preset in ("sdpa", "mla"):
        with pytest.raises(Exception, match=override.split("=")[0]) as err:
            compose_config([f"attention={preset}", override])
        assert allowed in str(err.value.__cause__)


# ------------------------------------------------------------------------------------- stored configs


def _name_keyed(group: dict) -> dict:
    """An attention group in the name-keyed layout: the module picked by ``name``, MHA's ``kernel`` null, MLA's
    bias in ``attention_bias``."""
    old = {key: value for key, value in group.items() if key != "type"}
    if group["type"] == "mla":
        return old | {"bias": False, "attention_bias": group["bias"]}
    return old | {"kernel": None, "attention_bias": None}


@pytest.mark.parametrize(("overrides", "want"), [
    (["attention=flash", "attention.bias=true", "attention.n_kv_heads=2"], ("flash", "mha", "flash", True)),
    (["attention=mla", "attention.kernel=standard", "attention.bias=true", "attention.kv_lora_rank=32",
      "attention.qk_nope_head_dim=16", "attention.qk_rope_head_dim=8", "attention.v_head_dim=16"],
     ("mla", "mla", "standard", True)),
])
def test_run_folder_with_a_name_keyed_attention_group_loads(overrides, want, tmp_path):
    """Its config reads as type / kernel / bias, and its checkpoint loads into the same model (same parameter
    names), giving the same logits."""
    from kimi_lab.export.run import load_run, write_run

    cfg = compose_config(overrides)
    model = build_model(cfg).eval()
    write_run(cfg, model, tmp_path)
    path = tmp_path / "config_resolved.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path))
    path.write_text(OmegaConf.to_yaml(raw | {"attention": _name_keyed(raw["attention"])}))
    assert "attention_bias" in path.read_text()

    loaded_cfg, loaded = load_run(tmp_path, "last")
    validate_config(OmegaConf.merge(cfg, {"attention": loaded_cfg.attention}))
    attn = loaded_cfg.attention
    assert (attn.name, attn.type, attn.kernel, attn.bias) == want
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_stored_config_keeps_a_typed_group():
    raw = {"attention": {"name": "sdpa", "type": "mha", "kernel": "sdpa", "bias": True}, "seed": 1}
    assert stored_config(raw) == raw
