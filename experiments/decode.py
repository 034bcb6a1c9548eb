"""``python -m experiments.decode MODEL``: greedy decoding with and without the event kernels.

    python -m experiments.decode rwkv_tiny --schedule results/rwkv_tiny/schedule.json --device cuda --tokens 64
    python -m experiments.decode rwkv_tiny --sparsity 0.5            # a uniform schedule, calibrated here

What a researcher gets today on a GPU from the same thresholds: the model decodes ``--tokens``
tokens greedily from ``--prompt``, once with dense matrix products and once with
``rllm.gpu.sparse_gemv``'s event kernels (on CUDA, per matrix, the fastest of dense and the Triton
kernels at the sparsity it sees, measured on this GPU; on CPU the torch fallback, which gathers the
weight rows of the firing inputs). Both runs use the same schedule and fp32 accumulation; the
command prints tokens/s of each, their ratio and whether the generated tokens agree. RWKV-4
decodes in step mode; OPT (``opt_125m``...) through its key/value cache.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from experiments import pipeline as P


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.decode", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="rwkv_pd12")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--schedule", help="schedule JSON (e.g. results/MODEL/schedule.json)")
    g.add_argument("--sparsity", type=float, default=0.5, help="else: a uniform schedule at this MAC-weighted target")
    ap.add_argument("--weights")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    ap.add_argument("--prompt", default="\n", help="text to start from")
    return ap.parse_args(argv)


@torch.no_grad()
def greedy(model, ids: list[int], n: int, device) -> tuple[list[int], float]:
    """Greedy continuation of ``ids`` (RWKV: step mode from a fresh state; OPT: its cache). (tokens, tok/s)."""
    prompt = torch.tensor([ids], device=device)
    logits, state = model(prompt, return_state=True)
    tok = logits[:, -1].argmax(-1)
    out = []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        out.append(int(tok))
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)
    sync()
    return out, n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    return P.cli(_main, parse(argv))


def _main(a) -> int:
    from rllm.gpu.sparse_gemv import disable_event_kernels, enable_event_kernels
    from rllm.weights import ModelLoadError, load_model
    from thresholds import Schedule, ScheduleError, uniform

    if a.tokens < 1:
        raise P.ExperimentError(f"--tokens must be positive, got {a.tokens}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise P.ExperimentError("--device cuda: no CUDA device is visible here; use --device cpu")
    dev = torch.device(a.device)
    try:
        lm = load_model(a.model, weights=a.weights, device=a.device)
    except ModelLoadError as e:
        raise P.ExperimentError(str(e)) from None
    model, tok = lm.model.eval(), lm.tokenizer
    if tok is None:
        raise P.ExperimentError(f"{lm.name}: no tokenizer beside the weights ({lm.source}); decoding needs one")
    ids = tok.encode(a.prompt).ids or [0]
    calib = P._data_file(lm, "calib.txt")
    if a.schedule:
        try:
            sched = Schedule.load(a.schedule, model=model)
        except ScheduleError as e:
            raise P.ExperimentError(str(e)) from None
    else:
        if not 0 <= a.sparsity < 1:
            raise P.ExperimentError(f"--sparsity must be in [0, 1), got {a.sparsity}")
        if calib is None:
            raise P.ExperimentError(f"{lm.name}: no calib.txt beside the weights; pass --schedule FILE")
        from thresholds.calibrate import load_calib_tokens
        c = load_calib_tokens(calib, tok)[: 16 * 129].reshape(-1, 129)
        sched = uniform(model, c, sparsity=a.sparsity, target="mac", device=a.device, progress=False)
    sched.apply(model)
    dense_tokens, dense_tps = greedy(model, ids, a.tokens, dev)
    # On CUDA each matrix gets the fastest of dense and the kernels at its measured sparsity
    # (tuned on the prompt and calibration tokens); on CPU every matrix takes the torch fallback.
    sample = None
    if dev.type == "cuda":
        text = calib.read_text(encoding="utf-8")[:4000] if calib is not None else a.prompt * 64
        sample = torch.tensor([(tok.encode(text).ids or ids)[:16]], device=dev)
    enable_event_kernels(model, sample=sample)
    try:
        event_tokens, event_tps = greedy(model, ids, a.tokens, dev)
    finally:
        disable_event_kernels(model)
    same = next((i for i, (x, y) in enumerate(zip(dense_tokens, event_tokens)) if x != y), a.tokens)
    print(f"{lm.name} on {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), schedule "
          f"{sched.algorithm}: MAC-weighted sparsity {sched.sparsity_mac_weighted:.3f} on calibration data")
    print(f"dense products : {dense_tps:8.1f} tokens/s")
    print(f"event kernels  : {event_tps:8.1f} tokens/s ({event_tps / dense_tps:.2f}x)")
    print(f"greedy tokens agree: {same}/{a.tokens}")
    print("text:", repr(tok.decode(event_tokens)[:200]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
