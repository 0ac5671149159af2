"""Study configs: every grid point of every experiment composes and validates, and each study holds what its header
states: GPU studies on the GPU at ~20 tokens per active parameter, CPU twins on the CPU design, tune grids of >= 5
learning rates 2x apart, confirm sweeps on fresh seeds without an LR axis, a declared primary metric."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kimi_lab.config import validate_config
from kimi_lab.stats.metrics import LENGTH_PREFIX, METRICS_BY_NAME
from kimi_lab.training.length_eval import eval_lengths
from tests.helpers import CONF_DIR, DATA_DIR, compose_config, group_options

STUDIES = [e for e in group_options("experiment") if e != "demo"]
TUNES = [e for e in STUDIES if e.endswith("_tune")]
ALIASES = [e.removesuffix("_tune") for e in TUNES]  # experiment=<study> names its tune stage
CONFIRMS = [e for e in STUDIES if e.endswith("_confirm")]
LR_KEY = "optimizer.lr"
DEFAULT_LR = 3e-3  # conf/optimizer/*.yaml
CPU_SECONDS_PER_JOB = 27  # measured: the optimizer study's 132 jobs of 1,000 steps took 59 min, two at a time


def sweep_params(experiment: str, overrides: tuple[str, ...] = ()) -> dict[str, list[str]]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *overrides],
                      return_hydra_config=True)
    GlobalHydra.instance().clear()
    return {key: str(values).split(",") for key, values in (cfg.hydra.sweeper.params or {}).items()}


def study_cfg(experiment: str, *overrides: str):
    return compose_config([f"experiment={experiment}", *overrides, f"paths.data_dir={DATA_DIR}"],
                          output_dir=Path("/out"), model=None)


def is_cpu(experiment: str) -> bool:
    return "_cpu" in experiment


def n_jobs(params: dict[str, list[str]]) -> int:
    return math.prod(len(values) for values in params.values())


def paired(experiment: str, suffix: str) -> str:
    """optimizer_cpu_confirm -> optimizer_cpu_tune (suffix '_tune')."""
    return experiment.rsplit("_", 1)[0] + suffix


@pytest.mark.parametrize("experiment", [e for e in STUDIES if e not in ALIASES])
def test_every_grid_point_composes_validates_and_differs(experiment):
    """Every point of the grid (seed aside; the LR axis is checked by the tune tests) composes and validates, with a
    config of its own (no axis is inert), on the study's preset; a val_loss@<L> primary metric is a length every
    point scores."""
    params = sweep_params(experiment)
    params.pop("seed")
    params.pop(LR_KEY, None)
    seen = set()
    for values in itertools.product(*params.values()):
        cfg = study_cfg(experiment, *(f"{k}={v}" for k, v in zip(params, values)))
        validate_config(cfg)
        seen.add(json.dumps(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), sort_keys=True))
        assert cfg.model.name == ("tiny" if is_cpu(experiment) else "base")
        primary = cfg.report.primary_metric
        if primary.startswith(LENGTH_PREFIX):
            assert int(primary.removeprefix(LENGTH_PREFIX)) in eval_lengths(cfg.data), (experiment, values)
    assert len(seen) == n_jobs(params)


@pytest.mark.parametrize("experiment", STUDIES)
def test_gpu_studies_run_on_a_gpu_and_their_twins_on_the_cpu(experiment):
    """`python train.py -m hydra/launcher=gpu_pool experiment=<study>` needs no hardware=gpu; every GPU study has
    a CPU twin (``_cpu`` before a ``_tune`` / ``_confirm`` suffix, so `make tune` maps the twin's stages too)."""
    hardware = study_cfg(experiment).hardware
    want = ("cpu", "32-true") if is_cpu(experiment) else ("gpu", "bf16-mixed")
    assert (getattr(hardware.accelerator, "value", hardware.accelerator), str(hardware.precision)) == want
    if not is_cpu(experiment):
        stem, _, stage = experiment.rpartition("_")
        twin = f"{stem}_cpu_{stage}" if stage in ("tune", "confirm") else f"{experiment}_cpu"
        assert twin in STUDIES


@pytest.mark.parametrize("experiment", STUDIES)
def test_every_study_declares_a_known_primary_metric(experiment):
    """report.primary_metric is written in the study's file (or the stage it names) and is a report metric."""
    path = CONF_DIR / "experiment" / f"{experiment}.yaml"
    text = path.read_text()
    if "primary_metric:" not in text:  # experiment=<study> naming its tune stage
        (included,) = [d for d in yaml.safe_load(text)["defaults"] if isinstance(d, str) and not d.startswith("/")]
        text = (CONF_DIR / "experiment" / f"{included}.yaml").read_text()
    assert "primary_metric:" in text and "Primary metric:" in text  # set, and stated in the header
    report = study_cfg(experiment).report
    primary = report.primary_metric
    assert primary in METRICS_BY_NAME or primary.startswith(LENGTH_PREFIX), primary
    assert report.sesoi[primary] == 0.02  # the SESOI is declared for the primary metric itself


@pytest.mark.parametrize("experiment", TUNES)
def test_tune_grids_span_five_or_more_learning_rates_2x_apart(experiment):
    """Each arm gets an LR grid of >= 5 values, about 2x apart, bracketing the options' default lr; the plain
    study name (experiment=<study>) runs the same sweep."""
    params = sweep_params(experiment)
    lrs = sorted(float(v) for v in params[LR_KEY])
    assert len(lrs) >= 5 and lrs[0] < DEFAULT_LR < lrs[-1]
    assert all(1.8 <= b / a <= 2.2 for a, b in zip(lrs, lrs[1:])), lrs
    assert params["seed"] == ["1", "2"]
    assert sweep_params(experiment.removesuffix("_tune")) == params


@pytest.mark.parametrize("experiment", CONFIRMS)
def test_confirm_sweeps_rerun_the_tuned_arms_on_fresh_seeds(experiment):
    """X_confirm: no LR axis (the confirm command supplies each arm's), seeds disjoint from X_tune's (recorded in
    report.tuning_seeds), the tune stage's arms, and the tune stage's size, data and budget; `make tune` names it."""
    from kimi_lab.stats.tune_command import _confirm_experiment

    tune = paired(experiment, "_tune")
    confirm_params, tune_params = sweep_params(experiment), sweep_params(tune)
    assert LR_KEY not in confirm_params
    tuning_seeds = [int(s) for s in tune_params.pop("seed")]
    seeds = [int(s) for s in confirm_params.pop("seed")]
    assert not set(seeds) & set(tuning_seeds) and len(seeds) >= 6
    tune_params.pop(LR_KEY)
    assert {k: v for k, v in confirm_params.items() if k in tune_params} == tune_params  # the same arms
    arm = [f"{k}={v[0]}" for k, v in tune_params.items()]
    confirm_cfg, tune_cfg = study_cfg(experiment, *arm), study_cfg(tune, *arm)
    assert list(confirm_cfg.report.tuning_seeds) == tuning_seeds
    for key in ("model", "data", "trainer", "hardware", "moe", "attention"):
        assert confirm_cfg[key] == tune_cfg[key], key
    assert _confirm_experiment(f"experiment={tune}") == f"experiment={experiment}"


@pytest.mark.parametrize("experiment", [e for e in STUDIES if not is_cpu(e)])
def test_gpu_studies_train_about_20_tokens_per_active_parameter_on_a_large_corpus(experiment):
    """2^29-ish tokens per job on data=hf (FineWeb-Edu), 18-22 tokens per active parameter of the study's first arm;
    the rope extension stages train 0 or a few % of the pretraining tokens instead."""
    from kimi_lab.model import build_model, parameter_counts

    params = sweep_params(experiment)
    cfg = study_cfg(experiment, *(f"{k}={v[0]}" for k, v in params.items() if k != "seed"))
    assert getattr(cfg.data.name, "value", cfg.data.name) == "hf" and cfg.data.hf.path == "HuggingFaceFW/fineweb-edu"
    if cfg.init_from is not None:  # rope stages 2 and 3: evaluate, or fine-tune briefly, a pretrained checkpoint
        pretrain = study_cfg("rope_pretrain")
        fraction = cfg.trainer.max_steps * cfg.data.batch_size * cfg.data.seq_len / pretrain.trainer.max_tokens
        assert cfg.trainer.max_steps == 0 or 0.01 <= fraction <= 0.06
        return
    active = parameter_counts(build_model(cfg))["params_active"]
    assert 18 <= cfg.trainer.max_tokens / active <= 22, cfg.trainer.max_tokens / active


@pytest.mark.parametrize("experiment", [e for e in STUDIES if is_cpu(e)])
def test_cpu_studies_use_the_measured_cpu_design_and_fit_90_minutes(experiment):
    """The CPU optimizer study's size (tiny on bytes, 1,000 steps of 16 x 64 tokens) for every CPU study that trains
    from scratch; a tune + confirm pair (or a single study) runs within 90 minutes on 2 cores."""
    design = study_cfg("optimizer_cpu_tune")
    cfg = study_cfg(experiment)
    if cfg.init_from is None:
        assert cfg.trainer.max_steps == design.trainer.max_steps
        assert cfg.data.batch_size * cfg.data.seq_len == design.data.batch_size * design.data.seq_len
    stage = experiment.rpartition("_")[2]
    pair = [paired(experiment, "_tune"), paired(experiment, "_confirm")] if stage in ("tune", "confirm") else [
        experiment]
    assert sum(n_jobs(sweep_params(e)) for e in pair) * CPU_SECONDS_PER_JOB <= 90 * 60


def test_aa_calibration_runs_one_configuration_on_twelve_or_more_seeds():
    params = sweep_params("aa_cpu")
    assert list(params) == ["seed"] and len(params["seed"]) >= 12
    cfg, design = study_cfg("aa_cpu"), study_cfg("optimizer_cpu_tune", "optimizer=adamw")
    assert getattr(cfg.optimizer.name, "value", None) == "adamw"
    for key in ("model", "data", "trainer", "optimizer"):
        assert cfg[key] == design[key], key
    assert len(params["seed"]) * CPU_SECONDS_PER_JOB <= 20 * 60
