"""Front-door errors of the export and evaluation CLIs are one line naming what to do (a missing folder, a folder
that is not a run), and the two CLIs share their checkpoint flag."""

from __future__ import annotations

import pytest

from kimi_lab.cli import CKPT_DEFAULT
from tests.helpers import assert_one_error_line, run_python


@pytest.mark.parametrize(("args", "fragments"), [
    (["-m", "kimi_lab.export", "--import", "/nonexistent", "out"], ["--import /nonexistent", "no config.json"]),
    (["-m", "kimi_lab.export", "/nonexistent", "out"], ["/nonexistent: no such folder", "a run folder"]),
    (["-m", "kimi_lab.evaluation", "/nonexistent"], ["/nonexistent: no such folder", "a run folder"]),
], ids=["export-import", "export", "evaluation"])
def test_missing_folders_are_one_line(args, fragments, tmp_path):
    proc = run_python(args, cwd=tmp_path)
    assert_one_error_line(proc, *fragments)
    assert proc.returncode == 1 and list(tmp_path.iterdir()) == []  # nothing written


def test_evaluation_names_a_folder_that_is_not_a_run(tmp_path):
    assert_one_error_line(run_python(["-m", "kimi_lab.evaluation", str(tmp_path)]), "not a kimi-lab run folder",
                          "config_resolved.yaml")


def test_export_and_evaluation_share_the_checkpoint_flag():
    from kimi_lab.evaluation.__main__ import parse_args as evaluation_args
    from kimi_lab.export.__main__ import parse_args as export_args

    assert CKPT_DEFAULT == "last"
    assert export_args(["run", "out"]).ckpt == evaluation_args(["run"]).ckpt == CKPT_DEFAULT
    assert export_args(["run", "out", "--ckpt", "best"]).ckpt == evaluation_args(["run", "--ckpt", "best"]).ckpt
    assert evaluation_args(["run", "--checkpoint", "x.ckpt"]).ckpt == "x.ckpt"  # the older name, same flag
