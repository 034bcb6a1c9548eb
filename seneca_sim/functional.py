"""Functional simulator: the cores of a compiled Program actually compute, so the chip's logits
can be compared with the model's. It is the proof that compilation is complete.

``run_functional(program, weights, tokens, thresholds, fmt=...)`` loads every tile the Program
places into its core's local memory (taken from the model's state dict) and runs the tokens one by
one with carried state. Number formats of the mat-vec datapath (``fmt``):

* ``"float32"``: exact weights, float32 arithmetic (the check of the mapping alone);
* ``"bf16"``: the chip as the compiler and the energy table budget it (weights and
  ``state_format`` bfloat16): weights, the event values, every product and every accumulation
  (tiles, partial sums, the owners' reduction) are rounded to bfloat16, round to nearest even,
  exactly as torch's bfloat16 arithmetic rounds each operation;
* ``"bf16_weights"``: bfloat16 weights with float32 accumulation, to tell the weights' share of
  the error from the accumulators'.

The neuron work stays float32 in every format (it is not what this simulator checks):

* **neuron work** (embedding row, LayerNorms, token shift + time mixes, sigmoid, squared ReLU, the
  WKV update in the ``(aa, bb, pp)`` form, residual adds): vectorized numpy over the whole vector,
  float32, in the order ``rllm.model.RWKV.step`` writes it;
* **every mat-vec as events**: at each site the input is thresholded (an input fires when
  ``|x| >= t`` and ``x != 0``); each firing input ``(channel, value)`` is delivered to exactly the
  cores the Program's routes send that channel to; a core that holds a tile of the matrix with that
  column adds ``value x`` its weight column slice into its row accumulators (a numba kernel, with
  the plain numpy twin :func:`deliver_events_numpy`);
* **reduction**: every output row is finalized by its owner (``program.owners``): the owner's own
  accumulator plus the partial sums that ``program.psums`` says the other tiles of the row block
  send it. A row nobody owns stays NaN.

Nothing is repaired: a weight that is not placed, an event that is not routed, or a partial sum
that is not sent leaves the logits wrong. The simulator reads only the Program and the state dict;
it never calls the model. Per-core counts (events received, MACs, events sent, partial sums) come
back beside the logits to cross-check the counting simulator.

Reading the Program: ``psums`` rows carry (site, src, dst, pairs) but not which rows; a message
carries the sending tile's rows that the destination owns (``owners``). On a sound Program their
number equals ``pairs``; on a broken one whatever overlaps is sent, and nothing is patched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from numba import njit

__all__ = ["FORMATS", "FunctionalResult", "FunctionalChip", "load_chip", "run_functional", "to_bf16",
           "deliver_events", "deliver_events_numpy", "reduce_rows", "reduce_rows_numpy"]

FORMATS = ("float32", "bf16", "bf16_weights")
NEG_INF = -1e38  # empty WKV state, as rllm.wkv: exp() of it is 0


# ----------------------------------------------------------------------------- number formats
def to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bfloat16 (ties to even); returned as float32 holding bf16 values."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(x), x, rounded)  # a NaN's payload could round into infinity


# ------------------------------------------------------------------------------------ kernels
@njit(cache=True, inline="always")
def _bf16_bits(u):
    """The bits of the bfloat16 nearest the float32 with bits ``u`` (ties to even; NaN kept)."""
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return u
    return (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000


@njit(cache=True)
def deliver_events(ev_idx, ev_val, chan_ptr, chan_tile, tile_woff, tile_rows, tile_col0, tile_aoff,
                   weights, acc, tile_events, bf16):
    """Each event ``(ev_idx[e], ev_val[e])`` goes to the tiles ``chan_tile[chan_ptr[c]:chan_ptr[c+1]]``
    its channel is routed to; a tile adds ``value x`` its weight column into its accumulators
    (``bf16``: the product and the sum each rounded to bfloat16).

    Tile ``i`` stores its columns contiguously: column ``c`` is ``weights[tile_woff[i] + (c -
    tile_col0[i]) * tile_rows[i]:][:tile_rows[i]]``; its accumulators start at ``acc[tile_aoff[i]]``.
    ``tile_events[i]`` counts the events tile ``i`` received.
    """
    prod = np.zeros(1, np.float32)
    prod_bits, acc_bits = prod.view(np.uint32), acc.view(np.uint32)
    for e in range(ev_idx.shape[0]):
        c = ev_idx[e]
        v = ev_val[e]
        for k in range(chan_ptr[c], chan_ptr[c + 1]):
            i = chan_tile[k]
            R = tile_rows[i]
            w0 = tile_woff[i] + (c - tile_col0[i]) * R
            a0 = tile_aoff[i]
            if bf16:
                for r in range(R):
                    prod[0] = v * weights[w0 + r]
                    prod_bits[0] = _bf16_bits(prod_bits[0])
                    acc[a0 + r] += prod[0]
                    acc_bits[a0 + r] = _bf16_bits(acc_bits[a0 + r])
            else:
                for r in range(R):
                    acc[a0 + r] += v * weights[w0 + r]
            tile_events[i] += 1


def deliver_events_numpy(ev_idx, ev_val, chan_ptr, chan_tile, tile_woff, tile_rows, tile_col0, tile_aoff,
                         weights, acc, tile_events, bf16) -> None:
    """Plain-numpy twin of :func:`deliver_events` (the same float32 operations and roundings, in order)."""
    rnd = to_bf16 if bf16 else (lambda a: a)
    for c, v in zip(ev_idx.tolist(), ev_val):
        for i in chan_tile[chan_ptr[c]:chan_ptr[c + 1]].tolist():
            R = int(tile_rows[i])
            w0 = int(tile_woff[i]) + (c - int(tile_col0[i])) * R
            a0 = int(tile_aoff[i])
            acc[a0:a0 + R] = rnd(acc[a0:a0 + R] + rnd(v * weights[w0:w0 + R]))
            tile_events[i] += 1


@njit(cache=True)
def reduce_rows(acc, src, dst, out, bf16):
    """``out[dst[k]] += acc[src[k]]`` in order: owners add their own and received partial sums
    (``bf16``: each sum rounded to bfloat16)."""
    out_bits = out.view(np.uint32)
    for k in range(src.shape[0]):
        out[dst[k]] += acc[src[k]]
        if bf16:
            out_bits[dst[k]] = _bf16_bits(out_bits[dst[k]])


def reduce_rows_numpy(acc, src, dst, out, bf16) -> None:
    """Plain-numpy twin of :func:`reduce_rows`."""
    if not bf16:
        np.add.at(out, dst, acc[src])
        return
    for s, d in zip(src.tolist(), dst.tolist()):
        out[d:d + 1] = to_bf16(out[d:d + 1] + acc[s:s + 1])


# ------------------------------------------------------------------------- one matrix on cores
@dataclass(frozen=True)
class SiteImage:
    """One matrix as the chip holds it: its tiles' weights in local memories, where each input
    channel is delivered, and how owners reduce rows. Built by :func:`load_chip`."""

    name: str
    out_dim: int
    in_dim: int
    tile_core: np.ndarray    # [n] core of each tile
    tile_rows: np.ndarray    # [n] rows of each tile
    tile_row0: np.ndarray
    tile_col0: np.ndarray
    tile_woff: np.ndarray    # [n] offset of each tile's (column-major) block in ``weights``
    tile_aoff: np.ndarray    # [n] offset of each tile's accumulators in an accumulator vector
    weights: np.ndarray      # float32, all tiles' weights (bf16 values in the bf16 formats)
    n_acc: int
    chan_ptr: np.ndarray     # [in_dim + 1] CSR: channel -> tiles its events are delivered to
    chan_tile: np.ndarray
    red_src: np.ndarray      # accumulator index -> output row, in reduction order
    red_dst: np.ndarray
    unowned: np.ndarray      # output rows no core owns (stay NaN)
    route_src: np.ndarray    # per route: emitting core, channel range
    route_ch0: np.ndarray
    route_ch1: np.ndarray
    psum_tile: np.ndarray    # per partial-sum message: sending tile (-1: the core holds no tile), dst core, pairs
    psum_dst: np.ndarray
    psum_pairs: np.ndarray   # rows each message carries (derived; equals psums.pairs on a sound Program)


def _site_image(P, s: int, W: np.ndarray, fmt: str) -> SiteImage:
    tl = P.tiles
    ti = np.flatnonzero(tl.site == s)
    core, r0, r1, c0, c1 = (np.asarray(a[ti], dtype=np.int64) for a in (tl.core, tl.row0, tl.row1, tl.col0, tl.col1))
    R, N = int(P.sites.out_dim[s]), int(P.sites.in_dim[s])
    woff, weights, aoff = _local_memories(W, core, r0, r1, c0, c1, fmt)
    by_core: dict[int, list[int]] = {}
    for i, c in enumerate(core.tolist()):
        by_core.setdefault(c, []).append(i)
    chan_ptr, chan_tile = _delivery(P, s, N, c0, c1, by_core)
    red_src, red_dst, unowned, psum_tile, psum_rows = _reduction(P, s, R, r0, r1, aoff, by_core)
    rt = P.routes
    ri = np.flatnonzero(rt.site == s)
    return SiteImage(
        name=P.site_names[s], out_dim=R, in_dim=N, tile_core=core, tile_rows=r1 - r0, tile_row0=r0, tile_col0=c0,
        tile_woff=woff, tile_aoff=aoff, weights=weights, n_acc=int((r1 - r0).sum()), chan_ptr=chan_ptr,
        chan_tile=chan_tile, red_src=red_src, red_dst=red_dst, unowned=unowned,
        route_src=np.asarray(rt.src[ri], dtype=np.int64), route_ch0=np.asarray(rt.ch0[ri], dtype=np.int64),
        route_ch1=np.asarray(rt.ch1[ri], dtype=np.int64), psum_tile=psum_tile,
        psum_dst=np.asarray(P.psums.dst[np.flatnonzero(P.psums.site == s)], dtype=np.int64), psum_pairs=psum_rows)


def _local_memories(W, core, r0, r1, c0, c1, fmt: str):
    """Each tile's block of ``W``, column-major so an event reads one contiguous column slice:
    (offset of each block, all blocks, offset of each tile's accumulators)."""
    rows, cols = r1 - r0, c1 - c0
    sizes = rows * cols
    woff = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    weights = np.empty(int(sizes.sum()), dtype=np.float32)
    for i in range(len(core)):
        weights[woff[i]:woff[i] + sizes[i]] = W[r0[i]:r1[i], c0[i]:c1[i]].T.reshape(-1)
    if fmt != "float32":
        weights = to_bf16(weights)
    return woff, weights, np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)


