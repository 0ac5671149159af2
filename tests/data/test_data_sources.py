"""kimi_lab.data sources and their errors: the Hugging Face source on local files (offline), clear errors for bad
paths, sequence lengths, eval budgets and downloads, the Brown cleaning, and the real default corpus (sizes,
disjoint splits, eval windows touching every source)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kimi_lab.config.validate import ConfigError
from kimi_lab.data import LMDataModule, build_or_load_cache
from kimi_lab.data.cache import CacheError
from tests.helpers import DATA_DIR, data_cfg
from tests.synthetic import marker

# ---------------------------------------------------------------- hf source

@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_hf_text_files(hf_offline, corpus, tmp_path):
    files = sorted(str(p) for p in corpus.glob("*.txt"))
    cfg = data_cfg(name="hf", seq_len=16, hf={"path": "text", "data_files": files, "sample_by": "document"})
    cache = build_or_load_cache(cfg, tmp_path / "cache")
    assert cache.manifest["sources"]["hf"]["n_docs"] == 30
    assert sum(info["n_docs"] for info in cache.manifest["splits"].values()) == 30


def test_hf_json_and_missing_field(hf_offline, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": f"{marker(k)} " + "text " * 40, "n": k}) + "\n"
                            for k in range(10)))
    cfg = data_cfg(name="hf", seq_len=16, hf={"path": "json", "data_files": str(path), "text_field": "body"})
    cache = build_or_load_cache(cfg, tmp_path / "cache")
    assert cache.manifest["sources"]["hf"]["n_docs"] == 10
    bad = data_cfg(name="hf", seq_len=16, hf={"path": "json", "data_files": str(path), "text_field": "text"})
    with pytest.raises(CacheError, match=r"data\.hf\.text_field='text'.*\['body', 'n'\]"):
        build_or_load_cache(bad, tmp_path / "cache")


def test_hf_cache_key_follows_local_globs_folders_and_dataset_folders(tmp_path):
    """The offline hf recipe names files by glob (data.hf.data_files=/path/*.txt), a folder, or a local dataset
    folder as hf.path: adding or editing a file must change the source fingerprint (the cache key)."""
    import os

    from kimi_lab.data.sources import source_fingerprint

    folder = tmp_path / "texts"
    folder.mkdir()
    for k in range(3):
        (folder / f"doc{k}.txt").write_text(f"document {k}")
    configs = {
        "glob": data_cfg(name="hf", hf={"path": "text", "data_files": str(folder / "*.txt")}),
        "folder": data_cfg(name="hf", hf={"path": "text", "data_files": str(folder)}),
        "dict of globs": data_cfg(name="hf", hf={"path": "text", "data_files": {"train": str(folder / "**")}}),
        "dataset folder": data_cfg(name="hf", hf={"path": str(folder)}),
    }
    before = {name: source_fingerprint(cfg) for name, cfg in configs.items()}
    assert all("doc2.txt" in str(fp) for fp in before.values())
    (folder / "doc3.txt").write_text("a new document")
    added = {name: source_fingerprint(cfg) for name, cfg in configs.items()}
    assert all(added[name] != before[name] for name in configs), [n for n in configs if added[n] == before[n]]
    (folder / "doc0.txt").write_text("document 0, edited")
    os.utime(folder / "doc0.txt", ns=(1, 1))  # a different mtime even on a coarse-clock filesystem
    edited = {name: source_fingerprint(cfg) for name, cfg in configs.items()}
    assert all(edited[name] != added[name] for name in configs)
    hub = data_cfg(name="hf", hf={"path": "wikitext", "name": "wikitext-2-raw-v1"})
    assert "local_path" not in source_fingerprint(hub) and source_fingerprint(hub)["local_files"] == []


# ---------------------------------------------------------------- clear errors

def test_seq_len_longer_than_split(text_cfg, tmp_path):
    text_cfg.seq_len = 100_000
    dm = LMDataModule(text_cfg, str(tmp_path / "cache"), seed=0, num_train_samples=4)
    with pytest.raises(ValueError, match=r"data\.seq_len=100000 .* train split: it has \d+ tokens"):
        dm.setup()


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_budget_below_one_window(text_cfg, tmp_path, split):
    """An unvalidated config with data.<split>_tokens < seq_len fails clearly instead of scoring a whole window."""
    text_cfg[f"{split}_tokens"] = 31
    dm = LMDataModule(text_cfg, str(tmp_path / "cache"), seed=0, num_train_samples=4)
    with pytest.raises(ConfigError, match=rf"data\.{split}_tokens=31; allowed: >= one eval window of 32 tokens"):
        dm.setup()


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="data.paths"):
        build_or_load_cache(data_cfg(name="text", paths=[]), tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.txt or \*\.md"):
        build_or_load_cache(data_cfg(name="text", paths=[str(tmp_path / "empty")]), tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        build_or_load_cache(data_cfg(name="text", paths=[str(tmp_path / "nope")]), tmp_path / "cache")


def test_download_errors(tmp_path, monkeypatch):
    from kimi_lab.data import corpus

    archive = corpus.Archive("x", "npm", "x@1", "1", "x-1.tgz", "0" * 64)
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="`npm` command is not installed"):
        corpus.fetch_archive(archive, tmp_path)
    monkeypatch.setattr(corpus, "_download_command", lambda a, dest: ["sh", "-c", "echo offline >&2; exit 1"])
    with pytest.raises(RuntimeError, match="(?s)network access.*offline"):
        corpus.fetch_archive(archive, tmp_path)
    monkeypatch.setattr(corpus, "_download_command", lambda a, dest: ["sh", "-c", f"echo hi > {dest}/x-1.tgz"])
    with pytest.raises(RuntimeError, match="sha256 mismatch for x@1"):
        corpus.fetch_archive(archive, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing unverified is kept


def test_brown_cleaning():
    from kimi_lab.data.corpus import clean_brown

    raw = "\n\n\tHe/pps said/vbd ``/`` no/at ''/'' ,/, (/( Jr./np ./. )/)\n\tOk/uh ./.\n\n\n\tNew/jj ./.\n"
    assert clean_brown(raw) == 'He said "no", (Jr.) Ok.\n\nNew.'


# ---------------------------------------------------------------- the real default corpus

def test_default_corpus():
    """Builds the offline corpus once per machine (downloads ~15 MB) into the shared data dir; its splits are the
    stratified per-source ones (`split_documents`), each split's documents in that order."""
    from kimi_lab.data.corpus import default_documents
    from kimi_lab.data.splits import split_documents

    cache_dir = str(DATA_DIR)
    cfg = data_cfg()
    cache = build_or_load_cache(cfg, cache_dir)
    manifest = cache.manifest
    assert {s: i["n_docs"] for s, i in manifest["sources"].items()} == {"sotu": 233, "brown": 500, "shakespeare": 42}
    splits = manifest["splits"]
    assert sum(i["n_tokens"] for i in splits.values()) > 4_000_000
    assert splits["val"]["n_tokens"] > 65536 and splits["test"]["n_tokens"] > 65536
    expected = split_documents(default_documents(DATA_DIR)[0], cfg.split_seed, cfg.val_fraction, cfg.test_fraction)
    for split in ("train", "val", "test"):
        assert splits[split]["n_docs"] == len(expected[split])
        assert set(splits[split]["docs_per_source"]) == {"sotu", "brown", "shakespeare"}
    assert manifest["dtype"] == "uint16" and cache.train.dtype == np.uint16
    assert int(np.asarray(cache.train).max()) < 32768 and int(cache.train[-1]) == 32767

    dm = LMDataModule(cfg, cache_dir, seed=0, num_train_samples=16)
    dm.setup()
    assert 5.0 < dm.unigram_baseline_loss() < 9.0
    for split in ("val", "test"):  # the eval windows are spread over the whole split: every source, most documents
        tokens, windows = np.asarray(cache.split(split)), dm.val_set if split == "val" else dm.test_set
        ends = np.flatnonzero(tokens == dm.eot_id)  # document k = tokens (ends[k - 1], ends[k]]
        assert len(ends) == len(expected[split])
        scored = windows.starts[:, None] + np.arange(1, cfg.seq_len + 1)  # (n_windows, seq_len) positions
        docs = np.unique(np.searchsorted(ends, scored.ravel()))
        assert {expected[split][d].source for d in docs} == {"sotu", "brown", "shakespeare"}
        assert len(docs) >= 0.8 * splits[split]["n_docs"]
