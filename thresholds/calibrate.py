"""One interface for every threshold algorithm, with a cache, and its command line.

    from thresholds import calibrate
    sched = calibrate(model, calib_tokens, "sequential", tolerance=0.02)   # -> Schedule
    sched.save("schedule.json"); sched.apply(model)

Algorithms: ``sequential`` (ours: global loss budget, fine candidates), ``paper`` (the authors'
procedure), ``uniform``, ``teal``, ``cats``, ``finetune`` (see :mod:`thresholds.sequential`
and :mod:`thresholds.baselines`). Results are cached by a hash of their inputs (model
fingerprint with a weights digest, algorithm, resolved parameters, calibration tokens).

Command line::

    python -m thresholds.calibrate MODEL --algorithm sequential|paper|uniform|teal|cats|finetune
        [--tolerance T | --sparsity S] [--calib FILE] [--tokens N] [--seq-len L] --out schedule.json

``MODEL``: a zoo name or checkpoint path (``rllm.weights.load_model``), or ``random:L:C[:V]``
(a randomly initialized RWKV, for smoke tests and benchmarks). ``--calib``: a text file
(tokenized with the model's tokenizer) or token ids (``.npy``/``.pt``); default: ``calib.txt``
beside the model's weights. ``--tolerance`` is the global relative loss budget for
``sequential`` (e.g. 0.02) and the per-acceptance ratio increase for ``paper`` (5e-4 = the
authors' 1.0005); ``--sparsity`` is the target for the other algorithms (MAC-weighted
model-wide, except ``uniform`` whose target is per site unless ``--target mac``).
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from thresholds import baselines
from thresholds.paper import paper as _paper, resolve_settings as _paper_settings
from thresholds.sequential import resolve_settings as _sequential_settings, sequential as _sequential
from thresholds._core import as_calib_tokens, tokens_sha256
from rllm.tokenizer import load_calib_tokens  # noqa: F401 (re-exported: thresholds.load_calib_tokens)
from thresholds.schedule import Schedule, ScheduleCache, ScheduleError, cache_key, model_fingerprint

__all__ = ["calibrate", "match_sparsity", "schedule_key", "ALGORITHMS", "resolve_params", "load_calib_tokens", "main", "format_table"]


ALGORITHMS: dict[str, Callable[..., Schedule]] = {
    "sequential": _sequential,
    "paper": _paper,
    "uniform": baselines.uniform,
    "teal": baselines.teal,
    "cats": baselines.cats,
    "finetune": baselines.finetune,
}
# arguments that change how, not what, is computed (at most the float rounding): not in the cache key
_NOT_KEYED = {"device", "progress", "model_name", "calib_description", "algorithm", "batch_tokens",
              "candidate_batch"}
_SEQ_SETTINGS = ("tolerance", "levels", "per_channel", "share", "include_head", "search", "scan", "patience", "margin",
                 "quantiles", "horizon", "rule", "kappa", "objective", "floor", "floor_share", "max_rows", "shrink", "seed")
_TEAL_OWN = ("step", "max_sparsity", "last_fraction", "seed")  # a given trajectory's own settings replace these


def _settings(algorithm: str, p: dict) -> dict:
    """Every default an algorithm resolves inside, resolved here too, so that a key never holds a
    ``None`` that stands for "pick later" (``horizon=None`` and ``shrink=None`` are settings)."""
    if algorithm == "sequential":
        p.update(_sequential_settings({n: p[n] for n in _SEQ_SETTINGS}))
    elif algorithm == "paper":
        p.update(_paper_settings({n: p[n] for n in ("tolerance", "levels")}))
    elif algorithm == "teal" and p.get("trajectory") is not None:
        for n in _TEAL_OWN:
            p.pop(n, None)
    elif algorithm == "finetune" and p.get("init_sparsity") is None:
        p["init_sparsity"] = p["sparsity"] if p.get("sparsity") is not None else 0.5
    return p


def resolve_params(algorithm: str, params: dict) -> dict:
    """The algorithm's keyword defaults overlaid with ``params`` (unknown names are an error), with
    every default resolved as the algorithm resolves it (see :func:`_settings`)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    known: dict[str, Any] = {}
    fns = [ALGORITHMS[algorithm]] + ([baselines.quantile_schedule] if algorithm in ("uniform", "cats") else [])
    for fn in reversed(fns):  # the algorithm's own defaults win
        sig = inspect.signature(fn)
        known.update({n: p.default for n, p in sig.parameters.items()
                      if p.kind == p.KEYWORD_ONLY and n not in ("active", "params")})
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TypeError(f"{algorithm}: unknown parameter(s) {unknown}; it takes {sorted(set(known) - _NOT_KEYED)}")
    out = {n: d for n, d in known.items() if d is not inspect.Parameter.empty}
    out.update(params)
    missing = [n for n, d in known.items() if d is inspect.Parameter.empty and n not in out]
    if missing:
        raise TypeError(f"{algorithm}: missing required parameter(s) {missing} (e.g. sparsity=0.5)")
    return _settings(algorithm, out)


