"""kimi_lab.stats.collect on synthetic sweeps with known contents: every job listed and grouped into arms (relaunches,
other spellings, reruns of diverged seeds), unreadable files and grids Hydra cannot expand listed rather than fatal,
divergence flagged from the losses, and jobs on other data or code warned."""

from __future__ import annotations

import json
import math

import yaml

from kimi_lab.stats import collect_sweep, compare_sweep
from kimi_lab.stats.collect import read_job, read_metrics_csv
from kimi_lab.stats.report import verdict, write_report
from tests.helpers import csv_rows
from tests.synthetic import LRS, VAL, write_divergent_sweep, write_run


def test_collect_lists_every_job_and_groups_arms(sweep_dir):
    sweep = collect_sweep(sweep_dir)
    assert sweep.factors == {"optimizer.lr": LRS}  # model=tiny is not swept, seed pairs arms
    assert [a.label for a in sweep.arms] == [f"optimizer.lr={lr}" for lr in LRS]
    status = {j.name: j.status for j in sweep.jobs}
    assert status == {**{str(i): "completed" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)}, "7": "failed", "10": "running",
                      "11": "missing", "rerun/0": "duplicate"}
    assert [len(a.completed) for a in sweep.arms] == [3, 3, 2, 1]


def test_relaunch_with_skip_completed_does_not_split_arms(sweep_dir):
    """A relaunch adds sweep.skip_completed to the jobs it touched and to multirun.yaml, a resumed job resume=true:
    run control, not factors, no arm of their own."""
    for name, item in (("0", "+sweep.skip_completed=true"), ("1", "sweep.skip_completed=true"),
                       ("3", "~sweep.skip_completed"), ("4", "++sweep.skip_completed=True"), ("6", "resume=true")):
        path = sweep_dir / name / ".hydra" / "overrides.yaml"
        path.write_text(yaml.safe_dump([*yaml.safe_load(path.read_text()), item]))
    multirun = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
    multirun["hydra"]["overrides"]["task"].append("sweep.skip_completed=true")
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    sweep = collect_sweep(sweep_dir)
    assert sweep.factors == {"optimizer.lr": LRS} and [len(a.completed) for a in sweep.arms] == [3, 3, 2, 1]
    assert [j.name for j in sweep.jobs if j.status == "missing"] == ["11"]  # the grid ignores the key too


def test_other_spellings_of_a_setting_join_its_arm(tmp_path):
    """`++k=v` sets the same key as `k=v`; `theta=10000` is the setting a sweep writes `10000.0` (from `1e4`): a
    hand re-run in either spelling lands in the sweep's arm, not in a factor or an arm of its own."""
    for seed in (1, 2):
        write_run(tmp_path / f"a{seed}", "0.001", seed, "completed", 3.0 + seed / 100, extra=("rope.theta=1e4",))
        write_run(tmp_path / f"b{seed}", "0.001", seed, "completed", 3.1 + seed / 100, extra=("rope.theta=5e4",))
    write_run(tmp_path / "a3", "0.001", 3, "completed", 3.03, extra=("rope.theta=10000",))
    write_run(tmp_path / "b3", "0.001", 3, "completed", 3.13, extra=("++rope.theta=50000",))
    sweep = collect_sweep(tmp_path)
    assert sweep.factors == {"rope.theta": ["10000.0", "50000.0"]}
    assert [len(a.completed) for a in sweep.arms] == [3, 3]
    assert compare_sweep(sweep, baseline="rope.theta=50000").baseline == "rope.theta=50000.0"


def test_a_diverged_seed_rerun_until_it_completes_is_still_flagged(tmp_path):
    """Re-running a diverged seed until it finishes flatters the arm as dropping it does: its rows say so."""
    for seed in (1, 2, 3):
        write_run(tmp_path / f"a{seed}", "0.001", seed, "completed", 3.0 + seed / 100)
        write_run(tmp_path / f"b{seed}", "0.008", seed, "completed", 2.9 + seed / 100)
    write_run(tmp_path / "b2-first", "0.008", 2, "diverged", diverge_at=5)
    sweep = collect_sweep(tmp_path)
    row = next(r for r in compare_sweep(sweep).rows if r["metric"] == "val_loss")
    assert "arm optimizer.lr=0.008: seed 2 diverged (job b2-first), its re-run completed (job b2)" in row["warning"]


