"""Evaluation: perplexity, cloze and multiple choice against independent computations and stubs."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rllm.evaluate import (
    ClozeItem, MCItem, applied_thresholds, cloze_accuracy, context_limit, detect_kind, encode_pair, evaluate_all,
    is_recurrent, load_task, loglikelihood, multiple_choice, perplexity, supports_state, token_nll,
)
from rllm.model import RWKV, RWKVConfig

DATA = Path(__file__).parent / "data"
SENTENCES = [
    "the cat sat on the mat and the dog sat on the rug",
    "she read the letter from her grandmother twice",
    "he planted the seeds in spring and the garden was full of flowers",
    "the sun is a source of light and the moon reflects it",
    "water freezes at zero degrees and boils at one hundred",
] * 3


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: threads only add overhead (restored for the other test files)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(SENTENCES, trainer=trainer)
    return t


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def rwkv(tok):
    torch.manual_seed(0)
    m = RWKV(RWKVConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_embd=32))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]))
            elif "time_mix" in name:
                p.uniform_(0, 1)
            elif "time_" in name:
                p.normal_()
    return m.eval()


def direct_nll(model, ids):
    """Summed next-token cross entropy of one full pass, straight from torch."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x[:, :-1])
    return F.cross_entropy(logits[0].double(), x[0, 1:], reduction="sum").item()


