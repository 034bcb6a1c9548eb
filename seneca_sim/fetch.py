"""Fetch policies: how the weights of streamed matrices reach their cores, token by token.

A Program may stream some matrices from each chip's shared memory (``compiler.residency``). For
every token and every streamed tile the counting simulator then books, by policy:

===========  ==========================================================  =========================
policy       fetched weight column slices (``rows x weight bits`` each)  when
===========  ==========================================================  =========================
``demand``   one per event the tile receives                             in the tile's phase:
                                                                         exposed
``dense``    every column of the tile, every token                       in the tile's phase:
                                                                         exposed
``prefetch`` every *predicted* column (``FetchPlan.predicted``), plus    predicted: during the
             each event whose column was not predicted (a miss)          phase before; misses:
                                                                         on demand, exposed
===========  ==========================================================  =========================

Energy: every bit read from the shared memory (``shared_read_bit``, priced
``shared_memory.read_energy_per_bit``) and every 16-bit word written into the core's stream
buffer (``buffer_write``, priced ``state_write_word``); the MAC then reads its weights from the
buffer (``weight_read``, as for held weights). A false positive costs its read and write.

Latency: a chip's shared memory has one port (``bandwidth_bits_per_cycle``) and a first-word
latency (``latency_cycles``). In phase ``p``, chip ``c`` fetches its demand bits ``D`` (taking
``latency + D / bandwidth`` cycles, added to the phase) and, for a prefetch, the bits ``B``
predicted for phase ``p`` were fetched from the start of phase ``p - 1`` on, in whatever of it
the port had free: only ``max(0, latency + B / bandwidth - free)`` is added. A phase takes as
long as its slowest chip; extra cycles are extra leakage on every core. So an oracle prefetch
costs the on-core latency plus the streaming time that cannot be hidden; predicting nothing
equals ``demand``; and when every input fires, ``dense`` equals ``demand``.

``fetch_timeline`` (numba) walks the phases of every token; ``fetch_timeline_numpy`` is its
plain twin for the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

POLICIES = ("demand", "dense", "prefetch")


@dataclass(frozen=True)
class FetchPlan:
    """The fetch policy of a run; ``predicted`` (an EventTrace of the same tokens: the inputs
    predicted to fire) is required by ``prefetch``. ``predictor``: a label; ``predictor_macs``:
    what predicting costs per token (MACs, priced as MACs with their weight reads)."""

    policy: str = "demand"
    predicted: Any = None
    predictor: str = ""
    predictor_macs: float = 0.0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown fetch policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.policy == "prefetch" and self.predicted is None:
            raise ValueError("fetch policy 'prefetch' needs the predicted firing sets (FetchPlan.predicted)")

    @property
    def label(self) -> str:
        return f"prefetch ({self.predictor})" if self.policy == "prefetch" else self.policy


@dataclass(frozen=True)
class FetchTables:
    """The streamed tiles of a Program, as flat arrays (indices into the counting tables' tiles)."""

    tile: np.ndarray          # [n] index of the tile in CountTables' tile arrays
    chip: np.ndarray          # [n] chip of the tile's core
    phase: np.ndarray         # [n] phase of the tile's matrix
    col_bits: np.ndarray      # [n] bits of one weight column slice (rows x weight bits)
    cols: np.ndarray          # [n] columns of the tile
    n_chips: int
    latency: float
    bandwidth: float
    word_bits: int


def build_fetch_tables(program, arch) -> FetchTables | None:
    """None when the Program streams nothing."""
    t = program.tiles
    if "streamed" not in t.columns or not np.asarray(t.streamed).any():
        return None
    if arch.shared is None:
        raise ValueError(f"the program streams {program.meta.get('streamed')} but {arch.origin} has no "
                         "[shared_memory]; simulate it on the arch it was compiled for")
    idx = np.flatnonzero(np.asarray(t.streamed) > 0)
    rows, cols = (t.row1 - t.row0)[idx], (t.col1 - t.col0)[idx]
    return FetchTables(tile=idx.astype(np.int64), chip=np.asarray(program.cores.chip)[t.core[idx]].astype(np.int64),
                       phase=np.asarray(program.sites.phase)[t.site[idx]].astype(np.int64),
                       col_bits=(rows * int(program.meta["weight_bits"])).astype(np.float64),
                       cols=cols.astype(np.float64), n_chips=int(program.n_chips),
                       latency=float(arch.shared.latency_cycles), bandwidth=float(arch.shared.bandwidth_bits_per_cycle),
                       word_bits=int(arch.core.data_word_bits))


def fetched_columns(plan: FetchPlan, ft: FetchTables, ev_tiles: np.ndarray, pred_tiles: np.ndarray | None,
                    miss_tiles: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Columns fetched on demand and ahead, ``[T, n]`` each, for the streamed tiles."""
    ev = ev_tiles[:, ft.tile].astype(np.float64)
    if plan.policy == "demand":
        return ev, np.zeros_like(ev)
    if plan.policy == "dense":
        return np.broadcast_to(ft.cols, ev.shape).copy(), np.zeros_like(ev)
    return miss_tiles[:, ft.tile].astype(np.float64), pred_tiles[:, ft.tile].astype(np.float64)


def per_chip_phase(bits: np.ndarray, ft: FetchTables, n_phases: int) -> np.ndarray:
    """``[T, n_chips, n_phases]`` sums of per-tile bits ``[T, n]``."""
    out = np.zeros((bits.shape[0], ft.n_chips, n_phases))
    np.add.at(out, (slice(None), ft.chip, ft.phase), bits)
    return out


@njit(cache=True)
def fetch_timeline(base, demand, ahead, latency, bandwidth, free0, extra):
    """Extra cycles ``extra[t, p]`` of every phase of every token (see the module docstring).

    ``base [T, P]``: the phases' cycles without fetching; ``demand``/``ahead [T, C, P]``: bits
    fetched on demand / ahead per chip and phase; ``free0 [C]``: port cycles free in the phase
    before the first (the previous chunk's last). Returns the port's free cycles after the last phase.
    """
    T, C, P = demand.shape
    free = free0.copy()
    for t in range(T):
        for p in range(P):
            worst = 0.0
            busy = np.zeros(C)
            for c in range(C):
                e = 0.0
                if demand[t, c, p] > 0:
                    e = latency + demand[t, c, p] / bandwidth
                late = 0.0
                if ahead[t, c, p] > 0:
                    late = max(0.0, latency + ahead[t, c, p] / bandwidth - free[c])
                busy[c] = e + late
                worst = max(worst, e + late)
            extra[t, p] = worst
            dur = base[t, p] + worst
            for c in range(C):
                free[c] = max(0.0, dur - busy[c])
    return free


def fetch_timeline_numpy(base, demand, ahead, latency, bandwidth, free0, extra):
    """Plain twin of :func:`fetch_timeline` (vectorized over chips)."""
    T, C, P = demand.shape
    free = np.asarray(free0, dtype=np.float64).copy()
    for t in range(T):
        for p in range(P):
            e = np.where(demand[t, :, p] > 0, latency + demand[t, :, p] / bandwidth, 0.0)
            late = np.where(ahead[t, :, p] > 0, np.maximum(0.0, latency + ahead[t, :, p] / bandwidth - free), 0.0)
            busy = e + late
            extra[t, p] = busy.max(initial=0.0)
            free = np.maximum(0.0, base[t, p] + extra[t, p] - busy)
    return free


__all__ = ["POLICIES", "FetchPlan", "FetchTables", "build_fetch_tables", "fetched_columns", "per_chip_phase",
           "fetch_timeline", "fetch_timeline_numpy"]