def _key_params(resolved: dict) -> dict:
    out = {}
    for n, v in resolved.items():
        if n in _NOT_KEYED:
            continue
        if isinstance(v, baselines.TealTrajectory):
            v = v.key()
        elif isinstance(v, Schedule):
            v = {"thresholds": dict(v.thresholds), "fingerprint": dict(v.fingerprint), "algorithm": v.algorithm,
                 "params": dict(v.params), "calibration": dict(v.calibration)}
        out[n] = v
    return out


def schedule_key(model, tokens: torch.Tensor, algorithm: str, resolved: dict) -> str:
    """The cache key of ``algorithm`` with ``resolved`` parameters (:func:`resolve_params`) on these
    weights and calibration tokens (``[N, T]``)."""
    return cache_key(model_fingerprint(model), algorithm, _key_params(resolved), tokens_sha256(tokens))


def calibrate(model, calib_tokens, algorithm: str = "sequential", *, cache: bool | str | os.PathLike | ScheduleCache = True,
              model_name: str | None = None, calib_description: str = "", device=None, progress: bool = True,
              **params) -> Schedule:
    """Choose thresholds for every site of ``model`` with ``algorithm`` on ``calib_tokens``
    (``[N, T]`` token ids, or a 1-D stream cut into 256-token sequences).

    ``cache``: True (default directory, see :func:`thresholds.schedule.default_cache_dir`), a
    directory, a :class:`ScheduleCache`, or False. A cached schedule is returned as is, with
    ``extra["cache"] = {"hit": True, ...}``; ``cost_s`` stays the original calibration cost.
    """
    tokens = as_calib_tokens(calib_tokens)
    resolved = resolve_params(algorithm, params)
    store = None
    if cache is not False and cache is not None:
        store = cache if isinstance(cache, ScheduleCache) else ScheduleCache(None if cache is True else cache)
    key = None
    if store is not None:
        t0 = time.perf_counter()
        key = schedule_key(model, tokens, algorithm, resolved)
        hit = store.get(key, algorithm, model=model)
        if hit is not None:
            return hit.replace(extra={**dict(hit.extra), "cache": {"hit": True, "key": key, "path": str(store.path(key, algorithm)),
                                                                  "loaded_in_s": time.perf_counter() - t0}})
    fn = ALGORITHMS[algorithm]
    sched = fn(model, tokens, device=device, progress=progress, model_name=model_name,
               calib_description=calib_description, algorithm=algorithm, **params)
    if store is not None:
        store.put(key, sched)
        sched = sched.replace(extra={**dict(sched.extra), "cache": {"hit": False, "key": key,
                                                                    "path": str(store.path(key, algorithm))}})
    return sched


