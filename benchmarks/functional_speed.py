"""Speed of the functional simulator (cores accumulating routed events) vs the torch step-mode forward.

For each shape: random weights (``randomize_weights``), uniform per-site thresholds at the target
sparsity (quantile of |input| over a short calibration run), the shape compiled onto the shipped
chip, then tokens/s of ``FunctionalChip.run`` (numba event kernel) and of ``RWKV.step`` on the same
tokens. Sanity check of the logits (float32 weights on both sides): the max difference to the step
forward, and to the sequence forward replaying the chip's events (``ties``: inputs where the chip's
decision differs from torch's own ``|x| >= t``, all within float32 rounding of the threshold; on
random-weight models of 430M size one such tie can move the direct comparison by O(1)).

    python benchmarks/functional_speed.py [--shapes tiny,430m] [--tokens 16] [--sparsity 0.6] [--threads 1]

Writes ``benchmarks/results/functional_speed.csv`` and prints the table and the speed ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from compiler import compile
from rllm.model import RWKV, RWKVConfig, randomize_weights
from seneca_sim.arch import load_arch
from seneca_sim.functional import load_chip

SHAPES = {  # n_layer, n_embd, vocab
    "tiny": (4, 256, 4096),      # rwkv_tiny
    "169m": (12, 768, 50277),
    "430m": (24, 1024, 50277),
}


@torch.no_grad()
def quantile_thresholds(model: RWKV, tokens: torch.Tensor, sparsity: float) -> dict[str, float]:
    """Per site: the ``sparsity`` quantile of |input| over ``tokens`` at thresholds 0."""
    seen: dict[str, list[np.ndarray]] = {n: [] for n in model.sites}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen[n].append(i[0].abs().reshape(-1).numpy()))
             for n, m in model.sites.items()]
    try:
        model(tokens.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return {n: float(np.quantile(np.concatenate(v), sparsity)) for n, v in seen.items()}


@torch.no_grad()
def torch_steps(model: RWKV, tokens: torch.Tensor) -> np.ndarray:
    state, out = None, []
    for tok in tokens:
        logits, state = model.step(tok.view(1), state)
        out.append(logits[0])
    return torch.stack(out).numpy()


@torch.no_grad()
def replay_logits(model: RWKV, tokens: torch.Tensor, masks: dict[str, np.ndarray], thresholds: dict):
    """Sequence-mode logits when every site fires exactly the chip's events; also the number of
    inputs where that differs from the model's own decision, and their largest |(|x| - t) / t|."""
    ties, worst = 0, 0.0

    def hook(n):
        def fn(mod, inputs, output):
            nonlocal ties, worst
            x = inputs[0]
            fire = np.unpackbits(masks[n], axis=1, bitorder="little")[:, :x.shape[-1]].astype(bool)
            fire = torch.from_numpy(fire).view(x.shape)
            t = float(thresholds.get(n, 0.0))
            differ = ((x.abs() >= t) & (x != 0)) != fire
            if differ.any():
                ties += int(differ.sum())
                worst = max(worst, float(((x.abs() - t).abs()[differ] / max(t, 1e-30)).max()))
            return torch.where(fire, x, torch.zeros((), dtype=x.dtype))
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.sites.items()]
    try:
        return model(tokens.unsqueeze(0))[0].numpy(), ties, worst
    finally:
        for h in hooks:
            h.remove()


def bench(shape: str, n_tokens: int, sparsity: float, fmt: str) -> dict:
    L, C, V = SHAPES[shape]
    t0 = time.perf_counter()
    model = randomize_weights(RWKV(RWKVConfig(vocab_size=V, n_layer=L, n_embd=C, name=f"rwkv_{shape}")), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, V, (16,), generator=g)
    tokens = torch.randint(0, V, (n_tokens,), generator=g)
    th = quantile_thresholds(model, calib, sparsity)
    model.set_thresholds(th)
    t_model = time.perf_counter() - t0

    t0 = time.perf_counter()
    program = compile(model.config, load_arch(), improve=False)  # placement does not change the arithmetic
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    chip = load_chip(program, model.state_dict(), fmt=fmt, thresholds=th)
    t_load = time.perf_counter() - t0

    chip.run(tokens[:2].numpy())  # warm-up (numba compile / cache load)
    chip.reset()
    t0 = time.perf_counter()
    res = chip.run(tokens.numpy())
    t_sim = time.perf_counter() - t0

    torch_steps(model, tokens[:2])
    t0 = time.perf_counter()
    ref = torch_steps(model, tokens)
    t_torch = time.perf_counter() - t0

    rep, ties, worst = replay_logits(model, tokens, res.masks, th)
    sp = res.sparsity()
    return dict(shape=shape, n_layer=L, n_embd=C, vocab=V, fmt=fmt, tokens=n_tokens, cores=program.n_cores,
                sparsity=float((sp.events.sum() and 1 - sp.events.sum() / sp.total.sum())),
                macs_per_token=float(res.macs.sum() / n_tokens),
                dense_macs_per_token=int(program.meta["macs_per_token"]),
                sim_tok_s=n_tokens / t_sim, torch_step_tok_s=n_tokens / t_torch, ratio_sim_over_torch=t_torch / t_sim,
                max_abs_diff_step=float(np.abs(res.logits - ref).max()),
                max_abs_diff_replay=float(np.abs(res.logits - rep).max()), ties=ties, tie_max_rel_margin=worst,
                logit_scale=float(np.abs(ref).max()),
                setup_model_s=t_model, compile_s=t_compile, load_s=t_load, torch_threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine())


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,430m", help=f"comma-separated, of {list(SHAPES)}")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--fmt", default="float32", choices=["float32", "bf16", "bf16_weights"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the event kernel is single-threaded)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        r = bench(shape.strip(), args.tokens, args.sparsity, args.fmt)
        rows.append(r)
        print(f"{shape}: functional {r['sim_tok_s']:.2f} tok/s, torch step {r['torch_step_tok_s']:.2f} tok/s, "
              f"functional/torch speed = {r['ratio_sim_over_torch']:.2f}x at sparsity {r['sparsity']:.2f} "
              f"(max |diff| {r['max_abs_diff_replay']:.2e} vs torch replaying its events, {r['ties']} ties; "
              f"{r['max_abs_diff_step']:.2e} vs torch step; logit scale {r['logit_scale']:.2f})", flush=True)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "functional_speed.csv.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, out / "functional_speed.csv")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(df[["shape", "tokens", "cores", "sparsity", "sim_tok_s", "torch_step_tok_s", "ratio_sim_over_torch",
                  "max_abs_diff_replay", "ties", "max_abs_diff_step", "load_s"]].to_string(index=False))
    return df


if __name__ == "__main__":
    main()
