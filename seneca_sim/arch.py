"""The chip as data: load, validate and query a SENECA-like architecture description (TOML).

The shipped description is ``seneca_sim/seneca.toml``. Every number in it is a *figure*::

    mac = { value = 2.8, unit = "pJ", source = "tang2023, Table 8: ...", note = "..." }
    leakage_per_core = { value = 10, unit = "uW", assumed = true, rationale = "..." }

``load_arch(path=None)`` parses and validates the file and returns a frozen :class:`Arch` whose
figures are in canonical units (energy pJ, power pW = pJ/s, frequency Hz, time cycles, memory
bytes, widths bits, counts). Any problem (missing section or key, negative or non-finite value,
unknown unit, a figure with neither a source nor ``assumed = true``, a file that is not TOML)
raises one :class:`ArchError` whose one-line message names the file and the key and says what to do.

``energy_per_sop(arch, fmt, fanout, op)`` prices one event-driven synaptic operation the way the
simulator counts it (weight read + NPE multiply-accumulate + share of the per-event control cost),
the figure the SENECA paper quotes as about 2.8 pJ/SOP.

Command line: ``python -m seneca_sim.arch [FILE] [--markdown]`` validates FILE (default: the shipped
table) and prints its figures, or the Markdown table of figures and sources.
"""

from __future__ import annotations

import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

__all__ = [
    "ArchError",
    "Figure",
    "Energy",
    "NumberFormat",
    "ChipSpec",
    "CoreSpec",
    "NocSpec",
    "Arch",
    "DEFAULT_ARCH_PATH",
    "DEFAULT_FANOUT",
    "PUBLISHED_SOP_PJ",
    "PUBLISHED_SOP_CONFIG",
    "load_arch",
    "default_arch",
    "energy_per_sop",
    "sop_energy_breakdown",
    "figures_markdown",
    "dumps_toml",
]

DEFAULT_ARCH_PATH = Path(__file__).resolve().parent / "seneca.toml"

#: Default fan-out for :func:`energy_per_sop`: the number of output neurons (MACs) one incoming event
#: triggers on one core. 256 = a 256-output column slice of a weight tile; a 256 x 256 BF16 tile is
#: 128 KiB, half of the 256 KiB data memory, leaving room for state and buffers.
DEFAULT_FANOUT = 256

#: Energy per synaptic operation published for SENECA (Tang et al. 2023, abstract and Table 3),
#: "only mentioned for high-level comparison" (Table 3 footnote); from synthesis, not silicon.
PUBLISHED_SOP_PJ = 2.8

#: The configuration under which the sourced per-instruction figures reproduce 2.8 pJ/SOP: 8-bit
#: weights packed two per 16-bit load, binary (spike) events so each SOP is an accumulate, and the
#: default fan-out. This is our reading of the classic SNN "SOp"; the paper does not state its
#: configuration. A graded BF16 MAC (what RWKV needs) costs about 2.5x more; see energy_per_sop.
PUBLISHED_SOP_CONFIG = MappingProxyType({"fmt": "int8", "op": "acc", "fanout": DEFAULT_FANOUT})


class ArchError(ValueError):
    """A chip description that cannot be used; the message names the file, the key and the fix."""


# ------------------------------------------------------------------------------------------ units
# unit -> (dimension, factor to the canonical unit of that dimension)
_UNITS: dict[str, tuple[str, float]] = {
    # energy, canonical pJ
    "pJ": ("energy", 1.0),
    "fJ": ("energy", 1e-3),
    "nJ": ("energy", 1e3),
    "uJ": ("energy", 1e6),
    "J": ("energy", 1e12),
    # power, canonical pW (= pJ per second)
    "pW": ("power", 1.0),
    "nW": ("power", 1e3),
    "uW": ("power", 1e6),
    "µW": ("power", 1e6),
    "mW": ("power", 1e9),
    "W": ("power", 1e12),
    # frequency, canonical Hz
    "Hz": ("frequency", 1.0),
    "kHz": ("frequency", 1e3),
    "MHz": ("frequency", 1e6),
    "GHz": ("frequency", 1e9),
    # time, canonical cycles
    "cycles": ("time", 1.0),
    # memory size, canonical bytes
    "B": ("size", 1.0),
    "bytes": ("size", 1.0),
    "KiB": ("size", 1024.0),
    "MiB": ("size", 1024.0**2),
    "GiB": ("size", 1024.0**3),
    "Kibit": ("size", 1024.0 / 8),
    "Mibit": ("size", 1024.0**2 / 8),
    # widths, canonical bits
    "bits": ("width", 1.0),
    # counts
    "count": ("count", 1.0),
    "cores": ("count", 1.0),
    "chips": ("count", 1.0),
    "NPEs": ("count", 1.0),
    "flits": ("count", 1.0),
    "pairs": ("count", 1.0),
    # area (informational)
    "mm2": ("area", 1.0),
}
_CANONICAL = {
    "energy": "pJ",
    "power": "pW",
    "frequency": "Hz",
    "time": "cycles",
    "size": "bytes",
    "width": "bits",
    "count": "count",
    "area": "mm2",
}

