"""Counting simulator: every action on every core for every token, from a Program and an EventTrace.

``simulate(program, trace, arch) -> Report`` counts, per token and per (core, layer):

=====================  ===============================================================  =================
action                 counted as                                                       priced by (arch)
=====================  ===============================================================  =================
event_ingest           events received: one per (event, destination tile)               event_ingest
weight_read            16-bit data words of weights read: events x rows x bits/16        weight_read_word
mac                    events x rows of the tile (``binary_events``: accumulates)         format's mac/acc
psum_ingest            partial sums received by row owners (by_inputs / grid tiles)     event_ingest
value_ingest           dense values received by element-wise stages (k, r, residual)    event_ingest
neuron_update          element-wise NPE ops (graph.py's per-element counts) + psum adds  neuron_update
threshold_compare      one per element at every site                                    threshold_compare
event_generate         values sent: events by the producing core, partial sums by the    event_generate
                       sending tile, dense copies by the sending owner
state_read/_write      words: recurrent state, parameters, accumulators (rows per tile   state_read_word /
                       per token), received values and partial sums                     state_write_word
noc_flit_hop           flits x on-chip links of the multicast tree (XY, from Program)   noc_hop_per_flit
chip_flit_hop          flits x chip-to-chip links                                       inter_chip_per_flit
leakage                core-cycles: every core leaks for the whole token                leakage_per_core
shared_read_bit        bits of streamed weights read from the chip's shared memory      shared_memory.
                       (``seneca_sim.fetch``: by fetch policy)                          read_energy_per_bit
buffer_write           16-bit words of them written into the core's stream buffer       state_write_word
=====================  ===============================================================  =================

Flits: a producing core packs the events of one route and one token into packets
(``arch.noc.flits_for_pairs``: header + two (channel, value) pairs per flit, 16 pairs per packet).
NoC energy is booked on the sending core.

Latency model (per token, no contention; the simpy network model refines it). A token runs the
phases of ``compiler.graph`` in order (layers sequential; inside a phase all cores work in
parallel); a phase takes

    NoC latency of its inputs + slowest core's compute + partial-sum NoC latency + slowest owner's reduction

* NoC latency of a message: the closed form of ``seneca_sim.network.analytic_latency`` (head
  through the sender's injection port, every link and router of the XY path and the receiver's
  ejection port; ``inter_chip_latency_cycles`` more per chip crossing; then (flits - 1) x cycles
  per flit of serialization), to the route's farthest destination;
* a tile spends per event ``controller_cycles_per_event + ceil(rows / npe) x (weight words per
  weight + MAC instructions / lanes) x npe_cycles`` (MAC = MUL + ADD: 2 instructions; binary
  events: 1), plus per token ``2 ceil(rows / npe)`` to store and read its accumulators;
* element-wise work takes ``ceil(ops / npe)`` cycles, each received value or partial sum
  ``controller_cycles_per_event`` (the controller handles every incoming pair), each value sent
  ``event_queue_access_cycles`` on the sender: an event in its emitting phase, a partial sum in
  its matrix's phase, a dense copy at the end of the phase before the one that uses it.
Tokens do not overlap (generation: token t+1 needs token t's output).

Two small numba kernels do the per-token work; each has a plain-numpy twin used by the tests:
``range_counts`` (events per channel range from bit-packed masks) and ``token_actions``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from seneca_sim.actions import (A_BUFW, A_CHIP, A_EVGEN, A_INGEST, A_LEAK, A_MAC, A_NEURON, A_NOC, A_PSUM,  # noqa: F401
                                A_SHARED, A_SREAD, A_SWRITE, A_THRESH, A_VALUE, A_WREAD, ACTIONS, N_ACTIONS)
from seneca_sim.report import Report

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


# ------------------------------------------------------------------------------------ kernels
@njit(cache=True)
def range_counts(bits, lo, hi, out):
    """``out[t, r]`` = set bits of token ``t`` in bit range ``[lo[r], hi[r])`` (bits little-endian
    within bytes, as ``np.packbits(..., bitorder="little")``)."""
    T, nbytes = bits.shape
    pc = np.zeros(nbytes + 1, dtype=np.int64)
    for t in range(T):
        row = bits[t]
        for k in range(nbytes):
            pc[k + 1] = pc[k] + _POPCOUNT[row[k]]
        for r in range(lo.shape[0]):
            a, b = lo[r], hi[r]
            if b <= a:
                out[t, r] = 0
                continue
            ba, bb = a >> 3, b >> 3
            oa, ob = a & 7, b & 7
            if ba == bb:
                out[t, r] = _POPCOUNT[(row[ba] >> oa) & ((1 << (ob - oa)) - 1)]
            else:
                n = _POPCOUNT[row[ba] >> oa] + pc[bb] - pc[ba + 1]
                if ob:
                    n += _POPCOUNT[row[bb] & ((1 << ob) - 1)]
                out[t, r] = n


def range_counts_numpy(bits: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Plain-numpy twin of :func:`range_counts`: unpack, prefix sums, differences."""
    cs = np.zeros((bits.shape[0], bits.shape[1] * 8 + 1), dtype=np.int64)
    np.cumsum(np.unpackbits(bits, axis=1, bitorder="little"), axis=1, out=cs[:, 1:])
    return np.maximum(cs[:, hi] - cs[:, lo], 0)


