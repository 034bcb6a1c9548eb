"""Evaluation of causal language models: perplexity, LAMBADA-style cloze, multiple-choice scoring.

Any causal LM works if it follows one call convention: ``model(idx)`` with ``idx`` a ``[B, T]``
long tensor returns logits ``[B, T, V]`` (or an object with ``.logits``, or a tuple whose first
element is the logits). Recurrent models whose ``forward`` takes ``state=`` and
``return_state=`` (``rllm.model.RWKV``) are detected and evaluated exactly on texts of any
length, by carrying their state from window to window.

Everything follows the lm-evaluation-harness ("lm-eval") conventions, so that numbers can be
put next to published ones:

* perplexity: every token of a document is scored once (lm-eval's ``loglikelihood_rolling``);
  with ``bos_id`` (by default the tokenizer's ``<|endoftext|>``) the first token is scored too,
  conditioned on that start symbol. ``bits_per_byte`` and ``word_perplexity`` are lm-eval's:
  UTF-8 bytes of the text and ``len(re.split(r"\\s+", text))`` words.
* cloze (``lambada``): context = the text up to its last space, target = ``" " + last word``;
  ``acc`` = every target token is the argmax; ``ppl`` = exp of the mean per-item target NLL.
* multiple choice: each continuation ``target_delimiter + choice`` (delimiter ``" "``) is scored
  by its summed log-probability given the context; ``acc`` takes the argmax, ``acc_norm`` the
  argmax of log-probability divided by the choice's length. lm-eval calls this byte-length
  normalization but divides by ``len(choice)`` in *characters*, without the delimiter; that is
  the default here (``norm="chars"``), ``norm="bytes"`` divides by UTF-8 bytes (identical on
  ASCII text, i.e. on nearly all of these datasets).
* (context, continuation) pairs are tokenized as lm-eval does: spaces at the end of the
  context move to the continuation, ``context_ids = encode(context)`` and the continuation is
  ``encode(context + continuation)[len(context_ids):]``. An empty context is replaced by the
  start symbol ``bos_id``.

Thresholds: every entry point takes ``thresholds`` (site -> threshold, or a schedule object with
a ``.thresholds`` mapping); they are set on the model for the duration of the call and the
previous thresholds are restored afterwards, also when the evaluation fails.
"""
from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rllm.lm import _as_logits, _model_device, context_limit, is_recurrent, loglikelihood, supports_state  # noqa: F401 (re-exported)
from rllm.scoring import MAX_SEGMENTS, group_loglikelihoods

__all__ = [
    "PerplexityResult", "ClozeItem", "ClozeResult", "MCItem", "MCResult",
    "perplexity", "token_nll", "cloze_accuracy", "multiple_choice", "loglikelihood", "evaluate_all",
    "load_task", "detect_kind", "TASK_KINDS", "PARSERS", "encode_pair",
    "applied_thresholds", "supports_state", "is_recurrent", "context_limit",
]

EOT = "<|endoftext|>"
AUTO = "auto"


def _as_threshold_dict(thresholds: Any) -> dict | None:
    if thresholds is None:
        return None
    if isinstance(thresholds, Mapping):
        return dict(thresholds)
    inner = getattr(thresholds, "thresholds", None)  # a Schedule-like object
    if isinstance(inner, Mapping):
        return dict(inner)
    raise TypeError(f"thresholds must be a mapping site -> threshold or have a .thresholds mapping, "
                    f"got {type(thresholds).__name__}")


@contextmanager
def applied_thresholds(model: Any, thresholds: Any) -> Iterator[None]:
    """Set ``thresholds`` on ``model`` inside the ``with`` block; restore the previous ones after.

    ``None`` does nothing (the model's current thresholds are used). Needs
    ``model.set_thresholds`` and ``model.get_thresholds`` when thresholds are given.
    """
    th = _as_threshold_dict(thresholds)
    if th is None:
        yield
        return
    if not (hasattr(model, "set_thresholds") and hasattr(model, "get_thresholds")):
        raise TypeError(f"{type(model).__name__} has no set_thresholds/get_thresholds: cannot apply thresholds")
    saved = model.get_thresholds()
    try:
        model.set_thresholds(th)
        yield
    finally:
        model.set_thresholds(saved)


@contextmanager
def _evaluating(model: Any, thresholds: Any) -> Iterator[None]:
    """Thresholds applied, eval mode (training flag restored), no autograd."""
    was_training = getattr(model, "training", None)
    with applied_thresholds(model, thresholds):
        if was_training is not None and hasattr(model, "eval"):
            model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            if was_training and hasattr(model, "train"):
                model.train(True)


# ======================================================================================
# Tokenization
# ======================================================================================

