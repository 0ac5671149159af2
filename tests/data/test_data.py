"""Tests of kimi_lab.data: tokenizer, sources, token cache, splits, windows, sampler, baseline."""

from __future__ import annotations

import logging
import math
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kimi_lab.config.schema import TokenizerName
from kimi_lab.data import LMDataModule, build_or_load_cache, get_tokenizer, prepare, unigram_baseline_loss
from kimi_lab.data import cache as cache_mod
from kimi_lab.data.cache import CacheError
from kimi_lab.data.datamodule import EvalWindows, ResumableShardSampler, TrainWindows
from kimi_lab.data.documents import Document
from kimi_lab.data.splits import split_documents
from tests.helpers import data_cfg
from tests.synthetic import WORDS, marker

# ---------------------------------------------------------------- tokenizer

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, tabs\tand\nnew lines\r\n\n",
    "naïve café – “quotes” — 日本語のテキスト 😀🚀 ∑ x² ≤ ∞",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code 0x1F 1234567890",
    "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "<|endoftext|> is just text here",
]


def test_tokenizer_basics():
    tok = get_tokenizer("cl100k_32k")
    assert get_tokenizer(TokenizerName.cl100k_32k).encoding is tok.encoding  # lru-cached
    assert (tok.name, tok.n_vocab, tok.eot_id) == ("cl100k_32k", 32768, 32767)
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    with pytest.raises(ValueError, match="data.tokenizer"):
        get_tokenizer("gpt2")


def test_tokenizer_prefix_roundtrip():
    """Ranks < 32767 form a consistent BPE: any text round-trips and never needs a dropped rank."""
    tok = get_tokenizer("cl100k_32k")
    rng = np.random.default_rng(0)
    random_text = "".join(chr(c) for c in rng.integers(32, 0x3000, size=2000))
    for text in SAMPLES + [random_text, " ".join(WORDS) * 3]:
        ids = tok.encode(text)
        assert ids and max(ids) < 32767 and min(ids) >= 0
        assert tok.decode(ids) == text
    assert tok.eot_id not in tok.encode("<|endoftext|>")


def test_bytes_tokenizer_ids_are_the_utf8_bytes():
    """data.tokenizer=bytes: every id is one UTF-8 byte of the text (no merges), <|endoftext|> is 256 and only
    ever added by the cache builder, never by encode."""
    tok = get_tokenizer("bytes")
    assert (tok.name, tok.n_vocab, tok.eot_id, tok.dtype) == ("bytes", 257, 256, np.dtype(np.uint16))
    for text in SAMPLES:
        assert tok.encode(text) == list(text.encode("utf-8"))
        assert tok.decode(tok.encode(text)) == text
        assert list(tok.encode_arrays([text])[0]) == list(text.encode("utf-8"))


# ---------------------------------------------------------------- text source, splits

def split_texts(cache) -> dict[str, str]:
    """Each split's tokens decoded."""
    tok = get_tokenizer("cl100k_32k")
    return {s: tok.decode(np.asarray(cache.split(s)).tolist()) for s in ("train", "val", "test")}


def split_markers(cache) -> dict[str, set[str]]:
    """The synthetic documents' markers (tests/synthetic.py) found in each split."""
    return {s: set(re.findall(r"ZQXMARK\d{3}", text)) for s, text in split_texts(cache).items()}


def test_text_cache_splits_are_disjoint(text_cfg, tmp_path):
    cache = build_or_load_cache(text_cfg, tmp_path / "cache")
    ids = split_markers(cache)
    assert all(ids[s] for s in ("train", "val", "test"))
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    assert len(ids["train"] | ids["val"] | ids["test"]) == 30
    assert cache.path.name.startswith("text-cl100k_32k-") and cache.train.dtype == np.uint16

    texts = split_texts(cache)
    for k in range(30):  # every document's marker lands in exactly one split
        assert sum(marker(k) in t for t in texts.values()) == 1
    for s, info in cache.manifest["splits"].items():
        assert texts[s].count("<|endoftext|>") == info["n_docs"] == len(ids[s])
        assert cache.split(s).size == info["n_tokens"]

    dm = LMDataModule(text_cfg, str(tmp_path / "cache"), seed=0, num_train_samples=8)
    dm.setup("fit")
    train_bytes = np.asarray(cache.train).tobytes()
    for x, _ in dm.val_set:  # no val window occurs in train
        assert x.numpy().astype("<u2").tobytes() not in train_bytes


