"""``python -m experiments.sweep MODEL``: energy-vs-accuracy curves over algorithms and knob values.

    python -m experiments.sweep rwkv_tiny --algorithms sequential uniform teal cats \\
        --tolerances 0.005 0.013 0.03 --sparsities 0.4 0.55 0.7 [--workers 2] [--out DIR]
    python -m experiments.sweep rwkv_tiny --sweep-file sweep.json   # {"algorithms": [...], "tolerances": [...], ...}

Every point (one algorithm at one knob value) runs the whole pipeline of
``experiments.pipeline.run_point`` and is saved as ``OUT/points/<key>.json`` the moment it
finishes (atomically; the key hashes the setup, the algorithm, its parameters and the chip).
A restarted sweep skips the points already there, so an interrupted sweep resumes where it
stopped, and its ``sweep.csv`` (rows sorted by algorithm and knob; no timings in it: those go
to ``timings.csv``) equals an uninterrupted run's. Points run in parallel on ``--workers``
local processes (default), or on a Ray cluster with ``--engine ray`` (``pip install ray``;
``ray.init(address="auto")`` joins a running cluster, else a local one starts).
Outputs: ``sweep.csv``, ``timings.csv``, ``energy_vs_accuracy.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

from experiments import pipeline as P

_CTX: P.Context | None = None


def _worker_init(setup: P.Setup, threads: int) -> None:
    import torch
    torch.set_num_threads(max(1, threads))
    global _CTX
    _CTX = P.Context.load(setup)


def _work(alg: str, knob: float) -> tuple[str, float, dict]:
    ctx = _CTX
    params = P.resolve_knob(ctx, alg, knob)
    pt = P.run_point(ctx, alg, params)
    return alg, knob, {"row": pt.row, "timing": pt.timing}


def _ray_point(setup: P.Setup, alg: str, knob: float):
    """A Ray task: module-level, so Ray ships it by reference; each worker loads the context once."""
    if _CTX is None or _CTX.setup != setup:
        _worker_init(setup, 1)
    return _work(alg, knob)


def _params_key(ctx_or_none, setup, alg, knob, fp):
    # the parameters without loading the model: the knob and the fixed extras resolve_knob adds
    params = {P.KNOB[alg]: float(knob)}
    if alg in ("uniform", "cats"):
        params["target"] = "mac"
    return P.point_key(setup, alg, params, fp)


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="rwkv_tiny")
    ap.add_argument("--algorithms", nargs="+", default=list(P.DEFAULT_CURVE), choices=list(P.KNOB))
    ap.add_argument("--tolerances", type=float, nargs="+", default=list(P.DEFAULT_CURVE["sequential"]),
                    help="knob values of sequential/paper (loss budgets)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=list(P.DEFAULT_CURVE["uniform"]),
                    help="knob values of uniform/teal/cats/finetune (MAC-weighted targets)")
    ap.add_argument("--sweep-file", help="JSON with any of: algorithms, tolerances, sparsities")
    ap.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 1)),
                    help="parallel local processes (default: one per core, at most 4)")
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument("--arch")
    ap.add_argument("--weights")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=P.Setup.sim_tokens)
    ap.add_argument("--eval-tokens", type=int, default=P.Setup.eval_tokens)
    ap.add_argument("--calib-tokens", type=int, default=P.Setup.calib_tokens)
    ap.add_argument("--cloze-items", type=int, default=P.Setup.cloze_items)
    ap.add_argument("--mc-items", type=int, default=P.Setup.mc_items)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="default results/MODEL/sweep")
    ap.add_argument("--max-points", type=int, default=None, help="stop after this many new points (for testing resume)")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    return P.cli(_main, parse(argv), "finished points are kept; rerun the same command to resume")


def _main(a) -> int:
    from seneca_sim.arch import ArchError, default_arch, load_arch
    from tqdm.auto import tqdm

    if a.sweep_file:
        try:
            spec = json.loads(Path(a.sweep_file).read_text())
            a.algorithms = list(spec.get("algorithms", a.algorithms))
            a.tolerances = [float(x) for x in spec.get("tolerances", a.tolerances)]
            a.sparsities = [float(x) for x in spec.get("sparsities", a.sparsities)]
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise P.ExperimentError(f"{a.sweep_file}: not a sweep file ({e}); expected JSON like "
                                    '{"algorithms": ["sequential"], "tolerances": [0.01]}') from None
        bad = [x for x in a.algorithms if x not in P.KNOB]
        if bad:
            raise P.ExperimentError(f"{a.sweep_file}: unknown algorithm(s) {bad}; choose from {', '.join(P.KNOB)}")
    for v in a.sparsities:
        if not 0 <= v < 1:
            raise P.ExperimentError(f"sparsity {v} is not in [0, 1)")
    for v in a.tolerances:
        if not v >= 0:
            raise P.ExperimentError(f"tolerance {v} must be >= 0")
    if a.workers < 1:
        raise P.ExperimentError(f"--workers must be >= 1, got {a.workers}")
    setup = P.Setup(model=a.model, weights=a.weights, random_weights=a.random_weights, arch=a.arch, device=a.device,
                    calib_tokens=a.calib_tokens, eval_tokens=a.eval_tokens, cloze_items=a.cloze_items,
                    mc_items=a.mc_items, sim_tokens=a.tokens, seed=a.seed)
    out = P.check_writable(a.out or Path("results") / Path(a.model).name / "sweep")
    try:
        fp = (load_arch(a.arch) if a.arch else default_arch()).fingerprint()
    except (ArchError, OSError) as e:
        raise P.ExperimentError(str(e).splitlines()[0]) from None
    knobs = {alg: (a.tolerances if P.KNOB[alg] == "tolerance" else a.sparsities) for alg in a.algorithms}
    points = P.grid(a.algorithms, knobs)
    store = P.PointStore(out)
    keys = {(alg, k): _params_key(None, setup, alg, k, fp) for alg, k in points}
    todo = [(alg, k) for alg, k in points if store.get(keys[(alg, k)]) is None]
    if a.max_points is not None:
        todo = todo[: a.max_points]
    print(f"{a.model}: {len(points)} points, {len(points) - len(todo)} already done, {len(todo)} to run"
          + (" on a Ray cluster" if a.engine == "ray" else f" on {a.workers} local worker(s)")
          + f"; results in {out}", flush=True)
    t0 = time.perf_counter()
    if todo:
        # load once here first: a bad model name fails before any worker starts
        P.Context.load(setup)
        bar = tqdm(total=len(todo), desc="sweep", disable=a.quiet, dynamic_ncols=True)
        for alg, k, rec in _run(todo, setup, a):
            store.put(keys[(alg, k)], rec)
            bar.update(1)
            bar.set_postfix(last=f"{alg} {k:g}")
        bar.close()
    recs = [store.get(keys[p]) for p in points]
    done = [r for r in recs if r is not None]
    rows = pd.DataFrame([r["row"] for r in done])
    if len(rows):
        rows = rows.sort_values(["algorithm", "knob_value"], kind="stable").reset_index(drop=True)
        P.atomic_write_csv(out / "sweep.csv", rows)
        P.atomic_write_csv(out / "timings.csv", pd.DataFrame([r["timing"] for r in done]))
        if "energy_uJ" in rows:
            from experiments import plots
            plots.energy_vs_accuracy(rows, out / "energy_vs_accuracy.png", str(rows.model.iloc[0]))
    missing = len(points) - len(done)
    print(f"{len(done)}/{len(points)} points in {out / 'sweep.csv'} ({time.perf_counter() - t0:.0f} s)"
          + (f"; {missing} still to run: rerun to resume" if missing else ""))
    return 0


def _run(todo, setup, a):
    """Yield (algorithm, knob, record) as points finish, on the chosen engine."""
    if a.engine == "ray":
        try:
            import ray
        except ImportError:
            raise P.ExperimentError("--engine ray needs Ray: pip install ray (or use the default --engine local)") from None
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto") if os.environ.get("RAY_ADDRESS") else None,
                 ignore_reinit_error=True)

        remote = ray.remote(_ray_point)
        futures = [remote.remote(setup, alg, k) for alg, k in todo]
        while futures:
            ready, futures = ray.wait(futures, num_returns=1)
            yield ray.get(ready[0])
        return
    if a.workers == 1:
        _worker_init(setup, os.cpu_count() or 1)
        for alg, k in todo:
            yield _work(alg, k)
        return
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    with ProcessPoolExecutor(max_workers=a.workers, initializer=_worker_init, initargs=(setup, threads)) as ex:
        futs = [ex.submit(_work, alg, k) for alg, k in todo]
        for f in as_completed(futs):
            yield f.result()


if __name__ == "__main__":
    sys.exit(main())
