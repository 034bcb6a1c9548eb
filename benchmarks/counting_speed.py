"""Speed of the counting simulator: simulated tokens/s, numba kernels vs the plain-numpy twins.

The program is compiled from the model's shape (default rwkv_430m: 24 x 1024, vocab 50277, head
on chip); the trace is synthetic, bit-packed like ``rllm.events.EventTrace``, with independent
events at the given sparsity (the counting cost does not depend on which inputs fire). Both
paths count the same actions from the same masks; the numba path is timed end to end through
``simulate`` too (tables, masks, dense baseline, report). Also reports how many cores and chips
the zoo shapes need on the shipped chip.

    python benchmarks/counting_speed.py [--model rwkv_430m --tokens 2000 --numpy-tokens 64 --sparsity 0.6]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numba
import pandas as pd

from compiler import compile
from seneca_sim.arch import default_arch
from seneca_sim.counting import build_tables, packed_masks, run_kernels, run_numpy, simulate, synthetic_trace


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (numba compilation, caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="rwkv_430m")
    ap.add_argument("--tokens", type=int, default=2000, help="tokens for the numba path")
    ap.add_argument("--numpy-tokens", type=int, default=64, help="tokens for the numpy path (memory-hungry)")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", nargs="*", default=["rwkv_430m", "rwkv_1b5"], help="zoo shapes to size")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    arch = default_arch()

    t0 = time.perf_counter()
    prog = compile(a.model, arch)
    t_compile = time.perf_counter() - t0
    trace = synthetic_trace(prog, a.tokens, a.sparsity, seed=0)
    tb = build_tables(prog, arch)
    L1, P = int(prog.meta["n_layer"]) + 1, len(prog.phases)
    bits, _ = packed_masks(prog, trace, 0, a.tokens)
    bits_np = bits[: a.numpy_tokens]

    t_numba = best_of(lambda: run_kernels(bits, tb, L1, P, False), a.repeats)
    t_numpy = best_of(lambda: run_numpy(bits_np, tb), a.repeats)
    t_sim = best_of(lambda: simulate(prog, trace, arch, per_core=False), 1)

    rows = [
        dict(path="numba kernels", model=a.model, tokens=a.tokens, seconds=t_numba, tokens_per_s=a.tokens / t_numba),
        dict(path="numpy twins", model=a.model, tokens=a.numpy_tokens, seconds=t_numpy,
             tokens_per_s=a.numpy_tokens / t_numpy),
        dict(path="simulate() end to end", model=a.model, tokens=a.tokens, seconds=t_sim, tokens_per_s=a.tokens / t_sim),
    ]
    df = pd.DataFrame(rows)
    df["speedup_vs_numpy"] = df.tokens_per_s / df.tokens_per_s.iloc[1]
    df["sparsity"] = a.sparsity
    df["cores"] = prog.n_cores
    df["routes"] = len(prog.routes)
    df["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    df["cpu_count"] = os.cpu_count()
    df["machine"] = platform.processor() or platform.machine()

    sizes = []
    for name in a.sizes:
        t0 = time.perf_counter()
        p = prog if name == a.model else compile(name, arch, improve=False)  # placement does not change the count
        s = p.summary()
        sizes.append(dict(model=name, cores=s["cores"], chips=s["chips"], cores_per_chip=arch.cores_per_chip,
                          weight_MiB=s["weight_bytes"] / 2**20, memory_use_mean=s["memory_use_mean"],
                          splits=str(s["splits"]), compile_s=t_compile if name == a.model else time.perf_counter() - t0))
    sizes = pd.DataFrame(sizes)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "counting_speed.csv", index=False)
    sizes.to_csv(out / "counting_sizes.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df[["path", "model", "tokens", "seconds", "tokens_per_s", "speedup_vs_numpy", "cores", "routes"]]
              .to_string(index=False, float_format=lambda x: f"{x:,.3g}"))
        print()
        print(sizes.to_string(index=False, float_format=lambda x: f"{x:,.3g}"))
    print(f"\nwrote {out / 'counting_speed.csv'} and {out / 'counting_sizes.csv'}")
    return df


if __name__ == "__main__":
    main()
