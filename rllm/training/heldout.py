"""Held-out task sets built from held-out works: cloze (last word) and multiple choice.

Two styles:

* ``lambada_cloze`` and ``hellaswag_mc`` (the ``pd-english`` models): built the way LAMBADA and
  HellaSwag were, on sentences of prose or verse.

  - Cloze: a passage of whole sentences ends with the last word of its last sentence (the
    target; the sentence's punctuation is dropped, as in LAMBADA). Kept only when the target is
    guessable from the passage: it occurs in the context before the target sentence (LAMBADA
    kept passages that humans could complete with the whole passage but not from the last
    sentence alone; a word seen earlier is the automatic stand-in), it is not a stop word, it
    has 3+ letters, and it follows a space (lm-eval splits the target off at the last space).
  - Multiple choice: a passage of whole sentences, and 4 choices: the sentence that truly
    follows it, and 3 sentences from elsewhere in the same work (at least ``MIN_DISTANCE``
    sentences away, each different from the truth, and the closest to it in length of 40 random
    ones: with lengths merely in a range, the distractors ran shorter than the truth, since short
    sentences are the more common, and a scorer that sums log-probabilities picked them: a 5-gram
    scored 19.6%, below chance). Choices have their
    whitespace collapsed to single spaces, so a line break can not tell the truth; scored as
    ``context + " " + choice`` (lm-eval's default delimiter).

  Passages of one work never overlap. Works take turns, so every held-out work contributes
  and any prefix of the file mixes them; each record names its ``work``.

* ``line_cloze`` and ``line_mc`` (``rwkv_tiny``'s, kept so its recipe still reproduces): line-final
  words of verse, and the next line against lines from elsewhere.

Records follow the lm-eval conventions that ``rllm.evaluate.load_task`` reads: ``{"text"}``
for cloze, ``{"context", "choices", "label"}`` for multiple choice.
"""
from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np

from rllm.tokenizer import encode

# Stop words: function words, pronouns, auxiliaries and their archaic forms (LAMBADA's targets
# are content words; a model guesses "the" without reading the passage).
STOP_WORDS = frozenset("""
a about above after again against all also am among an and any are art as at be because been before being below
between both but by came can cannot come could did do does doing done dost doth down during each either else even
ever every few for from further had has hast hath have having he her here hers herself him himself his how i if in
into is it its itself just let like made make many may me might mine more most much must my myself neither never no
none nor not now o of off oh on once one only or other ought our ours ourselves out over own same shall shalt she
should since so some such than that the thee their theirs them themselves then there these they thine thing this
those thou through thus thy thyself till to too under unto until up upon us very was we well were what when where
whether which while who whom whose why will wilt with within without would ye yet you your yours yourself yourselves
""".split())
MIN_DISTANCE = 20  # sentences between a distractor and the true continuation

_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr gen col capt lt sgt rev hon messrs no vs etc viz cf".split())
_SENTENCE_END = re.compile(r"[.!?]+['\")\]]*(?=\s|$)")
_LAST_WORD = re.compile(r"(?<= )([A-Za-z]+)[.!?]+['\")\]]*$")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``: ends after ``.``, ``!`` or ``?`` (and closing
    quotes) before whitespace, not after a title such as "Mr." or a single initial."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        word = re.search(r"([A-Za-z]+)$", text[start:m.start()])
        if text[m.start()] == "." and word and (word.group(1).lower() in _ABBREVIATIONS or len(word.group(1)) == 1):
            continue
        while start < m.start() and text[start].isspace():
            start += 1
        if start < m.start():
            spans.append((start, m.end()))
        start = m.end()
    return spans


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z]+", s.lower())


def _passage_start(spans, i: int, want_chars: int) -> int:
    """Index of the earliest sentence such that sentences j..i span at least ``want_chars``."""
    j = i
    while j > 0 and spans[i][1] - spans[j][0] < want_chars:
        j -= 1
    return j


def _take_turns(per_work: dict[str, list], n_items: int, rng: random.Random) -> list:
    """Items from each work in turn (works in a seeded order) until ``n_items`` or none left."""
    names = sorted(per_work)
    rng.shuffle(names)
    queues = {n: list(per_work[n]) for n in names}
    out = []
    while len(out) < n_items and any(queues.values()):
        for n in names:
            if queues[n] and len(out) < n_items:
                out.append(queues[n].pop(0))
    return out


