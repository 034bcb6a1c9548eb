"""Tests for the network-on-chip model (seneca_sim/network.py): routes, timing, contention, multicast."""

from __future__ import annotations

import random

import pytest

from seneca_sim.network import (
    Mesh,
    Packet,
    analytic_latency,
    hops,
    mesh_from_arch,
    multicast_tree,
    packets_from_program,
    route_links,
    simulate_packets,
    token_packets,
    xy_route,
)

ONE_CHIP = Mesh(cols=6, rows=5)
FOUR_CHIPS = Mesh(cols=4, rows=3, chips_x=2, chips_y=2, cycles_per_flit=1, inter_chip_cycles_per_flit=7,
                  port_cycles_per_flit=1, router_delay=2)


def _random_packets(mesh: Mesh, n: int, seed: int, horizon: int = 40, max_dsts: int = 3) -> list[Packet]:
    rng = random.Random(seed)
    nodes = [(x, y) for x in range(mesh.width) for y in range(mesh.height)]
    return [Packet(rng.randrange(horizon), rng.choice(nodes), tuple(rng.sample(nodes, rng.randint(1, max_dsts))),
                   rng.randint(1, 9)) for _ in range(n)]


# ------------------------------------------------------------------------------------ routes
@pytest.mark.parametrize("src,dst", [((0, 0), (5, 4)), ((5, 4), (0, 0)), ((2, 3), (2, 0)), ((1, 1), (4, 1)),
                                     ((3, 3), (3, 3))])
def test_xy_route_moves_one_hop_at_a_time_x_first_then_y(src, dst):
    route = xy_route(src, dst, ONE_CHIP)
    assert len(route) == hops(src, dst, ONE_CHIP) == abs(dst[0] - src[0]) + abs(dst[1] - src[1])
    at = src
    turned = False
    for link in route:
        assert link.frm == at
        dx, dy = link.to[0] - at[0], link.to[1] - at[1]
        assert abs(dx) + abs(dy) == 1
        if dy:
            turned = True
        assert not (turned and dx), "an x step after a y step is not XY routing"
        at = link.to
    assert at == dst


def test_links_crossing_a_chip_boundary_are_inter_chip_links():
    route = xy_route((0, 0), (7, 5), FOUR_CHIPS)  # 4x3 chips in a 2x2 grid: boundaries at x=4 and y=3
    chip_links = [(l.frm, l.to) for l in route if l.kind == "chip"]
    assert chip_links == [((3, 0), (4, 0)), ((7, 2), (7, 3))]
    assert all(l.kind == "mesh" for l in route if (l.frm, l.to) not in chip_links)


def test_chip_local_addresses_map_onto_the_global_mesh():
    assert FOUR_CHIPS.node((0, 1, 2)) == (1, 2)
    assert FOUR_CHIPS.node((1, 1, 2)) == (5, 2)
    assert FOUR_CHIPS.node((3, 0, 0)) == (4, 3)
    assert FOUR_CHIPS.chip_of((4, 3)) == 3
    with pytest.raises(ValueError, match="outside"):
        FOUR_CHIPS.node((1, 4, 0))
    with pytest.raises(ValueError, match="chip 4"):
        FOUR_CHIPS.node((4, 0, 0))


# ------------------------------------------------------------------------------------ timing
@pytest.mark.parametrize("h_src,h_dst", [((0, 0), (5, 4)), ((3, 2), (3, 2)), ((5, 0), (0, 4))])
@pytest.mark.parametrize("n", [1, 2, 9])
@pytest.mark.parametrize("c,r", [(1, 0), (2, 3)])
def test_analytic_latency_on_one_chip_is_the_closed_form(h_src, h_dst, n, c, r):
    mesh = Mesh(cols=6, rows=5, cycles_per_flit=c, port_cycles_per_flit=c, router_delay=r)
    h = abs(h_dst[0] - h_src[0]) + abs(h_dst[1] - h_src[1])
    assert analytic_latency(h_src, h_dst, n, mesh) == (h + 1) * r + (h + 1 + n) * c