class Bigram(nn.Module):
    """A stateless LM whose logits at a position depend only on the token there."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, idx):
        return self.table[idx]


def favouring(vocab, successor: dict, strength=10.0):
    """Bigram logits: ``strength`` on ``successor[t]`` after token ``t``, 0 elsewhere."""
    table = torch.zeros(vocab, vocab)
    for t, s in successor.items():
        table[t, s] = strength
    return Bigram(table)


TEXT = " ".join(SENTENCES[:5])


# --------------------------------------------------------------------------------- perplexity
def test_perplexity_equals_direct_cross_entropy(rwkv, tok):
    ids = ids_of(tok, TEXT)
    r = perplexity(rwkv, tok, TEXT, bos_id=None, progress=False)
    nll = direct_nll(rwkv, ids)
    assert r.n_tokens == len(ids) - 1 and r.mode == "stateful"
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
    assert r.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()), rel=1e-5)
    assert r.n_words == len(TEXT.split())
    # token ids in, same numbers, no byte counts
    r2 = perplexity(rwkv, None, torch.tensor(ids), progress=False)
    assert r2.nll == pytest.approx(r.nll, rel=1e-6) and r2.bits_per_byte is None


def test_stateful_windows_equal_one_full_pass(rwkv, tok):
    ids = ids_of(tok, TEXT)
    assert supports_state(rwkv) and is_recurrent(rwkv) and context_limit(rwkv) is None and len(ids) > 40
    full = perplexity(rwkv, tok, TEXT, ctx=10_000, progress=False)  # bos "auto": <|endoftext|> first
    assert full.n_tokens == len(ids)
    assert full.nll == pytest.approx(direct_nll(rwkv, [0] + ids), rel=1e-5)
    for ctx in (5, 16):  # batch_size=1: windows of ctx tokens; the default 8: of 8 x ctx (one document)
        for bs in (1, 8):
            r = perplexity(rwkv, tok, TEXT, ctx=ctx, batch_size=bs, progress=False)
            assert r.nll == pytest.approx(full.nll, rel=1e-5)


def test_one_document_runs_in_windows_of_batch_size_times_ctx(rwkv, tok, monkeypatch):
    """A batch of one document fills the batch's budget of batch_size x ctx tokens a pass: fewer,
    longer windows, the same exact pass."""
    ids = [0] + ids_of(tok, TEXT)
    widths = []
    forward = rwkv.forward

    def counting(idx, state=None, return_state=False, logits=True):
        widths.append(idx.shape[1])
        return forward(idx, state=state, return_state=return_state, logits=logits)

    monkeypatch.setattr(rwkv, "forward", counting)
    r = perplexity(rwkv, None, ids, ctx=5, batch_size=4, bos_id=None, progress=False)
    assert widths[:-1] == [20] * (len(widths) - 1) and sum(widths) == len(ids) - 1 and len(widths) > 2
    monkeypatch.undo()
    assert r.nll == pytest.approx(direct_nll(rwkv, ids), rel=1e-5)


def test_token_nll_is_the_per_token_cross_entropy(rwkv, tok):
    ids = ids_of(tok, TEXT)
    with torch.no_grad():
        logits = rwkv(torch.tensor([ids[:-1]]))
    ref = F.cross_entropy(logits[0].double(), torch.tensor(ids[1:]), reduction="none")
    for ctx in (5, 10_000):  # the state carried across windows: the same numbers
        nll = token_nll(rwkv, ids, ctx=ctx)
        assert nll.dtype == torch.float64 and nll.shape == (len(ids) - 1,)
        torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-6)
    # the same windows, so the same float32 arithmetic: perplexity is the exp of the mean, to rounding
    nll7 = token_nll(rwkv, ids, ctx=7)
    assert math.exp(float(nll7.mean())) == pytest.approx(
        perplexity(rwkv, None, ids, ctx=7, bos_id=None, progress=False).ppl, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_nll(rwkv, ids[:1])


def test_token_nll_in_chunks_restarts_the_state_at_each_piece(rwkv, tok):
    """chunks=3: every target scored once, in order; each piece equals that piece run alone
    from a fresh state (its first token is the previous piece's last target)."""
    ids = ids_of(tok, TEXT)
    nll = token_nll(rwkv, ids, ctx=6, chunks=3)
    assert nll.shape == (len(ids) - 1,)
    cuts = [round(i * (len(ids) - 1) / 3) for i in range(4)]
    ref = torch.cat([token_nll(rwkv, ids[a: b + 1], ctx=6) for a, b in zip(cuts, cuts[1:])])
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(nll, token_nll(rwkv, ids, ctx=6))  # the restarts are real


def test_batched_documents_equal_one_at_a_time(rwkv, tok):
    docs = SENTENCES[:5]
    for stateful in (True, False):
        one = perplexity(rwkv, tok, docs, ctx=6, batch_size=1, stateful=stateful, progress=False)
        many = perplexity(rwkv, tok, docs, ctx=6, batch_size=3, stateful=stateful, progress=False)
        assert one.n_tokens == many.n_tokens == sum(len(ids_of(tok, d)) for d in docs)
        assert many.nll == pytest.approx(one.nll, rel=1e-5)
    per_doc = sum(direct_nll(rwkv, [0] + ids_of(tok, d)) for d in docs)
    assert many.nll != pytest.approx(per_doc, rel=1e-3)  # windowed at ctx=6 loses context
    assert perplexity(rwkv, tok, docs, batch_size=2, progress=False).nll == pytest.approx(per_doc, rel=1e-5)


def test_windowed_scores_every_token_once(tok):
    ids = ids_of(tok, TEXT)
    V = tok.get_vocab_size()
    stub = Bigram(torch.randn(V, V, generator=torch.Generator().manual_seed(3)))
    nll = direct_nll(stub, ids)  # a bigram model needs no context, so any windowing is exact
    assert not supports_state(stub)
    for ctx, stride in ((4, None), (6, 2), (5, 5), (1, None)):
        r = perplexity(stub, None, ids, ctx=ctx, stride=stride, stateful=False, batch_size=4, progress=False)
        assert r.n_tokens == len(ids) - 1 and r.mode == "windowed"
        assert r.nll == pytest.approx(nll, rel=1e-6)


class BoundedCache(Bigram):
    """Takes a state like a transformer's key/value cache, but sees at most ``limit`` tokens."""

    def __init__(self, table, limit):
        super().__init__(table)
        self.config = type("Cfg", (), {"context_length": limit})()

    def forward(self, idx, state=None, return_state=False):
        seen = (state or 0) + idx.shape[1]
        if seen > self.config.context_length:
            raise ValueError(f"position {seen} beyond the context")
        return (self.table[idx], seen) if return_state else self.table[idx]


def test_bounded_state_models_fall_back_to_windows(tok):
    ids = ids_of(tok, TEXT)
    V = tok.get_vocab_size()
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(4))
    stub, unbounded = BoundedCache(table, limit=16), Bigram(table)
    nll = direct_nll(stub, ids[:10])
    assert supports_state(stub) and context_limit(stub) == 16 and not is_recurrent(stub)
    short = perplexity(stub, None, ids[:10], ctx=4, progress=False)
    assert short.mode == "stateful" and short.nll == pytest.approx(nll, rel=1e-6)
    long = perplexity(stub, None, ids, ctx=16, progress=False)
    assert long.mode == "windowed" and long.nll == pytest.approx(direct_nll(unbounded, ids), rel=1e-6)
    # continuations are scored on the last 16 tokens (lm-eval's left truncation) instead of failing
    (ll, _), = loglikelihood(stub, [(ids[:-3], ids[-3:])], progress=False)
    assert ll == pytest.approx(-direct_nll(stub, ids[-4:]), rel=1e-5)


