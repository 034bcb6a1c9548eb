"""Which sequential-calibration variant generalizes? Chosen on the development split only.

    python experiments/sequential_variants.py [--device cuda] [--calib-seqs 64] [--out DIR]

Data (``experiments/splits.py``): the schedules are calibrated on the first ``--calib-seqs`` x
``--seq-len`` tokens of ``calib.txt``, the same calibration tokens the final comparison
(``compare_thresholds.py``) uses, and scored on the development split, the last 32,768 tokens
of ``calib.txt`` (on ``rwkv_tiny``: *A Midsummer Night's Dream*). The evaluation text of the
final table is never read here.

For each variant of ``thresholds.sequential`` and two loss budgets (the one keeping calibration
perplexity within 5% of dense, and half of it): the schedule's MAC-weighted sparsity, and its
development log-perplexity minus that of uniform thresholds matched to the same sparsity
(within 0.2 points), with the paired standard error over blocks of ``--se-block`` tokens. A
variant's score is that excess over uniform, averaged over the two budgets (lower is better).

The rule, fixed before the run: the default (``default`` below) stays unless another variant's
score is lower by more than 2 paired standard errors (the difference of the two variants'
excesses, token by token); then the best such variant is the new default. Writes
``sequential_variants.csv`` and ``summary.md``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import torch

from experiments.splits import DEV_TOKENS, calib_and_dev
from rllm.evaluate import token_nll
from rllm.weights import load_model
from thresholds import FINE_LEVELS, ScheduleCache, calibrate, match_sparsity
from thresholds._core import dense_loss
from thresholds.calibrate import load_calib_tokens

# every variant spells out the three choices under test: objective, kappa (rule "slope"), floor.
# "default" is the current default; issue 20's run (experiments/results/sequential_variants_dev/)
# had kappa 8 there, and adopted kappa16 by the rule below.
VARIANTS = {
    "default": dict(objective="kl", rule="slope", kappa=16.0, floor="auto"),
    "kappa8": dict(objective="kl", rule="slope", kappa=8.0, floor="auto"),
    "nll": dict(objective="nll", rule="slope", kappa=16.0, floor="auto"),
    "kappa2": dict(objective="kl", rule="slope", kappa=2.0, floor="auto"),
    "kappa4": dict(objective="kl", rule="slope", kappa=4.0, floor="auto"),
    "kappa32": dict(objective="kl", rule="slope", kappa=32.0, floor="auto"),
    "no-floor": dict(objective="kl", rule="slope", kappa=16.0, floor=0.0),
    "floor0.3": dict(objective="kl", rule="slope", kappa=16.0, floor=0.3),
    "share": dict(objective="kl", rule="share"),
    "margin0": dict(objective="kl", rule="slope", kappa=16.0, floor="auto", margin=0.0),
    # cheaper variants (for a CPU main command): a linear-cost loss estimate, a shorter scan, a coarser grid
    "horizon2": dict(objective="kl", rule="slope", kappa=16.0, floor="auto", horizon=2),
    "horizon4": dict(objective="kl", rule="slope", kappa=16.0, floor="auto", horizon=4),
    "patience1": dict(objective="kl", rule="slope", kappa=16.0, floor="auto", patience=1),
    # the 5% grid, the default before experiments/results/sequential_variants_pd12_16 adopted 10% steps
    "levels5": dict(objective="kl", rule="slope", kappa=16.0, floor="auto", levels=FINE_LEVELS),
}
BUDGETS = (1.0, 0.5)  # fractions of the budget that keeps calibration perplexity within 5%


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="rwkv_tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dev-tokens", type=int, default=DEV_TOKENS)
    ap.add_argument("--se-block", type=int, default=1024)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-chunks", type=int, default=1, help="score the development text as this many pieces side "
                    "by side, each from a fresh state (rllm.evaluate.token_nll)")
    ap.add_argument("--cache-dir", default=None, help="schedule cache (default: the user cache)")
    ap.add_argument("--out", default="experiments/results/sequential_variants_dev")
    return ap.parse_args(argv)


def block_means(d: np.ndarray, block: int) -> np.ndarray:
    nb = d.size // block
    return d[: nb * block].reshape(nb, block).mean(1)


def mean_se(d: np.ndarray, block: int) -> tuple[float, float]:
    """Mean of per-token differences and its standard error from the means of ``block``-token blocks."""
    bm = block_means(d, block)
    return float(d.mean()), float(bm.std(ddof=1) / math.sqrt(bm.size)) if bm.size > 1 else float("nan")


def run_variant(name, kw, m, calib, dev_ids, dl, a, cache) -> tuple[list[dict], np.ndarray]:
    """Both budgets of one variant: its rows, and its per-token excess over uniform (budget mean)."""
    rows, excess = [], []
    for frac in BUDGETS:
        tol = frac * math.log(1.05) / dl
        t0 = time.perf_counter()
        s = calibrate(m, calib, "sequential", cache=cache, tolerance=tol, device=a.device, progress=False, **kw)
        u = match_sparsity(m, calib, "uniform", s.sparsity_mac_weighted, cache=cache, target="mac", device=a.device,
                           progress=False)
        nll_s = token_nll(m, dev_ids, ctx=a.seq_len, device=a.device, thresholds=s.thresholds,
                          chunks=a.eval_chunks).numpy()
        nll_u = token_nll(m, dev_ids, ctx=a.seq_len, device=a.device, thresholds=u.thresholds,
                          chunks=a.eval_chunks).numpy()
        mu, se = mean_se(nll_s - nll_u, a.se_block)
        excess.append(nll_s - nll_u)
        rows.append(dict(variant=name, budget_fraction=frac, budget=tol, sparsity=s.sparsity_mac_weighted,
                         uniform_sparsity=u.sparsity_mac_weighted, calib_increase=s.summary["loss_increase"],
                         dev_ppl=math.exp(nll_s.mean()), uniform_dev_ppl=math.exp(nll_u.mean()),
                         excess_log_ppl=mu, excess_se=se, cost_s=s.cost_s, wall_s=time.perf_counter() - t0))
        r = rows[-1]
        print(f"{name:<14} budget x{frac}: sparsity {r['sparsity']:.3f} (uniform {r['uniform_sparsity']:.3f})  dev ppl "
              f"{r['dev_ppl']:.3f} vs uniform {r['uniform_dev_ppl']:.3f}: {1e3 * mu:+.2f}e-3 +- {1e3 * se:.2f}e-3",
              flush=True)
    return rows, np.mean(excess, axis=0)


def decide(excess: dict[str, np.ndarray], block: int) -> tuple[str, list[str]]:
    """The rule of the module doc: (the default to keep or adopt, the lines that justify it)."""
    lines, better = [], []
    base = excess["default"]
    for name, e in sorted(excess.items(), key=lambda kv: kv[1].mean()):
        mu, se = mean_se(e, block)
        if name == "default":
            lines.append(f"- {name}: excess over uniform {1e3 * mu:+.2f}e-3 +- {1e3 * se:.2f}e-3 log-ppl")
            continue
        d, dse = mean_se(e - base, block)
        lines.append(f"- {name}: excess {1e3 * mu:+.2f}e-3 +- {1e3 * se:.2f}e-3; minus default's "
                     f"{1e3 * d:+.2f}e-3 +- {1e3 * dse:.2f}e-3 (z {d / dse:+.1f})")
        if d < -2 * dse:
            better.append((d, name))
    return (min(better)[1] if better else "default"), lines


def main(argv=None):
    a = parse(argv)
    import numba
    torch.set_num_threads(a.threads)
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    lm = load_model(a.model, device=a.device or "cpu")
    m, tok = lm.model.eval(), lm.tokenizer
    d = Path(lm.source)
    d = d if d.is_dir() else d.parent
    calib, dev_ids = calib_and_dev(load_calib_tokens(d / "calib.txt", tok), a.calib_seqs, a.seq_len, a.dev_tokens)
    dev_ids = dev_ids.tolist()
    cache = ScheduleCache(a.cache_dir) if a.cache_dir else True
    dl = dense_loss(m, calib, torch.device(a.device or "cpu"))
    dense_dev = token_nll(m, dev_ids, ctx=a.seq_len, device=a.device).numpy()
    print(f"{lm.name}: calibration {tuple(calib.shape)} from the start of calib.txt, development split "
          f"{len(dev_ids)} tokens from its end (dense dev ppl {math.exp(dense_dev.mean()):.3f})", flush=True)
    rows, excess = [], {}
    for name in a.variants:
        r, excess[name] = run_variant(name, VARIANTS[name], m, calib, dev_ids, dl, a, cache)
        rows += r
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "sequential_variants.csv", index=False)
    lines = [f"# Sequential variants on the development split ({lm.name})", "",
             f"Calibration: calib.txt, first {a.calib_seqs} x {a.seq_len} tokens. Development: the last "
             f"{len(dev_ids)} tokens of calib.txt (dense ppl {math.exp(dense_dev.mean()):.3f}). eval.txt is not read.",
             "Score: development log-ppl minus uniform's at the same sparsity, mean of the two budgets "
             f"(SE over {a.se_block}-token blocks).", ""]
    if "default" in excess:
        choice, why = decide(excess, a.se_block)
        lines += why + ["", f"Decision (rule: another variant must beat the default by more than 2 SE): **{choice}**"]
        print("\n".join(why) + f"\ndecision: {choice}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'sequential_variants.csv'} and {out / 'summary.md'}")


if __name__ == "__main__":
    main()
