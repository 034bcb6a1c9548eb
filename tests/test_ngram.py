"""N-gram baseline: distributions sum to 1 over the vocabulary, and it beats a unigram model."""
import numpy as np
import pytest

from rllm.ngram import log_probs, next_token_probs, perplexity, train_ngram


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
    with pytest.raises(ValueError, match="int64"):
        train_ngram([1, 2, 3], 60_000, 5)