def test_windowed_rwkv_equals_manual_windows(rwkv, tok):
    ids = ids_of(tok, TEXT)
    ctx = 8
    n, manual = len(ids), 0.0
    assert (n - 1) % ctx != 0  # so that the last window is a short one
    for s in range(0, n - 1, ctx):  # non-overlapping inputs, each window from an empty state
        if s + ctx < n - 1:
            manual += direct_nll(rwkv, ids[s:s + ctx + 1])
        else:  # the last window reaches back to a full ctx of input, scoring only its new tokens
            x = torch.tensor([ids[n - 1 - ctx:]])
            with torch.no_grad():
                logits = rwkv(x[:, :-1])[0]
            k = n - 1 - s
            manual += F.cross_entropy(logits[-k:].double(), x[0, -k:], reduction="sum").item()
    r = perplexity(rwkv, None, ids, ctx=ctx, stateful=False, progress=False)
    assert r.nll == pytest.approx(manual, rel=1e-5)
    with pytest.raises(ValueError, match="stride"):
        perplexity(rwkv, None, ids, ctx=ctx, stride=4, progress=False)


# --------------------------------------------------------------------------------- cloze
CLOZE = ["she sat on the", "he saw a zebra", "the moon reflects it"]  # no token needs two successors


def test_cloze_split_and_tokenization_boundary(tok):
    assert ClozeItem.from_text("the cat sat on the mat") == ClozeItem("the cat sat on the", " mat")
    ctx, cont = encode_pair(tok, "the cat sat on the", " mat")
    assert ctx + cont == ids_of(tok, "the cat sat on the mat") and ctx == ids_of(tok, "the cat sat on the")
    # trailing spaces of the context move to the continuation (lm-eval)
    assert encode_pair(tok, "the cat sat on the ", "mat") == (ctx, cont)
    with pytest.raises(ValueError, match="no space"):
        ClozeItem.from_text("word")


def _transitions(tok, texts):
    """For each cloze item: (last context token, target tokens)."""
    out = []
    for t in texts:
        it = ClozeItem.from_text(t)
        c, x = encode_pair(tok, it.context, it.target)
        out.append((c[-1], x))
    return out


