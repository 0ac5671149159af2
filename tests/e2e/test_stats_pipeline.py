"""The statistics pipeline on real tiny runs: a sweep with a failing job through `make report`, a tune sweep through
`make tune` and the confirm sweep it prints (each arm at its tuned lr, fresh seeds), and notebooks/inspect_run.ipynb
on a run folder."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kimi_lab.stats.collect import collect_sweep
from kimi_lab.stats.tune import confirm_notes
from kimi_lab.training import train
from tests.helpers import DATA_DIR, REPO_ROOT, compose_config, csv_rows, run_notebook


def test_real_sweep_through_make_report(tmp_path):
    """2 arms x 3 seeds of the tiny model plus one job made to fail, then `make report` on the folder."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "model=tiny", f"paths.data_dir={DATA_DIR}",
              "trainer.max_steps=3", "trainer.val_check_interval=3", "optimizer.warmup_steps=1"]
    grid = subprocess.run([*common, "norm=layernorm,rmsnorm", "seed=1,2,3", f"hydra.sweep.dir={tmp_path}/sweep/grid"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert grid.returncode == 0, grid.stderr[-3000:]
    failing = subprocess.run([*common, "norm=rmsnorm", "optimizer.lr=-1", "seed=1",
                              f"hydra.sweep.dir={tmp_path}/sweep/fail"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert failing.returncode != 0
    proc = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "-o", "install", "report", f"PYTHON={sys.executable}",
                           f"SWEEP={tmp_path}/sweep", f"OUT={tmp_path}/rep"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(r["metric"], r["arm"]): r for r in csv_rows(tmp_path / "rep" / "comparisons.csv")}
    val = rows["val_loss", "norm=rmsnorm, optimizer.lr=(default)"]
    assert val["baseline"] == "norm=layernorm, optimizer.lr=(default)"
    assert (val["test"], val["n_a"], val["n_b"], val["seeds_a"]) == ("paired", "3", "3", "1 2 3")
    assert 0 <= float(val["p"]) <= 1 and float(val["mde_d"]) == pytest.approx(3.2640, abs=1e-4)  # d_z, 3 pairs
    assert rows["val_loss", "norm=rmsnorm, optimizer.lr=-1"]["n_a"] == "0"
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    failed = [j for j in report["jobs"] if j["status"] == "failed"]
    assert [j["name"] for j in failed] == ["fail/0"] and "optimizer.lr" in failed[0]["error"]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Jobs not counted (1)" in md and "(d_z 3.26) with 3 pairs at alpha = 0.05" in md


def test_real_tune_then_confirm(tmp_path):
    """``optimizer=adam,adamw optimizer.lr=1e-3,2e-3 seed=1`` (2 steps), `make tune`, then the confirm line with 1
    fresh seed: each confirm job ran at its own arm's tuned lr and records the tuning seeds and sweep."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tune = tmp_path / "multirun" / "tune"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "-m", "model=tiny",
                           f"paths.data_dir={DATA_DIR}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                           "optimizer.warmup_steps=1", "optimizer=adam,adamw", "optimizer.lr=1e-3,2e-3", "seed=1",
                           f"hydra.sweep.dir={tune}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "-o", "install", "tune", f"PYTHON={sys.executable}",
                           f"SWEEP={tune}", f"OUT={tmp_path}/rep", "CONFIRM_SEEDS=2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "rep" / "lr_sensitivity.png").stat().st_size > 0
    tuned = json.loads((tmp_path / "rep" / "tuned_lr.json").read_text())
    assert set(tuned["arms"]) == {"optimizer=adam", "optimizer=adamw"}
    assert set(tuned["arms"].values()) <= {0.001, 0.002} and set(tuned["edge"]) == set(tuned["arms"])  # 2-LR grids
    tokens = shlex.split((tmp_path / "rep" / "confirm_command.txt").read_text())
    assert tokens[:2] == ["python", "train.py"]
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *tokens[2:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    confirm = collect_sweep(Path(f"{tune}_confirm"))
    assert {a.label for a in confirm.arms} == {"optimizer=adam", "optimizer=adamw"}
    for arm in confirm.arms:
        (job,) = arm.jobs
        assert job.status == "completed" and job.seed == 2
        config = yaml.safe_load((job.path / "config_resolved.yaml").read_text())
        assert config["optimizer"]["lr"] == tuned["arms"][arm.label]
        assert job.results["report"]["tuning_seeds"] == [1]
        assert job.results["report"]["tuning_sweep"] == str(tune.resolve())
    lines, warnings = confirm_notes(confirm)
    for label, lr in tuned["arms"].items():
        assert f"| `{label}` | {lr:g} | `{label}` | `{tune.resolve()}` | yes: {tuned['edge'][label]} |" in lines
    assert len(warnings) == 2 and all("so the optimum was not bracketed" in w for w in warnings)


def test_inspect_run_notebook_runs_on_the_run_kimi_lab_run_names(tmp_path, monkeypatch):
    """notebooks/inspect_run.ipynb runs on the run KIMI_LAB_RUN names, wherever it is (not only under outputs/)."""
    pytest.importorskip("matplotlib", reason="plots need the `report` extra (matplotlib)")
    run = tmp_path / "run"
    train(compose_config(["trainer.max_steps=2", "trainer.val_check_interval=2", "logger.tensorboard=false"],
                         output_dir=run))
    outputs = run_notebook("inspect_run.ipynb", {"KIMI_LAB_RUN": str(run)}, tmp_path, monkeypatch)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert str(run) in "".join(o.get("text", "") for o in outputs)
