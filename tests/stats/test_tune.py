"""The tune -> confirm protocol: kimi_lab.stats.tune on synthetic tune sweeps with known numbers (tuning.csv against
hand computations, edges, diverged cells, seeds, the confirm command), the ``${tuned_lr:...}`` resolver through
Hydra's compose, and confirm_notes for a confirm sweep's report."""

from __future__ import annotations

import csv
import json
import shlex
import statistics
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf.errors import InterpolationResolutionError

from kimi_lab.stats import tune_command
from kimi_lab.stats.collect import arm_label, collect_sweep
from kimi_lab.stats.tune import confirm_notes, main, tune_sweep, write_tuning
from tests.helpers import CONF_DIR
from tests.synthetic import TUNE_VAL, write_confirm_sweep, write_run, write_tune_sweep


def _rows(path: Path) -> dict[tuple[str, float], dict]:
    with path.open(newline="") as f:
        return {(r["arm"], float(r["lr"])): r for r in csv.DictReader(f)}


def _by_optimizer(tuned: dict) -> dict[str, float]:
    """tuned_lr.json's arms {"optimizer=adam": lr} as {"adam": lr}."""
    return {label.removeprefix("optimizer="): lr for label, lr in tuned["arms"].items()}


def _tune(tmp_path: Path, sweep: Path, *flags: str) -> Path:
    out = tmp_path / "rep"
    assert main([str(sweep), "--out", str(out), "--no-plots", *flags]) == 0
    return out


# ---------------------------------------------------------------- tuning.csv, best, edges


def test_tuning_csv_equals_hand_computation(tmp_path):
    out = _tune(tmp_path, write_tune_sweep(tmp_path))
    rows = _rows(out / "tuning.csv")
    assert len(rows) == 6
    for (opt, lr), losses in TUNE_VAL.items():
        row = rows[f"optimizer={opt}", float(lr)]
        assert int(row["n"]) == 3 and row["seeds"] == "1 2 3"
        assert float(row["val_loss_mean"]) == pytest.approx(statistics.mean(losses), abs=1e-12)
        assert float(row["val_loss_sd"]) == pytest.approx(statistics.stdev(losses), abs=1e-12)
        assert (row["diverged"], row["failed"], row["eligible"]) == ("0", "0", "True")
    best = {arm: float(lr) for (arm, lr), r in rows.items() if r["best"] == "True"}
    assert best == {"optimizer=adam": 0.002, "optimizer=adamw": 0.004}  # lowest mean per arm (3.00, 2.97)
    edges = {arm for (arm, _), r in rows.items() if r["edge"] == "True"}
    assert edges == {"optimizer=adamw"}  # 0.004 is the top of adamw's grid; adam's 0.002 is bracketed
    tuned = json.loads((out / "tuned_lr.json").read_text())
    assert tuned["keys"] == ["optimizer"] and tuned["arms"] == best and tuned["metric"] == "val_loss"
    assert tuned["tuning_seeds"] == [1, 2, 3] and tuned["edge"] == {"optimizer=adamw": "high"}
    assert Path(tuned["tuning_sweep"]).is_absolute()
    confirm = write_confirm_sweep(tmp_path, out / "tuned_lr.json", _by_optimizer(tuned), (4,), [1, 2, 3],
                                  tuned["tuning_sweep"])
    assert set(tuned["arms"]) == {a.label for a in collect_sweep(confirm).arms}  # the labels a confirm sweep gets


def test_edge_optimum_at_either_end_is_a_loud_warning(tmp_path, capsys):
    values = {**TUNE_VAL, ("adam", "0.001"): (2.90, 2.91, 2.92)}  # adam's optimum now at the bottom of its grid
    out = _tune(tmp_path, write_tune_sweep(tmp_path, values))
    err = capsys.readouterr().err
    tuning = tune_sweep(collect_sweep(write_tune_sweep(tmp_path / "again", values)))
    assert {a.label: (a.edge, a.suggestion()) for a in tuning.arms} == {
        "optimizer=adam": ("low", pytest.approx(0.0005)), "optimizer=adamw": ("high", pytest.approx(0.008))}
    for text in (err, (out / "tuning.md").read_text()):
        assert "arm optimizer=adam: best optimizer.lr 0.001 is the lowest of its grid" in text
        assert "add optimizer.lr=0.0005" in text and "add optimizer.lr=0.008" in text
    assert err.count("WARNING:") == 2
    assert json.loads((out / "tuned_lr.json").read_text())["suggest"] == {"optimizer=adam": 0.0005,
                                                                           "optimizer=adamw": 0.008}