def test_cloze_accuracy_known_answers(tok):
    V = tok.get_vocab_size()
    trans = _transitions(tok, CLOZE)
    right, first_only = {}, {}
    for last, target in trans:
        chain = [last] + target
        for a, b in zip(chain, chain[1:]):
            assert right.setdefault(a, b) == b, "fixture clash: a token with two successors"
        first_only[last] = target[0]
    assert any(len(x) > 1 for _, x in trans) and any(len(x) == 1 for _, x in trans)

    good = cloze_accuracy(favouring(V, right), tok, CLOZE, batch_size=3, progress=False)
    assert good.acc == 1.0 and good.n == len(CLOZE) and all(good.correct)
    lp = 10.0 - math.log(math.exp(10.0) + V - 1)  # log-prob of the favoured token
    n_target = [len(x) for _, x in trans]
    assert good.target_nll == pytest.approx(tuple(-lp * n for n in n_target), abs=1e-5)
    assert good.ppl == pytest.approx(math.exp(-lp * sum(n_target) / len(CLOZE)), abs=1e-5)

    wrong = cloze_accuracy(favouring(V, {a: (b + 1) % V for a, b in right.items()}), tok, CLOZE, progress=False)
    assert wrong.acc == 0.0 and wrong.n_correct == 0
    # right on the first target token only: only single-token targets count as correct
    partial = cloze_accuracy(favouring(V, first_only), tok, CLOZE, progress=False)
    assert partial.correct == tuple(n == 1 for n in n_target)


def test_cloze_loads_lambada_file(tok, rwkv):
    r = cloze_accuracy(rwkv, tok, DATA / "lambada.jsonl", progress=False)
    assert r.n == 2 and 0.0 <= r.acc <= 1.0 and r.ppl > 1


# --------------------------------------------------------------------------------- multiple choice
def test_acc_and_acc_norm_differ(tok):
    V = tok.get_vocab_size()
    uniform = Bigram(torch.zeros(V, V))  # every token has log-prob -log V
    short, long = "the", "the the the"
    assert len(ids_of(tok, " " + short)) == 1 and len(ids_of(tok, " " + long)) == 3
    item = MCItem("she read", (short, long), label=1)
    r = multiple_choice(uniform, tok, [item], progress=False)
    assert r.loglikelihoods[0] == pytest.approx((-math.log(V), -3 * math.log(V)))
    # acc: the short choice has the larger total; acc_norm: -logV/3 < -3logV/11 per character
    assert r.pred == (0,) and r.pred_norm == (1,) and r.acc == 0.0 and r.acc_norm == 1.0
    flipped = multiple_choice(uniform, tok, [MCItem("she read", (short, long), label=0)], progress=False)
    assert flipped.acc == 1.0 and flipped.acc_norm == 0.0
    assert MCItem("c", ("é", "ab"), 0).norm_lengths("bytes") == [2, 2]
    assert MCItem("c", ("é", "ab"), 0).norm_lengths("chars") == [1, 2]


def test_loglikelihoods_match_direct_computation(rwkv, tok):
    items = load_task(DATA / "piqa.jsonl") + load_task(DATA / "winogrande.jsonl") + load_task(DATA / "hellaswag.jsonl")
    r = multiple_choice(rwkv, tok, items, batch_size=3, progress=False)
    for it, lls in zip(items, r.loglikelihoods):
        for (c, x), ll in zip(it.requests(), lls):
            ci, xi = encode_pair(tok, c, x)
            whole = torch.tensor([ci + xi])
            with torch.no_grad():
                lp = torch.log_softmax(rwkv(whole[:, :-1])[0].double(), -1)
            expect = sum(lp[len(ci) - 1 + k, t].item() for k, t in enumerate(xi))
            assert ll == pytest.approx(expect, rel=1e-4, abs=1e-4)
    assert r.n == 6 and len(r.pred) == 6
    # truncating from the left (lm-eval's max_length) still scores the whole continuation
    reqs = [encode_pair(tok, *items[0].requests()[0])]
    (full, _), = loglikelihood(rwkv, reqs, progress=False)
    (cut, _), = loglikelihood(rwkv, reqs, max_length=len(reqs[0][1]) + 2, progress=False)
    assert full == pytest.approx(r.loglikelihoods[0][0], rel=1e-5) and cut != pytest.approx(full, rel=1e-6)


