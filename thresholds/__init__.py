"""Activation-threshold schedules and the algorithms that choose them.

    from thresholds import calibrate, Schedule
    sched = calibrate(model, calib_tokens, "sequential", tolerance=0.02)  # global loss budget 2%
    sched.save("schedule.json")
    Schedule.load("schedule.json", model=model).apply(model)

Algorithms (one interface, :func:`calibrate`): ``sequential`` (ours), ``paper`` (the authors'
procedure), ``uniform``, ``teal``, ``cats``, ``finetune``. Command line:
``python -m thresholds.calibrate MODEL --algorithm ... --out schedule.json``.
"""
from thresholds.schedule import (Schedule, ScheduleCache, ScheduleError, cache_key, default_cache_dir,
                                 model_fingerprint, weights_digest)
from thresholds.sequential import FINE_LEVELS, sequential
from thresholds.paper import PAPER_LEVELS, PAPER_TOLERANCE, paper
from thresholds.baselines import cats, finetune, teal, teal_trajectory, TealTrajectory, uniform

_LAZY = ("calibrate", "ALGORITHMS", "load_calib_tokens", "resolve_params", "match_sparsity")


def __getattr__(name):  # lazy, so that ``python -m thresholds.calibrate`` runs without a runpy warning
    if name in _LAZY:
        import importlib
        mod = importlib.import_module("thresholds.calibrate")
        for n in _LAZY:  # the submodule import just bound ``thresholds.calibrate`` to the module: rebind
            globals()[n] = getattr(mod, n)
        return globals()[name]
    raise AttributeError(f"module 'thresholds' has no attribute {name!r}")

__all__ = [
    "Schedule", "ScheduleError", "ScheduleCache", "cache_key", "default_cache_dir", "model_fingerprint",
    "weights_digest", "sequential", "paper", "PAPER_LEVELS", "FINE_LEVELS", "PAPER_TOLERANCE", "uniform", "cats",
    "teal", "teal_trajectory", "TealTrajectory", "finetune", "calibrate", "ALGORITHMS", "load_calib_tokens", "resolve_params",
    "match_sparsity",
]
