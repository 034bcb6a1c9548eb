"""An interpolated Kneser-Ney n-gram language model over token ids: the baseline for the embedded models.

Chen & Goodman's interpolated Kneser-Ney with one absolute discount per order,
``D_k = n1 / (n1 + 2 n2)`` (n1, n2: how many k-grams have count 1 and 2)::

    P_k(w | h) = max(c_k(h w) - D_k, 0) / S_k(h) + D_k T_k(h) / S_k(h) * P_{k-1}(w | h')
    P_1(w)     = max(c_1(w) - D_1, 0) / S_1   + D_1 T_1 / S_1 / V

where ``h'`` drops the oldest token of ``h``, ``S_k(h) = sum_w c_k(h w)`` and ``T_k(h)`` is the
number of distinct ``w`` after ``h``. ``c_N`` are raw counts at the highest order ``N``; lower
orders use continuation counts (the number of distinct tokens seen before the k-gram). A history
never seen at order k backs off to order k - 1 entirely. Every distribution sums to 1 over the
whole vocabulary, unseen tokens included.

Tables are sorted numpy arrays looked up with ``searchsorted``. A k-gram's key is
``rank(its first k-1 tokens) * V + its last token``, where the rank is the (k-1)-gram's index
among the distinct (k-1)-grams of the training stream (for k = 1 the key is the token). Keys
stay below ``tokens * V`` at any order, so a 5-gram over a 12k-token vocabulary fits int64
(``V ** 5`` would not). Two million training tokens take a few seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class _Order:
    keys: np.ndarray  # sorted keys of the k-grams in this order's distribution
    counts: np.ndarray  # c_k of each key (raw at the top order, continuation counts below)
    hist_keys: np.ndarray  # sorted ranks of the (k-1)-gram histories (empty for k = 1)
    hist_sum: np.ndarray  # S_k(h)
    hist_types: np.ndarray  # T_k(h)
    discount: float
    types: np.ndarray  # sorted keys of every distinct k-gram of the stream: a k-gram's rank is its index here


@dataclass
class NGramLM:
    order: int
    vocab_size: int
    orders: list  # _Order for k = 1..order (index k-1)
    num_tokens: int

    def __repr__(self) -> str:
        sizes = ", ".join(str(len(o.keys)) for o in self.orders)
        return f"NGramLM(order={self.order}, vocab_size={self.vocab_size}, tokens={self.num_tokens}, ngrams=[{sizes}])"


def _discount(counts: np.ndarray) -> float:
    n1 = int(np.sum(counts == 1))
    n2 = int(np.sum(counts == 2))
    if n1 == 0 or n1 + 2 * n2 == 0:
        return 0.5
    return float(min(max(n1 / (n1 + 2 * n2), 0.05), 0.95))


def _lookup(table: np.ndarray, values: np.ndarray, queries: np.ndarray, default=0) -> np.ndarray:
    """``values[i]`` where ``table[i] == query``, else ``default``."""
    if len(table) == 0:
        return np.full(queries.shape, default, dtype=values.dtype)
    pos = np.searchsorted(table, queries)
    pos = np.minimum(pos, len(table) - 1)
    hit = table[pos] == queries
    return np.where(hit, values[pos], default)


def _rank(types: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Index of each key in the sorted ``types`` (-1 where absent, or where the key is negative)."""
    if len(types) == 0:
        return np.full(keys.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(types, keys), len(types) - 1)
    return np.where((types[pos] == keys) & (keys >= 0), pos, -1)


