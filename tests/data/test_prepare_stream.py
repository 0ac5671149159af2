"""Streaming, sharded cache builds (kimi_lab/data/build.py, shards.py, splits.py): the hash split is per document
(independent of corpus order and data.num_proc), shards concatenate to the same tokens whatever the process
count or shard size, the reader stays a bounded number of chunks ahead of the workers, duplicates are dropped
across chunks, and the stored unigram counts equal a direct count."""

from __future__ import annotations

import pickle
import random
import re

import numpy as np
import pytest

from kimi_lab.data import build, build_or_load_cache, get_tokenizer, prepare
from kimi_lab.data import cache as cache_mod
from kimi_lab.data.shards import ShardedTokens, ShardWriter
from kimi_lab.data.splits import SPLITS
from tests.helpers import data_cfg
from tests.synthetic import WORDS, marker

N_DOCS = 240


def doc_text(k: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(k)
    return f"DOCMARK{k:05d} " + " ".join(rng.choice(WORDS, size=n_words))


def write_lines(folder, order: list[int], n_files: int) -> list[str]:
    """Documents `order`, one per line, dealt round-robin over `n_files` files; the file paths."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = [order[i::n_files] for i in range(n_files)]
    for i, part in enumerate(parts):
        (folder / f"part{i}.txt").write_text("".join(doc_text(k) + "\n" for k in part))
    return [str(folder / f"part{i}.txt") for i in range(n_files)]


def lines_cfg(paths, **overrides):
    return data_cfg(name="text", paths=list(paths), doc_separator="\n", seq_len=16, val_fraction=0.1,
                    test_fraction=0.1, **overrides)


def split_texts(cache) -> dict[str, str]:
    """Each split's tokens decoded."""
    tok = get_tokenizer("cl100k_32k")
    return {s: tok.decode(np.asarray(cache.split(s)).tolist()) for s in SPLITS}


def markers(cache, pattern: str = r"DOCMARK\d{5}") -> dict[str, list[str]]:
    """Document markers in each split, in token order."""
    return {s: re.findall(pattern, text) for s, text in split_texts(cache).items()}


@pytest.fixture
def small_chunks(monkeypatch):
    """~5 documents per pool task, so a few hundred documents run through many chunks."""
    monkeypatch.setattr(build, "CHUNK_CHARS", 2000)


def test_hash_split_is_per_document(tmp_path, small_chunks):
    """The same documents in another order, other files and with 2 processes instead of 1 land in the same splits;
    no document is in two splits; the held-out shares are Binomial(240, 0.1) draws, not exact counts."""
    first = build_or_load_cache(lines_cfg(write_lines(tmp_path / "a", list(range(N_DOCS)), 3)), tmp_path / "c",
                                num_proc=1)
    order = list(range(N_DOCS))
    random.Random(0).shuffle(order)
    second = build_or_load_cache(lines_cfg(write_lines(tmp_path / "b", order, 5)), tmp_path / "c", num_proc=2)
    a, b = markers(first), markers(second)
    assert {s: set(v) for s, v in a.items()} == {s: set(v) for s, v in b.items()}
    assert sum(len(v) for v in a.values()) == len(set().union(*map(set, a.values()))) == N_DOCS  # disjoint
    assert second.manifest["build"]["num_proc"] == 2 and second.manifest["split_rule"] == "hash of the document text"
    for split in ("val", "test"):  # 99.9 % binomial interval of 240 x 0.1
        assert 9 <= len(a[split]) <= 41
    reseeded = build_or_load_cache(lines_cfg(first.manifest["sources"]["text"]["paths"], split_seed=7),
                                   tmp_path / "c", num_proc=1)
    assert set(markers(reseeded)["val"]) != set(a["val"])


def test_shards_concatenate_to_the_same_tokens(tmp_path, small_chunks):
    """num_proc 1 and 2, one shard or 997-token shards: the same token stream per split; every shard but the last
    holds exactly shard_tokens; the manifest records each shard and its size is what the loader maps."""
    paths = write_lines(tmp_path / "a", list(range(N_DOCS)), 2)
    whole = build_or_load_cache(lines_cfg(paths), tmp_path / "one", num_proc=1)
    sharded = {n: build_or_load_cache(lines_cfg(paths), tmp_path / f"p{n}", num_proc=n, shard_tokens=997)
               for n in (1, 2)}
    for split in SPLITS:
        tokens = np.asarray(whole.split(split))
        for cache in sharded.values():
            assert np.array_equal(np.asarray(cache.split(split)), tokens)
        shards = sharded[2].manifest["splits"][split]["shards"]
        assert [s["n_tokens"] for s in shards[:-1]] == [997] * (len(shards) - 1) and 0 < shards[-1]["n_tokens"] <= 997
    assert len(sharded[2].manifest["splits"]["train"]["shards"]) > 3
    assert sharded[1].manifest["digest"] == sharded[2].manifest["digest"] != whole.manifest["digest"]


def test_sharded_tokens_index_like_one_array(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, size=2_500).astype(np.uint16)
    writer = ShardWriter(tmp_path, "train", np.dtype("<u2"), 50_000, shard_tokens=700)
    for piece in np.array_split(tokens, 7):
        writer.write(piece)
    info = writer.close()
    view = ShardedTokens([tmp_path / s["file"] for s in info["shards"]], [s["n_tokens"] for s in info["shards"]],
                         np.dtype("<u2"))
    assert len(view) == view.size == 2_500 and view.dtype == np.uint16
    assert np.array_equal(np.asarray(view), tokens)
    for a, b in [(0, 700), (650, 1450), (1399, 1401), (2400, 2600), (5, 5)]:
        assert np.array_equal(view[a:b], tokens[a:b])
    index = rng.integers(-2_500, 2_500, size=(40, 3))
    assert np.array_equal(view[index], tokens[index]) and view[-1] == tokens[-1] and view[699] == tokens[699]
    assert np.array_equal(view[10:200:7], tokens[10:200:7])
    with pytest.raises(IndexError):
        view[2_500]
    np.asarray(view[0:10])  # maps the shards; the pickle still holds only the paths
    assert len(pickle.dumps(view)) < 2_000 and np.array_equal(np.asarray(pickle.loads(pickle.dumps(view))), tokens)
    assert np.array_equal(np.load(tmp_path / info["unigram"]["file"]), np.bincount(tokens, minlength=50_000))


def test_reader_stays_a_bounded_number_of_chunks_ahead(tmp_path, small_chunks, monkeypatch):
    """Peak memory is bounded by the queue, not the corpus: when each chunk's result is written, the source has
    been read at most IN_FLIGHT_PER_PROC x num_proc chunks ahead (Pool.imap would read all of it first)."""
    pulled, ahead = [0], []
    docs_per_chunk = -(-build.CHUNK_CHARS // len(doc_text(0)))
    real_add = build.Router.add

    def counting_stream(stream):
        for item in stream:
            pulled[0] += 1
            yield item

    def add(self, docs, *encoded):
        ahead.append(pulled[0] - self.stats.n_docs - len(docs))
        return real_add(self, docs, *encoded)

    real_stream = cache_mod.stream_documents

    def stream_documents(*args):
        stream, info = real_stream(*args)
        return counting_stream(stream), info

    monkeypatch.setattr(cache_mod, "stream_documents", stream_documents)
    monkeypatch.setattr(build.Router, "add", add)
    paths = write_lines(tmp_path / "a", list(range(N_DOCS)), 1)
    build_or_load_cache(lines_cfg(paths), tmp_path / "c", num_proc=2)
    assert len(ahead) > 20 and pulled[0] == N_DOCS
    assert max(ahead) <= build.IN_FLIGHT_PER_PROC * 2 * docs_per_chunk


def test_duplicates_across_chunks_are_dropped(tmp_path, small_chunks):
    """Whitespace-equal copies far apart in the stream (other chunks, other workers) are dropped; the first stays."""
    folder = tmp_path / "a"
    paths = write_lines(folder, list(range(N_DOCS)), 1)
    copies = "".join("  " + doc_text(k).replace(" ", "\t ", 3) + "\n" for k in range(0, N_DOCS, 3))
    with open(paths[0], "a") as f:
        f.write(copies)
    cache = build_or_load_cache(lines_cfg(paths), tmp_path / "c", num_proc=2)
    found = [m for ms in markers(cache).values() for m in ms]
    assert sorted(found) == [f"DOCMARK{k:05d}" for k in range(N_DOCS)]
    dropped = cache.manifest["duplicates_dropped"]
    assert dropped["n"] == N_DOCS // 3 and dropped["examples"][0] == f"text:{paths[0]}#{N_DOCS}"
    assert cache.manifest["sources"]["text"]["n_docs"] == N_DOCS + N_DOCS // 3


def test_unigram_counts_equal_a_direct_count(corpus, tmp_path, capsys):
    """The counts stored at build time are np.bincount of each split; the job's baseline reads them and equals
    the add-one unigram loss computed from the train tokens; prepare reports its throughput."""
    from kimi_lab.data import LMDataModule, unigram_baseline_loss

    argv = ["data=text", f"data.paths=[{corpus}]", "--cache-dir", str(tmp_path / "c"), "--shard-tokens", "1000"]
    assert prepare.main(argv) == 0
    assert re.search(r"built [\d,]+ tokens in [\d.]+s: [\d.]+ M tokens/s with num_proc \d", capsys.readouterr().out)
    cfg = data_cfg(name="text", paths=[str(corpus)], seq_len=16, val_fraction=0.1, test_fraction=0.1,
                   val_tokens=64, test_tokens=64)
    cache = cache_mod.open_cache(cfg, tmp_path / "c")
    assert len(cache.manifest["splits"]["train"]["shards"]) > 5
    for split in SPLITS:
        direct = np.bincount(np.asarray(cache.split(split)), minlength=32768)
        assert np.array_equal(cache.unigram_counts(split), direct)
        assert direct.sum() == cache.manifest["splits"][split]["n_tokens"]
    dm = LMDataModule(cfg, str(tmp_path / "c"), seed=0, num_train_samples=4)
    dm.setup()
    assert dm.unigram_baseline_loss() == pytest.approx(
        unigram_baseline_loss(np.asarray(cache.train), dm.val_targets(), 32768), rel=1e-12)


def test_doc_separator_splits_files(tmp_path, monkeypatch):
    """Pieces are read a block at a time: a separator or a CRLF pair across a block boundary is still found."""
    from kimi_lab.data import sources

    monkeypatch.setattr(sources, "BLOCK_CHARS", 7)
    path = tmp_path / "one.txt"
    path.write_bytes("\r\n===\r\n".join(f"{marker(k)} " + "words\r\n" * 50 for k in range(12)).encode())
    cfg = data_cfg(name="text", paths=[str(path)], doc_separator="\n===\n", seq_len=16, val_fraction=0.25,
                   test_fraction=0.25)
    cache = build_or_load_cache(cfg, tmp_path / "cache")
    assert cache.manifest["sources"]["text"]["n_docs"] == 12 and cache.manifest["split_rule"].startswith("hash")
    assert sum(info["n_docs"] for info in cache.manifest["splits"].values()) == 12
    texts = split_texts(cache)
    pieces = [t for s in ("train", "val", "test") for t in texts[s].split("<|endoftext|>")[:-1]]
    assert sorted(pieces) == sorted(f"{marker(k)} " + "words\n" * 50 for k in range(12))


def test_hash_split_fills_small_held_out_splits_or_names_the_keys(tmp_path):
    """Three documents at 5 % val/test: the per-document hash would leave val and test empty (each document's
    chance is 5 %); the two smallest hash units go there instead. Two documents cannot fill three splits: one line
    names the fraction and data.split_seed."""
    path = tmp_path / "one.txt"
    path.write_text("\n".join(f"{marker(k)} " + "words " * 20 for k in range(3)))
    cfg = data_cfg(name="text", paths=[str(path)], doc_separator="\n")
    cache = build_or_load_cache(cfg, tmp_path / "cache")
    assert {s: info["n_docs"] for s, info in cache.manifest["splits"].items()} == {"train": 1, "val": 1, "test": 1}
    assert sorted(m for ids in markers(cache, r"ZQXMARK\d{3}").values() for m in ids) == [marker(k) for k in range(3)]
    path.write_text("\n".join(f"{marker(k)} " + "words " * 20 for k in range(2)))
    with pytest.raises(ValueError, match=r"test split got none of the 2 document\(s\).*data\.split_seed=1234 "
                                         r"data\.test_fraction=0\.05"):
        build_or_load_cache(cfg, tmp_path / "cache")
