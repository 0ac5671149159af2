"""Logger runs (tiny, offline): CSV, TensorBoard, MLflow's file store and wandb's offline run each hold the train
loss, validation loss and learning rate at the optimizer steps metrics.csv gives them."""

from __future__ import annotations

import csv
import glob
import time

import pytest
import yaml

from kimi_lab.training import train
from kimi_lab.training.loggers import mlflow_tracking_uri
from tests.helpers import compose_config, read_metrics

# warmup 2: the lr changes every step, so a curve one step off cannot match; host reads every 2 steps, rows (and
# logger points) for every step
RUN = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=2", "data.eval_lengths=[]",
       "optimizer.warmup_steps=2", "seed=0"]


def _expected(run_dir) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of metrics.csv's train loss, validation loss and learning rate."""
    train_rows, val_rows = read_metrics(run_dir)
    return {"train/loss": [(int(r["step"]), float(r["train_loss"])) for r in train_rows],
            "val_loss": [(int(r["step"]), float(r["val_loss"])) for r in val_rows],
            "lr": [(int(r["step"]), float(r["lr"])) for r in train_rows]}


def _lr_key(keys) -> str:
    """The first param group's lr (metrics.csv's lr column): ``lr-AdamW`` or ``lr-AdamW/pg1``."""
    return next(k for k in sorted(keys) if k.startswith("lr-") and (k.endswith("/pg1") or "/" not in k))


def _assert_same_curves(got: dict[str, list[tuple[int, float]]], expected: dict, rel: float = 0.0) -> None:
    for name, points in expected.items():
        assert [s for s, _ in got[name]] == [s for s, _ in points], name
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in points], rel=rel, abs=0), name


def test_csv_and_tensorboard_loggers_hold_metrics_csv_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(compose_config(["logger=csv", "logger.tensorboard=true", *RUN], output_dir=tmp_path))
    expected = _expected(tmp_path)
    assert len(expected["train/loss"]) == 4 and [s for s, _ in expected["val_loss"]] == [2, 4]

    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    lr_key = _lr_key(rows[0].keys())
    logged = {name: [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
              for name, key in (("train/loss", "train/loss"), ("val_loss", "val_loss"), ("lr", lr_key))}
    _assert_same_curves(logged, expected)  # CSV keeps Python's float repr: exact
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["model"]["d_model"] == 64 and hparams["logger"]["name"] == "csv"  # the resolved config

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    scalars = {name: [(e.step, e.value) for e in events.Scalars(tag)]
               for name, tag in (("train/loss", "train/loss"), ("val_loss", "val_loss"), ("lr", _lr_key(tags)))}
    _assert_same_curves(scalars, expected, rel=1e-6)  # TensorBoard stores float32


def test_mlflow_file_store_holds_metrics_csv_curves(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[loggers]')")
    from mlflow.tracking import MlflowClient

    cfg = compose_config(["logger=mlflow", *RUN], output_dir=tmp_path)
    assert mlflow_tracking_uri(cfg, tmp_path) == f"file:{tmp_path.resolve() / 'mlruns'}"
    train(cfg)
    assert not (tmp_path / "tensorboard").exists()
    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("kimi-lab").experiment_id])
    assert run.data.params["model/d_model"] == str(cfg.model.d_model)  # the resolved config as params
    keys = {"train/loss": "train/loss", "val_loss": "val_loss", "lr": _lr_key(run.data.metrics)}
    logged = {name: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                        key=lambda m: m.step)] for name, key in keys.items()}
    _assert_same_curves(logged, _expected(tmp_path))


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[loggers]')")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        train(compose_config(["logger=wandb", *RUN], output_dir=tmp_path))
    finally:
        wandb.finish()
    (log,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    expected = _expected(tmp_path)
    wanted = [repr(value).encode() for name in ("train/loss", "val_loss") for _, value in expected[name]]
    data = b""
    for _ in range(60):  # wandb's service process writes the file; on a loaded machine it lands after finish()
        data = open(log, "rb").read()  # protobuf records; values are stored as JSON text
        if all(w in data for w in wanted) and b"trainer/global_step" in data:
            break
        time.sleep(0.5)
    assert [w for w in wanted if w not in data] == []
    assert b"trainer/global_step" in data