def _cloze_candidates(doc, tok, rng, min_tokens, max_tokens, chars_per_token) -> list[dict]:
    text, spans = doc.text, sentence_spans(doc.text)
    order = list(range(1, len(spans)))
    rng.shuffle(order)
    taken: list[tuple[int, int]] = []
    out = []
    for i in order:
        s0, s1 = spans[i]
        m = _LAST_WORD.search(text[s0:s1])
        if not m or len(m.group(1)) < 3 or m.group(1).lower() in STOP_WORDS:
            continue
        word, end = m.group(1), s0 + m.end(1)
        j = _passage_start(spans, i, int(rng.randint(min_tokens + 10, max_tokens - 10) * chars_per_token))
        start = spans[j][0]
        if j == i or word.lower() not in _words(text[start:s0]) or any(start < b and a < end for a, b in taken):
            continue
        passage = text[start:end]
        if not (min_tokens <= len(encode(tok, passage)) <= max_tokens):
            continue
        taken.append((start, end))
        out.append({"text": passage, "work": doc.name})
    return out


def lambada_cloze(docs, tok, n_items: int = 500, min_tokens: int = 60, max_tokens: int = 200, seed: int = 0,
                  chars_per_token: float = 3.8) -> list[dict]:
    """LAMBADA-style ``{"text", "work"}`` passages from ``docs``; ``text`` ends with its target word."""
    rng = random.Random(seed)
    per_work = {d.name: _cloze_candidates(d, tok, rng, min_tokens, max_tokens, chars_per_token) for d in docs}
    return _take_turns(per_work, n_items, rng)


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _distractors(sents: list[str], i: int, true: str, rng, pool: int = 40, tries: int = 400) -> list[str] | None:
    """Three sentences of the same work, far from sentence ``i``, all different: of ``pool`` random
    candidates, the three closest to the truth in length (characters, within a factor 1.5), so that
    a choice's length says little about which one is true."""
    cands: dict[str, float] = {}
    for _ in range(tries):
        k = rng.randrange(len(sents))
        cand = sents[k]
        ratio = math.log(len(cand) / len(true))
        if abs(k - i) < MIN_DISTANCE or abs(ratio) > math.log(1.5) or _words(cand) == _words(true):
            continue
        cands.setdefault(cand, abs(ratio))
        if len(cands) == pool:
            break
    out: list[str] = []
    for cand in sorted(cands, key=lambda c: (cands[c], c)):
        if not any(_words(cand) == _words(c) for c in out):
            out.append(cand)
        if len(out) == 3:
            return out
    return None


def _mc_candidates(doc, tok, rng, min_tokens, max_tokens, chars_per_token, min_words, max_words) -> list[dict]:
    text, spans = doc.text, sentence_spans(doc.text)
    sents = [_one_line(text[a:b]) for a, b in spans]
    order = list(range(1, len(spans)))
    rng.shuffle(order)
    taken: list[tuple[int, int]] = []
    out = []
    for i in order:  # sentence i is the true continuation of the passage ending at sentence i - 1
        if not (min_words <= len(sents[i].split()) <= max_words):
            continue
        j = _passage_start(spans, i - 1, int(rng.randint(min_tokens, max_tokens) * chars_per_token))
        start, end = spans[j][0], spans[i][1]
        if any(start < b and a < end for a, b in taken):
            continue
        context = text[start:spans[i - 1][1]]
        if not (min_tokens <= len(encode(tok, context)) <= max_tokens):
            continue
        others = _distractors(sents, i, sents[i], rng)
        if others is None:
            continue
        label = rng.randrange(4)
        taken.append((start, end))
        out.append({"context": context, "choices": others[:label] + [sents[i]] + others[label:], "label": label,
                    "work": doc.name})
    return out


def hellaswag_mc(docs, tok, n_items: int = 500, min_tokens: int = 40, max_tokens: int = 160, seed: int = 0,
                 chars_per_token: float = 3.8, min_words: int = 6, max_words: int = 40) -> list[dict]:
    """HellaSwag-shaped ``{"context", "choices" (4), "label", "work"}`` items from ``docs``."""
    rng = random.Random(seed + 1)
    per_work = {d.name: _mc_candidates(d, tok, rng, min_tokens, max_tokens, chars_per_token, min_words, max_words)
                for d in docs}
    return _take_turns(per_work, n_items, rng)


# --- rwkv_tiny's line-based sets ------------------------------------------------------------

_CLOZE_TARGET = re.compile(r"(?<= )([A-Za-z][a-z]{3,})(?=[.,;:!?'\"-]*\n)")
# Function words are poor cloze targets (LAMBADA's targets are mostly content words).
_CLOZE_STOP = frozenset("""
about after again against also among be been before being below between both but by came come could does doing done
down during each either even ever every from had hast hath have having here hers herself him himself his into itself
just like made make many mine more most much must myself neither never none nor not now once only other ought our ours
over same shall should since some such than that thee their theirs them then there these they thine thing this those
thou through thus thyself till unto upon very want well were what when where whether which while whom whose will with
within without would yet your yours yourself
""".split())


