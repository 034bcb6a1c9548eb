"""rllm.gpu.sparse_gemv: the event-driven matrix-vector product and its use in the models, on CPU.

The torch fallback is what CPU and CI run; Triton's interpreter checks the GPU kernel itself
where triton is installed (in a subprocess: the interpreter is chosen when the kernel is defined).
The GPU run of the same checks is recorded by ``benchmarks/gpu_sparse_gemv.py``.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from rllm.events import SparsityMeter
from rllm.model import RWKV, RWKVConfig, Threshold, randomize_weights
from rllm.gpu.sparse_gemv import (EventLinear, EventThreshold, disable_event_kernels, enable_event_kernels, event_gemv,
                              event_gemv_torch, threshold, transpose_weight, tune_event_kernels)


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_x(rows, K, sparsity, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g)
    x[torch.rand(rows, K, generator=g) < sparsity] = 0
    return x.to(dtype)


def poisoned_weight_t(weight, x):
    """``W^T`` with NaN in the row of every input that is zero in all rows of ``x``: reading one shows."""
    wt = transpose_weight(weight).clone()
    wt[(x == 0).all(dim=0)] = float("nan")
    return wt


@pytest.mark.parametrize("kind", ["none", "scalar", "per_input"])
def test_torch_fallback_is_the_thresholded_dense_product(kind):
    K, N = 96, 40
    x = sparse_x(3, K, 0.3)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    b = torch.randn(N)
    t = {"none": None, "scalar": torch.tensor(0.5), "per_input": torch.rand(K)}[kind]
    y = event_gemv(x, transpose_weight(w), t, b)
    ref = F.linear(threshold(x, t) if t is not None else x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_threshold_is_the_sites_own():
    x = torch.randn(4, 32)
    for t in (torch.tensor(0.7), torch.rand(32)):
        site = Threshold("s", 32, 8)
        site.threshold = t
        assert torch.equal(threshold(x, t), site(x))


def test_only_the_weights_of_firing_inputs_are_read():
    x = sparse_x(2, 64, 0.6, seed=3)
    x[:, :5] = 0  # silent in both rows: their weights hold NaN
    w = torch.randn(24, 64)
    y = event_gemv_torch(x, poisoned_weight_t(w, x))
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_half_precision_accumulates_in_float32():
    K = 4096
    x = torch.full((1, K), 1.0, dtype=torch.bfloat16)
    w = torch.full((1, K), 1.0, dtype=torch.bfloat16)
    # bf16 has 8 significant bits: a bf16 running sum would stall at 256
    assert float(event_gemv(x, transpose_weight(w))) == K


def test_bad_inputs_are_refused():
    wt = transpose_weight(torch.randn(8, 16))
    with pytest.raises(ValueError, match="inputs"):
        event_gemv(torch.randn(1, 15), wt)
    with pytest.raises(TypeError, match="float16"):
        event_gemv(torch.randn(1, 16, dtype=torch.float16), wt)
    with pytest.raises(ValueError, match="threshold"):
        event_gemv(torch.randn(1, 16), wt, torch.rand(3))
    with pytest.raises(ValueError, match="mode"):
        EventLinear(torch.nn.Linear(4, 4), mode="fast")


# --- models ------------------------------------------------------------------------------------

@pytest.fixture
def model():
    return randomize_weights(RWKV(RWKVConfig(vocab_size=97, n_layer=2, n_embd=32)), seed=0).eval()


@torch.no_grad()
def quantile_thresholds(model, idx, q):
    seen = {}
    hooks = [s.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].abs().flatten()))
             for n, s in model.sites.items()]
    model(idx)
    for h in hooks:
        h.remove()
    return {n: float(torch.quantile(v, q)) for n, v in seen.items()}


@torch.no_grad()
def greedy(model, first, n):
    tok, state, out, logits_seen = torch.tensor([first]), None, [], []
    for _ in range(n):
        logits, state = model.step(tok, state)
        tok = logits.argmax(-1)
        out.append(int(tok))
        logits_seen.append(logits)
    return out, torch.cat(logits_seen)


def test_enable_swaps_every_site_fed_linear_and_shares_its_weights(model):
    before = {n: p for n, p in model.named_parameters()}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    sites = model.sites
    swapped = enable_event_kernels(model)
    assert len(swapped) == 2 * 7 + 1 and set(swapped) == set(sites)
    assert all(isinstance(m, EventLinear) for n, m in model.named_modules() if n in linears)
    assert {n: p for n, p in model.named_parameters()} == before  # the same Parameter objects
    assert all(a is b and isinstance(a, EventThreshold) for a, b in zip(model.sites.values(), sites.values()))
    assert model.blocks[1].ffn.value.site is model.blocks[1].ffn.sites["value"]
    disable_event_kernels(model)
    assert {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == linears
    assert all(type(s) is Threshold for s in model.sites.values())


def test_decode_with_the_kernel_gives_the_same_tokens(model):
    idx = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(2))
    model.set_thresholds(quantile_thresholds(model, idx, 0.5))
    dense_tokens, dense_logits = greedy(model, 5, 64)
    enable_event_kernels(model, mode="kernel")  # on CPU: the torch fallback, thresholds applied inside it
    assert all(s.deferred for s in model.sites.values())
    event_tokens, event_logits = greedy(model, 5, 64)
    assert event_tokens == dense_tokens
    torch.testing.assert_close(event_logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert len(set(dense_tokens)) > 3  # not a degenerate stream


def test_sites_with_hooks_still_threshold_themselves(model):
    idx = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    model.set_thresholds(quantile_thresholds(model, idx, 0.4))
    with SparsityMeter(model) as meter, torch.no_grad():
        model(idx)
    enable_event_kernels(model, mode="kernel")
    with SparsityMeter(model) as fused, torch.no_grad():
        model(idx)
    assert fused.events == meter.events and max(meter.table().sparsity) > 0.3


def test_tuning_measures_each_matrix_input_sparsity(model):
    idx = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    model.set_thresholds(quantile_thresholds(model, idx, 0.6))
    enable_event_kernels(model)
    measured = tune_event_kernels(model, idx[:, :8])
    assert len(measured) == 15
    assert 0.4 < measured["blocks.0.att.key"] < 0.8
    assert measured["blocks.0.ffn.value"] >= 0.6  # squared ReLU: naturally sparse on top of the threshold
    assert all(m.use_kernel for m in model.modules() if isinstance(m, EventLinear))  # CPU: nothing to decide


def test_opt_keeps_its_site_hooks():
    transformers = pytest.importorskip("transformers")
    from rllm.opt import EventOPT

    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                 max_position_embeddings=32, word_embed_proj_dim=16, init_std=0.2)
    opt = EventOPT(transformers.OPTForCausalLM(cfg).eval())
    idx = torch.randint(0, 50, (1, 12))
    opt.set_thresholds({n: 0.05 for n in opt.sites})
    with torch.no_grad():
        ref = opt(idx)
        swapped = enable_event_kernels(opt, mode="kernel")
        assert {"layers.0.attn.qkv.q_proj", "layers.1.ffn.fc2", "project_in", "head"} <= set(swapped)
        torch.testing.assert_close(opt(idx), ref, rtol=1e-4, atol=1e-4)
        opt.set_thresholds({n: 0.0 for n in opt.sites})
        dense = opt(idx)
        assert not torch.allclose(dense, ref, atol=1e-3)  # the thresholds are live through the swapped modules
        disable_event_kernels(opt)
        torch.testing.assert_close(opt(idx), dense, rtol=1e-5, atol=1e-5)


INTERPRETED = textwrap.dedent("""
    import torch
    from rllm.gpu.sparse_gemv import KernelConfig, event_gemv, event_gemv_torch, event_list, transpose_weight
    torch.manual_seed(0)
    cases = [(1, 100, 70, None, False, KernelConfig(block_n=32, block_k=16)),
             (1, 128, 96, "scalar", True, KernelConfig(block_n=64, block_k=16, waves=64, min_iters=1)),  # 8 splits
             (3, 72, 40, "vector", True, KernelConfig(block_n=32, block_k=16, waves=16, min_iters=1)),  # 4 splits
             (1, 96, 48, "scalar", False, KernelConfig(block_n=16, block_k=16, waves=16, min_iters=1, prefetch=2,
                                                       reduce="separate")),  # 6 splits
             # the compacting kernel: one split, 4 and 7 splits (added as a tree of 8), and 3 rows (masked)
             (1, 72, 40, "vector", True, KernelConfig(algorithm="compact", block_n=32, block_k=16, inputs=128)),
             (1, 100, 70, None, False, KernelConfig(algorithm="compact", block_n=32, block_k=16, inputs=32)),
             (1, 100, 70, "scalar", True, KernelConfig(algorithm="compact", block_n=64, block_k=16, inputs=16)),
             (3, 72, 40, "vector", True, KernelConfig(algorithm="compact", block_n=32, block_k=16, inputs=32)),
             # the event list: one split, 3 and 16 splits sharing the events, 5000 inputs (five programs
             # list it), several rows (inputs firing in any row: through tl.dot, or a partial sum per row)
             (1, 100, 70, "scalar", True, KernelConfig(algorithm="events", block_n=32, block_k=16, waves=1)),
             (1, 72, 40, None, False, KernelConfig(algorithm="events", block_n=16, block_k=16, waves=2, pdl=True)),
             (1, 128, 16, "vector", True, KernelConfig(algorithm="events", block_n=16, block_k=16, waves=64)),
             (1, 5000, 24, "scalar", False, KernelConfig(algorithm="events", block_n=16, block_k=64, waves=8)),
             (3, 72, 40, "vector", True, KernelConfig(algorithm="events", block_n=32, block_k=16)),
             (16, 100, 48, "scalar", True, KernelConfig(algorithm="events", block_n=16, block_k=16, waves=8)),
             (2, 100, 48, "vector", True, KernelConfig(algorithm="events", block_n=16, block_k=16, fma_rows=4)),
             (3, 1500, 40, "scalar", False, KernelConfig(algorithm="events", block_n=32, block_k=16, waves=4,
                                                         fma_rows=4)),
             (5, 3000, 24, None, False, KernelConfig(algorithm="events", block_n=16, block_k=32, waves=4))]
    for dtype in (torch.float32, torch.float16):
        for rows, K, N, kind, bias, cfg in cases:
            x = torch.randn(rows, K)
            x[torch.rand(rows, K) < 0.5] = 0
            x[:, :7] = 0
            w = torch.randn(N, K) / K ** 0.5
            t = {None: None, "scalar": torch.tensor(0.4), "vector": torch.rand(K) * 0.8}[kind]
            b = torch.randn(N) if bias else None
            wt = transpose_weight(w.to(dtype))  # rows padded to 16 elements when N is not a multiple of 16
            wt[:7] = float("nan")  # weights of silent inputs: must not be read
            args = (x.to(dtype), wt, t, b.to(dtype) if bias else None)
            y = event_gemv(*args, backend="triton", config=cfg)
            again = event_gemv(*args, backend="triton", config=cfg)  # the split tickets were reset
            wt[:7] = 0
            # the reference thresholds as the kernel does: with t rounded to the input's dtype
            ref = event_gemv_torch(x.to(dtype).double(), wt.double(), t.to(dtype).double() if t is not None else None,
                                   b.to(dtype).double() if bias else None)
            err = float((y.double() - ref).norm() / ref.norm())
            assert err < (1e-6 if dtype == torch.float32 else 1e-3), (dtype, rows, K, N, err)
            assert torch.equal(y, again)
    # the list itself: inputs firing in any row, in order, each row's thresholded values, over 3 programs
    x = torch.randn(3, 2500)
    x[torch.rand(3, 2500) < 0.7] = 0
    t = torch.rand(2500) * 0.5
    events = event_list(x, t)
    xt = torch.where(x.abs() >= t, x, torch.zeros(()))
    fire = (xt != 0).any(0).nonzero().squeeze(1)
    n = int(events.count)
    assert n == len(fire) and torch.equal(events.indices[:n].long(), fire)
    assert torch.equal(events.values[:, :n], xt[:, fire])
    # nothing fires: the event list is empty and y is the bias alone
    for cfg in (KernelConfig(algorithm="events", block_n=16, block_k=16, waves=4),
                KernelConfig(algorithm="compact", block_n=16, block_k=16, inputs=16)):
        b = torch.randn(40)
        y = event_gemv(torch.zeros(1, 72), torch.randn(72, 40), None, b, backend="triton", config=cfg)
        assert torch.equal(y[0], b), cfg
    print("ok")
""")


def test_triton_kernel_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_kernel_config_is_checked():
    from rllm.gpu.sparse_gemv import COMPACT_CONFIG, EVENT_LIST_CONFIGS, MAX_EVENT_LIST_INPUTS, KernelConfig, event_list

    assert COMPACT_CONFIG.algorithm == "compact"
    assert {c.algorithm for c in EVENT_LIST_CONFIGS} == {"events"}
    with pytest.raises(ValueError, match="at most"):  # longer inputs take the other kernels (best_kernel)
        event_list(torch.zeros(MAX_EVENT_LIST_INPUTS + 1))
    with pytest.raises(ValueError, match="1 to 16 rows"):
        event_list(torch.zeros(17, 8))
    with pytest.raises(ValueError, match="algorithm must be"):
        KernelConfig(algorithm="sparse")
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(algorithm="compact", inputs=1000)
