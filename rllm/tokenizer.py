"""Tokenizers: training ``rwkv_tiny``'s byte-level BPE, and loading any ``tokenizer.json``.

Our tokenizer is GPT-2 style byte-level BPE (every byte string round-trips exactly), with one
special token, ``<|endoftext|>`` = id 0, used as the document separator. ``load_tokenizer``
reads any Hugging Face ``tokenizers`` JSON file, e.g. the GPT-NeoX ``20B_tokenizer.json`` of
the RWKV-4 Pile models: it assumes nothing about special tokens.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
EOT_ID = 0
DEFAULT_VOCAB_SIZE = 4096


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``; ``<|endoftext|>`` is id 0."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(f"vocab_size must be at least {len(alphabet) + 1} (256 bytes + {EOT}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=alphabet,
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    assert tok.token_to_id(EOT) == EOT_ID
    return tok


def _resolve(path: Path) -> Path:
    if path.is_dir():
        cand = path / "tokenizer.json"
        if cand.is_file():
            return cand
        others = sorted(path.glob("*tokenizer*.json"))
        if len(others) == 1:
            return others[0]
        raise ValueError(f"no tokenizer.json in directory {path}")
    if not path.is_file():
        raise ValueError(f"tokenizer file {path} does not exist")
    return path


def load_tokenizer(path_or_dir: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizers`` JSON file, or the ``tokenizer.json`` inside a directory.

    Missing or unreadable files raise ``ValueError`` naming the path.
    """
    path = _resolve(Path(path_or_dir))
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
        return Tokenizer.from_str(text)
    except Exception as e:  # json, utf-8 or tokenizers' own error: one line, with the path
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load tokenizer {path}: {msg}") from None


def eot_id(tok: Tokenizer) -> int | None:
    """Id of ``<|endoftext|>`` in ``tok`` (our id 0; GPT-NeoX's too), or None if it has none."""
    return tok.token_to_id(EOT)


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added; a literal ``<|endoftext|>`` maps to its id)."""
    return tok.encode(text, add_special_tokens=False).ids


def encode_documents(tok: Tokenizer, texts: Iterable[str]) -> list[int]:
    """One stream: ``<|endoftext|>`` before each document (the separator, and the start symbol)."""
    eot = eot_id(tok)
    texts = list(texts)
    out: list[int] = []
    for ids in (e.ids for e in tok.encode_batch(texts, add_special_tokens=False)):
        if eot is not None:
            out.append(eot)
        out.extend(ids)
    return out


def load_calib_tokens(path: str | os.PathLike, tokenizer: Any = None) -> "torch.Tensor":
    """Token ids from a ``.npy``/``.pt`` file, or a text file encoded with ``tokenizer``
    (documents separated by blank lines are joined as one stream)."""
    import numpy as np
    import torch
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: calibration file not found")
    if p.suffix == ".npy":
        return torch.as_tensor(np.load(p)).long()
    if p.suffix in (".pt", ".pth"):
        return torch.as_tensor(torch.load(p, weights_only=True)).long()
    if tokenizer is None:
        raise ValueError(f"{p}: a text calibration file needs the model's tokenizer, and this model has none; "
                         f"pass token ids (.npy)")
    text = p.read_text(encoding="utf-8")
    enc = tokenizer.encode(text)
    return torch.tensor(getattr(enc, "ids", enc), dtype=torch.long)