def test_duplicate_documents_are_dropped_before_the_split(corpus, tmp_path):
    """A copied file (or a repeated row, up to whitespace) is one document: it cannot be in train and in val/test."""
    for k in range(30):
        text = (corpus / f"doc{k:03d}.txt").read_text()
        (corpus / f"copy_of_doc{k:03d}.txt").write_text("  " + text.replace(" ", "\n", 1) + "\n")
    cfg = data_cfg(name="text", paths=[str(corpus)], seq_len=32, val_fraction=0.1, test_fraction=0.1)
    cache = build_or_load_cache(cfg, tmp_path / "cache")
    assert sum(info["n_docs"] for info in cache.manifest["splits"].values()) == 30
    assert cache.manifest["duplicates_dropped"]["n"] == 30
    assert all(e.startswith("text:") and "/doc0" in e for e in cache.manifest["duplicates_dropped"]["examples"])
    texts = split_texts(cache)  # the first of each pair in load (path) order is kept: the copy
    assert all(sum(t.count(marker(k)) for t in texts.values()) == 1 for k in range(30))


def test_exact_split_counts_are_over_distinct_documents(corpus):
    """One document per file: each held-out split gets ceil(0.1 * 30) = 3 distinct documents for every split seed,
    however the copies fall in the order (a split made of copies only would be emptied by duplicate removal)."""
    from kimi_lab.data.sources import _file_split_codes

    for k in range(30):
        (corpus / f"copy_of_doc{k:03d}.txt").write_text((corpus / f"doc{k:03d}.txt").read_text() + "\n")
    (corpus / "blank.txt").write_text("  \n")
    for split_seed in range(40):
        cfg = data_cfg(name="text", paths=[str(corpus)], val_fraction=0.1, test_fraction=0.1, split_seed=split_seed)
        codes = _file_split_codes(cfg)
        assert len(codes) == 30 and all(Path(doc_id).name.startswith("copy_of_") for _, doc_id in codes)
        assert sorted(codes.values()).count(1) == 3 and sorted(codes.values()).count(2) == 3


def test_split_depends_only_on_split_seed(corpus, tmp_path):
    def val_ids(split_seed, train_seed=0):
        cfg = data_cfg(name="text", paths=[str(corpus)], seq_len=16, val_fraction=0.1,
                       test_fraction=0.1, split_seed=split_seed)
        dm = LMDataModule(cfg, str(tmp_path / "cache"), seed=train_seed, num_train_samples=4)
        dm.setup()
        return split_markers(dm._cache)["val"], dm.manifest["key"]

    first, key = val_ids(5)
    assert val_ids(5) == (first, key)
    assert val_ids(5, train_seed=123) == (first, key)  # the training seed plays no part
    other, other_key = val_ids(6)
    assert set(other) != set(first) and other_key != key


def test_split_documents_rules():
    docs = [Document(src, f"{src}{k}", "x") for src, n in (("a", 20), ("b", 3)) for k in range(n)]
    splits = split_documents(docs, split_seed=1, val_fraction=0.05, test_fraction=0.05)
    per_source = {s: {d.source for d in v} for s, v in splits.items()}
    assert per_source["val"] == per_source["test"] == {"a", "b"}  # stratified, >= 1 doc each
    assert sum(len(v) for v in splits.values()) == 23
    assert split_documents(docs, 1, 0.05, 0.05) == splits
    with pytest.raises(ValueError, match="data.val_fraction"):
        split_documents(docs[-2:], 1, 0.05, 0.05)  # 2 docs cannot fill 3 splits
    no_test = split_documents(docs, 1, 0.1, 0.0)
    assert no_test["test"] == [] and len(no_test["val"]) == 2 + 1


# ---------------------------------------------------------------- windows and sampler

def test_train_windows_prefix_stable(text_cfg, tmp_path):
    def items(seed, n):
        dm = LMDataModule(text_cfg, str(tmp_path / "cache"), seed=seed, num_train_samples=n)
        dm.setup()
        return [dm.train_set[i] for i in range(min(n, 60))], dm.train_set

    short, _ = items(7, 60)
    long_run, windows = items(7, 5000)
    for (x1, y1), (x2, y2) in zip(short, long_run, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other, _ = items(8, 60)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(short, other, strict=True))

    x, y = short[0]
    assert x.shape == y.shape == (32,) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[1:], y[:-1])
    starts = [windows.window_start(i) for i in range(windows.n_windows)]  # one epoch
    assert len(set(starts)) == windows.n_windows
    assert len({s % 32 for s in starts}) == 1  # non-overlapping: one offset per epoch
    assert max(starts) + 33 <= len(windows.tokens)


