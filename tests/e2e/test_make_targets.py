"""Makefile targets as a subprocess: `make install` picks the torch build for DEVICE (dry run, `make -n`); `make help`
lists `make clean`, which names each folder it would delete (outputs/, dated multirun/ folders), deletes nothing
without FORCE=1, and keeps other multirun/ folders and reports/."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import REPO_ROOT


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