# Required figures per section: key -> (dimension, must be an integer, must be > 0)
_REQUIRED: dict[str, dict[str, tuple[str, bool, bool]]] = {
    "chip": {
        "mesh_rows": ("count", True, True),
        "mesh_cols": ("count", True, True),
        "max_chips": ("count", True, True),
        "clock_hz": ("frequency", False, True),
    },
    "core": {
        "npe_count": ("count", True, True),
        "data_memory_bytes": ("size", True, True),
        "instruction_memory_bytes": ("size", True, True),
        "data_word_bits": ("width", True, True),
    },
    "noc": {
        "flit_bits": ("width", True, True),
        "header_flits": ("count", True, False),
        "pairs_per_flit": ("count", True, True),
        "max_flits_per_packet": ("count", True, True),
        "cycles_per_hop_per_flit": ("time", False, False),
        "router_latency_cycles": ("time", False, False),
        "inter_chip_latency_cycles": ("time", False, False),
    },
    "energy": {
        "event_ingest": ("energy", False, False),
        "weight_read_word": ("energy", False, False),
        "mac": ("energy", False, False),
        "acc": ("energy", False, False),
        "neuron_update": ("energy", False, False),
        "state_read_word": ("energy", False, False),
        "state_write_word": ("energy", False, False),
        "noc_hop_per_flit": ("energy", False, False),
        "inter_chip_per_flit": ("energy", False, False),
        "leakage_per_core": ("power", False, False),
    },
    "cycles": {
        "controller_cycles_per_event": ("time", False, False),
        "npe_cycles_per_instruction": ("time", False, False),
    },
}
# dimensions allowed for extra (not required) figures of a section
_EXTRA_DIMS = {"energy": {"energy", "power"}, "cycles": {"time"}}
_FIGURE_FIELDS = {"value", "unit", "source", "assumed", "rationale", "note"}
_SECTIONS = ("sources", "chip", "core", "formats", "noc", "energy", "cycles", "shared_memory")
# [shared_memory] is optional (a chip without one keeps every weight on the cores); its figures:
_SHARED = {"read_energy_per_bit": ("energy", False, False), "latency_cycles": ("time", False, False),
           "bandwidth_bits_per_cycle": ("width", False, True), "capacity_bytes": ("size", True, True),
           "stream_buffer_columns": ("count", True, True)}


# ---------------------------------------------------------------------------------------- classes
@dataclass(frozen=True)
class Figure:
    """One number of the chip description, in canonical units, with where it comes from.

    ``value``/``unit`` are canonical (pJ, pW, Hz, cycles, bytes, bits, count, mm2);
    ``raw_value``/``raw_unit`` are as written in the file (kept for round trips and reports).
    """

    value: float
    unit: str
    source: str = ""
    assumed: bool = False
    rationale: str = ""
    note: str = ""
    raw_value: float | int | None = None
    raw_unit: str | None = None

    def __float__(self) -> float:
        return float(self.value)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "value": self.raw_value if self.raw_value is not None else self.value,
            "unit": self.raw_unit if self.raw_unit is not None else self.unit,
        }
        if self.source:
            d["source"] = self.source
        if self.assumed:
            d["assumed"] = True
        if self.rationale:
            d["rationale"] = self.rationale
        if self.note:
            d["note"] = self.note
        return d


#: An energy (or power) entry of the table is a :class:`Figure`.
Energy = Figure


@dataclass(frozen=True)
class NumberFormat:
    """A number format the NPEs compute in: storage bits, lanes per NPE instruction, and the
    [energy] keys that price one MAC / one accumulate per element in this format."""

    name: str
    bits: int
    lanes: int
    mac: str
    acc: str
    source: str

    @property
    def bytes(self) -> float:
        return self.bits / 8

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "lanes": self.lanes, "mac": self.mac, "acc": self.acc, "source": self.source}