def _stream_types(ids: np.ndarray, order: int, V: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per order k: (distinct k-gram keys, their raw counts, the position of one occurrence of
    each, the rank of the k-gram starting at each position 0..n-k)."""
    out = []
    rank = None
    for k in range(1, order + 1):
        n = len(ids) - k + 1
        key = ids[:n] if k == 1 else rank[:n] * V + ids[k - 1:k - 1 + n]
        types, first, rank, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        out.append((types, counts.astype(np.int64), first, rank.astype(np.int64)))
    return out


def train_ngram(token_ids, vocab_size: int, order: int = 4) -> NGramLM:
    """Fit an interpolated Kneser-Ney model of ``order`` on one token stream."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    ids = np.asarray(token_ids, dtype=np.int64)
    if len(ids) < order:
        raise ValueError(f"need at least {order} tokens to train an order-{order} model, got {len(ids)}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    V = vocab_size
    stream = _stream_types(ids, order, V)
    orders = []
    for k in range(1, order + 1):
        types, raw_counts, _, rank = stream[k - 1]
        if k == order:
            keys, counts = types, raw_counts
        else:  # continuation counts: distinct left extensions of each k-gram (the suffix of a (k+1)-gram type)
            suffix_rank = rank[stream[k][2] + 1]
            ranks, counts = np.unique(suffix_rank, return_counts=True)
            keys, counts = types[ranks], counts.astype(np.int64)
        if k == 1:
            hist_keys = np.zeros(0, dtype=np.int64)
            hist_sum = np.array([counts.sum()], dtype=np.int64)
            hist_types = np.array([len(keys)], dtype=np.int64)
        else:
            hist_keys, start = np.unique(keys // V, return_index=True)
            hist_sum = np.add.reduceat(counts, start)
            hist_types = np.diff(np.append(start, len(keys))).astype(np.int64)
        orders.append(_Order(keys, counts, hist_keys, hist_sum, hist_types, _discount(counts), types))
    return NGramLM(order, V, orders, len(ids))


def _history_ranks(model: NGramLM, ctx: np.ndarray) -> list[np.ndarray]:
    """``ranks[k]``: rank of the last ``k`` context tokens among the training stream's k-grams
    (-1 when unseen or when the context is shorter), for k = 1..order-1."""
    V, m = model.vocab_size, ctx.shape[1]
    ranks = [None]
    for k in range(1, model.order):
        r = _rank(model.orders[0].types, ctx[:, m - k])
        for j in range(1, k):
            tok = ctx[:, m - k + j]
            r = np.where((r >= 0) & (tok >= 0), _rank(model.orders[j].types, np.maximum(r, 0) * V + tok), -1)
        ranks.append(r)
    return ranks


def _prob(model: NGramLM, ctx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P(w | ctx) for rows of ``ctx`` ``[m, order-1]`` (right-aligned, -1 = no token) and targets ``w`` ``[m]``."""
    V = model.vocab_size
    o1 = model.orders[0]
    c1 = _lookup(o1.keys, o1.counts, w).astype(np.float64)
    S1, T1 = float(o1.hist_sum[0]), float(o1.hist_types[0])
    p = np.maximum(c1 - o1.discount, 0.0) / S1 + o1.discount * T1 / S1 / V
    ranks = _history_ranks(model, ctx)
    for k in range(2, model.order + 1):
        o = model.orders[k - 1]
        h = ranks[k - 1]
        S = _lookup(o.hist_keys, o.hist_sum, h).astype(np.float64)
        T = _lookup(o.hist_keys, o.hist_types, h).astype(np.float64)
        c = _lookup(o.keys, o.counts, np.where(h >= 0, h * V + w, -1)).astype(np.float64)
        use = (h >= 0) & (S > 0)
        S_safe = np.where(use, S, 1.0)
        p_k = np.maximum(c - o.discount, 0.0) / S_safe + o.discount * T / S_safe * p
        p = np.where(use, p_k, p)
    return p


def _contexts(ids: np.ndarray, positions: np.ndarray, n: int) -> np.ndarray:
    """``[len(positions), n]`` of the ``n`` tokens before each position (-1 before the stream start)."""
    ctx = np.full((len(positions), n), -1, dtype=np.int64)
    for j in range(n):
        src = positions - n + j
        ok = src >= 0
        ctx[ok, j] = ids[src[ok]]
    return ctx


def log_probs(model: NGramLM, token_ids) -> np.ndarray:
    """Natural-log probability of each token after the first, given the tokens before it."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if len(ids) < 2:
        return np.zeros(0)
    if ids.min() < 0 or ids.max() >= model.vocab_size:
        raise ValueError(f"token ids must lie in [0, {model.vocab_size})")
    pos = np.arange(1, len(ids))
    out = np.empty(len(pos))
    for s in range(0, len(pos), 1 << 18):  # bounded memory for long streams
        p = pos[s:s + (1 << 18)]
        out[s:s + len(p)] = np.log(_prob(model, _contexts(ids, p, model.order - 1), ids[p]))
    return out


def perplexity(model: NGramLM, token_ids) -> float:
    """Perplexity on a held-out stream: tokens 1..n-1 predicted from what precedes them."""
    lp = log_probs(model, token_ids)
    if len(lp) == 0:
        raise ValueError("need at least 2 tokens to measure perplexity")
    return float(math.exp(-lp.mean()))


def next_token_probs(model: NGramLM, context) -> np.ndarray:
    """The model's full distribution ``[vocab_size]`` over the token after ``context``."""
    n = model.order - 1
    ctx = np.full(n, -1, dtype=np.int64)
    context = np.asarray(context, dtype=np.int64)[-n:] if n > 0 else np.zeros(0, dtype=np.int64)
    if n > 0 and len(context):
        ctx[n - len(context):] = context
    V = model.vocab_size
    return _prob(model, np.broadcast_to(ctx, (V, n)), np.arange(V, dtype=np.int64))