def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without added special tokens (``tokenizers.Tokenizer`` or similar)."""
    try:
        out = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        out = tokenizer.encode(text)
    ids = getattr(out, "ids", out)
    return list(ids)


def _resolve_bos(bos_id: Any, tokenizer: Any) -> int | None:
    if bos_id != AUTO:
        return None if bos_id is None else int(bos_id)
    to_id = getattr(tokenizer, "token_to_id", None)
    return to_id(EOT) if callable(to_id) else None


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's tokenization of a (context, continuation) pair: ``(context_ids, continuation_ids)``."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context) if context else []
    return ctx, whole[len(ctx):]


def _request_ids(tokenizer, context: str, continuation: str, bos: int | None, what: str) -> tuple[list[int], list[int]]:
    ctx, cont = encode_pair(tokenizer, context, continuation)
    if not cont:
        raise ValueError(f"{what}: continuation {continuation!r} encodes to no tokens")
    if not ctx:
        if bos is None:
            raise ValueError(f"{what}: empty context and no start token; pass bos_id")
        ctx = [bos]
    return ctx, cont


# ======================================================================================
# Log-likelihood of continuations (the core of cloze and multiple choice)
# ======================================================================================

def _group_scores(model, groups: list[list[tuple[list[int], list[int]]]], *, batch_size: int,
                  batch_tokens: int | None, max_length: int | None, device, progress: bool,
                  desc: str) -> list[list[tuple[float, bool]]]:
    """``loglikelihood`` of each request of each group (an item's choices, or one cloze passage).

    A recurrent model that takes a state runs through :func:`rllm.scoring.group_loglikelihoods`:
    the tokens a group's requests share are run once without the head (a multiple-choice context
    once for all its choices, a cloze context up to its target), each request's rest continues from
    a copy of that state, and batches are filled by tokens, length-sorted. Same numbers to float
    rounding, about half the work on multiple choice. Other models, and ``max_length`` (lm-eval's
    left truncation), take the flat ``loglikelihood`` batches of ``batch_size`` requests.
    """
    if max_length is None and supports_state(model) and is_recurrent(model):
        # Groups of one request (cloze) share nothing: a prefix cut back costs its tokens once, not once
        # per choice, so one prefix call per batch (cut to its shortest) beats several small calls.
        segments = 1 if all(len(g) == 1 for g in groups) else MAX_SEGMENTS
        return group_loglikelihoods(model, groups, batch_tokens=batch_tokens, max_segments=segments, device=device,
                                    progress=progress, desc=desc)
    flat = [req for g in groups for req in g]
    res = loglikelihood(model, flat, batch_size=batch_size, max_length=max_length, device=device,
                        progress=progress, desc=desc)
    out, k = [], 0
    for g in groups:
        out.append(res[k:k + len(g)])
        k += len(g)
    return out


def _stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample standard deviation (lm-eval's ``mean_stderr``)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


# ======================================================================================
# Perplexity
# ======================================================================================

@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a text (or several documents). ``nll`` is the summed NLL in nats.

    ``n_bytes``/``bits_per_byte``/``n_words``/``word_perplexity`` are None when token ids,
    not text, were given. ``mode``: ``"stateful"`` (exact, state carried across windows) or
    ``"windowed"`` (independent windows of at most ``ctx`` tokens).
    """

    nll: float
    n_tokens: int
    ppl: float
    mode: str
    ctx: int
    n_bytes: int | None = None
    bits_per_byte: float | None = None
    n_words: int | None = None
    word_perplexity: float | None = None

    @property
    def mean_nll(self) -> float:
        return self.nll / self.n_tokens if self.n_tokens else float("nan")

    @classmethod
    def from_counts(cls, nll: float, n_tokens: int, mode: str, ctx: int,
                    n_bytes: int | None = None, n_words: int | None = None) -> "PerplexityResult":
        ppl = math.exp(nll / n_tokens) if n_tokens else float("nan")
        bpb = nll / math.log(2) / n_bytes if n_bytes else None
        wppl = math.exp(nll / n_words) if n_words else None
        return cls(nll=nll, n_tokens=n_tokens, ppl=ppl, mode=mode, ctx=ctx, n_bytes=n_bytes,
                   bits_per_byte=bpb, n_words=n_words, word_perplexity=wppl)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _documents(tokenizer, data) -> tuple[list[list[int]], list[str] | None]:
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        if data.ndim == 1:
            return [data.tolist()], None
        if data.ndim == 2:
            return [row.tolist() for row in data], None
        raise ValueError(f"token ids must be 1-D or 2-D, got shape {tuple(data.shape)}")
    data = list(data)
    if not data:
        raise ValueError("no text or token ids to evaluate")
    if all(isinstance(d, str) for d in data):
        if tokenizer is None:
            raise ValueError("text given but no tokenizer")
        return [_encode(tokenizer, t) for t in data], list(data)
    if all(isinstance(d, int) for d in data):
        return [list(data)], None
    if all(isinstance(d, (list, tuple, torch.Tensor)) for d in data):
        return [list(map(int, d)) for d in data], None
    raise TypeError("expected a text, a list of texts, a list of token ids or a list of such lists")