def test_mutual_information_subtracts_each_choice_alone(rwkv, tok):
    """acc_mutual_info (lm-eval's): the choice whose log-likelihood after the context most exceeds
    its log-likelihood alone (after the start token), each side computed by the slow reference."""
    items = load_task(DATA / "piqa.jsonl") + load_task(DATA / "hellaswag.jsonl")
    r = multiple_choice(rwkv, tok, items, progress=False, mutual_info=True)
    hits = []
    for i, it in enumerate(items):
        cond = [_alone(rwkv, tok, c, x)[0] for c, x in it.requests()]
        alone = [_alone(rwkv, tok, "", c)[0] for c in it.choices]
        assert r.loglikelihoods[i] == pytest.approx(cond, rel=1e-4, abs=1e-4)
        assert r.unconditional[i] == pytest.approx(alone, rel=1e-4, abs=1e-4)
        gain = [a - b for a, b in zip(cond, alone)]
        assert r.pred_mutual_info[i] == max(range(len(gain)), key=lambda j: (gain[j], -j))
        hits.append(r.pred_mutual_info[i] == it.label)
    assert r.acc_mutual_info == pytest.approx(sum(hits) / len(items))
    assert "acc_mutual_info" in r.to_dict() and "acc_mutual_info" not in multiple_choice(
        rwkv, tok, items, progress=False).to_dict()
    with pytest.raises(ValueError, match="partial-context"):
        multiple_choice(rwkv, tok, load_task(DATA / "winogrande.jsonl"), progress=False, mutual_info=True)


def _alone(model, tok, context, continuation):
    """The slow reference: one request alone, one plain forward over context + continuation,
    float64 log-softmax: (summed log-probability of the continuation, every token the argmax)."""
    ci, xi = encode_pair(tok, context, continuation)
    ci = ci or [0]  # an empty context is the start token
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ci + xi])[:, :-1])[0].double(), -1)[len(ci) - 1:]
    target = torch.tensor(xi)
    return lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


def _greedy_cloze(model, tok, n):
    """Cloze items whose 1- or 2-token target is the model's own greedy continuation (so that
    ``correct`` is tested on both outcomes); taken at token boundaries of SENTENCES."""
    items = []
    with torch.no_grad():
        for ids in (ids_of(tok, s) for s in SENTENCES[:5]):
            for k in range(2, len(ids) - 1, 3):
                g = [int(model(torch.tensor([ids[:k]]))[0, -1].argmax())]
                if k % 2:  # every other item a second greedy token
                    g.append(int(model(torch.tensor([ids[:k] + g]))[0, -1].argmax()))
                c, x = tok.decode(ids[:k]), tok.decode(g)
                if encode_pair(tok, c, x) == (ids[:k], g):  # text that tokenizes back to the same ids
                    items.append(ClozeItem(c, x))
    assert len(items) >= n and {len(ids_of(tok, it.target)) for it in items[:n]} == {1, 2}
    return items[:n]


