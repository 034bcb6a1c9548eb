"""The functional simulator: cores that accumulate the events the Program routes to them reproduce
the model's logits, count what the trace and the counting simulator count, and go wrong as soon as
one weight tile, one route or one partial sum is missing."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from compiler import Program, Table, compile
from rllm.events import trace
from rllm.model import RWKV, RWKVConfig, randomize_weights
from seneca_sim.arch import Arch, load_arch
from seneca_sim.functional import (deliver_events, deliver_events_numpy, reduce_rows, reduce_rows_numpy,
                                   run_functional, to_bf16)

CFG = RWKVConfig(vocab_size=97, n_layer=2, n_embd=64)  # ffn 256
T = 64
SPARSITY = 0.6
ASSET = Path(__file__).resolve().parents[1] / "rllm" / "assets" / "rwkv_tiny"


# ------------------------------------------------------------------------------------ helpers
def small_chip(memory_kib: float = 8, mesh: int = 4, max_chips: int = 8) -> Arch:
    """The shipped chip with tiny cores, so a 64-wide model splits its matrices over many cores."""
    raw = copy.deepcopy(load_arch().to_dict())
    raw["core"]["data_memory_bytes"] = {"value": memory_kib, "unit": "KiB", "assumed": True, "rationale": "test"}
    for k in ("mesh_rows", "mesh_cols"):
        raw["chip"][k] = {"value": mesh, "unit": "cores", "assumed": True, "rationale": "test"}
    raw["chip"]["max_chips"] = {"value": max_chips, "unit": "chips", "assumed": True, "rationale": "test"}
    return Arch.from_dict(raw, origin="small_chip")


@torch.no_grad()
def quantile_thresholds(model: RWKV, tokens: torch.Tensor, q: float) -> dict[str, float]:
    """Uniform sparsity: per site, the quantile ``q`` of |input| over ``tokens`` (thresholds 0),
    placed midway between two activation values so that no input sits exactly on it."""
    seen: dict[str, np.ndarray] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, i[0].abs().reshape(-1).numpy()))
             for n, m in model.sites.items()]
    try:
        model(tokens.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    th = {}
    for n, v in seen.items():
        a = np.sort(v)
        k = int(q * a.size)
        th[n] = float((a[k - 1] + a[k]) / 2)
    return th


@torch.no_grad()
def replay_logits(model: RWKV, tokens: torch.Tensor, masks: dict[str, np.ndarray], thresholds: dict,
                  rel: float = 1e-5) -> tuple[np.ndarray, int]:
    """Sequence-mode logits of the torch model when every site fires exactly the chip's events
    (``masks``, bit-packed per token). Asserts that wherever the chip's decision differs from the
    model's own ``|x| >= t``, ``|x|`` lies within ``rel`` of ``t``: a float32 rounding tie, not a
    mapping error. Returns the logits and the number of such ties."""
    ties = 0

    def hook(n):
        def fn(mod, inputs, output):
            nonlocal ties
            x = inputs[0]
            fire = np.unpackbits(masks[n], axis=1, bitorder="little")[:, :x.shape[-1]].astype(bool)
            fire = torch.from_numpy(fire).view(x.shape)
            t = float(thresholds.get(n, 0.0))
            own = (x.abs() >= t) & (x != 0)
            differ = own != fire
            assert (((x.abs() - t).abs() <= rel * t) | ~differ).all(), f"{n}: the chip fired a different event"
            ties += int(differ.sum())
            return torch.where(fire, x, torch.zeros((), dtype=x.dtype))
        return fn

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.sites.items()]
    try:
        logits = model(tokens.unsqueeze(0))[0].numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, ties


@torch.no_grad()
def step_logits(model: RWKV, tokens: torch.Tensor, thresholds: dict) -> np.ndarray:
    """Logits of the torch model in recurrent step mode (what the chip runs)."""
    saved = model.get_thresholds()
    model.set_thresholds(thresholds)
    state, out = None, []
    for tok in tokens:
        logits, state = model.step(tok.view(1), state)
        out.append(logits[0])
    model.set_thresholds(saved)
    return torch.stack(out).numpy()


def bf16_rounded(model: RWKV, program: Program) -> RWKV:
    """A copy of ``model`` whose on-chip matrices are rounded to bfloat16 (computed in float32)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        sd = m.state_dict()
        for site in program.site_names:
            w = sd[f"{site}.weight"]
            w.copy_(w.to(torch.bfloat16).float())
    return m


def without(table: Table, drop: np.ndarray) -> Table:
    keep = np.ones(len(table), dtype=bool)
    keep[drop] = False
    return Table(**{c: getattr(table, c)[keep] for c in table.columns})


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.nan_to_num(np.abs(a - b), nan=np.inf).max())


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def chip() -> Arch:
    return small_chip()


