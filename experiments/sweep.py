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
local processes (default; fresh interpreters, each with its share of the cores, watched by
``experiments.workers``), or on a Ray cluster with ``--engine ray`` (``pip install ray``; it
joins the cluster at ``$RAY_ADDRESS`` or a running local one, else starts one).
A point that fails (it raises, its worker dies, or its worker hangs) is reported, its traceback
kept in ``OUT/failed/``, and the sweep goes on; the command then exits 1 and a rerun retries
just the failed points. Ctrl-C stops the workers at once; finished points are kept.
With ``--tasks`` every point is also scored on the zero-shot suite (``zs_*`` columns; the plot then
shows the average zero-shot accuracy). Outputs: ``sweep.csv``, ``timings.csv``, ``energy_vs_accuracy.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import pandas as pd

from experiments import pipeline as P
from experiments import workers

_CTX: P.Context | None = None


def _worker_init(setup: P.Setup, threads: int | None = None) -> None:
    """Load a worker's context once (``threads``: set its torch and numba threads first)."""
    global _CTX
    if threads is not None:
        workers.set_threads(threads)
    _CTX = P.Context.load(setup)
    _CTX.teal_reach = 0.9  # a sweep asks TEAL targets in any order: its whole path, once per worker
    if _CTX.kind == "rwkv":  # a model that does not fit the chip fails here, before any point
        _CTX.program()


def _work(alg: str, knob: float) -> dict:
    params = P.resolve_knob(_CTX, alg, knob)
    pt = P.run_point(_CTX, alg, params)
    return {"row": pt.row, "timing": pt.timing}


def _ray_point(setup: P.Setup, alg: str, knob: float):
    """A Ray task: module-level, so Ray ships it by reference; each worker loads the context once.
    Ray starts its workers as fresh processes (not forks of the driver), so they hold no inherited
    thread pools; a task gets one CPU by default, and uses one thread."""
    if _CTX is None or _CTX.setup != setup:
        _worker_init(setup, 1)
    return _work(alg, knob)


def _params_key(ctx_or_none, setup, alg, knob, fp):
    # the parameters without loading the model: the knob and the fixed extras resolve_knob adds
    params = {P.KNOB[alg]: float(knob)}
    if alg in ("uniform", "cats"):
        params["target"] = "mac"
    return P.point_key(setup, alg, params, fp)


def default_workers(cores: int | None = None) -> int:
    """One worker per two cores, at most 4. On 2 cores one point on 2 threads evaluates 1.75x as
    fast as on 1, and two 1-thread workers side by side get only about 6% more done than that,
    less than each worker's start and its own copy of per-model work (README, "Sweeps")."""
    return max(1, min(4, (cores or os.cpu_count() or 1) // 2))


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="rwkv_pd12")
    ap.add_argument("--algorithms", nargs="+", default=["sequential", *P.DEFAULT_CURVE], choices=list(P.KNOB))
    ap.add_argument("--tolerances", type=float, nargs="+", default=[0.006],
                    help="knob values of sequential/paper (loss budgets)")
    ap.add_argument("--sparsities", type=float, nargs="+", default=list(P.DEFAULT_CURVE["uniform"]),
                    help="knob values of uniform/teal/cats/finetune (MAC-weighted targets)")
    ap.add_argument("--sweep-file", help="JSON with any of: algorithms, tolerances, sparsities")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="parallel local processes, each with cores/workers threads (default: one per two cores, "
                         "at most 4: a point's own threads already use two cores well)")
    ap.add_argument("--engine", choices=("local", "ray"), default="local")
    ap.add_argument("--stall-timeout", type=float, default=300.0,
                    help="seconds a local worker may hold a point without using CPU time before it counts as hung "
                         "and the point as failed (0: never)")
    ap.add_argument("--arch")
    ap.add_argument("--weights")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=P.Setup.sim_tokens)
    ap.add_argument("--eval-tokens", type=int, default=P.Setup.eval_tokens)
    ap.add_argument("--calib-tokens", type=int, default=P.Setup.calib_tokens)
    ap.add_argument("--cloze-items", type=int, default=P.Setup.cloze_items)
    ap.add_argument("--mc-items", type=int, default=P.Setup.mc_items)
    ap.add_argument("--tasks", help="the zero-shot suite at every point: paper, or a list such as piqa,hellaswag "
                    "(as experiments.run)")
    ap.add_argument("--limit", type=int, help="the first N items of each zero-shot task")
    ap.add_argument("--task-data", help="a directory of your own task files")
    ap.add_argument("--calib", help="calibration text or token ids (as experiments.run)")
    ap.add_argument("--tokenizer", help="tokenizer.json (as experiments.run)")
    ap.add_argument("--batch-tokens", type=int, help="tokens per forward pass of the zero-shot scoring")
    ap.add_argument("--tf32", action="store_true", help="CUDA: float32 matrix products in TF32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chips", type=int, default=None, help="chips to map onto (fewer stream weights; see experiments.run)")
    ap.add_argument("--prefetch", default=P.Setup.prefetch, choices=P.PREFETCH_POLICIES + P.PREFETCH_PREDICTORS)
    ap.add_argument("--prefetch-budget", type=float, default=P.Setup.prefetch_budget)
    ap.add_argument("--out", help="default results/MODEL/sweep")
    ap.add_argument("--max-points", type=int, default=None, help="stop after this many new points (for testing resume)")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    return P.cli(_main, parse(argv), "finished points are kept; rerun the same command to resume")


