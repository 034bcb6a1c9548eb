"""N-gram baseline: distributions sum to 1 over the vocabulary, and it beats a unigram model."""
import math
from collections import Counter

import numpy as np
import pytest

from rllm.training.ngram import log_probs, next_token_probs, perplexity, train_ngram


def markov_stream(n, V=50, seed=0):
    """A sparse second-order Markov chain: n-gram structure that a unigram model cannot see."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, V, size=(V, V, 3))  # each (a, b) context has 3 likely successors
    out = [0, 1]
    for _ in range(n - 2):
        a, b = out[-2], out[-1]
        out.append(int(table[a, b, rng.integers(3)]) if rng.random() < 0.9 else int(rng.integers(V)))
    return np.array(out)


@pytest.fixture(scope="module")
def data():
    s = markov_stream(60_000, seed=0)
    return s[:50_000], s[50_000:]  # train, held-out continuation of the same chain


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_distributions_sum_to_one(order, data):
    train, _ = data
    V = 64  # larger than the ids used: unseen tokens must still get probability
    m = train_ngram(train, V, order)
    for ctx in ([], [3], [0, 1], [5, 7, 9], list(train[100:110]), [63, 62, 61]):
        p = next_token_probs(m, ctx)
        assert p.shape == (V,) and np.all(p > 0)
        assert abs(p.sum() - 1.0) < 1e-9
    # the stream scorer agrees with the full distribution
    ids = train[200:205]
    assert np.isclose(log_probs(m, ids)[-1], np.log(next_token_probs(m, ids[:-1])[ids[-1]]))


def test_beats_unigram_on_held_out(data):
    train, held = data
    uni = perplexity(train_ngram(train, 50, 1), held)
    tri = perplexity(train_ngram(train, 50, 3), held)
    four = perplexity(train_ngram(train, 50, 4), held)
    assert tri < 0.5 * uni and four < 0.5 * uni


def test_errors():
    with pytest.raises(ValueError):
        train_ngram([1, 2, 3], 10, 0)
    with pytest.raises(ValueError, match="must lie in"):
        train_ngram([1, 2, 30], 10, 2)


def reference_kn(train, V, N):
    """Interpolated Kneser-Ney written from the module docstring with dicts: P(w | h) for a tuple h."""
    train = [int(t) for t in train]
    grams = {k: Counter(tuple(train[i:i + k]) for i in range(len(train) - k + 1)) for k in range(1, N + 1)}
    cnt = {k: (dict(grams[k]) if k == N else dict(Counter(g[1:] for g in grams[k + 1]))) for k in range(1, N + 1)}
    disc, S, T = {}, {}, {}
    for k, c in cnt.items():
        n1, n2 = sum(v == 1 for v in c.values()), sum(v == 2 for v in c.values())
        disc[k] = 0.5 if n1 == 0 else min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)
        S[k], T[k] = Counter(), Counter()
        for g, v in c.items():
            S[k][g[:-1]] += v
            T[k][g[:-1]] += 1

    def prob(w, h):
        p = max(cnt[1].get((w,), 0) - disc[1], 0) / S[1][()] + disc[1] * T[1][()] / S[1][()] / V
        for k in range(2, N + 1):
            hist = tuple(h[len(h) - (k - 1):]) if len(h) >= k - 1 else None
            if hist is None or S[k][hist] == 0:
                continue
            p = max(cnt[k].get(hist + (w,), 0) - disc[k], 0) / S[k][hist] + disc[k] * T[k][hist] / S[k][hist] * p
        return p

    return prob


@pytest.mark.parametrize("order", [2, 3, 5])
def test_matches_a_dictionary_implementation(order):
    train = markov_stream(3000, V=12, seed=3)
    held = markov_stream(300, V=12, seed=4)
    prob = reference_kn(train, 13, order)
    want = [math.log(prob(int(held[i]), [int(t) for t in held[max(0, i - order + 1):i]])) for i in range(1, len(held))]
    np.testing.assert_allclose(log_probs(train_ngram(train, 13, order), held), want, rtol=1e-12)


def test_a_5gram_over_a_large_vocabulary_fits():
    """Keys are ranks * V + token, so V ** 5 > 2 ** 63 is no obstacle (60,000 ** 5 is 7.8e23)."""
    rng = np.random.default_rng(0)
    train = rng.integers(59_000, 60_000, 5000)
    m = train_ngram(train, 60_000, 5)
    p = next_token_probs(m, train[10:14])
    assert abs(p.sum() - 1.0) < 1e-9 and p[train[14]] > 1e-3
