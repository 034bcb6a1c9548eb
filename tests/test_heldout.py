"""Held-out task builders: LAMBADA-style cloze and HellaSwag-shaped multiple choice, on synthetic works."""
import random
import re

import pytest

from rllm.training.corpus import Document
from rllm.evaluate import ClozeItem, load_task
from rllm.training.heldout import (MIN_DISTANCE, STOP_WORDS, hellaswag_mc, lambada_cloze, sentence_spans, write_jsonl)
from rllm.tokenizer import train_tokenizer

NAMES = "Anna Boris Clara Dmitri Elena Felix Greta Hugo".split()
NOUNS = "lantern garden river letter violin harbour orchard carriage window meadow".split()
VERBS = "found carried painted opened watched mended".split()


def story(rng, n):
    """Sentences that often end with a noun or a name seen a few sentences before (cloze targets),
    mixed with ones ending in stop words (never targets), and a title ("Mr.") that must not end a sentence."""
    out, seen = [], []
    for i in range(n):
        who, what = rng.choice(NAMES), rng.choice(NOUNS)
        kind = i % 4
        if kind == 0:
            s = f"{who} {rng.choice(VERBS)} the old {what} near the {rng.choice(NOUNS)}."
        elif kind == 1 and seen:
            s = f"Later that evening Mr. {rng.choice(NAMES)} asked about the {rng.choice(seen)}."
        elif kind == 2:
            s = f"Nobody knew what {who} had been thinking of."
        else:
            s = f"The {what} was quiet, and {who} said nothing more to {rng.choice(NAMES)}!"
        seen.append(what)
        out.append(s)
        if i % 5 == 4:
            out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n") + "\n"


@pytest.fixture(scope="module")
def works():
    rng = random.Random(0)
    return [Document("fiction/one", story(rng, 400)), Document("fiction/two", story(rng, 300))]


@pytest.fixture(scope="module")
def tok(works):
    return train_tokenizer([d.text for d in works], 400)


def test_sentences_end_at_terminal_punctuation_but_not_after_a_title():
    text = 'Mr. Hugo came. "Why?" she asked! J. Smith left. Done\n'
    assert [text[a:b] for a, b in sentence_spans(text)] == ['Mr. Hugo came.', '"Why?"', 'she asked!', 'J. Smith left.']


def test_cloze_targets_occur_earlier_and_are_not_stop_words(works, tok):
    items = lambada_cloze(works, tok, n_items=1000, min_tokens=30, max_tokens=120)
    assert len(items) >= 20
    texts = {d.name: d.text for d in works}
    for it in items:
        item = ClozeItem.from_text(it["text"])
        word = item.target.strip()
        assert item.target == " " + word and word.isalpha() and len(word) >= 3
        assert word.lower() not in STOP_WORDS
        # the passage is text of its work, and the target ends a sentence there
        pos = texts[it["work"]].index(it["text"])
        assert re.match(r"[.!?]", texts[it["work"]][pos + len(it["text"]):])
        # the word occurs before the target sentence, not only in it
        last_start = max(b for a, b in [(0, 0)] + [(a, b) for a, b in sentence_spans(it["text"])] if b < len(it["text"]))
        assert re.search(rf"\b{word}\b", it["text"][:last_start], re.I), it["text"]
        assert 30 <= len(tok.encode(it["text"]).ids) <= 120


def test_cloze_passages_of_a_work_do_not_overlap_and_works_take_turns(works, tok):
    items = lambada_cloze(works, tok, n_items=1000, min_tokens=30, max_tokens=120)
    for name, text in ((d.name, d.text) for d in works):
        spans = sorted((text.index(it["text"]), text.index(it["text"]) + len(it["text"])) for it in items if it["work"] == name)
        assert all(b <= a2 for (a, b), (a2, _) in zip(spans, spans[1:]))
    assert {it["work"] for it in items[:2]} == {"fiction/one", "fiction/two"}
    assert lambada_cloze(works, tok, n_items=5, min_tokens=30, max_tokens=120) == items[:5]  # seeded


def test_mc_truth_follows_the_context_and_distractors_come_from_the_same_work(works, tok):
    items = hellaswag_mc(works, tok, n_items=1000, min_tokens=30, max_tokens=120)
    assert len(items) >= 20
    texts = {d.name: d.text for d in works}
    spans = {d.name: sentence_spans(d.text) for d in works}
    sents = {d.name: [" ".join(d.text[a:b].split()) for a, b in spans[d.name]] for d in works}
    labels = set()
    for it in items:
        text, truth = texts[it["work"]], it["choices"][it["label"]]
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        # the context is text of the work, and the true choice is the very next sentence
        pos = text.index(it["context"]) + len(it["context"])
        assert " ".join(text[pos:].split()).startswith(truth)
        i = next(k for k, (a, _) in enumerate(spans[it["work"]]) if a >= pos)  # the true sentence's index
        for k, choice in enumerate(it["choices"]):
            assert "\n" not in choice
            if k != it["label"]:
                assert choice != truth and choice in sents[it["work"]]
                assert 1 / 1.5 <= len(choice) / len(truth) <= 1.5  # length is no cue
                assert any(abs(j - i) >= MIN_DISTANCE for j, s in enumerate(sents[it["work"]]) if s == choice)
        labels.add(it["label"])
    assert labels == {0, 1, 2, 3}


def test_written_sets_load_with_the_evaluation_loaders(works, tok, tmp_path):
    write_jsonl(tmp_path / "cloze.jsonl", lambada_cloze(works, tok, n_items=10, min_tokens=30, max_tokens=120))
    write_jsonl(tmp_path / "mc.jsonl", hellaswag_mc(works, tok, n_items=10, min_tokens=30, max_tokens=120))
    cloze, mc = load_task(tmp_path / "cloze.jsonl"), load_task(tmp_path / "mc.jsonl")
    assert len(cloze) == 10 and all(isinstance(c, ClozeItem) for c in cloze)
    assert len(mc) == 10 and all(m.target_delimiter == " " and len(m.choices) == 4 for m in mc)
