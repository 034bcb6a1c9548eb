"""MKL's ``F.linear`` against oneDNN's (``rllm.linear``) on a CPU, side by side, on the embedded model's shapes.

    python benchmarks/cpu_matmul.py [--rows 2048] [--repeats 7] [--out benchmarks/results]

Each shape is a float32 product ``[rows, in] x [in, out]^T`` as the model runs it when it scores a
batch of sequences (rows = batch x sequence positions). The two paths are timed alternately after a
warm-up, so both see the same background load; the CSV has the median of each, the GFLOP/s it
achieves (2 x rows x in x out per product), the ratio of the medians, and the largest difference
between the two outputs relative to the largest output (float32 rounding: the sums' order differs).
A full thresholded forward of ``rwkv_pd12`` under each path closes the table.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

import rllm.linear as L
from forward_throughput import interleaved  # the sibling benchmark's timer: a warm-up, then the two in turn

# (name, in, out) of rwkv_pd12 (256 wide, 12,288 tokens) and of a 4x wider model for contrast.
SHAPES = [("att 256x256", 256, 256), ("ffn key 256x1024", 256, 1024), ("ffn value 1024x256", 1024, 256),
          ("head 256x12288", 256, 12288), ("att 1024x1024", 1024, 1024), ("ffn key 1024x4096", 1024, 4096)]


def _median_times(fa, fb, repeats: int) -> tuple[float, float]:
    ta, tb = interleaved(fa, fb, repeats)
    return statistics.median(ta), statistics.median(tb)


def _onednn(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def shape_rows(rows: int, repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for name, n_in, n_out in SHAPES:
        x = torch.randn(rows, n_in, generator=g)
        w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        t_mkl, t_dnn = _median_times(lambda: F.linear(x, w), lambda: _onednn(x, w), repeats)
        ref = F.linear(x, w)
        rel = float((_onednn(x, w) - ref).abs().max() / ref.abs().max())
        flop = 2.0 * rows * n_in * n_out
        out.append({"case": name, "rows": rows, "mkl_ms": 1e3 * t_mkl, "onednn_ms": 1e3 * t_dnn,
                    "mkl_gflops": flop / t_mkl / 1e9, "onednn_gflops": flop / t_dnn / 1e9,
                    "speedup": t_mkl / t_dnn, "max_rel_diff": rel})
    return out


def model_row(repeats: int) -> dict | None:
    """A thresholded rwkv_pd12 forward (its shipped schedule's shape: scalar thresholds at every site)
    over 8 x 256 tokens, with ``rllm.linear`` switched between the two paths."""
    from rllm.weights import ModelLoadError, load_model
    try:
        model = load_model("rwkv_pd12").model.eval()
    except ModelLoadError:
        return None
    model.set_thresholds({name: 0.05 for name in model.sites})
    idx = torch.randint(0, model.config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))

    def run(flag: bool):
        L.ONEDNN = flag
        with torch.no_grad():
            return model(idx)

    saved = L.ONEDNN
    try:
        t_mkl, t_dnn = _median_times(lambda: run(False), lambda: run(True), repeats)
        ref = run(False)
        rel = float((run(True) - ref).abs().max() / ref.abs().max())
    finally:
        L.ONEDNN = saved
    return {"case": "rwkv_pd12 thresholded forward 8x256", "rows": 2048, "mkl_ms": 1e3 * t_mkl,
            "onednn_ms": 1e3 * t_dnn, "speedup": t_mkl / t_dnn, "max_rel_diff": rel}


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if not L.ONEDNN and os.environ.get("EVENT_RWKV_ONEDNN", "1") != "0":
        print("oneDNN's linear is not available in this PyTorch build; nothing to compare")
        return pd.DataFrame()
    rows = shape_rows(a.rows, a.repeats)
    m = model_row(a.repeats)
    if m is not None:
        rows.append(m)
    df = pd.DataFrame(rows)
    df["threads"] = torch.get_num_threads()
    df["cpu"] = platform.processor() or platform.machine()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(a.out) / "cpu_matmul.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.drop(columns=["cpu"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return df


if __name__ == "__main__":
    main()