def test_shared_context_path_equals_each_request_alone(rwkv, tok, monkeypatch):
    """Recurrent models: a context run once, its choices (1 to 29 tokens) continued from its state,
    in token-filled batches small enough to need several prefix and suffix batches, thresholds
    applied; against every request scored alone with a full forward."""
    mc = [MCItem(" ".join(s.split()[:-k]), (s.split()[-k], "the", "on the mat and the dog", "zebra"), label=k % 4)
          for k, s in zip((1, 2, 3, 4, 5, 1), SENTENCES[:6])]
    mc += load_task(DATA / "winogrande.jsonl") + load_task(DATA / "hellaswag.jsonl") + [MCItem("", ("a", "b c"), 0)]
    assert len({len(ids_of(tok, " " + c)) for it in mc[:6] for c in it.choices}) >= 4
    th = {name: 0.05 for name in rwkv.sites if name != "head"}
    with applied_thresholds(rwkv, th):
        cloze = [ClozeItem.from_text(t) for t in SENTENCES[:5] + CLOZE] + _greedy_cloze(rwkv, tok, 6)
    tokens = []
    forward = rwkv.forward

    def counting(idx, state=None, return_state=False, logits=True):
        tokens.append(idx.numel())
        return forward(idx, state=state, return_state=return_state, logits=logits)

    monkeypatch.setattr(rwkv, "forward", counting)
    r = multiple_choice(rwkv, tok, mc, batch_tokens=48, thresholds=th, progress=False)
    mc_tokens = sum(tokens)
    cz = cloze_accuracy(rwkv, tok, cloze, batch_tokens=48, thresholds=th, progress=False)
    monkeypatch.undo()
    with applied_thresholds(rwkv, th):
        ref = [[_alone(rwkv, tok, c, x) for c, x in it.requests()] for it in mc]
        ref_cz = [_alone(rwkv, tok, it.context, it.target) for it in cloze]
    for got, want in zip(r.loglikelihoods, ref):
        assert got == pytest.approx([ll for ll, _ in want], rel=1e-5, abs=1e-5)
    first_max = lambda xs: max(range(len(xs)), key=lambda i: (xs[i], -i))
    assert r.pred == tuple(first_max([ll for ll, _ in w]) for w in ref)
    assert r.pred_norm == tuple(first_max([ll / n for (ll, _), n in zip(w, it.norm_lengths())])
                                for w, it in zip(ref, mc))
    assert cz.target_nll == pytest.approx([-ll for ll, _ in ref_cz], rel=1e-5, abs=1e-5)
    assert cz.correct == tuple(g for _, g in ref_cz) and 0 < sum(cz.correct) < len(cloze)
    # each context run once: far fewer tokens than the flat requests (every input of every choice)
    flat = sum(len(ci or [0]) + len(xi) - 1 for it in mc for ci, xi in (encode_pair(tok, *q) for q in it.requests()))
    assert mc_tokens < 0.7 * flat


# --------------------------------------------------------------------------------- loaders
def test_loaders_parse_fixtures():
    piqa = load_task(DATA / "piqa.jsonl")
    assert piqa[0] == MCItem("Question: How do you keep bread fresh for longer?\nAnswer:",
                             ("Store it in a sealed bag at room temperature.", "Leave it on the counter without a cover."), 0)
    assert piqa[1].label == 1 and piqa[0].requests()[0][1] == " Store it in a sealed bag at room temperature."

    hs = load_task(DATA / "hellaswag.jsonl")
    assert hs[0].context == "Baking cookies: A woman pours flour into a bowl. She"
    assert hs[0].choices[2] == "paints the bowl . blue." and hs[0].label == 0 and len(hs[0].choices) == 4
    assert hs[1].context == "Home and Garden: How to water a plant. Check the soil. Push a finger into the soil."
    assert hs[1].choices[1] == " Then sing to it loudly."

    arc = load_task(DATA / "arc_hf.jsonl") + load_task(DATA / "arc_original.jsonl")
    assert [a.label for a in arc] == [1, 0, 2, 0]
    assert arc[0].context == "Question: Which of these is a source of light?\nAnswer:" and arc[0].choices[1] == "the Sun"
    assert arc[1].choices == ("sunlight", "sand", "salt") and arc[2].choices[2] == "gram"

    wg = load_task(DATA / "winogrande.jsonl")
    assert wg[0] == MCItem("The trophy did not fit in the case because the ", ("trophy", "case"), 0,
                           continuation="was too big.")
    assert wg[0].requests() == [("The trophy did not fit in the case because the trophy", " was too big."),
                                ("The trophy did not fit in the case because the case", " was too big.")]
    assert wg[1].label == 1

    lam = load_task(DATA / "lambada.jsonl")
    assert lam[0] == ClozeItem("She opened the old box and found a letter from her grandmother. She read the", " letter")

    mc = load_task(DATA / "mc.jsonl")
    assert mc[1] == MCItem("2 + 2 =", ("3", "4"), 1)
    assert [detect_kind(json.loads((DATA / f).open().readline())) for f in
            ("piqa.jsonl", "hellaswag.jsonl", "arc_hf.jsonl", "arc_original.jsonl", "winogrande.jsonl",
             "lambada.jsonl", "mc.jsonl")] == ["piqa", "hellaswag", "arc", "arc", "winogrande", "lambada", "mc"]
    assert load_task(DATA / "piqa.jsonl", kind="piqa") == piqa


