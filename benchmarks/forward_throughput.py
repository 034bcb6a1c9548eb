"""Forward throughput of rllm's RWKV-4 vs transformers' RwkvForCausalLM, side by side, on CPU.

Both models hold the same random weights of a given shape (default: RWKV-4 430M, 24 x 1024,
vocab 50277). Sequence mode: one forward over [batch, seq] tokens. Step mode: one token at
a time with carried state (transformers: ``use_cache=True`` with its ``state``).

    python benchmarks/forward_throughput.py [--layers 24 --embd 1024 --seq 256 --steps 32] [--repeats 5] [--out benchmarks/results]

Each implementation is timed ``--repeats`` times, the two interleaved so that both see the same
background load; the CSV has the median and the spread (min, max) of each, the ratio of the
medians, and what the median achieves against what bounds it on a CPU: matrix arithmetic
(GFLOP/s, ``2 x params`` per token, the embedding lookup left out) in sequence mode, weight reads
(GB/s: every weight but the embedding read once per token) in step mode.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from rllm.model import RWKV, RWKVConfig, randomize_weights


def hf_copy(model: RWKV):
    """The same weights in transformers' RwkvForCausalLM (rescale_every=0 keeps the arithmetic identical)."""
    from transformers import RwkvConfig, RwkvForCausalLM

    cfg = model.config
    hf = RwkvForCausalLM(RwkvConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
                                    attention_hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
                                    rescale_every=0, context_length=cfg.context_length)).eval()
    sd = {}
    for k, v in model.state_dict().items():
        k2 = (k.replace("emb.weight", "embeddings.weight").replace("ln0", "pre_ln").replace(".att.", ".attention.")
              .replace(".ffn.", ".feed_forward.").replace("time_mix_k", "time_mix_key")
              .replace("time_mix_v", "time_mix_value").replace("time_mix_r", "time_mix_receptance"))
        sd[k2 if k2.startswith("head") else "rwkv." + k2] = v.view(1, 1, -1) if "time_mix" in k else v
    hf.load_state_dict(sd)
    return hf


def interleaved(fa, fb, repeats: int) -> tuple[list[float], list[float]]:
    """Wall times of ``fa`` and ``fb``, alternating, after one warm-up of each."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return ta, tb


@torch.no_grad()
def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)

    model = randomize_weights(RWKV(RWKVConfig(vocab_size=a.vocab, n_layer=a.layers, n_embd=a.embd)), seed=0).eval()
    hf = hf_copy(model)
    idx = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    diff = float((model(idx[:, :32]) - hf(idx[:, :32]).logits).abs().max())

    def ours_step():
        state = None
        for t in range(a.steps):
            _, state = model.step(idx[:, t], state)

    def hf_step():
        state = None
        for t in range(a.steps):
            state = hf(idx[:, t:t + 1], state=state, use_cache=True).state

    # the embedding is a lookup (one row per token), not a matrix product or a full read
    mats = [p for n, p in model.named_parameters() if not n.startswith("emb.")]
    params = sum(p.numel() for p in mats)
    weight_bytes = sum(p.numel() * p.element_size() for p in mats)
    rows = []
    for mode, ours, theirs, n in [
        ("sequence", lambda: model(idx), lambda: hf(idx), a.batch * a.seq),
        ("step", ours_step, hf_step, a.batch * a.steps),
    ]:
        t_ours, t_hf = interleaved(ours, theirs, a.repeats)
        m_ours, m_hf = statistics.median(t_ours), statistics.median(t_hf)
        row = dict(mode=mode, layers=a.layers, embd=a.embd, batch=a.batch, tokens=n, repeats=a.repeats,
                   rllm_tok_s=n / m_ours, rllm_tok_s_min=n / max(t_ours), rllm_tok_s_max=n / min(t_ours),
                   transformers_tok_s=n / m_hf, transformers_tok_s_min=n / max(t_hf),
                   transformers_tok_s_max=n / min(t_hf), speedup=m_hf / m_ours)
        if mode == "sequence":  # arithmetic: 2 FLOP per parameter per token
            row.update(rllm_gflop_s=2 * params * n / m_ours / 1e9, transformers_gflop_s=2 * params * n / m_hf / 1e9)
        else:  # every weight read once per token (batch 1)
            row.update(rllm_weight_GB_s=weight_bytes * a.steps / m_ours / 1e9,
                       transformers_weight_GB_s=weight_bytes * a.steps / m_hf / 1e9)
        rows.append({**row, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                     "max_abs_logit_diff": diff})
    df = pd.DataFrame(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "forward_throughput.csv", index=False)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    return df


if __name__ == "__main__":
    main()