def _delivery(P, s: int, N: int, c0, c1, by_core) -> tuple[np.ndarray, np.ndarray]:
    """CSR channel -> tiles: route r sends channels [ch0, ch1) to its destination cores; there,
    every tile of this matrix whose columns include the channel takes the event."""
    rt, ptr = P.routes, P.route_dest_ptr()
    pairs_c: list[np.ndarray] = []
    pairs_t: list[np.ndarray] = []
    for r in np.flatnonzero(rt.site == s):
        a, b = int(rt.ch0[r]), int(rt.ch1[r])
        for d in P.route_dests.core[ptr[r]:ptr[r + 1]].tolist():
            for i in by_core.get(int(d), ()):
                lo, hi = max(a, int(c0[i])), min(b, int(c1[i]))
                if hi > lo:
                    pairs_c.append(np.arange(lo, hi, dtype=np.int64))
                    pairs_t.append(np.full(hi - lo, i, dtype=np.int64))
    ch = np.concatenate(pairs_c) if pairs_c else np.zeros(0, np.int64)
    tt = np.concatenate(pairs_t) if pairs_t else np.zeros(0, np.int64)
    order = np.lexsort((tt, ch))
    return np.searchsorted(ch[order], np.arange(N + 1)).astype(np.int64), tt[order]


