"""End to end: the run-folder schema, bad configs refused before training (report.primary_metric among them),
determinism, resume, accumulation, sweeps with a failing job, fair arms."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi_lab.config import ConfigError, validate_config
from kimi_lab.training import train
from tests.helpers import DATA_DIR, REPO_ROOT, compose_config, read_metrics, tensorboard_hparams

FAST = ["trainer.max_steps=6", "trainer.val_check_interval=3", "optimizer.warmup_steps=2",
        "trainer.checkpoint_every_n_steps=2"]
RESULT_KEYS = {
    "status", "seed", "overrides", "val_loss", "val_ppl", "val_acc", "best_val_loss", "best_val_ppl",
    "best_val_acc", "test_loss", "test_ppl", "test_acc", "baseline_unigram_loss", "tokens_seen", "train_time_s",
    "tokens_per_s", "step_time_ms", "peak_mem_mb", "params_total", "params_active", "params_embedding",
    "flops_per_token", "attention_kernel", "expert_load", "versions", "git_commit", "malloc", "peak_rss_mb",
    "epochs", "report", "moe_maxvio_val", "moe_maxvio_val_per_layer", "moe_maxvio_batch_late",
    "moe_maxvio_batch_late_per_layer",
}


def run_cli(*args: str, cwd: Path, multirun: bool = False) -> subprocess.CompletedProcess:
    flags = ["-m"] if multirun else []  # Hydra flags must come before the overrides
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), *flags, "model=tiny", f"paths.data_dir={DATA_DIR}", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_cli_run_writes_the_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*FAST, "attention=standard", "norm=layernorm", "seed=0", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert RESULT_KEYS <= results.keys(), RESULT_KEYS - results.keys()
    assert results["status"] == "completed" and results["seed"] == 0
    assert "attention=standard" in results["overrides"]
    assert results["choices"] == {"model": "tiny", "attention": "standard", "norm": "layernorm", "moe": "greedy",
                                  "optimizer": "adamw", "rope": "default", "data": "default", "hardware": "cpu",
                                  "eval": "none", "moe.topk_method": "greedy"}  # options as selected, not names
    assert results["attention_kernel"] == "math_explicit"
    assert results["tokens_seen"] == 6 * 4 * 32
    assert 0 < results["epochs"] < 1 and results["report"]["primary_metric"] == "val_loss"
    assert results["params_active"] < results["params_total"]
    assert len(results["expert_load"]) == 2 and math.isclose(sum(results["expert_load"][0]), 1.0)
    assert results["baseline_unigram_loss"] > 0 and results["val_loss"] > 0
    if platform.libc_ver()[0] == "glibc":  # hardware.malloc_retain's default on CPU; memory = malloc's in-use peak
        assert results["malloc"] == "retain" and results["peak_mem_kind"] == "cpu_peak_malloc_in_use"
        assert 0 < results["peak_mem_mb"] < results["peak_rss_mb"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert (run_dir / ".hydra" / "overrides.yaml").exists() and (run_dir / "config_resolved.yaml").exists()
    assert "${" not in (run_dir / "config_resolved.yaml").read_text()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    hparams = tensorboard_hparams(run_dir / "tensorboard")  # HParams tab: config + final metrics
    assert math.isclose(hparams["hp/val_loss"], results["val_loss"], rel_tol=1e-6)
    assert math.isclose(hparams["hp/test_loss"], results["test_loss"], rel_tol=1e-6)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]  # trainer.save_checkpoints=last
    train_rows, val_rows = read_metrics(run_dir)
    assert [int(r["step"]) for r in train_rows] == list(range(1, 7))
    assert [int(r["step"]) for r in val_rows] == [3, 6]
    assert all(float(r["lr"]) > 0 and float(r["grad_norm"]) > 0 for r in train_rows)
    assert math.isclose(results["val_loss"], float(val_rows[-1]["val_loss"]))


def test_bad_config_fails_early_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("model.d_model=66", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "attention.n_heads=4" in proc.stderr and "allowed:" in proc.stderr
    assert not run_dir.exists()  # a refused single run leaves no folder behind (a sweep job keeps its status.json)


def test_report_primary_metric_names_the_report_metrics(monkeypatch, tmp_path):
    """The allowed names are the report's metrics when validation runs (kimi_lab.stats.metrics), so a metric added
    there is accepted without touching the config layer; a bad name fails train() before anything is built."""
    from kimi_lab.stats import metrics

    with pytest.raises(ConfigError) as info:
        validate_config(compose_config(["report.primary_metric=val_los"]))
    message = str(info.value)
    assert message.startswith("Invalid config: report.primary_metric='val_los'; allowed: ")
    assert all(name in message for name in metrics.METRICS_BY_NAME) and "val_loss@<length>" in message
    for name in ("val_loss@1024", "val_acc", "moe_maxvio_val"):
        validate_config(compose_config([f"report.primary_metric={name}", f"++report.sesoi={{{name}:0.01}}",
                                        "+report.target.val_loss=5.8", "report.tuning_seeds=[0,7]",
                                        "report.tuning_sweep=multirun/tune"]))
    monkeypatch.setitem(metrics.METRICS_BY_NAME, "new_metric", metrics.METRICS_BY_NAME["val_loss"])
    validate_config(compose_config(["report.primary_metric=new_metric"]))
    with pytest.raises(ConfigError, match=r"report\.primary_metric"):
        train(compose_config(["report.primary_metric=bogus"], output_dir=tmp_path))
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "results.json").exists()


def test_same_seed_same_curve_other_seed_other_curve(tmp_path):
    losses = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train(compose_config([*FAST, f"seed={seed}"], output_dir=tmp_path / name))
        train_rows, val_rows = read_metrics(tmp_path / name)
        losses.append([r["train_loss"] for r in train_rows] + [r["val_loss"] for r in val_rows])
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_reproduces_the_uninterrupted_curve(tmp_path, workers):
    """Bit for bit, dropout masks included (the generators' states travel in last.ckpt); interrupted at a validation
    step, whose validation the checkpoint holds. With a loader worker too: it reads the sampler as soon as Lightning
    builds the iterator, so the data position is set before that (else the first steps' data would be replayed)."""
    overrides = ["trainer.max_steps=8", "trainer.val_check_interval=4", "optimizer.warmup_steps=2", "seed=0",
                 "model.dropout=0.1", f"data.num_workers={workers}"]
    train(compose_config(overrides, output_dir=tmp_path / "full"))
    interrupted = train(compose_config([*overrides, "trainer.interrupt_at_step=4"], output_dir=tmp_path / "cut"))
    assert interrupted["status"] == "interrupted"
    assert json.loads((tmp_path / "cut" / "status.json").read_text())["status"] == "interrupted"
    resumed = train(compose_config([*overrides, "resume=true"], output_dir=tmp_path / "cut"))
    assert resumed["status"] == "completed"
    full_train, full_val = read_metrics(tmp_path / "full")
    cut_train, cut_val = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut_train] == [r["step"] for r in full_train]
    for a, b in zip(full_train, cut_train):
        assert (a["train_loss"], a["grad_norm"], a["lr"]) == (b["train_loss"], b["grad_norm"], b["lr"]), (a, b)
    assert [(r["step"], r["val_loss"]) for r in cut_val] == [(r["step"], r["val_loss"]) for r in full_val]
    assert resumed["tokens_seen"] == 8 * 4 * 32


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="resume=true but no checkpoint"):
        train(compose_config(["resume=true"], output_dir=tmp_path / "empty"))
    assert json.loads((tmp_path / "empty" / "status.json").read_text())["status"] == "failed"


