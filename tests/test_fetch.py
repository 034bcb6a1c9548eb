"""Streamed weights: the compiler's residency choice and the counting simulator's fetch policies,
checked by conservation (the bits fetched are the rows each policy asks for, counted here from
the trace and the Program) and by the policies' limits (oracle, nothing predicted, every input firing)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from compiler import CompileError, compile
from rllm.events import EventTrace, trace
from rllm.model import RWKV, RWKVConfig, randomize_weights
from rllm.prediction import fit_predictor, predicted_trace
from seneca_sim.arch import Arch, load_arch
from seneca_sim.counting import ACTIONS, simulate, synthetic_trace
from seneca_sim.fetch import FetchPlan, fetch_timeline, fetch_timeline_numpy

CFG = RWKVConfig(vocab_size=97, n_layer=2, n_embd=64)


def small_chip(memory_bytes: int = 8192, max_chips: int = 8, **shared) -> Arch:
    raw = copy.deepcopy(load_arch().to_dict())
    raw["core"]["data_memory_bytes"] = {"value": memory_bytes, "unit": "bytes", "assumed": True, "rationale": "test"}
    for k in ("mesh_rows", "mesh_cols"):
        raw["chip"][k] = {"value": 4, "unit": "cores", "assumed": True, "rationale": "test"}
    raw["chip"]["max_chips"] = {"value": max_chips, "unit": "chips", "assumed": True, "rationale": "test"}
    for k, v in shared.items():  # a value, or (value, unit)
        value, unit = v if isinstance(v, tuple) else (v, raw["shared_memory"][k]["unit"])
        raw["shared_memory"][k] = {**raw["shared_memory"][k], "value": value, "unit": unit}
    return Arch.from_dict(raw, origin="small_chip")


@pytest.fixture(scope="module")
def chip() -> Arch:
    return small_chip()


@pytest.fixture(scope="module")
def program(chip):
    return compile(CFG, chip, chips=1, seed=0)


@pytest.fixture(scope="module")
def model():
    return randomize_weights(RWKV(CFG), seed=3).eval()


@pytest.fixture(scope="module")
def tr(model):
    tokens = torch.randint(0, CFG.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    th = {n: 0.3 for n in model.sites if n != "head"}
    return trace(model, tokens, th, include_head=True, block_inputs=True)


def streamed_tiles(program):
    t = program.tiles
    return np.flatnonzero(np.asarray(t.streamed) > 0)


def expected_bits(program, masks_of, cols_of=None) -> float:
    """Σ over streamed tiles and tokens of (columns asked for) x rows x weight bits."""
    t, bits, total = program.tiles, int(program.meta["weight_bits"]), 0.0
    for i in streamed_tiles(program):
        site = program.site_names[t.site[i]]
        rows = int(t.row1[i] - t.row0[i])
        if cols_of is not None:
            n = cols_of(i)
        else:
            n = float(masks_of(site)[:, t.col0[i]:t.col1[i]].sum())
        total += n * rows * bits
    return total


def shared_bits(report) -> float:
    return float(report.tok_layer[:, :, ACTIONS.index("shared_read_bit")].sum())


# ------------------------------------------------------------------------------------ compiler
def test_a_model_too_big_for_the_chips_given_streams_its_cheapest_matrices(chip, program):
    on_core = compile(CFG, chip, seed=0)
    assert on_core.n_chips > 1 and not on_core.meta["streamed"]
    assert program.n_chips == 1 and program.n_cores <= chip.cores_per_chip and program.meta["streamed"]
    st = np.asarray(program.sites.streamed) > 0
    assert st.any() and not st.all() or st.all()
    # a streamed tile holds a buffer of a few columns, not its weights; it streams the rest
    t = program.tiles
    for i in streamed_tiles(program):
        rows, cols = int(t.row1[i] - t.row0[i]), int(t.col1[i] - t.col0[i])
        core = t.core[i]
        assert program.cores.mem_weights[core] == rows * min(cols, chip.shared.stream_buffer_columns) * 2
        assert program.cores.streamed_bytes[core] == rows * cols * 2
    program.check()


def test_the_chips_that_fit_everything_stream_nothing(chip):
    assert not compile(CFG, chip, chips=3, seed=0).meta["streamed"]


def test_streaming_needs_a_shared_memory(chip):
    raw = copy.deepcopy(chip.to_dict())
    del raw["shared_memory"]
    with pytest.raises(CompileError, match="no \\[shared_memory\\]"):
        compile(CFG, Arch.from_dict(raw, origin="no_shared"), chips=1)


def test_a_model_that_does_not_fit_even_streamed_names_the_layer_and_the_shortfall():
    with pytest.raises(CompileError, match=r"even a 1x1 tile.*stream buffer.*short"):
        compile(CFG, small_chip(memory_bytes=1040), chips=1)  # the event buffer takes 1024
    with pytest.raises(CompileError, match=r"even with its weights streamed.*short; every matrix is streamed"):
        compile(RWKVConfig(vocab_size=97, n_layer=12, n_embd=64), small_chip(), chips=1)  # 85 matrices, 16 cores


def test_a_chip_whose_shared_memory_is_too_small_is_refused():
    with pytest.raises(CompileError, match=r"chip 0 streams .* MiB short"):
        compile(CFG, small_chip(capacity_bytes=(1, "KiB")), chips=1)


# ---------------------------------------------------------------------------------- conservation
def test_on_demand_fetches_exactly_the_rows_of_the_events(program, chip, tr):
    rep = simulate(program, tr, chip, fetch=FetchPlan("demand"))
    assert shared_bits(rep) == expected_bits(program, tr.mask)
    words = rep.tok_layer[:, :, ACTIONS.index("buffer_write")].sum()
    assert words == shared_bits(rep) / chip.core.data_word_bits and rep.meta["fetch"] == "demand"


def test_dense_streaming_fetches_every_weight_every_token(program, chip, tr):
    rep = simulate(program, tr, chip, fetch=FetchPlan("dense"))
    t = program.tiles
    assert shared_bits(rep) == tr.n_tokens * expected_bits(
        program, None, cols_of=lambda i: float(t.col1[i] - t.col0[i]))


def test_prefetch_fetches_the_predicted_rows_and_the_misses(program, chip, tr):
    p = fit_predictor("previous", tr)
    pred = predicted_trace(p, tr, 1.0)
    rep = simulate(program, tr, chip, fetch=FetchPlan("prefetch", pred, "previous"))
    hit_or_ahead = expected_bits(program, pred.mask)
    misses = expected_bits(program, lambda s: tr.mask(s) & ~pred.mask(s))
    assert shared_bits(rep) == hit_or_ahead + misses
    assert rep.meta["fetch"] == "prefetch (previous)"


def test_predicting_nothing_is_exactly_on_demand(program, chip, tr):
    none = predicted_trace(fit_predictor("none", tr), tr, 1.0)
    a = simulate(program, tr, chip, fetch=FetchPlan("prefetch", none, "none"))
    b = simulate(program, tr, chip, fetch=FetchPlan("demand"))
    np.testing.assert_array_equal(a.tok_layer, b.tok_layer)
    np.testing.assert_array_equal(a.phase_cycles, b.phase_cycles)


def test_dense_streaming_equals_on_demand_when_every_input_fires(program, chip):
    every = synthetic_trace(program, 6, sparsity=0.0)
    a = simulate(program, every, chip, fetch=FetchPlan("dense"))
    b = simulate(program, every, chip, fetch=FetchPlan("demand"))
    np.testing.assert_array_equal(a.tok_layer, b.tok_layer)
    np.testing.assert_array_equal(a.phase_cycles, b.phase_cycles)
    # and the dense baseline of any run is that: every weight streamed, every token
    assert a.summary()["energy_uJ_per_token"] == pytest.approx(b.dense["energy_pj"] / 1e6, rel=1e-12)


def test_an_oracle_costs_the_on_core_latency_plus_only_the_streaming_it_cannot_hide(program, chip, tr):
    oracle = predicted_trace(fit_predictor("oracle", tr), tr, 1.0)
    assert all((oracle.mask(s) == tr.mask(s)).all() for s in tr.sites)
    run = simulate(program, tr, chip, fetch=FetchPlan("prefetch", oracle, "oracle"))
    demand = simulate(program, tr, chip, fetch=FetchPlan("demand"))
    assert shared_bits(run) == shared_bits(demand)  # the same rows, fetched earlier
    # an infinitely fast store hides everything: the latency of weights held on the cores
    fast_chip = small_chip(bandwidth_bits_per_cycle=1e30, latency_cycles=0)
    fast_prog = compile(CFG, fast_chip, chips=1, seed=0)
    assert np.array_equal(fast_prog.tiles.core, program.tiles.core)
    held = simulate(fast_prog, tr, fast_chip, fetch=FetchPlan("prefetch", oracle, "oracle")).latency_cycles()
    base = simulate(fast_prog, tr, fast_chip, fetch=FetchPlan("demand")).latency_cycles()
    np.testing.assert_allclose(held, base)
    lat = run.latency_cycles()
    assert (lat >= held - 1e-9).all() and (lat <= demand.latency_cycles() + 1e-9).all()
    assert lat.sum() < demand.latency_cycles().sum()


def test_the_timeline_kernel_equals_its_numpy_twin():
    rng = np.random.default_rng(0)
    T, C, P = 5, 3, 7
    base = rng.random((T, P)) * 50
    dem = np.where(rng.random((T, C, P)) < 0.5, rng.random((T, C, P)) * 4000, 0.0)
    ahead = np.where(rng.random((T, C, P)) < 0.5, rng.random((T, C, P)) * 4000, 0.0)
    out = []
    for f in (fetch_timeline, fetch_timeline_numpy):
        extra = np.zeros((T, P))
        free = f(base, dem, ahead, 27.0, 32.0, np.zeros(C), extra)
        out.append((extra, free))
    np.testing.assert_allclose(out[0][0], out[1][0])
    np.testing.assert_allclose(out[0][1], out[1][1])
    assert (out[0][0] > 0).any()


def test_a_prefetch_plan_needs_a_prediction_of_the_streamed_sites(program, chip, tr):
    with pytest.raises(ValueError, match="predicted"):
        FetchPlan("prefetch")
    partial = EventTrace(model="x", sites=tr.sites[:1], widths=tr.widths[:1], n_tokens=tr.n_tokens,
                         masks={tr.sites[0]: tr.masks[tr.sites[0]]})
    with pytest.raises(ValueError, match="which the program streams"):
        simulate(program, tr, chip, fetch=FetchPlan("prefetch", partial, "x"))
