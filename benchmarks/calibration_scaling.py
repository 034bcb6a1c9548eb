"""How the sequential calibration's cost grows with depth: exact loss vs the linear ``horizon`` mode.

    python benchmarks/calibration_scaling.py [--layers 4 8 16] [--width 64] [--tokens 1024] [--horizons 0 2]

Random RWKV-4 models of the same width and 4, 8, 16 layers are calibrated with the sequential
method on the same random calibration tokens. ``scan="all"`` evaluates every candidate level at
every site, so the work per site is fixed and only depth changes. Two modes side by side:

* exact (``--horizons 0``, the default of ``thresholds.sequential``): the residual stream at the
  segment (half block) being calibrated is cached, so a candidate at site ``k`` runs only the
  remaining segments and the head: ``O(L^2)`` segment passes in all (without the cache every
  candidate would run the whole model, ``2L + 1`` passes: ``passes_uncached``);
* horizon ``H``: a candidate runs the ``H`` segments after its site and its perturbation is
  carried to the head along the residual: ``O(L)``.

Besides wall time the script counts *segment passes* (one half block over the calibration set;
the head counts as one). Writes ``calibration_scaling.csv`` and prints the time ratios between
successive depths for each mode.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch

from rllm.model import RWKV, RWKVConfig, randomize_weights
from thresholds import sequential
from thresholds._core import segment_of


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--tokens", type=int, default=1024, help="calibration tokens (sequences of --seq-len)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--levels", type=int, default=9, help="candidate levels per site (evenly spaced in (0, 1))")
    p.add_argument("--threads", type=int, default=1, help="torch and numba threads")
    p.add_argument("--horizons", type=int, nargs="+", default=[0, 2], help="0 = exact loss; H > 0 = horizon mode")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    import numba
    torch.set_num_threads(a.threads)
    numba.set_num_threads(a.threads)
    levels = [round((i + 1) / (a.levels + 1), 4) for i in range(a.levels)]
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, a.vocab, (a.tokens // a.seq_len, a.seq_len + 1), generator=g)
    rows = []
    for H in a.horizons:
        mode = "exact" if H == 0 else f"horizon={H}"
        for L in a.layers:
            m = randomize_weights(RWKV(RWKVConfig(vocab_size=a.vocab, n_layer=L, n_embd=a.width)), seed=0).eval()
            t0 = time.perf_counter()
            s = sequential(m, tok, tolerance=1.0, levels=levels, scan="all", device=a.device, progress=False,
                           horizon=H or None, floor=0)  # floor 0: every level is a candidate
            wall = time.perf_counter() - t0
            n_seg = 2 * L
            evals = sum(e["evaluated"] for e in s.extra["trace"])
            seg = {e["site"]: segment_of(e["site"], L) for e in s.extra["trace"]}
            if H == 0:
                passes = sum(e["evaluated"] * (n_seg - seg[e["site"]] + 1) for e in s.extra["trace"])
            else:  # candidates run H segments and the head; one reference pass per site
                passes = sum((e["evaluated"] + 1) * min(H, n_seg - seg[e["site"]]) + e["evaluated"]
                             for e in s.extra["trace"])
            rows.append(dict(mode=mode, n_layer=L, width=a.width, tokens=int(tok[:, 1:].numel()),
                             sites=len(s.extra["trace"]), candidates=evals, segment_passes=passes,
                             passes_uncached=evals * (n_seg + 1), wall_s=round(wall, 3), s_per_pass=wall / passes,
                             sparsity_mac_weighted=s.summary["sparsity_mac_weighted"],
                             calib_loss=s.summary["loss"], dense_loss=s.summary["dense_loss"],
                             threads=a.threads, device=str(a.device or "cpu")))
            print(f"{mode:>10} L={L:3d}: {wall:7.2f} s, {evals} candidates, {passes} segment passes "
                  f"({evals * (n_seg + 1)} without the cache), {1e3 * wall / passes:.2f} ms/pass", flush=True)
    df = pd.DataFrame(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "calibration_scaling.csv", index=False)
    for mode, g in df.groupby("mode", sort=False):
        g = g.sort_values("n_layer")
        for (_, x), (_, y) in zip(g.iloc[:-1].iterrows(), g.iloc[1:].iterrows()):
            print(f"{mode:>10}: L {x.n_layer} -> {y.n_layer} (x{y.n_layer / x.n_layer:.0f} depth): "
                  f"time x{y.wall_s / x.wall_s:.2f}, segment passes x{y.segment_passes / x.segment_passes:.2f}")
    print(f"wrote {out / 'calibration_scaling.csv'}")


if __name__ == "__main__":
    main()