@dataclass(frozen=True)
class ChipSpec:
    name: str
    technology: str
    mesh_rows: int
    mesh_cols: int
    max_chips: int
    clock_hz: float

    @property
    def cores_per_chip(self) -> int:
        return self.mesh_rows * self.mesh_cols


@dataclass(frozen=True)
class CoreSpec:
    npe_count: int
    data_memory_bytes: int
    instruction_memory_bytes: int
    data_word_bits: int
    weight_format: str
    state_format: str


@dataclass(frozen=True)
class NocSpec:
    routing: str
    multicast: bool
    flit_bits: int
    header_flits: int
    pairs_per_flit: int
    max_flits_per_packet: int
    cycles_per_hop_per_flit: float
    router_latency_cycles: float
    inter_chip_latency_cycles: float

    @property
    def max_pairs_per_packet(self) -> int:
        return (self.max_flits_per_packet - self.header_flits) * self.pairs_per_flit

    def flits_for_pairs(self, pairs: int) -> int:
        """Flits needed to carry ``pairs`` (channel, value) pairs, split into as many packets as the
        per-packet flit limit requires (each packet has its own header)."""
        if pairs <= 0:
            return 0
        per_packet = self.max_pairs_per_packet
        packets = -(-pairs // per_packet)
        return packets * self.header_flits + -(-pairs // self.pairs_per_flit)


@dataclass(frozen=True)
class SharedMemorySpec:
    """A weight store shared by the cores of one chip (one per chip), and what streaming from it costs.

    ``read_energy_per_bit`` (pJ), ``latency_cycles`` (first word of a burst), ``bandwidth_bits_per_cycle``
    (the chip's one port, shared by its cores), ``capacity_bytes`` (per chip), ``stream_buffer_columns``
    (weight column slices a streamed tile buffers on its core: 2 = double buffering)."""

    technology: str
    read_energy_per_bit: float
    latency_cycles: float
    bandwidth_bits_per_cycle: float
    capacity_bytes: int
    stream_buffer_columns: int


@dataclass(frozen=True)
class Arch:
    """A validated chip description. Figures are in canonical units (see module docstring).

    ``energy`` and ``cycles`` map action names to :class:`Figure`; ``figures`` maps every figure of
    the file by dotted key (``"chip.clock_hz"``, ``"energy.mac"``...) for reports.
    """

    chip: ChipSpec
    core: CoreSpec
    noc: NocSpec
    energy: Mapping[str, Figure]
    cycles: Mapping[str, Figure]
    formats: Mapping[str, NumberFormat]
    sources: Mapping[str, Mapping[str, str]]
    figures: Mapping[str, Figure]
    shared: SharedMemorySpec | None = None
    origin: str = field(default="<dict>", compare=False)
    _raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # --- convenience accessors (canonical units) --------------------------------------------
    def e(self, action: str) -> float:
        """Energy of one ``action`` in pJ (power entries such as leakage are in pW)."""
        try:
            return float(self.energy[action].value)
        except KeyError:
            raise KeyError(f"no energy figure {action!r} in {self.origin}; known: {sorted(self.energy)}") from None

    def c(self, action: str) -> float:
        """Cycles of one ``action``."""
        try:
            return float(self.cycles[action].value)
        except KeyError:
            raise KeyError(f"no cycles figure {action!r} in {self.origin}; known: {sorted(self.cycles)}") from None

    def fmt(self, name: str | None = None) -> NumberFormat:
        """The :class:`NumberFormat` called ``name`` (default: the core's weight format)."""
        name = self.core.weight_format if name is None else name
        try:
            return self.formats[name]
        except KeyError:
            raise KeyError(f"unknown number format {name!r}; {self.origin} defines {sorted(self.formats)}") from None

    @property
    def cores_per_chip(self) -> int:
        return self.chip.cores_per_chip

    @property
    def clock_hz(self) -> float:
        return self.chip.clock_hz

    def bytes_per_element(self, fmt: str | None = None) -> float:
        return self.fmt(fmt).bytes

    def weights_per_word(self, fmt: str | None = None) -> float:
        """Elements of format ``fmt`` in one data-memory word (core.data_word_bits)."""
        return self.core.data_word_bits / self.fmt(fmt).bits

    def weight_read_pj(self, fmt: str | None = None) -> float:
        """Energy of reading one weight: its share of one data-memory word read."""
        return self.e("weight_read_word") * self.fmt(fmt).bits / self.core.data_word_bits

    def mac_pj(self, fmt: str | None = None) -> float:
        """Energy of one multiply-accumulate on an NPE, per element, in format ``fmt``."""
        return self.e(self.fmt(fmt).mac)

    def acc_pj(self, fmt: str | None = None) -> float:
        """Energy of one accumulate (binary event) on an NPE, per element, in format ``fmt``."""
        return self.e(self.fmt(fmt).acc)

    @property
    def leakage_pw_per_core(self) -> float:
        return self.e("leakage_per_core")

    @property
    def leakage_pj_per_cycle(self) -> float:
        """Static energy of one core during one clock cycle (pJ)."""
        return self.leakage_pw_per_core / self.chip.clock_hz

    def cycles_to_seconds(self, cycles: float) -> float:
        return cycles / self.chip.clock_hz

    def assumed_figures(self) -> dict[str, Figure]:
        return {k: f for k, f in self.figures.items() if f.assumed}

    # --- identity -------------------------------------------------------------------------------
    def __hash__(self) -> int:
        return hash((self.chip, self.core, self.noc, tuple(self.figures.items()), tuple(self.formats.items()),
                     tuple(sorted(self.sources))))

    def fingerprint(self) -> str:
        """Stable short hash of the description's content, for cache keys of downstream stages."""
        import hashlib
        import json

        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    # --- serialization ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The description as plain data (values and units as written); ``Arch.from_dict`` and
        ``dumps_toml`` turn it back into an equal Arch / a TOML file."""
        return _deep_copy(self._raw)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "<dict>") -> "Arch":
        return _build(data, origin)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(dumps_toml(self.to_dict()), encoding="utf-8")
        return path


# ------------------------------------------------------------------------------------- loading
def load_arch(path: str | Path | None = None) -> Arch:
    """Load and validate a chip description (default: the shipped ``seneca_sim/seneca.toml``)."""
    p = DEFAULT_ARCH_PATH if path is None else Path(path)
    name = str(p)
    try:
        text = p.read_bytes()
    except FileNotFoundError:
        raise ArchError(f"{name}: file not found; pass the path of a chip TOML file (or none for the shipped seneca.toml)") from None
    except IsADirectoryError:
        raise ArchError(f"{name}: is a directory; pass the path of a chip TOML file") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArchError(f"{name}: not a text file; pass a chip description in TOML (see seneca_sim/seneca.toml)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ArchError(f"{name}: not valid TOML ({exc}); fix the syntax (see seneca_sim/seneca.toml for the format)") from None
    return _build(data, name)


_DEFAULT: Arch | None = None


def default_arch() -> Arch:
    """The shipped description, loaded once."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_arch()
    return _DEFAULT


def _fail(origin: str, key: str, what: str) -> ArchError:
    return ArchError(f"{origin}: {key} {what}")


def _section(data: Mapping[str, Any], name: str, origin: str) -> Mapping[str, Any]:
    if name not in data:
        raise _fail(origin, f"[{name}]", "section is missing; add it (see seneca_sim/seneca.toml for its keys)")
    sec = data[name]
    if not isinstance(sec, Mapping):
        raise _fail(origin, f"[{name}]", "must be a table of keys; see seneca_sim/seneca.toml")
    return sec


def _figure(sec: Mapping[str, Any], section: str, key: str, origin: str, sources: Mapping[str, Any],
            dim: str | set[str], integer: bool = False, positive: bool = False) -> Figure:
    dotted = f"{section}.{key}"
    if key not in sec:
        raise _fail(origin, dotted, f'is missing; add `{key} = {{ value = ..., unit = "...", source = "..." }}` under [{section}]')
    raw = sec[key]
    if not isinstance(raw, Mapping):
        raise _fail(origin, dotted, f'must be a table {{ value, unit, source }} (got {raw!r}); write `{key} = {{ value = {raw!r}, unit = "...", source = "..." }}`')
    unknown = set(raw) - _FIGURE_FIELDS
    if unknown:
        raise _fail(origin, dotted, f"has unknown field(s) {sorted(unknown)}; allowed: {sorted(_FIGURE_FIELDS)}")
    if "value" not in raw:
        raise _fail(origin, dotted, "has no value; add value = <number>")
    value = raw["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(origin, dotted, f"value {value!r} is not a number; write a plain number")
    if not math.isfinite(value):
        raise _fail(origin, dotted, f"value {value!r} is not finite; write a finite number")
    if value < 0:
        raise _fail(origin, dotted, f"value {value!r} is negative; energies, cycles and sizes must be >= 0")
    if "unit" not in raw or not isinstance(raw["unit"], str):
        raise _fail(origin, dotted, 'has no unit; add unit = "..." (e.g. "pJ", "cycles", "bytes")')
    unit = raw["unit"]
    dims = {dim} if isinstance(dim, str) else dim
    want = ", ".join(u for u, (d, _) in _UNITS.items() if d in dims)
    if unit not in _UNITS:
        raise _fail(origin, dotted, f"has unknown unit {unit!r}; use one of {want}")
    udim, factor = _UNITS[unit]
    if udim not in dims:
        raise _fail(origin, dotted, f"has unit {unit!r} ({udim}); expected {'/'.join(sorted(dims))}: one of {want}")
    source = raw.get("source", "")
    assumed = raw.get("assumed", False)
    rationale = raw.get("rationale", "")
    note = raw.get("note", "")
    for fname, fval, typ in (("source", source, str), ("rationale", rationale, str), ("note", note, str), ("assumed", assumed, bool)):
        if not isinstance(fval, typ):
            raise _fail(origin, dotted, f"field {fname} must be a {typ.__name__} (got {fval!r})")
    if not source.strip() and not assumed:
        raise _fail(origin, dotted, 'has neither a source nor assumed = true; cite a source ("<id>, <table/section>") or mark it assumed = true with a rationale')
    if assumed and not rationale.strip():
        raise _fail(origin, dotted, 'is assumed = true but has no rationale; add rationale = "<one line: why this value>"')
    if source.strip():
        sid = source.split(",")[0].split(":")[0].strip()
        if sid not in sources:
            raise _fail(origin, dotted, f"cites unknown source {sid!r}; start the source with an id from [sources] ({', '.join(sorted(sources))}) or add [sources.{sid}]")
    canon = value * factor
    if integer:
        if abs(canon - round(canon)) > 1e-9:
            raise _fail(origin, dotted, f"must be a whole number of {_CANONICAL[udim]} (got {canon:g})")
        canon = int(round(canon))
    if positive and canon <= 0:
        raise _fail(origin, dotted, f"must be > 0 (got {value!r})")
    return Figure(value=canon, unit=_CANONICAL[udim], source=source, assumed=assumed, rationale=rationale,
                  note=note, raw_value=value, raw_unit=unit)


def _string(sec: Mapping[str, Any], section: str, key: str, origin: str, default: str | None = None) -> str:
    if key not in sec:
        if default is not None:
            return default
        raise _fail(origin, f"{section}.{key}", f'is missing; add {key} = "..." under [{section}]')
    val = sec[key]
    if not isinstance(val, str) or not val.strip():
        raise _fail(origin, f"{section}.{key}", f"must be a non-empty string (got {val!r})")
    return val


def _build(data: Mapping[str, Any], origin: str) -> Arch:
    """Validate a chip description section by section (each error names the key and the fix)."""
    _check_top(data, origin)
    sources = _sources(data, origin)
    figures: dict[str, Figure] = {}

    def fig(section: str, key: str, sec: Mapping[str, Any]) -> Figure:
        dim, integer, positive = _REQUIRED[section][key]
        f = _figure(sec, section, key, origin, sources, dim, integer, positive)
        figures[f"{section}.{key}"] = f
        return f

    chip = _chip(data, origin, sources, figures, fig)
    formats = _formats(data, origin)
    core = _core(data, origin, formats, fig)
    noc = _noc(data, origin, fig)
    tables = _tables(data, origin, sources, figures, fig, formats)
    shared = _shared_memory(data, origin, sources, figures)
    return Arch(chip=chip, core=core, noc=noc, energy=MappingProxyType(tables["energy"]),
                cycles=MappingProxyType(tables["cycles"]), formats=MappingProxyType(formats),
                sources=MappingProxyType(sources), figures=MappingProxyType(dict(sorted(figures.items()))),
                shared=shared, origin=origin, _raw=MappingProxyType(_deep_copy(data)))


def _check_top(data: Any, origin: str) -> None:
    if not isinstance(data, Mapping):
        raise ArchError(f"{origin}: top level must be a table; see seneca_sim/seneca.toml")
    unknown = set(data) - set(_SECTIONS) - {"schema_version"}
    if unknown:
        raise _fail(origin, f"[{sorted(unknown)[0]}]", f"is not a known section; known: {', '.join(_SECTIONS)}")
    sv = data.get("schema_version", 1)
    if sv != 1:
        raise _fail(origin, "schema_version", f"= {sv!r} is not supported; this loader reads schema_version = 1")


def _sources(data: Mapping[str, Any], origin: str) -> dict[str, Mapping[str, str]]:
    src_sec = _section(data, "sources", origin)
    if not src_sec:
        raise _fail(origin, "[sources]", 'is empty; add [sources.<id>] with citation = "..."')
    sources: dict[str, Mapping[str, str]] = {}
    for sid, entry in src_sec.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("citation"), str) or not entry["citation"].strip():
            raise _fail(origin, f"sources.{sid}", 'must be a table with citation = "<authors, title, venue, year>"')
        sources[sid] = MappingProxyType({k: str(v) for k, v in entry.items()})
    return sources


def _chip(data, origin, sources, figures, fig) -> ChipSpec:
    chip_sec = _section(data, "chip", origin)
    chip_figs = {k: fig("chip", k, chip_sec) for k in _REQUIRED["chip"]}
    for k, v in chip_sec.items():  # optional extra figures (e.g. core_area_mm2)
        if k not in _REQUIRED["chip"] and isinstance(v, Mapping):
            figures[f"chip.{k}"] = _figure(chip_sec, "chip", k, origin, sources, set(_CANONICAL))
    return ChipSpec(
        name=_string(chip_sec, "chip", "name", origin),
        technology=_string(chip_sec, "chip", "technology", origin, default="unspecified"),
        mesh_rows=chip_figs["mesh_rows"].value, mesh_cols=chip_figs["mesh_cols"].value,
        max_chips=chip_figs["max_chips"].value, clock_hz=float(chip_figs["clock_hz"].value))


def _formats(data, origin) -> dict[str, NumberFormat]:
    fmt_sec = _section(data, "formats", origin)
    if not fmt_sec:
        raise _fail(origin, "[formats]", "is empty; add at least [formats.bf16] with bits, lanes, mac, acc, source")
    formats: dict[str, NumberFormat] = {}
    for name, entry in fmt_sec.items():
        key = f"formats.{name}"
        if not isinstance(entry, Mapping):
            raise _fail(origin, key, "must be a table with bits, lanes, mac, acc, source")
        for req in ("bits", "lanes", "mac", "acc", "source"):
            if req not in entry:
                raise _fail(origin, f"{key}.{req}", f"is missing; add it under [{key}] (see [formats.bf16] in seneca_sim/seneca.toml)")
        for req in ("bits", "lanes"):
            v = entry[req]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise _fail(origin, f"{key}.{req}", f"must be a positive integer (got {v!r})")
        for req in ("mac", "acc", "source"):
            if not isinstance(entry[req], str) or not entry[req].strip():
                raise _fail(origin, f"{key}.{req}", f"must be a non-empty string (got {entry[req]!r})")
        formats[name] = NumberFormat(name=name, bits=entry["bits"], lanes=entry["lanes"], mac=entry["mac"],
                                     acc=entry["acc"], source=entry["source"])
    return formats


def _core(data, origin, formats, fig) -> CoreSpec:
    core_sec = _section(data, "core", origin)
    core_figs = {k: fig("core", k, core_sec) for k in _REQUIRED["core"]}
    weight_format = _string(core_sec, "core", "weight_format", origin)
    state_format = _string(core_sec, "core", "state_format", origin, default=weight_format)
    for k, v in (("weight_format", weight_format), ("state_format", state_format)):
        if v not in formats:
            raise _fail(origin, f"core.{k}", f"= {v!r} is not a format in [formats] ({', '.join(sorted(formats))}); add [formats.{v}] or pick one of them")
    word = core_figs["data_word_bits"].value
    for name, f in formats.items():
        if f.bits > word and f.bits % word:
            raise _fail(origin, f"formats.{name}.bits", f"= {f.bits} is not a multiple of core.data_word_bits")
    return CoreSpec(npe_count=core_figs["npe_count"].value, data_memory_bytes=core_figs["data_memory_bytes"].value,
                    instruction_memory_bytes=core_figs["instruction_memory_bytes"].value, data_word_bits=word,
                    weight_format=weight_format, state_format=state_format)


def _noc(data, origin, fig) -> NocSpec:
    noc_sec = _section(data, "noc", origin)
    noc_figs = {k: fig("noc", k, noc_sec) for k in _REQUIRED["noc"]}
    multicast = noc_sec.get("multicast", True)
    if not isinstance(multicast, bool):
        raise _fail(origin, "noc.multicast", f"must be true or false (got {multicast!r})")
    if noc_figs["max_flits_per_packet"].value <= noc_figs["header_flits"].value:
        raise _fail(origin, "noc.max_flits_per_packet", "must exceed noc.header_flits so a packet can carry a payload")
    return NocSpec(routing=_string(noc_sec, "noc", "routing", origin, default="xy"), multicast=multicast,
                   **{k: f.value for k, f in noc_figs.items()})


def _tables(data, origin, sources, figures, fig, formats) -> dict[str, dict[str, Figure]]:
    """[energy] and [cycles]: the required figures plus any extra ones; formats must price with energies."""
    tables: dict[str, dict[str, Figure]] = {}
    for section in ("energy", "cycles"):
        sec = _section(data, section, origin)
        out = {k: fig(section, k, sec) for k in _REQUIRED[section]}
        for k in sec:
            if k not in out:
                out[k] = _figure(sec, section, k, origin, sources, _EXTRA_DIMS[section])
                figures[f"{section}.{k}"] = out[k]
        tables[section] = out
    for name, f in formats.items():
        for op in ("mac", "acc"):
            ref = getattr(f, op)
            if ref not in tables["energy"]:
                raise _fail(origin, f"formats.{name}.{op}", f"= {ref!r} names no [energy] figure; add energy.{ref} or point to an existing key")
            if tables["energy"][ref].unit != "pJ":
                raise _fail(origin, f"formats.{name}.{op}", f"= {ref!r} is not an energy (pJ) figure")
    return tables


def _shared_memory(data: Mapping[str, Any], origin: str, sources, figures: dict) -> SharedMemorySpec | None:
    """The optional [shared_memory] section (None where the file has none)."""
    if "shared_memory" not in data:
        return None
    sec = _section(data, "shared_memory", origin)
    vals = {}
    for key, (dim, integer, positive) in _SHARED.items():
        f = _figure(sec, "shared_memory", key, origin, sources, dim, integer, positive)
        figures[f"shared_memory.{key}"] = f
        vals[key] = f.value
    extra = sorted(k for k in sec if k not in _SHARED and k != "technology")
    if extra:
        raise _fail(origin, f"shared_memory.{extra[0]}", f"is not a shared-memory figure; known: {', '.join(_SHARED)}")
    return SharedMemorySpec(technology=_string(sec, "shared_memory", "technology", origin), **vals)


def _deep_copy(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _deep_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_deep_copy(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------ the SOP
def sop_energy_breakdown(arch: Arch, fmt: str | None = None, fanout: float = DEFAULT_FANOUT,
                         op: str = "mac") -> dict[str, float]:
    """Energy (pJ) of one event-driven synaptic operation, by part, as the simulator counts it.

    - ``weight_read``: one weight of format ``fmt``, i.e. its share of one data-memory word read
      (``energy.weight_read_word`` x bits / ``core.data_word_bits``);
    - ``compute``: one multiply-accumulate (``op="mac"``, graded events) or one accumulate
      (``op="acc"``, binary events) on an NPE, per element of ``fmt``;
    - ``control``: the per-event controller cost (``energy.event_ingest``) shared by the ``fanout``
      synaptic operations the event triggers on that core (the output neurons of the tile the event
      reaches). Default fan-out: :data:`DEFAULT_FANOUT`.

    Neuron-state reads/writes are not included: with the state held in NPE registers across a group
    of events they are amortized away; the simulator counts them separately (state_read/write_word).
    """
    if op not in ("mac", "acc"):
        raise ValueError(f"op must be 'mac' or 'acc', got {op!r}")
    if not (fanout > 0 and math.isfinite(fanout)):
        raise ValueError(f"fanout must be a positive number of synaptic operations per event, got {fanout!r}")
    f = arch.fmt(fmt)
    return {
        "weight_read": arch.weight_read_pj(f.name),
        "compute": arch.mac_pj(f.name) if op == "mac" else arch.acc_pj(f.name),
        "control": arch.e("event_ingest") / fanout,
    }


def energy_per_sop(arch: Arch | None = None, fmt: str | None = None, fanout: float = DEFAULT_FANOUT,
                   op: str = "mac") -> float:
    """Energy (pJ) of one event-driven synaptic operation: weight read + NPE MAC (or accumulate)
    + the event's control cost amortized over ``fanout`` operations. See :func:`sop_energy_breakdown`.

    With the shipped table: BF16 graded MAC (RWKV's case) ~6.95 pJ; INT8 binary accumulate
    (:data:`PUBLISHED_SOP_CONFIG`) ~2.90 pJ, which matches the published ~2.8 pJ/SOP.
    """
    arch = default_arch() if arch is None else arch
    return sum(sop_energy_breakdown(arch, fmt, fanout, op).values())


# ------------------------------------------------------------------------------------ reports
def figures_markdown(arch: Arch | None = None) -> str:
    """Markdown table of every figure (key, value as written, canonical value, source or rationale)."""
    arch = default_arch() if arch is None else arch
    lines = ["| figure | value | canonical | source / rationale | assumed |", "|---|---|---|---|---|"]
    for key, f in arch.figures.items():
        raw = f"{_fmt_num(f.raw_value)} {f.raw_unit}"
        canon = f"{_fmt_num(f.value)} {f.unit}"
        text = f.rationale if f.assumed else f.source
        if f.note:
            text += f" ({f.note})"
        lines.append(f"| `{key}` | {raw} | {canon} | {text.replace('|', '/')} | {'**yes**' if f.assumed else 'no'} |")
    return "\n".join(lines)


def assumed_markdown(arch: Arch | None = None) -> str:
    """Markdown table of the figures marked ``assumed`` (no published source), with their rationale:
    the README's list is this table (``python -m seneca_sim.arch --assumed``)."""
    arch = default_arch() if arch is None else arch
    lines = ["| figure | assumed value | rationale |", "|---|---|---|"]
    for key, f in arch.assumed_figures().items():
        lines.append(f"| `{key}` | {_fmt_num(f.raw_value)} {f.raw_unit} | {f.rationale.replace('|', '/')} |")
    return "\n".join(lines)


def _fmt_num(x: Any) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    if isinstance(x, float):
        return f"{x:.6g}"
    return str(x)


# --------------------------------------------------------------------------------- TOML writer
def dumps_toml(data: Mapping[str, Any]) -> str:
    """Write a chip description dict (as returned by ``Arch.to_dict``) back to TOML text."""
    out: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    for k, v in scalars.items():
        out.append(f"{_key(k)} = {_value(v)}")
    for sec, body in data.items():
        if not isinstance(body, Mapping):
            continue
        nested = {k: v for k, v in body.items() if isinstance(v, Mapping) and not _is_figure(v)}
        flat = {k: v for k, v in body.items() if k not in nested}
        if flat or not nested:
            out.append("")
            out.append(f"[{_key(sec)}]")
            for k, v in flat.items():
                out.append(f"{_key(k)} = {_value(v)}")
        for sub, sbody in nested.items():
            out.append("")
            out.append(f"[{_key(sec)}.{_key(sub)}]")
            for k, v in sbody.items():
                out.append(f"{_key(k)} = {_value(v)}")
    return "\n".join(out).lstrip("\n") + "\n"


def _is_figure(v: Mapping[str, Any]) -> bool:
    return "value" in v


def _key(k: str) -> str:
    if k and all(ch.isalnum() or ch in "_-" for ch in k):
        return k
    return _string_lit(k)


def _string_lit(s: str) -> str:
    esc = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{esc}"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string_lit(v)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML: {v!r}")


# ---------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    markdown = "--markdown" in argv
    paths = [a for a in argv if not a.startswith("--")]
    try:
        arch = load_arch(paths[0] if paths else None)
    except ArchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if markdown:
        print(figures_markdown(arch))
        return 0
    if "--assumed" in argv:
        print(assumed_markdown(arch))
        return 0
    print(f"{arch.origin}: OK ({arch.chip.name}; {arch.cores_per_chip} cores/chip, {arch.core.npe_count} NPEs/core, "
          f"{arch.core.data_memory_bytes // 1024} KiB data memory, {arch.chip.clock_hz / 1e6:g} MHz)")
    for key, f in arch.figures.items():
        flag = "  [assumed]" if f.assumed else ""
        print(f"  {key:40s} {_fmt_num(f.value):>12s} {f.unit}{flag}")
    for fmt in arch.formats:
        for op in ("mac", "acc"):
            b = sop_energy_breakdown(arch, fmt, DEFAULT_FANOUT, op)
            parts = ", ".join(f"{k} {v:.3f}" for k, v in b.items())
            print(f"  energy_per_sop({fmt}, {op}, fanout={DEFAULT_FANOUT}) = {sum(b.values()):.3f} pJ  ({parts})")
    print(f"  published SENECA figure: {PUBLISHED_SOP_PJ} pJ/SOP")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
