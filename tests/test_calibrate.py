"""Sequential calibration (ours), the segment machinery it relies on, and the CLI. The authors'
procedure is tested in test_paper.py."""
import pytest
import torch

from rllm.model import RWKV, RWKVConfig, randomize_weights, sequence_loss
from thresholds import Schedule, calibrate, sequential
from thresholds._core import Stream, head_nll, run_segments
from thresholds.calibrate import main, resolve_params


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    """A random model whose calibration text is sampled from itself (so thresholds can only hurt)."""
    torch.manual_seed(0)
    m = randomize_weights(RWKV(RWKVConfig(vocab_size=64, n_layer=2, n_embd=32)), seed=0).eval()
    with torch.no_grad():
        m.head.weight.mul_(6.0)  # a confident model
        g = torch.Generator().manual_seed(1)
        tok = torch.zeros(16, 65, dtype=torch.long)
        tok[:, 0] = torch.randint(0, 64, (16,), generator=g)
        logits, state = m.step(tok[:, 0])
        for t in range(1, 65):
            tok[:, t] = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
            logits, state = m.step(tok[:, t], state)
    return m, tok


def test_segments_reproduce_the_model(setup):
    m, tok = setup
    m.set_thresholds({"blocks.0.att.value": 0.2, "blocks.1.ffn.key": 0.3})
    try:
        with torch.no_grad():
            x = run_segments(m, m.emb(tok[:, :-1]), 0)
            nll = head_nll(m, x, tok[:, 1:]).sum() / tok[:, 1:].numel()
            assert float(nll) == pytest.approx(float(sequence_loss(m, tok)), rel=1e-5)
    finally:
        m.set_thresholds({n: 0.0 for n in m.sites})


def test_batched_candidates_equal_one_by_one(setup):
    m, tok = setup
    site = m.sites["blocks.1.att.output"]
    with torch.no_grad():
        st = Stream(m, tok, torch.device("cpu"), batch_tokens=256)  # several minibatches
        st.advance_to(2)
        cands = [torch.tensor(v) for v in (0.0, 0.05, 0.2)] + [torch.rand(32) * 0.2]
        one = st.candidate_losses(site, cands, group=1)
        many = st.candidate_losses(site, cands, group=3)
        direct = []
        for c in cands:
            m.set_thresholds({"blocks.1.att.output": c})
            direct.append(float(sequence_loss(m, tok)))
        m.set_thresholds({"blocks.1.att.output": 0.0})
    assert one == pytest.approx(many, rel=1e-6) and one == pytest.approx(direct, rel=1e-5)


def test_tolerance_zero_gives_zero_thresholds(setup):
    m, tok = setup
    s = sequential(m, tok, tolerance=0.0, progress=False)
    assert all(t == 0.0 for t in s.thresholds.values())
    assert s.summary["sparsity_mac_weighted"] == pytest.approx(s.summary["natural_mac_weighted"])


def test_more_tolerance_never_less_sparsity(setup):
    m, tok = setup
    sp, losses = [], []
    for tol in (0.01, 0.05, 0.3):
        s = sequential(m, tok, tolerance=tol, progress=False)
        sp.append(s.summary["sparsity_mac_weighted"])
        losses.append(s.summary["loss_increase"])
        # the global budget holds on the calibration data (for the KL objective: on dense NLL + KL,
        # the quantity it budgets; the NLL itself may differ by noise)
        assert s.extra["search_loss"] / s.summary["dense_loss"] - 1 <= tol + 1e-6
        nll = sequential(m, tok, tolerance=tol, objective="nll", progress=False)
        assert nll.summary["loss_increase"] <= tol + 1e-6
    assert all(b >= a - 1e-9 for a, b in zip(sp, sp[1:])), sp
    assert sp[-1] > sp[0] + 0.05, sp  # the knob does something


def test_per_channel_thresholds(setup):
    m, tok = setup
    s = sequential(m, tok, tolerance=0.05, per_channel=True, progress=False)
    widths = {n: site.width for n, site in m.sites.items()}
    assert any(isinstance(t, list) for t in s.thresholds.values())
    for n, t in s.thresholds.items():
        assert not isinstance(t, list) or len(t) == widths[n]
    s.apply(m)
    m.set_thresholds({n: 0.0 for n in m.sites})


