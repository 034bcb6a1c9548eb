"""The compiled program: plain frozen data between ``compiler/`` and ``seneca_sim/``.

``compile(model, arch, schedule)`` maps an RWKV-4 shape onto a mesh of SENECA-like cores:
graph (:mod:`compiler.graph`) -> tiling per matrix (:mod:`compiler.tiling`) -> core numbering in
data-flow order -> placement and XY multicast routes (:mod:`compiler.placement`) -> a
:class:`Program`.

A Program is a handful of column tables (numpy arrays, one row per thing) plus a JSON-able
``meta`` dict; it saves to ``.npz`` or ``.json`` and loads back equal. Tables:

``sites``       one row per matrix (= activation site): layer, shape, phase, split, blocks, cost
``phases``      the per-token phases in execution order (name, layer, kind)
``cores``       position (chip, x, y and global gx, gy), layer, memory use by part
``tiles``       core, site, row range, column range, bytes: the weights each core holds
``owners``      core, site, row range: which core finalizes which output rows (and runs the
                element-wise work anchored on that matrix for those channels)
``routes``      one multicast per (site, producing core, column block): channel range, tree
                links, chip-crossing links, longest path; ``route_dests``: (route, core) rows
``psums``       partial-sum messages of by_inputs/grid tiles to the owners of their rows
``transfers``   dense value copies between element-wise stages (per phase, src -> dst core)
``elementwise`` per (phase, core): elements, NPE ops, compares, state/parameter words per token
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from compiler.graph import build_graph
from compiler.placement import chip_coords, chip_grid, improve_placement, initial_positions, route_stats
from compiler.tiling import EVENT_BUFFER_BYTES, CompileError, CostModel, Tiling, tile_bytes, tile_matrix

__all__ = ["Table", "Program", "ProgramError", "CompileError", "compile", "model_shape", "ZOO_SHAPES"]

PROGRAM_VERSION = 1

#: Zoo names the compiler accepts as shapes: (n_layer, n_embd, vocab_size); ffn_dim = 4 * n_embd.
ZOO_SHAPES = {
    "rwkv_tiny": (4, 256, 4096),
    "rwkv_169m": (12, 768, 50277),
    "rwkv_430m": (24, 1024, 50277),
    "rwkv_1b5": (24, 2048, 50277),
    "rwkv_3b": (32, 2560, 50277),
}
_ASSETS = Path(__file__).resolve().parents[1] / "rllm" / "assets"


class ProgramError(ValueError):
    """A Program that breaks one of its invariants (see :meth:`Program.check`)."""


# ------------------------------------------------------------------------------------ tables
class Table:
    """Named columns of equal length (read-only numpy arrays): a tiny frozen data frame."""

    __slots__ = ("_cols",)

    def __init__(self, **columns: Any):
        cols = {}
        n = None
        for k, v in columns.items():
            a = np.array(v)
            if a.ndim != 1:
                a = a.reshape(-1)
            if n is not None and len(a) != n:
                raise ValueError(f"column {k!r} has {len(a)} rows, expected {n}")
            n = len(a)
            a.setflags(write=False)
            cols[k] = a
        object.__setattr__(self, "_cols", cols)

    def __getstate__(self):  # pickling (process pools, Ray): the frozen __setattr__ is bypassed below
        return self._cols

    def __setstate__(self, cols):
        object.__setattr__(self, "_cols", cols)

    def __getattr__(self, name: str) -> np.ndarray:
        if name.startswith("__") or name == "_cols":  # not a column: no recursion before __setstate__
            raise AttributeError(name)
        try:
            return self._cols[name]
        except KeyError:
            raise AttributeError(f"no column {name!r}; columns: {list(self._cols)}") from None

    def __setattr__(self, name, value):
        raise AttributeError("Table is frozen")

    def __len__(self) -> int:
        return len(next(iter(self._cols.values()))) if self._cols else 0

    def __eq__(self, other) -> bool:
        return (isinstance(other, Table) and list(self._cols) == list(other._cols)
                and all(np.array_equal(a, other._cols[k]) for k, a in self._cols.items()))

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._cols)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({k: np.asarray(v) for k, v in self._cols.items()})

    def to_dict(self) -> dict[str, dict]:
        """``{"columns": {name: list}, "dtypes": {name: numpy dtype string}}`` (JSON-able)."""
        return {"columns": {k: v.tolist() for k, v in self._cols.items()},
                "dtypes": {k: v.dtype.str for k, v in self._cols.items()}}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Table":
        return Table(**{k: np.asarray(v, dtype=d["dtypes"][k]) for k, v in d["columns"].items()})


_TABLES = ("sites", "phases", "cores", "tiles", "owners", "routes", "route_dests", "psums", "transfers", "elementwise")


@dataclass(frozen=True, eq=False)
class Program:
    """A model mapped onto cores (see module docstring for the tables)."""

    meta: Mapping[str, Any]
    sites: Table
    phases: Table
    cores: Table
    tiles: Table
    owners: Table
    routes: Table
    route_dests: Table
    psums: Table
    transfers: Table
    elementwise: Table

    # --- shape ------------------------------------------------------------------------------
    @property
    def n_cores(self) -> int:
        return len(self.cores)

    @property
    def n_chips(self) -> int:
        return int(self.meta["n_chips"])

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(str(s) for s in self.sites.name)

    def site_index(self, site: str) -> int:
        names = self.site_names
        if site not in names:
            raise KeyError(f"no site {site!r} in this program; sites look like {names[0]!r}")
        return names.index(site)

    def route_dest_ptr(self) -> np.ndarray:
        """CSR pointer of ``route_dests`` (rows are sorted by route)."""
        return np.searchsorted(self.route_dests.route, np.arange(len(self.routes) + 1)).astype(np.int64)

    def core_tiles(self, core: int) -> list[dict]:
        """The tiles core ``core`` holds: site, row range, column range, bytes."""
        idx = np.flatnonzero(self.tiles.core == core)
        return [dict(site=self.site_names[self.tiles.site[i]], rows=(int(self.tiles.row0[i]), int(self.tiles.row1[i])),
                     cols=(int(self.tiles.col0[i]), int(self.tiles.col1[i])), bytes=int(self.tiles.bytes[i]))
                for i in idx]

    def site_routes(self, site: str) -> pd.DataFrame:
        """Multicast routes of ``site``: source core, channel range, destination cores, tree links."""
        s = self.site_index(site)
        ptr = self.route_dest_ptr()
        idx = np.flatnonzero(self.routes.site == s)
        df = self.routes.to_frame().iloc[idx].copy()
        df["dests"] = [self.route_dests.core[ptr[r]:ptr[r + 1]].tolist() for r in idx]
        return df

    # --- checks -----------------------------------------------------------------------------
    def check(self) -> "Program":
        """Verify the invariants; raise :class:`ProgramError` listing what is broken.

        * every weight element placed exactly once (tiles inside the matrix, no overlap, areas sum
          to the matrix size);
        * no core over its data memory, no two cores on one position;
        * every site's channels are each sent by exactly one route, and every route reaches exactly
          the cores holding the weight columns of its channels;
        * every output row of every matrix has exactly one owner.
        """
        problems: list[str] = []
        names = self.site_names
        t = self.tiles
        for s, name in enumerate(names):
            R, N = int(self.sites.out_dim[s]), int(self.sites.in_dim[s])
            idx = np.flatnonzero(t.site == s)
            r0, r1, c0, c1 = t.row0[idx], t.row1[idx], t.col0[idx], t.col1[idx]
            if ((r0 < 0) | (r1 > R) | (c0 < 0) | (c1 > N) | (r1 <= r0) | (c1 <= c0)).any():
                problems.append(f"{name}: a tile lies outside the {R}x{N} matrix or is empty")
            area = int(((r1 - r0) * (c1 - c0)).sum())
            if area != R * N:
                problems.append(f"{name}: tiles cover {area} weights, the matrix has {R * N}")
            over = ((r0[:, None] < r1[None, :]) & (r0[None, :] < r1[:, None])
                    & (c0[:, None] < c1[None, :]) & (c0[None, :] < c1[:, None]))
            np.fill_diagonal(over, False)
            if over.any():
                problems.append(f"{name}: {int(over.sum()) // 2} pairs of tiles overlap")
            o = np.flatnonzero(self.owners.site == s)
            rows = np.zeros(R + 1, dtype=np.int64)
            np.add.at(rows, self.owners.row0[o], 1)
            np.add.at(rows, self.owners.row1[o], -1)
            if (np.cumsum(rows)[:R] != 1).any():
                problems.append(f"{name}: not every output row has exactly one owner")
        mem = int(self.meta["data_memory_bytes"])
        over_mem = np.flatnonzero(self.cores.mem_bytes > mem)
        if over_mem.size:
            problems.append(f"cores {over_mem[:5].tolist()} use more than {mem} bytes of data memory "
                            f"(max {int(self.cores.mem_bytes.max())})")
        pos = self.cores.gx.astype(np.int64) * 1_000_003 + self.cores.gy
        if len(np.unique(pos)) != self.n_cores:
            problems.append("two cores share a mesh position")
        problems += self._check_routes()
        if problems:
            raise ProgramError(f"program for {self.meta.get('model')} is inconsistent: " + "; ".join(problems[:10]))
        return self

    def _check_routes(self) -> list[str]:
        problems = []
        ptr = self.route_dest_ptr()
        dests = self.route_dests.core
        r = self.routes
        for s, name in enumerate(self.site_names):
            N = int(self.sites.in_dim[s])
            cover = np.zeros(N + 1, dtype=np.int64)
            ri = np.flatnonzero(r.site == s)
            np.add.at(cover, r.ch0[ri], 1)
            np.add.at(cover, r.ch1[ri], -1)
            if (np.cumsum(cover)[:N] != 1).any():
                problems.append(f"{name}: routes do not send every input channel exactly once")
            ti = np.flatnonzero(self.tiles.site == s)
            c0, c1, cores = self.tiles.col0[ti], self.tiles.col1[ti], self.tiles.core[ti]
            for k in ri:
                a, b = int(r.ch0[k]), int(r.ch1[k])
                hit = (c0 < b) & (c1 > a)
                if not ((c0[hit] <= a) & (c1[hit] >= b)).all():
                    problems.append(f"{name}: route {k} (channels {a}..{b}) straddles a column block")
                got = dests[ptr[k]:ptr[k + 1]]
                if len(got) != len(set(got.tolist())) or set(got.tolist()) != set(cores[hit].tolist()):
                    problems.append(f"{name}: route {k} (channels {a}..{b}) reaches cores "
                                    f"{sorted(set(got.tolist()))[:6]}, the columns are held by "
                                    f"{sorted(set(cores[hit].tolist()))[:6]}")
                if len(problems) > 10:
                    return problems
        return problems

    # --- reporting --------------------------------------------------------------------------
    def traffic_estimate(self, density: float | None = None) -> dict[str, float]:
        """NoC flit-hops per token at input density ``density`` (default: the compile's expectation):
        events (multicast trees), partial sums, dense transfers; and the chip-crossing share."""
        ppf, hdr, mp = (int(self.meta[k]) for k in ("pairs_per_flit", "header_flits", "max_pairs_per_packet"))

        def flits(pairs):
            pairs = np.asarray(pairs, dtype=np.float64)
            return np.ceil(pairs / ppf) + np.ceil(pairs / mp) * hdr

        d = self.sites.density[self.routes.site] if density is None else np.full(len(self.routes), density)
        ev = flits(d * (self.routes.ch1 - self.routes.ch0))
        ps = flits(self.psums.pairs)
        tr = flits(self.transfers.pairs)
        return {
            "event_flit_hops": float(ev @ self.routes.links),
            "psum_flit_hops": float(ps @ self.psums.links),
            "transfer_flit_hops": float(tr @ self.transfers.links),
            "chip_flit_hops": float(ev @ self.routes.chip_links + ps @ self.psums.chip_links
                                    + tr @ self.transfers.chip_links),
        }

    def layer_table(self) -> pd.DataFrame:
        """Per matrix: layer, shape, split, blocks, cores, bytes, estimated energy per token."""
        df = self.sites.to_frame()
        per = self.tiles.to_frame().groupby("site").agg(cores=("core", "nunique"), weight_tiles=("core", "size"))
        df = df.join(per, how="left")
        return df[["name", "layer", "out_dim", "in_dim", "split", "n_row_blocks", "n_col_blocks", "cores",
                   "density", "est_energy_pj"]]

    def summary(self) -> dict[str, Any]:
        mem = self.cores.mem_bytes
        cap = int(self.meta["data_memory_bytes"])
        splits = pd.Series(self.sites.split).value_counts().to_dict()
        out = {
            "model": self.meta["model"], "arch": self.meta["arch"],
            "shape": (f"{self.meta['n_layer']}x{self.meta['n_embd']} (ffn {self.meta['ffn_dim']}, "
                      f"vocab {self.meta['vocab_size']})"),
            "cores": self.n_cores, "chips": self.n_chips,
            "cores_available": self.n_chips * int(self.meta["mesh_rows"]) * int(self.meta["mesh_cols"]),
            "weight_format": self.meta["weight_format"],
            "weight_bytes": int(self.cores.mem_weights.sum()),
            "memory_bytes": int(mem.sum()),
            "memory_use_mean": float(mem.mean() / cap), "memory_use_max": float(mem.max() / cap),
            "splits": {str(k): int(v) for k, v in splits.items()},
            "macs_per_token": int(self.meta["macs_per_token"]),
            "routes": len(self.routes),
            "mean_dests_per_route": float(np.mean(self.routes.n_dests)) if len(self.routes) else 0.0,
            "placement": self.meta["placement"],
        }
        out.update(self.traffic_estimate())
        return out

    # --- (de)serialization ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"meta": dict(self.meta), **{k: getattr(self, k).to_dict() for k in _TABLES}}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Program":
        return Program._build(d["meta"], {k: Table.from_dict(d[k]) for k in _TABLES})

    @staticmethod
    def _build(meta: Mapping[str, Any], tables: Mapping[str, Table]) -> "Program":
        meta = dict(meta)
        if meta.get("version") != PROGRAM_VERSION:
            raise ProgramError(f"program version {meta.get('version')} is not {PROGRAM_VERSION}; recompile it")
        return Program(meta=meta, **tables)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.json`` (plain lists) or ``.npz`` (arrays + JSON meta), atomically."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                if path.suffix == ".json":
                    f.write(json.dumps(self.to_dict()).encode())
                else:
                    arrays = {f"{k}/{c}": np.asarray(v) for k in _TABLES for c, v in getattr(self, k)._cols.items()}
                    np.savez_compressed(f, __meta__=np.frombuffer(json.dumps(dict(self.meta)).encode(), np.uint8),
                                        **arrays)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a program is an ordinary file
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> "Program":
        path = Path(path)
        try:
            if path.suffix == ".json":
                return Program.from_dict(json.loads(path.read_text()))
            z = np.load(path, allow_pickle=False)
            meta = json.loads(bytes(z["__meta__"]).decode())
            cols: dict[str, dict[str, np.ndarray]] = {k: {} for k in _TABLES}
            for key in z.files:
                if key != "__meta__":
                    table, col = key.split("/", 1)
                    cols[table][col] = z[key]
            return Program._build(meta, {k: Table(**v) for k, v in cols.items()})
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, ProgramError):
                raise
            raise ProgramError(f"{path}: not a program written by compiler ({e}); recompile") from None


# ----------------------------------------------------------------------------------- shapes
def model_shape(model: Any) -> tuple[str, int, int, int, int]:
    """(name, n_layer, n_embd, ffn_dim, vocab_size) of an RWKV model, an RWKVConfig, a zoo name
    (``rwkv_430m``), a shape string ``"24x1024"`` / ``"24x1024x50277"``, or a ``config.json`` path."""
    if hasattr(model, "config") and not isinstance(model, (str, os.PathLike)):
        model = model.config
    if all(hasattr(model, k) for k in ("n_layer", "n_embd", "ffn_dim", "vocab_size")):
        return (getattr(model, "name", "rwkv"), int(model.n_layer), int(model.n_embd), int(model.ffn_dim),
                int(model.vocab_size))
    if isinstance(model, Mapping):
        C = int(model["n_embd"])
        return (str(model.get("name", "rwkv")), int(model["n_layer"]), C, int(model.get("ffn_dim") or 4 * C),
                int(model["vocab_size"]))
    name = str(model)
    if name == "rwkv_tiny" and (_ASSETS / "rwkv_tiny" / "config.json").is_file():
        d = json.loads((_ASSETS / "rwkv_tiny" / "config.json").read_text())
        return model_shape({**d, "name": "rwkv_tiny"})
    if name in ZOO_SHAPES:
        L, C, V = ZOO_SHAPES[name]
        return name, L, C, 4 * C, V
    parts = name.lower().split("x")
    if len(parts) in (2, 3) and all(p.isdigit() for p in parts):
        L, C = int(parts[0]), int(parts[1])
        return name, L, C, 4 * C, int(parts[2]) if len(parts) == 3 else 50277
    p = Path(name)
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file():
        return model_shape({"name": p.parent.name, **json.loads(p.read_text())})
    raise ValueError(f"unknown model {name!r}: give a zoo name ({', '.join(ZOO_SHAPES)}), a shape like "
                     f"'24x1024' or '24x1024x50277', a config.json, or an RWKVConfig")


# --------------------------------------------------------------------------------- compile
def _site_density(sites, expected_sparsity, schedule) -> dict[str, float]:
    """Expected input density (1 - sparsity) per site: given, else the schedule's calibration
    sparsity (``Schedule.sparsity[site]["sparsity"]``), else 0.5."""
    sp = {s: 0.5 for s in sites}
    if expected_sparsity is None:
        for s, v in (getattr(schedule, "sparsity", None) or {}).items():
            if s in sp:
                # a measured 100% (a site silent on the calibration text) is priced as nearly silent
                sp[s] = min(float(v["sparsity"] if isinstance(v, Mapping) else v), 0.999)
    elif isinstance(expected_sparsity, Mapping):
        unknown = sorted(set(expected_sparsity) - set(sites))
        if unknown:
            raise ValueError(f"expected_sparsity names unknown site(s) {unknown[:3]}")
        sp.update({s: float(v) for s, v in expected_sparsity.items()})
    else:
        sp = {s: float(expected_sparsity) for s in sites}
    for s, v in sp.items():
        if not 0.0 <= v < 1.0:
            raise ValueError(f"expected sparsity of {s} must be in [0, 1), got {v}")
    return {s: max(1.0 - v, 1e-3) for s, v in sp.items()}


def _schedule_info(schedule, sites) -> str:
    """Check the schedule's sites against the model's; describe it for the Program's meta."""
    if schedule is None:
        return "none"
    th = getattr(schedule, "thresholds", schedule)
    if isinstance(th, Mapping):
        unknown = sorted(set(th) - set(sites) - {"head"})
        if unknown:
            raise ValueError(f"schedule names site(s) {unknown[:3]} that this model does not have; "
                             f"sites look like {sites[0]!r}")
    return f"{getattr(schedule, 'algorithm', type(schedule).__name__)} ({getattr(schedule, 'model', '?')})"


@dataclass(frozen=True)
class _Job:
    """What the compile of one model on one chip works from (derived once from the arguments)."""

    arch: Any
    name: str
    shape: tuple[int, int, int, int]       # n_layer, n_embd, ffn_dim, vocab_size
    fmt: Any                               # weight NumberFormat
    state_fmt: Any
    value_bytes: int
    graph: Any
    density: dict
    sched: str
    cost: CostModel
    mem: int
    anchor_b: tuple[int, ...]              # per matrix: anchored neuron bytes per owned row
    split: str
    objective: str

    @staticmethod
    def make(model, arch, schedule, weight_format, include_head, expected_sparsity, split, objective) -> "_Job":
        name, L, C, F, V = model_shape(model)
        fmt = arch.fmt(weight_format)
        state_fmt = arch.fmt(arch.core.state_format)
        value_bytes = max(1, state_fmt.bits // 8)
        graph = build_graph(L, C, F, V, include_head=include_head, value_bytes=value_bytes)
        return _Job(arch=arch, name=name, shape=(L, C, F, V), fmt=fmt, state_fmt=state_fmt, value_bytes=value_bytes,
                    graph=graph, density=_site_density(graph.sites, expected_sparsity, schedule),
                    sched=_schedule_info(schedule, graph.sites), cost=CostModel.from_arch(arch, fmt.name),
                    mem=int(arch.core.data_memory_bytes),
                    anchor_b=tuple(graph.anchor_bytes_per_row(m.name, value_bytes) for m in graph.matvecs),
                    split=split, objective=objective)

    def tile(self, s: int, stream_columns: int = 0) -> Tiling:
        """The tiling of matrix ``s``, its weights on the cores or (``stream_columns``) streamed."""
        m = self.graph.matvecs[s]
        return tile_matrix(m.name, m.out_dim, m.in_dim, mem_bytes=self.mem, weight_bits=self.fmt.bits,
                           acc_bytes=self.value_bytes, anchor_bytes=self.anchor_b[s], cost=self.cost,
                           density=self.density[m.name], split=self.split, objective=self.objective,
                           stream_columns=stream_columns)


def compile(model: Any, arch: Any = None, schedule: Any = None, *, weight_format: str | None = None,
            include_head: bool = True, expected_sparsity: float | Mapping[str, float] | None = None, split: str = "auto",
            objective: str = "energy", chips: int | None = None, improve: bool = True,
            proposals_per_core: int = 8, seed: int = 0) -> Program:  # noqa: A001 (the stage's name in DESIGN.md)
    """Map an RWKV-4 model (weights are not needed: its shape is) onto the chip ``arch``.

    ``schedule``: the threshold schedule (its site names are checked; thresholds only matter for
    traces). ``expected_sparsity``: per site or global, prices the split choice and weights the
    placement (default: the schedule's calibration sparsity per site, else 0.5). ``split``:
    ``"auto"`` or force ``"by_outputs"``/``"by_inputs"``/``"grid"``.
    ``chips``: number of chips (default: as many as every weight on the cores needs, at most
    ``arch.chip.max_chips``). When the model does not fit ``chips`` chips, the matrices whose
    weights cost least to stream are streamed from each chip's shared memory into small buffers
    on their cores instead (:func:`compiler.residency.choose_residency`; the arch needs a
    ``[shared_memory]``). Raises :class:`CompileError` when the model does not fit even so.
    """
    from compiler.residency import choose_residency, check_shared_capacity
    from seneca_sim.arch import default_arch

    job = _Job.make(model, default_arch() if arch is None else arch, schedule, weight_format, include_head,
                    expected_sparsity, split, objective)
    tilings, streamed, n_chips = choose_residency(job, chips)
    lay = _layout(job, tilings, streamed)
    comm = _communication(job, tilings, lay)
    place = _place(job, tilings, lay, comm, n_chips, improve, proposals_per_core, seed)
    check_shared_capacity(job, lay, place, streamed)
    return _assemble(job, tilings, streamed, lay, comm, place).check()


@dataclass
class _Layout:
    """Cores in data-flow order: the tiles each holds, the rows it owns, its memory by part."""

    tile_rows: dict
    owners: dict
    core_parts: np.ndarray       # [n_cores, 4]: weights (or stream buffer), accumulators, neurons, buffers
    core_streamed: np.ndarray    # [n_cores] bytes of weights the core streams from the shared memory
    core_layer: np.ndarray
    tile_core: list              # per matrix: [n_r, n_c] core ids

    def owners_of(self, s: int):
        o = np.flatnonzero(self.owners["site"] == s)
        o = o[np.argsort(self.owners["row0"][o])]
        return self.owners["core"][o], self.owners["row0"][o], self.owners["row1"][o]


def _layout(job: _Job, tilings: list[Tiling], streamed: list[bool]) -> _Layout:
    n_cores = sum(t.n_tiles for t in tilings)
    tile_rows: dict[str, list] = {k: [] for k in ("core", "site", "row0", "row1", "col0", "col1", "bytes", "streamed")}
    owner_rows: dict[str, list] = {k: [] for k in ("site", "core", "row0", "row1")}
    parts = np.zeros((n_cores, 4), dtype=np.int64)
    core_streamed = np.zeros(n_cores, dtype=np.int64)
    core_layer = np.zeros(n_cores, dtype=np.int64)
    tile_core, core, bits = [], 0, job.fmt.bits
    buf_cols = int(job.arch.shared.stream_buffer_columns) if any(streamed) else 0
    for s, (m, t) in enumerate(zip(job.graph.matvecs, tilings)):
        ids = np.arange(core, core + t.n_tiles).reshape(t.n_row_blocks, t.n_col_blocks)
        tile_core.append(ids)
        for k in range(t.n_row_blocks):
            r0, r1 = t.row_bounds[k], t.row_bounds[k + 1]
            for j in range(t.n_col_blocks):
                c0, c1 = t.col_bounds[j], t.col_bounds[j + 1]
                o0, o1, cid = *t.owned_rows(k, j), ids[k, j]
                held = min(buf_cols, c1 - c0) if streamed[s] else c1 - c0  # weight columns in local memory
                parts[cid] = (-(-(r1 - r0) * held * bits // 8), (r1 - r0) * job.value_bytes,
                              (o1 - o0) * job.anchor_b[s], EVENT_BUFFER_BYTES)
                core_streamed[cid] = -(-(r1 - r0) * (c1 - c0) * bits // 8) if streamed[s] else 0
                core_layer[cid] = m.layer
                row = (cid, s, r0, r1, c0, c1,
                       tile_bytes(r1 - r0, held, o1 - o0, bits, job.value_bytes, job.anchor_b[s]), int(streamed[s]))
                for key, v in zip(tile_rows, row):
                    tile_rows[key].append(v)
                if o1 > o0:
                    for key, v in zip(owner_rows, (s, cid, o0, o1)):
                        owner_rows[key].append(v)
        core += t.n_tiles
    return _Layout(tile_rows, {k: np.asarray(v, dtype=np.int64) for k, v in owner_rows.items()}, parts,
                   core_streamed, core_layer, tile_core)


@dataclass
class _Comm:
    """Element-wise work, dense transfers, event routes and partial sums (row dicts of lists)."""

    ew: dict
    xf: dict
    rt: dict
    rdest: list
    ps: dict


def _communication(job: _Job, tilings: list[Tiling], lay: _Layout) -> _Comm:
    return _Comm(ew=_elementwise_rows(job, lay), xf=_transfer_rows(job, lay), ps=_psum_rows(tilings, lay),
                 **_route_rows(job, tilings, lay))


def _elementwise_rows(job: _Job, lay: _Layout) -> dict:
    g, site_idx = job.graph, {m.name: s for s, m in enumerate(job.graph.matvecs)}
    phase_idx = {p: i for i, p in enumerate(g.phases)}
    rows: dict[str, list] = {k: [] for k in ("phase", "layer", "core", "elems", "ops", "compares", "state_reads",
                                             "state_writes", "param_reads")}
    for e in g.elementwise:
        for c, a, b in zip(*lay.owners_of(site_idx[e.anchor])):
            n = int(b - a)
            for key, v in zip(rows, (phase_idx[e.phase], e.layer, c, n, n * e.ops, n * e.compares,
                                     n * e.state_reads, n * e.state_writes, n * e.param_reads)):
                rows[key].append(v)
    return rows


def _transfer_rows(job: _Job, lay: _Layout) -> dict:
    """Dense copies channel by channel from the owners of ``src`` rows to those of ``dst`` rows."""
    g, site_idx = job.graph, {m.name: s for s, m in enumerate(job.graph.matvecs)}
    phase_idx = {p: i for i, p in enumerate(g.phases)}
    xf: dict[str, list] = {k: [] for k in ("phase", "layer", "src", "dst", "pairs")}
    for t in g.transfers:
        sc, s0, s1 = lay.owners_of(site_idx[t.src])
        dc, d0, d1 = lay.owners_of(site_idx[t.dst])
        i = j = 0
        while i < len(sc) and j < len(dc):
            lo, hi = max(s0[i], d0[j]), min(s1[i], d1[j])
            if hi > lo and sc[i] != dc[j]:
                for key, v in zip(xf, (phase_idx[t.phase], g.matvec(t.dst).layer, sc[i], dc[j], hi - lo)):
                    xf[key].append(v)
            if s1[i] <= d1[j]:
                i += 1
            else:
                j += 1
    return xf


def _route_rows(job: _Job, tilings: list[Tiling], lay: _Layout) -> dict:
    """One multicast per (site, producing core, column block), to the tiles of that column block."""
    g, site_idx = job.graph, {m.name: s for s, m in enumerate(job.graph.matvecs)}
    phase_idx = {p: i for i, p in enumerate(g.phases)}
    rt: dict[str, list] = {k: [] for k in ("site", "src", "ch0", "ch1", "emit_phase")}
    rdest: list[np.ndarray] = []
    for s, (m, t) in enumerate(zip(g.matvecs, tilings)):
        prod = g.producer(m.name)
        cb = np.asarray(t.col_bounds)
        for c, a, b in zip(*lay.owners_of(site_idx[prod.anchor])):
            j0 = int(np.searchsorted(cb, a, side="right") - 1)
            j1 = int(np.searchsorted(cb, b, side="left"))
            for j in range(j0, j1):
                lo, hi = max(int(a), int(cb[j])), min(int(b), int(cb[j + 1]))
                if hi > lo:
                    for key, v in zip(rt, (s, c, lo, hi, phase_idx[prod.phase])):
                        rt[key].append(v)
                    rdest.append(lay.tile_core[s][:, j])
    return {"rt": rt, "rdest": rdest}


def _psum_rows(tilings: list[Tiling], lay: _Layout) -> dict:
    """Partial sums of tile (k, j) to the owner (k, j') of each of its row block's owned ranges."""
    ps: dict[str, list] = {k: [] for k in ("site", "src", "dst", "pairs")}
    for s, t in enumerate(tilings):
        if t.n_col_blocks == 1:
            continue
        for k in range(t.n_row_blocks):
            for j2 in range(t.n_col_blocks):
                o0, o1 = t.owned_rows(k, j2)
                if o1 <= o0:
                    continue
                for j in range(t.n_col_blocks):
                    if j != j2:
                        for key, v in zip(ps, (s, lay.tile_core[s][k, j], lay.tile_core[s][k, j2], o1 - o0)):
                            ps[key].append(v)
    return ps


@dataclass
class _Placement:
    gx: np.ndarray
    gy: np.ndarray
    chip: np.ndarray
    x: np.ndarray
    y: np.ndarray
    chips_x: int
    chips_y: int
    n_chips: int
    r_ptr: np.ndarray
    r_dst: np.ndarray
    stats: tuple                  # route_stats of routes, partial sums, transfers
    description: str
    cost_before: float | None
    cost_after: float | None


def _place(job: _Job, tilings, lay: _Layout, comm: _Comm, n_chips: int, improve: bool, proposals: int,
           seed: int) -> _Placement:
    """Layer-ordered fill, then swaps that lower the expected hop-weighted traffic (compiler.placement)."""
    arch, sites, density = job.arch, job.graph.sites, job.density
    n_cores = len(lay.core_layer)
    chips_x, chips_y = chip_grid(n_chips)
    mr, mc = int(arch.chip.mesh_rows), int(arch.chip.mesh_cols)
    gx, gy = initial_positions(n_cores, mr, mc, n_chips)
    rt, ps, xf = comm.rt, comm.ps, comm.xf
    r_src = np.asarray(rt["src"], dtype=np.int64)
    r_ptr = np.zeros(len(comm.rdest) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in comm.rdest], out=r_ptr[1:])
    r_dst = np.concatenate(comm.rdest).astype(np.int64) if comm.rdest else np.zeros(0, np.int64)
    p_src, p_dst = (np.asarray(ps[k], dtype=np.int64) for k in ("src", "dst"))
    x_src, x_dst = (np.asarray(xf[k], dtype=np.int64) for k in ("src", "dst"))
    fpp = job.cost.flits_per_pair
    w_event = np.array([density[sites[s]] for s in rt["site"]]) * (np.asarray(rt["ch1"]) - np.asarray(rt["ch0"])) * fpp
    p_act = np.array([1.0 - (1.0 - density[sites[s]]) ** (tilings[s].in_dim / tilings[s].n_col_blocks)
                      for s in ps["site"]])
    w_all = np.concatenate([w_event, p_act * np.asarray(ps["pairs"], dtype=np.float64) * fpp,
                            np.asarray(xf["pairs"], dtype=np.float64) * fpp])
    all_src = np.concatenate([r_src, p_src, x_src])
    all_ptr = np.concatenate([r_ptr, r_ptr[-1] + np.arange(1, len(p_src) + len(x_src) + 1)])
    all_dst = np.concatenate([r_dst, p_dst, x_dst])
    desc = "layer-ordered fill along a " + ("Hilbert curve" if mr == mc and mr & (mr - 1) == 0 else "serpentine")
    desc += " per chip, chips in serpentine order"
    before = after = None
    if improve and n_cores > 1 and len(all_src):
        e_hop, e_chip = arch.e("noc_hop_per_flit"), arch.e("inter_chip_per_flit")
        accepted, before, after = improve_placement(
            gx, gy, all_src, all_ptr, all_dst, w_all * e_hop, w_all * (e_chip - e_hop), lay.core_layer,
            mesh_w=mc, mesh_h=mr, proposals_per_core=proposals, seed=seed)
        desc += f"; {proposals} swap proposals per core within layers ({accepted} kept)"
    chip, x, y = chip_coords(gx, gy, mr, mc, chips_x)
    st = route_stats(gx, gy, all_src, all_ptr, all_dst, mc, mr, int(max(gx.max(), gy.max())) + 2)
    nr, npsum = len(r_src), len(p_src)
    return _Placement(gx, gy, chip, x, y, chips_x, chips_y, n_chips, r_ptr, r_dst,
                      (st[:nr], st[nr:nr + npsum], st[nr + npsum:]), desc, before, after)


def _meta(job: _Job, tilings, streamed, place: _Placement) -> dict:
    arch, (L, C, F, V) = job.arch, job.shape
    return {
        "version": PROGRAM_VERSION, "model": job.name, "n_layer": L, "n_embd": C, "ffn_dim": F, "vocab_size": V,
        "include_head": job.graph.include_head, "arch": arch.chip.name, "arch_origin": str(arch.origin),
        "arch_fingerprint": arch.fingerprint(), "weight_format": job.fmt.name, "weight_bits": job.fmt.bits,
        "value_bytes": job.value_bytes, "state_format": job.state_fmt.name, "data_memory_bytes": job.mem,
        "mesh_rows": int(arch.chip.mesh_rows), "mesh_cols": int(arch.chip.mesh_cols),
        "n_chips": place.n_chips, "chips_x": place.chips_x, "chips_y": place.chips_y, "split": job.split,
        "objective": job.objective, "schedule": job.sched, "placement": place.description,
        "placement_cost_before_pj": place.cost_before, "placement_cost_after_pj": place.cost_after,
        "macs_per_token": job.graph.macs_per_token(), "pairs_per_flit": arch.noc.pairs_per_flit,
        "header_flits": arch.noc.header_flits, "max_pairs_per_packet": arch.noc.max_pairs_per_packet,
        "streamed": [m.name for m, st in zip(job.graph.matvecs, streamed) if st],
        "tilings": [dict(matrix=t.matrix, split=t.split, n_row_blocks=t.n_row_blocks, n_col_blocks=t.n_col_blocks,
                         est_energy_pj=t.est_energy_pj, est_flit_hops=t.est_flit_hops, density=t.density,
                         alternatives=t.alternatives) for t in tilings],
    }


def _assemble(job: _Job, tilings, streamed, lay: _Layout, comm: _Comm, place: _Placement) -> Program:
    g, sites = job.graph, job.graph.sites
    phase_idx = {p: i for i, p in enumerate(g.phases)}
    i64 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    st_r, st_p, st_x = place.stats
    rt, ps, xf = comm.rt, comm.ps, comm.xf
    nr = len(rt["src"])
    return Program(
        meta=_meta(job, tilings, streamed, place),
        sites=Table(name=np.array(sites), layer=i64([m.layer for m in g.matvecs]),
                    out_dim=i64([m.out_dim for m in g.matvecs]), in_dim=i64([m.in_dim for m in g.matvecs]),
                    phase=i64([phase_idx[m.phase] for m in g.matvecs]),
                    emit_phase=i64([phase_idx[g.producer(m.name).phase] for m in g.matvecs]),
                    split=np.array([t.split for t in tilings]), n_row_blocks=i64([t.n_row_blocks for t in tilings]),
                    n_col_blocks=i64([t.n_col_blocks for t in tilings]),
                    density=np.array([job.density[s] for s in sites]),
                    est_energy_pj=np.array([t.est_energy_pj for t in tilings]), anchor_bytes_per_row=i64(job.anchor_b),
                    streamed=i64(streamed)),
        phases=Table(name=np.array(g.phases), layer=i64(g.phase_layer), kind=np.array(g.phase_kinds)),
        cores=Table(chip=i64(place.chip), x=i64(place.x), y=i64(place.y), gx=i64(place.gx), gy=i64(place.gy),
                    layer=lay.core_layer, mem_bytes=lay.core_parts.sum(axis=1), mem_weights=lay.core_parts[:, 0],
                    mem_accumulators=lay.core_parts[:, 1], mem_neurons=lay.core_parts[:, 2],
                    mem_buffers=lay.core_parts[:, 3], streamed_bytes=lay.core_streamed),
        tiles=Table(**{k: i64(v) for k, v in lay.tile_rows.items()}),
        owners=Table(**lay.owners),
        routes=Table(site=i64(rt["site"]), src=i64(rt["src"]), ch0=i64(rt["ch0"]), ch1=i64(rt["ch1"]),
                     emit_phase=i64(rt["emit_phase"]), n_dests=np.diff(place.r_ptr), links=st_r[:, 0],
                     chip_links=st_r[:, 1], max_hops=st_r[:, 2], max_chip_hops=st_r[:, 3]),
        route_dests=Table(route=np.repeat(np.arange(nr), np.diff(place.r_ptr)), core=place.r_dst),
        psums=Table(site=i64(ps["site"]), src=i64(ps["src"]), dst=i64(ps["dst"]), pairs=i64(ps["pairs"]),
                    links=st_p[:, 0], chip_links=st_p[:, 1]),
        transfers=Table(phase=i64(xf["phase"]), layer=i64(xf["layer"]), src=i64(xf["src"]), dst=i64(xf["dst"]),
                        pairs=i64(xf["pairs"]), links=st_x[:, 0], chip_links=st_x[:, 1]),
        elementwise=Table(**{k: i64(v) for k, v in comm.ew.items()}),
    )
