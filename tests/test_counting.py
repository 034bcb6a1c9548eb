"""The counting simulator counts the model's work exactly, prices it by the arch's table, and its
numba kernels agree with their numpy twins."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from compiler import compile
from rllm.events import trace
from rllm.model import RWKV, RWKVConfig, randomize_weights
from seneca_sim.arch import PUBLISHED_SOP_CONFIG, PUBLISHED_SOP_PJ, Arch, energy_per_sop, load_arch
from seneca_sim.counting import (ACTIONS, build_tables, mac_count, packed_masks, range_counts, range_counts_numpy,
                                 run_kernels, run_numpy, simulate, synthetic_trace)
from seneca_sim.neurobench import workload_metrics

CFG = RWKVConfig(vocab_size=97, n_layer=2, n_embd=64)


def small_chip() -> Arch:
    """Tiny cores (8 KiB) on 4x4 meshes: every split, partial sums and chip crossings occur."""
    raw = copy.deepcopy(load_arch().to_dict())
    raw["core"]["data_memory_bytes"] = {"value": 8, "unit": "KiB", "assumed": True, "rationale": "test"}
    for k in ("mesh_rows", "mesh_cols"):
        raw["chip"][k] = {"value": 4, "unit": "cores", "assumed": True, "rationale": "test"}
    return Arch.from_dict(raw, origin="small_chip")


@pytest.fixture(scope="module")
def chip() -> Arch:
    return small_chip()


@pytest.fixture(scope="module")
def program(chip):
    return compile(CFG, chip, expected_sparsity=0.2, seed=0)  # dense-ish: reduction splits occur


@pytest.fixture(scope="module")
def model():
    return randomize_weights(RWKV(CFG), seed=3).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, CFG.vocab_size, (24,), generator=torch.Generator().manual_seed(0))


def uniform(model, t: float) -> dict:
    return {name: t for name in model.sites}


def test_dense_run_counts_exactly_the_models_matrix_work(program, chip, model, tokens):
    analytic = CFG.n_layer * (5 * 64 * 64 + 2 * 64 * 256) + 97 * 64
    assert mac_count(program) == analytic
    dense = simulate(program, dense=True, arch=chip, n_tokens=3)
    assert (dense.tok_layer[:, :, ACTIONS.index("mac")].sum(axis=1) == analytic).all()
    ones = synthetic_trace(program, 4, sparsity=0.0)  # a trace where every activation fires
    r = simulate(program, ones, chip)
    assert r.counts_per_token()[ACTIONS.index("mac")] == analytic
    assert r.energy_pj() == pytest.approx(np.full(4, dense.energy_pj()[0]))
    assert r.summary()["energy_gain_vs_dense"] == pytest.approx(1.0)


def test_threshold_zero_skips_only_exact_zeros(program, chip, model, tokens):
    tr = trace(model, tokens, uniform(model, 0.0), include_head=True)
    r = simulate(program, tr, chip, natural=tr)
    out_dim = dict(zip(program.site_names, program.sites.out_dim))
    expected = sum(int(tr.events_per_token(s).sum()) * int(out_dim[s]) for s in tr.sites) / len(tokens)
    assert r.counts_per_token()[ACTIONS.index("mac")] == pytest.approx(expected)
    assert r.summary()["energy_gain_vs_natural"] == pytest.approx(1.0)


def test_energy_falls_as_thresholds_rise(program, chip, model, tokens):
    energies, latencies = [], []
    for t in (0.0, 0.1, 0.3, 0.6, 1.0, 2.0):
        r = simulate(program, trace(model, tokens, uniform(model, t), include_head=True), chip)
        energies.append(r.energy_pj().mean())
        latencies.append(r.latency_cycles().mean())
    assert all(a > b for a, b in zip(energies, energies[1:])), energies
    assert latencies[-1] < latencies[0]


def test_numba_range_counts_equal_numpy_twin():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 256, (7, 40), dtype=np.uint8)
    lo = rng.integers(0, 320, 300)
    hi = np.minimum(lo + rng.integers(0, 70, 300), 320)
    out = np.zeros((7, 300), dtype=np.int64)
    range_counts(bits, lo, hi, out)
    assert (out == range_counts_numpy(bits, lo, hi)).all()
    assert out[:, lo == hi].sum() == 0


def test_numba_token_actions_equal_numpy_twin(program, chip):
    tb = build_tables(program, chip)
    assert len(tb.p_pairs) > 0 and tb.r_chip.sum() > 0  # partial sums and chip crossings are exercised
    bits, _ = packed_masks(program, synthetic_trace(program, 9, sparsity=0.7, seed=2), 0, 9)
    L1, P = CFG.n_layer + 1, len(program.phases)
    fast = run_kernels(bits, tb, L1, P, True)
    slow = run_numpy(bits, tb)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9)


def test_synaptic_operation_energy_is_the_arch_figure():
    """One event into a single 256-output tile: its weight reads + MACs + its controller cost,
    per synaptic operation, is energy_per_sop; in the published configuration about 2.8 pJ."""
    arch = load_arch()
    cfg = RWKVConfig(vocab_size=97, n_layer=1, n_embd=256)
    for fmt, op in (("bf16", "mac"), (PUBLISHED_SOP_CONFIG["fmt"], PUBLISHED_SOP_CONFIG["op"])):
        prog = compile(cfg, arch, weight_format=fmt, improve=False)
        site = "blocks.0.att.key"
        assert prog.sites.n_row_blocks[prog.site_index(site)] == 1 and prog.sites.out_dim[prog.site_index(site)] == 256
        tr = synthetic_trace(prog, 1, sparsity=1.0 - 1e-12)  # nothing fires ...
        masks = dict(tr.masks)
        one = np.zeros_like(masks[site])
        one[0, 0] = 1                                         # ... except input 0 of att.key
        masks[site] = one
        tr = type(tr)(model="one", sites=tr.sites, widths=tr.widths, n_tokens=1, masks=masks)
        r = simulate(prog, tr, arch, binary_events=(op == "acc"))
        e = r.by_action().set_index("action")["energy_pJ"]
        sop = (e["event_ingest"] + e["weight_read"] + e["mac"]) / r.counts_per_token()[ACTIONS.index("mac")]
        assert sop == pytest.approx(energy_per_sop(arch, fmt=fmt, fanout=256, op=op))
    assert sop == pytest.approx(PUBLISHED_SOP_PJ, rel=0.05)


def test_report_tables_agree_and_save_atomically(program, chip, tmp_path):
    r = simulate(program, synthetic_trace(program, 5, sparsity=0.5), chip, per_core=True)
    total = r.energy_pj().sum()
    assert r.by_token_layer().energy_pJ.sum() == pytest.approx(total)
    assert r.per_core().energy_pJ.sum() == pytest.approx(total, rel=1e-6)
    assert r.core_totals().energy_pJ.sum() == pytest.approx(total)
    assert r.by_layer().energy_pJ.sum() * 5 == pytest.approx(total)
    assert r.cycles().groupby("token").cycles.sum().to_numpy() == pytest.approx(r.latency_cycles())
    assert set(r.per_core().core) <= set(range(program.n_cores))
    s = r.summary()
    assert s["energy_gain_vs_dense"] > 1.0 and s["latency_gain_vs_dense"] > 1.0
    out = r.save(tmp_path / "run")
    r.save(tmp_path / "run")  # replacing an existing result directory
    assert json.loads((out / "summary.json").read_text())["summary"]["tokens"] == 5
    assert {p.name for p in out.iterdir()} >= {"tokens.csv", "by_token_layer.csv", "per_core.csv", "cycles.csv"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sites_missing_from_the_trace_are_dense_and_reported(program, chip, model, tokens):
    tr = trace(model, tokens[:4], uniform(model, 0.3))  # no head site
    r = simulate(program, tr, chip)
    assert r.meta["assumed_dense_sites"] == ["head"]
    head_macs = r.tok_layer[:, CFG.n_layer, ACTIONS.index("mac")]
    assert (head_macs == 97 * 64).all()


def test_mismatched_trace_or_arch_is_refused(program, chip):
    other = compile(RWKVConfig(vocab_size=97, n_layer=2, n_embd=72), chip, improve=False)
    with pytest.raises(ValueError, match="different models"):
        simulate(program, synthetic_trace(other, 2), chip)
    with pytest.raises(ValueError, match="recompile"):
        simulate(program, synthetic_trace(program, 2), load_arch())


def test_neurobench_metrics_are_dense_effective_pairs(program, chip, model, tokens):
    tr = trace(model, tokens, uniform(model, 0.5), include_head=True)
    m = workload_metrics(program, tr).set_index("metric")
    r = simulate(program, tr, chip)
    assert m.loc["synaptic_operations_macs", "dense"] == mac_count(program)
    assert m.loc["synaptic_operations_macs", "effective"] == pytest.approx(r.counts_per_token()[ACTIONS.index("mac")])
    assert 0.0 < m.loc["activation_sparsity", "effective"] < 1.0 and m.loc["activation_sparsity", "dense"] == 0.0
    assert m.loc["model_footprint", "dense"] == m.loc["model_footprint", "effective"] == program.cores.mem_bytes.sum()


def program_flits(arch, pairs):
    return [arch.noc.flits_for_pairs(int(n)) for n in pairs]


def test_a_lone_message_takes_the_closed_form_and_the_simpy_cycles_on_every_route(program, chip):
    """One meaning of every latency figure: for each event route, partial sum and dense transfer of a
    multi-chip program, the counting simulator's cycles for a lone message of 1 and of 9 flits equal
    ``network.analytic_latency`` and the simpy model without other traffic."""
    from seneca_sim.network import Packet, analytic_latency, program_mesh, simulate_packets
    tb = build_tables(program, chip)
    mesh = program_mesh(program, chip)
    node = list(zip(program.cores.gx.tolist(), program.cores.gy.tolist()))
    assert program.n_chips > 1 and (program.routes.chip_links > 0).any() and (program.psums.chip_links > 0).any()

    def agree(counted, src, dsts, f):
        closed = max(analytic_latency(src, d, f, mesh) for d in dsts)
        lone = simulate_packets([Packet(0, src, tuple(dsts), f)], mesh).deliveries.latency.max()
        assert counted == closed == lone

    ptr = program.route_dest_ptr()
    for r in range(len(program.routes)):
        dsts = [node[c] for c in program.route_dests.core[ptr[r]:ptr[r + 1]]]
        for f in (1, 9):
            agree(tb.r_lat0[r] + (f - 1) * tb.cyc_flit, node[program.routes.src[r]], dsts, f)
    order = np.argsort(np.asarray(
        [np.flatnonzero((program.tiles.core == c) & (program.tiles.site == s))[0]
         for c, s in zip(program.psums.src, program.psums.site)]), kind="stable")
    for k, j in enumerate(order):  # the tables hold partial sums grouped by sending tile
        ps = program.psums
        agree(tb.p_lat[k], node[ps.src[j]], [node[ps.dst[j]]], int(tb.p_flits[k]))
    xf = program.transfers
    for p in np.unique(xf.phase):
        k = np.flatnonzero(xf.phase == p)
        flits = [int(f) for f in program_flits(chip, xf.pairs[k])]
        closed = max(analytic_latency(node[xf.src[i]], node[xf.dst[i]], f, mesh) for i, f in zip(k, flits))
        assert tb.static_noc[p] == closed


def _with(arch: Arch, **figures) -> Arch:
    raw = copy.deepcopy(arch.to_dict())
    for dotted, value in figures.items():
        section, key = dotted.split("__")
        raw[section][key] = {**raw[section][key], "value": value}
    return Arch.from_dict(raw, origin="probe")


def test_every_value_sent_costs_its_sender_an_event_generate_and_a_queue_access(program, chip, model, tokens):
    """Events, partial sums and dense copies alike: event_generate counts every value a core sends
    (counted here from the trace and the Program), and the event-queue cycles are on the clock."""
    tr = trace(model, tokens, uniform(model, 0.05), include_head=True)
    by_action = simulate(program, tr, chip).by_action().set_index("action")
    rt = program.routes
    events = sum(int(tr.mask(program.site_names[s])[:, a:b].sum()) for s, a, b in zip(rt.site, rt.ch0, rt.ch1))
    copies = int(program.transfers.pairs.sum()) * tr.n_tokens
    psums = by_action.loc["psum_ingest", "count"] * tr.n_tokens  # each partial sum sent is received once
    assert psums > 0 and copies > 0
    assert by_action.loc["event_generate", "count"] * tr.n_tokens == pytest.approx(events + psums + copies, rel=1e-12)
    assert by_action.loc["event_generate", "energy_pJ"] == pytest.approx(
        by_action.loc["event_generate", "count"] * chip.e("event_generate"))
    # the same mapping on a chip whose event queue takes no time is faster by at least the copies' queue cycles
    probe = _with(chip, cycles__event_queue_access_cycles=0.0)
    fast = compile(CFG, probe, expected_sparsity=0.2, seed=0)
    assert np.array_equal(fast.tiles.core, program.tiles.core) and np.array_equal(fast.cores.gx, program.cores.gx)
    slow_c, fast_c = simulate(program, tr, chip).latency_cycles(), simulate(fast, tr, probe).latency_cycles()
    assert (slow_c > fast_c).all()
