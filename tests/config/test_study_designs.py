"""The studies' designs, checked on the composed configs and the model's own counts: the MoE routing arms are the
papers' (loss-free = alpha 0), the combined study's arms differ by one component and stay within 5 % of full's
FLOPs per token, the RoPE stages find the pretraining checkpoints of their theta and seed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kimi_lab.config import validate_config
from kimi_lab.model import build_model, flops_per_token, parameter_counts
from tests.helpers import CONF_DIR, compose_config
from tests.config.test_experiments import sweep_params

ROUTING = ["moe_routing_tune", "moe_routing_confirm", "moe_routing_cpu_tune", "moe_routing_cpu_confirm"]
ROUTING_KEYS = {"topk_method", "scoring_func", "aux_loss_alpha", "bias_update_speed", "n_group", "topk_group"}


def _cfg(experiment: str, *overrides: str):
    return compose_config([f"experiment={experiment}", *overrides], output_dir=Path("/out"), model=None)


def _value(x):
    return getattr(x, "value", x)


def _size(cfg) -> tuple[int, int]:
    """(active parameters, training FLOPs per token) from the built model (kimi_lab.model.stats)."""
    model = build_model(cfg)
    return (parameter_counts(model)["params_active"],
            flops_per_token(model, cfg.data.seq_len, cfg.model.d_model, cfg.model.n_layers))


@pytest.mark.parametrize("experiment", ROUTING)
def test_routing_arms_are_the_papers_and_differ_only_in_routing(experiment):
    """aux_loss (baseline, first) / loss_free (noaux_tc, alpha 0, u 1e-3: Wang et al. 2024) / deepseek_v3 (+ alpha
    1e-4) / softmax_topk (greedy + load-balance loss); no top-1 cell; the rest of the MoE identical."""
    arms = sweep_params(experiment)["routing"]
    assert arms == ["aux_loss", "loss_free", "deepseek_v3", "softmax_topk"]
    moe = {arm: OmegaConf.to_container(_cfg(experiment, f"routing={arm}").moe) for arm in arms}
    gate = {arm: (_value(m["topk_method"]), _value(m["scoring_func"]), m["aux_loss_alpha"]) for arm, m in moe.items()}
    assert gate == {"aux_loss": ("aux_tc", "sigmoid", 1e-3), "loss_free": ("noaux_tc", "sigmoid", 0.0),
                    "deepseek_v3": ("noaux_tc", "sigmoid", 1e-4), "softmax_topk": ("greedy", "softmax", 1e-2)}
    assert moe["loss_free"]["bias_update_speed"] == moe["deepseek_v3"]["bias_update_speed"] == 1e-3
    for arm, m in moe.items():
        assert m["num_experts_per_tok"] >= 2 and m["n_shared_experts"] == 1, arm
        assert {k for k in m if m[k] != moe["aux_loss"][k]} <= ROUTING_KEYS, arm


def test_routing_arms_have_the_same_size():
    sizes = {arm: _size(_cfg("moe_routing_cpu_tune", f"routing={arm}"))
             for arm in sweep_params("moe_routing_cpu_tune")["routing"]}
    assert len(set(sizes.values())) == 1, sizes


COMPONENTS = ["attention", "norm", "moe", "optimizer", "rope"]  # minus_<component> changes only that subtree


@pytest.mark.parametrize("experiment", ["combined_tune", "combined_cpu_tune"])
def test_combined_arms_differ_by_their_component_at_full_compute(experiment):
    """full vs minus_<c>: only c's subtree differs, baseline differs in every component; the model, data and budget
    are the same for all 7 arms, and every arm is within 5 % of full's active parameters and FLOPs per token (the
    baseline keeps full's shared expert)."""
    params = sweep_params(experiment)
    arms = params["ablation"]
    assert arms[0] == "full" and sorted(arms) == sorted(["full", "baseline", *(f"minus_{c}" for c in COMPONENTS)])
    configs, sizes = {}, {}
    for arm in arms:
        cfg = _cfg(experiment, f"ablation={arm}")
        validate_config(cfg)
        configs[arm], sizes[arm] = OmegaConf.to_container(cfg, resolve=True), _size(cfg)
    full = configs["full"]
    assert (full["attention"]["name"], full["norm"]["name"], full["moe"]["topk_method"], full["optimizer"]["name"],
            full["rope"]["theta"]) == ("mla", "rmsnorm", "noaux_tc", "muon", 50000.0)
    for arm, cfg in configs.items():
        changed = {key for key in cfg if cfg[key] != full[key]}
        expected = {"full": set(), "baseline": set(COMPONENTS)}.get(arm, {arm.removeprefix("minus_")})
        assert changed == expected, arm
        assert cfg["moe"]["n_shared_experts"] == 1, arm
        params_ratio, flops_ratio = (a / b for a, b in zip(sizes[arm], sizes["full"]))
        assert abs(params_ratio - 1) <= 0.05 and abs(flops_ratio - 1) <= 0.05, (arm, params_ratio, flops_ratio)
    head_dim = full["model"]["d_model"] // full["attention"]["n_heads"]  # MLA at the MHA arms' head dims
    mla = full["attention"]
    assert (mla["qk_nope_head_dim"], mla["v_head_dim"], mla["qk_rope_head_dim"]) == (head_dim, head_dim, head_dim // 2)


@pytest.mark.parametrize("experiment", ["attention", "attention_cpu"])
def test_attention_arms_match_in_size_and_score_one_common_length(experiment):
    """MLA within 5 % of MHA's active parameters and FLOPs per token at every context arm; every context arm steps
    the same tokens and scores the primary length on the same blocks (the same longest eval length)."""
    from kimi_lab.training.length_eval import eval_lengths

    params = sweep_params(experiment)
    assert params["attention"] == ["standard", "flash", "mla"]
    primary = int(_cfg(experiment).report.primary_metric.removeprefix("val_loss@"))
    step_tokens, longest = set(), set()
    for context in params["context"]:
        cfg = {a: _cfg(experiment, f"attention={a}", f"context={context}") for a in ("sdpa", "mla")}
        data = cfg["mla"].data
        step_tokens.add(data.seq_len * data.batch_size)
        lengths = eval_lengths(data)
        assert primary in lengths
        longest.add(lengths[-1])
        (mha_params, mha_flops), (mla_params, mla_flops) = _size(cfg["sdpa"]), _size(cfg["mla"])
        assert abs(mla_params / mha_params - 1) <= 0.05 and abs(mla_flops / mha_flops - 1) <= 0.05, context
    assert len(step_tokens) == 1 and len(longest) == 1


def _hydra_cfg(experiment: str, *overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *overrides],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("suffix", ["", "_cpu"])
def test_rope_stages_read_the_pretraining_job_of_their_theta_and_seed(suffix, monkeypatch, tmp_path):
    """rope_pretrain names each job folder theta<theta>_seed<seed> in $KIMI_LAB_ROPE_PRETRAIN; the training-free and
    fine-tune stages load exactly that folder for their own theta and seed."""
    monkeypatch.setenv("KIMI_LAB_ROPE_PRETRAIN", str(tmp_path))
    pretrain = _hydra_cfg(f"rope_pretrain{suffix}", "rope.theta=50000", "seed=2")
    assert _value(pretrain.rope.scaling.type) == "default"
    folder = Path(pretrain.hydra.sweep.dir) / pretrain.hydra.sweep.subdir
    assert folder == tmp_path / "theta50000.0_seed2"
    length = pretrain.data.seq_len
    for stage in (f"rope{suffix}", f"rope_finetune{suffix}"):
        cfg = _cfg(stage, "rope=yarn", "rope.theta=50000", "seed=2")
        assert Path(cfg.init_from) == folder and cfg.model == pretrain.model
        assert int(cfg.rope.scaling.original_max_position_embeddings) == length
        assert 2 * length in [round(m * cfg.data.seq_len) for m in cfg.data.eval_lengths]
        assert 4 * length in [round(m * cfg.data.seq_len) for m in cfg.data.eval_lengths]
    extend = _cfg(f"rope{suffix}", "rope=yarn")
    assert extend.trainer.max_steps == 0 and extend.rope.scaling.dynamic_factor and extend.data.seq_len == length
    finetune = _cfg(f"rope_finetune{suffix}", "rope=yarn")
    assert finetune.data.seq_len == 2 * length and finetune.rope.scaling.factor == 2.0
    assert not finetune.rope.scaling.dynamic_factor
