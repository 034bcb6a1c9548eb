"""NeuroBench workload metrics of a run, always as a (dense, effective) pair.

Definitions follow NeuroBench (Yik et al., "The neurobench framework for benchmarking neuromorphic
computing algorithms and systems", Nature Communications 2025):

* **activation sparsity**: share of activations that are zero (send no event), over all site
  inputs of all tokens; dense = 0 by definition. The MAC-weighted variant weights each site by
  the size of the matrix it feeds (the share of synaptic work skipped).
* **synaptic operations**: RWKV's activations are graded (non-binary), so the operations are
  MACs; ACs are 0. Dense = every input of every matrix times its outputs; effective = only the
  inputs that fired (``events x outputs``), per token.
* **model footprint**: bytes the model occupies on the chip (weights, neuron parameters and
  state, accumulators, event buffers; the embedding table stays on the host). Activation sparsity
  does not shrink it, so dense = effective; the pair is kept for a uniform table.
* **connection sparsity**: share of zero weights; the mapped weights are dense (0).
"""
from __future__ import annotations

import pandas as pd


def site_metrics(program, trace) -> pd.DataFrame:
    """Per site: width, outputs, events per token, sparsity, dense and effective MACs per token.
    Sites the trace lacks (the head, usually) count as dense."""
    rows = []
    T = max(int(trace.n_tokens), 1)
    for name, width, out in zip(program.site_names, program.sites.in_dim, program.sites.out_dim):
        width, out = int(width), int(out)
        events = float(trace.events_per_token(name).sum()) / T if name in trace.masks else float(width)
        rows.append(dict(site=name, width=width, outputs=out, events_per_token=events,
                         sparsity=1.0 - events / width, dense_macs=width * out, effective_macs=events * out,
                         traced=name in trace.masks))
    return pd.DataFrame(rows)


def workload_metrics(program, trace) -> pd.DataFrame:
    """The NeuroBench workload metrics of ``trace`` run on ``program``: metric, dense, effective, unit."""
    s = site_metrics(program, trace)
    act = 1.0 - s.events_per_token.sum() / s.width.sum()
    mac_w = 1.0 - s.effective_macs.sum() / s.dense_macs.sum()
    footprint = float(program.cores.mem_bytes.sum())
    rows = [
        ("activation_sparsity", 0.0, act, "fraction", "zeros over all site inputs"),
        ("activation_sparsity_mac_weighted", 0.0, mac_w, "fraction", "sites weighted by the matrix they feed"),
        ("synaptic_operations_macs", float(s.dense_macs.sum()), float(s.effective_macs.sum()), "MACs/token",
         "graded activations: every synaptic operation is a MAC"),
        ("synaptic_operations_acs", 0.0, 0.0, "ACs/token", "no binary activations"),
        ("model_footprint", footprint, footprint, "bytes",
         f"on-chip data memory in use ({program.meta['weight_format']} weights); embedding on the host"),
        ("connection_sparsity", 0.0, 0.0, "fraction", "weights are mapped dense"),
    ]
    return pd.DataFrame(rows, columns=["metric", "dense", "effective", "unit", "note"])


__all__ = ["workload_metrics", "site_metrics"]