def test_the_baseline_rule_says_when_no_arm_has_every_first_value(tmp_path):
    """Two one-key sweeps in one folder: (lr=1e-3, theta default) and (lr default, theta=1e4) arms, none with the
    first value of both keys: the rule must not claim it picked 'the first value of each swept factor'."""
    for seed in (1, 2):
        write_run(tmp_path / f"lr{seed}", "0.001", seed, "completed", 3.0)
        write_run(tmp_path / f"lr2-{seed}", "0.002", seed, "completed", 3.1)
    (tmp_path / "theta").mkdir()
    for seed in (1, 2):
        job = tmp_path / "theta" / str(seed)
        write_run(job, "0.001", seed, "completed", 3.2, extra=("rope.theta=1e4",))
        overrides = ["model=tiny", "rope.theta=1e4", f"seed={seed}"]  # no lr: the default
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        results = json.loads((job / "results.json").read_text())
        (job / "results.json").write_text(json.dumps({**results, "overrides": overrides}))
    comp = compare_sweep(collect_sweep(tmp_path))
    assert comp.baseline_rule.startswith("the first arm: no arm has the first value of every swept factor")


def test_a_finished_job_is_identified_by_its_results_not_a_rewritten_hydra_folder(sweep_dir):
    """A refused relaunch with another grid still has Hydra rewrite the folder's .hydra/overrides.yaml: the job's
    identity is the one its results.json records, so it neither lands in a wrong arm nor pushes out a real run."""
    rewritten = sweep_dir / "0" / ".hydra" / "overrides.yaml"
    rewritten.write_text(yaml.safe_dump(["model=tiny", "optimizer.lr=0.002", "seed=1"]))
    sweep = collect_sweep(sweep_dir)
    assert next(j for j in sweep.jobs if j.name == "0").overrides["optimizer.lr"] == "0.001"
    assert [len(a.completed) for a in sweep.arms] == [3, 3, 2, 1]
    assert not [j for j in sweep.jobs if j.status == "duplicate" and j.name != "rerun/0"]


def test_a_metric_an_arm_does_not_have_is_not_an_exclusion_warning(tmp_path):
    """A dense arm records no expert load: its expert_load_cv row has n = 0 ('nothing to compare'), and no
    'completed run(s) excluded' warning, which is for runs of an arm that has the metric elsewhere."""
    for seed in (1, 2):
        write_run(tmp_path / f"moe{seed}", "0.001", seed, "completed", 3.0, extra=("moe=greedy",))
        write_run(tmp_path / f"dense{seed}", "0.001", seed, "completed", 3.1, extra=("moe=dense",))
        results = json.loads((tmp_path / f"moe{seed}" / "results.json").read_text())
        (tmp_path / f"moe{seed}" / "results.json").write_text(json.dumps({**results, "expert_load_cv": [0.1 * seed]}))
    row = next(r for r in compare_sweep(collect_sweep(tmp_path)).rows if r["metric"] == "expert_load_cv")
    assert 0 in (row["n_a"], row["n_b"]) and "excluded" not in row["warning"]


def test_unreadable_job_files_are_listed_not_fatal(sweep_dir, tmp_path):
    """A half-written overrides.yaml, a results.json or status.json that is JSON but not an object, results without
    status.json: each job is listed as unreadable (with the reason) and the report is still written."""
    for name, (file, text) in {"7": (".hydra/overrides.yaml", "- model=tiny\n- 'optimizer.lr=0.0"),
                               "1": ("results.json", "[1, 2]"), "2": ("status.json", "[]")}.items():
        (sweep_dir / name / file).write_text(text)  # 7 failed (no results.json): its overrides.yaml names it
    (sweep_dir / "3" / "status.json").unlink()
    jobs = {j.name: j for j in collect_sweep(sweep_dir).jobs if j.status == "unreadable"}  # (and the grid's 7th
    assert sorted(jobs) == ["1", "2", "3", "7"]  # job, which no readable folder holds, is listed as missing)
    assert "overrides.yaml" in jobs["7"].error and "results.json without status.json" in jobs["3"].error
    write_report(sweep_dir, tmp_path / "report", plots=False)
    assert "unreadable" in (tmp_path / "report" / "report.md").read_text()


def test_a_sweep_grid_hydra_cannot_expand_here_is_skipped(sweep_dir):
    """glob(...) needs the config tree to expand: the report reads the jobs and lists none as never started."""
    multirun = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
    multirun["hydra"]["overrides"]["task"].append("model=glob(*)")
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    sweep = collect_sweep(sweep_dir)
    assert [len(a.completed) for a in sweep.arms] == [3, 3, 2, 1]
    assert not [j for j in sweep.jobs if j.status == "missing"]