def test_a_cell_with_a_diverged_or_failed_seed_is_never_best(tmp_path):
    """adamw at 0.004 has the lowest mean of its completed seeds (2.97) but seed 2 diverged: 0.002 is best."""
    sweep = write_tune_sweep(tmp_path, status={("adamw", "0.004", 2): "diverged", ("adam", "0.002", 3): "failed"})
    rows = _rows(_tune(tmp_path, sweep) / "tuning.csv")
    bad = rows["optimizer=adamw", 0.004]
    assert (bad["n"], bad["diverged"], bad["failed"], bad["eligible"], bad["best"]) == ("2", "1", "0", "False", "False")
    assert float(bad["val_loss_mean"]) == pytest.approx((2.95 + 2.99) / 2) and bad["note"] == "seed 2 diverged"
    assert rows["optimizer=adamw", 0.002]["best"] == "True" and rows["optimizer=adamw", 0.002]["edge"] == "False"
    failed = rows["optimizer=adam", 0.002]
    assert (failed["failed"], failed["best"], failed["note"]) == ("1", "False", "seed 3 not completed")
    assert rows["optimizer=adam", 0.001]["best"] == "True"  # 3.10 < 3.20, and the bottom edge now


def test_an_arm_with_no_eligible_lr_is_left_out_of_the_confirm_sweep(tmp_path, capsys):
    status = {("adamw", lr, 1): "diverged" for lr in ("0.001", "0.002", "0.004")}
    out = _tune(tmp_path, write_tune_sweep(tmp_path, status=status))
    assert json.loads((out / "tuned_lr.json").read_text())["arms"] == {"optimizer=adam": 0.002}
    assert "optimizer=adam" in shlex.split((out / "confirm_command.txt").read_text())
    assert ("WARNING: arm optimizer=adamw: no LR with every tuning seed completed (0.001: seed 1 diverged; 0.002: "
            "seed 1 diverged; 0.004: seed 1 diverged): no tuned LR") in capsys.readouterr().err


# ---------------------------------------------------------------- the confirm command


def test_confirm_command_parsed_back(tmp_path):
    sweep = write_tune_sweep(tmp_path)
    out = _tune(tmp_path, sweep)
    line = (out / "confirm_command.txt").read_text()
    assert line.count("\n") == 1
    tokens = shlex.split(line)
    assert tokens[:3] == ["python", "train.py", "-m"]
    items = tokens[3:]
    tuned_json = (out / "tuned_lr.json").resolve()
    assert items == ["model=tiny", "optimizer=adam,adamw", f"optimizer.lr=${{tuned_lr:{tuned_json}}}", "seed=4,5,6,7,8",
                     "report.tuning_seeds=[1,2,3]", f"report.tuning_sweep={sweep.resolve()}",
                     f"hydra.sweep.dir={sweep.resolve()}_confirm"]
    parsed = {o.get_key_element(): o for o in OverridesParser.create().parse_overrides(items)}
    assert list(parsed["seed"].sweep_string_iterator()) == ["4", "5", "6", "7", "8"]
    lr = parsed["optimizer.lr"]
    assert lr.value() == f"${{tuned_lr:{tuned_json}}}" and not lr.is_sweep_override()
    assert parsed["report.tuning_seeds"].value() == [1, 2, 3]


def test_confirm_command_carries_the_launcher_not_the_sweep_folder(tmp_path):
    sweep = write_tune_sweep(tmp_path)
    multirun = yaml.safe_load((sweep / "multirun.yaml").read_text())
    multirun["hydra"]["overrides"]["hydra"] = ["hydra.sweep.dir=/old", "hydra.mode=MULTIRUN", "hydra/launcher=gpu_pool"]
    multirun["hydra"]["overrides"]["task"].append("sweep.skip_completed=true")
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    tuning = tune_sweep(collect_sweep(sweep))
    assert tune_command.carried_overrides(tuning) == ["hydra/launcher=gpu_pool", "model=tiny"]


def test_confirm_seeds_are_disjoint_from_the_tuning_seeds(tmp_path, capsys):
    sweep = write_tune_sweep(tmp_path)
    assert tune_command.confirm_seeds([1, 2, 3], None) == [4, 5, 6, 7, 8]
    assert tune_command.confirm_seeds(list(range(1, 8)), None) == list(range(8, 15))  # as many as the tuning seeds
    out = _tune(tmp_path, sweep, "--confirm-seeds", "11,12")
    assert "seed=11,12" in shlex.split((out / "confirm_command.txt").read_text())
    assert main([str(sweep), "--out", str(tmp_path / "x"), "--no-plots", "--confirm-seeds", "3,11"]) == 2
    assert "error: --confirm-seeds 3,11 share seed(s) 3 with the tuning seeds 1, 2, 3" in capsys.readouterr().err
    assert main([str(sweep), "--no-plots", "--confirm-seeds", "11,a"]) == 2
    assert "--confirm-seeds 11,a: allowed: comma-separated integers" in capsys.readouterr().err


