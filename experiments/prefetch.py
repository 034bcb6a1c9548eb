"""``python -m experiments.prefetch MODEL``: activation-pattern prediction and weight streaming.

    python -m experiments.prefetch rwkv_tiny --mesh 6 --chips 1 2      # a 36-core chip too small for it
    python -m experiments.prefetch rwkv_1b5 --random-weights --chips 1 2 4 8
    python -m experiments.prefetch rwkv_tiny --mesh 6 --bandwidth 32 512 8192   # shared-memory bits per cycle

1. Thresholds: ``--algorithm`` at ``--sparsity`` (default uniform, 60% MAC-weighted) on the
   calibration tokens.
2. Patterns and predictors (:mod:`rllm.prediction`): every predictor is fitted on a trace of
   the calibration tokens and scored on the simulation tokens (held out): per site, density,
   consecutive-token Jaccard and firing skew; precision, recall and F1 at fetch budgets of
   0.5x to 2x the site's calibration firing count.
3. Streaming (:mod:`compiler.residency`, :mod:`seneca_sim.fetch`): for each ``--chips`` count,
   the model compiled onto that many chips (matrices that do not fit are streamed from the
   chips' shared memory), and the energy and latency per token of every fetch policy (on
   demand, dense streaming, prefetch by each predictor at ``--prefetch-budget``), thresholded
   beside dense (every weight streamed, every token). The same model with every weight on its
   cores, on as many chips as that takes, is the reference row ``on core``.

``--mesh K`` models a smaller chip: the shipped one with a K x K mesh of cores; ``--bandwidth``
repeats step 3 for shared memories of other bandwidths (bits per cycle per chip). Outputs (in
``--out``, default ``results/MODEL/prefetch``): ``patterns.csv``, ``predictors.csv``,
``predictors_by_kind.csv``, ``policies.csv``, ``predictors.png``, ``policies.png``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import pandas as pd

from experiments import pipeline as P

POLICIES = ("demand", "dense", "previous", "hot", "lowrank", "oracle")
BUDGETS = (0.5, 1.0, 1.5, 2.0)


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.prefetch", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="rwkv_pd12")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--weights")
    ap.add_argument("--arch", help="chip TOML (default: the shipped seneca.toml)")
    ap.add_argument("--mesh", type=int, help="use the chip with a K x K mesh of cores instead")
    ap.add_argument("--chips", type=int, nargs="+", default=[1], help="chip counts to map onto")
    ap.add_argument("--bandwidth", type=float, nargs="+", default=None,
                    help="shared-memory bandwidths to study, bits per cycle per chip (default: the arch's)")
    ap.add_argument("--algorithm", default="uniform", choices=list(P.KNOB))
    ap.add_argument("--sparsity", type=float, default=0.6, help="MAC-weighted target (uniform/teal/cats)")
    ap.add_argument("--prefetch-budget", type=float, default=1.0)
    ap.add_argument("--rank", type=int, default=16, help="rank of the low-rank predictor")
    ap.add_argument("--tokens", type=int, default=256, help="simulation (held-out) tokens")
    ap.add_argument("--calib-tokens", type=int, default=P.Setup.calib_tokens)
    ap.add_argument("--out")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    return P.cli(_main, parse(argv))


def _main(a) -> int:
    t0 = time.perf_counter()
    for n in a.chips:
        if n < 1:
            raise P.ExperimentError(f"--chips must be >= 1, got {n}")
    out = P.check_writable(a.out or Path("results") / Path(a.model).name / "prefetch")
    arch_path = _arch_file(a, out)
    setup = P.Setup(model=a.model, weights=a.weights, random_weights=a.random_weights, arch=arch_path,
                    calib_tokens=a.calib_tokens, sim_tokens=a.tokens, eval_tokens=1, cloze_items=0, mc_items=0)
    ctx = P.Context.load(setup)
    print(f"{ctx.name}: thresholds {a.algorithm} at {a.sparsity:.0%}", flush=True)
    schedule = ctx.schedule(a.algorithm, P.resolve_knob(ctx, a.algorithm, a.sparsity if P.KNOB[a.algorithm] == "sparsity"
                                                        else None), progress=not a.quiet)
    fit_tr, held_tr = _traces(ctx, schedule)
    predictors = _fit(fit_tr, a.rank)
    _patterns_and_predictors(held_tr, predictors, out, ctx.name)
    rows = []
    for arch in _bandwidth_variants(ctx.arch, a.bandwidth):
        for n in list(a.chips) + [None]:
            rows += _policies(ctx, arch, schedule, held_tr, predictors, n, a.prefetch_budget)
    table = pd.DataFrame(rows).drop_duplicates(["bandwidth", "chips", "cores", "policy"]).reset_index(drop=True)
    P.atomic_write_csv(out / "policies.csv", table)
    _plot_policies(table, out / "policies.png", ctx.name)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["bandwidth", "chips", "cores", "streamed", "policy", "energy_uJ", "latency_us", "dense_energy_uJ",
                     "dense_latency_us", "shared_MB_per_token"]].to_string(index=False))
    print(f"results in {out}/ ({time.perf_counter() - t0:.0f} s)")
    return 0


def _arch_file(a, out: Path) -> str | None:
    """``--arch``, or with ``--mesh K`` a copy of it (or of the shipped chip) with a K x K mesh,
    written into ``out`` (the chip the results were counted on)."""
    if a.mesh is None:
        return a.arch
    from seneca_sim.arch import Arch, ArchError, default_arch, load_arch
    if a.mesh < 1:
        raise P.ExperimentError(f"--mesh must be >= 1, got {a.mesh}")
    try:
        raw = copy.deepcopy((load_arch(a.arch) if a.arch else default_arch()).to_dict())
    except (ArchError, OSError) as e:
        raise P.ExperimentError(str(e).splitlines()[0]) from None
    for k in ("mesh_rows", "mesh_cols"):
        raw["chip"][k] = {"value": a.mesh, "unit": "cores", "assumed": True,
                          "rationale": f"a {a.mesh}x{a.mesh}-core chip for the streaming study"}
    path = out / f"chip_mesh{a.mesh}.toml"
    Arch.from_dict(raw, origin=f"mesh{a.mesh}").save(path)
    return str(path)


def _traces(ctx, schedule):
    """(calibration trace to fit on, held-out trace of the simulation tokens), with block inputs."""
    from rllm.events import trace
    calib = ctx.calib[:, :-1].reshape(-1)[:P.PREDICTOR_FIT_TOKENS]
    fit = trace(ctx.model, calib, schedule.thresholds, block_inputs=True, name=ctx.name)
    held = trace(ctx.model, ctx.sim_ids, schedule.thresholds, block_inputs=True, name=ctx.name)
    return fit, held


def _fit(fit_tr, rank: int) -> dict:
    from rllm.prediction import PREDICTORS, fit_predictor
    return {k: fit_predictor(k, fit_tr, rank=rank) for k in PREDICTORS}


def _patterns_and_predictors(held_tr, predictors: dict, out: Path, name: str) -> None:
    from rllm.prediction import by_kind, evaluate, pattern_stats
    P.atomic_write_csv(out / "patterns.csv", pattern_stats(held_tr))
    table = evaluate(list(predictors.values()), held_tr, BUDGETS)
    P.atomic_write_csv(out / "predictors.csv", table)
    kinds = by_kind(table)
    P.atomic_write_csv(out / "predictors_by_kind.csv", kinds)
    _plot_predictors(kinds, out / "predictors.png", name)
    with pd.option_context("display.width", 200):
        print(kinds[kinds.budget == 1.0].pivot(index="kind", columns="predictor", values="f1").round(3).to_string())


def _bandwidth_variants(arch, bandwidths):
    """``arch``, or one copy of it per shared-memory bandwidth (bits per cycle)."""
    from seneca_sim.arch import Arch
    if not bandwidths:
        return [arch]
    if arch.shared is None:
        raise P.ExperimentError(f"--bandwidth: {arch.origin} has no [shared_memory]")
    out = []
    for b in bandwidths:
        if not b > 0:
            raise P.ExperimentError(f"--bandwidth must be > 0, got {b}")
        raw = copy.deepcopy(arch.to_dict())
        raw["shared_memory"]["bandwidth_bits_per_cycle"] = {
            "value": b, "unit": "bits", "assumed": True, "rationale": "a bandwidth studied by experiments.prefetch"}
        out.append(Arch.from_dict(raw, origin=f"{arch.origin} at {b:g} bits/cycle"))
    return out


def _policies(ctx, arch, schedule, held_tr, predictors: dict, chips: int | None, budget: float) -> list[dict]:
    """Energy and latency of every policy on ``chips`` chips (None: every weight on its cores)."""
    from compiler import CompileError, compile
    from seneca_sim import simulate
    try:
        program = compile(ctx.model, arch, chips=chips, expected_sparsity=0.0)
    except CompileError as e:
        print(f"{chips} chip(s): {str(e).splitlines()[0]}", file=sys.stderr)
        return []
    rows = []
    for policy in (POLICIES if program.meta["streamed"] else ("on core",)):
        plan = _plan(policy, program, held_tr, predictors, budget)
        r = simulate(program, held_tr, arch, fetch=plan).summary()
        rows.append(dict(bandwidth=arch.shared.bandwidth_bits_per_cycle if arch.shared else float("nan"),
                         chips=program.n_chips, cores=program.n_cores, streamed=len(program.meta["streamed"]),
                         policy=policy, energy_uJ=r["energy_uJ_per_token"], latency_us=r["latency_us_per_token"],
                         dense_energy_uJ=r["dense_energy_uJ_per_token"], dense_latency_us=r["dense_latency_us_per_token"],
                         shared_MB_per_token=r["shared_read_bits_per_token"] / 8e6, predictor_macs=plan.predictor_macs,
                         mapping="streamed" if program.meta["streamed"] else "on core"))
    return rows


def _plan(policy: str, program, held_tr, predictors: dict, budget: float):
    from rllm.prediction import predicted_trace
    from seneca_sim.fetch import FetchPlan
    if policy in ("on core", "demand", "dense"):
        return FetchPlan("demand" if policy == "on core" else policy)
    p = predictors[policy]
    streamed = [s for s in program.meta["streamed"] if s in held_tr.masks]
    pred = P._with_dense_sites(predicted_trace(p, held_tr, budget, sites=streamed), program,
                               [s for s in program.meta["streamed"] if s not in held_tr.masks])
    return FetchPlan("prefetch", pred, policy, predictor_macs=sum(p.cost(s)["macs"] for s in streamed))


def _plot_predictors(kinds: pd.DataFrame, path: Path, name: str) -> None:
    from experiments.plots import _plt, _title
    plt = _plt()
    ks = list(dict.fromkeys(kinds.kind))
    fig, axes = plt.subplots(1, len(ks), figsize=(2.6 * len(ks), 3.2), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for pred, g in kinds[(kinds.kind == k) & ~kinds.predictor.isin(["none"])].groupby("predictor", sort=False):
            ax.plot(g.budget, g.f1, marker="o", label=pred)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("fetch budget (x firing count)")
    axes[0][0].set_ylabel("F1 of the predicted firing set")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(_title(name), fontsize=10)
    fig.tight_layout()
    P.atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def _plot_policies(table: pd.DataFrame, path: Path, name: str) -> None:
    """Energy and latency per token against chips, one line per policy; a row of panels per bandwidth."""
    from experiments.plots import _plt, _title
    plt = _plt()
    bws = list(dict.fromkeys(table.bandwidth))
    fig, axes = plt.subplots(len(bws), 2, figsize=(11, 4.0 * len(bws)), squeeze=False)
    for row, bw in zip(axes, bws):
        t = table[table.bandwidth == bw]
        for ax, col, label in ((row[0], "energy_uJ", "energy per token (µJ)"), (row[1], "latency_us", "latency per token (µs)")):
            for pol, g in t[t.mapping == "streamed"].groupby("policy", sort=False):
                ax.plot(g.chips, g[col], marker="o", label=pol)
            on = t[t.mapping == "on core"].sort_values("chips")
            if len(on):
                ax.axhline(float(on[col].iloc[0]), color="k", ls="--",
                           label=f"every weight on its cores ({int(on.chips.iloc[0])} chips)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("chips")
            ax.set_ylabel(label + ", thresholded")
            ax.set_title(f"shared memory {bw:g} bits/cycle per chip", fontsize=9)
        row[1].legend(fontsize=8)
    fig.suptitle(_title(name), fontsize=10)
    fig.tight_layout()
    P.atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
