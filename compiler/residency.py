"""Where each matrix's weights live: on the cores that use them, or streamed from shared memory.

By default every weight sits in the data memory of the core that multiplies it, the SENECA way
(compute where the data is), and the compiler takes as many chips as that needs. A user who
gives the number of chips (``compile(chips=N)``, ``--chips N``) may give fewer than that: then
some matrices are *streamed*. A streamed tile keeps its accumulators, its neuron state and a
buffer of ``shared_memory.stream_buffer_columns`` weight-column slices; the weights of an
event's column come from its chip's shared memory (``[shared_memory]`` of the arch) when they
are needed. A streamed tile needs far less memory, so a streamed matrix takes far fewer cores.

Which matrices are streamed is costed like the tiling choice: streaming matrix ``m`` adds, per
token, its expected fetched bits ``d_m x R x N x bits`` (``d_m``: expected input density), each
read from the shared memory and written into the core's buffer, and frees ``tiles_on(m) -
tiles_streamed(m)`` cores. Matrices are streamed in increasing order of added pJ per freed core
until the model fits (a greedy fractional knapsack): sparse inputs and large matrices first.
"""
from __future__ import annotations

import math

import numpy as np

from compiler.tiling import CompileError, Tiling


def stream_cost_pj(job, s: int) -> float:
    """Expected extra energy per token (pJ) of streaming matrix ``s`` instead of holding it."""
    m, shared = job.graph.matvecs[s], job.arch.shared
    bits = job.density[m.name] * m.out_dim * m.in_dim * job.fmt.bits
    words = bits / job.arch.core.data_word_bits
    return bits * shared.read_energy_per_bit + words * job.arch.e("state_write_word")


def _on_core(job) -> tuple[list[Tiling | None], dict[int, str]]:
    """Every matrix tiled with its weights on the cores (None where not even one row fits a core,
    with the tiler's reason)."""
    out, why = [], {}
    for s in range(len(job.graph.matvecs)):
        try:
            out.append(job.tile(s))
        except CompileError as e:
            out.append(None)
            why[s] = str(e)
    return out, why


def choose_residency(job, chips: int | None) -> tuple[list[Tiling], list[bool], int]:
    """(tilings, streamed per matrix, number of chips); see the module docstring."""
    cpc = job.arch.cores_per_chip
    tilings, why = _on_core(job)
    n = len(tilings)
    if chips is None:
        _require_on_core(job, tilings, why, int(job.arch.chip.max_chips) * cpc, int(job.arch.chip.max_chips))
        return tilings, [False] * n, max(1, math.ceil(sum(t.n_tiles for t in tilings) / cpc))
    if chips < 1 or chips > int(job.arch.chip.max_chips):
        raise CompileError(f"chips must be in 1..{int(job.arch.chip.max_chips)} (chip.max_chips of "
                           f"{job.arch.origin}), got {chips}")
    capacity = int(chips) * cpc
    if all(t is not None for t in tilings) and sum(t.n_tiles for t in tilings) <= capacity:
        return tilings, [False] * n, int(chips)
    if job.arch.shared is None:
        _require_on_core(job, tilings, why, capacity, chips,
                         hint="the arch has no [shared_memory] to stream weights from")
    return _stream_until_it_fits(job, tilings, capacity, chips)


def _stream_until_it_fits(job, tilings, capacity: int, chips: int):
    cols = int(job.arch.shared.stream_buffer_columns)
    streamed_tilings, why = {}, {}
    for s in range(len(tilings)):
        try:
            streamed_tilings[s] = job.tile(s, stream_columns=cols)
        except CompileError as e:
            why[s] = str(e)
    missing = [s for s, t in enumerate(tilings) if t is None and s not in streamed_tilings]
    if missing:
        raise CompileError(f"{job.name} does not fit: {why[missing[0]]} (even with its weights streamed, holding "
                           f"{cols} weight columns per tile)")
    # a matrix no core can hold must be streamed; the others in order of added pJ per freed core
    out = [streamed_tilings[s] if t is None else t for s, t in enumerate(tilings)]
    streamed = [t is None for t in tilings]
    gain = {s: tilings[s].n_tiles - st.n_tiles for s, st in streamed_tilings.items() if tilings[s] is not None}
    order = sorted((s for s, g in gain.items() if g > 0), key=lambda s: (stream_cost_pj(job, s) / gain[s], s))
    total = sum(t.n_tiles for t in out)
    for s in order:
        if total <= capacity:
            break
        out[s], streamed[s] = streamed_tilings[s], True
        total -= gain[s]
    if total > capacity:
        held = [s for s in range(len(out)) if not streamed[s]]
        biggest = max(held or range(len(out)), key=lambda s: out[s].n_tiles)
        left = (f"the largest matrix left on its cores is {job.graph.matvecs[biggest].name} with "
                f"{out[biggest].n_tiles} cores" if held else
                f"every matrix is streamed and still takes at least one core: {len(out)} matrices")
        raise CompileError(f"{job.name} does not fit {chips} chip(s) even with its weights streamed from the shared "
                           f"memory: it needs {total} cores, {chips} x {job.arch.cores_per_chip} = {capacity} are "
                           f"available ({total - capacity} short; {left}); allow more chips")
    return out, streamed, int(chips)


def _require_on_core(job, tilings, why: dict[int, str], capacity: int, max_chips: int, hint: str = "") -> None:
    """Raise the classic 'does not fit' error: the first matrix that runs past ``capacity`` cores."""
    cpc, used = job.arch.cores_per_chip, 0
    hint = hint or "pass chips=N (--chips N) to stream weights from the shared memory of N chips"
    for s, (m, t) in enumerate(zip(job.graph.matvecs, tilings)):
        if t is None:
            raise CompileError(f"{why[s]}; or {hint}")
        if used + t.n_tiles > capacity:
            n_cores = sum(x.n_tiles for x in tilings if x is not None)
            raise CompileError(
                f"{job.name} does not fit: {m.name} (layer {m.layer}) needs cores {used}..{used + t.n_tiles - 1} "
                f"but {max_chips} chip(s) x {cpc} cores = {capacity} are available; the model needs "
                f"{n_cores} cores ({n_cores - capacity} short, {math.ceil(n_cores / cpc)} chips); "
                f"allow more chips, use cores with more data memory, or {hint}")
        used += t.n_tiles


def check_shared_capacity(job, lay, place, streamed) -> None:
    """The weights a chip streams must fit its shared memory."""
    if not any(streamed):
        return
    per_chip = np.bincount(place.chip, weights=lay.core_streamed, minlength=place.n_chips)
    cap = int(job.arch.shared.capacity_bytes)
    over = np.flatnonzero(per_chip > cap)
    if over.size:
        c = int(over[0])
        raise CompileError(f"{job.name}: chip {c} streams {per_chip[c] / 2**20:,.1f} MiB of weights but its shared "
                           f"memory holds {cap / 2**20:,.1f} MiB ({(per_chip[c] - cap) / 2**20:,.1f} MiB short); "
                           f"allow more chips or a larger shared memory")