def test_a_study_tune_experiment_becomes_its_confirm_experiment(tmp_path, monkeypatch, capsys):
    """experiment=study_tune -> experiment=study_confirm where conf/experiment/study_confirm.yaml exists; its declared
    seeds are the default confirm seeds (and refused when they are tuning seeds)."""
    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    confirm_yaml = conf / "experiment" / "study_confirm.yaml"
    confirm_yaml.write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n      seed: 11,12,13\n")
    monkeypatch.setattr(tune_command, "CONF_DIR", conf)
    sweep = write_tune_sweep(tmp_path, extra=("experiment=study_tune",))
    tuning = tune_sweep(collect_sweep(sweep))
    assert tune_command.carried_overrides(tuning) == ["model=tiny", "experiment=study_confirm"]
    assert "seed=11,12,13" in shlex.split((_tune(tmp_path, sweep) / "confirm_command.txt").read_text())
    confirm_yaml.write_text("hydra:\n  sweeper:\n    params:\n      seed: range(1,9)\n")
    assert main([str(sweep), "--no-plots", "--out", str(tmp_path / "x")]) == 2
    assert "the confirm experiment's seeds 1,2,3,4,5,6,7,8 share seed(s) 1, 2, 3" in capsys.readouterr().err
    other = tune_sweep(collect_sweep(write_tune_sweep(tmp_path / "b", extra=("experiment=other_tune",))))
    assert tune_command.carried_overrides(other) == ["model=tiny", "experiment=other_tune"]  # no other_confirm.yaml


# ---------------------------------------------------------------- errors


def test_bad_sweeps_fail_with_one_line(tmp_path, capsys):
    flat = write_tune_sweep(tmp_path / "flat")
    for job in flat.iterdir():  # every job at one lr: no lr axis
        if job.is_dir():
            overrides = [o.replace("0.002", "0.001").replace("0.004", "0.001")
                         for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())]
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
            results = json.loads((job / "results.json").read_text())
            (job / "results.json").write_text(json.dumps(results | {"overrides": overrides}))
    (flat / "multirun.yaml").unlink()
    assert main([str(flat), "--no-plots"]) == 2
    assert "no optimizer.lr axis (swept keys: optimizer)" in capsys.readouterr().err

    lopsided = tmp_path / "lopsided"  # adamw ran at one lr only
    for index, (opt, lr) in enumerate((("adam", "0.001"), ("adam", "0.002"), ("adamw", "0.001"))):
        write_run(lopsided / str(index), lr, 1, "completed", 3.0, extra=(f"optimizer={opt}",))
    assert main([str(lopsided), "--no-plots"]) == 2
    assert "error: arm optimizer=adamw: 1 learning rate (0.001); allowed: >= 2" in capsys.readouterr().err

    failed = write_tune_sweep(tmp_path / "failed", status={(o, lr, s): "failed" for o in ("adam", "adamw")
                                                           for lr in ("0.001", "0.002", "0.004") for s in (1, 2, 3)})
    assert main([str(failed), "--no-plots"]) == 2
    assert "no completed run with a finite val_loss (18 jobs: 18 failed)" in capsys.readouterr().err
    assert main([str(write_tune_sweep(tmp_path / "m")), "--no-plots", "--metric", "loss_spikes"]) == 2
    assert "--metric loss_spikes: allowed:" in capsys.readouterr().err


# ---------------------------------------------------------------- the resolver