@pytest.mark.parametrize("lines, kind, message", [
    (['{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}', "", '{"goal": "g", "sol1": "a", "label": 1'],
     None, r":3: not valid JSON"),
    (['{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}', '{"goal": "g", "sol1": "a", "label": 1}'],
     None, r":2: piqa record lacks key 'sol2'"),
    (['{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}'], None, r":1: .*label 2 out of range"),
    (['{"foo": 1}'], None, r":1: cannot tell the task format"),
    (['[1, 2]'], None, r":1: expected a JSON object"),
    (['{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}'], None, r":1: arc answerKey"),
    (['{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}'], None, r":1: .*no '_'"),
    (['{"text": "oneword"}'], "lambada", r":1: .*no space"),
    ([""], None, r"no records"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, kind, message):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as e:
        load_task(p, kind)
    assert "bad.jsonl" in str(e.value)


# --------------------------------------------------------------------------------- thresholds & summary
def _all_zero(model):
    return all(float(t.abs().max()) == 0.0 for t in model.get_thresholds().values())


def test_thresholds_applied_during_and_restored_after(rwkv, tok):
    V = tok.get_vocab_size()
    base = perplexity(rwkv, tok, TEXT, progress=False)
    # a huge head threshold silences the head's input: logits 0, uniform, ppl = V exactly
    cut = perplexity(rwkv, tok, TEXT, thresholds={"head": 1e9}, progress=False)
    assert cut.ppl == pytest.approx(V, rel=1e-6) and base.ppl != pytest.approx(V, rel=1e-2)
    assert _all_zero(rwkv)
    everywhere = {name: 1e3 for name in rwkv.sites}
    assert perplexity(rwkv, tok, TEXT, thresholds=everywhere, progress=False).ppl != pytest.approx(base.ppl, rel=1e-3)
    assert _all_zero(rwkv)
    # earlier non-zero thresholds come back, also after a failure inside
    rwkv.set_thresholds({"blocks.0.att.key": 0.25})
    try:
        r = cloze_accuracy(rwkv, tok, CLOZE, thresholds={"head": 1e9}, progress=False)
        assert r.ppl == pytest.approx(math.exp(sum(len(x) for _, x in _transitions(tok, CLOZE)) * math.log(V) / len(CLOZE)), rel=1e-5)
        with pytest.raises(KeyError):
            perplexity(rwkv, tok, TEXT, thresholds={"no.such.site": 1.0}, progress=False)
        with pytest.raises(ValueError):
            multiple_choice(rwkv, tok, [MCItem("", ("a",), 0)], bos_id=None, thresholds={"head": 1e9}, progress=False)
        th = rwkv.get_thresholds()
        assert float(th["blocks.0.att.key"]) == 0.25 and float(th["head"]) == 0.0
    finally:
        rwkv.set_thresholds({"blocks.0.att.key": 0.0})
    assert not rwkv.training


def test_evaluate_all_summary(rwkv, tok):
    V = tok.get_vocab_size()
    out = evaluate_all(rwkv, tok, ppl_text=TEXT, cloze_items=DATA / "lambada.jsonl",
                       mc_tasks={"piqa": DATA / "piqa.jsonl", "arc": load_task(DATA / "arc_hf.jsonl")},
                       thresholds={"head": 1e9}, progress=False)
    json.dumps(out)  # plain data
    assert out["perplexity"]["ppl"] == pytest.approx(V, rel=1e-6)
    assert out["cloze"]["n"] == 2 and out["cloze"]["acc"] == 0.0
    assert set(out["mc"]) == {"piqa", "arc"} and out["mc"]["piqa"]["n"] == 2
    assert _all_zero(rwkv)