def read_sweep_file(path: str, algorithms, tolerances, sparsities) -> tuple[list[str], list[float], list[float]]:
    """The grid of a sweep file (JSON with any of algorithms, tolerances, sparsities; what it
    leaves out keeps the given values); anything else is one ``ExperimentError`` naming the file."""
    def bad(why) -> P.ExperimentError:
        return P.ExperimentError(f"{path}: not a sweep file ({why}); expected JSON like "
                                 '{"algorithms": ["sequential"], "tolerances": [0.01]}')
    try:
        spec = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(e) from None
    if not isinstance(spec, dict):
        raise bad(f"a JSON {type(spec).__name__}, not an object")
    algs = spec.get("algorithms", algorithms)
    if not isinstance(algs, list) or not all(isinstance(x, str) for x in algs):
        raise bad(f"algorithms must be a list of names, got {algs!r}")
    unknown = [x for x in algs if x not in P.KNOB]
    if unknown:
        raise P.ExperimentError(f"{path}: unknown algorithm(s) {unknown}; choose from {', '.join(P.KNOB)}")
    grids = []
    for key, default in (("tolerances", tolerances), ("sparsities", sparsities)):
        vals = spec.get(key, default)
        if not isinstance(vals, list) or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in vals):
            raise bad(f"{key} must be a list of numbers, got {vals!r}")
        grids.append([float(x) for x in vals])
    return list(algs), grids[0], grids[1]


def _main(a) -> int:
    from seneca_sim.arch import ArchError, default_arch, load_arch

    if a.sweep_file:
        a.algorithms, a.tolerances, a.sparsities = read_sweep_file(a.sweep_file, a.algorithms, a.tolerances,
                                                                   a.sparsities)
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
                    mc_items=a.mc_items, sim_tokens=a.tokens, seed=a.seed, chips=a.chips, prefetch=a.prefetch,
                    prefetch_budget=a.prefetch_budget, zeroshot=(a.tasks,) if a.tasks else (), limit=a.limit,
                    task_data=a.task_data, calib=a.calib, tokenizer=a.tokenizer, batch_tokens=a.batch_tokens,
                    tf32=a.tf32)
    P.load_tasks(setup)  # bad task input fails here, once, before any worker starts
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
    failed = 0
    if todo:
        failed = _run_all(todo, setup, a, store, keys, out)
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
    if failed:
        print(f"{failed} point(s) failed (why: {out / 'failed'}); rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


def _run_all(todo, setup, a, store, keys, out) -> int:
    """Run the points, storing each as it finishes; a failed one is reported and its traceback kept
    in ``out/failed/``. Returns the number of failed points."""
    from tqdm.auto import tqdm
    failed = 0
    bar = tqdm(total=len(todo), desc="sweep", disable=True)
    def ready():  # the bar opens once the model has loaded: a bad model stays one line on stderr
        nonlocal bar
        bar = tqdm(total=len(todo), desc="sweep", disable=a.quiet, dynamic_ncols=True)
    try:
        for alg, k, rec in _run(todo, setup, a, ready):
            key = keys[(alg, k)]
            if isinstance(rec, workers.Failed):
                failed += 1
                tqdm.write(f"point {alg} {k:g} failed: {rec.reason}", file=sys.stderr)
                P.atomic_write_text(out / "failed" / f"{key}.txt", f"{alg} {k:g}: {rec.reason}\n\n{rec.detail}")
            else:
                store.put(key, rec)
                (out / "failed" / f"{key}.txt").unlink(missing_ok=True)
            bar.update(1)
            bar.set_postfix(last=f"{alg} {k:g}")
    finally:
        bar.close()
    return failed


def _run(todo, setup, a, ready):
    """Yield (algorithm, knob, record or workers.Failed) as points finish, on the chosen engine;
    ``ready()`` is called once the model has loaded."""
    if a.engine == "ray":
        ready()
        yield from _run_ray(todo, setup)
    elif a.workers == 1:  # in this process: nothing forked, nothing to watch
        _worker_init(setup, workers.threads_per_worker(1))  # bad input fails here, before any point
        ready()
        for alg, k in todo:
            try:
                yield alg, k, _work(alg, k)
            except Exception as e:  # noqa: BLE001 - one failed point does not end the sweep
                yield alg, k, workers.Failed(f"{type(e).__name__}: {e}", traceback.format_exc())
    else:
        try:
            for i, rec in workers.run_tasks(_work, todo, workers=a.workers, init=_worker_init, initargs=(setup,),
                                            stall_s=a.stall_timeout or None, on_ready=ready):
                yield (*todo[i], rec)
        except workers.WorkerInitError as e:  # bad input (a model that does not load) fails every worker alike
            if isinstance(e.__cause__, P.ExperimentError):
                raise e.__cause__ from None
            raise P.ExperimentError(str(e)) from None


def _run_ray(todo, setup):
    try:
        import ray
    except ImportError:
        raise P.ExperimentError("--engine ray needs Ray: pip install ray (or use the default --engine local)") from None
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, ignore_reinit_error=True)
    remote = ray.remote(_ray_point)
    futures = {remote.remote(setup, alg, k): (alg, k) for alg, k in todo}
    try:
        while futures:
            ready, _ = ray.wait(list(futures), num_returns=1)
            alg, k = futures.pop(ready[0])
            try:
                yield alg, k, ray.get(ready[0])
            except ray.exceptions.RayError as e:  # the task raised, or its worker died
                yield alg, k, workers.Failed(str(e).strip().splitlines()[0], str(e))
    finally:
        for f in futures:
            ray.cancel(f, force=True)


if __name__ == "__main__":
    sys.exit(main())