@pytest.fixture
def hydra_job():
    """compose(...) -> the config of a job with HydraConfig set as in a run; HydraConfig is cleared afterwards."""
    def _compose(overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["model=tiny", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        return cfg
    yield _compose
    HydraConfig.instance().cfg = None


def test_tuned_lr_resolver_gives_each_arm_its_lr(tmp_path, hydra_job):
    """A tuned_lr.json written by tune for ``optimizer`` x ``norm.eps``: a job whose choice and value match an arm
    (the number spelled otherwise) gets that arm's lr; the labels are collect's arm labels."""
    for eps, shift in (("1e-6", 0.0), ("1e-8", 0.1)):  # one sweep per eps, each optimizer=adam,adamw x 3 lrs
        write_tune_sweep(tmp_path / "s", name=f"eps{eps}", extra=(f"norm.eps={eps}",),
                         values={(o, lr): tuple(v + shift for v in vs) for (o, lr), vs in TUNE_VAL.items()})
    sweep = collect_sweep(tmp_path / "s")
    _, tuning, _ = write_tuning(sweep.path, tmp_path / "rep", plots=False)
    path = (tmp_path / "rep" / "tuned_lr.json").resolve()
    tuned = json.loads(path.read_text())
    assert tuned["keys"] == ["norm.eps", "optimizer"]
    assert set(tuned["arms"]) == {arm_label({"norm.eps": e, "optimizer": o}) for e in ("1e-06", "1e-08")
                                  for o in ("adam", "adamw")}
    cases = {("adam", "0.000001"): 0.002, ("adamw", "1e-6"): 0.004, ("adamw", "1.0e-08"): 0.004}
    for (opt, eps), lr in cases.items():
        cfg = hydra_job([f"optimizer={opt}", f"norm.eps={eps}", f"optimizer.lr=${{tuned_lr:{path}}}"])
        assert cfg.optimizer.lr == lr and isinstance(cfg.optimizer.lr, float)
    cfg = hydra_job(["optimizer=muon", "norm.eps=1e-6", f"optimizer.lr=${{tuned_lr:{path}}}"])
    with pytest.raises(InterpolationResolutionError, match=r"tuned_lr: arm 'norm.eps=1e-06, optimizer=muon' is not in "
                                                            r".*; its arms: norm.eps=1e-06, optimizer=adam; "):
        _ = cfg.optimizer.lr
    cfg = hydra_job([f"optimizer.lr=${{tuned_lr:{tmp_path / 'nowhere.json'}}}"])
    with pytest.raises(InterpolationResolutionError, match="nowhere.json not found"):
        _ = cfg.optimizer.lr


# ---------------------------------------------------------------- a confirm sweep's report notes


def _tuned_then_confirmed(tmp_path):
    """(tune sweep, its confirm sweep on seeds 3, 4: seed 3 is also a tuning seed) in the real folder format."""
    sweep = write_tune_sweep(tmp_path)
    out = _tune(tmp_path, sweep)
    tuned = json.loads((out / "tuned_lr.json").read_text())
    return sweep, write_confirm_sweep(tmp_path, (out / "tuned_lr.json").resolve(), _by_optimizer(tuned), (3, 4),
                                      tuned["tuning_seeds"], tuned["tuning_sweep"])


def test_confirm_notes_table_and_warnings(tmp_path):
    sweep, confirm = _tuned_then_confirmed(tmp_path)
    lines, warnings = confirm_notes(collect_sweep(confirm))
    assert lines[0] == "## Tuned LRs"
    assert f"| `optimizer=adam` | 0.002 | `optimizer=adam` | `{sweep.resolve()}` | no |" in lines
    assert f"| `optimizer=adamw` | 0.004 | `optimizer=adamw` | `{sweep.resolve()}` | yes: high |" in lines
    assert len(warnings) == 1  # the seed overlap is the report settings' warning (test_verdicts)
    assert "arm optimizer=adamw: its tuned LR is the highest of its tuning grid (0.001, 0.002, 0.004)" in warnings[0]
    assert "add optimizer.lr=0.008" in warnings[0]
    assert confirm_notes(collect_sweep(sweep)) == ([], [])  # not a confirm sweep


def test_report_of_a_confirm_sweep_shows_the_tuned_lrs_and_warns_once_per_problem(tmp_path):
    from kimi_lab.stats.report import write_report

    sweep, confirm = _tuned_then_confirmed(tmp_path)
    report, _, comp = write_report(confirm, tmp_path / "report", plots=False)
    text = (report / "report.md").read_text()
    assert "## Tuned LRs" in text and "| `optimizer=adamw` | 0.004 |" in text
    assert sum("also tuning seeds" in w for w in comp.warnings) == 1  # the seed overlap, said once
    assert any("highest of its tuning grid" in w for w in comp.warnings)


def test_confirm_notes_map_an_added_key_to_its_tuned_arm(tmp_path):
    """A confirm sweep that adds norm.eps (each eps at its optimizer's tuned LR): rows name the tuned arm, and the
    edge warning of adamw comes once."""
    out = _tune(tmp_path, write_tune_sweep(tmp_path))
    tuned = json.loads((out / "tuned_lr.json").read_text())
    confirm = write_confirm_sweep(tmp_path, (out / "tuned_lr.json").resolve(), _by_optimizer(tuned), (4, 5),
                                  tuned["tuning_seeds"], tuned["tuning_sweep"], axis=("norm.eps=1e-6", "norm.eps=1e-8"))
    lines, warnings = confirm_notes(collect_sweep(confirm))
    rows = [line for line in lines if line.startswith("| `optimizer=")]
    assert [r.split(" | ")[:3] for r in rows] == [
        ["| `optimizer=adam, norm.eps=1e-06`", "0.002", "`optimizer=adam`"],
        ["| `optimizer=adam, norm.eps=1e-08`", "0.002", "`optimizer=adam`"],
        ["| `optimizer=adamw, norm.eps=1e-06`", "0.004", "`optimizer=adamw`"],
        ["| `optimizer=adamw, norm.eps=1e-08`", "0.004", "`optimizer=adamw`"]]
    assert len(warnings) == 1 and warnings[0].startswith("arm optimizer=adamw: its tuned LR is the highest")
