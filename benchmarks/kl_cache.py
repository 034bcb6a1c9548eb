"""The sequential method's KL objective with the dense log-probabilities kept against recomputed.

One run, side by side on the same calibration tokens: ``sequential`` with the dense model's
next-token log-probabilities computed once and kept (``thresholds._core.DENSE_CACHE_BYTES``, the
default) and with them recomputed for every candidate (the cache set to 0 bytes, as before it
existed). Reports whether the two schedules are identical, and both wall times. The kept path
takes the divergence as a product-sum and log-sum-exp against the kept distribution, the
recomputed one as ``sum p (log p - log q)``: equal to float rounding (2e-5 nats a position), so a
candidate on a near-tie can go either way and the schedules need not be bit for bit the same.

    python benchmarks/kl_cache.py [--model rwkv_pd12] [--seqs 16] [--tolerance 0.01147] [--repeats 1] [--out benchmarks/results]

The defaults are the main command's calibration (16 x 128 tokens of ``calib.txt``, the budget
that keeps the calibration perplexity within 5% of dense on ``rwkv_pd12``). Writes ``kl_cache_MODEL.csv``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import thresholds._core as core  # noqa: E402
from rllm.tokenizer import load_calib_tokens  # noqa: E402
from rllm.weights import load_model  # noqa: E402
from thresholds.sequential import sequential  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rwkv_pd12")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tolerance", type=float, default=0.01147)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each mode, in alternating order")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    import pandas as pd
    lm = load_model(a.model)
    model = lm.model.eval()
    d = lm.source if lm.source.is_dir() else lm.source.parent
    L = a.seq_len + 1
    calib = load_calib_tokens(d / "calib.txt", lm.tokenizer)[: a.seqs * L].reshape(a.seqs, L)
    # warm-up: numba's WKV, torch's kernels and the allocator, so neither mode pays them
    sequential(model, calib[:2], tolerance=a.tolerance, progress=False)
    rows, scheds = [], {}
    for rep in range(a.repeats):
        order = (("recomputed", 0), ("kept", None)) if rep % 2 == 0 else (("kept", None), ("recomputed", 0))
        for mode, budget in order:  # alternating order: neither mode always runs second
            saved = core.DENSE_CACHE_BYTES["cpu"]
            core.DENSE_CACHE_BYTES["cpu"] = saved if budget is None else budget
            try:
                t0 = time.perf_counter()
                scheds[mode] = sequential(model, calib, tolerance=a.tolerance, progress=False)
                rows.append(dict(model=a.model, mode=mode, repeat=rep, seconds=time.perf_counter() - t0,
                                 sparsity_mac=scheds[mode].sparsity_mac_weighted))
            finally:
                core.DENSE_CACHE_BYTES["cpu"] = saved
            print(f"{mode} (repeat {rep}): {rows[-1]['seconds']:.1f} s", flush=True)
    same = all(torch.equal(torch.as_tensor(scheds["kept"].thresholds[n]), torch.as_tensor(scheds["recomputed"].thresholds[n]))
               for n in scheds["kept"].thresholds)
    for r in rows:
        r["identical_schedules"] = same
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    med = df.groupby("mode").seconds.median()
    print(f"identical schedules: {same}; median recomputed {med['recomputed']:.1f} s, kept {med['kept']:.1f} s "
          f"(ratio {med['recomputed'] / med['kept']:.2f})")
    df.to_csv(out / f"kl_cache_{a.model}.csv", index=False)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
