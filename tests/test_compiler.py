"""The compiler maps every weight once, routes every event to exactly the cores that need it,
keeps every core within its memory, and says clearly when a model does not fit."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pandas as pd
import pytest

from compiler import CompileError, Program, ProgramError, Table, compile, model_shape
from compiler.__main__ import main as cli
from compiler.graph import build_graph
from compiler.placement import route_stats, route_stats_numpy, xy_tree_links
from compiler.tiling import SPLITS
from rllm.model import RWKV, RWKVConfig
from seneca_sim.arch import Arch, load_arch

CFG = RWKVConfig(vocab_size=97, n_layer=2, n_embd=64)  # ffn 256


def small_chip(memory_kib: float = 8, mesh: int = 4, max_chips: int = 8) -> Arch:
    """The shipped chip with tiny cores and meshes, so a 64-wide model needs every kind of split
    and several chips."""
    raw = copy.deepcopy(load_arch().to_dict())
    raw["core"]["data_memory_bytes"] = {"value": memory_kib, "unit": "KiB", "assumed": True, "rationale": "test"}
    for k in ("mesh_rows", "mesh_cols"):
        raw["chip"][k] = {"value": mesh, "unit": "cores", "assumed": True, "rationale": "test"}
    raw["chip"]["max_chips"] = {"value": max_chips, "unit": "chips", "assumed": True, "rationale": "test"}
    return Arch.from_dict(raw, origin="small_chip")


@pytest.fixture(scope="module")
def chip() -> Arch:
    return small_chip()


@pytest.fixture(scope="module")
def program(chip) -> Program:
    return compile(CFG, chip, seed=1)


def test_model_shapes_by_name_config_and_string():
    assert model_shape("rwkv_430m")[1:] == (24, 1024, 4096, 50277)
    assert model_shape("rwkv_1b5")[1:] == (24, 2048, 8192, 50277)
    assert model_shape("12x768")[1:] == (12, 768, 3072, 50277)
    assert model_shape(CFG)[1:] == (2, 64, 256, 97)
    assert model_shape(RWKV(CFG))[1:] == (2, 64, 256, 97)
    with pytest.raises(ValueError, match="zoo name"):
        model_shape("rwkv_9000")


def test_graph_has_one_matvec_per_site_and_counts_the_dense_work():
    g = build_graph(CFG.n_layer, CFG.n_embd, CFG.ffn_dim, CFG.vocab_size)
    assert set(g.sites) == set(RWKV(CFG).sites)
    C, F, V = 64, 256, 97
    assert g.macs_per_token() == CFG.n_layer * (5 * C * C + 2 * C * F) + V * C
    for site in g.sites:  # every site has exactly one producer whose vector is the site's width
        p = g.producer(site)
        assert p.length == g.matvec(site).in_dim == g.matvec(p.anchor).out_dim


def test_every_weight_is_placed_exactly_once(program):
    for s, name in enumerate(program.site_names):
        R, N = int(program.sites.out_dim[s]), int(program.sites.in_dim[s])
        painted = np.zeros((R, N), dtype=np.int64)
        t = program.tiles
        for i in np.flatnonzero(t.site == s):
            painted[t.row0[i]:t.row1[i], t.col0[i]:t.col1[i]] += 1
        assert (painted == 1).all(), name


def test_events_reach_exactly_the_cores_holding_their_columns(program):
    ptr = program.route_dest_ptr()
    for s, name in enumerate(program.site_names):
        N = int(program.sites.in_dim[s])
        holders = [set() for _ in range(N)]
        t = program.tiles
        for i in np.flatnonzero(t.site == s):
            for c in range(t.col0[i], t.col1[i]):
                holders[c].add(int(t.core[i]))
        receivers = [[] for _ in range(N)]
        for r in np.flatnonzero(program.routes.site == s):
            dests = program.route_dests.core[ptr[r]:ptr[r + 1]].tolist()
            for c in range(program.routes.ch0[r], program.routes.ch1[r]):
                receivers[c].extend(dests)
        for c in range(N):
            assert sorted(receivers[c]) == sorted(holders[c]), (name, c)  # each holder once, nobody else


def test_events_leave_from_the_cores_that_produce_them(program):
    g = build_graph(CFG.n_layer, CFG.n_embd, CFG.ffn_dim, CFG.vocab_size)
    o = program.owners
    for r in range(len(program.routes)):
        site = program.site_names[program.routes.site[r]]
        anchor = program.site_index(g.producer(site).anchor)
        src, c0 = program.routes.src[r], program.routes.ch0[r]
        mine = (o.site == anchor) & (o.core == src)
        assert ((o.row0[mine] <= c0) & (o.row1[mine] > c0)).any()


def test_cores_stay_within_data_memory(program, chip):
    c = program.cores
    assert (c.mem_bytes <= chip.core.data_memory_bytes).all()
    assert (c.mem_bytes == c.mem_weights + c.mem_accumulators + c.mem_neurons + c.mem_buffers).all()
    assert program.n_chips > 1 and (program.routes.chip_links > 0).any()  # the test chip forces several chips


@pytest.mark.parametrize("split", SPLITS)
def test_each_split_maps_a_valid_program(chip, split):
    p = compile(CFG, chip, split=split, improve=False)
    p.check()
    multi = p.sites.n_row_blocks * p.sites.n_col_blocks > 1
    assert (p.sites.split[multi] == split).all()
    if split != "by_outputs":
        assert len(p.psums) > 0  # partial sums are reduced by the row owners
    else:
        assert len(p.psums) == 0


def test_auto_split_is_the_cheapest_estimate_and_recorded(program):
    for t in program.meta["tilings"]:
        assert t["split"] in t["alternatives"]
        assert t["est_energy_pj"] == min(a["est_energy_pj"] for a in t["alternatives"].values())
    assert set(program.sites.split) <= set(SPLITS)


def test_split_choice_follows_expected_sparsity(chip):
    """Dense inputs favour fewer multicast copies (reduction-based splits); very sparse inputs
    make the partial-sum reduction the dominant cost, so by_outputs wins."""
    sparse = compile(CFG, chip, expected_sparsity=0.99, improve=False)
    dense = compile(CFG, chip, expected_sparsity=0.0, improve=False)
    multi = sparse.sites.n_row_blocks * sparse.sites.n_col_blocks > 1
    assert (sparse.sites.split[multi] == "by_outputs").all()
    assert (dense.sites.split != "by_outputs").any()


def test_placement_improvement_never_raises_traffic_cost(program):
    assert program.meta["placement_cost_after_pj"] <= program.meta["placement_cost_before_pj"]


def test_multicast_tree_links_match_hop_by_hop_enumeration():
    rng = np.random.default_rng(0)
    n, W, H = 60, 4, 4
    gx, gy = rng.integers(0, 12, n), rng.integers(0, 8, n)
    src = rng.integers(0, n, 40)
    sizes = rng.integers(1, 9, 40)
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    dst = np.concatenate([rng.choice(n, k, replace=False) for k in sizes])
    got = route_stats(gx, gy, src, ptr, dst, W, H, 16)
    assert (got == route_stats_numpy(gx, gy, src, ptr, dst, W, H)).all()
    for r in range(40):
        d = dst[ptr[r]:ptr[r + 1]]
        links = xy_tree_links((gx[src[r]], gy[src[r]]), list(zip(gx[d], gy[d])))
        chip = [l for l in links if (l[0][0] // W, l[0][1] // H) != (l[1][0] // W, l[1][1] // H)]
        assert got[r, 0] == len(links) and got[r, 1] == len(chip)


def test_too_big_model_names_the_layer_and_the_shortfall():
    with pytest.raises(CompileError, match=r"blocks\.\d+\..* needs cores .* available.* short") as e:
        compile(CFG, small_chip(max_chips=1), improve=False)
    assert isinstance(e.value, ValueError)


def test_a_row_that_cannot_fit_a_core_is_named():
    with pytest.raises(CompileError, match=r"blocks\.0\.att\.key: even a 1x1 tile"):
        compile(CFG, small_chip(memory_kib=1), improve=False)


def test_program_round_trips_through_npz_and_json(program, chip, tmp_path):
    no_psums = compile(CFG, chip, split="by_outputs", improve=False)  # empty tables keep their dtypes
    assert len(no_psums.psums) == 0
    for p in (program, no_psums):
        for name in ("p.npz", "p.json"):
            back = Program.load(p.save(tmp_path / name))
            assert back.meta == p.meta
            for k in ("sites", "tiles", "routes", "route_dests", "psums", "transfers", "elementwise", "cores"):
                assert getattr(back, k) == getattr(p, k), (name, k)
                assert all(a.dtype == b.dtype for a, b in zip(getattr(back, k)._cols.values(),
                                                              getattr(p, k)._cols.values()))
            back.check()


def test_check_catches_a_doubly_placed_tile(program):
    t = program.tiles.to_frame()
    t = pd.concat([t, t.iloc[:1]])
    bad = dataclasses.replace(program, tiles=Table(**{c: t[c].to_numpy() for c in t.columns}))
    with pytest.raises(ProgramError, match="overlap|cover"):
        bad.check()


def test_schedule_sites_are_checked(chip):
    with pytest.raises(ValueError, match="does not have"):
        compile(CFG, chip, schedule={"blocks.7.att.key": 0.1}, improve=False)


def test_cli_prints_a_mapping_summary(capsys):
    assert cli(["2x64x97", "--no-improve"]) == 0
    out = capsys.readouterr().out
    assert "cores" in out and "flit-hops/token" in out
    assert cli(["rwkv_9000"]) == 2
