"""A tiny training run through the export CLI: `python -m kimi_lab.export RUN OUT` gives a transformers checkpoint
(from_pretrained + AutoTokenizer) with the best checkpoint's logits, `--import` writes a run folder that exports
again, and a run with init_from fine-tunes from it."""

from __future__ import annotations

import json

import pytest
import torch

from kimi_lab.export import export, load_run
from kimi_lab.export.__main__ import main as export_cli
from kimi_lab.training import train
from tests.helpers import EXPORT_TOL, compose_config, logits

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # zero-width shared experts


def test_cli_exports_a_trained_run_and_imports_it_back(tmp_path):
    """A real tiny training run -> `python -m kimi_lab.export RUN OUT` -> from_pretrained + AutoTokenizer; logits
    equal the best checkpoint's; `--import` writes a run folder that exports again and that train.py fine-tunes
    (init_from)."""
    run = tmp_path / "run"
    train(compose_config(["trainer.max_steps=4", "trainer.val_check_interval=2", "optimizer.warmup_steps=1",
                          "trainer.checkpoint_every_n_steps=2", "data.eval_lengths=[]", "logger.tensorboard=false",
                          "trainer.save_checkpoints=best"], output_dir=run))
    out = tmp_path / "hf"
    assert export_cli([str(run), str(out), "--ckpt", "best"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tokenizer.encode("The State of the Union is strong.", add_special_tokens=False)])
    _, ours = load_run(run, "best")
    assert (logits(hf, ids) - logits(ours, ids)).abs().max() <= EXPORT_TOL
    assert (out / "TOKENIZER.md").exists() and hf.config.eos_token_id == tokenizer.eos_token_id == 32767
    assert json.loads((out / "kimi_lab_export.json").read_text())["checkpoint"].rsplit("/", 1)[-1].startswith("best-")

    back = tmp_path / "imported"
    assert export_cli(["--import", str(out), str(back)]) == 0
    _, imported = load_run(back, "last")
    assert (logits(imported, ids) - logits(ours, ids)).abs().max() <= 1e-5
    again = export(back, tmp_path / "hf2", tokenizer=False)  # no best checkpoint in an imported run: last
    assert json.loads((again / "kimi_lab_export.json").read_text())["checkpoint"].endswith("last.ckpt")

    # fine-tune the imported model: train.py with its overrides.txt and init_from (one step at lr 1e-7: the
    # weights start from the import, not from a fresh initialisation)
    overrides = (back / "overrides.txt").read_text().split()
    tuned = tmp_path / "tuned"
    train(compose_config([*overrides, "init_from=" + str(back), "trainer.max_steps=1", "optimizer.lr=1e-7",
                          "optimizer.warmup_steps=0", "data.eval_lengths=[]", "logger.tensorboard=false"],
                         output_dir=tuned))
    _, fine_tuned = load_run(tuned, "last")
    start, after = imported.state_dict(), fine_tuned.state_dict()
    assert max((after[k] - start[k]).abs().max().item() for k in start) < 1e-5
