"""RWKV-4 model: the two modes agree, the WKV is stable, sites threshold what they should."""
import math

import pytest
import torch

from rllm.model import RWKV, RWKVConfig, randomize_weights
from rllm.wkv import initial_state, wkv_sequence, wkv_step


def tiny(n_layer=2, n_embd=32, vocab=61, seed=0):
    return randomize_weights(RWKV(RWKVConfig(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd)), seed).eval()


def wkv_float64(k, v, time_decay, time_first):
    """Direct evaluation of the WKV definition in float64 (no recurrence, no tricks)."""
    k, v = k.double(), v.double()
    w, u = torch.exp(time_decay.double()), time_first.double()
    B, T, C = k.shape
    out = torch.empty(B, T, C, dtype=torch.float64)
    for t in range(T):
        i = torch.arange(t + 1, dtype=torch.float64)
        logits = k[:, : t + 1] - (t - 1 - i).view(1, -1, 1) * w
        logits[:, t] = u + k[:, t]
        out[:, t] = (torch.softmax(logits, dim=1) * v[:, : t + 1]).sum(1)
    return out


def test_sequence_mode_equals_step_mode():
    m = tiny()
    idx = torch.randint(0, 61, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        seq = m(idx)
        state, outs = None, []
        for t in range(idx.shape[1]):
            o, state = m.step(idx[:, t], state)
            outs.append(o)
    assert (seq - torch.stack(outs, 1)).abs().max() < 1e-4


def test_sequence_mode_continues_from_state():
    m = tiny()
    idx = torch.randint(0, 61, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(idx)
        a, st = m(idx[:, :33], return_state=True)
        b = m(idx[:, 33:], state=st)
    assert (torch.cat([a, b], 1) - full).abs().max() < 1e-4


@pytest.mark.parametrize("backend,chunk", [("torch", 1), ("torch", 7), ("torch", 32), ("torch", 100), ("numba", 16)])
def test_wkv_sequence_matches_definition(backend, chunk):
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 50, 8, generator=g) * 3, torch.randn(2, 50, 8, generator=g)
    td, tf = torch.randn(8, generator=g), torch.randn(8, generator=g)
    out, state = wkv_sequence(k, v, td, tf, chunk=chunk, backend=backend)
    assert (out.double() - wkv_float64(k, v, td, tf)).abs().max() < 1e-5
    # the final state continues the sequence exactly like the recurrence does
    nxt, _ = wkv_step(k[:, -1], v[:, -1], td, tf, state)
    ref_state = wkv_sequence(k, v, td, tf, backend="torch", chunk=50)[1]
    assert (nxt - wkv_step(k[:, -1], v[:, -1], td, tf, ref_state)[0]).abs().max() < 1e-5


TRITON_WKV = """
import torch
from rllm.wkv import wkv_sequence
g = torch.Generator().manual_seed(3)
k, v = torch.randn(2, 50, 200, generator=g) * 3, torch.randn(2, 50, 200, generator=g)
td, tf = torch.randn(200, generator=g), torch.randn(200, generator=g)
ref, rs = wkv_sequence(k, v, td, tf, backend="numba")
out, st = wkv_sequence(k, v, td, tf, backend="triton")
o1, s1 = wkv_sequence(k[:, :20], v[:, :20], td, tf, backend="triton")
o2, s2 = wkv_sequence(k[:, 20:], v[:, 20:], td, tf, s1, backend="triton")
assert (out - ref).abs().max() < 1e-5 and (torch.cat([o1, o2], 1) - ref).abs().max() < 1e-5
assert all((a - b).abs().max() < 1e-5 for a, b in zip(st, rs)) and all((a - b).abs().max() < 1e-5 for a, b in zip(s2, rs))
print("ok")
"""


def test_triton_wkv_in_the_interpreter():
    """The Triton recurrence (CUDA sequence mode) equals the numba one, state carried across a split;
    runs on CPU in Triton's interpreter where triton is installed."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", TRITON_WKV], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


TRITON_WKV_GRAD = """
import torch
from rllm.wkv import initial_state, wkv_sequence
for scale in (1.0, 30.0):  # keys of +-30 and more: the backward's exponents must stay bounded too
    g = torch.Generator().manual_seed(1)
    k0, v0 = torch.randn(3, 37, 40, generator=g) * scale, torch.randn(3, 37, 40, generator=g)
    td0, tf0, gy = torch.randn(40, generator=g), torch.randn(40, generator=g), torch.randn(3, 37, 40, generator=g)
    res = {}
    for be, dt in (("torch", torch.float64), ("triton", torch.float32)):
        k, v, td, tf = (t.clone().to(dt).requires_grad_() for t in (k0, v0, td0, tf0))
        out, st = wkv_sequence(k, v, td, tf, backend=be)
        (out.double() * gy.double()).sum().backward()
        res[be] = [out.detach().double()] + [t.grad.double() for t in (k, v, td, tf)]
    for a, b in zip(res["torch"], res["triton"]):
        assert ((a - b).abs().max() / a.abs().max()).item() < 3e-5, (scale, (a - b).abs().max())
    assert torch.isfinite(res["triton"][1]).all()
state = tuple(s.requires_grad_() for s in initial_state(1, 40))
try:
    wkv_sequence(k0[:1].requires_grad_(), v0[:1], td0, tf0, state, backend="triton")
    raise SystemExit("a state that needs a gradient was not refused")
except ValueError:
    pass
print("ok")
"""


def test_triton_wkv_gradient_in_the_interpreter():
    """The training kernels' hand-written gradient (k, v, time_decay, time_first) equals autograd
    through the chunked torch form in float64, for ordinary and extreme keys; runs in Triton's
    interpreter on CPU where triton is installed."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", TRITON_WKV_GRAD], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_torch_wkv_backend_has_gradients():
    g = torch.Generator().manual_seed(7)
    k = torch.randn(1, 20, 4, generator=g, requires_grad=True)
    v = torch.randn(1, 20, 4, generator=g)
    td = torch.randn(4, generator=g, requires_grad=True)
    out, _ = wkv_sequence(k, v, td, torch.zeros(4))
    out.sum().backward()
    assert torch.isfinite(k.grad).all() and k.grad.abs().sum() > 0 and td.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no autograd"):
        wkv_sequence(k, v, td, torch.zeros(4), backend="numba")


