"""MoE training runs at the tiny size: results.json's balance measures (Wang et al. 2024 / DeepSeek-V3 MaxVio), epochs
and report block; the expert bias updated once per optimizer step on the counts of every micro-batch; a resume that
keeps the bias, its curve and the balance measures of the uninterrupted run."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch

from kimi_lab.data import LMDataModule
from kimi_lab.model import build_model
from kimi_lab.model.moe import Router
from kimi_lab.training import train
from kimi_lab.training.callbacks import METRIC_FIELDS
from tests.helpers import compose_config

QUICK = ["data.eval_lengths=[]", "logger.tensorboard=false", "optimizer.warmup_steps=1", "seed=0"]
# a token budget of 5 steps (batch 4 x 32 tokens) under a larger max_steps: the late half is steps 3, 4, 5 of the
# budget; validations at steps 2 and 4 in fit, then the final one at step 5 after it
BUDGET = [*QUICK, "trainer.max_steps=50", "trainer.max_tokens=640", "trainer.val_check_interval=2"]


def maxvio(counts: torch.Tensor) -> float:
    """Wang et al. 2024, Eq. 6: max_i load_i / mean(load) - 1."""
    return (counts.max() / counts.mean()).item() - 1.0


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("budget")
    cfg = compose_config([*BUDGET, "report.primary_metric=val_loss@64", "+report.target.val_loss=5.8",
                          "report.tuning_seeds=[4,5]"], output_dir=folder)
    return cfg, folder, train(cfg)


def held_out_counts(cfg, folder) -> list[torch.Tensor]:
    """Tokens per expert (top-k selections, float64) of each MoE layer over the validation windows, counted from
    the routers' expert indices with the run's final weights."""
    model = build_model(cfg)
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    model.eval()
    layers = model.moe_layers()
    counts = [torch.zeros(layer.n_experts, dtype=torch.float64) for layer in layers]

    def count(j):
        def hook(gate, args, routing) -> None:  # None: the layer keeps the router's output
            counts[j] += torch.bincount(routing.expert_idx.flatten(), minlength=layers[j].n_experts).double()
        return hook

    hooks = [layer.gate.register_forward_hook(count(j)) for j, layer in enumerate(layers)]
    data = LMDataModule(cfg.data, cache_dir=str(cfg.paths.data_dir), seed=0, num_train_samples=1)
    data.setup("fit")
    with torch.no_grad():
        for x, _ in data.val_dataloader():
            model(x)
    for hook in hooks:
        hook.remove()
    n_scored = len(data.val_targets())
    assert all(c.sum().item() == n_scored * cfg.moe.num_experts_per_tok for c in counts)  # each window once
    return counts


def test_maxvio_val_is_the_count_over_the_validation_windows_at_the_end(budget_run):
    cfg, folder, results = budget_run
    assert results["status"] == "completed" and results["steps"] == 5
    want = [maxvio(c) for c in held_out_counts(cfg, folder)]
    assert len(want) == 2 and all(v > 0 for v in want)
    assert results["moe_maxvio_val_per_layer"] == pytest.approx(want, rel=1e-12)
    assert results["moe_maxvio_val"] == pytest.approx(statistics.fmean(want), rel=1e-12)


def test_maxvio_batch_late_is_the_mean_of_the_logged_steps_of_the_last_half(budget_run):
    _, folder, results = budget_run
    with (folder / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["train_loss"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    late = [r for r in rows if int(r["step"]) > 5 / 2]  # steps of the token budget, not of trainer.max_steps
    per_layer = [statistics.fmean(float(r[f"moe{j}_maxvio"]) for r in late) for j in range(2)]
    assert results["moe_maxvio_batch_late_per_layer"] == pytest.approx(per_layer, rel=1e-12)
    assert results["moe_maxvio_batch_late"] == pytest.approx(statistics.fmean(float(r["moe_maxvio"]) for r in late),
                                                             rel=1e-12)
    everything = statistics.fmean(float(r["moe_maxvio"]) for r in rows)
    assert results["moe_maxvio_batch_late"] != pytest.approx(everything)  # the early steps are left out
    assert "moe_maxvio_batch_mean" not in results and "moe_maxvio_batch_mean_per_layer" not in results


def test_epochs_and_report_block_are_recorded(budget_run):
    cfg, folder, results = budget_run
    data = LMDataModule(cfg.data, cache_dir=str(cfg.paths.data_dir), seed=0, num_train_samples=1)
    data.setup("fit")
    assert data.manifest["key"] == results["data_manifest_key"]  # the split the run trained on
    train_tokens = data.manifest["splits"]["train"]["n_tokens"]
    assert results["tokens_seen"] == 5 * 4 * 32
    assert results["epochs"] == pytest.approx(results["tokens_seen"] / train_tokens, rel=1e-12)
    assert results["report"] == {"primary_metric": "val_loss@64", "sesoi": {"val_loss": 0.02},
                                 "target": {"val_loss": 5.8}, "mde_goal": 0.05, "tuning_seeds": [4, 5],
                                 "tuning_sweep": None}
    assert json.loads((folder / "results.json").read_text())["report"] == results["report"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(compose_config(RESUME, output_dir=tmp_path_factory.mktemp("full")))


RESUME = [*QUICK, "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.checkpoint_every_n_steps=2"]
BALANCE = ("moe_maxvio_val", "moe_maxvio_val_per_layer", "moe_maxvio_batch_late", "moe_maxvio_batch_late_per_layer")


@pytest.mark.parametrize("interrupt_at", [3, 4])
def test_resume_keeps_the_balance_measures(tmp_path, uninterrupted, interrupt_at):
    """Interrupted after late step 3 (its MaxVio is in last.ckpt, step 4 runs after the resume) or after the last
    step and its validation (the resumed run trains and validates nothing): the same values as the uninterrupted
    run. The report block may change on resume (it trains nothing); results.json records the resumed one."""
    cut = train(compose_config([*RESUME, f"trainer.interrupt_at_step={interrupt_at}"], output_dir=tmp_path))
    assert cut["status"] == "interrupted"
    resumed = train(compose_config([*RESUME, "resume=true", "report.mde_goal=0.1"], output_dir=tmp_path))
    assert resumed["status"] == "completed" and resumed["steps"] == 4 and resumed["report"]["mde_goal"] == 0.1
    assert uninterrupted["moe_maxvio_batch_late"] is not None and uninterrupted["moe_maxvio_val"] is not None
    for key in BALANCE:
        assert resumed[key] == uninterrupted[key], key
    assert resumed["epochs"] == uninterrupted["epochs"]


def test_dense_runs_have_no_balance_fields(tmp_path):
    results = train(compose_config([*QUICK, "moe=dense", "trainer.max_steps=2", "trainer.val_check_interval=2"],
                                   output_dir=tmp_path))
    assert results["status"] == "completed" and results["epochs"] > 0
    assert not {"expert_load", *BALANCE} & results.keys()

# ----------------------------------------------------------------------------------------------- expert bias


@pytest.mark.usefixtures("one_thread")
def test_bias_updates_once_per_optimizer_step_end_to_end(tmp_path, monkeypatch):
    """accumulate_grad_batches=4: one update per optimizer step, on the counts of all 4 micro-batches."""
    seen = []
    original = Router.update_bias

    def counting(self, counts):
        seen.append(counts.sum().item())
        original(self, counts)

    monkeypatch.setattr(Router, "update_bias", counting)
    overrides = ["moe=deepseek_v3", "trainer.max_steps=3", "trainer.accumulate_grad_batches=4",
                 "trainer.val_check_interval=3", "optimizer.warmup_steps=1"]
    results = train(compose_config(overrides, output_dir=tmp_path))
    cfg = compose_config(overrides)
    assignments = 4 * cfg.data.batch_size * cfg.data.seq_len * cfg.moe.num_experts_per_tok
    assert seen == [assignments] * (3 * cfg.model.n_layers)  # 3 steps x 2 layers, each over 4 micro-batches
    # metrics: per-layer columns and results fields
    with (tmp_path / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["train_loss"]]
    per_layer = ("load", "cv", "maxvio", "aux_loss", "bias")
    assert reader.fieldnames == METRIC_FIELDS + [f"moe{j}_{key}" for j in range(2) for key in per_layer]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for j in range(2):
        loads = [json.loads(r[f"moe{j}_load"]) for r in rows]
        assert all(abs(sum(load) - 1) < 1e-4 and len(load) == 4 for load in loads)
        assert all(float(r[f"moe{j}_aux_loss"]) > 0 and float(r[f"moe{j}_maxvio"]) >= 0 for r in rows)
        biases = [json.loads(r[f"moe{j}_bias"]) for r in rows]
        steps = [max(abs(a - b) for a, b in zip(x, y)) for x, y in zip([[0.0] * 4] + biases, biases)]
        assert all(0 < s <= 2e-3 + 1e-9 for s in steps)  # each step moved the bias by at most 2 gamma
    assert results["expert_bias"] == [json.loads(rows[-1]["moe0_bias"]), json.loads(rows[-1]["moe1_bias"])]
    assert len(results["moe_aux_loss"]) == 2 and len(results["moe_maxvio_batch_late_per_layer"]) == 2
    assert not [key for key in results if "dropped" in key]  # a dropless layer runs every assignment
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    torch.testing.assert_close(ckpt["state_dict"]["model.layers.0.mlp.gate.e_score_correction_bias"],
                               torch.tensor(results["expert_bias"][0]), rtol=0, atol=1e-8)


@pytest.mark.usefixtures("one_thread")
def test_resume_restores_the_bias_and_its_curve(tmp_path):
    """noaux_tc: the interrupted + resumed run has the same per-step losses and biases as the uninterrupted one."""
    overrides = ["moe=deepseek_v3", "trainer.max_steps=6", "trainer.val_check_interval=3",
                 "optimizer.warmup_steps=2", "seed=0", "moe.bias_update_speed=0.01"]
    train(compose_config(overrides, output_dir=tmp_path / "full"))
    train(compose_config([*overrides, "trainer.interrupt_at_step=4"], output_dir=tmp_path / "cut"))
    train(compose_config([*overrides, "resume=true"], output_dir=tmp_path / "cut"))
    rows = {}
    for name in ("full", "cut"):
        with (tmp_path / name / "metrics.csv").open() as f:
            rows[name] = [r for r in csv.DictReader(f) if r["train_loss"]]
    assert [r["step"] for r in rows["cut"]] == [str(s) for s in range(1, 7)]
    for a, b in zip(rows["full"], rows["cut"]):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-6)
        assert json.loads(a["moe1_bias"]) == pytest.approx(json.loads(b["moe1_bias"]), abs=1e-7)
