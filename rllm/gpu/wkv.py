"""The RWKV-4 WKV recurrence as Triton kernels, for sequence mode on CUDA: inference and training.

The chunked torch form (``rllm.wkv.wkv_sequence``, backend ``"torch"``) materialises a
``[B, L, 1 + L, C]`` logit tensor per chunk: on a 430M model and 256 calibration sequences that
is gigabytes of traffic per layer and the largest cost of a calibration candidate. The
recurrence itself reads ``k`` and ``v`` once and writes ``wkv`` once: each Triton program owns a
block of channels of one sequence and walks its tokens in order, the ``(aa, bb, pp)`` state in
registers, exactly the arithmetic of ``rllm.wkv.wkv_step`` (as BlinkDL's CUDA kernel does).

Used by ``wkv_sequence(backend="auto")`` on CUDA where Triton is importable: ``wkv_triton`` when
no gradient is needed, ``wkv_triton_train`` (the same forward kernel and two backward kernels, an
exact gradient: see below) when one is. Training through the chunked torch form ran at 16k
tokens/s on an H200 for rwkv_pd12; ``TRITON_INTERPRET=1`` runs the kernels on CPU for tests.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: wkv_sequence uses numba or the chunked torch form
    HAS_TRITON = False

BLOCK_C = 128  # channels per program: one coalesced 512-byte load of k and of v per token

if HAS_TRITON:
    @triton.jit
    def _wkv_kernel(k_ptr, v_ptr, w_ptr, u_ptr, aa_ptr, bb_ptr, pp_ptr, out_ptr, T, C,
                    BLOCK: tl.constexpr):  # pragma: no cover - compiled
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        u = tl.load(u_ptr + cols, mask=mask, other=0.0)
        state = b * C + cols
        a_ = tl.load(aa_ptr + state, mask=mask, other=0.0)
        b_ = tl.load(bb_ptr + state, mask=mask, other=1.0)
        p_ = tl.load(pp_ptr + state, mask=mask, other=-1e38)
        off = b.to(tl.int64) * T * C  # int64: batched candidates make B * T * C large
        end = off + T * C
        while off < end:  # token by token (a while loop: Triton's interpreter cannot range over a runtime int)
            at = off + cols
            kt = tl.load(k_ptr + at, mask=mask, other=0.0).to(tl.float32)
            vt = tl.load(v_ptr + at, mask=mask, other=0.0).to(tl.float32)
            ww = u + kt
            p = tl.maximum(p_, ww)
            e1 = tl.exp(p_ - p)
            e2 = tl.exp(ww - p)
            tl.store(out_ptr + at, (e1 * a_ + e2 * vt) / (e1 * b_ + e2), mask=mask)
            ww = p_ + w
            p = tl.maximum(ww, kt)
            e1 = tl.exp(ww - p)
            e2 = tl.exp(kt - p)
            a_ = e1 * a_ + e2 * vt
            b_ = e1 * b_ + e2
            p_ = p
            off += C
        tl.store(aa_ptr + state, a_, mask=mask)
        tl.store(bb_ptr + state, b_, mask=mask)
        tl.store(pp_ptr + state, p_, mask=mask)


def wkv_triton(k: torch.Tensor, v: torch.Tensor, time_decay: torch.Tensor, time_first: torch.Tensor,
               state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
    """``wkv_sequence`` by the Triton recurrence: ``k, v [B, T, C]`` (any float dtype), float32 out and state."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton WKV kernel needs triton (pip install triton)")
    w, u = _decay_and_first(time_decay, time_first)
    return _run_forward(k.contiguous(), v.contiguous(), w, u, state, BLOCK_C)


