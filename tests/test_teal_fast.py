"""TEAL's greedy on RWKV-4: the fast candidate evaluation (only what a candidate changes, on the
positions the error reads) walks the same path as the whole block run for every candidate, and a
path stopped early is the prefix of the full one."""
import pytest
import torch

import thresholds.baselines as B
from rllm.model import RWKV, RWKVConfig, randomize_weights
from thresholds import teal, teal_trajectory

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    m = randomize_weights(RWKV(RWKVConfig(vocab_size=64, n_layer=2, n_embd=32)), seed=0).eval()
    tok = torch.randint(0, 64, (6, 25), generator=torch.Generator().manual_seed(0))
    return m, tok


@pytest.fixture(scope="module")
def full(setup):
    m, tok = setup
    return teal_trajectory(m, tok, step=0.1, progress=False)


def _checked(record):
    """``_RWKVBlockEval`` that also computes every step's errors the generic way (the whole block
    for every candidate, on all positions) and records both."""
    class Checked(B._RWKVBlockEval):
        def __init__(self, model, i, hs, refs, last_fraction):
            super().__init__(model, i, hs, refs, last_fraction)
            self.args = model, i, hs, refs, last_fraction

        def errors(self, cand, new_t, thr):
            hits = self.memo_hits
            fast = super().errors(cand, new_t, thr)
            model, i, hs, refs, lf = self.args
            record.append((list(cand), fast, B._block_errors(model, hs, refs, 2 * i, 2 * i + 2, cand, new_t, thr, lf),
                           self.memo_hits - hits))
            return fast
    return Checked


@pytest.mark.parametrize("last_fraction,batch_tokens", [(0.25, 8192), (0.5, 100), (1.0, 8192)])
def test_fast_path_equals_the_whole_block_for_every_candidate(setup, monkeypatch, last_fraction, batch_tokens):
    """Same points block by block (so the same choice at every step), errors equal to float
    rounding; with several minibatches of unequal size, and with the error on every position
    (no shifted-in position to drop)."""
    m, tok = setup
    kw = dict(step=0.1, last_fraction=last_fraction, batch_tokens=batch_tokens, progress=False)
    ref = teal_trajectory(m, tok, fast=False, **kw)
    record = []
    monkeypatch.setattr(B, "_RWKVBlockEval", _checked(record))
    got = teal_trajectory(m, tok, **kw)
    assert len(got.points) == len(ref.points) == 2
    for g, r in zip(got.points, ref.points):
        assert len(g) == len(r) > 10
        assert g == r  # block sparsities and thresholds, exactly
    assert len(record) == sum(len(p) - 1 for p in ref.points)
    assert {len(c) for c, _, _, _ in record} >= {7}
    # pieces kept from earlier steps were used (a step that moved a channel-mix site leaves the
    # time-mix candidates' pieces valid), and the errors still equal the whole block's
    assert sum(h for *_, h in record) > len(record)
    for cand, fast, slow, _ in record:
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=0)
        assert int(torch.argmin(fast)) == int(torch.argmin(slow))
    # the model is left as it was
    assert all(float(t) == 0.0 for t in m.get_thresholds().values())


def test_fast_path_when_sites_reach_max_level(setup):
    """Sites that reach ``max_level`` drop out of the candidates: the candidate sets shrink and
    the path ends when none is left."""
    m, tok = setup
    kw = dict(step=0.2, max_level=0.6, max_sparsity=0.99, progress=False)
    got, ref = teal_trajectory(m, tok, **kw), teal_trajectory(m, tok, fast=False, **kw)
    assert got.points == ref.points
    assert all(p[-1][0] < 0.99 for p in got.points)  # stopped for want of candidates


def _prefix(pts, m):
    k = next((j for j, p in enumerate(pts) if p[0] >= m), len(pts) - 1)
    return pts[:k + 1]


@pytest.mark.parametrize("max_sparsity", [0.5, 0.75])
def test_a_path_stopped_early_is_the_prefix_of_the_full_one(setup, full, max_sparsity):
    m, tok = setup
    part = teal_trajectory(m, tok, step=0.1, max_sparsity=max_sparsity, progress=False)
    for p, f in zip(part.points, full.points):
        assert p == _prefix(f, max_sparsity)
        assert p[-1][0] >= max_sparsity and all(x[0] < max_sparsity for x in p[:-1])
        assert len(p) < len(f)
    # every target up to max_sparsity takes the same point of every block (the nearest point
    # of a non-decreasing path never lies past the first point at or above the target)
    for s in [i / 200 for i in range(int(max_sparsity * 200) + 1)] + [max_sparsity]:
        assert part.thresholds_for(s) == full.thresholds_for(s), s
    assert part.params == {**full.params, "max_sparsity": max_sparsity}


def test_teal_schedule_from_the_fast_path_is_the_reference_one(setup, full):
    m, tok = setup
    ref = teal_trajectory(m, tok, step=0.1, fast=False, progress=False)
    assert ref.points == full.points and ref.key() == full.key()
    a = teal(m, tok, sparsity=0.5, trajectory=full, progress=False)
    b = teal(m, tok, sparsity=0.5, trajectory=ref, progress=False)
    assert a.thresholds == b.thresholds and a.summary["loss"] == b.summary["loss"]