def test_schedule_counts_optimizer_steps_under_accumulation(tmp_path):
    overrides = ["trainer.max_steps=6", "trainer.accumulate_grad_batches=3", "trainer.val_check_interval=3",
                 "optimizer.warmup_steps=2", "optimizer.lr=1e-3", "optimizer.min_lr_ratio=0.1"]
    results = train(compose_config(overrides, output_dir=tmp_path / "acc"))
    train_rows, val_rows = read_metrics(tmp_path / "acc")
    assert [int(r["step"]) for r in train_rows] == list(range(1, 7))  # one row per optimizer step
    lrs = [float(r["lr"]) for r in train_rows]  # the lr each optimizer step used
    assert math.isclose(lrs[0], 0.5e-3, rel_tol=1e-9) and math.isclose(lrs[1], 1e-3, rel_tol=1e-9)  # 2 warmup steps
    assert math.isclose(lrs[2], 1e-3, rel_tol=1e-9)  # cosine starts at the peak right after warmup
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))  # then decays once per optimizer step
    assert math.isclose(lrs[-1], 1e-4, rel_tol=1e-9)  # reaches min_lr_ratio * lr exactly at the last step
    assert [int(r["step"]) for r in val_rows] == [3, 6]  # val interval in optimizer steps
    assert results["tokens_seen"] == 6 * 3 * 4 * 32


def test_fair_arms_see_the_same_batches():
    from kimi_lab.data import LMDataModule

    def first_batches(*overrides: str) -> list[torch.Tensor]:
        cfg = compose_config(list(overrides))
        dm = LMDataModule(cfg.data, cache_dir=str(cfg.paths.data_dir), seed=int(cfg.seed), num_train_samples=64)
        dm.prepare_data()
        dm.setup("fit")
        return [x for (x, _), _ in zip(dm.train_dataloader(), range(3))]

    reference = first_batches("seed=2")
    for arm in (["attention=standard"], ["moe=dense"], ["norm=layernorm", "optimizer=adam"], ["rope=linear"]):
        assert all(torch.equal(a, b) for a, b in zip(reference, first_batches("seed=2", *arm))), arm
    assert not torch.equal(reference[0], first_batches("seed=3")[0])