def perplexity(
    model: Callable,
    tokenizer: Any,
    data: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    *,
    ctx: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    stateful: bool | None = None,
    bos_id: int | None | str = AUTO,
    device: str | torch.device | None = None,
    thresholds: Any = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``data``: one text, several documents (texts), or token ids (``tokenizer`` may be None).

    Each document is scored independently; with ``bos_id`` (default ``"auto"``: the
    tokenizer's ``<|endoftext|>`` if any, None for ids) it is prefixed with that start token and
    every token is scored, otherwise the first token is context only.

    Long documents are split into windows of ``ctx`` tokens (default: the model's
    ``config.context_length``, else 1024):

    * ``stateful`` (the default for models that take ``state=``/``return_state=``, see
      ``supports_state``, when they are recurrent or every document fits their
      ``context_limit``): the state is carried from window to window, so the result equals one
      pass over the whole document, for any ``ctx`` (``ctx`` only bounds memory). Documents are
      batched ``batch_size`` at a time, and a forward pass holds up to ``batch_size x ctx`` tokens:
      a batch of fewer documents runs in proportionally longer windows (one document: windows of
      ``batch_size * ctx`` tokens), since the windows of a batch are sequential calls, each with a
      fixed cost (on a CPU a 128-token window of one sequence costs ~1.6 times its arithmetic).
    * otherwise (or ``stateful=False``): windows are independent. With ``stride=None``
      they do not overlap (lm-eval's rolling windows: each window's input starts with the last
      token of the previous window, so every token is scored exactly once with between 1 and
      ``ctx`` tokens of context; a short last window reaches back to a full ``ctx`` of input
      and scores only its new tokens). With ``stride < ctx`` the windows slide by ``stride`` tokens
      and score only their last ``stride`` tokens, each with at least ``ctx - stride`` tokens of
      context (more accurate, ``ctx / stride`` times the work). Windows are batched.
    """
    docs, texts = _documents(tokenizer, data)
    bos = _resolve_bos(bos_id, tokenizer) if texts is not None else (None if bos_id == AUTO else bos_id)
    if bos is not None:
        docs = [[int(bos)] + d for d in docs]
    if ctx is None:
        ctx = int(getattr(getattr(model, "config", None), "context_length", 0) or 1024)
    if ctx < 1:
        raise ValueError(f"ctx must be positive, got {ctx}")
    if stateful is None:
        if stride is not None:
            raise ValueError("stride applies to windowed evaluation; pass stateful=False with it")
        limit = context_limit(model)
        stateful = supports_state(model) and (limit is None or max(len(d) for d in docs) - 1 <= limit)
    elif stateful and not supports_state(model):
        raise ValueError(f"{type(model).__name__}.forward takes no state/return_state: cannot run stateful")
    if stride is not None and (stateful or not 1 <= stride <= ctx):
        raise ValueError(f"stride must be in [1, ctx={ctx}] and needs stateful=False, got stride={stride}")
    dev = _model_device(model, device)
    n_tokens = sum(max(len(d) - 1, 0) for d in docs)
    bar = tqdm(total=n_tokens, desc="perplexity", unit="tok", disable=not progress, leave=False)
    try:
        with _evaluating(model, thresholds):
            if stateful:
                nll = _ppl_stateful(model, docs, ctx, batch_size, dev, bar)
            else:
                nll = _ppl_windowed(model, docs, ctx, stride or ctx, batch_size, dev, bar)
    finally:
        bar.close()
    n_bytes = n_words = None
    if texts is not None:
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_words = sum(len(re.split(r"\s+", t)) for t in texts)
    return PerplexityResult.from_counts(nll, n_tokens, "stateful" if stateful else "windowed", ctx, n_bytes, n_words)


def _token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (float64, shaped like ``targets``)."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return ce.double().reshape(targets.shape)


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    return float((_token_ce(logits, targets) * mask.double()).sum())


def token_nll(model: Callable, ids: Sequence[int] | torch.Tensor, *, ctx: int | None = None,
              device: str | torch.device | None = None, thresholds: Any = None, chunks: int = 1) -> torch.Tensor:
    """Per-token NLL (float64, nats, on the CPU) of one document of token ids, the state carried across
    ``ctx``-token windows: ``perplexity(model, None, ids, ctx=ctx, stateful=True).ppl`` is the exp of
    its mean. For paired comparisons of two models or schedules token by token.

    ``chunks > 1`` cuts the document into that many contiguous pieces (each piece's first token is
    the last target of the one before, so every target ``1..n-1`` is still scored once, in order)
    and runs them side by side as one batch, each from a fresh state: ``chunks`` times fewer
    sequential forward passes (on a GPU, where one window of one sequence is launch-bound, that is
    the whole cost), at the price of ``chunks - 1`` restarts of the state."""
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise ValueError(f"token_nll needs at least 2 tokens, got {len(ids)}")
    chunks = max(1, min(int(chunks), len(ids) - 1))
    if not supports_state(model):
        raise ValueError(f"{type(model).__name__}.forward takes no state/return_state: token_nll is stateful")
    if ctx is None:
        ctx = int(getattr(getattr(model, "config", None), "context_length", 0) or 1024)
    cuts = [round(i * (len(ids) - 1) / chunks) for i in range(chunks + 1)]
    docs = [ids[a: b + 1] for a, b in zip(cuts, cuts[1:])]
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(docs))}
    with _evaluating(model, thresholds), tqdm(disable=True) as bar:
        _ppl_stateful(model, docs, ctx, len(docs), _model_device(model, device), bar, per_token=out)
    return torch.cat([t for i in range(len(docs)) for t in out[i]])


def _ppl_stateful(model, docs, ctx, batch_size, dev, bar, per_token: dict | None = None) -> float:
    """Summed NLL of ``docs``, state carried across windows; ``per_token``: a dict of document index
    -> list that receives each window's per-token NLL of that document (for :func:`token_nll`)."""
    order = sorted((i for i, d in enumerate(docs) if len(d) > 1), key=lambda i: len(docs[i]), reverse=True)
    total = 0.0
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        group = [docs[i] for i in rows]
        T = len(group[0]) - 1
        inp = torch.zeros(len(group), T, dtype=torch.long)
        tgt = torch.zeros(len(group), T, dtype=torch.long)
        mask = torch.zeros(len(group), T, dtype=torch.bool)
        for r, d in enumerate(group):
            inp[r, :len(d) - 1] = torch.as_tensor(d[:-1])
            tgt[r, :len(d) - 1] = torch.as_tensor(d[1:])
            mask[r, :len(d) - 1] = True
        inp, tgt, mask = inp.to(dev), tgt.to(dev), mask.to(dev)
        state = None
        # a pass holds up to batch_size x ctx tokens however many rows the batch has: the windows of a
        # batch are sequential calls, each with a fixed cost, so fewer rows run in longer windows
        width = ctx * max(1, batch_size // len(rows))
        for s in range(0, T, width):
            out = model(inp[:, s:s + width], state=state, return_state=True)
            logits, state = _as_logits(out[0]), out[1]
            ce = _token_ce(logits, tgt[:, s:s + width])
            total += float((ce * mask[:, s:s + width].double()).sum())
            if per_token is not None:
                for r, i in enumerate(rows):
                    if i in per_token:
                        per_token[i].append(ce[r][mask[r, s:s + width]].cpu())
            bar.update(int(mask[:, s:s + width].sum()))
    return total


def _windows(n: int, ctx: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """For a document of ``n`` tokens: ``(input_start, input_end, n_scored)`` per window.

    Inputs ``ids[a:e-1]`` predict ``ids[a+1:e]``; the last ``n_scored`` of those are scored.
    Targets ``1..n-1`` are each scored exactly once.
    """
    s = 1
    while s < n:
        e = min(s + stride, n)
        a = max(0, e - 1 - ctx)
        yield a, e - 1, e - s
        s = e


def _ppl_windowed(model, docs, ctx, stride, batch_size, dev, bar) -> float:
    wins = [(d, a, e, k) for d in docs for (a, e, k) in _windows(len(d), ctx, stride)]
    wins.sort(key=lambda w: w[2] - w[1], reverse=True)
    total = 0.0
    for b in range(0, len(wins), batch_size):
        group = wins[b:b + batch_size]
        T = group[0][2] - group[0][1]
        inp = torch.zeros(len(group), T, dtype=torch.long)
        tgt = torch.zeros(len(group), T, dtype=torch.long)
        mask = torch.zeros(len(group), T, dtype=torch.bool)
        for r, (d, a, e, k) in enumerate(group):
            L = e - a
            inp[r, :L] = torch.as_tensor(d[a:e])
            tgt[r, :L] = torch.as_tensor(d[a + 1:e + 1])
            mask[r, L - k:L] = True
        logits = _as_logits(model(inp.to(dev)))
        total += _nll_sum(logits, tgt.to(dev), mask.to(dev))
        bar.update(sum(w[3] for w in group))
    return total


# ======================================================================================
# Cloze (LAMBADA)
# ======================================================================================

@dataclass(frozen=True)
class ClozeItem:
    """A last-word prediction item: the model must produce ``target`` after ``context``."""

    context: str
    target: str

    @classmethod
    def from_text(cls, text: str) -> "ClozeItem":
        """lm-eval's split: context = text up to the last space, target = ``" " + last word``."""
        if " " not in text:
            raise ValueError(f"cloze text has no space to split off a last word: {text[:60]!r}")
        context, word = text.rsplit(" ", 1)
        if not word:
            raise ValueError(f"cloze text ends with a space, its last word is empty: {text[-60:]!r}")
        return cls(context, " " + word)


@dataclass(frozen=True)
class ClozeResult:
    """``acc``: fraction of items whose whole target is the greedy continuation; ``ppl``: exp of
    the mean per-item target NLL (lm-eval's LAMBADA ``perplexity``). Per-item details in
    ``correct`` and ``target_nll`` (in item order)."""

    acc: float
    ppl: float
    n: int
    n_correct: int
    acc_stderr: float
    correct: tuple[bool, ...] = field(repr=False, default=())
    target_nll: tuple[float, ...] = field(repr=False, default=())

    def to_dict(self) -> dict:
        return {"acc": self.acc, "acc_stderr": self.acc_stderr, "ppl": self.ppl, "n": self.n, "n_correct": self.n_correct}


def _cloze_item(x: Any) -> ClozeItem:
    if isinstance(x, ClozeItem):
        return x
    if isinstance(x, str):
        return ClozeItem.from_text(x)
    if isinstance(x, Mapping) and "text" in x:
        return ClozeItem.from_text(x["text"])
    raise TypeError(f"cloze items are texts, {{'text': ...}} records or ClozeItem, got {type(x).__name__}")


def cloze_accuracy(
    model: Callable,
    tokenizer: Any,
    items: Iterable[str | ClozeItem | Mapping] | str | os.PathLike,
    *,
    batch_size: int = 16,
    batch_tokens: int | None = None,
    max_length: int | None = None,
    bos_id: int | None | str = AUTO,
    device: str | torch.device | None = None,
    thresholds: Any = None,
    progress: bool = True,
) -> ClozeResult:
    """LAMBADA-style last-word accuracy and target perplexity (lm-eval's ``lambada`` acc and ppl).

    ``items``: passages (split by ``ClozeItem.from_text``), ``{"text": ...}`` records,
    ``ClozeItem``s, or the path of a jsonl file (``load_task``). Recurrent models run in batches
    of about ``batch_tokens`` tokens (default ``rllm.scoring.default_batch_tokens``), other models
    in batches of ``batch_size`` passages (see ``_group_scores``).
    """
    if isinstance(items, (str, os.PathLike)):
        items = load_task(items, "lambada")
    items = [_cloze_item(x) for x in items]
    if not items:
        raise ValueError("no cloze items")
    bos = _resolve_bos(bos_id, tokenizer)
    reqs = [_request_ids(tokenizer, it.context, it.target, bos, f"cloze item {i}") for i, it in enumerate(items)]
    with _evaluating(model, thresholds):
        res = [g[0] for g in _group_scores(model, [[r] for r in reqs], batch_size=batch_size, batch_tokens=batch_tokens,
                                           max_length=max_length, device=device, progress=progress, desc="cloze")]
    correct = tuple(g for _, g in res)
    nll = tuple(-ll for ll, _ in res)
    n = len(items)
    return ClozeResult(acc=sum(correct) / n, ppl=math.exp(sum(nll) / n), n=n, n_correct=sum(correct),
                       acc_stderr=_stderr([float(c) for c in correct]), correct=correct, target_nll=nll)


# ======================================================================================
# Multiple choice
# ======================================================================================

@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item; ``label`` is the index of the right choice.

    Usual form (PIQA, HellaSwag, ARC): each ``target_delimiter + choice`` is scored as a
    continuation of ``context``. Partial-context form (WinoGrande, ``continuation`` set): each
    choice completes the context instead, and the shared ``target_delimiter + continuation`` is
    scored after ``context + choice``; the choice that makes it most likely wins.
    """

    context: str
    choices: tuple[str, ...]
    label: int
    continuation: str | None = None
    target_delimiter: str = " "

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 1 or not all(isinstance(c, str) for c in self.choices):
            raise ValueError(f"MCItem needs a non-empty list of string choices, got {self.choices!r}")
        if isinstance(self.label, bool) or not isinstance(self.label, int) or not 0 <= self.label < len(self.choices):
            raise ValueError(f"MCItem label {self.label!r} out of range for {len(self.choices)} choices")

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) string pairs to score, one per choice."""
        if self.continuation is None:
            return [(self.context, self.target_delimiter + c) for c in self.choices]
        return [(self.context + c, self.target_delimiter + self.continuation) for c in self.choices]

    def norm_lengths(self, norm: str = "chars") -> list[int]:
        """Lengths for ``acc_norm``: of each of lm-eval's choice strings (characters, no delimiter):
        the choice itself, or in the partial-context form ``context + choice`` (lm-eval's
        ``doc_to_choice`` of WinoGrande is ``sentence[:_] + option``)."""
        texts = self.choices if self.continuation is None else [self.context + c for c in self.choices]
        if norm == "chars":
            return [len(t) for t in texts]
        if norm == "bytes":
            return [len(t.encode("utf-8")) for t in texts]
        raise ValueError(f"norm must be 'chars' or 'bytes', got {norm!r}")


@dataclass(frozen=True)
class MCResult:
    """``acc``/``acc_norm`` (and, if asked, ``acc_mutual_info``) over ``n`` items, with per-item
    predictions and log-likelihoods."""

    acc: float
    acc_norm: float
    n: int
    acc_stderr: float
    acc_norm_stderr: float
    pred: tuple[int, ...] = field(repr=False, default=())
    pred_norm: tuple[int, ...] = field(repr=False, default=())
    loglikelihoods: tuple[tuple[float, ...], ...] = field(repr=False, default=())
    acc_mutual_info: float = float("nan")
    acc_mutual_info_stderr: float = float("nan")
    pred_mutual_info: tuple[int, ...] = field(repr=False, default=())
    unconditional: tuple[tuple[float, ...], ...] = field(repr=False, default=())

    def to_dict(self) -> dict:
        d = {"acc": self.acc, "acc_stderr": self.acc_stderr, "acc_norm": self.acc_norm,
             "acc_norm_stderr": self.acc_norm_stderr, "n": self.n}
        if self.pred_mutual_info:
            d.update(acc_mutual_info=self.acc_mutual_info, acc_mutual_info_stderr=self.acc_mutual_info_stderr)
        return d


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, as np.argmax


def multiple_choice(
    model: Callable,
    tokenizer: Any,
    items: Iterable[MCItem] | str | os.PathLike,
    *,
    norm: str = "chars",
    batch_size: int = 16,
    batch_tokens: int | None = None,
    max_length: int | None = None,
    bos_id: int | None | str = AUTO,
    device: str | torch.device | None = None,
    thresholds: Any = None,
    progress: bool = True,
    mutual_info: bool = False,
) -> MCResult:
    """Zero-shot multiple-choice accuracy by log-likelihood (lm-eval's ``acc`` and ``acc_norm``).

    On a recurrent model an item's context is run once and its choices continue from copies of
    its state, in batches of about ``batch_tokens`` tokens; other models score every choice with
    its context, ``batch_size`` requests a batch (see ``_group_scores``). ``items`` may be a jsonl
    path (``load_task``). ``norm``: ``"chars"`` (lm-eval) or ``"bytes"``, see the module doc.

    ``mutual_info``: also lm-eval's ``acc_mutual_info``: each choice's log-likelihood after the
    context minus its log-likelihood with no context (lm-eval's unconditional request
    ``("", choice)``; here the start token alone precedes it), so that what the context adds
    decides, not how likely the choice is anyway. It needs the usual form (choices scored as
    continuations).
    """
    if isinstance(items, (str, os.PathLike)):
        items = load_task(items)
    items = list(items)
    if not items:
        raise ValueError("no multiple-choice items")
    for i, it in enumerate(items):
        if not isinstance(it, MCItem):
            raise TypeError(f"item {i} is {type(it).__name__}, expected MCItem (use load_task or PARSERS)")
    bos = _resolve_bos(bos_id, tokenizer)
    groups = [[_request_ids(tokenizer, c, x, bos, f"item {i} choice {j}") for j, (c, x) in enumerate(it.requests())]
              for i, it in enumerate(items)]
    lengths = [it.norm_lengths(norm) for it in items]
    uncond = [_unconditional_ids(tokenizer, it, bos, i) for i, it in enumerate(items)] if mutual_info else []
    with _evaluating(model, thresholds):
        res = _group_scores(model, groups + uncond, batch_size=batch_size, batch_tokens=batch_tokens,
                            max_length=max_length, device=device, progress=progress, desc="multiple choice")
    n = len(items)
    lls = [[ll for ll, _ in g] for g in res[:n]]
    pred = tuple(_argmax(ll) for ll in lls)
    pred_norm = tuple(_argmax([l / max(k, 1) for l, k in zip(ll, ln)]) for ll, ln in zip(lls, lengths))
    hit = [float(p == it.label) for p, it in zip(pred, items)]
    hit_norm = [float(p == it.label) for p, it in zip(pred_norm, items)]
    mi = {}
    if mutual_info:
        ull = [[ll for ll, _ in g] for g in res[n:]]
        pred_mi = tuple(_argmax([a - b for a, b in zip(l, u)]) for l, u in zip(lls, ull))
        hit_mi = [float(p == it.label) for p, it in zip(pred_mi, items)]
        mi = dict(acc_mutual_info=sum(hit_mi) / n, acc_mutual_info_stderr=_stderr(hit_mi), pred_mutual_info=pred_mi,
                  unconditional=tuple(tuple(u) for u in ull))
    return MCResult(acc=sum(hit) / n, acc_norm=sum(hit_norm) / n, n=n, acc_stderr=_stderr(hit),
                    acc_norm_stderr=_stderr(hit_norm), pred=pred, pred_norm=pred_norm,
                    loglikelihoods=tuple(tuple(ll) for ll in lls), **mi)


def _unconditional_ids(tokenizer, item: MCItem, bos: int | None, i: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's unconditional requests of an item: each choice alone, ``("", choice)``."""
    if item.continuation is not None:
        raise ValueError(f"item {i}: mutual information needs choices scored as continuations, not the "
                         "partial-context form (WinoGrande)")
    return [_request_ids(tokenizer, "", c, bos, f"item {i} choice {j} (unconditional)")
            for j, c in enumerate(item.choices)]


# ======================================================================================
# Task files (jsonl, lm-eval / original dataset conventions)
# ======================================================================================

class _RecordError(ValueError):
    pass


def _get(doc: Mapping, key: str, kind: str):
    if key not in doc:
        raise _RecordError(f"{kind} record lacks key {key!r} (keys: {sorted(doc)})")
    return doc[key]


def _int_label(value, kind: str, key: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise _RecordError(f"{kind} {key} {value!r} is not an integer") from None


def generic_item(doc: Mapping) -> MCItem:
    """``{"context", "choices", "label"}``, optional ``"target_delimiter"`` (default ``" "``)."""
    choices = _get(doc, "choices", "mc")
    if not isinstance(choices, list):
        raise _RecordError(f"mc choices must be a list, got {type(choices).__name__}")
    return MCItem(_get(doc, "context", "mc"), tuple(choices), _int_label(_get(doc, "label", "mc"), "mc", "label"),
                  target_delimiter=doc.get("target_delimiter", " "))


def piqa_item(doc: Mapping) -> MCItem:
    """PIQA: ``goal``, ``sol1``, ``sol2``, ``label`` -> ``"Question: {goal}\\nAnswer:"``, ``" " + sol``."""
    goal = _get(doc, "goal", "piqa")
    sols = (_get(doc, "sol1", "piqa"), _get(doc, "sol2", "piqa"))
    return MCItem(f"Question: {goal}\nAnswer:", sols, _int_label(_get(doc, "label", "piqa"), "piqa", "label"))


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are artifacts of the WikiHow part of HellaSwag
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_item(doc: Mapping) -> MCItem:
    """HellaSwag with lm-eval's preprocessing: ``activity_label: ctx_a + " " + ctx_b.capitalize()``
    (or ``ctx``), brackets removed, each of ``endings`` a choice."""
    if "ctx_a" in doc:
        ctx = doc["ctx_a"] + " " + _get(doc, "ctx_b", "hellaswag").capitalize()
    else:
        ctx = _get(doc, "ctx", "hellaswag")
    query = _hellaswag_preprocess(_get(doc, "activity_label", "hellaswag") + ": " + ctx)
    endings = _get(doc, "endings", "hellaswag")
    if not isinstance(endings, list):
        raise _RecordError(f"hellaswag endings must be a list, got {type(endings).__name__}")
    label = doc.get("label", doc.get("gold"))
    if label is None or label == "":
        raise _RecordError("hellaswag record has no label (test split?)")
    return MCItem(query, tuple(_hellaswag_preprocess(e) for e in endings), _int_label(label, "hellaswag", "label"))


def arc_item(doc: Mapping) -> MCItem:
    """ARC, Hugging Face style (``question`` text, ``choices: {text: [...], label: [...]}``,
    also nested under ``question``) or original style (``question: {stem, choices: [{text, label}]}``);
    ``answerKey`` names the right label. Context ``"Question: {stem}\\nAnswer:"``."""
    q = _get(doc, "question", "arc")
    if isinstance(q, Mapping):
        stem = _get(q, "stem", "arc question")
        choices = q.get("choices", doc.get("choices"))
    else:
        stem, choices = q, doc.get("choices")
    if isinstance(choices, Mapping):
        texts, labels = list(_get(choices, "text", "arc choices")), list(_get(choices, "label", "arc choices"))
    elif isinstance(choices, list) and all(isinstance(c, Mapping) for c in choices):
        texts = [_get(c, "text", "arc choice") for c in choices]
        labels = [_get(c, "label", "arc choice") for c in choices]
    else:
        raise _RecordError("arc record has no choices (expected {text: [...], label: [...]} or [{text, label}, ...])")
    if len(texts) != len(labels):
        raise _RecordError(f"arc choices have {len(texts)} texts but {len(labels)} labels")
    key = _get(doc, "answerKey", "arc")
    labels = [str(x) for x in labels]
    if str(key) not in labels:
        raise _RecordError(f"arc answerKey {key!r} is not one of the choice labels {labels}")
    return MCItem(f"Question: {stem}\nAnswer:", tuple(texts), labels.index(str(key)))


def winogrande_item(doc: Mapping) -> MCItem:
    """WinoGrande, lm-eval's partial-context scoring: context ``sentence[:_] + option``,
    shared continuation ``" " + sentence[_+1:].strip()``; ``answer`` is "1" or "2"."""
    sentence = _get(doc, "sentence", "winogrande")
    if "_" not in sentence:
        raise _RecordError("winogrande sentence has no '_' blank")
    i = sentence.index("_")
    options = (_get(doc, "option1", "winogrande"), _get(doc, "option2", "winogrande"))
    answer = str(_get(doc, "answer", "winogrande"))
    if answer not in ("1", "2"):
        raise _RecordError(f"winogrande answer must be '1' or '2', got {answer!r}")
    return MCItem(sentence[:i], options, int(answer) - 1, continuation=sentence[i + 1:].strip())


def _choice_texts(doc: Mapping, kind: str) -> tuple[list[str], list[str]]:
    choices = _get(doc, "choices", kind)
    if not isinstance(choices, Mapping):
        raise _RecordError(f"{kind} choices must be {{text: [...], label: [...]}}, got {type(choices).__name__}")
    texts, labels = list(_get(choices, "text", kind)), [str(x) for x in _get(choices, "label", kind)]
    if len(texts) != len(labels):
        raise _RecordError(f"{kind} choices have {len(texts)} texts but {len(labels)} labels")
    return texts, labels


def openbookqa_item(doc: Mapping) -> MCItem:
    """OpenBookQA as lm-eval asks it: context ``question_stem`` (no prefix), each of
    ``choices.text`` a choice; ``answerKey`` (leading spaces stripped) names the right label."""
    texts, labels = _choice_texts(doc, "openbookqa")
    key = str(_get(doc, "answerKey", "openbookqa")).lstrip()
    if key not in labels:
        raise _RecordError(f"openbookqa answerKey {key!r} is not one of the choice labels {labels}")
    return MCItem(_get(doc, "question_stem", "openbookqa"), tuple(texts), labels.index(key))


def sciq_item(doc: Mapping) -> MCItem:
    """SciQ as lm-eval asks it: ``"{support.lstrip()}\nQuestion: {question}\nAnswer:"``, choices
    ``distractor1..3`` then ``correct_answer``, so the right one is always the fourth."""
    support = _get(doc, "support", "sciq")
    choices = tuple(_get(doc, k, "sciq") for k in ("distractor1", "distractor2", "distractor3", "correct_answer"))
    context = f"{(support or '').lstrip()}\nQuestion: {_get(doc, 'question', 'sciq')}\nAnswer:"
    return MCItem(context, choices, 3)


def lambada_item(doc: Mapping) -> ClozeItem:
    """LAMBADA: ``{"text": passage}``; the last word is the target (``ClozeItem.from_text``)."""
    text = _get(doc, "text", "lambada")
    if not isinstance(text, str):
        raise _RecordError(f"lambada text must be a string, got {type(text).__name__}")
    try:
        return ClozeItem.from_text(text)
    except ValueError as e:
        raise _RecordError(str(e)) from None


PARSERS: dict[str, Callable[[Mapping], MCItem | ClozeItem]] = {
    "mc": generic_item,
    "piqa": piqa_item,
    "hellaswag": hellaswag_item,
    "arc": arc_item,
    "winogrande": winogrande_item,
    "openbookqa": openbookqa_item,
    "sciq": sciq_item,
    "lambada": lambada_item,
}
TASK_KINDS = tuple(PARSERS)


def detect_kind(doc: Mapping) -> str | None:
    """The task format of a record, from its keys; None if unknown."""
    keys = set(doc)
    if {"goal", "sol1", "sol2"} <= keys:
        return "piqa"
    if "endings" in keys and ({"ctx"} & keys or {"ctx_a"} & keys):
        return "hellaswag"
    if {"sentence", "option1", "option2"} <= keys:
        return "winogrande"
    if {"question_stem", "choices"} <= keys:
        return "openbookqa"
    if {"question", "distractor1", "correct_answer"} <= keys:
        return "sciq"
    if "question" in keys and ("answerKey" in keys or "choices" in keys):
        return "arc"
    if {"context", "choices"} <= keys:
        return "mc"
    if "text" in keys:
        return "lambada"
    return None


def load_task(path: str | os.PathLike, kind: str | None = None) -> list[MCItem] | list[ClozeItem]:
    """Read a jsonl task file into ``MCItem``s (``ClozeItem``s for ``lambada``).

    ``kind``: one of ``TASK_KINDS``; by default detected from the keys of the first record.
    Blank lines are skipped. Malformed input raises ``ValueError`` naming the file and line.
    """
    path = Path(path)
    if kind is not None and kind not in PARSERS:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    from rllm.taskdata import read_jsonl  # one jsonl reader for every task file (its errors name file and line)
    items = []
    for rec in read_jsonl(path):
        if kind is None:
            kind = detect_kind(rec.doc)
            if kind is None:
                raise ValueError(f"{rec.where}: cannot tell the task format from keys {sorted(rec.doc)}; "
                                 f"expected the keys of one of {TASK_KINDS}, or pass kind=")
        try:
            items.append(PARSERS[kind](rec.doc))
        except (_RecordError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{rec.where}: {e}") from None
    if not items:
        raise ValueError(f"{path}: no records")
    return items


# ======================================================================================
# Everything at once
# ======================================================================================

def evaluate_all(
    model: Callable,
    tokenizer: Any,
    *,
    ppl_text: str | Sequence[str] | None = None,
    cloze_items: Iterable | str | os.PathLike | None = None,
    mc_tasks: Mapping[str, Iterable[MCItem] | str | os.PathLike] | None = None,
    thresholds: Any = None,
    ctx: int | None = None,
    batch_size: int = 8,
    bos_id: int | None | str = AUTO,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Run the requested evaluations with ``thresholds`` applied once around all of them.

    Returns plain data (JSON-ready): ``{"perplexity": {...}, "cloze": {...}, "mc": {name: {...}}}``,
    with only the parts that were asked for. Task items may be given as jsonl paths.
    """
    out: dict = {}
    kw = dict(batch_size=batch_size, bos_id=bos_id, device=device, progress=progress)
    with applied_thresholds(model, thresholds):
        if ppl_text is not None:
            out["perplexity"] = perplexity(model, tokenizer, ppl_text, ctx=ctx, **kw).to_dict()
        if cloze_items is not None:
            out["cloze"] = cloze_accuracy(model, tokenizer, cloze_items, **kw).to_dict()
        if mc_tasks:
            out["mc"] = {name: multiple_choice(model, tokenizer, items, **kw).to_dict()
                         for name, items in mc_tasks.items()}
    return out