def flits_for_pairs(pairs, pairs_per_flit: int, header_flits: int, max_pairs: int):
    """Flits of ``pairs`` (channel, value) pairs sent in packets of at most ``max_pairs`` pairs."""
    pairs = np.asarray(pairs, dtype=np.int64)
    return np.where(pairs > 0, -(-pairs // max_pairs) * header_flits + -(-pairs // pairs_per_flit), 0)


@njit(cache=True)
def _flits(pairs, ppf, header, max_pairs):
    if pairs <= 0:
        return 0.0
    return float(((pairs + max_pairs - 1) // max_pairs) * header + (pairs + ppf - 1) // ppf)


@njit(cache=True, inline="always")
def _book(item_tot, tok_layer, tok_item, keep, t, it, lay, a, v):
    item_tot[it, a] += v
    tok_layer[t, lay, a] += v
    if keep:
        tok_item[t, it, a] += v


@njit(cache=True)
def token_actions(ev_tiles, ev_routes, static_slot, static_noc,
                  t_item, t_rows, t_words, t_slot, t_cyc, t_ptr, t_psum_on, t_psum_chip, t_psum_pairs,
                  p_dst_item, p_pairs, p_slot, p_cyc, p_lat, p_phase,
                  r_src_item, r_on, r_chip, r_lat0, r_phase, r_slot,
                  slot_phase, slot_stage, core_item, item_layer, ppf, header, max_pairs, cyc_flit, evgen_cyc,
                  tok_layer, item_tot, phase_cyc, tok_item, keep):
    """Per token: book the event-driven actions, derive the phase cycles and the leakage.

    ``ev_tiles[t, i]``: events reaching tile ``i``; ``ev_routes[t, r]``: events sent on route ``r``.
    Adds into ``tok_layer[t, layer, action]``, ``item_tot[item, action]``, ``phase_cyc[t, phase]``
    and, if ``keep``, ``tok_item[t, item, action]``. The token-independent (static) counts are not
    booked here (:func:`run_kernels` adds them); their cycles are (``static_slot``, ``static_noc``).
    A received partial sum is booked once, as ``psum_ingest``; :func:`run_kernels` copies that
    count to the add, the accumulator read and write it also costs. ``t_psum_on/_chip``: flit-links
    of all partial-sum messages a tile sends; ``t_psum_pairs``: the values in them, each generated
    by the tile's core (event_generate, and an event-queue access on its cycles).
    """
    T = ev_tiles.shape[0]
    n_phases = phase_cyc.shape[1]
    slot = np.empty_like(static_slot)
    noc_in = np.empty(n_phases)
    psum_noc = np.empty(n_phases)
    comp = np.empty(n_phases)
    red = np.empty(n_phases)
    for t in range(T):
        slot[:] = static_slot
        noc_in[:] = static_noc
        psum_noc[:] = 0.0
        for i in range(t_item.shape[0]):
            ev = ev_tiles[t, i]
            if ev == 0:
                continue
            it = t_item[i]
            lay = item_layer[it]
            _book(item_tot, tok_layer, tok_item, keep, t, it, lay, 0, ev)                         # event_ingest
            _book(item_tot, tok_layer, tok_item, keep, t, it, lay, 1, ev * t_rows[i] * t_words[i])  # weight words
            _book(item_tot, tok_layer, tok_item, keep, t, it, lay, 2, ev * t_rows[i])             # mac
            slot[t_slot[i]] += ev * t_cyc[i]
            if t_ptr[i + 1] > t_ptr[i]:
                _book(item_tot, tok_layer, tok_item, keep, t, it, lay, 7, t_psum_pairs[i])         # event_generate
                _book(item_tot, tok_layer, tok_item, keep, t, it, lay, 10, t_psum_on[i])
                _book(item_tot, tok_layer, tok_item, keep, t, it, lay, 11, t_psum_chip[i])
                slot[t_slot[i]] += t_psum_pairs[i] * evgen_cyc
            for k in range(t_ptr[i], t_ptr[i + 1]):
                _book(item_tot, tok_layer, tok_item, keep, t, p_dst_item[k], lay, 3, p_pairs[k])
                slot[p_slot[k]] += p_cyc[k]
                psum_noc[p_phase[k]] = max(psum_noc[p_phase[k]], p_lat[k])
        for r in range(r_src_item.shape[0]):
            ev = ev_routes[t, r]
            if ev == 0:
                continue
            f = _flits(ev, ppf, header, max_pairs)
            s = r_src_item[r]
            lay = item_layer[s]
            _book(item_tot, tok_layer, tok_item, keep, t, s, lay, 7, ev)                          # event_generate
            _book(item_tot, tok_layer, tok_item, keep, t, s, lay, 10, f * r_on[r])
            _book(item_tot, tok_layer, tok_item, keep, t, s, lay, 11, f * r_chip[r])
            slot[r_slot[r]] += ev * evgen_cyc
            noc_in[r_phase[r]] = max(noc_in[r_phase[r]], r_lat0[r] + (f - 1.0) * cyc_flit)
        comp[:] = 0.0
        red[:] = 0.0
        for k in range(slot.shape[0]):
            p = slot_phase[k]
            if slot_stage[k] == 0:
                comp[p] = max(comp[p], slot[k])
            else:
                red[p] = max(red[p], slot[k])
        latency = 0.0
        for p in range(n_phases):
            c = noc_in[p] + comp[p] + psum_noc[p] + red[p]
            phase_cyc[t, p] += c
            latency += c
        for c in range(core_item.shape[0]):  # leakage: every core, the whole token (core-cycles)
            it = core_item[c]
            _book(item_tot, tok_layer, tok_item, keep, t, it, item_layer[it], 12, latency)


def token_actions_numpy(ev_tiles, ev_routes, tb: "CountTables"):
    """Plain-numpy twin of :func:`token_actions`, vectorized over tokens.

    Returns (tok_layer [T, n_layers, A], item_tot [n_items, A], phase_cyc [T, P], tok_item [T, n_items, A]).
    """
    T = ev_tiles.shape[0]
    ev_tiles = ev_tiles.astype(np.float64)
    ev_routes = ev_routes.astype(np.float64)
    counts = np.repeat(tb.static_counts[None], T, axis=0)
    slot = np.repeat(tb.static_slot[None], T, axis=0)

    def add(action, items, values):  # values [T, n]
        np.add.at(counts[:, :, action], (slice(None), items), values)

    add(A_INGEST, tb.t_item, ev_tiles)
    add(A_WREAD, tb.t_item, ev_tiles * (tb.t_rows * tb.t_words))
    add(A_MAC, tb.t_item, ev_tiles * tb.t_rows)
    np.add.at(slot, (slice(None), tb.t_slot), ev_tiles * tb.t_cyc)
    p_tile = np.repeat(np.arange(len(tb.t_item)), np.diff(tb.t_ptr))
    active = (ev_tiles[:, p_tile] > 0).astype(np.float64)            # [T, n_psum]
    add(A_EVGEN, tb.p_src_item, active * tb.p_pairs)
    np.add.at(slot, (slice(None), tb.p_src_slot), active * (tb.p_pairs * tb.evgen_cyc))
    add(A_NOC, tb.p_src_item, active * (tb.p_flits * tb.p_on))
    add(A_CHIP, tb.p_src_item, active * (tb.p_flits * tb.p_chip))
    for a in (A_PSUM, A_NEURON, A_SREAD, A_SWRITE):
        add(a, tb.p_dst_item, active * tb.p_pairs)
    np.add.at(slot, (slice(None), tb.p_slot), active * tb.p_cyc)
    pairs = ev_routes.astype(np.int64)
    f = flits_for_pairs(pairs, tb.ppf, tb.header, tb.max_pairs).astype(np.float64)
    add(A_EVGEN, tb.r_src_item, ev_routes)
    add(A_NOC, tb.r_src_item, f * tb.r_on)
    add(A_CHIP, tb.r_src_item, f * tb.r_chip)
    np.add.at(slot, (slice(None), tb.r_slot), ev_routes * tb.evgen_cyc)
    P = len(tb.static_noc)
    noc_in = np.repeat(tb.static_noc[None], T, axis=0)
    lat = np.where(ev_routes > 0, tb.r_lat0 + (f - 1.0) * tb.cyc_flit, 0.0)
    np.maximum.at(noc_in, (slice(None), tb.r_phase), lat)
    psum_noc = np.zeros((T, P))
    np.maximum.at(psum_noc, (slice(None), tb.p_phase), active * tb.p_lat)
    comp = np.zeros((T, P))
    red = np.zeros((T, P))
    st0 = tb.slot_stage == 0
    np.maximum.at(comp, (slice(None), tb.slot_phase[st0]), slot[:, st0])
    np.maximum.at(red, (slice(None), tb.slot_phase[~st0]), slot[:, ~st0])
    phase_cyc = noc_in + comp + psum_noc + red
    latency = phase_cyc.sum(axis=1)
    np.add.at(counts[:, :, A_LEAK], (slice(None), tb.core_item), np.repeat(latency[:, None], len(tb.core_item), axis=1))
    n_layers = int(tb.item_layer.max()) + 1
    tok_layer = np.zeros((T, n_layers, N_ACTIONS))
    np.add.at(tok_layer, (slice(None), tb.item_layer), counts)
    return tok_layer, counts.sum(axis=0), phase_cyc, counts


# ----------------------------------------------------------------------------- the tables
@dataclass(frozen=True)
class CountTables:
    """Everything the kernels need, derived once from a Program and an Arch (flat arrays)."""

    site_bit_offset: np.ndarray   # [n_sites] first bit of each site in the concatenated masks
    site_bytes: np.ndarray        # [n_sites] bytes per token of each site's mask
    tile_lo: np.ndarray
    tile_hi: np.ndarray
    route_lo: np.ndarray
    route_hi: np.ndarray
    static_counts: np.ndarray     # [n_items, A] per token
    static_slot: np.ndarray       # [n_slots] cycles per token
    static_noc: np.ndarray        # [n_phases] NoC latency of dense transfers into each phase
    t_item: np.ndarray
    t_rows: np.ndarray
    t_words: np.ndarray
    t_slot: np.ndarray
    t_cyc: np.ndarray
    t_ptr: np.ndarray
    t_psum_on: np.ndarray         # [n_tiles] flits x on-chip links of the partial sums a tile sends
    t_psum_chip: np.ndarray
    t_psum_pairs: np.ndarray      # [n_tiles] partial sums a tile sends (values it generates)
    p_src_item: np.ndarray
    p_src_slot: np.ndarray        # the sending tile's compute slot (the numpy twin's view of t_psum_pairs)
    p_dst_item: np.ndarray
    p_pairs: np.ndarray
    p_flits: np.ndarray
    p_on: np.ndarray
    p_chip: np.ndarray
    p_slot: np.ndarray
    p_cyc: np.ndarray
    p_lat: np.ndarray
    p_phase: np.ndarray
    r_src_item: np.ndarray
    r_on: np.ndarray
    r_chip: np.ndarray
    r_lat0: np.ndarray
    r_phase: np.ndarray
    r_slot: np.ndarray
    slot_phase: np.ndarray
    slot_stage: np.ndarray
    core_item: np.ndarray         # [n_cores] the item leakage is booked on (core, its tile's layer)
    item_core: np.ndarray
    item_layer: np.ndarray
    ppf: int
    header: int
    max_pairs: int
    cyc_flit: float
    evgen_cyc: float
    energy: np.ndarray            # [A] pJ per unit of each action


def action_energies(arch, fmt: str, binary_events: bool = False) -> np.ndarray:
    """pJ per counted unit of every action in :data:`ACTIONS` (leakage: per core-cycle)."""
    e = arch.energy
    get = lambda k, default: arch.e(k) if k in e else default  # noqa: E731
    return np.array([
        arch.e("event_ingest"), arch.e("weight_read_word"), arch.acc_pj(fmt) if binary_events else arch.mac_pj(fmt),
        arch.e("event_ingest"), arch.e("event_ingest"), arch.e("neuron_update"),
        get("threshold_compare", arch.e("neuron_update")), get("event_generate", 0.0),
        arch.e("state_read_word"), arch.e("state_write_word"), arch.e("noc_hop_per_flit"),
        arch.e("inter_chip_per_flit"), arch.leakage_pj_per_cycle,
        arch.shared.read_energy_per_bit if arch.shared is not None else 0.0, arch.e("state_write_word"),
    ], dtype=np.float64)


@dataclass(frozen=True)
class _Figs:
    """The arch's cycle and packet figures the tables are built from."""

    npe: int
    ctrl: float
    npe_cyc: float
    evgen_cyc: float
    cyc_flit: float
    ppf: int
    header: int
    max_pairs: int

    @staticmethod
    def of(arch) -> "_Figs":
        noc = arch.noc
        return _Figs(npe=int(arch.core.npe_count), ctrl=arch.c("controller_cycles_per_event"),
                     npe_cyc=arch.c("npe_cycles_per_instruction"),
                     evgen_cyc=arch.c("event_queue_access_cycles") if "event_queue_access_cycles" in arch.cycles else 1.0,
                     cyc_flit=noc.cycles_per_hop_per_flit, ppf=noc.pairs_per_flit, header=noc.header_flits,
                     max_pairs=noc.max_pairs_per_packet)

    def flits(self, pairs):
        return flits_for_pairs(pairs, self.ppf, self.header, self.max_pairs)


class _Index:
    """Items, the (core, layer) pairs actions are booked on, and slots, the (core, phase, stage)
    whose cycles add up (stage 1: partial-sum reduction and sending finished values)."""

    def __init__(self, P):
        self.L1 = L1 = int(P.meta["n_layer"]) + 1
        ew, xf, tl, ps, rt, layer = P.elementwise, P.transfers, P.tiles, P.psums, P.routes, P.sites.layer
        self.ukeys = np.unique(np.concatenate([
            P.cores.layer + L1 * np.arange(P.n_cores), ew.layer + L1 * ew.core, xf.layer + L1 * xf.src,
            xf.layer + L1 * xf.dst, layer[tl.site] + L1 * tl.core, layer[ps.site] + L1 * ps.src,
            layer[ps.site] + L1 * ps.dst, layer[rt.site] + L1 * rt.src]).astype(np.int64))
        self.S = S = 2 * len(P.phases)
        self.xf_send = np.maximum(xf.phase - 1, 0)  # a dense copy is sent at the end of the phase before its use
        phase = P.sites.phase
        self.slot_keys = np.unique(np.concatenate([
            (ew.core * S + 2 * ew.phase), (xf.dst * S + 2 * xf.phase), (xf.src * S + 2 * self.xf_send + 1),
            (tl.core * S + 2 * phase[tl.site]), (ps.dst * S + 2 * phase[ps.site] + 1),
            (rt.src * S + 2 * rt.emit_phase)]).astype(np.int64))

    def item(self, core, layer) -> np.ndarray:
        return np.searchsorted(self.ukeys, np.asarray(layer) + self.L1 * np.asarray(core)).astype(np.int64)

    def slot(self, core, phase, stage: int = 0) -> np.ndarray:
        return np.searchsorted(self.slot_keys, np.asarray(core) * self.S + 2 * np.asarray(phase) + stage).astype(np.int64)


def build_tables(program, arch, binary_events: bool = False) -> CountTables:
    """Flatten a Program into the kernels' arrays for chip ``arch`` (energies and cycle figures)."""
    P, f, ix = program, _Figs.of(arch), _Index(program)
    head = _head_latency(arch)
    site_bytes = -(-P.sites.in_dim // 8)  # each site's mask padded to whole bytes in the concatenated masks
    site_off = np.concatenate([[0], np.cumsum(site_bytes)[:-1]]) * 8
    static, static_slot, static_noc = _static_work(P, ix, f, head)
    tiles = _tile_arrays(P, ix, f, arch, binary_events, static, static_slot)
    tl, rt, phase, layer = P.tiles, P.routes, P.sites.phase, P.sites.layer
    return CountTables(
        site_bit_offset=site_off.astype(np.int64), site_bytes=site_bytes.astype(np.int64),
        tile_lo=(site_off[tl.site] + tl.col0).astype(np.int64), tile_hi=(site_off[tl.site] + tl.col1).astype(np.int64),
        route_lo=(site_off[rt.site] + rt.ch0).astype(np.int64), route_hi=(site_off[rt.site] + rt.ch1).astype(np.int64),
        static_counts=static, static_slot=static_slot, static_noc=static_noc, **tiles, **_psum_arrays(P, ix, f, head),
        r_src_item=ix.item(rt.src, layer[rt.site]), r_on=(rt.links - rt.chip_links).astype(np.float64),
        r_chip=rt.chip_links.astype(np.float64), r_lat0=route_head_latency(P, head),
        r_phase=phase[rt.site].astype(np.int64), r_slot=ix.slot(rt.src, rt.emit_phase),
        slot_phase=((ix.slot_keys % ix.S) // 2).astype(np.int64), slot_stage=(ix.slot_keys % 2).astype(np.int64),
        core_item=ix.item(np.arange(P.n_cores), P.cores.layer),
        item_core=(ix.ukeys // ix.L1).astype(np.int64), item_layer=(ix.ukeys % ix.L1).astype(np.int64),
        ppf=int(f.ppf), header=int(f.header), max_pairs=int(f.max_pairs), cyc_flit=float(f.cyc_flit),
        evgen_cyc=float(f.evgen_cyc), energy=action_energies(arch, arch.fmt(P.meta["weight_format"]).name, binary_events),
    )


def _static_work(P, ix: _Index, f: _Figs, head):
    """Counts and cycles that every token repeats: element-wise work and dense copies."""
    ew, xf = P.elementwise, P.transfers
    static = np.zeros((len(ix.ukeys), N_ACTIONS))
    static_slot = np.zeros(len(ix.slot_keys))
    static_noc = np.zeros(len(P.phases))
    ei = ix.item(ew.core, ew.layer)
    np.add.at(static[:, A_NEURON], ei, ew.ops)
    np.add.at(static[:, A_THRESH], ei, ew.compares)
    np.add.at(static[:, A_SREAD], ei, ew.state_reads + ew.param_reads)
    np.add.at(static[:, A_SWRITE], ei, ew.state_writes)
    np.add.at(static_slot, ix.slot(ew.core, ew.phase),
              np.ceil((ew.ops + ew.compares + ew.state_reads + ew.state_writes + ew.param_reads) / f.npe) * f.npe_cyc)
    xflits = f.flits(xf.pairs)
    np.add.at(static[:, A_NOC], ix.item(xf.src, xf.layer), xflits * (xf.links - xf.chip_links))
    np.add.at(static[:, A_CHIP], ix.item(xf.src, xf.layer), xflits * xf.chip_links)
    xd = ix.item(xf.dst, xf.layer)
    for a in (A_VALUE, A_SREAD, A_SWRITE):
        np.add.at(static[:, a], xd, xf.pairs)
    np.add.at(static_slot, ix.slot(xf.dst, xf.phase), xf.pairs * f.ctrl)
    # the sender generates every value it copies, once the value is final: after the phase before
    np.add.at(static[:, A_EVGEN], ix.item(xf.src, xf.layer), xf.pairs)
    np.add.at(static_slot, ix.slot(xf.src, ix.xf_send, 1), xf.pairs * f.evgen_cyc)
    if len(xf):
        np.maximum.at(static_noc, xf.phase, head(xf.links, xf.chip_links) + np.maximum(xflits - 1, 0) * f.cyc_flit)
    return static, static_slot, static_noc


def _tile_arrays(P, ix: _Index, f: _Figs, arch, binary_events: bool, static, static_slot) -> dict:
    """Per tile: its item, rows, weight words, cycles per event, and its partial sums (grouped by
    sending tile); accumulators are stored and read once per token (added to the static counts)."""
    tl, ps, phase, layer = P.tiles, P.psums, P.sites.phase, P.sites.layer
    fmt = arch.fmt(P.meta["weight_format"])
    rows = (tl.row1 - tl.row0).astype(np.float64)
    ti = ix.item(tl.core, layer[tl.site])
    np.add.at(static[:, A_SREAD], ti, rows)
    np.add.at(static[:, A_SWRITE], ti, rows)
    groups = np.ceil(rows / f.npe)
    np.add.at(static_slot, ix.slot(tl.core, phase[tl.site]), 2 * groups * f.npe_cyc)
    words_per_weight = fmt.bits / arch.core.data_word_bits
    instr = words_per_weight + (1.0 if binary_events else 2.0) / fmt.lanes
    p_tile, order = _psum_tiles(P)
    pf = f.flits(ps.pairs).astype(np.float64)[order]
    pl, pc = ps.links[order].astype(np.float64), ps.chip_links[order].astype(np.float64)
    by_tile = lambda v: np.bincount(p_tile[order], v, minlength=len(tl))  # noqa: E731
    return dict(t_item=ti, t_rows=rows, t_words=np.full(len(tl), words_per_weight),
                t_slot=ix.slot(tl.core, phase[tl.site]), t_cyc=(f.ctrl + groups * instr * f.npe_cyc).astype(np.float64),
                t_ptr=np.searchsorted(p_tile[order], np.arange(len(tl) + 1)).astype(np.int64),
                t_psum_on=by_tile(pf * (pl - pc)), t_psum_chip=by_tile(pf * pc),
                t_psum_pairs=by_tile(ps.pairs[order].astype(np.float64)),
                p_src_slot=ix.slot(tl.core[p_tile[order]], phase[tl.site[p_tile[order]]]))


def _psum_tiles(P) -> tuple[np.ndarray, np.ndarray]:
    """The sending tile of every partial-sum message, and the messages' order grouped by tile."""
    tl, ps = P.tiles, P.psums
    tile_of = {(int(c), int(s)): i for i, (c, s) in enumerate(zip(tl.core, tl.site))}
    p_tile = np.array([tile_of[(int(c), int(s))] for c, s in zip(ps.src, ps.site)], dtype=np.int64)
    return p_tile, np.argsort(p_tile, kind="stable")


def _psum_arrays(P, ix: _Index, f: _Figs, head) -> dict:
    """Per partial-sum message (grouped by sending tile): items, pairs, flits, links, cycles, latency."""
    ps, phase, layer = P.psums, P.sites.phase, P.sites.layer
    _, order = _psum_tiles(P)
    pf = f.flits(ps.pairs).astype(np.float64)[order]
    pl, pc = ps.links[order].astype(np.float64), ps.chip_links[order].astype(np.float64)
    pp = ps.pairs[order].astype(np.float64)
    return dict(p_src_item=ix.item(ps.src, layer[ps.site])[order], p_dst_item=ix.item(ps.dst, layer[ps.site])[order],
                p_pairs=pp, p_flits=pf, p_on=pl - pc, p_chip=pc, p_slot=ix.slot(ps.dst, phase[ps.site], 1)[order],
                p_cyc=(pp * f.ctrl + np.ceil(pp / f.npe) * 3 * f.npe_cyc),
                p_lat=head(pl, pc) + np.maximum(pf - 1, 0) * f.cyc_flit, p_phase=phase[ps.site][order].astype(np.int64))


def _head_latency(arch):
    """Cycles a message's head takes over ``hops`` router-to-router links, ``crossings`` of them
    across a chip boundary, from the sending core's injection port to the receiving core's
    ejection port: ``seneca_sim.network.analytic_latency`` for one flit on the meshes
    ``mesh_from_arch`` builds (every link and port at ``cycles_per_hop_per_flit``, every router
    ``router_latency_cycles``, every crossing ``inter_chip_latency_cycles`` more). Each further
    flit adds ``cycles_per_hop_per_flit``."""
    c, r = arch.noc.cycles_per_hop_per_flit, arch.noc.router_latency_cycles
    lat = arch.noc.inter_chip_latency_cycles

    def head(hops, crossings):
        hops = np.asarray(hops, dtype=np.float64)
        return (hops + 2) * c + (hops + 1) * r + np.asarray(crossings, dtype=np.float64) * lat
    return head


def route_head_latency(program, head) -> np.ndarray:
    """Per multicast route, the head latency to its farthest destination (the largest
    :func:`_head_latency` over the route's destinations, each by its own hops and crossings)."""
    cores, rt, rd = program.cores, program.routes, program.route_dests
    cols, rows = int(program.meta["mesh_cols"]), int(program.meta["mesh_rows"])
    gx, gy = cores.gx.astype(np.int64), cores.gy.astype(np.int64)
    s, d = rt.src[rd.route].astype(np.int64), rd.core.astype(np.int64)
    hops = np.abs(gx[d] - gx[s]) + np.abs(gy[d] - gy[s])
    crossings = np.abs(gx[d] // cols - gx[s] // cols) + np.abs(gy[d] // rows - gy[s] // rows)
    out = np.zeros(len(rt))
    np.maximum.at(out, rd.route.astype(np.int64), head(hops, crossings))
    return out


# ------------------------------------------------------------------------------- the masks
def packed_masks(program, trace, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
    """Concatenated bit-packed masks ``uint8 [stop-start, Σ bytes]`` of tokens ``start:stop`` in
    program site order; sites the trace lacks (e.g. the head) are taken as dense. Returns the
    masks and the names of the sites assumed dense."""
    parts, dense = [], []
    n = stop - start
    for name, width in zip(program.site_names, program.sites.in_dim):
        nb = -(-int(width) // 8)
        if trace is not None and name in trace.masks:
            m = trace.masks[name][start:stop]
            if m.shape[1] != nb:
                raise ValueError(f"trace site {name} has {m.shape[1] * 8} bits per token; the program's matrix has "
                                 f"{width} inputs: trace and program come from different models")
            parts.append(np.ascontiguousarray(m, dtype=np.uint8))
        else:
            dense.append(name)
            parts.append(np.broadcast_to(dense_mask_row(int(width)), (n, nb)))
    return np.ascontiguousarray(np.concatenate(parts, axis=1)), dense


def dense_mask_row(width: int) -> np.ndarray:
    return np.packbits(np.ones(width, dtype=bool), bitorder="little")


def count_events(bits: np.ndarray, tb: CountTables) -> tuple[np.ndarray, np.ndarray]:
    """Events per tile and per route for every token of ``bits`` (numba)."""
    lo = np.concatenate([tb.tile_lo, tb.route_lo])
    hi = np.concatenate([tb.tile_hi, tb.route_hi])
    out = np.zeros((bits.shape[0], len(lo)), dtype=np.int64)
    range_counts(bits, lo, hi, out)
    return out[:, :len(tb.tile_lo)], out[:, len(tb.tile_lo):]


def run_kernels(bits: np.ndarray, tb: CountTables, n_layers: int, n_phases: int, keep_items: bool):
    """Both kernels over ``bits``: (tok_layer, item_tot, phase_cyc, tok_item or None)."""
    T = bits.shape[0]
    ev_t, ev_r = count_events(bits, tb)
    tok_layer = np.zeros((T, n_layers, N_ACTIONS))
    item_tot = np.zeros((len(tb.item_layer), N_ACTIONS))
    phase_cyc = np.zeros((T, n_phases))
    tok_item = np.zeros((T, len(tb.item_layer), N_ACTIONS) if keep_items else (0, 0, 0), dtype=np.float64)
    token_actions(ev_t, ev_r, tb.static_slot, tb.static_noc,
                  tb.t_item, tb.t_rows, tb.t_words, tb.t_slot, tb.t_cyc, tb.t_ptr, tb.t_psum_on, tb.t_psum_chip,
                  tb.t_psum_pairs,
                  tb.p_dst_item, tb.p_pairs, tb.p_slot, tb.p_cyc, tb.p_lat, tb.p_phase,
                  tb.r_src_item, tb.r_on, tb.r_chip, tb.r_lat0, tb.r_phase, tb.r_slot,
                  tb.slot_phase, tb.slot_stage, tb.core_item, tb.item_layer, tb.ppf, tb.header, tb.max_pairs,
                  tb.cyc_flit, tb.evgen_cyc, tok_layer, item_tot, phase_cyc, tok_item, keep_items)
    # a received partial sum also costs an add, an accumulator read and a write
    for arr in (tok_layer, item_tot) + ((tok_item,) if keep_items else ()):
        arr[..., [A_NEURON, A_SREAD, A_SWRITE]] += arr[..., [A_PSUM]]
    # the token-independent counts (element-wise work, dense transfers, accumulators), once per token
    item_tot += T * tb.static_counts
    static_layer = np.zeros((n_layers, N_ACTIONS))
    np.add.at(static_layer, tb.item_layer, tb.static_counts)
    tok_layer += static_layer
    if keep_items:
        tok_item += tb.static_counts
    return tok_layer, item_tot, phase_cyc, (tok_item if keep_items else None)


def run_numpy(bits: np.ndarray, tb: CountTables):
    """The same counting with the numpy twins only: (tok_layer, item_tot, phase_cyc, tok_item)."""
    lo = np.concatenate([tb.tile_lo, tb.route_lo])
    hi = np.concatenate([tb.tile_hi, tb.route_hi])
    ev = range_counts_numpy(bits, lo, hi)
    return token_actions_numpy(ev[:, :len(tb.tile_lo)], ev[:, len(tb.tile_lo):], tb)


# ------------------------------------------------------------------------------- simulate
def simulate(program, trace=None, arch=None, *, dense: bool = False, natural=None, binary_events: bool = False,
             per_core: bool | None = None, chunk: int = 256, n_tokens: int | None = None, fetch=None):
    """Count every action of every token of ``trace`` on ``program`` (see module docstring).

    ``dense=True`` (or ``trace=None``): every activation is an event (``n_tokens`` tokens, default 1).
    ``natural``: a trace of the same tokens at threshold 0, summarized beside the run.
    The dense baseline is always computed (one token: it does not depend on the data).
    ``binary_events``: price synaptic work as accumulates (spikes) instead of MACs.
    ``per_core``: keep token x core detail (default: when it stays under ~20M numbers).
    ``fetch``: a :class:`seneca_sim.fetch.FetchPlan` for the streamed matrices of the program
    (default ``demand``; ignored when every weight is on its core). The dense baseline streams
    every weight every token (``dense``); the natural one fetches on demand.
    """
    from seneca_sim.arch import default_arch
    from seneca_sim.fetch import FetchPlan, build_fetch_tables

    arch = default_arch() if arch is None else arch
    if str(program.meta.get("arch_fingerprint")) != arch.fingerprint():
        raise ValueError(f"program was compiled for arch {program.meta.get('arch')!r} "
                         f"({program.meta.get('arch_origin')}), not for {arch.origin}; recompile it for this chip")
    if trace is not None and not dense:
        known = set(program.site_names)
        extra = [s for s in trace.sites if s not in known]
        if extra:
            raise ValueError(f"trace has site(s) {extra[:3]} that program {program.meta['model']} does not map")
        T = int(trace.n_tokens)
    else:
        trace, T = None, int(n_tokens or 1)
    run = _Run(program, build_tables(program, arch, binary_events), build_fetch_tables(program, arch))
    plan = run.check_plan(fetch or FetchPlan("demand"), trace)
    keep = (T * len(run.tb.item_layer) * N_ACTIONS <= 20_000_000) if per_core is None else bool(per_core)
    tok_layer, item_tot, phase_cyc, tok_item, dense_sites = run.count(trace, T, plan, keep, chunk)
    dense_ref = run.reference(None, FetchPlan("dense"))
    natural_ref = run.reference(natural, FetchPlan("demand")) if natural is not None else None
    report = Report.from_counts(program=program, arch=arch, tables=run.tb, tok_layer=tok_layer, item_tot=item_tot,
                                phase_cycles=phase_cyc, tok_item=tok_item, dense=dense_ref, natural=natural_ref,
                                trace_name=getattr(trace, "model", "dense") if trace is not None else "dense",
                                assumed_dense_sites=dense_sites if trace is not None else [],
                                binary_events=binary_events)
    report.meta["fetch"] = plan.label if run.ft is not None else "on core"
    report.meta["streamed"] = list(program.meta.get("streamed", []))
    return report


class _Run:
    """One Program's counting: the kernels over chunks of tokens, then the streamed weights' fetches."""

    def __init__(self, program, tb: CountTables, ft):
        self.program, self.tb, self.ft = program, tb, ft
        self.L1 = int(program.meta["n_layer"]) + 1
        self.P = len(program.phases)

    def check_plan(self, plan, trace):
        if self.ft is None or plan.policy != "prefetch":
            return plan
        streamed = [self.program.site_names[s] for s in np.flatnonzero(np.asarray(self.program.sites.streamed))]
        missing = [s for s in streamed if s not in plan.predicted.masks]
        if missing:
            raise ValueError(f"the prefetch prediction has no site {missing[0]!r}, which the program streams")
        if trace is not None and int(plan.predicted.n_tokens) != int(trace.n_tokens):
            raise ValueError(f"the prediction covers {plan.predicted.n_tokens} tokens, the trace {trace.n_tokens}")
        return plan

    def count(self, trace, T: int, plan, keep: bool, chunk: int):
        tb, L1, P = self.tb, self.L1, self.P
        tok_layer = np.zeros((T, L1, N_ACTIONS))
        item_tot = np.zeros((len(tb.item_layer), N_ACTIONS))
        phase_cyc = np.zeros((T, P))
        tok_item = np.zeros((T, len(tb.item_layer), N_ACTIONS), dtype=np.float32) if keep else None
        dense_sites: list[str] = []
        free = None
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            bits, dense_sites = packed_masks(self.program, trace, a, b)
            tl, it, pc, ti = run_kernels(bits, tb, L1, P, keep)
            if self.ft is not None:
                free = self.fetch(plan, bits, a, b, tl, it, pc, ti, free)
            tok_layer[a:b], phase_cyc[a:b] = tl, pc
            item_tot += it
            if keep:
                tok_item[a:b] = ti
        return tok_layer, item_tot, phase_cyc, tok_item, dense_sites

    def reference(self, trace, plan) -> dict:
        """Per-token means of a baseline run (dense when ``trace`` is None): counts by action, energy, cycles."""
        T = 1 if trace is None else int(trace.n_tokens)
        tl, _, pc, _, _ = self.count(trace, T, plan, False, 256)
        counts = tl.sum(axis=(0, 1)) / T
        return {"counts": counts, "energy_pj": float(counts @ self.tb.energy),
                "latency_cycles": float(pc.sum() / T), "phase_cycles": pc.sum(axis=0) / T, "n_tokens": T}

    def fetch(self, plan, bits, a: int, b: int, tl, it, pc, ti, free):
        """Book the fetches of tokens ``a:b`` (energy, cycles, leakage) into the kernels' counts."""
        from seneca_sim.fetch import fetch_timeline, fetched_columns, per_chip_phase
        ft, tb = self.ft, self.tb
        ev_t, _ = count_events(bits, tb)
        pred_t = miss_t = None
        if plan.policy == "prefetch":
            pbits, _ = packed_masks(self.program, plan.predicted, a, b)
            pred_t, _ = count_events(pbits, tb)
            miss_t, _ = count_events(np.ascontiguousarray(bits & ~pbits), tb)
        dem, ahead = fetched_columns(plan, ft, ev_t, pred_t, miss_t)
        dem, ahead = dem * ft.col_bits, ahead * ft.col_bits
        items = tb.t_item[ft.tile]
        _book_columns(tl, it, ti, items, tb.item_layer, A_SHARED, dem + ahead)
        _book_columns(tl, it, ti, items, tb.item_layer, A_BUFW, (dem + ahead) / ft.word_bits)
        if plan.predictor_macs:  # priced as MACs with their weight reads, on the first streamed tile's core
            w = np.full((b - a, 1), float(plan.predictor_macs))
            for action, per in ((A_MAC, 1.0), (A_WREAD, float(np.mean(tb.t_words)))):
                _book_columns(tl, it, ti, items[:1], tb.item_layer, action, w * per)
        extra = np.zeros_like(pc)
        free = np.zeros(ft.n_chips) if free is None else free
        free = fetch_timeline(pc, per_chip_phase(dem, ft, self.P), per_chip_phase(ahead, ft, self.P),
                              ft.latency, ft.bandwidth, free, extra)
        pc += extra
        leak = np.repeat(extra.sum(axis=1, keepdims=True), len(tb.core_item), axis=1)  # every core, every cycle
        _book_columns(tl, it, ti, tb.core_item, tb.item_layer, A_LEAK, leak)
        return free


def _book_columns(tok_layer, item_tot, tok_item, items, item_layer, action: int, values: np.ndarray) -> None:
    """Add ``values [T, n]`` of ``action`` on ``items [n]`` to the three count arrays."""
    np.add.at(tok_layer[:, :, action], (slice(None), item_layer[items]), values)
    np.add.at(item_tot[:, action], items, values.sum(axis=0))
    if tok_item is not None and tok_item.size:
        np.add.at(tok_item[:, :, action], (slice(None), items), values)


def synthetic_trace(program, n_tokens: int, sparsity: float | dict = 0.6, seed: int = 0, name: str = "synthetic"):
    """An EventTrace of independent random events at the given sparsity per site (for benchmarks and
    tests; real traces come from ``rllm.events.trace``)."""
    from rllm.events import EventTrace

    rng = np.random.default_rng(seed)
    masks = {}
    for s, w in zip(program.site_names, program.sites.in_dim):
        sp = sparsity.get(s, 0.6) if isinstance(sparsity, dict) else sparsity
        masks[s] = np.packbits(rng.random((n_tokens, int(w))) >= sp, axis=1, bitorder="little")
    return EventTrace(model=name, sites=program.site_names, widths=tuple(int(w) for w in program.sites.in_dim),
                      n_tokens=n_tokens, masks=masks, thresholds={})


def mac_count(program) -> int:
    """Analytic dense matrix work of one token (Σ out x in)."""
    return int((program.sites.out_dim * program.sites.in_dim).sum())


__all__ = ["ACTIONS", "simulate", "build_tables", "CountTables", "range_counts", "range_counts_numpy",
           "token_actions", "token_actions_numpy", "run_kernels", "run_numpy", "packed_masks", "synthetic_trace",
           "action_energies", "flits_for_pairs", "mac_count"]