def test_resolve_params_resolves_every_default_and_rejects_unknown():
    seq = resolve_params("sequential", {})
    assert seq["search"] == "scan" and seq["floor"] == "auto" and seq["objective"] == "kl"  # what the run uses
    assert resolve_params("sequential", {"rule": "share"})["search"] == "bisect"
    assert resolve_params("paper", {})["tolerance"] == 5e-4
    with pytest.raises(TypeError, match="tolerence"):
        resolve_params("sequential", {"tolerence": 0.1})
    with pytest.raises(TypeError, match="sparsity"):
        resolve_params("uniform", {})


def test_cli_writes_a_valid_schedule(tmp_path, capsys):
    out = tmp_path / "s.json"
    rc = main(["random:2:16:64", "--algorithm", "sequential", "--tolerance", "0.05", "--tokens", "256",
               "--seq-len", "32", "--out", str(out), "--no-cache", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "MAC-weighted" in text and "blocks.1.ffn.value" in text and "natural" in text
    s = Schedule.load(out)
    assert s.algorithm == "sequential" and len(s.thresholds) == 15
    with pytest.raises(SystemExit):  # argparse: uniform takes --sparsity
        main(["random:2:16:64", "--algorithm", "uniform", "--tolerance", "0.1", "--out", str(out)])


def test_shrink_toward_uniform(setup):
    """shrink: lambda=0 gives uniform's allocation at the same MAC-weighted sparsity, 1 keeps the
    schedule, "auto" cross-fits lambda on the calibration halves and records it."""
    from thresholds import uniform
    from thresholds.sequential import SHRINK_GRID, shrink_toward_uniform
    m, tok = setup
    base = sequential(m, tok, tolerance=0.05, progress=False)
    one = sequential(m, tok, tolerance=0.05, shrink=1.0, progress=False)
    assert one.thresholds == base.thresholds and one.params["shrink"] == 1.0
    zero = sequential(m, tok, tolerance=0.05, shrink=0.0, progress=False)
    u = uniform(m, tok, sparsity=base.sparsity_mac_weighted, target="mac", progress=False)
    assert zero.thresholds == pytest.approx(u.thresholds, rel=1e-3, abs=1e-6)
    half = shrink_toward_uniform(m, tok, base, 0.5)  # one scalar per block site
    assert set(half) == {n for n in m.sites if n != "head"} and all(isinstance(t, float) for t in half.values())
    for s in (zero, sequential(m, tok, tolerance=0.05, shrink=0.5, progress=False)):
        assert s.sparsity_mac_weighted == pytest.approx(base.sparsity_mac_weighted, abs=0.03)
    auto = sequential(m, tok, tolerance=0.05, shrink="auto", progress=False)
    assert auto.extra["shrink"]["lambda"] in SHRINK_GRID and len(auto.extra["shrink"]["cv_loss"]) == len(SHRINK_GRID)
    assert all(float(t.abs().max()) == 0 for t in m.get_thresholds().values())  # the model is left as found
    with pytest.raises(ValueError):
        sequential(m, tok, tolerance=0.05, shrink=1.5, progress=False)


def test_a_captures_sorted_quantiles_equal_quantiles_pooled():
    """Capture.pooled_quantiles sorts once and keeps it; every level equals quantiles_pooled's."""
    from thresholds._core import Capture, quantiles_pooled
    cap = Capture(width=8, n_rows=50, max_values=1 << 10, max_rows=40, seed=1)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(2)).clamp(min=0)  # many exact zeros
    cap.add(x)
    levels = [0.1, 0.37, 0.5, 0.9, 0.99]
    assert cap.pooled_quantiles(levels) == quantiles_pooled(cap.values, levels)
    assert cap.pooled_quantiles([0.5]) == quantiles_pooled(cap.values, [0.5])  # from the kept sort


def test_sorted_values_is_torch_sort():
    """The NumPy sort on a CPU gives torch's order, ties, zeros and NaN (last) included."""
    from thresholds._core import sorted_values
    g = torch.Generator().manual_seed(0)
    v = torch.randn(10_000, generator=g).abs().round(decimals=2)
    v[::97] = 0.0
    v[5] = float("nan")
    for t in (v, v.double(), v[:1], v[:0]):
        assert torch.equal(sorted_values(t).nan_to_num(-1), t.sort().values.nan_to_num(-1))
    b = v.bfloat16()  # the torch path
    assert torch.equal(sorted_values(b).nan_to_num(-1), b.sort().values.nan_to_num(-1))
