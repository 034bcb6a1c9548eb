"""Log-likelihoods of many continuations, batched, with shared prefixes run once on recurrent models.

A zero-shot item asks for the log-probability of several continuations (one per choice) of the
same context. A transformer must rerun the context for each; a recurrent model's whole past
is its state, so the tokens every request of an item shares are run once, and each request's own
tokens continue from a copy of that state. The result is the same numbers (to float rounding:
the split moves chunk boundaries of the WKV sum) for about half the tokens on HellaSwag.

:func:`group_loglikelihoods` takes the requests grouped by item and, for a recurrent model
(:func:`rllm.evaluate.supports_state` and :func:`~rllm.evaluate.is_recurrent`), runs three steps:

1. *plan*: each group's prefix is the longest token prefix all its inputs share, ending before
   the first scored position, so every scored logit comes from the second pass;
2. *prefixes*: groups sorted by prefix length run in batches of about ``batch_tokens`` tokens;
   a batch runs segment by segment up to each distinct prefix length and keeps the state of the
   rows that end there (at most ``max_segments``, by default ``MAX_SEGMENTS``, segments: prefixes
   are cut back to fewer distinct lengths, the cut tokens joining the second pass; with one
   segment every prefix of a batch is cut to the batch's shortest);
3. *suffixes*: every request's remaining tokens, sorted by length, right-padded into batches,
   each row starting from its group's state. Padding follows the scored positions, so it never
   reaches them.

Other models get :func:`rllm.evaluate.loglikelihood` on the flat list (lm-eval's batching).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm import tqdm

from rllm.lm import _as_logits, _model_device, is_recurrent, loglikelihood, supports_state

MAX_SEGMENTS = 8          # forward calls per prefix batch, at most
# Prefix states held at once, in bytes (rwkv_430m: 0.5 MB a state, rwkv_1b5: 1 MB). More groups a
# chunk sort the suffixes of more requests together, so batches pad less: on the whole suite with
# batches of 16,384 tokens, 8 GiB of rwkv_430m states give 2.61M token positions, 0.25 GiB 3.28M
# (benchmarks/zeroshot_batches.py; lm-eval's whole requests: 4.69M).
STATE_BYTES = {"cuda": 8 << 30, "cpu": 1 << 30}
Request = tuple[Sequence[int], Sequence[int]]


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per forward pass: logits of a batch are ``batch_tokens x vocab`` floats (3.3 GB for
    16,384 tokens of the Pile vocabulary on a GPU; 4,096 tokens keep a CPU run under 1 GB)."""
    return 16384 if device.type == "cuda" else 4096


def group_loglikelihoods(model: Any, groups: Sequence[Sequence[Request]], *, batch_tokens: int | None = None,
                         max_segments: int = MAX_SEGMENTS, device: str | torch.device | None = None,
                         progress: bool = True, desc: str = "zero-shot") -> list[list[tuple[float, bool]]]:
    """``(sum log p(continuation | context), every token greedy)`` for each request of each group.

    Requests are ``(context ids, continuation ids)``, both non-empty. ``max_segments``: forward
    calls per prefix batch, at most (fewer calls, more tokens cut to the second pass; one suits
    groups of a single request, whose cut tokens are run once). Thresholds, eval mode and no-grad
    are the caller's business.
    """
    dev = _model_device(model, device)
    batch_tokens = batch_tokens or default_batch_tokens(dev)
    for g, group in enumerate(groups):
        for r, (ctx, cont) in enumerate(group):
            if not ctx or not cont:
                raise ValueError(f"group {g} request {r}: context and continuation need at least one token each")
    if not (supports_state(model) and is_recurrent(model)):
        return _flat(model, groups, batch_tokens, dev, progress, desc)
    plans = [_plan(group) for group in groups]
    order = sorted(range(len(plans)), key=lambda i: -plans[i].p)
    out: list[list[tuple[float, bool]] | None] = [None] * len(plans)
    per_chunk = _groups_per_chunk(model, dev)
    bar = tqdm(total=sum(len(g) for g in groups), desc=desc, unit="req", disable=not progress, leave=False)
    try:
        for c in range(0, len(order), per_chunk):
            chunk = [plans[i] for i in order[c:c + per_chunk]]
            states = _prefix_states(model, chunk, batch_tokens, dev, max_segments)
            for i, res in zip(order[c:c + per_chunk], _score_suffixes(model, chunk, states, batch_tokens, dev, bar)):
                out[i] = res
    finally:
        bar.close()
    return out  # type: ignore[return-value]