def _reduction(P, s: int, R: int, r0, r1, aoff, by_core):
    """How owners finalize rows: an owner of rows [o0, o1) adds its own tile's accumulators for
    them, then the partial sums it receives (from each psum message, the sender's rows it owns).
    Returns (accumulator index, output row) pairs in order, the rows nobody owns, and per message
    its sending tile (-1: none) and rows."""
    ow = P.owners
    owned = np.zeros(R, dtype=np.int64)
    red_src: list[np.ndarray] = []
    red_dst: list[np.ndarray] = []
    own_rows: dict[int, list[tuple[int, int]]] = {}

    def add(i, lo, hi):
        red_src.append(aoff[i] + np.arange(lo - r0[i], hi - r0[i]))
        red_dst.append(np.arange(lo, hi))

    for k in np.flatnonzero(ow.site == s):
        oc, o0, o1 = int(ow.core[k]), int(ow.row0[k]), int(ow.row1[k])
        owned[o0:o1] += 1
        own_rows.setdefault(oc, []).append((o0, o1))
        for i in by_core.get(oc, ()):
            lo, hi = max(o0, int(r0[i])), min(o1, int(r1[i]))
            if hi > lo:
                add(i, lo, hi)
    ps = P.psums
    pi = np.flatnonzero(ps.site == s)
    psum_tile = np.full(len(pi), -1, dtype=np.int64)
    psum_rows = np.zeros(len(pi), dtype=np.int64)
    for m, k in enumerate(pi):
        for i in by_core.get(int(ps.src[k]), ()):
            psum_tile[m] = i
            for o0, o1 in own_rows.get(int(ps.dst[k]), ()):
                lo, hi = max(o0, int(r0[i])), min(o1, int(r1[i]))
                if hi > lo:
                    add(i, lo, hi)
                    psum_rows[m] += hi - lo
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(red_src), cat(red_dst), np.flatnonzero(owned == 0), psum_tile, psum_rows


