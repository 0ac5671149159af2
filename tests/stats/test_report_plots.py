"""Report plots (leave-one-out chart, expert-load heat maps) on a synthetic combined-study sweep, and
notebooks/analysis.ipynb executed against that report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from kimi_lab.stats.report import write_report
from tests.helpers import run_notebook
from tests.synthetic import factorial_values, write_factorial_sweep

pytest.importorskip("matplotlib", reason="plots need the `report` extra (matplotlib)")

ARMS = ["full", "baseline", "minus_norm", "minus_moe"]
VAL = {"full": 3.00, "baseline": 3.30, "minus_norm": 3.05, "minus_moe": 3.12}  # + 0.01 * seed + RUN_NOISE
RUN_NOISE = {"full": (0.002, -0.003, 0.001), "baseline": (-0.001, 0.003, -0.002), "minus_norm": (0.003, -0.001, -0.002),
             "minus_moe": (-0.002, -0.001, 0.003)}  # per seed 1..3, mean 0: each arm's mean stays VAL + 0.02
LOAD = {  # per arm, 2 MoE layers x 4 experts, before the per-seed wobble
    "full": [[0.25, 0.25, 0.25, 0.25], [0.3, 0.2, 0.25, 0.25]],
    "baseline": [[0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]],
    "minus_norm": [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]],
    "minus_moe": [[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]],
}


def _load(arm: str, seed: int) -> list[list[float]]:
    load = np.array(LOAD[arm])
    load[:, 0] += 0.01 * (seed - 2)  # seeds 1..3 average back to LOAD
    load[:, 1] -= 0.01 * (seed - 2)
    return load.tolist()


@pytest.fixture
def ablation_sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / "2026-01-02" / "09-00-00-000000-combined"
    root.mkdir(parents=True)
    multirun = {"hydra": {"overrides": {"task": ["experiment=combined_cpu", f"ablation={','.join(ARMS)}",
                                                 "seed=1,2,3"]}}}
    (root / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    for index, (arm, seed) in enumerate((a, s) for a in ARMS for s in (1, 2, 3)):
        job = root / str(index)
        (job / ".hydra").mkdir(parents=True)
        overrides = ["experiment=combined_cpu", f"ablation={arm}", f"seed={seed}"]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (job / "status.json").write_text(json.dumps({"status": "completed"}))
        val = VAL[arm] + 0.01 * seed + RUN_NOISE[arm][seed - 1]
        results = {"status": "completed", "seed": seed, "overrides": overrides, "val_loss": val,
                   "test_loss": val + 0.02, "val_acc": 0.3, "tokens_per_s": 1000.0 - 10 * seed,
                   "peak_mem_mb": 800.0, "train_time_s": 60.0, "expert_load": _load(arm, seed),
                   "expert_load_cv": [0.1 * seed, 0.3 * seed] if arm == "baseline" else [0.1, 0.1],
                   "choices": {"hardware": "cpu"}}
        (job / "results.json").write_text(json.dumps(results))
        rows = ["step,tokens,wall_time_s,train_time_s,train_loss,grad_norm,val_loss",
                "5,500,5,2.5,5.0,1.0,", f"5,500,5.1,,,,{val + 1.0}", "10,1000,10,5,4.0,1.0,",
                f"10,1000,10.1,,,,{val}"]
        (job / "metrics.csv").write_text("\n".join(rows) + "\n")
    return root


def test_leave_one_out_and_expert_load_plots(ablation_sweep, tmp_path):
    from kimi_lab.stats.plots import ablation_name, expert_load_by_arm, expert_load_cv_by_arm, figure_leave_one_out

    out, sweep, comp = write_report(ablation_sweep, tmp_path / "rep")
    assert comp.baseline == "ablation=full"  # the first value: every arm is read against the full combination
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {"val_loss_curves.png", "effects.png", "leave_one_out.png", "expert_load.png"}
    assert "![leave_one_out](leave_one_out.png)" in (out / "report.md").read_text()
    val = {r["arm"]: r for r in comp.rows if r["metric"] == "val_loss"}
    assert val["ablation=minus_moe"]["diff"] == pytest.approx(0.12)  # removing the MoE gate costs 0.12
    assert val["ablation=baseline"]["diff"] == pytest.approx(0.30)
    cv = {r["arm"]: r for r in comp.rows if r["metric"] == "expert_load_cv"}  # mean over layers, then seeds
    assert cv["ablation=baseline"]["mean_a"] == pytest.approx(0.4) and cv["ablation=minus_norm"]["diff"] == 0
    loads = expert_load_by_arm(sweep)
    assert set(loads) == {f"ablation={a}" for a in ARMS}
    np.testing.assert_allclose(loads["ablation=baseline"], LOAD["baseline"], atol=1e-12)
    assert [ablation_name(a) for a in ("ablation=minus_norm", "norm=rmsnorm")] == ["minus_norm", None]
    figure = figure_leave_one_out(comp.rows, comp.baseline)  # panels say each metric's family; no timing panel
    assert [ax.get_title(loc="left") for ax in figure.axes] == [
        "val_loss (confirmatory): arm - full", "test_loss (exploratory): arm - full",
        "peak_mem_mb (exploratory): arm - full"]
    lr_rows = [{**r, "arm": "optimizer.lr=0.002"} for r in comp.rows]
    assert figure_leave_one_out(lr_rows, "optimizer.lr=0.001") is None  # not a leave-one-out sweep
    # the heat maps' titles give the report's expert_load_cv (per-seed CVs averaged), not the CV of the seed-mean load
    cv_titles = expert_load_cv_by_arm(sweep)
    assert cv_titles["ablation=baseline"] == pytest.approx(cv["ablation=baseline"]["mean_a"])
    mean_load = np.asarray(LOAD["baseline"])
    assert cv_titles["ablation=baseline"] != pytest.approx((mean_load.std(axis=1) / mean_load.mean(axis=1)).mean())


def test_no_expert_load_heat_map_without_moe_arms(ablation_sweep, tmp_path):
    for results in ablation_sweep.glob("*/results.json"):
        data = json.loads(results.read_text())
        data["expert_load"] = []  # dense arms record no MoE layer
        results.write_text(json.dumps(data))
    out, _, _ = write_report(ablation_sweep, tmp_path / "rep")
    assert not (out / "expert_load.png").exists() and (out / "leave_one_out.png").exists()


@pytest.mark.parametrize("kind", ["leave_one_out", "factorial"])
def test_analysis_notebook_redraws_the_report(kind, ablation_sweep, tmp_path, monkeypatch):
    """notebooks/analysis.ipynb runs top to bottom on a report and shows every plot and the verdicts: the combined
    study's (leave-one-out, expert load) or a norm x lr grid's (main effects)."""
    sweep = ablation_sweep if kind == "leave_one_out" else write_factorial_sweep(
        tmp_path / "grid", factorial_values({"0.001": -0.05, "0.002": -0.05, "0.004": -0.05}))
    out, _, _ = write_report(sweep, tmp_path / "rep", plots=False)
    outputs = run_notebook("analysis.ipynb", {"KIMI_LAB_REPORT": str(out)}, tmp_path, monkeypatch)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/markdown", "") for o in outputs)
    if kind == "factorial":
        assert len(images) == 3  # curves, effects, main effects
        assert "norm=rmsnorm lowers val loss by 0.06" in text and "Averaged over 3 of 3 contexts" in text
        assert "no MoE arm" in text and "not a leave-one-out sweep" in text
        return
    assert len(images) == 4  # curves, effects, leave-one-out, expert load
    assert "baseline ablation=full" in text and "ablation=baseline raises val loss by 0.3" in text
    assert "primary metric val_loss (confirmatory)" in text and "| `ablation=baseline` | 0.3 [" in text
    assert "one swept key: no main effects" in text
