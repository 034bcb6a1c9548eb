"""Sparsity statistics and event traces agree with direct counts of the site activations."""
import numpy as np
import pytest
import torch

from rllm.events import EventTrace, SparsityMeter, site_table, summarize, trace
from rllm.model import RWKV, RWKVConfig, randomize_weights


@pytest.fixture
def model():
    return randomize_weights(RWKV(RWKVConfig(vocab_size=53, n_layer=2, n_embd=16)), seed=1).eval()


def capture_inputs(model, idx):
    """Raw inputs of every site, captured with plain hooks (the independent count)."""
    seen = {n: [] for n in model.sites}
    hs = [s.register_forward_hook(lambda m, i, o, n=n: seen[n].append(i[0].reshape(-1, i[0].shape[-1])))
          for n, s in model.sites.items()]
    with torch.no_grad():
        model(idx)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_meter_counts_events_and_natural_zeros(model):
    idx = torch.randint(0, 53, (2, 30), generator=torch.Generator().manual_seed(0))
    model.set_thresholds({"blocks.0.att.key": 0.3, "blocks.1.ffn.key": 0.5})
    raw = capture_inputs(model, idx)
    with SparsityMeter(model) as meter, torch.no_grad():
        model(idx)
    t = meter.table().set_index("site")
    for name, x in raw.items():
        thr = float(model.sites[name].threshold)
        assert t.loc[name, "events"] == int(((x.abs() >= thr) & (x != 0)).sum())
        assert t.loc[name, "total"] == x.numel()
        assert t.loc[name, "natural"] == pytest.approx(float((x == 0).float().mean()))
    # the squared ReLU output is naturally sparse; the others are dense at threshold 0
    assert t.loc["blocks.0.ffn.value", "natural"] > 0.2
    assert t.loc["blocks.1.att.value", "sparsity"] == 0


def test_summary_weights_sites_by_matrix_size(model):
    table = site_table(model)
    table["total"] = 1
    table["sparsity"] = [1.0 if n.endswith("ffn.value") else 0.0 for n in table.site]
    table["natural"] = 0.0
    s = summarize(table)
    blocks = table[table.site != "head"]
    assert s["sparsity_mean"] == pytest.approx(2 / 14)
    ffn_value_macs = blocks[blocks.site.str.endswith("ffn.value")].macs.sum()
    assert s["sparsity_mac_weighted"] == pytest.approx(ffn_value_macs / blocks.macs.sum())


def test_trace_records_exactly_the_firing_inputs(model):
    tokens = torch.randint(0, 53, (45,), generator=torch.Generator().manual_seed(1))
    thr = {"blocks.0.att.receptance": 0.4, "blocks.1.ffn.value": 0.05}
    model.set_thresholds(thr)
    raw = capture_inputs(model, tokens.unsqueeze(0))
    model.set_thresholds({n: 0.0 for n in thr})
    tr = trace(model, tokens, thr, window=16, values=True)
    assert tr.n_tokens == 45 and "head" not in tr.sites
    for name in tr.sites:
        x = raw[name]
        t = thr.get(name, 0.0)
        expected = ((x.abs() >= t) & (x != 0)).numpy()
        assert np.array_equal(tr.mask(name), expected)
        indptr, ind = tr.indices(name)
        assert indptr[-1] == expected.sum() and np.array_equal(ind[: indptr[1]], np.nonzero(expected[0])[0])
        assert np.allclose(tr.values[name], np.where(expected, x.numpy(), 0), atol=1e-5)
    # the model's own thresholds are untouched by a trace with a schedule
    assert all(float(s.threshold) == 0 for s in model.sites.values())


def test_trace_round_trips_through_npz(model, tmp_path):
    tr = trace(model, torch.arange(20) % 53, {"blocks.1.att.output": 0.2})
    tr.save(tmp_path / "t.npz")
    back = EventTrace.load(tmp_path / "t.npz")
    assert back.sites == tr.sites and back.n_tokens == 20
    for s in tr.sites:
        assert np.array_equal(back.mask(s), tr.mask(s))
    assert back.thresholds["blocks.1.att.output"] == pytest.approx(0.2)


def test_loading_a_non_trace_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an event trace"):
        EventTrace.load(p)


def test_nonzeros_counts_as_count_nonzero():
    """NaN and infinities count, signed zeros do not, in every dtype the sites see."""
    from rllm.events import nonzeros
    x = torch.tensor([0.0, -0.0, 1e-30, float("nan"), float("-inf"), -2.0, 0.0])
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        y = x.to(dt)
        assert nonzeros(y) == int(torch.count_nonzero(y)) == 4 - (dt == torch.float16)  # 1e-30 underflows in float16 only
    r = torch.randn(3, 50, 70)
    r[r.abs() < 0.7] = 0
    assert nonzeros(r) == int(torch.count_nonzero(r))