@pytest.mark.parametrize("n", [1, 3, 9])
def test_a_chip_crossing_latency_is_paid_once_per_crossing_not_per_flit(n):
    mesh = Mesh(cols=4, rows=4, chips_x=2, chips_y=2, inter_chip_latency=10, router_delay=1)
    h = 8  # (2, 1) -> (5, 6): 8 hops, 2 of them across a chip boundary
    head = (h + 2) * 1 + 2 * 10 + (h + 1) * 1  # 8 links and 2 ports at 1 cycle a flit, 2 crossings, 9 routers
    assert analytic_latency((2, 1), (5, 6), n, mesh) == head + (n - 1) * 1
    assert simulate_packets([Packet(0, (2, 1), ((5, 6),), n)], mesh).deliveries.iloc[0]["latency"] == head + n - 1


def test_a_chip_link_is_free_for_the_next_packet_while_flits_are_in_flight():
    mesh = Mesh(cols=2, rows=1, chips_x=2, inter_chip_latency=50)
    run = simulate_packets([Packet(0, (1, 0), ((2, 0),), 3), Packet(0, (1, 0), ((2, 0),), 3)], mesh)
    chip = run.links[run.links["kind"] == "chip"].iloc[0]
    assert chip["held_cycles"] == 6 and chip["busy_cycles"] == 6  # 2 x 3 flits, not held through the 50
    assert sorted(run.deliveries["latency"]) == [analytic_latency((1, 0), (2, 0), 3, mesh),
                                                 analytic_latency((1, 0), (2, 0), 3, mesh) + 3]


@pytest.mark.parametrize("n", [1, 3, 9])
def test_chip_crossings_add_the_slowest_links_serialization_once(n):
    mesh = Mesh(cols=4, rows=4, chips_x=2, chips_y=2, inter_chip_cycles_per_flit=10, router_delay=1)
    h = 8  # (2, 1) -> (5, 6): 3 hops in x (one across a boundary), 5 in y (one across a boundary)
    head = (h + 2 - 2) * 1 + 2 * 10 + (h + 1) * 1  # 6 fast links and 2 ports at 1, 2 chip links at 10; 9 routers
    assert analytic_latency((2, 1), (5, 6), n, mesh) == head + (n - 1) * 10


def test_a_fast_link_fed_by_a_slow_one_is_held_until_the_tail_has_crossed():
    mesh, n = Mesh(cols=2, rows=1, chips_x=2, inter_chip_cycles_per_flit=10), 4
    run = simulate_packets([Packet(0, (0, 0), ((3, 0),), n)], mesh)
    after = run.links[(run.links["from_x"] == 2) & (run.links["kind"] == "mesh")].iloc[0]
    assert after["busy_cycles"] == n * 1
    assert after["held_cycles"] == 1 + (n - 1) * 10  # one flit time, then waits 10 cycles per later flit
    assert run.deliveries.iloc[0]["latency"] == analytic_latency((0, 0), (3, 0), n, mesh)


@pytest.mark.parametrize("mesh", [ONE_CHIP, FOUR_CHIPS], ids=["one chip", "four chips"])
@pytest.mark.parametrize("src,dst,n", [((0, 0), (5, 4), 1), ((5, 4), (0, 0), 9), ((2, 1), (2, 1), 3),
                                       ((1, 2), (4, 0), 5), ((0, 4), (5, 0), 2)])
def test_a_lone_packet_arrives_exactly_at_the_analytic_latency(mesh, src, dst, n):
    run = simulate_packets([Packet(17, src, (dst,), n)], mesh)
    row = run.deliveries.iloc[0]
    assert row["latency"] == analytic_latency(src, dst, n, mesh)
    assert row["arrive"] == 17 + row["latency"] and row["wait"] == 0


