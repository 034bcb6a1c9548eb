"""A threshold schedule: one threshold per activation site, with everything needed to trust it.

A :class:`Schedule` maps site names (``blocks.3.att.key``...) to a threshold (a float, or a
list of floats for per-channel thresholds) and carries its provenance: the model it was made
for (name and fingerprint), the algorithm and its parameters, the calibration data (description
and SHA-256 of the token ids), the sparsity it achieved per site on that data, the model-wide
averages (plain mean and MAC-weighted mean over the block sites) and its wall-clock cost.

On disk it is versioned JSON (``"format": "event-rwkv-schedule", "version": 1``), written
atomically. :meth:`Schedule.load` validates everything and turns every problem into one
:class:`ScheduleError` whose one-line message names the file, the site and what to do.

:class:`ScheduleCache` stores schedules under a key hashed from their inputs (model
fingerprint including a digest of every weight, algorithm + resolved parameters, calibration-token
hash, code version and a digest of the algorithms' source), so a rerun with the same inputs
returns at once and a change of any of them recomputes.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["Schedule", "ScheduleError", "ScheduleCache", "model_fingerprint", "weights_digest",
           "cache_key", "code_digest", "default_cache_dir", "FORMAT", "VERSION", "CODE_VERSION"]

FORMAT = "event-rwkv-schedule"
VERSION = 1
CODE_VERSION = "thresholds-2"  # part of every cache key, beside code_digest(): bump when an algorithm's output changes
# the modules whose code decides a schedule: the cache key holds a digest of their source, so an
# edit anywhere in them (even one nobody thought to mark with a CODE_VERSION bump) is a cache miss
_ALGORITHM_SOURCES = ("thresholds/_core.py", "thresholds/sequential.py", "thresholds/paper.py",
                      "thresholds/baselines.py", "rllm/model.py", "rllm/wkv.py", "rllm/opt.py", "rllm/events.py")


class ScheduleError(ValueError):
    """A schedule file or object is unusable; the message names the file, the site and what to do."""


# ------------------------------------------------------------------------------------------
# Model identity
# ------------------------------------------------------------------------------------------

def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter: its name, dtype, shape and all of its bytes (about 1 GB/s, so
    50 ms for a 5M-parameter model, seconds for a billion). Any change of any weight changes it;
    a bfloat16 copy of a float32 model is other weights, as its thresholds may be."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:24]


def model_fingerprint(model: torch.nn.Module) -> dict:
    """``{"arch", "weights", "config", "n_sites"}``: ``arch`` hashes the config and every site's
    name/width/output width; ``weights`` is :func:`weights_digest`."""
    cfg = getattr(model, "config", None)
    keys = ("vocab_size", "n_layer", "n_embd", "ffn_dim")
    config = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    sites = [[n, int(s.width), int(s.macs_per_event)] for n, s in model.sites.items()]
    return {"arch": _sha({"config": config, "sites": sites})[:16], "weights": weights_digest(model),
            "config": config, "n_sites": len(sites)}


# ------------------------------------------------------------------------------------------
# The schedule
# ------------------------------------------------------------------------------------------

ThresholdValue = float | list  # a scalar, or one value per input channel


@dataclass(frozen=True)
class Schedule:
    """Site name -> threshold, plus provenance. Build with the algorithms in :mod:`thresholds`;
    ``apply(model)`` sets the thresholds; ``save``/``load`` for JSON.

    ``sparsity``: per site ``{"sparsity", "natural", "added"}`` on the calibration data;
    ``summary``: ``sparsity_mean``, ``sparsity_mac_weighted`` (block sites, head excluded),
    the same for ``natural``, plus the calibration losses (``loss``, ``dense_loss``) when known.
    """

    thresholds: Mapping[str, ThresholdValue]
    model: str = "model"
    fingerprint: Mapping[str, Any] = field(default_factory=dict)
    algorithm: str = "manual"
    params: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] = field(default_factory=dict)
    sparsity: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    summary: Mapping[str, float] = field(default_factory=dict)
    cost_s: float = 0.0
    created: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    # --- views ------------------------------------------------------------------------
    @property
    def sparsity_mean(self) -> float:
        return float(self.summary.get("sparsity_mean", float("nan")))

    @property
    def sparsity_mac_weighted(self) -> float:
        return float(self.summary.get("sparsity_mac_weighted", float("nan")))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: torch.as_tensor(t, dtype=torch.float32) for n, t in self.thresholds.items()}

    def replace(self, **changes) -> "Schedule":
        return dataclasses.replace(self, **changes)

    def table(self):
        """Per-site DataFrame: site, threshold (mean for per-channel), per_channel, sparsity, natural, added."""
        import pandas as pd
        rows = []
        for n, t in self.thresholds.items():
            s = self.sparsity.get(n, {})
            per_ch = isinstance(t, (list, tuple))
            rows.append(dict(site=n, threshold=(sum(t) / len(t) if per_ch and t else float(t) if not per_ch else 0.0),
                             per_channel=per_ch, sparsity=s.get("sparsity", float("nan")),
                             natural=s.get("natural", float("nan")), added=s.get("added", float("nan"))))
        return pd.DataFrame(rows)

    # --- model ------------------------------------------------------------------------
    def validate(self, model: torch.nn.Module | None = None, *, source: str = "<schedule>",
                 check_weights: bool = True) -> None:
        """Raise :class:`ScheduleError` unless every threshold is a finite non-negative number (or a
        list of them) and, with ``model``, the sites, widths and fingerprint match the model."""
        _check_values(self.thresholds, source)
        if model is None:
            return
        sites = model.sites
        unknown = [n for n in self.thresholds if n not in sites]
        if unknown:
            raise ScheduleError(f"{source}: site {unknown[0]!r} does not exist in this model (its sites look like "
                                f"{next(iter(sites))!r}); the schedule was made for another model: recalibrate "
                                f"with python -m thresholds.calibrate")
        missing = [n for n in sites if n not in self.thresholds]
        if missing:
            raise ScheduleError(f"{source}: no threshold for site {missing[0]!r} ({len(missing)} site(s) missing); "
                                f"recalibrate, or add the site with threshold 0 to keep it dense")
        for n, t in self.thresholds.items():
            if isinstance(t, (list, tuple)) and len(t) != sites[n].width:
                raise ScheduleError(f"{source}: site {n!r} has {len(t)} per-channel thresholds but the model's site "
                                    f"has {sites[n].width} channels; recalibrate for this model")
        fp = dict(self.fingerprint or {})
        if fp:
            mine = model_fingerprint(model)
            if fp.get("arch") and fp["arch"] != mine["arch"]:
                raise ScheduleError(f"{source}: made for another model ({self.model}, config {fp.get('config')}) "
                                    f"than this one (config {mine['config']}); recalibrate for this model")
            if check_weights and fp.get("weights") and fp["weights"] != mine["weights"]:
                raise ScheduleError(f"{source}: made for the same architecture but other weights ({self.model}, "
                                    f"weights {fp['weights']} vs {mine['weights']}); recalibrate for these weights, "
                                    f"or load with check_weights=False to use it anyway")

    def apply(self, model: torch.nn.Module, *, check_weights: bool = True) -> torch.nn.Module:
        """Validate against ``model`` and set its thresholds. Returns the model."""
        self.validate(model, source=f"schedule {self.algorithm!r} for {self.model}", check_weights=check_weights)
        model.set_thresholds(self.tensors())
        return model

    # --- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION,
            "model": {"name": self.model, "fingerprint": dict(self.fingerprint)},
            "algorithm": {"name": self.algorithm, "params": _jsonable(dict(self.params))},
            "calibration": _jsonable(dict(self.calibration)),
            "thresholds": {n: (list(map(float, t)) if isinstance(t, (list, tuple)) else float(t))
                           for n, t in self.thresholds.items()},
            "sparsity": _jsonable({n: dict(v) for n, v in self.sparsity.items()}),
            "summary": _jsonable(dict(self.summary)),
            "cost_s": float(self.cost_s),
            "created": self.created,
            "extra": _jsonable(dict(self.extra)),
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>", model: torch.nn.Module | None = None,
                  check_weights: bool = True) -> "Schedule":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ScheduleError(f"{source}: not a threshold schedule (format {got!r}, expected {FORMAT!r}); "
                                f"make one with python -m thresholds.calibrate MODEL --out FILE")
        v = d.get("version")
        if not isinstance(v, int) or v < 1:
            raise ScheduleError(f"{source}: bad schedule version {v!r}; recalibrate to write a valid file")
        if v > VERSION:
            raise ScheduleError(f"{source}: schedule version {v} is newer than this code reads ({VERSION}); "
                                f"update the code or recalibrate")
        th = d.get("thresholds")
        if not isinstance(th, dict) or not th:
            raise ScheduleError(f"{source}: 'thresholds' must be a non-empty mapping site -> threshold; recalibrate")
        _check_values(th, source)
        m = d.get("model") or {}
        alg = d.get("algorithm") or {}
        try:
            sched = cls(
                thresholds={str(n): (list(map(float, t)) if isinstance(t, list) else float(t)) for n, t in th.items()},
                model=str(m.get("name", "model")), fingerprint=dict(m.get("fingerprint") or {}),
                algorithm=str(alg.get("name", "manual")), params=dict(alg.get("params") or {}),
                calibration=dict(d.get("calibration") or {}), sparsity=dict(d.get("sparsity") or {}),
                summary=dict(d.get("summary") or {}), cost_s=float(d.get("cost_s") or 0.0),
                created=str(d.get("created") or ""), extra=dict(d.get("extra") or {}))
        except (TypeError, ValueError, AttributeError) as e:
            raise ScheduleError(f"{source}: malformed schedule metadata ({e}); recalibrate") from None
        sched.validate(model, source=source, check_weights=check_weights)
        return sched

    def save(self, path: str | os.PathLike) -> Path:
        """Validate, then write JSON atomically (temporary file in the same directory, then rename)."""
        path = Path(path)
        self.validate(source=str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self.to_dict(), f, indent=1, allow_nan=True)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: torch.nn.Module | None = None,
             check_weights: bool = True) -> "Schedule":
        """Read and validate a schedule (against ``model`` if given). Any problem -> :class:`ScheduleError`."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ScheduleError(f"{path}: cannot read the schedule ({e.strerror or e}); check the path") from None
        try:
            d = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ScheduleError(f"{path}: not JSON ({e}); it is not a schedule written by thresholds.calibrate") from None
        return cls.from_dict(d, source=str(path), model=model, check_weights=check_weights)