def _groups_per_chunk(model, dev: torch.device) -> int:
    one = sum(t.numel() * t.element_size() for t in _fields(model.init_state(1)))
    return max(64, STATE_BYTES.get(dev.type, STATE_BYTES["cpu"]) // one)


def _flat(model, groups, batch_tokens, dev, progress, desc):
    flat = [req for g in groups for req in g]
    longest = max((len(c) + len(x) for c, x in flat), default=1)
    res = loglikelihood(model, flat, batch_size=max(1, batch_tokens // longest), device=dev, progress=progress,
                        desc=desc)
    out, k = [], 0
    for g in groups:
        out.append(res[k:k + len(g)])
        k += len(g)
    return out


# ------------------------------------------------------------------------------------------
# 1. plan
# ------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    inputs: list[list[int]]        # per request: (context + continuation)[:-1]
    conts: list[list[int]]         # per request: the scored continuation tokens
    p: int                         # prefix length run once (tokens inputs[r][:p])


def _plan(group: Sequence[Request]) -> _Plan:
    inputs = [(list(c) + list(x))[:-1] for c, x in group]
    conts = [list(x) for _, x in group]
    limit = min(len(c) - 1 for c, _ in group)  # the first scored position of the shortest context
    p = 0
    first = inputs[0]
    while p < limit and all(inp[p] == first[p] for inp in inputs[1:]):
        p += 1
    return _Plan(inputs, conts, p)


# ------------------------------------------------------------------------------------------
# 2. prefixes
# ------------------------------------------------------------------------------------------

def _prefix_states(model, chunk: list[_Plan], batch_tokens: int, dev, max_segments: int = MAX_SEGMENTS) -> Any:
    """The state after each plan's prefix, stacked along the batch axis in chunk order (the empty
    state for an empty prefix). Chunk plans are sorted by prefix length, longest first; a plan's
    ``p`` may be cut back here (the cut tokens then go to its suffixes)."""
    rows: list[Any] = [None] * len(chunk)
    i = 0
    while i < len(chunk) and chunk[i].p > 0:
        batch = [j for j in range(i, min(i + max(1, batch_tokens // chunk[i].p), len(chunk))) if chunk[j].p > 0]
        i = batch[-1] + 1
        _cut_to_segments(chunk, batch, max_segments)
        batch = [j for j in batch if chunk[j].p > 0]  # a prefix cut to nothing starts from the empty state
        for j, st in zip(batch, _run_prefix_batch(model, [chunk[j].inputs[0][:chunk[j].p] for j in batch], dev)):
            rows[j] = st
    empty = model.init_state(1)
    return _cat([r if r is not None else empty for r in rows])


def _cut_to_segments(chunk: list[_Plan], batch: list[int], max_segments: int = MAX_SEGMENTS) -> None:
    """Round the batch's prefix lengths down to multiples of the smallest power of two that leaves
    at most ``max_segments`` distinct lengths: each distinct length costs a forward call, each cut
    token a token more in the second pass. Rounding down keeps the batch sorted. One segment:
    every prefix is cut to the batch's shortest (rounding could cut them all to nothing)."""
    if max_segments <= 1:
        shortest = min(chunk[j].p for j in batch)
        for j in batch:
            chunk[j].p = shortest
        return
    q = 1
    while len({chunk[j].p // q for j in batch}) > max_segments:
        q *= 2
    for j in batch:
        chunk[j].p = q * (chunk[j].p // q)


def _run_prefix_batch(model, seqs: list[list[int]], dev) -> list[Any]:
    """States after each of ``seqs`` (sorted longest first): one forward call per distinct length,
    the rows that end there dropping out of the batch."""
    lengths = [len(s) for s in seqs]
    x = torch.zeros(len(seqs), lengths[0], dtype=torch.long)
    for r, s in enumerate(seqs):
        x[r, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    x = x.to(dev)
    states: list[Any] = [None] * len(seqs)
    state, start, active = None, 0, len(seqs)
    no_head = {"logits": False} if _takes_logits_flag(model) else {}  # only the state is wanted
    for end in sorted(set(lengths)):
        _, state = model(x[:active, start:end], state=state, return_state=True, **no_head)
        done = sum(1 for n in lengths if n == end)
        for r in range(active - done, active):
            states[r] = _rows(state, slice(r, r + 1))
        active -= done
        state, start = _rows(state, slice(0, active)), end
    return states


# ------------------------------------------------------------------------------------------
# 3. suffixes
# ------------------------------------------------------------------------------------------

def _score_suffixes(model, chunk: list[_Plan], states, batch_tokens: int, dev, bar) -> list[list[tuple[float, bool]]]:
    rows = [(g, r) for g, pl in enumerate(chunk) for r in range(len(pl.inputs))]
    rows.sort(key=lambda gr: -(len(chunk[gr[0]].inputs[gr[1]]) - chunk[gr[0]].p))
    out = [[None] * len(pl.inputs) for pl in chunk]
    i = 0
    while i < len(rows):
        g0, r0 = rows[i]
        T = len(chunk[g0].inputs[r0]) - chunk[g0].p
        batch = rows[i:i + max(1, batch_tokens // T)]
        for (g, r), res in zip(batch, _score_batch(model, chunk, states, batch, T, dev)):
            out[g][r] = res
        bar.update(len(batch))
        i += len(batch)
    return out  # type: ignore[return-value]


def _score_batch(model, chunk, states, batch, T: int, dev) -> list[tuple[float, bool]]:
    """One forward pass over the suffixes of ``batch`` from their groups' states: the summed
    log-probability of each continuation and whether it is all argmax."""
    x = torch.zeros(len(batch), T, dtype=torch.long)
    pos_r, pos_t, targets = [], [], []
    for b, (g, r) in enumerate(batch):
        pl = chunk[g]
        suffix = pl.inputs[r][pl.p:]
        x[b, :len(suffix)] = torch.as_tensor(suffix, dtype=torch.long)
        n = len(pl.conts[r])
        pos_r += [b] * n
        pos_t += range(len(suffix) - n, len(suffix))
        targets += pl.conts[r]
    index = torch.as_tensor([g for g, _ in batch], device=states.aa.device)
    logits = _as_logits(model(x.to(dev), state=_rows(states, index)))
    rows_t = torch.as_tensor(pos_r, device=logits.device)
    sel = logits[rows_t, torch.as_tensor(pos_t, device=logits.device)].float()  # [scored tokens, vocab]
    tgt = torch.as_tensor(targets, device=sel.device)
    # log p = logit - logsumexp: no second [tokens, vocab] tensor for a full log_softmax
    tok_lp = (sel.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(sel, dim=-1)).double()
    miss = (sel.argmax(-1) != tgt).double()
    ll = torch.zeros(len(batch), dtype=torch.float64, device=sel.device).index_add_(0, rows_t, tok_lp)
    misses = torch.zeros(len(batch), dtype=torch.float64, device=sel.device).index_add_(0, rows_t, miss)
    return [(float(a), b == 0) for a, b in zip(ll.tolist(), misses.tolist())]


def _takes_logits_flag(model) -> bool:
    try:
        return "logits" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------------
# States (rllm.model.RWKVState: tensors [n_layer, B, C])
# ------------------------------------------------------------------------------------------

def _rows(state, index):
    """The batch rows ``index`` (a slice or an index tensor) of a state."""
    return type(state)(*(t[:, index] for t in _fields(state)))


def _cat(states: list) -> Any:
    return type(states[0])(*(torch.cat(ts, dim=1) for ts in zip(*(_fields(s) for s in states))))


def _fields(state) -> tuple[torch.Tensor, ...]:
    return (state.att_x, state.ffn_x, state.aa, state.bb, state.pp)
