"""The WKV recurrence in sequence mode on a GPU: the Triton kernel against the chunked torch form.

One run on one CUDA GPU, side by side on the same inputs: first a check that the Triton
recurrence (``rllm.gpu.wkv``) equals the chunked form (``rllm.wkv.wkv_sequence(backend="torch")``)
and a float64 token-by-token reference, state carried across a split included; then each form's
time at the shapes calibration and zero-shot scoring use (RWKV-4 430M and 1.5B widths, 64 or 256
sequences of 256 tokens), the median of 10 timed calls after 3 warm-ups.

    python benchmarks/gpu_wkv.py [--out benchmarks/results]

Writes ``gpu_wkv.csv``: shape, form, milliseconds, and the speed-up of Triton over chunked torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rllm.wkv import initial_state, wkv_sequence, wkv_step  # noqa: E402

SHAPES = [(64, 256, 1024), (256, 256, 1024), (64, 256, 2048), (256, 256, 2048)]  # B, T, C


def inputs(B, T, C, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = (torch.randn(B, T, C, generator=g) * 4).to(device)
    v = torch.randn(B, T, C, generator=g).to(device)
    td = torch.randn(C, generator=g).to(device)
    tf = torch.randn(C, generator=g).to(device)
    return k, v, td, tf


def reference(k, v, td, tf):
    """Token by token in float64 (``wkv_step``'s arithmetic)."""
    k, v, td, tf = (x.double() for x in (k, v, td, tf))
    st = tuple(s.double() for s in initial_state(k.shape[0], k.shape[2], k.device))
    outs = []
    for t in range(k.shape[1]):
        o, st = wkv_step(k[:, t].double(), v[:, t].double(), td, tf, st)
        outs.append(o)
    return torch.stack(outs, 1)


def check(device) -> list[dict]:
    rows = []
    k, v, td, tf = inputs(4, 96, 300, device, seed=1)   # C not a multiple of the block
    ref = reference(k, v, td, tf)
    for form in ("triton", "torch"):
        out, st = wkv_sequence(k, v, td, tf, backend=form)
        o1, s1 = wkv_sequence(k[:, :40], v[:, :40], td, tf, backend=form)
        o2, _ = wkv_sequence(k[:, 40:], v[:, 40:], td, tf, s1, backend=form)
        split = torch.cat([o1, o2], 1)
        rows.append(dict(form=form, max_abs_err_vs_float64=float((out.double() - ref).abs().max()),
                         max_abs_err_split=float((split.double() - ref).abs().max())))
        print(f"check {form}: max |err| {rows[-1]['max_abs_err_vs_float64']:.2e} whole, "
              f"{rows[-1]['max_abs_err_split']:.2e} with the state carried across a split")
    return rows


def timed(fn, reps=10, warm=3) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_wkv.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import pandas as pd
    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name()}")
    chk = check(dev)
    rows = []
    with torch.no_grad():
        for B, T, C in SHAPES:
            k, v, td, tf = inputs(B, T, C, dev)
            ms = {f: timed(lambda: wkv_sequence(k, v, td, tf, backend=f)) for f in ("triton", "torch")}
            rows.append(dict(B=B, T=T, C=C, triton_ms=ms["triton"], torch_chunked_ms=ms["torch"],
                             speedup=ms["torch"] / ms["triton"]))
            print(f"B={B} T={T} C={C}: triton {ms['triton']:.3f} ms, chunked torch {ms['torch']:.3f} ms "
                  f"({rows[-1]['speedup']:.1f}x)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "gpu_wkv.csv", index=False)
    pd.DataFrame(chk).to_csv(out / "gpu_wkv_check.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
