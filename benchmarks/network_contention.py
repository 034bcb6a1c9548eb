"""Packet latency vs injection load on a 16x16 mesh: simulated (with link contention) vs analytic.

Two traffic patterns, each core injecting packets of ``--flits`` flits at random cycles (Bernoulli
per cycle) for ``--cycles`` cycles (``--layer-cycles`` for the layer pattern); packets injected in the first ``--warmup`` cycles are not
measured, and the network is then drained:

- uniform: every core sends unicast packets to uniformly random other cores;
- layer: a layer on one block of cores multicasts every event packet to all cores of the next
  layer's block (output-split tiling: each output tile needs every input event).

Load is offered flits per source core per cycle; ``saturation`` is the load at which the busiest
link would be busy every cycle, computed from the routes (channel load). Latency is injection to
the tail's arrival in the destination core, per delivery.

    python benchmarks/network_contention.py [--flits 5 --cycles 1000 --layer-cycles 4000 --warmup 200 --seed 0] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from seneca_sim.network import Mesh, Packet, multicast_tree, simulate_packets

LOAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.85, 0.95)  # of the saturation load


def uniform_traffic(mesh: Mesh) -> tuple[list, list[list]]:
    """Sources and, per source, the destination sets it picks from (uniformly): every other core."""
    nodes = [(x, y) for y in range(mesh.height) for x in range(mesh.width)]
    return nodes, [[(d,) for d in nodes if d != s] for s in nodes]


def layer_traffic(mesh: Mesh) -> tuple[list, list[list]]:
    """A 6x8 source layer on the left multicasting to a 4x8 destination layer on the right."""
    src = [(x, y) for y in range(4, 12) for x in range(0, 6)]
    dst = tuple((x, y) for y in range(4, 12) for x in range(10, 14))
    return src, [[dst] for _ in src]


def saturation_load(mesh: Mesh, sources: list, choices: list[list], n_flits: int) -> float:
    """Offered flits per source per cycle at which the busiest link's expected busy fraction reaches 1."""
    load = Counter()  # link -> busy cycles per cycle, per unit of packets per source per cycle
    for s, options in zip(sources, choices):
        for dsts in options:
            for link in multicast_tree(s, dsts, mesh):
                load[link] += n_flits * mesh.link_cycles(link) / len(options)
    return n_flits / max(load.values())


def offered_packets(mesh: Mesh, sources: list, choices: list[list], flits_per_cycle: float, n_flits: int,
                    cycles: int, rng: random.Random) -> list[Packet]:
    p = flits_per_cycle / n_flits  # packets per source per cycle
    packets = []
    for t in range(cycles):
        for s, options in zip(sources, choices):
            if rng.random() < p:
                packets.append(Packet(t, s, rng.choice(options), n_flits))
    return packets


def measure(name: str, mesh: Mesh, sources: list, choices: list[list], fractions, n_flits: int, cycles: int,
            warmup: int, seed: int) -> tuple[list[dict], pd.DataFrame]:
    sat = saturation_load(mesh, sources, choices, n_flits)
    rows, samples = [], []
    for frac in fractions:
        load = frac * sat
        packets = offered_packets(mesh, sources, choices, load, n_flits, cycles, random.Random(seed))
        t0 = time.perf_counter()
        run = simulate_packets(packets, mesh)
        wall = time.perf_counter() - t0
        d = run.deliveries[run.deliveries["inject"] >= warmup]
        lat = d["latency"].to_numpy()
        window = run.links["busy_cycles"] / (run.makespan or 1)
        rows.append(dict(traffic=name, offered_flits_per_core_cycle=load, fraction_of_saturation=frac,
                         saturation_flits_per_core_cycle=sat, packets=len(packets), deliveries_measured=len(d),
                         analytic_mean=d["analytic"].mean(), simulated_mean=lat.mean(),
                         p5=np.percentile(lat, 5), p50=np.percentile(lat, 50), p95=np.percentile(lat, 95),
                         p99=np.percentile(lat, 99), max=lat.max(), wait_mean=d["wait"].mean(),
                         busiest_link_utilization=window.max(), sim_wall_s=wall))
        samples.append(d.assign(traffic=name, fraction_of_saturation=frac)[["traffic", "fraction_of_saturation",
                                                                             "latency", "analytic"]])
        print(f"{name:8s} load {load:.4f} ({frac:.2f} sat): {len(packets):6d} packets, mean latency "
              f"analytic {rows[-1]['analytic_mean']:6.1f} vs simulated {rows[-1]['simulated_mean']:7.1f} "
              f"(p99 {rows[-1]['p99']:6.1f}) cycles  [{wall:.1f} s]", flush=True)
    return rows, pd.concat(samples, ignore_index=True)


def plot(summary: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    titles = {"uniform": "uniform random unicast", "layer": "layer-to-layer multicast (48 -> 32 cores)"}
    for ax, (name, g) in zip(axes, summary.groupby("traffic", sort=False)):
        x = g["offered_flits_per_core_cycle"]
        ax.fill_between(x, g["p5"], g["p95"], alpha=0.25, label="simulated p5-p95")
        ax.plot(x, g["simulated_mean"], "o-", label="simulated mean")
        ax.plot(x, g["p99"], ":", color="C0", label="simulated p99")
        ax.plot(x, g["analytic_mean"], "s--", color="C3", label="analytic mean (no contention)")
        ax.axvline(g["saturation_flits_per_core_cycle"].iloc[0], color="grey", lw=0.8, ls="-.",
                   label="busiest link saturated")
        ax.set_xlabel("offered load (flits per source core per cycle)")
        ax.set_ylabel("latency (cycles)")
        ax.set_yscale("log")
        ax.set_title(f"16x16 mesh, {titles.get(name, name)}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flits", type=int, default=5, help="flits per packet (1 header + payload)")
    ap.add_argument("--cycles", type=int, default=1000, help="cycles during which cores inject")
    ap.add_argument("--layer-cycles", type=int, default=4000,
                    help="injection cycles for the layer pattern (fewer sources, so longer for as many samples)")
    ap.add_argument("--warmup", type=int, default=200, help="packets injected before this cycle are not measured")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    mesh = Mesh(cols=16, rows=16)  # SENECA/SENSIM timing: 1 cycle per flit per link, no router delay
    rows_u, samples_u = measure("uniform", mesh, *uniform_traffic(mesh), LOAD_FRACTIONS, args.flits,
                                args.cycles, args.warmup, args.seed)
    rows_l, samples_l = measure("layer", mesh, *layer_traffic(mesh), LOAD_FRACTIONS, args.flits,
                                args.layer_cycles, args.warmup, args.seed)
    summary = pd.DataFrame(rows_u + rows_l)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "network_contention.csv", index=False)
    pd.concat([samples_u, samples_l]).to_csv(out / "network_contention_latencies.csv.gz", index=False)
    plot(summary, out / "network_contention.png")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(summary[["traffic", "offered_flits_per_core_cycle", "fraction_of_saturation", "packets",
                       "analytic_mean", "simulated_mean", "p50", "p95", "p99", "busiest_link_utilization"]])
    print(f"wrote {out / 'network_contention.csv'}, {out / 'network_contention.png'}")
    return summary


if __name__ == "__main__":
    main()
