"""Every threshold algorithm on a self-attention model (OPT through transformers), and the
linear-cost ``horizon`` mode of the sequential calibration.

The OPT model is a tiny random ``OPTConfig`` (2 layers, hidden 32) whose calibration text it
sampled itself; both layouts are covered (opt-125m's pre-LN and opt-350m's post-LN with
embedding projections).
"""
import pytest
import torch

from rllm.model import RWKV, RWKVConfig, randomize_weights
from rllm.opt import EventOPT
from thresholds import Schedule, calibrate, sequential
from thresholds._core import Stream, head_nll, run_segments
from tests.test_opt import LAYOUTS, V, hand_hooked_reference, tiny_hf


pytestmark = pytest.mark.usefixtures("one_thread")


def sampled(model, n=8, T=33, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, V, (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(T - 1):
            p = torch.softmax(model(tok)[:, -1].float() * 2.0, -1)
            tok = torch.cat([tok, torch.multinomial(p, 1, generator=g)], 1)
    return tok


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS), scope="module")
def opt(request):
    hf = tiny_hf(**LAYOUTS[request.param])
    m = EventOPT(hf, name=f"tiny-opt-{request.param}")
    return m, sampled(m)


def test_opt_segments_reproduce_the_model(opt):
    m, tok = opt
    with torch.no_grad():
        x = run_segments(m, tok[:, :-1], 0)
        nll = head_nll(m, x, tok[:, 1:]).sum() / tok[:, 1:].numel()
        logits = m(tok[:, :-1])
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1))
    assert float(nll) == pytest.approx(float(ref), rel=1e-5)
    # cut in the middle: segment 0 from the ids, then the rest from the cached hidden states
    with torch.no_grad():
        h1 = run_segments(m, tok[:, :-1], 0, 1)
        assert torch.allclose(run_segments(m, h1, 1), x, atol=1e-5)


ALGS = {"sequential": dict(tolerance=0.05), "paper": dict(tolerance=0.01), "uniform": dict(sparsity=0.4),
        "teal": dict(sparsity=0.4), "cats": dict(sparsity=0.3), "finetune": dict(sparsity=0.4, steps=3)}


@pytest.mark.parametrize("algorithm", list(ALGS))
def test_every_algorithm_runs_on_opt_and_its_logits_match_hand_thresholding(opt, algorithm, tmp_path):
    m, tok = opt
    s = calibrate(m, tok, algorithm, cache=False, progress=False, **ALGS[algorithm])
    assert set(s.thresholds) == set(m.sites)
    if algorithm != "sequential":  # the sequential one may legitimately stop at 0 on a 2-layer toy
        assert s.sparsity_mac_weighted > s.summary["natural_mac_weighted"]
    loaded = Schedule.load(s.save(tmp_path / "s.json"), model=m)
    thr = {n: torch.as_tensor(t, dtype=torch.float32) for n, t in loaded.thresholds.items()}
    ref = hand_hooked_reference(m.hf, thr)
    loaded.apply(m)
    try:
        with torch.no_grad():
            got, want = m(tok), ref(input_ids=tok).logits
    finally:
        m.set_thresholds({n: 0.0 for n in m.sites})
    assert torch.allclose(got, want, atol=1e-5)


def test_horizon_to_the_head_is_the_exact_search():
    m = randomize_weights(RWKV(RWKVConfig(vocab_size=64, n_layer=2, n_embd=32)), seed=0).eval()
    tok = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(0))
    exact = sequential(m, tok, tolerance=0.05, progress=False, margin=0)
    full = sequential(m, tok, tolerance=0.05, progress=False, margin=0, horizon=4)  # 2 layers = 4 segments
    assert full.thresholds == exact.thresholds
    assert full.summary["loss"] == pytest.approx(exact.summary["loss"], rel=1e-6)


def test_horizon_estimate_is_exact_for_the_last_segment_and_close_before_it():
    """The first-order estimate (perturbation carried to the head along the residual) equals the
    true loss when the horizon reaches the head, and stays near it one segment short."""
    m = randomize_weights(RWKV(RWKVConfig(vocab_size=64, n_layer=2, n_embd=32)), seed=0).eval()
    tok = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(0))
    site = m.sites["blocks.0.ffn.key"]
    cands = [torch.tensor(v) for v in (0.05, 0.2)]
    with torch.no_grad():
        exact = Stream(m, tok, torch.device("cpu"))
        exact.loss()
        exact.advance_to(1)
        want = exact.candidate_losses(site, cands)
        for H, rel in ((3, 1e-6), (1, 0.02)):
            st = Stream(m, tok, torch.device("cpu"), horizon=H)
            st.loss()
            st.advance_to(1)
            got = st.candidate_losses(site, cands)
            assert got == pytest.approx(want, rel=rel), H


def test_kl_losses_with_the_dense_log_probabilities_kept_equal_recomputing_them(monkeypatch):
    """The KL objective keeps the dense model's distribution once computed and takes the divergence
    as ``sum p log p - p . logits + logsumexp``; every candidate's loss equals, to float32
    rounding, the plain ``sum p (log p - log q)`` with the dense side recomputed (the cache off)."""
    import thresholds._core as core
    m = randomize_weights(RWKV(RWKVConfig(vocab_size=97, n_layer=2, n_embd=32)), seed=3).eval()
    toks = torch.randint(0, 97, (6, 33), generator=torch.Generator().manual_seed(4))
    site = m.sites["blocks.1.att.key"]

    def losses():
        m.set_thresholds({n: 0.0 for n in m.sites})
        st = Stream(m, toks, torch.device("cpu"), batch_tokens=64, objective="kl")
        dense = st.loss(rows=True)
        st.advance_to(st.segs.segment_of("blocks.1.att.key"))
        cands = [torch.tensor(q) for q in (0.05, 0.2, 0.5)]
        return dense, st.candidate_losses(site, cands, 1), st.candidate_losses(site, cands, 3), st._lp_cache

    with torch.no_grad():
        kept = losses()
        monkeypatch.setitem(core.DENSE_CACHE_BYTES, "cpu", 0)
        recomputed = losses()
    assert isinstance(kept[3], dict) and kept[3] and recomputed[3] is False
    assert kept[0][0] == pytest.approx(recomputed[0][0], rel=1e-6)
    torch.testing.assert_close(kept[0][1], recomputed[0][1], rtol=1e-6, atol=0)
    assert kept[1] == pytest.approx(recomputed[1], rel=1e-6)
    assert kept[2] == pytest.approx(recomputed[2], rel=1e-6)  # 3 stacked candidates: other row slices
    assert kept[1] != pytest.approx(kept[0][0], rel=1e-6)  # the candidates do move the loss
