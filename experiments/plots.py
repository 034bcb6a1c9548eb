"""Plots of an experiment's results (matplotlib, Agg backend; every file written atomically).

* :func:`energy_vs_accuracy`: the average zero-shot accuracy (when tasks were run; else held-out
  perplexity, and the in-domain task accuracies where the curve's points have them) against
  simulated energy per token, one line per algorithm, the dense model marked;
* :func:`sparsity_by_site`: per-layer sparsity of each site kind (held-out text), natural zeros
  shaded;
* :func:`energy_breakdown`: energy per token by layer and by action, sparse beside dense;
* :func:`latency_breakdown`: cycles per token by layer, sparse beside dense.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from experiments.pipeline import atomic_savefig

STYLE = {"sequential": ("C0", "o"), "paper": ("C1", "s"), "uniform": ("C2", "^"), "teal": ("C3", "D"),
         "cats": ("C4", "v"), "finetune": ("C6", "P"), "schedule": ("C7", "*")}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _title(model: str) -> str:
    return model + ("  (RANDOM WEIGHTS: hardware study only)" if "RANDOM" in model else "")


def energy_vs_accuracy(df: pd.DataFrame, path: str | Path, model: str, highlight: dict | None = None) -> Path:
    """``df``: rows of :func:`experiments.pipeline.run_point` (with a ``dense`` row)."""
    plt = _plt()
    ycols = _accuracy_columns(df)
    fig, axes = plt.subplots(1, len(ycols), figsize=(6.2 * len(ycols), 4.6), squeeze=False)
    axes = axes[0]
    dense = df[df.algorithm == "dense"]
    for ax, (col, label) in zip(axes, ycols):
        for alg, g in df[df.algorithm != "dense"].groupby("algorithm", sort=False):
            # "<alg>, scaled": the run's schedule with its thresholds scaled, a dashed line through the run
            scaled = alg.endswith(", scaled")
            if scaled and highlight is not None and col in highlight:
                g = pd.concat([g, pd.DataFrame([{"energy_uJ": highlight["energy_uJ"], col: highlight[col]}])])
            g = g.sort_values("energy_uJ")
            c, mk = STYLE.get(alg.split(",")[0], ("k", "x"))
            ax.plot(g.energy_uJ, g[col], marker=mk, color=c, linestyle="--" if scaled else "-",
                    label=alg.replace(", scaled", ": this run's thresholds x scale") if scaled else alg)
        if len(dense):
            ax.scatter(dense.energy_uJ, dense[col], marker="X", s=90, color="k", zorder=5, label="dense")
        if highlight is not None and col in highlight:
            ax.scatter([highlight["energy_uJ"]], [highlight[col]], s=220, facecolors="none", edgecolors="r",
                       zorder=6, label="this run")
        ax.set_xlabel("simulated energy per token on the chip (µJ)")
        ax.set_ylabel(label)
        if col == "ppl":
            ax.set_yscale("log")  # a collapsing baseline would squash every other curve
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{_title(model)}: accuracy vs energy per token (SENECA-like chip)")
    fig.tight_layout()
    out = atomic_savefig(fig, path, dpi=130)
    plt.close(fig)
    return out


def _accuracy_columns(df: pd.DataFrame) -> list[tuple[str, str]]:
    """What the accuracy axes show: the average zero-shot accuracy when tasks were run (as the
    published figures plot), perplexity otherwise, then each in-domain task accuracy that at least
    two of the schedules were scored on (the curve's points skip the task sets unless
    ``--curve-tasks``: a panel of the run against dense alone is no curve)."""
    def has(col):
        return col in df and df[col].notna().any()
    if has("zs_avg"):
        from rllm.zeroshot import TASKS
        n = sum(any(c.startswith(f"zs_{t}_") for c in df.columns) for t in TASKS)
        return [("zs_avg", f"average zero-shot accuracy ({n} tasks)")]
    cols = [("ppl", "held-out perplexity (lower is better)")] if has("ppl") else \
        [("sparsity_mac", "MAC-weighted activation sparsity")]
    schedules = df[df.algorithm != "dense"] if "algorithm" in df else df
    for col, label in (("mc_acc_mi", "multiple-choice accuracy (mutual information)"),
                       ("cloze_acc", "cloze last-word accuracy")):
        if col in schedules and schedules[col].notna().sum() >= 2:
            cols.append((col, label))
    return cols


def _kind(site: str) -> tuple[int, str]:
    parts = site.split(".")
    return int(parts[1]), ".".join(parts[2:])


def sparsity_by_site(sites: pd.DataFrame, path: str | Path, model: str) -> Path:
    """``sites``: SparsityMeter table (site, sparsity, natural) of the held-out run."""
    plt = _plt()
    t = sites[sites.site.str.match(r"^(blocks|layers)\.\d+\.")].copy()
    t["layer"], t["kind"] = zip(*t.site.map(_kind))
    kinds = list(dict.fromkeys(t.kind))
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * t.layer.nunique() + 4), 4.6))
    layers = sorted(t.layer.unique())
    w = 0.8 / len(kinds)
    for j, k in enumerate(kinds):
        g = t[t.kind == k].set_index("layer").reindex(layers)
        x = np.arange(len(layers)) + (j - (len(kinds) - 1) / 2) * w
        ax.bar(x, 100 * g.sparsity, width=w, color=f"C{j}", label=k)
        ax.bar(x, 100 * g.natural, width=w, color="none", edgecolor="k", hatch="//", linewidth=0)
    ax.set_xticks(np.arange(len(layers)), [str(l) for l in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("activations sending no event (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{_title(model)}: sparsity per site on held-out text (hatched: natural zeros)")
    ax.legend(fontsize=8, ncol=min(7, len(kinds)), loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = atomic_savefig(fig, path, dpi=130)
    plt.close(fig)
    return out


def _layer_bars(ax, dense: pd.Series, sparse: pd.Series, n_layer: int) -> None:
    """Dense and event-based values per layer (index: layer, ``n_layer`` = the head) side by side."""
    idx = sorted(set(dense.index) | set(sparse.index))
    x = np.arange(len(idx))
    ax.bar(x - 0.2, dense.reindex(idx, fill_value=0), 0.4, color="0.6", label="dense")
    ax.bar(x + 0.2, sparse.reindex(idx, fill_value=0), 0.4, color="C0", label="event-based (thresholded)")
    ax.set_xticks(x, [str(i) if i < n_layer else "head" for i in idx])
    ax.set_xlabel("layer")


def energy_breakdown(sparse, dense, path: str | Path, model: str) -> Path:
    """``sparse``/``dense``: seneca_sim Reports of the same program."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    _layer_bars(a1, dense.by_layer().groupby("layer").energy_pJ.sum() / 1e6,
                sparse.by_layer().groupby("layer").energy_pJ.sum() / 1e6, int(sparse.meta["n_layer"]))
    a1.set_ylabel("energy per token (µJ)")
    a1.set_title("by layer")
    a1.legend(fontsize=8)
    bs, bd = sparse.by_action().set_index("action"), dense.by_action().set_index("action")
    acts = [a for a in bd.index if bd.energy_pJ.get(a, 0) > 0 or bs.energy_pJ.get(a, 0) > 0]
    y = np.arange(len(acts))
    a2.barh(y + 0.2, bd.energy_pJ.reindex(acts) / 1e6, 0.4, color="0.6", label="dense")
    a2.barh(y - 0.2, bs.energy_pJ.reindex(acts) / 1e6, 0.4, color="C0", label="event-based")
    a2.set_yticks(y, acts)
    a2.invert_yaxis()
    a2.set_xlabel("energy per token (µJ)")
    a2.set_title("by action")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    e_s, e_d = sparse.energy_pj().mean() / 1e6, dense.energy_pj().mean() / 1e6
    fig.suptitle(f"{_title(model)}: energy per token {e_s:.3g} µJ vs dense {e_d:.3g} µJ ({e_d / e_s:.2f}x)")
    fig.tight_layout()
    out = atomic_savefig(fig, path, dpi=130)
    plt.close(fig)
    return out


def latency_breakdown(sparse, dense, path: str | Path, model: str) -> Path:
    plt = _plt()
    us = 1e6 / sparse.meta["clock_hz"]

    def per_layer(r):
        c = r.cycles()
        return c.groupby("layer").cycles.sum() / r.n_tokens * us

    s, d = per_layer(sparse), per_layer(dense)
    fig, ax = plt.subplots(figsize=(max(6.5, 0.5 * len(set(s.index) | set(d.index)) + 4), 4.6))
    _layer_bars(ax, d, s, int(sparse.meta["n_layer"]))
    ax.set_ylabel("latency per token (µs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ls, ld = sparse.latency_cycles().mean() * us, dense.latency_cycles().mean() * us
    ax.set_title(f"{_title(model)}: latency per token {ls:.4g} µs vs dense {ld:.4g} µs ({ld / ls:.2f}x)")
    fig.tight_layout()
    out = atomic_savefig(fig, path, dpi=130)
    plt.close(fig)
    return out