# ------------------------------------------------------------------------------- the results
@dataclass(frozen=True)
class FunctionalResult:
    """Logits and per-core counts of a functional run.

    ``logits [T, V]`` float32. Per token and site: ``events [T, n_sites]`` (inputs that fired),
    ``undelivered [T, n_sites]`` (fired inputs that reached no tile). Per token and core:
    ``events_in`` (one per event per destination tile, as the counting simulator's event_ingest),
    ``macs`` (events x rows of the tile), ``events_out`` (events the core emits on its routes),
    ``psums_in`` (partial sums received; a tile sends only when it received an event that token),
    ``psums_out`` (partial sums sent, on the sending core).
    ``masks[site]``: which inputs fired, bit-packed as in :class:`rllm.events.EventTrace`.
    """

    logits: np.ndarray
    site_names: tuple[str, ...]
    site_widths: np.ndarray
    events: np.ndarray
    undelivered: np.ndarray
    events_in: np.ndarray
    macs: np.ndarray
    events_out: np.ndarray
    psums_in: np.ndarray
    psums_out: np.ndarray
    masks: dict[str, np.ndarray]
    fmt: str

    @property
    def n_tokens(self) -> int:
        return int(self.logits.shape[0])

    def sparsity(self) -> pd.DataFrame:
        """Per site: events and the share of inputs that sent none."""
        ev = self.events.sum(axis=0)
        total = self.site_widths * self.n_tokens
        return pd.DataFrame({"site": list(self.site_names), "width": self.site_widths, "events": ev,
                             "total": total, "sparsity": 1.0 - ev / np.maximum(total, 1)})

    def to_trace(self, name: str = "functional", tokens: Sequence[int] | None = None):
        """The events the chip fired, as an :class:`rllm.events.EventTrace` (e.g. for the counting simulator)."""
        from rllm.events import EventTrace

        return EventTrace(model=name, sites=self.site_names, widths=tuple(int(w) for w in self.site_widths),
                          n_tokens=self.n_tokens, masks=dict(self.masks),
                          tokens=None if tokens is None else np.asarray(tokens, dtype=np.int32))

    def core_totals(self) -> pd.DataFrame:
        """Per core, summed over tokens: events received, MACs, events sent, partial sums received and sent."""
        return pd.DataFrame({"core": np.arange(self.events_in.shape[1]), "events_in": self.events_in.sum(0),
                             "macs": self.macs.sum(0), "events_out": self.events_out.sum(0),
                             "psums_in": self.psums_in.sum(0), "psums_out": self.psums_out.sum(0)})