def match_sparsity(model, calib_tokens, algorithm: str, goal: float, *, tol: float = 0.002, lo: float = 0.0,
                   hi: float = 0.99, iters: int = 24, cache: bool | str | os.PathLike | ScheduleCache = True,
                   **params) -> Schedule:
    """The ``algorithm`` schedule whose measured MAC-weighted calibration sparsity is nearest ``goal``,
    found by bisection on its ``sparsity`` knob in ``[lo, hi]`` (the measured sparsity is not the
    knob: the thresholds come from the dense model's activations, and earlier thresholds change
    later sites' inputs). Stops once within ``tol`` (0.2 points); the best probe is returned, above
    or below the goal, with ``extra["match"]`` = goal, achieved, ``within``, every probe, and the
    probes' summed cost. Where no knob value comes within ``tol`` (a target beyond the method's
    reach), ``extra["target_reached"]`` is False."""
    if not 0 <= goal < 1 or not lo < hi:
        raise ValueError(f"match_sparsity: goal must be in [0, 1) and lo < hi, got {goal}, [{lo}, {hi}]")
    probes: list[tuple[float, float]] = []
    best, cost = None, 0.0
    knob = min(max(goal, lo), hi)  # the first guess: the knob at the goal itself
    for _ in range(iters):
        s = calibrate(model, calib_tokens, algorithm, cache=cache, sparsity=knob, **params)
        sp = s.sparsity_mac_weighted
        probes.append((knob, sp))
        cost += s.cost_s
        if best is None or abs(sp - goal) < abs(best.sparsity_mac_weighted - goal):
            best = s
        if abs(sp - goal) <= tol:
            break
        lo, hi = (knob, hi) if sp < goal else (lo, knob)
        knob = (lo + hi) / 2
    achieved = best.sparsity_mac_weighted
    match = dict(goal=goal, achieved=achieved, within=abs(achieved - goal) <= tol, tol=tol, probes=probes, cost_s=cost)
    extra = {**dict(best.extra), "match": match}
    if not match["within"]:
        extra["target_reached"] = False
    return best.replace(extra=extra)


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

def _load(model_arg: str, device: str | None):
    """(model, tokenizer, name, default calibration file or None)."""
    if model_arg.startswith("random:"):
        from rllm.model import RWKV, RWKVConfig, randomize_weights
        parts = [int(x) for x in model_arg.split(":")[1:]]
        L, C = parts[0], parts[1]
        V = parts[2] if len(parts) > 2 else 1024
        m = randomize_weights(RWKV(RWKVConfig(vocab_size=V, n_layer=L, n_embd=C, name=model_arg)), seed=0).eval()
        return m, None, model_arg, None
    from rllm.weights import load_model
    lm = load_model(model_arg, device=device or "cpu")
    src = Path(lm.source)
    d = src if src.is_dir() else src.parent
    calib = d / "calib.txt"
    return lm.model, lm.tokenizer, lm.name, (calib if calib.exists() else None)


def format_table(sched: Schedule) -> str:
    df = sched.table()
    lines = [f"{'site':<28}{'threshold':>11}{'sparsity':>10}{'natural':>9}{'added':>8}"]
    for r in df.itertuples():
        mark = "*" if r.per_channel else " "
        lines.append(f"{r.site:<28}{r.threshold:>10.4g}{mark}{r.sparsity:>10.3f}{r.natural:>9.3f}{r.added:>8.3f}")
    s = sched.summary
    inner = df[df.site.str.endswith("ffn.value")]
    lines += [
        "(* per-channel: mean shown)" if df.per_channel.any() else "",
        f"sparsity over block sites: mean {s.get('sparsity_mean', float('nan')):.3f}, "
        f"MAC-weighted {s.get('sparsity_mac_weighted', float('nan')):.3f} "
        f"(natural {s.get('natural_mean', float('nan')):.3f} / {s.get('natural_mac_weighted', float('nan')):.3f}, "
        f"added {s.get('added_mean', float('nan')):.3f} / {s.get('added_mac_weighted', float('nan')):.3f})",
        f"squared-ReLU (ffn.value) sites: natural {inner.natural.mean():.3f}, added beyond natural {inner.added.mean():.3f}",
        f"calibration loss {s.get('loss', float('nan')):.4f} vs dense {s.get('dense_loss', float('nan')):.4f} "
        f"({100 * s.get('loss_increase', float('nan')):+.2f}%); cost {sched.cost_s:.1f} s",
    ]
    return "\n".join(l for l in lines if l != "")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m thresholds.calibrate",
                                description="Choose activation thresholds for every site of a model.")
    p.add_argument("model", help="zoo name, checkpoint path, or random:L:C[:V]")
    p.add_argument("--algorithm", "-a", default="sequential", choices=list(ALGORITHMS))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tolerance", type=float, help="sequential: global relative loss budget (default 0.02); "
                                                   "paper: relative increase per acceptance (default 5e-4)")
    g.add_argument("--sparsity", type=float, help="uniform/teal/cats/finetune: target sparsity")
    p.add_argument("--target", choices=("site", "mac"), default=None,
                   help="uniform/cats: sparsity per site or MAC-weighted model-wide")
    p.add_argument("--calib", help="calibration text (.txt) or token ids (.npy/.pt); default: calib.txt beside the model")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384 = 64 x 256)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration sequence length")
    p.add_argument("--per-channel", action="store_true", help="sequential: one threshold per channel")
    p.add_argument("--steps", type=int, default=None, help="finetune: optimizer steps")
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--out", required=True, help="schedule JSON to write")
    p.add_argument("--cache-dir", default=None, help="schedule cache directory")
    p.add_argument("--no-cache", action="store_true", help="always recompute")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class _Usage(ValueError):
    """Bad input found before calibration: one line, exit 2."""