def test_train_windows_short_split():
    tokens = np.arange(40, dtype=np.uint16)  # < 2 * seq_len: one window, offset in the slack
    windows = TrainWindows(tokens, seq_len=32, seed=0, length=10)
    assert all(0 <= windows.window_start(i) <= 40 - 33 for i in range(10))


def test_sampler_shards_and_resumes():
    ranks = [list(ResumableShardSampler(20, rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] == list(range(0, 20, 2)) and ranks[1] == list(range(1, 20, 2))
    sampler = ResumableShardSampler(20, rank=1, world_size=2)
    loader = torch.utils.data.DataLoader(range(20), sampler=sampler, batch_size=2)
    sampler.start_index = 6  # read lazily, after the loader was built
    assert [b.tolist() for b in loader] == [[7, 9], [11, 13], [15, 17], [19]]
    assert len(list(sampler)) == 7 and len(ResumableShardSampler(21, 1, 2)) == 10  # same count on every rank
    assert len(sampler) == 10  # the whole epoch: Lightning counts a resumed run's earlier batches in it
    with pytest.raises(ValueError):
        ResumableShardSampler(10, rank=2, world_size=2)


def test_datamodule_resume_and_ranks(text_cfg, tmp_path):
    def datamodule(rank=None):
        dm = LMDataModule(text_cfg, str(tmp_path / "cache"), seed=3, num_train_samples=40)
        if rank is not None:
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    full = [x for x, _ in datamodule().train_dataloader()]
    assert len(full) == 10 and all(x.shape == (4, 32) for x in full)
    resumed = datamodule()
    resumed.set_train_start(12)  # three batches of 4 consumed
    after = [x for x, _ in resumed.train_dataloader()]
    assert len(after) == 7 and all(torch.equal(a, b) for a, b in zip(after, full[3:], strict=True))

    shards = [torch.cat([x for x, _ in datamodule(r).train_dataloader()]) for r in range(2)]
    everything = torch.cat(full)
    assert torch.equal(shards[0], everything[0::2]) and torch.equal(shards[1], everything[1::2])

    # set up once before the Trainer exists (as train() does), then again under a 2-rank trainer
    early = datamodule()
    early.trainer = SimpleNamespace(global_rank=1, world_size=2)
    early.setup("fit")
    assert torch.equal(torch.cat([x for x, _ in early.train_dataloader()]), shards[1])


def _scored(windows: EvalWindows) -> np.ndarray:
    """(n_windows, seq_len) target positions of `windows`, from its starts."""
    return windows.starts[:, None] + np.arange(1, windows.seq_len + 1)


def _check_eval_layout(windows: EvalWindows, n_tokens: int, budget: int, block: int) -> None:
    seq_len, starts = windows.seq_len, windows.starts
    n_avail = (n_tokens - 1) // block
    n_blocks = min(budget // block, n_avail)
    assert len(windows) == n_blocks * (block // seq_len) and len(windows) * seq_len <= budget  # the budget
    assert starts[0] == 0 and np.all(starts % seq_len == 0) and np.all(np.diff(starts) >= seq_len)  # aligned, disjoint
    assert starts[-1] + seq_len + 1 <= n_tokens  # in bounds
    gap = -(-n_avail // n_blocks) * block  # the largest stride between blocks
    assert n_tokens - (starts[-1] + seq_len) <= gap + block  # the last window near the end of the split
    assert np.all(np.diff(starts[::block // seq_len]) <= gap)  # no hole larger than one stride
    ys = np.concatenate([windows[i][1].numpy() for i in range(len(windows))])
    assert np.array_equal(windows.targets(), ys) and windows.targets().dtype == np.uint16
    assert np.array_equal(windows.targets(), np.asarray(windows.tokens)[_scored(windows).ravel()])


@pytest.mark.parametrize(("n_tokens", "seq_len", "budget", "block"), [
    (10_001, 16, 1024, None), (10_000, 16, 1000, None), (999, 7, 70, None), (10_001, 16, 1024, 64),
    (10_001, 16, 1000, 48), (300, 16, 10_000, None), (33, 32, 64, None), (20_000, 32, 32, None)])
def test_eval_windows_spread_evenly(n_tokens, seq_len, budget, block):
    tokens = (np.arange(n_tokens) % 30_000).astype(np.uint16)
    windows = EvalWindows(tokens, seq_len, budget, "val", block)
    _check_eval_layout(windows, n_tokens, budget, block or seq_len)
    again = EvalWindows(tokens.copy(), seq_len, budget, "val", block)  # deterministic: only tokens, lengths, budget
    assert np.array_equal(again.starts, windows.starts)
    if budget >= n_tokens:  # the budget covers the split: every aligned window, as consecutive windows
        assert np.array_equal(windows.starts, np.arange((n_tokens - 1) // seq_len) * seq_len)


def test_eval_windows_cover_every_part_of_the_split():
    """A split of marked documents (token = document id) in three source runs, as hash order can leave them:
    the budget's windows touch every source and every tenth of the split; the old prefix rule saw one source."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 400, size=60)  # docs 0-19 source a, 20-39 b, 40-59 c
    tokens = np.repeat(np.arange(60, dtype=np.uint16), lengths)  # (sum(lengths),)
    seq_len, budget = 16, len(tokens) // 5
    windows = EvalWindows(tokens, seq_len, budget, "val")
    docs = np.unique(windows.targets())
    assert {int(d) // 20 for d in docs} == {0, 1, 2} and len(docs) >= 50  # every source, most documents
    tenths = np.unique(_scored(windows) * 10 // len(tokens))
    assert np.array_equal(tenths, np.arange(10))
    prefix = np.unique(tokens[1:len(windows) * seq_len + 1])  # the old rule: the first budget tokens
    assert {int(d) // 20 for d in prefix} == {0}


def test_eval_windows_and_baseline(text_cfg, tmp_path):
    dm = LMDataModule(text_cfg, str(tmp_path / "cache"), seed=0, num_train_samples=4)
    dm.setup()
    ys = torch.cat([y.flatten() for _, y in dm.val_dataloader()])
    assert len(dm.val_set) == 256 // 32 and torch.equal(ys, torch.from_numpy(dm.val_targets().astype(np.int64)))
    xs = torch.cat([x for x, _ in dm.val_dataloader()])
    val = dm._cache.val
    assert torch.equal(xs, torch.stack([torch.from_numpy(val[s:s + 32].astype(np.int64)) for s in dm.val_set.starts]))
    _check_eval_layout(dm.val_set, len(val), 256, 32)
    assert dm.val_set.starts[-1] > len(val) // 2  # spread over the split, not its first 256 tokens
    _check_eval_layout(dm.test_set, len(dm._cache.test), 256, 32)
    assert dm.unigram_baseline_loss() == pytest.approx(
        unigram_baseline_loss(dm._cache.train, dm.val_targets(), 32768))
    assert (dm.vocab_size, dm.eot_id) == (32768, 32767)
    state = dm.state_dict()
    dm.load_state_dict(state)
    assert state["cache_key"] == dm.manifest["key"]


def test_unigram_baseline_toy():
    # counts + 1 = [3, 2, 1], total 3 + 3 = 6: p(0) = 1/2, p(2) = 1/6
    loss = unigram_baseline_loss(np.array([0, 0, 1]), np.array([0, 2]), vocab_size=3)
    assert loss == pytest.approx((math.log(2) + math.log(6)) / 2)
    assert unigram_baseline_loss(np.array([], dtype=np.int64), np.array([1]), 4) == pytest.approx(math.log(4))


# ---------------------------------------------------------------- integrity

def test_corrupt_cache_is_rebuilt(text_cfg, tmp_path, caplog, capsys):
    """A short file or a missing manifest is caught by the size check every job runs, and rebuilt; a flipped byte
    only by `prepare --verify` (hashing is not a job-start cost), which names the rebuild command."""
    good = build_or_load_cache(text_cfg, tmp_path / "cache")
    digest = good.manifest["digest"]
    folder = good.path

    with open(folder / "train-00000.bin", "r+b") as f:
        f.truncate(100)
    with caplog.at_level(logging.WARNING):
        rebuilt = build_or_load_cache(text_cfg, tmp_path / "cache")
    assert "train-00000.bin has 100 bytes" in caplog.text
    assert rebuilt.train.size == good.manifest["splits"]["train"]["n_tokens"]

    data = bytearray((folder / "val-00000.bin").read_bytes())
    data[10] ^= 0xFF
    (folder / "val-00000.bin").write_bytes(bytes(data))
    assert cache_mod.check_cache(folder) is None
    assert cache_mod.verify_cache(folder) == "val-00000.bin sha256 does not match the manifest"
    argv = [f"data.paths={list(text_cfg.paths)}", "data=text", "data.val_fraction=0.1", "data.test_fraction=0.1",
            "--cache-dir", str(tmp_path / "cache")]
    assert prepare.main([*argv, "--verify"]) == 1
    err = capsys.readouterr().err
    assert "val-00000.bin sha256 does not match" in err and "--force" in err
    assert prepare.main([*argv, "--force"]) == 0 and prepare.main([*argv, "--verify"]) == 0

    (folder / "manifest.json").unlink()
    rebuilt = build_or_load_cache(text_cfg, tmp_path / "cache")
    assert rebuilt.manifest["digest"] == digest  # the same content, rebuilt


def test_crashed_build_leaves_nothing(text_cfg, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(cache_mod, "_write_manifest", crash)
    with pytest.raises(CacheError, match="python -m kimi_lab.data.prepare") as err:
        build_or_load_cache(text_cfg, tmp_path / "cache")
    assert "simulated crash" in str(err.value)
    assert not cache_mod.cache_path(text_cfg, tmp_path / "cache").exists()
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]

    monkeypatch.undo()  # killed builds leave .tmp folders, killed deletions .trash ones: the next build removes them
    name = cache_mod.cache_path(text_cfg, tmp_path / "cache").name
    stale = [tmp_path / "cache" / f".tmp-{name}-1-x", tmp_path / "cache" / f".trash-{name}-x"]
    for folder in stale:
        folder.mkdir()
    build_or_load_cache(text_cfg, tmp_path / "cache")
    assert not any(folder.exists() for folder in stale)


def test_forced_rebuild_deletes_the_old_cache_only_after_the_new_one_is_in_place(text_cfg, tmp_path, monkeypatch):
    """`prepare --force` while jobs read the cache: the old folder is renamed aside, the new one renamed in, and only
    then deleted (a job that verified the old cache finds a complete one under the name at every moment but
    between two renames); its open memmaps keep reading the unlinked files."""
    old = build_or_load_cache(text_cfg, tmp_path / "cache")
    final, first_train = old.path, np.array(old.train[:50])
    seen = []
    real_rmtree = cache_mod.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".trash-"):
            seen.append(cache_mod.verify_cache(final))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(cache_mod.shutil, "rmtree", rmtree)
    new = build_or_load_cache(text_cfg, tmp_path / "cache", force=True)
    assert seen == [None]  # the one deletion of the old folder ran with a complete cache at `final`
    assert new.manifest["created"] >= old.manifest["created"] and np.array_equal(old.train[:50], first_train)
    assert not list(final.parent.glob(".trash-*")) and not list(final.parent.glob(".tmp-*"))


def _build_in_subprocess(args) -> str:
    cfg, cache_dir = args
    return build_or_load_cache(cfg, cache_dir).manifest["created"]


def test_concurrent_builds_share_one_cache(text_cfg, tmp_path):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        created = pool.map(_build_in_subprocess, [(text_cfg, tmp_path / "cache")] * 2)
    assert created[0] == created[1]  # the second process waited for the lock and loaded the first's build
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1


@pytest.mark.parametrize("name", ["default", "text", "hf"])
def test_prepare_builds_the_cache_training_reads(name, corpus):
    """`python -m kimi_lab.data.prepare data=<name> ...` composes the option file as train.py does: same cache key
    (the option file's split fractions and hf settings, not the schema's defaults)."""
    from tests.helpers import compose_config

    source = {"default": ["data=default"], "text": ["data=text", f"data.paths=[{corpus}]"],
              "hf": ["data=hf", f"data.hf.data_files={corpus}/*.txt"]}[name]
    assert cache_mod.cache_key(prepare.data_config(source)) == cache_mod.cache_key(compose_config(source).data)


def test_error_command_rebuilds(text_cfg, tmp_path, capsys):
    """The command printed in a build error is one that works."""
    command = cache_mod.prepare_command(text_cfg, tmp_path / "cache")
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "kimi_lab.data.prepare", "data=text"]
    assert prepare.main(argv[3:]) == 0
    out = capsys.readouterr().out
    assert str(cache_mod.cache_path(text_cfg, tmp_path / "cache")) in out and "val" in out