def test_a_lone_packet_addressed_by_chip_matches_the_analytic_latency():
    src, dst = (0, 3, 2), (3, 1, 0)  # chip 0's (3, 2) -> chip 3's (1, 0) = global (5, 3): crosses both boundaries
    run = simulate_packets([Packet(0, src, (dst,), 4)], FOUR_CHIPS)
    row = run.deliveries.iloc[0]
    assert row["latency"] == analytic_latency(src, dst, 4, FOUR_CHIPS)
    assert (row["hops"], row["chip_hops"], row["src_chip"], row["dst_chip"]) == (3, 2, 0, 3)


# ------------------------------------------------------------------------------- contention
def test_contention_never_makes_a_packet_faster_than_analytic():
    run = simulate_packets(_random_packets(FOUR_CHIPS, 150, seed=1), FOUR_CHIPS)
    d = run.deliveries
    assert (d["latency"] >= d["analytic"]).all()
    assert (d["wait"] > 0).any()


def test_two_packets_reaching_a_shared_link_together_delay_one_by_a_packet_time():
    mesh, n = Mesh(cols=6, rows=2), 4
    # A's head reaches link (1,0)->(2,0) at cycle 2 (inject port, one hop); B, injected at (1,0) at
    # cycle 1, asks for it at cycle 2 too. Both then go on to (3,0) over the same links.
    run = simulate_packets([Packet(0, (0, 0), ((3, 0),), n), Packet(1, (1, 0), ((3, 0),), n)], mesh)
    waits = sorted(run.deliveries["wait"])
    assert waits == [0, n * mesh.cycles_per_flit]


def test_packets_on_disjoint_routes_do_not_delay_each_other():
    packets = [Packet(0, (0, y), ((5, y),), 9) for y in range(5)]
    assert (simulate_packets(packets, ONE_CHIP).deliveries["wait"] == 0).all()


def test_link_busy_time_is_conserved():
    packets = _random_packets(FOUR_CHIPS, 120, seed=2)
    run = simulate_packets(packets, FOUR_CHIPS)
    trees = [multicast_tree(p.src, p.dsts, FOUR_CHIPS) for p in packets]
    expected_busy = sum(p.n_flits * sum(FOUR_CHIPS.link_cycles(l) for l in t) for p, t in zip(packets, trees))
    expected_flits = sum(p.n_flits * len(t) for p, t in zip(packets, trees))
    assert run.links["busy_cycles"].sum() == expected_busy
    assert run.links["flits"].sum() == expected_flits
    assert (run.links["utilization"] <= 1).all()


# -------------------------------------------------------------------------------- multicast
def test_a_multicast_packet_crosses_each_tree_link_once_and_reaches_each_destination_once():
    src, dsts = (0, 0), ((5, 4), (5, 0), (3, 2), (3, 4), (0, 0), (2, 0))
    run = simulate_packets([Packet(0, src, dsts, 5)], ONE_CHIP)
    union = {l for d in dsts for l in route_links(src, d, ONE_CHIP)}
    assert len(run.links) == len(union)
    assert (run.links["packets"] == 1).all()
    unicast_links = sum(len(route_links(src, d, ONE_CHIP)) for d in dsts)
    assert len(union) < unicast_links  # the tree shares its trunk
    got = sorted(zip(run.deliveries["dst_x"], run.deliveries["dst_y"]))
    assert got == sorted(dsts)
    assert (run.deliveries["wait"] == 0).all()  # branches of one packet do not contend


def test_multicast_tree_is_a_tree_rooted_at_the_injection_port():
    tree = multicast_tree((1, 1), [(4, 3), (4, 0), (0, 2)], ONE_CHIP)
    root = next(iter(tree))
    assert root.kind == "inject" and root.frm == (1, 1)
    children = [c for cs in tree.values() for c in cs]
    assert len(children) == len(set(children)) == len(tree) - 1  # every link but the root has one parent
    assert root not in children