def _calib_tokens(a, model, tok, name, default_calib) -> tuple[torch.Tensor, str]:
    """The calibration tokens as ``[n, seq_len]`` and their description."""
    if a.calib:
        try:
            ids = load_calib_tokens(a.calib, tok)
        except (OSError, ValueError) as e:
            raise _Usage(str(e)) from None
        desc = f"{Path(a.calib).name}"
    elif default_calib is not None:
        ids = load_calib_tokens(default_calib, tok)
        desc = f"{default_calib.name} ({name})"
    elif a.model.startswith("random:"):
        V = model.config.vocab_size
        ids = torch.randint(0, V, (a.tokens,), generator=torch.Generator().manual_seed(0))
        desc = "random tokens (seed 0)"
    else:
        raise _Usage(f"no calibration data: pass --calib FILE (no calib.txt beside {name})")
    ids = ids.reshape(-1)
    n = (min(a.tokens, ids.numel()) // a.seq_len) * a.seq_len
    if n == 0:
        raise _Usage(f"{ids.numel()} calibration tokens, fewer than one sequence of {a.seq_len}")
    tokens = ids[:n].reshape(-1, a.seq_len)
    return tokens, desc + f", first {n} tokens as {tokens.shape[0]} x {a.seq_len}"


def _params(p: argparse.ArgumentParser, a) -> dict[str, Any]:
    """The algorithm's knobs from the flags (a flag the algorithm does not take is a usage error)."""
    params: dict[str, Any] = {}
    alg = a.algorithm
    if alg in ("sequential", "paper"):
        if a.sparsity is not None:
            p.error(f"{alg} takes --tolerance, not --sparsity")
        if a.tolerance is not None:
            params["tolerance"] = a.tolerance
        if a.per_channel:
            params["per_channel"] = True
        return params
    if a.tolerance is not None:
        p.error(f"{alg} takes --sparsity, not --tolerance")
    if a.sparsity is None:
        p.error(f"{alg} needs --sparsity")
    params["sparsity"] = a.sparsity
    if a.target and alg in ("uniform", "cats"):
        params["target"] = a.target
    if a.steps and alg == "finetune":
        params["steps"] = a.steps
    return params


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    params = _params(p, a)
    try:
        model, tok, name, default_calib = _load(a.model, a.device)
    except Exception as e:  # ModelLoadError and friends: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = False if a.no_cache else (a.cache_dir or True)
    try:
        tokens, desc = _calib_tokens(a, model, tok, name, default_calib)
        sched = calibrate(model, tokens, a.algorithm, cache=cache, model_name=name, calib_description=desc,
                          device=a.device, progress=not a.quiet, **params)
    except (ValueError, TypeError) as e:  # _Usage and the algorithm's own checks: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = sched.save(a.out)
    hit = sched.extra.get("cache", {}).get("hit")
    print(f"{name}: {a.algorithm} {params}" + (" (from cache)" if hit else ""))
    print(format_table(sched))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
