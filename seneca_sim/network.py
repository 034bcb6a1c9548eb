"""Packets on the chip's 2-D mesh network-on-chip, with link contention (a SimPy model).

The hardware modelled
---------------------
One router per core on a global 2-D mesh built from chips of ``cols x rows`` cores, the chips laid
out as a ``chips_x x chips_y`` grid. A router has a link to each of its four neighbours; a link
that crosses a chip boundary is an inter-chip link: it may take more cycles per flit than an
on-chip link (``inter_chip_cycles_per_flit``, its bandwidth), and every flit spends a further
``inter_chip_latency`` cycles in flight across it (its latency: the link is a pipeline, so that
time does not keep the link from the next flit). A core
talks to its router through an injection port (core -> router) and an ejection port (router ->
core). Each of these is a directed link that carries one packet at a time: a SimPy ``Resource`` of
capacity 1, served first come first served.

Routing is dimension order (XY): along x to the destination's column, then along y. A packet with
several destinations follows the XY multicast tree, the union of its XY routes. The union is a
tree because the XY route to any router on an XY route is a prefix of that route; the router where
routes diverge copies the packet onto each branch, so every link of the tree carries it once.

Flow control is virtual cut-through, timed per flit:

- a router forwards a packet's head onto the next link ``router_delay`` cycles after the head
  arrives, while the rest of the packet is still coming in (pipelined, as in wormhole routing);
  every flit takes ``router_delay`` through a router and ``cycles_per_flit`` of its link over a link;
- a link carries one packet at a time: it is granted to a packet at its head and freed when the
  tail has crossed. Flits go back to back unless they come in from a slower link, in which case the
  link waits for them; it transmits (is *busy*) exactly ``n_flits x cycles_per_flit`` per packet
  and is *held* from grant to tail;
- if the next link is taken, the router buffers the whole packet (SENECA packets are at most 9
  flits) and the link behind it is freed when the tail has crossed it: a blocked packet holds no
  links behind it. Buffers are unbounded, so contention shows up as queueing at links, never as
  back-pressure.

A packet *arrives* when its tail flit has crossed the ejection port into the destination core.
With no contention that time is :func:`analytic_latency`, a closed form (head latency plus the
slowest link's serialization); :func:`simulate_packets` adds the queueing at taken links. The
counting simulator (``seneca_sim.counting``) charges every message exactly this closed form for
the meshes ``mesh_from_arch`` builds (the tests check it route by route).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import simpy

Node = tuple[int, int]  # a router by its global mesh coordinates (x, y)
Address = tuple[int, int] | tuple[int, int, int]  # global (x, y), or (chip, x, y) inside a chip

INJECT, MESH, CHIP, EJECT = "inject", "mesh", "chip", "eject"  # kinds of link


@dataclass(frozen=True)
class Mesh:
    """The network as plain numbers: shape, timing (in clock cycles) and packet format.

    ``cycles_per_flit``: one flit over one on-chip router-to-router link.
    ``inter_chip_cycles_per_flit``: one flit over a link that crosses a chip boundary.
    ``inter_chip_latency``: cycles every flit spends in flight across a chip boundary, on top of
    the link's cycles per flit (pipelined: the link takes the next flit meanwhile).
    ``port_cycles_per_flit``: one flit over a core's injection or ejection port.
    ``router_delay``: cycles a router takes to forward a packet's head onto its next link.
    The packet format (``flit_bits``, ``header_flits``, ``pairs_per_flit``,
    ``max_flits_per_packet``) sizes packets in :func:`token_packets`; ``None`` as the maximum
    means packets of any length.
    """

    cols: int
    rows: int
    chips_x: int = 1
    chips_y: int = 1
    cycles_per_flit: float = 1.0
    inter_chip_cycles_per_flit: float = 1.0
    inter_chip_latency: float = 0.0
    port_cycles_per_flit: float = 1.0
    router_delay: float = 0.0
    flit_bits: int = 32
    header_flits: int = 1
    pairs_per_flit: int = 2
    max_flits_per_packet: int | None = 9

    def __post_init__(self) -> None:
        for name in ("cols", "rows", "chips_x", "chips_y", "flit_bits", "pairs_per_flit"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Mesh.{name} must be a positive integer (got {v!r})")
        for name in ("cycles_per_flit", "inter_chip_cycles_per_flit", "inter_chip_latency", "port_cycles_per_flit",
                     "router_delay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Mesh.{name} must be a finite number >= 0 cycles (got {v!r})")
        if not isinstance(self.header_flits, int) or self.header_flits < 0:
            raise ValueError(f"Mesh.header_flits must be an integer >= 0 (got {self.header_flits!r})")
        if self.max_flits_per_packet is not None and (
                not isinstance(self.max_flits_per_packet, int) or self.max_flits_per_packet <= self.header_flits):
            raise ValueError(f"Mesh.max_flits_per_packet must be an integer above header_flits={self.header_flits} "
                             f"so a packet can carry a payload, or None (got {self.max_flits_per_packet!r})")

    @property
    def width(self) -> int:
        """Routers along x, over all chips."""
        return self.cols * self.chips_x

    @property
    def height(self) -> int:
        """Routers along y, over all chips."""
        return self.rows * self.chips_y

    @property
    def n_chips(self) -> int:
        return self.chips_x * self.chips_y

    def node(self, address: Address) -> Node:
        """Global (x, y) of a router given as global (x, y) or as (chip, x, y); chips are numbered
        row by row over the chip grid (chip = chip_y * chips_x + chip_x)."""
        a = tuple(address)
        if len(a) == 2:
            x, y = int(a[0]), int(a[1])
            if not (0 <= x < self.width and 0 <= y < self.height):
                raise ValueError(f"router {address!r} is outside the {self.width}x{self.height} mesh")
            return (x, y)
        if len(a) == 3:
            chip, x, y = (int(v) for v in a)
            if not 0 <= chip < self.n_chips:
                raise ValueError(f"router {address!r}: chip {chip} does not exist ({self.n_chips} chips)")
            if not (0 <= x < self.cols and 0 <= y < self.rows):
                raise ValueError(f"router {address!r} is outside chip {chip}'s {self.cols}x{self.rows} mesh")
            return ((chip % self.chips_x) * self.cols + x, (chip // self.chips_x) * self.rows + y)
        raise ValueError(f"router address {address!r} must be (x, y) or (chip, x, y)")

    def chip_of(self, node: Node) -> int:
        return (node[1] // self.rows) * self.chips_x + node[0] // self.cols

    def link_latency(self, link: "Link") -> float:
        """Cycles in flight on ``link`` beyond its cycles per flit (the chip-crossing latency)."""
        return self.inter_chip_latency if link.kind == CHIP else 0.0

    def link_cycles(self, link: "Link") -> float:
        """Cycles one flit takes over ``link`` (its bandwidth; :meth:`link_latency` comes on top)."""
        if link.kind == MESH:
            return self.cycles_per_flit
        if link.kind == CHIP:
            return self.inter_chip_cycles_per_flit
        return self.port_cycles_per_flit

    def packet_flits(self, pairs: int) -> list[int]:
        """Flits of each packet that carries ``pairs`` (channel, value) pairs: as many packets as the
        per-packet limit needs, each with its own header (the rule of ``arch.NocSpec.flits_for_pairs``)."""
        if pairs <= 0:
            return []
        per_packet = pairs if self.max_flits_per_packet is None else \
            (self.max_flits_per_packet - self.header_flits) * self.pairs_per_flit
        full, rest = divmod(pairs, per_packet)
        sizes = [per_packet] * full + ([rest] if rest else [])
        return [self.header_flits + -(-p // self.pairs_per_flit) for p in sizes]


def mesh_from_arch(arch: Any, chips_x: int = 1, chips_y: int = 1) -> Mesh:
    """A :class:`Mesh` from a loaded chip description (``seneca_sim.arch.Arch``).

    The TOML's ``noc.inter_chip_latency_cycles`` is the latency of a chip crossing: every flit
    spends that many cycles in flight across a chip boundary, and the link itself runs at the
    on-chip rate (``cycles_per_hop_per_flit``), as do the ports.
    """
    noc, chip = arch.noc, arch.chip
    if chips_x * chips_y > chip.max_chips:
        raise ValueError(f"{chips_x}x{chips_y} chips exceed chip.max_chips = {chip.max_chips} of {arch.origin}")
    return Mesh(cols=int(chip.mesh_cols), rows=int(chip.mesh_rows), chips_x=chips_x, chips_y=chips_y,
                cycles_per_flit=float(noc.cycles_per_hop_per_flit),
                inter_chip_cycles_per_flit=float(noc.cycles_per_hop_per_flit),
                inter_chip_latency=float(noc.inter_chip_latency_cycles),
                port_cycles_per_flit=float(noc.cycles_per_hop_per_flit),
                router_delay=float(noc.router_latency_cycles),
                flit_bits=int(noc.flit_bits), header_flits=int(noc.header_flits),
                pairs_per_flit=int(noc.pairs_per_flit), max_flits_per_packet=int(noc.max_flits_per_packet))


# ------------------------------------------------------------------------------------ routes
class Link(NamedTuple):
    """A directed link: ``inject`` (core -> its router, frm == to), ``mesh`` (on-chip router to
    router), ``chip`` (router to router across a chip boundary) or ``eject`` (router -> its core)."""

    kind: str
    frm: Node
    to: Node


def _hop(mesh: Mesh, a: Node, b: Node) -> Link:
    return Link(MESH if mesh.chip_of(a) == mesh.chip_of(b) else CHIP, a, b)


def xy_route(src: Address, dst: Address, mesh: Mesh) -> list[Link]:
    """The router-to-router links from ``src`` to ``dst``, x first, then y (empty if they are the same router)."""
    return list(_xy(mesh, mesh.node(src), mesh.node(dst)))


def route_links(src: Address, dst: Address, mesh: Mesh) -> list[Link]:
    """Every link a packet crosses from core ``src`` to core ``dst``: injection port, XY route, ejection port."""
    s, d = mesh.node(src), mesh.node(dst)
    return [Link(INJECT, s, s), *_xy(mesh, s, d), Link(EJECT, d, d)]


@lru_cache(maxsize=1 << 16)  # traffic repeats source-destination pairs; routes are pure functions of them
def _xy(mesh: Mesh, src: Node, dst: Node) -> tuple[Link, ...]:
    (x, y), (dx, dy) = src, dst
    links = []
    while x != dx:
        nx = x + (1 if dx > x else -1)
        links.append(_hop(mesh, (x, y), (nx, y)))
        x = nx
    while y != dy:
        ny = y + (1 if dy > y else -1)
        links.append(_hop(mesh, (x, y), (x, ny)))
        y = ny
    return tuple(links)


def multicast_tree(src: Address, dsts: Iterable[Address], mesh: Mesh) -> dict[Link, list[Link]]:
    """The XY multicast tree as ``link -> links the packet is copied onto next``; the first key is
    the root (the source's injection port) and every link of the tree is a key exactly once."""
    tree: dict[Link, list[Link]] = {}
    for dst in dsts:
        path = route_links(src, dst, mesh)
        for parent, child in zip(path, path[1:]):
            tree.setdefault(parent, [])
            if child not in tree[parent]:
                tree[parent].append(child)
        tree.setdefault(path[-1], [])
    return tree


# ---------------------------------------------------------------------------------- timing
def analytic_latency(src: Address, dst: Address, n_flits: int, mesh: Mesh) -> float:
    """Cycles from injection at ``src`` to the tail's arrival in ``dst`` with no other traffic:
    the head crosses every link of the route and every router on it, and the other n_flits - 1
    flits follow one per cycles-per-flit of the slowest link::

        sum of the links' cycles per flit + chip crossings * inter_chip_latency
            + (hops + 1) * router_delay + (n_flits - 1) * slowest

    On one chip, with ports as fast as mesh links (``c``) and ``h`` hops, this is
    ``(h + 1)·router_delay + (h + 1 + n_flits)·c``.
    """
    _check_flits(n_flits)
    return _analytic(mesh, mesh.node(src), mesh.node(dst), n_flits)


@lru_cache(maxsize=1 << 16)
def _analytic(mesh: Mesh, src: Node, dst: Node, n_flits: int) -> float:
    links = route_links(src, dst, mesh)
    cycles = [mesh.link_cycles(link) for link in links]
    routers = len(cycles) - 1
    return (sum(cycles) + sum(mesh.link_latency(link) for link in links) + routers * mesh.router_delay
            + (n_flits - 1) * max(cycles))


def hops(src: Address, dst: Address, mesh: Mesh) -> int:
    """Router-to-router links (on-chip and inter-chip) on the XY route."""
    (x, y), (dx, dy) = mesh.node(src), mesh.node(dst)
    return abs(dx - x) + abs(dy - y)


def _check_flits(n_flits: int) -> None:
    if isinstance(n_flits, bool) or not isinstance(n_flits, (int, np.integer)) or n_flits < 1:
        raise ValueError(f"n_flits must be a positive integer (got {n_flits!r})")


# --------------------------------------------------------------------------------- packets
class Packet(NamedTuple):
    """One packet: injected at cycle ``inject`` by core ``src``, delivered to every core of ``dsts``."""

    inject: float
    src: Address
    dsts: tuple[Address, ...]
    n_flits: int


def token_packets(events: Sequence[int] | Mapping[Any, int],
                  routes: Sequence[tuple[Address, Sequence[Address]]] | Mapping[Any, tuple[Address, Sequence[Address]]],
                  mesh: Mesh, inject: float = 0.0) -> list[Packet]:
    """The packets of one token of one layer.

    ``routes[i]`` is (source core, destination cores) and ``events[i]`` the number of events
    ((channel, value) pairs) the source sends along it this token; mappings with the same keys work
    too. Each route's events go as few packets as the packet format allows, all injected at
    ``inject``; the source's injection port serialises them.
    """
    if isinstance(events, Mapping) != isinstance(routes, Mapping):
        raise TypeError("events and routes must both be sequences or both be mappings")
    if isinstance(events, Mapping):
        missing = set(events) - set(routes)
        if missing:
            raise KeyError(f"events for {sorted(map(str, missing))[:5]} have no route")
        pairs = [(events[k], routes[k]) for k in events]
    else:
        if len(events) != len(routes):
            raise ValueError(f"{len(events)} event counts for {len(routes)} routes")
        pairs = list(zip(events, routes))
    packets = []
    for count, (src, dsts) in pairs:
        if count < 0:
            raise ValueError(f"negative event count {count} for route from {src!r}")
        for n in mesh.packet_flits(int(count)):
            packets.append(Packet(inject, src, tuple(dsts), n))
    return packets


def program_mesh(program: Any, arch: Any = None) -> Mesh:
    """The :class:`Mesh` a compiled ``compiler.Program`` was placed on, timed by ``arch`` (default:
    the shipped chip description)."""
    from seneca_sim.arch import default_arch

    meta = program.meta
    mesh = mesh_from_arch(default_arch() if arch is None else arch, int(meta["chips_x"]), int(meta["chips_y"]))
    if (mesh.cols, mesh.rows) != (int(meta["mesh_cols"]), int(meta["mesh_rows"])):
        raise ValueError(f"the program was placed on {meta['mesh_cols']}x{meta['mesh_rows']}-core chips, the arch "
                         f"has {mesh.cols}x{mesh.rows}; pass the arch it was compiled for")
    return mesh


def packets_from_program(program: Any, trace: Any, token: int, *, phase: str | int | None = None,
                         inject: float = 0.0, mesh: Mesh | None = None) -> list[Packet]:
    """The packets of token ``token`` of ``trace`` (an ``rllm.EventTrace``) on ``program``'s cores.

    - events: per route (site, producing core, channel range), the channels of that range that
      fire this token, multicast to the route's destination cores;
    - partial sums: from a tile that received at least one event, its rows to their owner;
    - dense transfers between element-wise stages, every token.

    ``phase`` (a name of ``program.phases`` or its index) keeps only the packets sent in that
    phase: events in the phase that emits them, partial sums in their matrix's phase. Without it
    every phase's packets are injected together at ``inject``, an upper bound on contention.
    """
    mesh = program_mesh(program) if mesh is None else mesh
    if not 0 <= token < trace.n_tokens:
        raise IndexError(f"token {token} is outside the trace's {trace.n_tokens} tokens")
    names = program.site_names
    if isinstance(phase, str):
        phases = [str(p) for p in program.phases.name]
        if phase not in phases:
            raise KeyError(f"no phase {phase!r} in this program; phases look like {phases[:3]}")
        phase = phases.index(phase)
    node = [(int(x), int(y)) for x, y in zip(program.cores.gx, program.cores.gy)]
    fired: dict[int, np.ndarray] = {}

    def fires(site: int) -> np.ndarray:
        """The site's inputs that fire this token (bool per channel)."""
        if site not in fired:
            name, width = names[site], int(program.sites.in_dim[site])
            if name not in trace.masks:
                raise KeyError(f"the trace has no site {name!r} that the program routes; trace the model with it")
            if trace.width(name) != width:
                raise ValueError(f"site {name!r} is {trace.width(name)} wide in the trace, {width} in the program")
            fired[site] = np.unpackbits(trace.masks[name][token], bitorder="little")[:width].astype(bool)
        return fired[site]

    packets: list[Packet] = []
    r, ptr = program.routes, program.route_dest_ptr()
    for k in range(len(r)):
        if phase is not None and int(r.emit_phase[k]) != phase:
            continue
        events = int(fires(int(r.site[k]))[int(r.ch0[k]):int(r.ch1[k])].sum())
        dsts = tuple(node[c] for c in program.route_dests.core[ptr[k]:ptr[k + 1]])
        packets += [Packet(inject, node[int(r.src[k])], dsts, n) for n in mesh.packet_flits(events)]
    t, ps = program.tiles, program.psums
    for k in range(len(ps)):
        site, src = int(ps.site[k]), int(ps.src[k])
        if phase is not None and int(program.sites.phase[site]) != phase:
            continue
        tile = np.flatnonzero((t.site == site) & (t.core == src))[0]
        if fires(site)[int(t.col0[tile]):int(t.col1[tile])].any():
            packets += [Packet(inject, node[src], (node[int(ps.dst[k])],), n) for n in mesh.packet_flits(int(ps.pairs[k]))]
    x = program.transfers
    for k in range(len(x)):
        if phase is None or int(x.phase[k]) == phase:
            packets += [Packet(inject, node[int(x.src[k])], (node[int(x.dst[k])],), n)
                        for n in mesh.packet_flits(int(x.pairs[k]))]
    return packets


# ---------------------------------------------------------------------------- simulation
@dataclass(frozen=True)
class NetworkRun:
    """Result of :func:`simulate_packets`.

    ``deliveries``: one row per packet per destination (packet, src/dst chip and global x, y,
    n_flits, inject, arrive, latency, analytic, wait = latency - analytic, hops, chip_hops).
    ``links``: one row per link that carried traffic (kind, from/to x, y, packets, flits,
    busy_cycles = cycles transmitting flits, held_cycles = cycles granted to a packet, which exceed
    busy_cycles only where a slower link fed it, utilization = busy_cycles / makespan).
    ``makespan``: cycles from the first injection to the last arrival.
    """

    deliveries: pd.DataFrame
    links: pd.DataFrame
    makespan: float


class _Noc:
    """The routers' output links, created as traffic first needs them, and what each one carried."""

    def __init__(self, env: simpy.Environment, mesh: Mesh):
        self.env, self.mesh = env, mesh
        self.links: dict[Link, simpy.Resource] = {}
        self.carried: dict[Link, list[float]] = {}  # link -> [packets, flits, busy cycles, held cycles]

    def link(self, link: Link) -> simpy.Resource:
        if link not in self.links:
            self.links[link] = simpy.Resource(self.env, capacity=1)
            self.carried[link] = [0, 0, 0.0, 0.0]
        return self.links[link]


def _cross(env: simpy.Environment, noc: _Noc, pid: int, n_flits: int, tree: dict[Link, list[Link]],
           link: Link, head_ready: float, tail_ready: float, arrivals: dict[tuple[int, Node], float]):
    """A packet (or one branch of a multicast packet) crossing one link, then going on down the tree.

    ``head_ready`` / ``tail_ready``: cycles at which the packet's head / tail can start over this
    link (through the router, or out of the core for an injection port).
    """
    if head_ready > env.now:
        yield env.timeout(head_ready - env.now)
    c, r, lat = noc.mesh.link_cycles(link), noc.mesh.router_delay, noc.mesh.link_latency(link)
    with noc.link(link).request() as granted:
        yield granted
        # flits go back to back, unless the tail is still coming in over a slower link
        tail_sent = max(env.now + n_flits * c, tail_ready + c)
        head_across, tail_across = env.now + c + lat, tail_sent + lat  # in flight for lat more cycles
        for child in tree[link]:  # the head is forwarded while the tail is still on this link
            env.process(_cross(env, noc, pid, n_flits, tree, child, head_across + r, tail_across + r, arrivals))
        held_from = env.now
        yield env.timeout(tail_sent - env.now)  # the link takes the next packet once the tail is on its way
    carried = noc.carried[link]
    carried[0] += 1
    carried[1] += n_flits
    carried[2] += n_flits * c
    carried[3] += tail_sent - held_from
    if link.kind == EJECT:
        arrivals[(pid, link.to)] = tail_across


def simulate_packets(packets: Iterable[Packet | tuple], mesh: Mesh) -> NetworkRun:
    """Run ``packets`` — ``(inject_cycle, src, dsts, n_flits)``, src and dsts as (x, y) or
    (chip, x, y) — through the mesh with link contention; see :class:`NetworkRun` for the tables."""
    env = simpy.Environment()
    noc = _Noc(env, mesh)
    arrivals: dict[tuple[int, Node], float] = {}
    plan = []
    for pid, p in enumerate(packets):
        inject, src, dsts, n_flits = p
        _check_flits(n_flits)
        n_flits = int(n_flits)
        if mesh.max_flits_per_packet is not None and n_flits > mesh.max_flits_per_packet:
            raise ValueError(f"packet {pid}: {n_flits} flits exceed max_flits_per_packet = "
                             f"{mesh.max_flits_per_packet}; split it (token_packets does)")
        if not (math.isfinite(inject) and inject >= 0):
            raise ValueError(f"packet {pid}: inject cycle must be finite and >= 0 (got {inject!r})")
        s, ds = mesh.node(src), [mesh.node(d) for d in dsts]
        if not ds:
            raise ValueError(f"packet {pid} from {src!r} has no destination")
        if len(set(ds)) != len(ds):
            raise ValueError(f"packet {pid} from {src!r} lists a destination twice: {list(dsts)!r}")
        tree = multicast_tree(s, ds, mesh)
        plan.append((pid, float(inject), s, ds, n_flits))
        env.process(_cross(env, noc, pid, n_flits, tree, next(iter(tree)), float(inject), float(inject), arrivals))
    env.run()

    rows = []
    for pid, inject, s, ds, n in plan:
        for d in ds:
            arrive = arrivals[(pid, d)]
            analytic = _analytic(mesh, s, d, n)
            route = _xy(mesh, s, d)
            rows.append((pid, mesh.chip_of(s), s[0], s[1], mesh.chip_of(d), d[0], d[1], n, inject, arrive,
                         arrive - inject, analytic, arrive - inject - analytic, len(route),
                         sum(link.kind == CHIP for link in route)))
    deliveries = pd.DataFrame(rows, columns=["packet", "src_chip", "src_x", "src_y", "dst_chip", "dst_x", "dst_y",
                                             "n_flits", "inject", "arrive", "latency", "analytic", "wait", "hops",
                                             "chip_hops"])
    makespan = float(deliveries["arrive"].max() - deliveries["inject"].min()) if rows else 0.0
    links = pd.DataFrame(
        [(link.kind, link.frm[0], link.frm[1], link.to[0], link.to[1], int(p), int(f), b, h,
          b / makespan if makespan > 0 else 0.0) for link, (p, f, b, h) in noc.carried.items()],
        columns=["kind", "from_x", "from_y", "to_x", "to_y", "packets", "flits", "busy_cycles", "held_cycles",
                 "utilization"])
    return NetworkRun(deliveries, links, makespan)