@pytest.fixture(scope="module")
def program(chip) -> Program:
    # ffn.value of block 0 priced dense -> split by inputs; of block 1 at 50% -> grid; the rest by outputs
    return compile(CFG, chip, expected_sparsity={"blocks.0.ffn.value": 0.0}, seed=1)


@pytest.fixture(scope="module")
def model() -> RWKV:
    return randomize_weights(RWKV(CFG), seed=0).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (T,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def thresholds(model, tokens) -> dict[str, float]:
    return quantile_thresholds(model, tokens, SPARSITY)


@pytest.fixture(scope="module")
def result(program, chip, model, tokens, thresholds):
    return run_functional(program, model.state_dict(), tokens.numpy(), thresholds, arch=chip)


# ------------------------------------------------------------------------------------ tests
def test_program_splits_matrices_every_way(program):
    assert set(program.sites.split.tolist()) == {"by_outputs", "by_inputs", "grid"}
    assert program.n_cores > 30 and len(program.psums) > 0


def test_float32_chip_reproduces_the_torch_step_logits(result, model, tokens, thresholds):
    ref = step_logits(model, tokens, thresholds)
    sp = result.sparsity()
    assert (sp.sparsity >= 0.5).all() and sp.sparsity.mean() >= 0.55
    assert result.undelivered.sum() == 0
    assert max_diff(result.logits, ref) <= 1e-4 * np.abs(ref).max()


def test_bf16_weights_chip_matches_a_model_with_bf16_weights(program, model, tokens):
    m16 = bf16_rounded(model, program)
    th = quantile_thresholds(m16, tokens, SPARSITY)
    res = run_functional(program, model.state_dict(), tokens.numpy(), th, fmt="bf16_weights")
    ref16 = step_logits(m16, tokens, th)
    assert (res.sparsity().sparsity >= 0.5).all()
    assert max_diff(res.logits, ref16) <= 1e-4 * np.abs(ref16).max()


def test_bf16_weights_chip_differs_from_float32_by_the_rounding_bf16_implies(program, model, tokens):
    # at threshold 0 no event can flip, so the difference is the weights' rounding alone: of the
    # order of bf16's unit roundoff 2^-9 relative to the logits, far above float32's
    res = run_functional(program, model.state_dict(), tokens.numpy(), fmt="bf16_weights")
    ref = step_logits(model, tokens, {})
    scale = np.abs(ref).max()
    assert 1e-4 * scale < max_diff(res.logits, ref) <= 2.0 ** -6 * scale


def test_bf16_chip_accumulates_every_matrix_as_torch_bfloat16_arithmetic_does(program, model, tokens):
    """fmt="bf16": the event values, each product and each running sum are bfloat16. Reference:
    torch's bfloat16 tensors, one event at a time in the chip's order (ascending channel), on a
    matrix whose tiles each hold whole rows (so the owner's reduction adds one partial sum to 0)."""
    from seneca_sim.functional import load_chip
    s = int(np.flatnonzero(program.sites.split == "by_outputs")[0])
    site, (R, N) = program.site_names[s], (int(program.sites.out_dim[s]), int(program.sites.in_dim[s]))
    chip16 = load_chip(program, model.state_dict(), fmt="bf16")
    x = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    x[::3] = 0.0  # silent inputs
    W = model.state_dict()[f"{site}.weight"].to(torch.bfloat16)
    y = torch.zeros(R, dtype=torch.bfloat16)
    for c in np.flatnonzero(x):
        y = y + torch.tensor(x[c]).to(torch.bfloat16) * W[:, c]
    got = chip16.matvec(site, x)
    np.testing.assert_array_equal(got, y.float().numpy())
    exact = load_chip(program, model.state_dict(), fmt="bf16_weights").matvec(site, x)
    assert not np.array_equal(got, exact)  # the accumulators' rounding is there, not only the weights'


def test_bf16_chip_stays_near_float32_and_is_further_off_than_bf16_weights(program, model, tokens):
    ref = step_logits(model, tokens, {})
    scale = np.abs(ref).max()
    w16 = max_diff(run_functional(program, model.state_dict(), tokens.numpy(), fmt="bf16_weights").logits, ref)
    a16 = max_diff(run_functional(program, model.state_dict(), tokens.numpy(), fmt="bf16").logits, ref)
    assert w16 < a16 <= 2.0 ** -4 * scale


def test_bf16_accumulators_need_a_bf16_state_format(program, model):
    other = Program(**{**{k: getattr(program, k) for k in program.__dataclass_fields__},
                       "meta": {**program.meta, "state_format": "fp16"}})
    with pytest.raises(ValueError, match="bf16_weights"):
        run_functional(other, model.state_dict(), [1], fmt="bf16")


def test_events_per_core_are_those_the_trace_implies(result, program, model, tokens, thresholds):
    tr = trace(model, tokens, thresholds, include_head=True)
    expected_in = np.zeros_like(result.events_in)
    expected_macs = np.zeros_like(result.macs)
    tl = program.tiles
    for s, site in enumerate(program.site_names):
        mask = tr.mask(site)
        np.testing.assert_array_equal(result.masks[site], tr.masks[site], err_msg=site)
        for i in np.flatnonzero(tl.site == s):
            ev = mask[:, tl.col0[i]:tl.col1[i]].sum(axis=1)
            expected_in[:, tl.core[i]] += ev
            expected_macs[:, tl.core[i]] += ev * (tl.row1[i] - tl.row0[i])
    np.testing.assert_array_equal(result.events_in, expected_in)
    np.testing.assert_array_equal(result.macs, expected_macs)


def test_counts_agree_with_the_counting_simulator(result, program, chip):
    from seneca_sim.counting import simulate

    totals = simulate(program, result.to_trace(), chip).core_totals()
    tot = totals.groupby(["core", "action"])["count"].sum().unstack(fill_value=0)
    tot = tot.reindex(np.arange(program.n_cores), fill_value=0)
    mine = result.core_totals()
    for action, col in (("event_ingest", "events_in"), ("mac", "macs"), ("psum_ingest", "psums_in")):
        np.testing.assert_array_equal(tot[action].to_numpy(), mine[col].to_numpy(), err_msg=action)
    # a core generates its events, its partial sums and, every token, the dense copies it sends
    copies = np.bincount(program.transfers.src, program.transfers.pairs, minlength=program.n_cores)
    sent = mine.events_out + mine.psums_out + result.n_tokens * copies
    np.testing.assert_array_equal(tot["event_generate"].to_numpy(), sent.to_numpy())
    assert mine.psums_out.sum() == mine.psums_in.sum() > 0


@pytest.mark.parametrize("split", ["by_outputs", "by_inputs", "grid"])
def test_a_dropped_tile_makes_the_logits_wrong(split, program, model, tokens, thresholds):
    s = int(np.flatnonzero(program.sites.split == split)[0])
    tile = np.flatnonzero(program.tiles.site == s)[-1]
    broken = dataclasses.replace(program, tiles=without(program.tiles, tile))
    ok = run_functional(program, model.state_dict(), tokens.numpy()[:16], thresholds)
    bad = run_functional(broken, model.state_dict(), tokens.numpy()[:16], thresholds)
    assert max_diff(bad.logits, ok.logits) > 1e-2 * np.abs(ok.logits).max()


def test_a_dropped_route_destination_or_partial_sum_makes_the_logits_wrong(program, model, tokens, thresholds):
    ok = run_functional(program, model.state_dict(), tokens.numpy()[:16], thresholds)
    scale = np.abs(ok.logits).max()
    route = int(np.flatnonzero(program.routes.site == program.site_index("blocks.0.att.key"))[0])
    dest = int(np.flatnonzero(program.route_dests.route == route)[0])
    broken = dataclasses.replace(program, route_dests=without(program.route_dests, dest))
    bad = run_functional(broken, model.state_dict(), tokens.numpy()[:16], thresholds)
    assert bad.undelivered.sum() > 0 or bad.events_in.sum() < ok.events_in.sum()
    assert max_diff(bad.logits, ok.logits) > 1e-2 * scale
    broken = dataclasses.replace(program, psums=without(program.psums, 0))
    bad = run_functional(broken, model.state_dict(), tokens.numpy()[:16], thresholds)
    assert max_diff(bad.logits, ok.logits) > 1e-2 * scale


def test_a_row_without_owner_is_nan(program, model, tokens):
    s = program.site_index("blocks.1.att.output")
    broken = dataclasses.replace(program, owners=without(program.owners, np.flatnonzero(program.owners.site == s)[0]))
    bad = run_functional(broken, model.state_dict(), tokens.numpy()[:2])
    assert np.isnan(bad.logits).all()


def test_a_program_without_the_head_leaves_it_to_the_host(chip, model, tokens, thresholds):
    prog = compile(CFG, chip, include_head=False, improve=False)
    res = run_functional(prog, model.state_dict(), tokens.numpy()[:16], thresholds)
    ref = step_logits(model, tokens[:16], thresholds)
    assert "head" not in res.site_names
    assert max_diff(res.logits, ref) <= 1e-4 * np.abs(ref).max()


def test_numba_kernels_equal_their_numpy_twins():
    rng = np.random.default_rng(0)
    rows = np.array([5, 3, 7], dtype=np.int64)
    cols = np.array([4, 4, 6], dtype=np.int64)
    col0 = np.array([0, 4, 2], dtype=np.int64)
    woff = np.concatenate([[0], np.cumsum(rows * cols)[:-1]]).astype(np.int64)
    aoff = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    weights = rng.standard_normal(int((rows * cols).sum())).astype(np.float32)
    chan = [[0], [0], [0, 2], [0, 2], [1, 2], [1, 2], [2], [2]]  # channel -> tiles holding its column
    chan_ptr = np.concatenate([[0], np.cumsum([len(c) for c in chan])]).astype(np.int64)
    chan_tile = np.concatenate(chan).astype(np.int64)
    ev_idx = np.array([0, 3, 4, 7, 5], dtype=np.int64)
    ev_val = rng.standard_normal(5).astype(np.float32)
    for bf16 in (False, True):
        outs = []
        for deliver, reduce in ((deliver_events, reduce_rows), (deliver_events_numpy, reduce_rows_numpy)):
            acc = np.zeros(int(rows.sum()), np.float32)
            tev = np.zeros(3, np.int64)
            deliver(ev_idx, ev_val, chan_ptr, chan_tile, woff, rows, col0, aoff, weights, acc, tev, bf16)
            out = np.zeros(7, np.float32)
            reduce(acc, np.array([0, 5, 8, 9, 1], dtype=np.int64), np.array([0, 0, 1, 0, 6], dtype=np.int64), out,
                   bf16)
            outs.append((acc, tev, out))
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)
        assert bf16 == bool((to_bf16(outs[0][2]) == outs[0][2]).all() and (to_bf16(outs[0][0]) == outs[0][0]).all())