def test_a_packet_listing_a_destination_twice_is_an_error():
    with pytest.raises(ValueError, match="twice"):
        simulate_packets([Packet(0, (0, 0), ((1, 1), (1, 1)), 2)], ONE_CHIP)


def test_a_packet_over_the_flit_limit_is_an_error():
    with pytest.raises(ValueError, match="max_flits_per_packet"):
        simulate_packets([Packet(0, (0, 0), ((1, 1),), 10)], ONE_CHIP)


# ------------------------------------------------------------------------------ packet lists
def test_token_packets_split_events_by_the_packet_format():
    mesh = Mesh(cols=4, rows=4)  # 1 header flit, 2 pairs per flit, at most 9 flits: 16 pairs per packet
    packets = token_packets([40, 0, 3], [((0, 0), [(1, 1), (2, 2)]), ((1, 0), [(3, 3)]), ((2, 0), [(0, 0)])],
                            mesh, inject=5)
    assert [p.n_flits for p in packets] == [9, 9, 5, 3]
    assert [p.src for p in packets] == [(0, 0)] * 3 + [(2, 0)]
    assert all(p.inject == 5 and p.dsts for p in packets)


def test_token_packets_accepts_named_routes():
    mesh = Mesh(cols=4, rows=4)
    packets = token_packets({"a": 1}, {"a": ((0, 0), [(3, 3)]), "b": ((1, 1), [(0, 0)])}, mesh)
    assert packets == [Packet(0.0, (0, 0), ((3, 3),), 2)]


def test_mesh_from_arch_reads_the_chip_description():
    arch_mod = pytest.importorskip("seneca_sim.arch")
    arch = arch_mod.load_arch()
    mesh = mesh_from_arch(arch, chips_x=2)
    assert (mesh.cols, mesh.rows, mesh.width) == (arch.chip.mesh_cols, arch.chip.mesh_rows, 2 * arch.chip.mesh_cols)
    assert mesh.cycles_per_flit == arch.noc.cycles_per_hop_per_flit
    # one meaning of a chip crossing: a latency per crossing, the link at the on-chip rate
    assert mesh.inter_chip_latency == arch.noc.inter_chip_latency_cycles
    assert mesh.inter_chip_cycles_per_flit == arch.noc.cycles_per_hop_per_flit
    assert sum(mesh.packet_flits(37)) == arch.noc.flits_for_pairs(37)


@pytest.mark.parametrize("seed", range(5))
def test_analytic_latency_matches_a_flit_by_flit_recurrence(seed):
    rng = random.Random(seed)
    mesh = Mesh(cols=3, rows=2, chips_x=3, chips_y=3, cycles_per_flit=rng.choice([1, 2]),
                inter_chip_cycles_per_flit=rng.choice([1, 3, 10]), inter_chip_latency=rng.choice([0, 5, 10]),
                port_cycles_per_flit=rng.choice([1, 4]), router_delay=rng.choice([0, 1, 2]))
    src, dst, n = (rng.randrange(9), rng.randrange(6)), (rng.randrange(9), rng.randrange(6)), rng.randint(1, 9)
    # flit k is sent over link j when it has come off link j-1 and through the router, and flit
    # k-1 has been sent; it comes off the link the link's latency later
    done = [0.0] * n  # the whole packet is in the source core at cycle 0
    for j, link in enumerate(route_links(src, dst, mesh)):
        c, lat, prev = mesh.link_cycles(link), mesh.link_latency(link), 0.0
        for k in range(n):
            came = done[k] + mesh.router_delay if j else 0.0
            prev = max(came, prev) + c
            done[k] = prev + lat
    assert analytic_latency(src, dst, n, mesh) == done[-1]
    run = simulate_packets([Packet(0, src, (dst,), n)], mesh)
    assert run.deliveries.iloc[0]["latency"] == done[-1]


