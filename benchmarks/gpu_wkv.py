"""The WKV recurrence in sequence mode on a GPU: the Triton kernels against the chunked torch form.

One run on one CUDA GPU, side by side on the same inputs: first a check that the Triton
recurrence (``rllm.gpu.wkv``) equals the chunked form (``rllm.wkv.wkv_sequence(backend="torch")``)
and a float64 token-by-token reference, state carried across a split included; then each form's
time at the shapes calibration and zero-shot scoring use (RWKV-4 430M and 1.5B widths, 64 or 256
sequences of 256 tokens), the median of 10 timed calls after 3 warm-ups.

``--train`` does the same for training: the Triton kernels' hand-written gradient (k, v,
time_decay, time_first) against autograd through the chunked form in float64, then the forward
and backward of both at training shapes, and one whole optimizer step of the ``rwkv_pd12``
recipe (12 x 256, vocabulary 12,288, 32 x 512 tokens, bf16 autocast) with the model's WKV on
each form.

    python benchmarks/gpu_wkv.py [--train] [--out benchmarks/results]

Writes ``gpu_wkv.csv`` (``gpu_wkv_train.csv`` with ``--train``): shape, form, milliseconds, and
the speed-up of Triton over chunked torch.
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


def check_grad(device) -> list[dict]:
    """Largest relative error of the Triton form's output and gradients against the chunked
    form's autograd in float64 (ordinary keys and keys of +-30 and more)."""
    rows = []
    for scale, (B, T, C) in ((4.0, (4, 96, 300)), (30.0, (3, 200, 64))):
        k0, v0, td0, tf0 = inputs(B, T, C, device, seed=2)
        k0 = k0 / 4 * scale
        gy = torch.randn(B, T, C, generator=torch.Generator(device="cpu").manual_seed(5)).to(device)
        res = {}
        for form, dt in (("torch", torch.float64), ("triton", torch.float32)):
            k, v, td, tf = (x.clone().to(dt).requires_grad_() for x in (k0, v0, td0, tf0))
            out, _ = wkv_sequence(k, v, td, tf, backend=form)
            (out.double() * gy.double()).sum().backward()
            res[form] = [out.detach().double()] + [x.grad.double() for x in (k, v, td, tf)]
        row = dict(key_scale=scale, B=B, T=T, C=C)
        for name, a, b in zip(("out", "grad_k", "grad_v", "grad_time_decay", "grad_time_first"), res["torch"], res["triton"]):
            row[f"{name}_rel_err"] = float((a - b).abs().max() / a.abs().max())
        rows.append(row)
        print("grad check, keys x{key_scale:g}: ".format(**row)
              + ", ".join(f"{k[:-8]} {v:.1e}" for k, v in row.items() if k.endswith("_rel_err")))
    return rows


def time_train(device) -> list[dict]:
    """Forward + backward of the WKV alone, and one optimizer step of the rwkv_pd12 recipe, per form."""
    import functools
    import rllm.model as model_mod
    from rllm.training.recipe import Trainer, bypass_sites, model_config, parse_args
    rows = []
    for B, T, C in ((32, 512, 256), (16, 512, 1024)):
        k, v, td, tf = (x.requires_grad_() for x in inputs(B, T, C, device))
        gy = torch.randn(B, T, C, device=device)

        def step(form):
            out, _ = wkv_sequence(k, v, td, tf, backend=form)
            torch.autograd.grad(out, (k, v, td, tf), gy)

        ms = {f: timed(lambda: step(f)) for f in ("triton", "torch")}
        rows.append(dict(what="wkv forward+backward", B=B, T=T, C=C, triton_ms=ms["triton"],
                         torch_chunked_ms=ms["torch"], speedup=ms["torch"] / ms["triton"]))
        print(f"WKV fwd+bwd B={B} T={T} C={C}: triton {ms['triton']:.2f} ms, chunked torch {ms['torch']:.2f} ms "
              f"({rows[-1]['speedup']:.1f}x)")
    args = parse_args(["--out", "/tmp/unused", "--preset", "rwkv_pd12", "--device", "cuda"])
    ms = {}
    original = model_mod.wkv_sequence
    for form in ("triton", "torch"):
        model_mod.wkv_sequence = functools.partial(original, backend=form)
        try:
            torch.manual_seed(0)
            model = model_mod.RWKV(model_config(args, args.vocab_size)).to(device)
            data = torch.randint(0, args.vocab_size, (1 << 20,), device=device)
            trainer = Trainer(args, model, data, data, device)
            model.train()
            with bypass_sites(model):
                ms[form] = timed(lambda: trainer.step(0), reps=5, warm=2)
        finally:
            model_mod.wkv_sequence = original
    tokens = args.batch * args.ctx
    rows.append(dict(what="rwkv_pd12 training step", B=args.batch, T=args.ctx, C=args.n_embd, triton_ms=ms["triton"],
                     torch_chunked_ms=ms["torch"], speedup=ms["torch"] / ms["triton"],
                     triton_tokens_per_s=tokens / ms["triton"] * 1e3, torch_tokens_per_s=tokens / ms["torch"] * 1e3))
    print(f"rwkv_pd12 training step ({args.batch} x {args.ctx}): triton {ms['triton']:.1f} ms "
          f"({rows[-1]['triton_tokens_per_s']:,.0f} tokens/s), chunked torch {ms['torch']:.1f} ms "
          f"({rows[-1]['torch_tokens_per_s']:,.0f} tokens/s): {rows[-1]['speedup']:.1f}x")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--train", action="store_true", help="the training kernels: gradient check and timings")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_wkv.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import pandas as pd
    dev = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name()}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.train:
        chk = check_grad(dev)
        pd.DataFrame(chk).to_csv(out / "gpu_wkv_train_check.csv", index=False)
        if max(v for r in chk for k, v in r.items() if k.endswith("_rel_err")) > 1e-4:
            print("the Triton gradient disagrees with autograd", file=sys.stderr)
            return 1
        pd.DataFrame(time_train(dev)).to_csv(out / "gpu_wkv_train.csv", index=False)
        return 0
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
    pd.DataFrame(rows).to_csv(out / "gpu_wkv.csv", index=False)
    pd.DataFrame(chk).to_csv(out / "gpu_wkv_check.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