def line_cloze(docs, tok, n_items: int = 500, min_tokens: int = 60, max_tokens: int = 150, seed: int = 0,
                max_per_word: int = 3) -> list[dict]:
    """LAMBADA-style passages: each ``text`` ends with its target word (no trailing punctuation).

    Targets are line-final words (4+ letters, not all capitals, not function words) preceded by a
    space, each word used at most ``max_per_word`` times; the passage
    starts at a line start and is ``min_tokens``..``max_tokens`` tokens long. Passages whose
    target word already occurs earlier in the passage (LAMBADA's typical case: the answer is
    recoverable from the broader context) are preferred, then the others, all in a seeded order.
    """
    rng = random.Random(seed)
    cands = []
    for d in docs:
        text = d.text
        line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        for m in _CLOZE_TARGET.finditer(text):
            end = m.end()
            line_start = text.rfind("\n", 0, m.start()) + 1
            if text[line_start:line_start + 1] == "[" or m.group(1).lower() in _CLOZE_STOP:
                continue
            want = rng.randint(min_tokens + 10, max_tokens - 10)
            # walk back over line starts until the passage is long enough (estimate: ~3.5 chars/token)
            lo = np.searchsorted(line_starts, max(0, end - int(want * 3.5)))
            start = line_starts[min(lo, len(line_starts) - 1)]
            if start >= line_start:
                continue
            cands.append((d.name, start, end, m.group(1)))
    rng.shuffle(cands)
    items, seen_ends, per_word = [], set(), {}
    preferred, rest = [], []
    texts = {d.name: d.text for d in docs}
    for name, start, end, word in cands:
        passage = texts[name][start:end]
        context = passage[: -len(word)]
        (preferred if re.search(rf"\b{re.escape(word)}\b", context, re.I) else rest).append((name, end, passage, word))
    for name, end, passage, word in preferred + rest:
        if len(items) >= n_items:
            break
        if (name, end) in seen_ends or per_word.get(word.lower(), 0) >= max_per_word:
            continue
        n = len(encode(tok, passage))
        if not (min_tokens <= n <= max_tokens):
            continue
        seen_ends.add((name, end))
        per_word[word.lower()] = per_word.get(word.lower(), 0) + 1
        items.append({"text": passage})
    return items


def _content_line(line: str) -> bool:
    s = line.strip()
    return len(s.split()) >= 4 and not s.startswith("[") and not s.isupper()


def line_mc(docs, tok, n_items: int = 300, min_ctx_tokens: int = 40, max_ctx_tokens: int = 120, seed: int = 0) -> list[dict]:
    """HellaSwag-style items: ``context`` (whole lines, ending with a newline) and 4 ``choices``.

    The true choice is the line that follows the context; the 3 others are lines drawn from
    elsewhere in the evaluation works (at least 50 lines away, of comparable length). The text
    to score is ``context + choice`` (no separator). ``label`` is the index of the true line.
    """
    rng = random.Random(seed + 1)
    pool = []  # (doc index, line index, line)
    doc_lines = [d.text.split("\n") for d in docs]
    for di, lines in enumerate(doc_lines):
        for li, line in enumerate(lines):
            if _content_line(line):
                pool.append((di, li, line.strip()))
    order = list(range(len(pool)))
    rng.shuffle(order)
    items, used = [], set()
    for idx in order:
        if len(items) >= n_items:
            break
        di, li, true = pool[idx]
        lines = doc_lines[di]
        want = rng.randint(min_ctx_tokens, max_ctx_tokens)
        start, ctx = li, ""
        while start > 0:
            start -= 1
            ctx = "\n".join(lines[start:li]) + "\n"
            if len(ctx) >= want * 3.5:
                break
        n_ctx = len(encode(tok, ctx)) if ctx.strip() else 0
        if not (min_ctx_tokens <= n_ctx <= max_ctx_tokens) or (di, li) in used:
            continue
        distractors, tries = [], 0
        while len(distractors) < 3 and tries < 1000:
            tries += 1
            dj, lj, cand = pool[rng.randrange(len(pool))]
            if (dj == di and abs(lj - li) < 50) or cand == true or cand in distractors:
                continue
            if not (0.5 * len(true) <= len(cand) <= 2.0 * len(true)):
                continue
            distractors.append(cand)
        if len(distractors) < 3:
            continue
        label = rng.randrange(4)
        choices = distractors[:label] + [true] + distractors[label:]
        used.add((di, li))
        items.append({"context": ctx, "choices": choices, "label": label})
    return items


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