# ------------------------------------------------------------------------ compiled programs
def _tiny_program():
    """Four cores on a 4x4 chip. s0 (8 inputs) is split by inputs over cores 2 (channels 0-3) and
    3 (4-7), which sends its partial sums to 2; s1 (4 inputs) sits on core 1, which copies 40
    values densely to core 0."""
    prog = pytest.importorskip("compiler.program")
    T = prog.Table
    i = lambda *v: list(v)  # noqa: E731
    return prog.Program(
        meta=dict(mesh_rows=4, mesh_cols=4, chips_x=1, chips_y=1),
        sites=T(name=["s0", "s1"], in_dim=i(8, 4), phase=i(1, 2)),
        phases=T(name=["emit", "mv0", "mv1"], layer=i(0, 0, 0), kind=["elementwise", "matvec", "matvec"]),
        cores=T(gx=i(0, 3, 1, 2), gy=i(0, 0, 2, 3)),
        tiles=T(core=i(2, 3, 1), site=i(0, 0, 1), row0=i(0, 0, 0), row1=i(5, 5, 3), col0=i(0, 4, 0), col1=i(4, 8, 4),
                bytes=i(1, 1, 1)),
        owners=T(site=i(0, 1), core=i(2, 1), row0=i(0, 0), row1=i(5, 3)),
        routes=T(site=i(0, 0, 1), src=i(0, 1, 2), ch0=i(0, 4, 0), ch1=i(4, 8, 4), emit_phase=i(0, 0, 1)),
        route_dests=T(route=i(0, 1, 2), core=i(2, 3, 1)),
        psums=T(site=i(0), src=i(3), dst=i(2), pairs=i(5)),
        transfers=T(phase=i(2), src=i(1), dst=i(0), pairs=i(40)),
        elementwise=T(phase=i(0), core=i(0)),
    )


def _trace(fires: dict[str, list[list[int]]], widths: dict[str, int]):
    import numpy as np
    events = pytest.importorskip("rllm.events")
    masks = {}
    for site, tokens in fires.items():
        m = np.zeros((len(tokens), widths[site]), dtype=bool)
        for t, channels in enumerate(tokens):
            m[t, channels] = True
        masks[site] = np.packbits(m, axis=1, bitorder="little")
    return events.EventTrace(model="tiny", sites=tuple(fires), widths=tuple(widths[s] for s in fires),
                             n_tokens=len(next(iter(fires.values()))), masks=masks)


def test_packets_from_program_sends_the_events_that_fire_and_the_partial_sums_they_cause():
    program, mesh = _tiny_program(), Mesh(cols=4, rows=4)
    trace = _trace({"s0": [[1, 2, 3], [5]], "s1": [[0], []]}, {"s0": 8, "s1": 4})
    token0 = packets_from_program(program, trace, 0, mesh=mesh)
    assert [(p.src, p.dsts, p.n_flits) for p in token0] == [
        ((0, 0), ((1, 2),), 3),  # s0 channels 1-3 -> core 2; nothing on 4-7, so no partial sums
        ((1, 2), ((3, 0),), 2),  # s1 channel 0 -> core 1
        ((3, 0), ((0, 0),), 9), ((3, 0), ((0, 0),), 9), ((3, 0), ((0, 0),), 5),  # 40 values copied densely
    ]
    token1 = packets_from_program(program, trace, 1, phase="mv0", mesh=mesh)
    assert [(p.src, p.dsts, p.n_flits) for p in token1] == [((2, 3), ((1, 2),), 4)]  # core 3's 5 partial sums
    assert [(p.src, p.n_flits) for p in packets_from_program(program, trace, 1, phase="emit", mesh=mesh)] == [
        ((3, 0), 2)]  # s0 channel 5 from core 1


def test_packets_from_program_names_a_site_the_trace_lacks():
    program = _tiny_program()
    trace = _trace({"s0": [[1]]}, {"s0": 8})
    with pytest.raises(KeyError, match="s1"):
        packets_from_program(program, trace, 0, mesh=Mesh(cols=4, rows=4))
