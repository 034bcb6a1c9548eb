"""The field's baselines: uniform, TEAL-style greedy, CATS-style FFN-only, fine-tuned thresholds."""
import math

import pytest
import torch

from rllm.model import RWKV, RWKVConfig, randomize_weights
from thresholds import cats, finetune, teal, teal_trajectory, uniform


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    m = randomize_weights(RWKV(RWKVConfig(vocab_size=64, n_layer=2, n_embd=32)), seed=0).eval()
    tok = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(0))
    return m, tok


def test_uniform_hits_its_target(setup):
    m, tok = setup
    s = uniform(m, tok, sparsity=0.5, progress=False)
    for n, v in s.sparsity.items():
        if n == "head":
            assert s.thresholds[n] == 0.0
        elif v["natural"] < 0.45:  # sites already sparser than the target keep threshold 0
            assert v["sparsity"] == pytest.approx(0.5, abs=0.05), n
    s = uniform(m, tok, sparsity=0.5, stats="sequential", progress=False)  # exact on the data it saw
    assert all(abs(v["sparsity"] - 0.5) < 0.02 for n, v in s.sparsity.items() if n != "head" and v["natural"] < 0.45)
    s = uniform(m, tok, sparsity=0.6, target="mac", progress=False)
    assert s.summary["sparsity_mac_weighted"] == pytest.approx(0.6, abs=0.03)


def test_teal_reaches_its_target_from_one_trajectory(setup):
    m, tok = setup
    traj = teal_trajectory(m, tok, step=0.1, greedy_tokens=128, progress=False)
    assert all(a[0] <= b[0] for pts in traj.points for a, b in zip(pts, pts[1:]))
    for target in (0.4, 0.6):
        s = teal(m, tok, sparsity=target, trajectory=traj, progress=False)
        assert s.summary["sparsity_mac_weighted"] == pytest.approx(target, abs=0.03)
        assert s.cost_s >= traj.cost_s
    # the greedy spends its budget unevenly: not every site at the same sparsity
    sp = [v["sparsity"] for n, v in s.sparsity.items() if n != "head"]
    assert max(sp) - min(sp) > 0.1


def test_cats_touches_only_the_ffn(setup):
    m, tok = setup
    s = cats(m, tok, sparsity=0.4, progress=False)
    assert s.summary["sparsity_mac_weighted"] == pytest.approx(0.4, abs=0.03)
    assert all(t == 0.0 for n, t in s.thresholds.items() if ".ffn." not in n)
    assert all(t > 0 for n, t in s.thresholds.items() if ".ffn." in n)
    inner = cats(m, tok, sparsity=0.3, sites="inner", progress=False)
    assert [n for n, t in inner.thresholds.items() if t > 0] == ["blocks.0.ffn.value", "blocks.1.ffn.value"]


def test_finetune_lowers_its_objective(setup):
    m, tok = setup
    before = {n: t.clone() for n, t in m.get_thresholds().items()}
    s = finetune(m, tok, sparsity=0.5, steps=15, lr=0.05, batch_seqs=4, train_len=32, progress=False)
    assert s.extra["objective_end"] < s.extra["objective_start"]
    flat = [x for t in s.thresholds.values() for x in (t if isinstance(t, list) else [t])]
    assert all(math.isfinite(x) and x >= 0 for x in flat)
    assert s.summary["sparsity_mac_weighted"] == pytest.approx(0.5, abs=0.02)
    # the model is left as it was: thresholds restored, weights trainable again
    assert all(torch.equal(before[n], t) for n, t in m.get_thresholds().items())
    assert all(p.requires_grad for p in m.parameters())