# ---------------------------------------------------------------------------------- the chip
def _as_array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor: the state dict of the model (no torch import needed)
        v = v.detach().cpu().float().numpy()
    return np.asarray(v, dtype=np.float32)


class FunctionalChip:
    """A Program loaded with weights: per-site images, the neuron parameters, and the carried state.

    ``step(token)`` runs one token and returns its logits; ``reset()`` empties the state.
    ``kernel``: ``"numba"`` or ``"numpy"`` (the kernels' plain twins: slow, for tests). A Program
    compiled without the head leaves it to the host, which computes it densely in float32.
    LayerNorm epsilon: ``program.meta["layer_norm_eps"]`` if present, else RWKV-4's 1e-5.
    """

    def __init__(self, program, weights: Mapping[str, Any], fmt: str = "float32", kernel: str = "numba"):
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        if kernel not in ("numba", "numpy"):
            raise ValueError(f"kernel must be 'numba' or 'numpy', got {kernel!r}")
        m = program.meta
        self.program = program
        self.fmt = fmt
        self.bf16_acc = fmt == "bf16"
        state = str(program.meta.get("state_format", "bf16"))
        if self.bf16_acc and state != "bf16":
            raise ValueError(f"fmt='bf16' models bfloat16 accumulators, but the program keeps its state in {state}; "
                             "use fmt='bf16_weights' (float32 accumulation) or 'float32'")
        self.L, self.C, self.F, self.V = (int(m[k]) for k in ("n_layer", "n_embd", "ffn_dim", "vocab_size"))
        self.eps = float(m.get("layer_norm_eps", 1e-5))
        self._deliver = deliver_events if kernel == "numba" else deliver_events_numpy
        self._reduce = reduce_rows if kernel == "numba" else reduce_rows_numpy
        self.p = self._params(weights)
        self.site_names = program.site_names
        self.site_index = {s: i for i, s in enumerate(self.site_names)}
        self.images: dict[str, SiteImage] = {}
        for s, name in enumerate(self.site_names):
            W = self._matrix(weights, name, int(program.sites.out_dim[s]), int(program.sites.in_dim[s]))
            self.images[name] = _site_image(program, s, W, fmt)
        self.head_on_chip = "head" in self.images
        if not self.head_on_chip:  # the head runs on the host, densely
            self.head_weight = self._matrix(weights, "head", self.V, self.C)
        self.thresholds: dict[str, np.ndarray] = {}
        self.reset()
        self._counters()

    # --- loading ------------------------------------------------------------------------------
    def _matrix(self, weights, site: str, R: int, N: int) -> np.ndarray:
        key = f"{site}.weight"
        if key not in weights:
            raise KeyError(f"weights have no {key!r} (the matrix of site {site!r}); pass the model's state dict")
        W = _as_array(weights[key])
        if W.shape != (R, N):
            raise ValueError(f"{key} has shape {W.shape}, the program's matrix is {R}x{N}: weights and program "
                             f"come from different models")
        return W

    def _params(self, weights) -> dict[str, np.ndarray]:
        names = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias", "ln_out.weight", "ln_out.bias"]
        for i in range(self.L):
            b = f"blocks.{i}"
            names += [f"{b}.{ln}.{p}" for ln in ("ln1", "ln2") for p in ("weight", "bias")]
            names += [f"{b}.att.{p}" for p in ("time_decay", "time_first", "time_mix_k", "time_mix_v", "time_mix_r")]
            names += [f"{b}.ffn.{p}" for p in ("time_mix_k", "time_mix_r")]
        missing = [n for n in names if n not in weights]
        if missing:
            raise KeyError(f"weights lack {missing[:3]} ({len(missing)} in all); pass the model's state dict")
        p = {n: _as_array(weights[n]) for n in names}
        for n in names[1:]:
            p[n] = p[n].reshape(-1)  # BlinkDL keeps mixes as [1, 1, C]
        if p["emb.weight"].shape != (self.V, self.C):
            raise ValueError(f"emb.weight has shape {p['emb.weight'].shape}, the program expects ({self.V}, {self.C})")
        for i in range(self.L):
            p[f"blocks.{i}.att.w"] = -np.exp(p[f"blocks.{i}.att.time_decay"])
        return p

    def set_thresholds(self, thresholds: Any) -> None:
        """Threshold per site: a dict (or a Schedule with ``.thresholds``) of scalars or per-channel
        arrays; sites not named are 0 (only exact zeros are silent)."""
        th = getattr(thresholds, "thresholds", thresholds) or {}
        sites = set(self.site_names) | {"head"}
        unknown = sorted(set(th) - sites)
        if unknown:
            raise KeyError(f"thresholds name unknown site(s) {unknown[:3]}; sites look like {self.site_names[0]!r}")
        widths = dict(zip(self.site_names, (int(w) for w in self.program.sites.in_dim)))
        widths.setdefault("head", self.C)
        out = {}
        for name, t in th.items():
            t = _as_array(t)
            if t.ndim > 1 or (t.ndim == 1 and t.size != widths[name]):
                raise ValueError(f"threshold of {name} must be a scalar or have {widths[name]} values, got {t.shape}")
            if (~np.isfinite(t)).any() or (t < 0).any():
                raise ValueError(f"threshold of {name} must be finite and >= 0")
            out[name] = t
        self.thresholds = out

    def reset(self) -> None:
        L, C = self.L, self.C
        self.att_x = np.zeros((L, C), np.float32)
        self.ffn_x = np.zeros((L, C), np.float32)
        self.aa = np.zeros((L, C), np.float32)
        self.bb = np.zeros((L, C), np.float32)
        self.pp = np.full((L, C), NEG_INF, np.float32)

    # --- one mat-vec as events ------------------------------------------------------------------
    def _counters(self) -> None:
        n_cores, n_sites = self.program.n_cores, len(self.site_names)
        self.c_events = np.zeros(n_sites, np.int64)
        self.c_undelivered = np.zeros(n_sites, np.int64)
        self.c_in = np.zeros(n_cores, np.int64)
        self.c_macs = np.zeros(n_cores, np.int64)
        self.c_out = np.zeros(n_cores, np.int64)
        self.c_psum = np.zeros(n_cores, np.int64)
        self.c_psum_out = np.zeros(n_cores, np.int64)
        self.c_masks: dict[str, np.ndarray] = {}

    def matvec(self, site: str, x: np.ndarray) -> np.ndarray:
        """Threshold ``x`` at ``site``, send its events over the Program's routes, let the cores
        accumulate, and return the owners' reduced outputs (float32; NaN where no core owns a row)."""
        t = self.thresholds.get(site)
        fire = x != 0
        if t is not None:
            fire &= np.abs(x) >= t
        ev_idx = np.flatnonzero(fire)
        self.c_masks[site] = np.packbits(fire, bitorder="little")
        if site not in self.images:  # the head, off chip
            return self.head_weight[:, ev_idx] @ x[ev_idx]
        img = self.images[site]
        s = self.site_index[site]
        ev_val = np.ascontiguousarray(x[ev_idx], dtype=np.float32)
        if self.bf16_acc:  # an event carries its value in the state format
            ev_val = to_bf16(ev_val)
        acc = np.zeros(img.n_acc, np.float32)
        tile_ev = np.zeros(len(img.tile_rows), np.int64)
        self._deliver(ev_idx, ev_val, img.chan_ptr, img.chan_tile, img.tile_woff, img.tile_rows, img.tile_col0,
                      img.tile_aoff, img.weights, acc, tile_ev, self.bf16_acc)
        out = np.zeros(img.out_dim, np.float32)
        self._reduce(acc, img.red_src, img.red_dst, out, self.bf16_acc)
        out[img.unowned] = np.nan
        # counts
        self.c_events[s] += ev_idx.size
        self.c_undelivered[s] += int((img.chan_ptr[ev_idx + 1] == img.chan_ptr[ev_idx]).sum())
        np.add.at(self.c_in, img.tile_core, tile_ev)
        np.add.at(self.c_macs, img.tile_core, tile_ev * img.tile_rows)
        cs = np.concatenate([[0], np.cumsum(fire)])
        np.add.at(self.c_out, img.route_src, cs[img.route_ch1] - cs[img.route_ch0])
        sent = (img.psum_tile >= 0) & (tile_ev[np.maximum(img.psum_tile, 0)] > 0)
        np.add.at(self.c_psum, img.psum_dst, np.where(sent, img.psum_pairs, 0))
        np.add.at(self.c_psum_out, img.tile_core[img.psum_tile[sent]], img.psum_pairs[sent])
        return out

    # --- one token ------------------------------------------------------------------------------
    def _ln(self, x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(dtype=np.float32)
        d = x - mu
        var = (d * d).mean(dtype=np.float32)
        return d / np.sqrt(var + np.float32(self.eps)) * self.p[f"{name}.weight"] + self.p[f"{name}.bias"]

    def step(self, token: int) -> np.ndarray:
        """Run one token through the chip; returns its logits ``[V]`` and advances the state."""
        p, f32 = self.p, np.float32
        one = f32(1)
        sig = lambda z: one / (one + np.exp(-z))  # noqa: E731
        x = p["emb.weight"][int(token)].copy()  # the host writes the embedding row
        for i in range(self.L):
            b = f"blocks.{i}"
            if i == 0:
                x = self._ln(x, f"{b}.ln0")
            # time mix
            xa = self._ln(x, f"{b}.ln1")
            prev = self.att_x[i]
            mk, mv, mr = (p[f"{b}.att.time_mix_{c}"] for c in "kvr")
            k = self.matvec(f"{b}.att.key", xa * mk + prev * (one - mk))
            v = self.matvec(f"{b}.att.value", xa * mv + prev * (one - mv))
            r = sig(self.matvec(f"{b}.att.receptance", xa * mr + prev * (one - mr)))
            self.att_x[i] = xa
            # WKV: combine the state with the current token under the larger exponent, then decay and add
            aa, bb, pp = self.aa[i], self.bb[i], self.pp[i]
            ww = p[f"{b}.att.time_first"] + k
            q = np.maximum(pp, ww)
            e1, e2 = np.exp(pp - q), np.exp(ww - q)
            wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
            ww = pp + p[f"{b}.att.w"]
            q = np.maximum(ww, k)
            e1, e2 = np.exp(ww - q), np.exp(k - q)
            self.aa[i], self.bb[i], self.pp[i] = e1 * aa + e2 * v, e1 * bb + e2, q
            x = x + self.matvec(f"{b}.att.output", r * wkv)
            # channel mix
            xf = self._ln(x, f"{b}.ln2")
            prev = self.ffn_x[i]
            mk, mr = p[f"{b}.ffn.time_mix_k"], p[f"{b}.ffn.time_mix_r"]
            r = sig(self.matvec(f"{b}.ffn.receptance", xf * mr + prev * (one - mr)))
            k = np.square(np.maximum(self.matvec(f"{b}.ffn.key", xf * mk + prev * (one - mk)), f32(0)))
            self.ffn_x[i] = xf
            x = x + r * self.matvec(f"{b}.ffn.value", k)
        return self.matvec("head", self._ln(x, "ln_out"))

    def run(self, tokens: Sequence[int]) -> FunctionalResult:
        """Run ``tokens`` from the current state; logits and per-token counts."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.V):
            raise ValueError(f"token ids must be in [0, {self.V}), got {tokens.min()}..{tokens.max()}")
        T, n_cores, n_sites = tokens.size, self.program.n_cores, len(self.site_names)
        logits = np.zeros((T, self.V), np.float32)
        per = {k: np.zeros((T, n), np.int64) for k, n in (("events", n_sites), ("undelivered", n_sites),
                                                          ("in", n_cores), ("macs", n_cores), ("out", n_cores),
                                                          ("psum", n_cores), ("psum_out", n_cores))}
        masks = {s: np.zeros((T, -(-int(w) // 8)), np.uint8)
                 for s, w in zip(self.site_names, self.program.sites.in_dim)}
        for t, tok in enumerate(tokens.tolist()):
            self._counters()
            logits[t] = self.step(tok)
            for k, c in (("events", self.c_events), ("undelivered", self.c_undelivered), ("in", self.c_in),
                         ("macs", self.c_macs), ("out", self.c_out), ("psum", self.c_psum),
                         ("psum_out", self.c_psum_out)):
                per[k][t] = c
            for s, m in masks.items():
                m[t] = self.c_masks[s]
        return FunctionalResult(logits=logits, site_names=self.site_names,
                                site_widths=np.asarray(self.program.sites.in_dim, dtype=np.int64),
                                events=per["events"], undelivered=per["undelivered"], events_in=per["in"],
                                macs=per["macs"], events_out=per["out"], psums_in=per["psum"],
                                psums_out=per["psum_out"], masks=masks,
                                fmt=self.fmt)


def load_chip(program, weights: Mapping[str, Any], fmt: str = "float32", thresholds: Any = None,
              kernel: str = "numba") -> FunctionalChip:
    """Load every tile of ``program`` from the state dict ``weights`` into its core (format ``fmt``)."""
    chip = FunctionalChip(program, weights, fmt=fmt, kernel=kernel)
    chip.set_thresholds(thresholds)
    return chip


def run_functional(program, weights: Mapping[str, Any], tokens: Sequence[int], thresholds: Any = None,
                   arch: Any = None, fmt: str = "float32", kernel: str = "numba") -> FunctionalResult:
    """Run ``tokens`` (one stream) through the compiled chip from an empty state.

    ``weights``: the model's state dict (torch tensors or arrays, rllm parameter names).
    ``thresholds``: site -> scalar or per-channel threshold (or a Schedule); missing sites are 0.
    ``arch``: if given, must be the chip the program was compiled for. ``fmt``: ``"float32"``
    (exact), ``"bf16"`` (the mat-vec datapath in bfloat16: weights, values, products and
    accumulators) or ``"bf16_weights"`` (weights rounded to bfloat16, float32 accumulation).
    """
    if arch is not None and str(program.meta.get("arch_fingerprint")) != arch.fingerprint():
        raise ValueError(f"program was compiled for arch {program.meta.get('arch')!r} "
                         f"({program.meta.get('arch_origin')}), not for {arch.origin}; recompile it for this chip")
    return load_chip(program, weights, fmt=fmt, thresholds=thresholds, kernel=kernel).run(tokens)
