"""Study configs: every grid point of every experiment (and its _cpu twin) composes and validates."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from kimi_lab.config import validate_config
from tests.helpers import CONF_DIR, DATA_DIR, compose_config

STUDIES = ["norm", "optimizer", "optimizer_momentum", "rope"]


def _sweep_params(experiment: str) -> dict[str, list[str]]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return {key: str(values).split(",") for key, values in cfg.hydra.sweeper.params.items()}


@pytest.mark.parametrize("experiment", [s + suffix for s in STUDIES for suffix in ("", "_cpu")])
def test_every_grid_point_composes_and_validates(experiment):
    params = _sweep_params(experiment)
    assert params.pop("seed") == ["1", "2", "3"]
    seen = set()
    for values in itertools.product(*params.values()):
        overrides = [f"{k}={v}" for k, v in zip(params, values)]
        cfg = compose_config([f"experiment={experiment}", *overrides, f"paths.data_dir={DATA_DIR}"], model=None)
        validate_config(cfg)
        seen.add(tuple(str(_select(cfg, k)) for k in params))
        assert cfg.model.name == ("small" if experiment.endswith("_cpu") else "base")
    assert len(seen) == len(list(itertools.product(*params.values())))  # every axis really changes the config


@pytest.mark.parametrize("study", [*STUDIES, "attention", "moe_routing", "combined"])
def test_reference_size_studies_run_on_a_gpu_and_their_twins_on_cpu(study):
    """`python train.py -m hydra/launcher=gpu_pool experiment=norm` (the README's) needs no hardware=gpu: every
    reference-size study selects it (four of them used to train base models in fp32 on the CPU)."""
    for name, accelerator, precision in ((study, "gpu", "bf16-mixed"), (f"{study}_cpu", "cpu", "32-true")):
        hardware = compose_config([f"experiment={name}"], model=None).hardware
        assert (getattr(hardware.accelerator, "value", hardware.accelerator), str(hardware.precision)) == (
            accelerator, precision), name


def _select(cfg, key: str):
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if key in ("norm", "optimizer", "rope"):
        value = OmegaConf.select(cfg, f"{key}.name")
    return getattr(value, "value", value)


def test_study_axes():
    assert _sweep_params("norm_cpu") == {"norm": ["layernorm", "rmsnorm"], "norm.eps": ["1e-6", "1e-8"],
                                         "optimizer.lr": ["1e-4", "3e-4", "1e-3", "2e-3"], "seed": ["1", "2", "3"]}
    assert _sweep_params("optimizer_momentum_cpu")["optimizer.momentum"] == ["0.9", "0.95", "0.99"]
    rope = _sweep_params("rope")
    assert rope["rope"] == ["default", "linear", "dynamic", "yarn"]
    assert rope["rope.theta"] == ["10000", "50000", "100000", "200000"]
    cfg = compose_config(["experiment=rope"], model=None)
    assert cfg.data.seq_len * max(cfg.data.eval_lengths) == 4096


COMPONENTS = {"attention": ["attention"], "norm": ["norm"], "moe": ["moe"], "optimizer": ["optimizer"],
              "rope": ["rope"]}  # leave-one-out arm minus_<component> -> the config subtrees it may change


@pytest.mark.parametrize("experiment", ["combined", "combined_cpu"])
def test_combined_study_arms_differ_from_full_by_exactly_their_component(experiment):
    """full vs minus_<c>: only component c's subtree differs; baseline differs in every component; the rest of the
    config (model, data, trainer budget) is the same for all 7 arms."""
    from omegaconf import OmegaConf

    params = _sweep_params(experiment)
    assert params.pop("seed") == ["1", "2", "3"]
    arms = params.pop("ablation")
    assert not params and arms[0] == "full"  # the report's default baseline arm is the full combination
    assert sorted(arms) == sorted(["full", "baseline", *(f"minus_{c}" for c in COMPONENTS)])
    configs = {}
    for arm in arms:
        cfg = compose_config([f"experiment={experiment}", f"ablation={arm}"], output_dir=Path("/out"), model=None)
        validate_config(cfg)
        configs[arm] = OmegaConf.to_container(cfg, resolve=True)
    full = configs["full"]
    assert (full["attention"]["name"], full["norm"]["name"], full["moe"]["topk_method"], full["optimizer"]["name"],
            full["rope"]["theta"]) == ("mla", "rmsnorm", "noaux_tc", "muon", 50000.0)
    for arm, cfg in configs.items():
        changed = {key for key in cfg if cfg[key] != full[key]}
        expected = set(COMPONENTS) if arm == "baseline" else set(COMPONENTS.get(arm.removeprefix("minus_"), []))
        assert changed == expected, (arm, changed)
    assert configs["full"]["model"]["name"] == ("small" if experiment.endswith("_cpu") else "base")
    # MLA at the MHA arms' head dim (nope = v = d_model / n_heads, rope half of it), not mla.yaml's small sizes
    head_dim = full["model"]["d_model"] // full["attention"]["n_heads"]
    mla = full["attention"]
    assert (mla["qk_nope_head_dim"], mla["v_head_dim"], mla["qk_rope_head_dim"]) == (head_dim, head_dim, head_dim // 2)
    # minus_moe swaps the gate only: same shared expert, experts and widths as full
    assert configs["minus_moe"]["moe"]["n_shared_experts"] == full["moe"]["n_shared_experts"] == 1
    assert configs["baseline"]["moe"]["n_shared_experts"] == 0  # the pre-study default


def test_minus_moe_arm_has_the_active_parameters_of_full():
    """Leave-one-out of the gate at equal compute: minus_moe and full build models of equal total and active size."""
    from kimi_lab.model import build_model, parameter_counts

    counts = {}
    for arm in ("full", "minus_moe"):
        cfg = compose_config(["experiment=combined_cpu", f"ablation={arm}"], output_dir=Path("/out"), model=None)
        counts[arm] = parameter_counts(build_model(cfg))
    assert counts["minus_moe"] == counts["full"]