def test_wkv_stays_finite_with_extreme_keys():
    """Keys of +-80 overflow a naive exp() in float32; the max trick keeps the result exact."""
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, 40, 4, generator=g) * 80
    v = torch.randn(1, 40, 4, generator=g)
    td, tf = torch.randn(4, generator=g), torch.randn(4, generator=g)
    seq, _ = wkv_sequence(k, v, td, tf, backend="torch")
    fast, _ = wkv_sequence(k, v, td, tf, backend="numba")
    state, steps = initial_state(1, 4), []
    for t in range(40):
        o, state = wkv_step(k[:, t], v[:, t], td, tf, state)
        steps.append(o)
    ref = wkv_float64(k, v, td, tf)
    assert torch.isfinite(seq).all() and torch.isfinite(fast).all()
    assert (fast.double() - ref).abs().max() < 1e-5
    assert (seq.double() - ref).abs().max() < 1e-5
    assert (torch.stack(steps, 1).double() - ref).abs().max() < 1e-5


def test_bfloat16_model_tracks_float32():
    m = tiny()
    idx = torch.randint(0, 61, (1, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = torch.log_softmax(m(idx), -1)
        low = torch.log_softmax(m.to(torch.bfloat16)(idx).float(), -1)
    assert torch.isfinite(low).all()
    # bf16 keeps 8 mantissa bits: per-logit error of a few 1e-2 over two layers is its rounding, not a bug
    assert (low - ref).abs().mean() < 0.05


def test_onednn_linear_equals_f_linear_and_keeps_gradients(monkeypatch):
    """rllm.linear's oneDNN path (inference on CPU float32) agrees with F.linear to float32 rounding;
    with a gradient to compute, or with the path off, it is F.linear itself."""
    import torch.nn.functional as F

    import rllm.linear as L

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 96, generator=g), torch.randn(200, 96, generator=g)
    b = torch.randn(200, generator=g)
    ref = F.linear(x.double(), w.double(), b.double())
    with torch.no_grad():
        out = L.linear(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (37, 200)
    assert torch.allclose(out.double(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    wg = w.clone().requires_grad_(True)
    y = L.linear(x, wg, b)
    assert y.grad_fn is not None  # the autograd path, not oneDNN's (which has none)
    y.sum().backward()
    assert torch.allclose(wg.grad, x.sum(0).expand(200, -1) * 1.0, atol=1e-4)
    monkeypatch.setattr(L, "ONEDNN", False)
    with torch.no_grad():
        assert torch.equal(L.linear(x, w, b), F.linear(x, w, b))
    # A model built with it holds an nn.Linear's parameters under nn.Linear's names.
    assert isinstance(tiny().head, torch.nn.Linear) and "head.weight" in tiny().state_dict()


def test_site_names_and_order_follow_the_paper():
    m = tiny(n_layer=2)
    names = list(m.sites)
    assert names[:7] == [f"blocks.0.att.{s}" for s in ("key", "receptance", "value", "output")] + \
        [f"blocks.0.ffn.{s}" for s in ("receptance", "key", "value")]
    assert len(names) == 2 * 7 + 1 and names[-1] == "head"
    assert m.sites["blocks.1.ffn.value"].width == 4 * 32


def test_threshold_zeroes_small_inputs_and_keeps_large_ones():
    m = tiny()
    seen = {}
    site = m.sites["blocks.1.att.key"]
    site.register_forward_hook(lambda mod, i, o: seen.update(x=i[0], y=o))
    m.set_thresholds({"blocks.1.att.key": 0.5})
    with torch.no_grad():
        m(torch.randint(0, 61, (1, 20)))
    x, y = seen["x"], seen["y"]
    assert torch.equal(y, torch.where(x.abs() >= 0.5, x, torch.zeros_like(x)))
    assert 0 < (y == 0).float().mean() < 1


def test_per_channel_thresholds_and_bad_thresholds():
    m = tiny()
    m.set_thresholds({"blocks.0.ffn.key": torch.linspace(0, 1, 32)})
    assert m.get_thresholds()["blocks.0.ffn.key"].shape == (32,)
    with pytest.raises(KeyError, match="unknown activation site"):
        m.set_thresholds({"blocks.9.att.key": 0.1})
    with pytest.raises(ValueError, match="32 values"):
        m.set_thresholds({"blocks.0.ffn.key": torch.zeros(5)})


def test_silencing_every_block_site_leaves_a_bigram_model():
    """With every block input under threshold no block adds anything: logits depend on the current token only."""
    m = tiny()
    idx = torch.tensor([[5, 9, 5, 3, 7, 5, 1]])
    with torch.no_grad():
        dense = m(idx)
        m.set_thresholds({n: 1e9 for n in m.sites if n != "head"})
        silent = m(idx)
    assert not torch.allclose(dense[0, 0], dense[0, 2], atol=1e-4)  # context matters when dense
    assert torch.allclose(silent[0, 0], silent[0, 2], atol=1e-5)
    assert torch.allclose(silent[0, 0], silent[0, 5], atol=1e-5)
