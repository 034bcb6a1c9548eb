"""Which sequential-calibration variant generalizes? Held-out perplexity at matched sparsity.

    python experiments/sequential_variants.py [--device cuda] [--calib-seqs 16] [--out DIR]

For each variant of ``thresholds.sequential`` (objective, rule, kappa, margin) and two loss
budgets (the one keeping calibration perplexity within 5% of dense, and half of it), the
schedule's MAC-weighted sparsity and held-out perplexity, beside uniform and TEAL-style
thresholds calibrated at the sparsity the variant reached. Writes ``sequential_variants.csv``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch

from rllm.evaluate import perplexity
from rllm.weights import load_model
from thresholds import sequential, teal, teal_trajectory, uniform
from thresholds._core import dense_loss
from thresholds.calibrate import load_calib_tokens

VARIANTS = {
    "nll-slope-k4": dict(objective="nll", rule="slope", kappa=4.0),
    "kl-slope-k4": dict(objective="kl", rule="slope", kappa=4.0),
    "kl-slope-k2": dict(objective="kl", rule="slope", kappa=2.0),
    "kl-slope-k8": dict(objective="kl", rule="slope", kappa=8.0),
    "kl-share": dict(objective="kl", rule="share"),
    "nll-share": dict(objective="nll", rule="share"),
    "kl-slope-k4-m0": dict(objective="kl", rule="slope", kappa=4.0, margin=0.0),
    "kl-slope-k8-floor-auto": dict(objective="kl", rule="slope", kappa=8.0, floor="auto"),
    "kl-slope-k8-floor0.3": dict(objective="kl", rule="slope", kappa=8.0, floor=0.3),
    "kl-slope-k4-floor-auto": dict(objective="kl", rule="slope", kappa=4.0, floor="auto"),
    "kl-slope-k8-floor-auto-shrink-auto": dict(objective="kl", rule="slope", kappa=8.0, floor="auto", shrink="auto"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="rwkv_tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", default="experiments/results/sequential_variants")
    a = ap.parse_args(argv)
    lm = load_model(a.model, device=a.device or "cpu")
    m, tok = lm.model.eval(), lm.tokenizer
    d = Path(lm.source)
    d = d if d.is_dir() else d.parent
    ids = load_calib_tokens(d / "calib.txt", tok)
    calib = ids[: a.calib_seqs * (a.seq_len + 1)].reshape(a.calib_seqs, a.seq_len + 1)
    ev = load_calib_tokens(d / "eval.txt", tok)[: a.eval_tokens].tolist()
    dev = torch.device(a.device or "cpu")
    p0 = perplexity(m, None, ev, ctx=a.seq_len, device=dev, progress=False).ppl
    dl = dense_loss(m, calib, dev)
    traj = teal_trajectory(m, calib, greedy_tokens=512, device=a.device, progress=False)
    rows = []
    for name in a.variants:
        for frac in (1.0, 0.5):
            tol = frac * math.log(1.05) / dl
            t0 = time.perf_counter()
            s = sequential(m, calib, tolerance=tol, device=a.device, progress=False, **VARIANTS[name])
            cost = time.perf_counter() - t0
            sp = s.sparsity_mac_weighted
            u = uniform(m, calib, sparsity=sp, target="mac", device=a.device, progress=False)
            t = teal(m, calib, sparsity=sp, trajectory=traj, device=a.device, progress=False)
            ppl = {k: perplexity(m, None, ev, ctx=a.seq_len, thresholds=x.thresholds, device=dev, progress=False).ppl
                   for k, x in (("seq", s), ("uniform", u), ("teal", t))}
            rows.append(dict(variant=name, budget=tol, sparsity=sp, calib_inc=s.summary["loss_increase"],
                             seq_ppl_rel=ppl["seq"] / p0 - 1, uniform_sparsity=u.sparsity_mac_weighted,
                             uniform_ppl_rel=ppl["uniform"] / p0 - 1, teal_sparsity=t.sparsity_mac_weighted,
                             teal_ppl_rel=ppl["teal"] / p0 - 1, cost_s=cost))
            r = rows[-1]
            print(f"{name:<16} budget {tol:.4f}: sparsity {sp:.3f} calib {100 * r['calib_inc']:+.2f}% | held-out ppl "
                  f"seq {100 * r['seq_ppl_rel']:+.2f}%  uniform {100 * r['uniform_ppl_rel']:+.2f}%  "
                  f"teal {100 * r['teal_ppl_rel']:+.2f}%  ({cost:.1f} s)", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "sequential_variants.csv", index=False)
    print(f"wrote {out / 'sequential_variants.csv'}")


if __name__ == "__main__":
    main()
