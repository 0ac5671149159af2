"""Document-level train/val/test assignment and duplicate detection, decided one document at a time.

Streamed sources (text files, HF datasets): a document goes to a split by a hash of (split_seed, its text digest)
mapped to [0, 1) and compared with the fractions, so the split of a document depends on nothing else (not the
corpus order, its size or data.num_proc), and whitespace-equal copies share a split. Sources whose document ids
are known before any text is read (the embedded default corpus; text files with one document per file) keep exact
per-source counts, at least one document per non-empty split: `split_documents` over the ids."""

from __future__ import annotations

import hashlib
import math

from kimi_lab.config.validate import ConfigError
from kimi_lab.data.documents import Document

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2  # split codes, indices into SPLITS
HASH_RULE = -1  # preset code meaning "decide by split_by_hash"
DIGEST_BYTES = 16


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} "
                          "must be in [0, 1) and sum to less than 1")


def text_digest(text: str) -> bytes:
    """16-byte BLAKE2b digest of the text with whitespace runs collapsed: the document's identity for the hash
    split and for duplicate removal (a copy differing only in whitespace is the same document)."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8", "surrogatepass"),
                           digest_size=DIGEST_BYTES).digest()


def hash_unit(digest: bytes, split_seed: int) -> float:
    """u = BLAKE2b-64(digest, key=split_seed) / 2^64: uniform on [0, 1), a function of the text and the seed only."""
    key = hashlib.blake2b(digest, digest_size=8, key=str(int(split_seed)).encode()).digest()
    return int.from_bytes(key, "big") / 2.0**64


def split_of_unit(u: float, val_fraction: float, test_fraction: float) -> int:
    """VAL when u < val_fraction, TEST when u < val_fraction + test_fraction, else TRAIN: each document
    independently, so a held-out split's document count is Binomial(n_docs, fraction)."""
    return VAL if u < val_fraction else TEST if u < val_fraction + test_fraction else TRAIN


# ---------------------------------------------------------------- the default corpus: exact per-source counts

def order_key(split_seed: int, doc: Document) -> str:
    return hashlib.sha256(f"{split_seed}:{doc.source}:{doc.doc_id}".encode()).hexdigest()


def _n_held_out(fraction: float, n: int) -> int:
    return math.ceil(round(fraction * n, 9)) if fraction > 0 else 0


def split_documents(docs: list[Document], split_seed: int, val_fraction: float,
                    test_fraction: float) -> dict[str, list[Document]]:
    """Stratified split of an in-memory corpus: per source, ceil(fraction * n) documents to val and to test by
    `order_key` order; each split in `order_key` order. Used for the embedded default corpus."""
    check_fractions(val_fraction, test_fraction)
    by_source: dict[str, list[Document]] = {}
    for doc in docs:
        by_source.setdefault(doc.source, []).append(doc)
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for source, group in sorted(by_source.items()):
        ids = [d.doc_id for d in group]
        if len(set(ids)) != len(ids):
            raise ValueError(f"source {source!r} has duplicate document ids")
        group = sorted(group, key=lambda d: order_key(split_seed, d))
        n, n_val, n_test = len(group), _n_held_out(val_fraction, len(group)), _n_held_out(test_fraction, len(group))
        if n - n_val - n_test < 1:
            raise ValueError(
                f"source {source!r} has only {n} document(s): with data.val_fraction={val_fraction} and "
                f"data.test_fraction={test_fraction} it needs at least {n_val + n_test + 1} (>= 1 per "
                "non-empty split); add documents (or set data.doc_separator) or lower the fractions")
        splits["val"] += group[:n_val]
        splits["test"] += group[n_val:n_val + n_test]
        splits["train"] += group[n_val + n_test:]
    return {s: sorted(d, key=lambda doc: order_key(split_seed, doc)) for s, d in splits.items()}


def preset_codes(docs: list[Document], split_seed: int, val_fraction: float,
                 test_fraction: float) -> dict[tuple[str, str], int]:
    """(source, doc_id) -> split code by `split_documents`: needs the ids only (texts may be empty stubs)."""
    splits = split_documents(docs, split_seed, val_fraction, test_fraction)
    return {(d.source, d.doc_id): SPLITS.index(s) for s, group in splits.items() for d in group}


def preset_stream(docs: list[Document], split_seed: int, val_fraction: float,
                  test_fraction: float) -> list[tuple[Document, int]]:
    """(document, split code) in `order_key` order, splits from `split_documents`: streamed through the builder,
    each split's token file holds its documents in the same order as `split_documents` lists them."""
    code = preset_codes(docs, split_seed, val_fraction, test_fraction)
    return [(d, code[(d.source, d.doc_id)]) for d in sorted(docs, key=lambda d: order_key(split_seed, d))]
