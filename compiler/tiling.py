"""Tiling one weight matrix over cores, and the cost model that picks the split.

A matrix of ``R`` outputs x ``N`` inputs is cut into ``n_r`` row blocks x ``n_c`` column blocks
(balanced: block ``k`` spans ``[k*R//n_r, (k+1)*R//n_r)``); one tile per core. Three splits:

* ``by_outputs`` (``n_c == 1``): a tile holds every input of a range of outputs. An input event
  is multicast to all ``n_r`` tiles; no reduction.
* ``by_inputs`` (``n_r == 1``): a tile holds a range of inputs for every output. An event goes to
  one tile, but per token every tile that received an event sends its ``R`` partial sums: each
  output row is finalized by one *owner* tile (the row block is split evenly among its ``n_c``
  tiles), so ``R * (n_c - 1)`` partial sums cross the mesh.
* ``grid`` (both > 1): events go to the ``n_r`` tiles of their column block; reduction among
  the ``n_c`` tiles of each row block.

Memory of a tile (bytes): weights ``rows * cols * bits / 8`` + one accumulator per row (state
format) + for the rows it owns, the element-wise state, parameters and receive buffers of the
work anchored on this matrix + a fixed event buffer. A tile must fit one core's data memory.
A *streamed* matrix (``stream_columns > 0``, see :mod:`compiler.residency`) keeps its weights in
the chip's shared memory: its tiles hold only ``stream_columns`` weight columns at a time.

Cost (per token, at an expected input density ``d`` = 1 - sparsity), from the arch's table:
event ingest ``d*N*n_r * E_ingest``; synaptic work ``d*R*N * (E_weight + E_mac)``;
accumulator store/load ``n_c*R * (E_sr + E_sw)``; partial sums ``p*R*(n_c-1) * (E_ingest +
E_neuron + E_sr + E_sw)`` (``p`` = chance a tile receives any event; a received partial sum is
handled by the controller like an event); NoC ``flits * links * E_hop`` with links estimated
before placement as ``n_r + (2/3)*sqrt(n_r*n_c)`` per multicast tree (one link per destination
plus the mean distance across a compact region) and ``max(1, (2/3)*sqrt(n_c))`` per partial sum.
The split with the lowest estimate wins (``objective="energy"``) or the fewest flit-hops
(``objective="flits"``); the best of each split kind is recorded for the report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SPLITS = ("by_outputs", "by_inputs", "grid")

# Event queue of a core: 256 (channel, value) pairs of 32 bits. Assumed: SENECA's queue size is
# not published; events are consumed as they arrive, so the queue need not hold a whole token.
EVENT_BUFFER_BYTES = 1024


class CompileError(ValueError):
    """The model cannot be mapped onto the chip; the message names the layer and the shortfall."""


@dataclass(frozen=True)
class CostModel:
    """Energy figures (pJ) and packet format the split choice is priced with."""

    event_ingest: float
    weight_read: float      # per weight
    mac: float              # per multiply-accumulate
    neuron_update: float
    state_read: float       # per 16-bit word
    state_write: float
    noc_hop: float          # per flit per link
    pairs_per_flit: int
    header_flits: int
    max_pairs_per_packet: int

    @property
    def flits_per_pair(self) -> float:
        return 1.0 / self.pairs_per_flit + self.header_flits / self.max_pairs_per_packet

    @staticmethod
    def from_arch(arch, fmt: str | None = None, op: str = "mac") -> "CostModel":
        return CostModel(
            event_ingest=arch.e("event_ingest"), weight_read=arch.weight_read_pj(fmt),
            mac=arch.mac_pj(fmt) if op == "mac" else arch.acc_pj(fmt),
            neuron_update=arch.e("neuron_update"), state_read=arch.e("state_read_word"),
            state_write=arch.e("state_write_word"), noc_hop=arch.e("noc_hop_per_flit"),
            pairs_per_flit=arch.noc.pairs_per_flit, header_flits=arch.noc.header_flits,
            max_pairs_per_packet=arch.noc.max_pairs_per_packet)


@dataclass(frozen=True)
class Tiling:
    """How one matrix is cut: row and column block bounds, the split's name, its estimated cost,
    and the best candidate of each split kind (``alternatives``: split -> n_r, n_c, cost)."""

    matrix: str
    out_dim: int
    in_dim: int
    split: str
    row_bounds: tuple[int, ...]
    col_bounds: tuple[int, ...]
    est_energy_pj: float
    est_flit_hops: float
    density: float
    alternatives: dict = field(default_factory=dict, compare=False)

    @property
    def n_row_blocks(self) -> int:
        return len(self.row_bounds) - 1

    @property
    def n_col_blocks(self) -> int:
        return len(self.col_bounds) - 1

    @property
    def n_tiles(self) -> int:
        return self.n_row_blocks * self.n_col_blocks

    def owned_rows(self, k: int, j: int) -> tuple[int, int]:
        """Rows of row block ``k`` that tile ``(k, j)`` finalizes (reduces and runs element-wise work for)."""
        r0, r1 = self.row_bounds[k], self.row_bounds[k + 1]
        n = r1 - r0
        return r0 + (j * n) // self.n_col_blocks, r0 + ((j + 1) * n) // self.n_col_blocks


def balanced_bounds(n: int, parts: int) -> tuple[int, ...]:
    return tuple((k * n) // parts for k in range(parts + 1))


def tile_bytes(rows: int, cols: int, owned: int, weight_bits: int, acc_bytes: int, anchor_bytes: int) -> int:
    """Data memory of one tile (see module docstring)."""
    return -(-rows * cols * weight_bits // 8) + rows * acc_bytes + owned * anchor_bytes + EVENT_BUFFER_BYTES


def split_name(n_r: int, n_c: int) -> str:
    if n_c == 1:
        return "by_outputs"
    return "by_inputs" if n_r == 1 else "grid"


def candidate_costs(R: int, N: int, n_r: np.ndarray, n_c: np.ndarray, cost: CostModel, density: float):
    """Estimated energy (pJ/token) and NoC flit-hops per token of ``n_r x n_c`` tilings (arrays)."""
    d = float(density)
    n_r = n_r.astype(np.float64)
    n_c = n_c.astype(np.float64)
    cb = np.ceil(N / n_c)
    events = d * N
    p_active = 1.0 - (1.0 - d) ** cb
    psum_pairs = p_active * R * (n_c - 1)
    fpp = cost.flits_per_pair
    flit_hops = (events * fpp * (n_r + (2.0 / 3.0) * np.sqrt(n_r * n_c))
                 + psum_pairs * fpp * np.maximum(1.0, (2.0 / 3.0) * np.sqrt(n_c)))
    energy = (events * n_r * cost.event_ingest
              + d * R * N * (cost.weight_read + cost.mac)
              + n_c * R * (cost.state_read + cost.state_write)
              + psum_pairs * (cost.event_ingest + cost.neuron_update + cost.state_read + cost.state_write)
              + flit_hops * cost.noc_hop)
    return energy, flit_hops


def tile_matrix(name: str, out_dim: int, in_dim: int, *, mem_bytes: int, weight_bits: int, acc_bytes: int,
                anchor_bytes: int, cost: CostModel, density: float = 0.5, split: str = "auto",
                objective: str = "energy", stream_columns: int = 0) -> Tiling:
    """Choose the tiling of one ``out_dim x in_dim`` matrix: every candidate column-block count,
    the fewest row blocks that fit memory for it, priced by :func:`candidate_costs`.

    ``split``: ``"auto"`` (cheapest) or one of :data:`SPLITS` (cheapest of that kind; a matrix that
    fits one core is a single ``by_outputs`` tile whatever is asked). ``stream_columns``: the weights
    are streamed and a tile buffers this many columns (0: every weight held). Raises
    :class:`CompileError` if no tile fits (the message says what a single row / column needs).
    """
    if split != "auto" and split not in SPLITS:
        raise ValueError(f"split must be 'auto' or one of {SPLITS}, got {split!r}")
    if objective not in ("energy", "flits"):
        raise ValueError(f"objective must be 'energy' or 'flits', got {objective!r}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"{name}: expected density (1 - sparsity) must be in (0, 1], got {density}")
    R, N = int(out_dim), int(in_dim)
    avail = mem_bytes - EVENT_BUFFER_BYTES
    n_c = np.arange(1, N + 1, dtype=np.int64)
    cb = -(-N // n_c)
    keep = np.concatenate([[True], cb[1:] != cb[:-1]])  # fewest column blocks for each block width
    n_c, cb = n_c[keep], cb[keep]
    # rows per tile: rows*cb*bits/8 + rows*acc + ceil(rows/n_c)*anchor <= avail, using
    # ceil(rows/n_c) <= rows/n_c + 1 (conservative by at most one row)
    held = np.minimum(cb, stream_columns) if stream_columns else cb  # weight columns in local memory
    per_row = held * weight_bits / 8.0 + acc_bytes + anchor_bytes / n_c
    rb = np.floor((avail - anchor_bytes - 1) / per_row).astype(np.int64)
    rb = np.minimum(rb, R)
    fits = rb >= 1
    if not fits.any():
        need = tile_bytes(1, 1, 1, weight_bits, acc_bytes, anchor_bytes)
        row = tile_bytes(1, min(N, stream_columns) if stream_columns else N, 1, weight_bits, acc_bytes, anchor_bytes)
        raise CompileError(f"{name}: even a 1x1 tile with its neuron state needs {need} bytes (one "
                           + (f"row with its {min(N, stream_columns)}-column stream buffer" if stream_columns
                              else f"full row of {N} inputs") + f": {row} bytes) but a core has {mem_bytes} bytes of "
                           f"data memory ({row - mem_bytes} short); use a chip with more memory or a smaller weight format")
    n_c, cb, rb = n_c[fits], cb[fits], rb[fits]
    n_r = -(-R // rb)
    # a grid needs >= 2 row blocks even where one would fit: add those candidates
    extra = (n_c > 1) & (n_r == 1) & (R >= 2)
    n_c, cb, n_r = (np.concatenate([a, a[extra]]) for a in (n_c, cb, n_r))
    n_r[len(n_r) - int(extra.sum()):] = 2
    # a single-tile matrix is by_outputs; otherwise name the kind
    kinds = np.where(n_c == 1, 0, np.where(n_r == 1, 1, 2))
    energy, flits = candidate_costs(R, N, n_r, n_c, cost, density)
    key = energy if objective == "energy" else flits
    alternatives = {}
    for k, s in enumerate(SPLITS):
        idx = np.flatnonzero(kinds == k)
        if idx.size:
            best = idx[np.lexsort((n_r[idx] * n_c[idx], key[idx]))[0]]
            alternatives[s] = dict(n_row_blocks=int(n_r[best]), n_col_blocks=int(n_c[best]),
                                   est_energy_pj=float(energy[best]), est_flit_hops=float(flits[best]))
    fits_one_core = bool(((n_r == 1) & (n_c == 1)).any())
    if split == "auto" or fits_one_core:
        chosen = min(alternatives, key=lambda s: (alternatives[s]["est_energy_pj" if objective == "energy"
                                                                   else "est_flit_hops"], s))
    elif split in alternatives:
        chosen = split
    else:
        raise CompileError(f"{name}: no {split} tiling fits ({R}x{N} matrix, {mem_bytes}-byte cores); "
                           f"possible: {sorted(alternatives)}")
    a = alternatives[chosen]
    return Tiling(name, R, N, chosen, balanced_bounds(R, a["n_row_blocks"]), balanced_bounds(N, a["n_col_blocks"]),
                  a["est_energy_pj"], a["est_flit_hops"], float(density), alternatives)


def max_tile_bytes(t: Tiling, weight_bits: int, acc_bytes: int, anchor_bytes: int) -> int:
    rows = max(b - a for a, b in zip(t.row_bounds, t.row_bounds[1:]))
    cols = max(b - a for a, b in zip(t.col_bounds, t.col_bounds[1:]))
    return tile_bytes(rows, cols, math.ceil(rows / t.n_col_blocks), weight_bits, acc_bytes, anchor_bytes)