def test_diverged_jobs_are_listed_counted_per_arm_and_flagged(tmp_path):
    out, sweep, comp = write_report(write_divergent_sweep(tmp_path), tmp_path / "rep", plots=False)
    jobs = {j.name: j for j in sweep.jobs}
    assert (jobs["4"].status, jobs["4"].diverged_at_step, jobs["4"].error) == ("diverged", 7, "diverged at step 7")
    assert (jobs["5"].status, jobs["5"].diverged_at_step) == ("diverged", 8)  # an older run: "completed", NaN val
    assert jobs["5"].error.startswith("diverged at step 8 (recorded as completed: val_loss nan, test_loss nan")
    unstable = sweep.arm("optimizer.lr=0.008")
    assert [j.name for j in unstable.completed] == ["3"] and [j.seed for j in unstable.diverged] == [2, 3]
    val = next(r for r in comp.rows if r["metric"] == "val_loss")
    assert (val["n_a"], val["mean_a"], val["seeds_a"]) == (1, VAL["0.008", 1], "1")  # diverged seeds: in no mean
    warning = ("arm optimizer.lr=0.008: 2 of 3 seeds diverged (seed 2 at step 7, seed 3 at step 8) and are not in "
               "the mean, which flatters it")
    assert {r["warning"] for r in comp.rows} == {warning} and comp.censored == {}
    md = (out / "report.md").read_text()
    assert "## Jobs not counted (2)" in md and "| 4 | optimizer.lr=0.008 | 2 | diverged | diverged at step 7 |" in md
    assert f"## Warnings (1)\n\n- **{warning}**" in md and "No value for" not in md
    assert "| `optimizer.lr=0.001` | 3 | 3 | 0 | 0 | 1 2 3 |" in md  # jobs, completed, diverged, failed/other, seeds
    assert "| `optimizer.lr=0.008` | 3 | 1 | 2 | 0 | 1 |" in md
    assert f"estimate only, no test (needs >= 2 runs per arm): inconclusive (confirmatory). Warning: {warning}." in md
    report = json.loads((out / "report.json").read_text())
    assert report["arms"][1]["diverged_seeds"] == [2, 3] and report["warnings"] == [warning]
    assert [j["diverged_at_step"] for j in report["jobs"]] == [None, None, None, None, 7, 8]
    assert csv_rows(out / "comparisons.csv")[0]["warning"] == warning
    against = compare_sweep(sweep, baseline="optimizer.lr=8e-3")  # the unstable arm as baseline: still flagged
    assert {r["warning"] for r in against.rows} == {warning}
    assert verdict(against.rows[0], 0.05).endswith(f"Warning: {warning}.")


def test_non_finite_train_loss_is_read_and_marks_an_older_completed_run_diverged(tmp_path):
    from kimi_lab.stats.metrics import stability

    write_run(tmp_path / "job", "0.001", 1, "completed", 3.0)
    csv_path = tmp_path / "job" / "metrics.csv"
    lines = csv_path.read_text().splitlines()
    assert lines[4] == "4,400,4,2.0,5.7,1.0,"
    csv_path.write_text("\n".join([*lines[:4], "4,400,4,2.0,inf,1.0,", *lines[5:]]) + "\n")
    train, val = read_metrics_csv(csv_path)
    assert [r["step"] for r in train] == list(range(1, 11)) and math.isinf(train[3]["train_loss"]) and len(val) == 2
    job = read_job(tmp_path / "job", "job")  # final val loss finite, status completed: the curve says diverged
    assert (job.status, job.diverged_at_step) == ("diverged", 4) and "train_loss non-finite at step 4" in job.error
    nan_job = read_job(write_divergent_sweep(tmp_path) / "4", "4")  # NaN from step 7: steps 7..10 are spikes
    assert len(nan_job.train_rows) == 10 and stability(nan_job)[1] == 4


def test_jobs_on_different_data_or_code_are_warned(sweep_dir, tmp_path):
    def edit(name: str, **fields) -> None:
        path = sweep_dir / name / "results.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | fields))

    edit("0", git_commit="0123abc+dirty")
    _, _, _ = write_report(sweep_dir, tmp_path / "code", plots=False)
    report = json.loads((tmp_path / "code" / "report.json").read_text())
    assert report["warnings"] == [
        "jobs ran on different code (git_commit): `0123abc+dirty`: 1 job(s) (0); "
        "`c90c2add7571d7a6af90a35972d26043ccc5453e`: 8 job(s) (1, 2, 3, 4, 5, 6, 8, 9)"]
    edit("4", data_manifest_key="ffff00000000")
    edit("5", data_manifest_key=None)
    out, _, _ = write_report(sweep_dir, tmp_path / "data", plots=False)
    report = json.loads((out / "report.json").read_text())
    assert report["provenance"]["data_manifest_key"] == {
        "88c13da1a57a": ["0", "1", "2", "3", "6", "8", "9"], "ffff00000000": ["4"], "(not recorded)": ["5"]}
    assert report["warnings"][0].startswith("jobs ran on different data (data_manifest_key): arm differences may be")
    md = (out / "report.md").read_text()
    assert "## Warnings (2)" in md and "`ffff00000000`: 1 job(s) (4)" in md and "different code (git_commit)" in md