def _decay_and_first(time_decay: torch.Tensor, time_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' per-channel ``w = -exp(time_decay)`` (the log decay per token) and ``u``, float32."""
    return (-torch.exp(time_decay.detach().float())).contiguous(), time_first.detach().float().contiguous()


def _run_forward(k, v, w, u, state, block: int):
    """The forward kernel over contiguous ``k, v [B, T, C]`` from a copy of ``state``: (out, final state)."""
    B, T, C = k.shape
    aa, bb, pp = (s.detach().float().contiguous().clone() for s in state)
    out = torch.empty((B, T, C), device=k.device, dtype=torch.float32)
    _wkv_kernel[(B, triton.cdiv(C, block))](k, v, w, u, aa, bb, pp, out, T, C, BLOCK=block)
    return out, (aa, bb, pp)


# ------------------------------------------------------------------------------------------
# Training: the same recurrence with its exact gradient (forward kernel above, two backward kernels)
# ------------------------------------------------------------------------------------------
#
# For one channel, with D_t = B_t + e^{u+k_t} the denominator of wkv_t = y_t and w < 0 the per-step
# log decay, the gradient of a loss with upstream gradient gy is
#
#   g u   = sum_t gy_t c_t (v_t - y_t),               c_t = e^{u+k_t} / D_t (the current token's weight)
#   g w   = sum_t gy_t (A'_t - y_t B'_t) / D_t,        A', B' = d/dw of the state: A'_{t+1} = e^w (A_t + A'_t)
#   g v_i = gy_i c_i + e^{k_i} G_i,                     G_i = sum_{t>i} e^{(t-1-i) w} gy_t / D_t
#   g k_i = gy_i c_i (v_i - y_i) + e^{k_i} (v_i G_i - H_i),   H_i likewise with gy_t y_t
#
# The first pass walks forward (recomputing the state, the w-derivatives and log D_t); the second
# walks backward accumulating G and H. Both keep their sums as mantissa and exponent (like the
# forward's (aa, bb, pp)), so no exp() sees an unbounded argument: e^{k_i} G_i = g e^{k_i + s} with
# k_i + s <= 0, because D_t >= e^{(t-1-i) w + k_i} for every i < t.

if HAS_TRITON:
    @triton.jit
    def _wkv_bwd_forward_kernel(k_ptr, v_ptr, gy_ptr, w_ptr, u_ptr, aa_ptr, bb_ptr, pp_ptr,
                                gk_ptr, gv_ptr, logd_ptr, gw_ptr, gu_ptr, T, C,
                                BLOCK: tl.constexpr):  # pragma: no cover - compiled
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        u = tl.load(u_ptr + cols, mask=mask, other=0.0)
        state = b * C + cols
        a_ = tl.load(aa_ptr + state, mask=mask, other=0.0)
        b_ = tl.load(bb_ptr + state, mask=mask, other=1.0)
        p_ = tl.load(pp_ptr + state, mask=mask, other=-1e38)
        da = tl.zeros([BLOCK], dtype=tl.float32)  # A' and B' on the scale of the state
        db = tl.zeros([BLOCK], dtype=tl.float32)
        gw = tl.zeros([BLOCK], dtype=tl.float32)
        gu = tl.zeros([BLOCK], dtype=tl.float32)
        off = b.to(tl.int64) * T * C
        end = off + T * C
        while off < end:
            at = off + cols
            kt = tl.load(k_ptr + at, mask=mask, other=0.0).to(tl.float32)
            vt = tl.load(v_ptr + at, mask=mask, other=0.0).to(tl.float32)
            gyt = tl.load(gy_ptr + at, mask=mask, other=0.0).to(tl.float32)
            ww = u + kt
            q = tl.maximum(p_, ww)
            e1 = tl.exp(p_ - q)
            e2 = tl.exp(ww - q)
            den = e1 * b_ + e2
            y = (e1 * a_ + e2 * vt) / den
            cur = e2 / den
            gcur = gyt * cur
            tl.store(gv_ptr + at, gcur, mask=mask)
            tl.store(gk_ptr + at, gcur * (vt - y), mask=mask)
            tl.store(logd_ptr + at, q + tl.log(den), mask=mask)
            gu += gcur * (vt - y)
            gw += gyt * e1 * (da - y * db) / den
            ww = p_ + w
            q = tl.maximum(ww, kt)
            e1 = tl.exp(ww - q)
            e2 = tl.exp(kt - q)
            da = e1 * (a_ + da)
            db = e1 * (b_ + db)
            a_ = e1 * a_ + e2 * vt
            b_ = e1 * b_ + e2
            p_ = q
            off += C
        tl.store(gw_ptr + state, gw, mask=mask)
        tl.store(gu_ptr + state, gu, mask=mask)

    @triton.jit
    def _wkv_bwd_reverse_kernel(k_ptr, v_ptr, gy_ptr, y_ptr, logd_ptr, w_ptr, gk_ptr, gv_ptr, T, C,
                                BLOCK: tl.constexpr):  # pragma: no cover - compiled
        b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        g = tl.zeros([BLOCK], dtype=tl.float32)
        h = tl.zeros([BLOCK], dtype=tl.float32)
        s = tl.full([BLOCK], -1e38, dtype=tl.float32)
        start = b.to(tl.int64) * T * C
        off = start + (T - 1) * C
        while off >= start:  # tokens last to first
            at = off + cols
            kt = tl.load(k_ptr + at, mask=mask, other=0.0).to(tl.float32)
            vt = tl.load(v_ptr + at, mask=mask, other=0.0).to(tl.float32)
            gyt = tl.load(gy_ptr + at, mask=mask, other=0.0).to(tl.float32)
            yt = tl.load(y_ptr + at, mask=mask, other=0.0)
            ld = tl.load(logd_ptr + at, mask=mask, other=0.0)
            f = tl.exp(kt + s)  # e^{k_t} times the scale of G_t, H_t (<= 1)
            tl.store(gv_ptr + at, tl.load(gv_ptr + at, mask=mask, other=0.0) + f * g, mask=mask)
            tl.store(gk_ptr + at, tl.load(gk_ptr + at, mask=mask, other=0.0) + f * (vt * g - h), mask=mask)
            sn = tl.maximum(s + w, -ld)
            e1 = tl.exp(s + w - sn)
            e2 = tl.exp(-ld - sn)
            g = e1 * g + e2 * gyt
            h = e1 * h + e2 * gyt * yt
            s = sn
            off -= C


TRAIN_BLOCK_C = 32  # smaller blocks than inference: a training batch has few sequences, and every program walks T


class _WKVFunction(torch.autograd.Function):
    """The recurrence with its exact gradient in k, v, time_decay and time_first (the initial
    state is a constant: training starts every window from the empty state)."""

    @staticmethod
    def forward(ctx, k, v, time_decay, time_first, aa, bb, pp):
        k, v = k.contiguous(), v.contiguous()
        w, u = _decay_and_first(time_decay, time_first)
        state0 = tuple(s.detach().float().contiguous() for s in (aa, bb, pp))
        out, (fa, fb, fp) = _run_forward(k, v, w, u, state0, TRAIN_BLOCK_C)
        ctx.mark_non_differentiable(fa, fb, fp)
        ctx.save_for_backward(k, v, w, u, out, *state0)
        ctx.dtypes = (k.dtype, v.dtype, time_decay.dtype, time_first.dtype)
        return out, fa, fb, fp

    @staticmethod
    def backward(ctx, gy, *_state_grads):
        k, v, w, u, out, aa, bb, pp = ctx.saved_tensors
        B, T, C = k.shape
        gy = gy.float().contiguous()
        gk = torch.empty((B, T, C), device=k.device, dtype=torch.float32)
        gv = torch.empty_like(gk)
        logd = torch.empty_like(gk)
        gw = torch.empty((B, C), device=k.device, dtype=torch.float32)
        gu = torch.empty_like(gw)
        grid = (B, triton.cdiv(C, TRAIN_BLOCK_C))
        _wkv_bwd_forward_kernel[grid](k, v, gy, w, u, aa, bb, pp, gk, gv, logd, gw, gu, T, C, BLOCK=TRAIN_BLOCK_C)
        _wkv_bwd_reverse_kernel[grid](k, v, gy, out, logd, w, gk, gv, T, C, BLOCK=TRAIN_BLOCK_C)
        kd, vd, tdd, tfd = ctx.dtypes
        # w = -exp(time_decay): d w / d time_decay = w
        return gk.to(kd), gv.to(vd), (gw.sum(0) * w).to(tdd), gu.sum(0).to(tfd), None, None, None


def wkv_triton_train(k: torch.Tensor, v: torch.Tensor, time_decay: torch.Tensor, time_first: torch.Tensor,
                     state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
    """``wkv_sequence`` by the Triton recurrence with autograd (training on CUDA): gradients flow
    to ``k``, ``v``, ``time_decay`` and ``time_first``; the initial ``state`` is a constant."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton WKV kernel needs triton (pip install triton)")
    if any(s.requires_grad for s in state):
        raise ValueError("the Triton WKV's gradient treats the initial state as a constant; "
                         "use backend='torch' to differentiate through it")
    out, aa, bb, pp = _WKVFunction.apply(k, v, time_decay, time_first, *state)
    return out, (aa, bb, pp)