def _check_values(th: Mapping[str, Any], source: str) -> None:
    for n, t in th.items():
        vals = t if isinstance(t, (list, tuple)) else [t]
        if isinstance(t, (list, tuple)) and not t:
            raise ScheduleError(f"{source}: site {n!r} has an empty per-channel threshold list; use a number or one value per channel")
        for i, x in enumerate(vals):
            where = f"site {n!r}" + (f" channel {i}" if isinstance(t, (list, tuple)) else "")
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise ScheduleError(f"{source}: {where}: threshold {x!r} is not a number; thresholds are "
                                    f"non-negative numbers (0 = dense)")
            if not math.isfinite(x):
                raise ScheduleError(f"{source}: {where}: threshold is {x}; thresholds must be finite: recalibrate "
                                    f"or set it to 0 (dense)")
            if x < 0:
                raise ScheduleError(f"{source}: {where}: negative threshold {x}; thresholds compare with |x| and "
                                    f"must be >= 0: set it to 0 (dense) or recalibrate")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Schedule):
        return {"algorithm": obj.algorithm, "created": obj.created}
    return str(obj)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$EVENT_RWKV_CACHE/schedules`` or ``~/.cache/event-rwkv/schedules``."""
    root = os.environ.get("EVENT_RWKV_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "event-rwkv") / "schedules"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of the source of the modules that compute schedules (``_ALGORITHM_SOURCES``)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for rel in _ALGORITHM_SOURCES:
        f = root / rel
        h.update(rel.encode() + b"\0" + (f.read_bytes() if f.exists() else b"<missing>") + b"\0")
    return h.hexdigest()[:16]


def cache_key(fingerprint: Mapping, algorithm: str, params: Mapping, calib_sha256: str) -> str:
    """Hash of everything a schedule depends on: the code (version and source digest), the
    architecture and every weight (via the fingerprint), the algorithm, its resolved parameters and
    the calibration tokens."""
    return _sha({"code": CODE_VERSION, "source": code_digest(), "arch": fingerprint.get("arch"),
                 "weights": fingerprint.get("weights"), "algorithm": algorithm, "params": _jsonable(dict(params)),
                 "calib": calib_sha256})[:24]


class ScheduleCache:
    """Schedules on disk, keyed by :func:`cache_key`: ``<dir>/<algorithm>-<key>.json``."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.dir = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: str, algorithm: str = "schedule") -> Path:
        return self.dir / f"{algorithm}-{key}.json"

    def get(self, key: str, algorithm: str = "schedule", model: torch.nn.Module | None = None) -> Schedule | None:
        p = self.path(key, algorithm)
        if not p.exists():
            return None
        try:
            return Schedule.load(p, model=model)
        except ScheduleError:
            return None  # a stale or damaged entry is recomputed, never trusted

    def put(self, key: str, schedule: Schedule) -> Path:
        return schedule.save(self.path(key, schedule.algorithm))
