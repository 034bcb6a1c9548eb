"""The RWKV-4 WKV recurrence as one Triton kernel, for sequence mode on CUDA without autograd.

The chunked torch form (``rllm.wkv.wkv_sequence``, backend ``"torch"``) materialises a
``[B, L, 1 + L, C]`` logit tensor per chunk: on a 430M model and 256 calibration sequences that
is gigabytes of traffic per layer and the largest cost of a calibration candidate. The
recurrence itself reads ``k`` and ``v`` once and writes ``wkv`` once: each Triton program owns a
block of channels of one sequence and walks its tokens in order, the ``(aa, bb, pp)`` state in
registers, exactly the arithmetic of ``rllm.wkv.wkv_step`` (as BlinkDL's CUDA kernel does).

Used by ``wkv_sequence(backend="auto")`` on CUDA when no gradient is needed and Triton is
importable; ``TRITON_INTERPRET=1`` runs it on CPU for tests.
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
    B, T, C = k.shape
    k, v = k.contiguous(), v.contiguous()
    aa, bb, pp = (s.detach().float().contiguous().clone() for s in state)
    w = (-torch.exp(time_decay.detach().float())).contiguous()
    u = time_first.detach().float().contiguous()
    out = torch.empty((B, T, C), device=k.device, dtype=torch.float32)
    _wkv_kernel[(B, triton.cdiv(C, BLOCK_C))](k, v, w, u, aa, bb, pp, out, T, C, BLOCK=BLOCK_C)
    return out, (aa, bb, pp)