@pytest.mark.parametrize("fmt", ["float32", "bf16"])
def test_numpy_twin_runs_the_same_chip(program, model, tokens, thresholds, fmt):
    a = run_functional(program, model.state_dict(), tokens.numpy()[:4], thresholds, fmt=fmt)
    b = run_functional(program, model.state_dict(), tokens.numpy()[:4], thresholds, kernel="numpy", fmt=fmt)
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.macs, b.macs)


def test_bf16_rounding_is_round_to_nearest_even_like_torch():
    x = np.concatenate([np.random.default_rng(0).standard_normal(10000) * 10.0 ** np.arange(-5, 5).repeat(1000),
                        [1 + 2 ** -8, 1 + 3 * 2 ** -8, 0.0, -0.0, 65504.0]]).astype(np.float32)
    np.testing.assert_array_equal(to_bf16(x), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_bad_inputs_are_refused_where_they_enter(program, model, tokens):
    sd = model.state_dict()
    with pytest.raises(KeyError, match="blocks.0.att.key.weight"):
        run_functional(program, {k: v for k, v in sd.items() if k != "blocks.0.att.key.weight"}, [1])
    with pytest.raises(KeyError, match="unknown site"):
        run_functional(program, sd, [1], {"blocks.9.att.key": 0.1})
    with pytest.raises(ValueError, match="compiled for"):
        run_functional(program, sd, [1], arch=load_arch())
    with pytest.raises(ValueError, match="fmt"):
        run_functional(program, sd, [1], fmt="int3")


@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(),
                    reason=f"shipped model rwkv_tiny not found at {ASSET} (model.safetensors)")
def test_shipped_rwkv_tiny_runs_on_the_chip():
    from rllm.weights import load_checkpoint

    loaded = load_checkpoint(ASSET)
    m = loaded.model.float().eval()
    text = (ASSET / "eval.txt").read_text(encoding="utf-8") if (ASSET / "eval.txt").is_file() else ""
    ids = loaded.tokenizer.encode(text).ids[:T] if loaded.tokenizer is not None and text else []
    if len(ids) < T:
        ids = torch.randint(0, m.config.vocab_size, (T,), generator=torch.Generator().manual_seed(0)).tolist()
    toks = torch.tensor(ids)
    th = quantile_thresholds(m, toks, SPARSITY)
    prog = compile(m.config, load_arch(), seed=0)
    res = run_functional(prog, m.state_dict(), toks.numpy(), th)
    assert (res.sparsity().sparsity >= 0.5).all() and res.undelivered.sum() == 0
    # 64 tokens make ~10^6 threshold decisions: a few may tie within float32 rounding, so the model
    # replays the chip's events (and the replay checks that every differing decision is such a tie)
    ref, ties = replay_logits(m, toks, res.masks, th)
    assert ties <= 10
    assert max_diff(res.logits, ref) <= 1e-4 * np.abs(ref).max()