def test_sweep_records_a_failed_job_and_goes_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("trainer.max_steps=2", "trainer.val_check_interval=2", "optimizer.warmup_steps=1",
                   "optimizer.lr=-1,1e-3", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, multirun=True)
    statuses = {}
    for status_file in sweep_dir.glob("*/status.json"):
        overrides = (status_file.parent / ".hydra" / "overrides.yaml").read_text()
        statuses["lr=-1" if "optimizer.lr=-1" in overrides else "ok"] = json.loads(status_file.read_text())
    assert statuses["lr=-1"]["status"] == "failed", proc.stderr[-2000:]
    assert "optimizer.lr" in statuses["lr=-1"]["error"]
    assert statuses["ok"]["status"] == "completed"
    assert not (sweep_dir / "0" / "results.json").exists()
    assert (sweep_dir / "1" / "results.json").exists()


def test_sweeps_land_under_multirun():
    text = (REPO_ROOT / "conf" / "hydra" / "default.yaml").read_text()
    assert "dir: multirun/" in text


def test_loss_falls_on_the_real_corpus(tmp_path):
    overrides = ["trainer.max_steps=40", "trainer.val_check_interval=20", "optimizer.warmup_steps=5",
                 "optimizer.lr=1e-2", "data.batch_size=8"]
    results = train(compose_config(overrides, output_dir=tmp_path / "learn"))
    train_rows, val_rows = read_metrics(tmp_path / "learn")
    first = sum(float(r["train_loss"]) for r in train_rows[:3]) / 3
    last = sum(float(r["train_loss"]) for r in train_rows[-3:]) / 3
    assert last < first - 2.0, (first, last)
    assert float(val_rows[-1]["val_loss"]) < math.log(32768) - 2.0
    assert results["val_acc"] > 0.05


ARMS = [  # options the other end-to-end tests do not train (they compose and build them elsewhere)
    ["ablation=full"], ["ablation=baseline"], ["norm.qk_norm=true"], ["attention=mla", "attention.kernel=flash"],
    ["attention=mla", "attention.kernel=standard", "rope=yarn"], ["moe.topk_method=group_limited_greedy"],
    ["moe.topk_method=aux_tc"], ["rope=dynamic"], ["rope=linear"], ["hardware.precision=bf16-mixed"],
]


@pytest.mark.parametrize("overrides", ARMS, ids=lambda o: ",".join(o))
def test_study_arms_train_end_to_end(tmp_path, overrides):
    """The combined study's arms (full: MLA, DeepSeek-V3 gate, Muon, RMSNorm) and the other options train and
    report: the per-run norm profile once fed every norm a (B, T, d_model) input and crashed every MLA run."""
    results = train(compose_config([*FAST, "trainer.max_steps=2", "trainer.val_check_interval=2", *overrides],
                                   output_dir=tmp_path / "run"))
    assert results["status"] == "completed" and math.isfinite(results["val_loss"])
    assert results["norm_fwd_bwd_ms"] > 0


def test_skip_completed_keeps_finished_jobs_and_reruns_the_rest(tmp_path):
    overrides = ["trainer.max_steps=2", "trainer.val_check_interval=2", "optimizer.warmup_steps=1"]
    done = train(compose_config(overrides, output_dir=tmp_path / "done"))
    stamp = (tmp_path / "done" / "metrics.csv").stat().st_mtime_ns
    again = train(compose_config([*overrides, "sweep.skip_completed=true"], output_dir=tmp_path / "done"))
    assert again == done and (tmp_path / "done" / "metrics.csv").stat().st_mtime_ns == stamp  # not retrained
    resumed = {**done, "overrides": [*done["overrides"], "resume=true"]}  # finished by a resume: the same job
    (tmp_path / "done" / "results.json").write_text(json.dumps(resumed))
    assert train(compose_config([*overrides, "sweep.skip_completed=true"], output_dir=tmp_path / "done")) == resumed
    # a relaunch with another grid puts another job on this folder (numbered by grid position): refused, not trained
    other = {**done, "overrides": ["moe.topk_method=noaux_tc"]}
    (tmp_path / "done" / "results.json").write_text(json.dumps(other))
    before = {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"sweep\.skip_completed=true; .*\(moe\.topk_method=noaux_tc\), this job"):
        train(compose_config([*overrides, "sweep.skip_completed=true"], output_dir=tmp_path / "done"))
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir() if p.is_file()}
    with pytest.raises(ValueError):  # a failed job ...
        train(compose_config([*overrides, "optimizer.lr=-1"], output_dir=tmp_path / "failed"))
    rerun = train(compose_config([*overrides, "sweep.skip_completed=true"], output_dir=tmp_path / "failed"))
    assert rerun["status"] == "completed"  # ... is run again
    assert json.loads((tmp_path / "failed" / "status.json").read_text())["status"] == "completed"
