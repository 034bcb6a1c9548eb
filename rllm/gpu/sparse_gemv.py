"""Event-driven matrix-vector products on a GPU: ``y = W x`` reading only the weights of firing inputs.

Single-token decoding is bound by reading weights: every token streams every matrix from memory
once. When an activation site leaves only a fraction ``d`` of its inputs nonzero (an *event*, as
in ``rllm.events``), only those inputs' weights are needed, so the product could run ``1 / d``
times faster. This module does it with one Triton kernel and wires it into the models.

Layout. Each matrix is kept transposed, ``W^T [in, out]`` (:func:`transpose_weight`, rows padded to
16 elements), so the weights of one input are one contiguous row: a firing input costs one
coalesced read of ``out`` values and a silent one costs nothing.

Kernel. The grid is ``(output blocks, input splits)``. A program walks its slice of the inputs
``BLOCK_K`` at a time, thresholds them on the fly (``x * (|x| >= t)``, exactly
``rllm.model.Threshold``; or just skips zeros) and loads the ``[BLOCK_K, BLOCK_N]`` weight tile
with the rows of silent inputs masked off: predicated-off loads issue no memory transactions, so
the traffic follows the events without index compaction, host synchronization or a data-dependent
launch (it can be captured in a CUDA graph). Because a weight load's mask depends on loaded
inputs, the loop is software-pipelined by hand (inputs three tiles ahead, ``prefetch`` weight
tiles in flight). Products accumulate in float32 whatever the weight dtype (fp16, bf16, fp32);
several rows (up to :data:`MAX_KERNEL_ROWS`) go through ``tl.dot``, reading an input's row if it
fires in any of them. Split partial sums go to a float32 workspace; the last program of each
output block to arrive (an atomic ticket) adds them in split order, so one launch does the whole
product and the result is deterministic (``KernelConfig.reduce`` also offers a separate reduction
kernel, and the ticket with explicit fences). This *masked* kernel saves traffic but not
instructions: every tile is still visited, so on large matrices its time falls slowly with
sparsity. The *compacting* kernel (one row; ``KernelConfig(algorithm="compact")``,
:data:`COMPACT_CONFIG`) does the work of the events only: each program first stores the indices of
its firing inputs (a prefix sum) in its own scratch, then gathers just those weight rows; splits
meet through the same ticket, their sums added as one tree. It wins at high sparsity and on large
matrices, and loses on small ones, where its fixed cost (compaction, adding the splits)
dominates. Every program of the compacting kernel compacts its inputs anew; the *event-list*
path (``KernelConfig(algorithm="events")``, :data:`EVENT_LIST_CONFIGS`) does it once, as the chip's
producing core does: a small kernel writes the list of events (index, value) of ``x``
(:func:`event_list`), then the product's programs share the listed events evenly and gather only
their weight rows (:func:`event_list_gemv`); on Hopper both are launched with programmatic
dependent launch, so the product's programs are in place when the list is written.
``benchmarks/gpu_sparse_gemv.py --sweep`` chose the configurations; its CSVs hold what each
achieves against cuBLAS, and against cuBLAS on the firing rows alone gathered beforehand, the
speed-up a kernel streaming as well as cuBLAS could at best reach.

Falling back. On CPU, without Triton, for more rows, or under autograd the same function runs in
plain torch (:func:`event_gemv_torch`: gather the rows of the firing inputs, one float32 matmul).
:class:`EventLinear` runs, per matrix, the fastest of dense (cuBLAS through ``F.linear``), the masked
kernel, the compacting kernel and the event list at the sparsity its input shows, as timed on the
GPU at hand by :func:`best_kernel` (:func:`tune_event_kernels`); and dense for batches of more than ``max_rows``
rows (sequence mode, calibration).

Models. :func:`enable_event_kernels` swaps the ``nn.Linear`` modules fed by activation sites of an
``rllm.model.RWKV`` or an ``rllm.opt.EventOPT`` for :class:`EventLinear` modules sharing their
parameters (and, for OPT, the forward pre-hooks that apply the sites). The sites become
:class:`EventThreshold`: the same module (class swapped in place, so every reference to it stays
valid), without the host synchronization of ``Threshold.forward`` (which would also forbid CUDA
graphs) and, when ``fuse_thresholds``, leaving the thresholding to the ``EventLinear`` modules that
read its output, which apply it inside the kernel. A site with forward hooks (``SparsityMeter``,
``rllm.events.trace``) still thresholds itself, so what they see is unchanged.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from rllm.model import RWKV, Threshold

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the torch fallback does everything
    HAS_TRITON = False

HAS_PDL = False  # Triton exposes programmatic dependent launch (Hopper's griddepcontrol)
if HAS_TRITON:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAS_PDL = True
    except ImportError:  # older Triton: configurations asking for PDL launch without it
        @triton.jit
        def gdc_wait():
            pass

        @triton.jit
        def gdc_launch_dependents():
            pass

__all__ = ["HAS_TRITON", "HAS_PDL", "MAX_KERNEL_ROWS", "KernelConfig", "DEFAULT_CONFIG", "COMPACT_CONFIG",
           "EVENT_LIST_CONFIGS", "EVENT_LIST_ROWS_CONFIG", "event_list_configs", "threshold", "event_gemv",
           "event_gemv_torch", "EventList", "event_list", "event_list_gemv", "EventLinear", "EventThreshold",
           "enable_event_kernels", "disable_event_kernels", "tune_event_kernels", "break_even_sparsity", "best_kernel",
           "capture_graph", "gpu_time", "cycling", "sparse_inputs", "rotating_weights", "transpose_weight"]

MAX_KERNEL_ROWS = 16  # the kernel's batch limit: beyond it the union of events is dense anyway
ALGORITHMS = ("masked", "compact", "events")


def threshold(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x * (|x| >= t)``, exactly as ``rllm.model.Threshold`` computes it, without a host sync."""
    return torch.where(x.abs() >= t.to(x.dtype), x, torch.zeros((), dtype=x.dtype, device=x.device))


def event_gemv_torch(x: torch.Tensor, weight_t: torch.Tensor, t: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference algorithm in plain torch: read the rows of ``weight_t [in, out]`` of the inputs
    that fire in any row of ``x [..., in]``, multiply in float32, return ``x.dtype``."""
    K = weight_t.shape[0]
    x2 = x.reshape(-1, K)
    if t is not None:
        x2 = threshold(x2, t)
    active = (x2 != 0).any(dim=0).nonzero().squeeze(1)
    y = x2.index_select(1, active).float() @ weight_t.index_select(0, active).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight_t.shape[1])


# --------------------------------------------------------------------------------------------
# The Triton kernel
# --------------------------------------------------------------------------------------------

if HAS_TRITON:
    @triton.jit
    def _x_tile(X, T, offs_m, m_ok, offs_k, k_ok, stride_xm,
                HAS_T: tl.constexpr, T_VEC: tl.constexpr, ONE_ROW: tl.constexpr):
        """The inputs ``offs_k`` of every row, thresholded: ``[BLOCK_K]`` (one row) or ``[BLOCK_M, BLOCK_K]``."""
        if ONE_ROW:
            x = tl.load(X + offs_k, mask=k_ok, other=0.0)
        else:
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
        if HAS_T:
            if T_VEC:
                t = tl.load(T + offs_k, mask=k_ok, other=0.0)
                if not ONE_ROW:
                    t = t[None, :]
            else:
                t = tl.load(T)
            x = tl.where(tl.abs(x) >= t, x, 0.0)
        return x

    @triton.jit
    def _w_tile(WT, x, offs_k, offs_n, n_load, stride_wk, ONE_ROW: tl.constexpr):
        """The weight rows ``offs_k`` of the inputs that fire (in any row); silent ones are not read."""
        if ONE_ROW:
            fire = x != 0
        else:
            fire = tl.max((x != 0).to(tl.int32), axis=0) > 0
        return tl.load(WT + offs_k[:, None] * stride_wk + offs_n[None, :], mask=fire[:, None] & n_load[None, :],
                       other=0.0)

    @triton.jit
    def _accumulate(acc, x, w, ONE_ROW: tl.constexpr, DOT_PRECISION: tl.constexpr):
        if ONE_ROW:  # [BLOCK_K, BLOCK_N] partial products, reduced over K once at the end
            return acc + x.to(tl.float32)[:, None] * w.to(tl.float32)
        else:  # rows padded to 16: the tensor cores take the product
            return tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _thread_fence(like):
        """``fence.acq_rel.gpu`` by every thread (CUDA's ``__threadfence``); returns ``like`` unchanged."""
        return tl.inline_asm_elementwise("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;", "=r,r", [like], dtype=tl.int32,
                                         is_pure=False, pack=1)

    @triton.jit
    def _event_gemv_kernel(X, T, WT, BIAS, Y, P, TICKETS, M, N, K, N_LOAD, stride_xm, stride_wk, stride_ym,
                           K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr,
                           HAS_T: tl.constexpr, T_VEC: tl.constexpr, HAS_BIAS: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, ONE_ROW: tl.constexpr, PREFETCH: tl.constexpr,
                           REDUCE: tl.constexpr, FENCE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        # Weight loads are bounded by N_LOAD >= N, the padded row (a multiple of 16 for transpose_weight's
        # layout): a mask that is constant over 16 columns lets each row load with 16-byte vectors.
        n_load = offs_n < N_LOAD
        offs_m = tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        k_lo = pid_k * K_PER_SPLIT  # K_PER_SPLIT is a multiple of BLOCK_K
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        if ONE_ROW:
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Software pipeline by hand: the weight mask depends on loaded inputs, so inputs are fetched
        # three tiles before their weights and the weights PREFETCH - 1 tiles before they are
        # summed: PREFETCH weight tiles are in flight, and no input latency is on the critical path.
        ar = tl.arange(0, BLOCK_K)
        x0 = _x_tile(X, T, offs_m, m_ok, k_lo + ar, k_lo + ar < k_hi, stride_xm, HAS_T, T_VEC, ONE_ROW)
        w0 = _w_tile(WT, x0, k_lo + ar, offs_n, n_load, stride_wk, ONE_ROW)
        o = k_lo + BLOCK_K + ar
        x1 = _x_tile(X, T, offs_m, m_ok, o, o < k_hi, stride_xm, HAS_T, T_VEC, ONE_ROW)
        o += BLOCK_K
        x2 = _x_tile(X, T, offs_m, m_ok, o, o < k_hi, stride_xm, HAS_T, T_VEC, ONE_ROW)
        o += BLOCK_K
        x3 = _x_tile(X, T, offs_m, m_ok, o, o < k_hi, stride_xm, HAS_T, T_VEC, ONE_ROW)
        if PREFETCH == 2:
            for k0 in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
                w1 = _w_tile(WT, x1, k_lo + k0 + ar, offs_n, n_load, stride_wk, ONE_ROW)
                o = k_lo + k0 + 3 * BLOCK_K + ar
                x4 = _x_tile(X, T, offs_m, m_ok, o, o < k_hi, stride_xm, HAS_T, T_VEC, ONE_ROW)
                acc = _accumulate(acc, x0, w0, ONE_ROW, DOT_PRECISION)
                x0, w0, x1, x2, x3 = x1, w1, x2, x3, x4
            acc = _accumulate(acc, x0, w0, ONE_ROW, DOT_PRECISION)
        else:
            w1 = _w_tile(WT, x1, k_lo + BLOCK_K + ar, offs_n, n_load, stride_wk, ONE_ROW)
            o = k_lo + 4 * BLOCK_K + ar
            x4 = _x_tile(X, T, offs_m, m_ok, o, o < k_hi, stride_xm, HAS_T, T_VEC, ONE_ROW)
            for k0 in range(2 * BLOCK_K, K_PER_SPLIT, BLOCK_K):
                w2 = _w_tile(WT, x2, k_lo + k0 + ar, offs_n, n_load, stride_wk, ONE_ROW)
                o = k_lo + k0 + 3 * BLOCK_K + ar
                x5 = _x_tile(X, T, offs_m, m_ok, o, o < k_hi, stride_xm, HAS_T, T_VEC, ONE_ROW)
                acc = _accumulate(acc, x0, w0, ONE_ROW, DOT_PRECISION)
                x0, w0, x1, w1, x2, x3, x4 = x1, w1, x2, w2, x3, x4, x5
            acc = _accumulate(acc, x0, w0, ONE_ROW, DOT_PRECISION)
            acc = _accumulate(acc, x1, w1, ONE_ROW, DOT_PRECISION)
        if ONE_ROW:
            out = tl.sum(acc, axis=0)[None, :]
        else:
            out = acc
        _finish_rows(out, BIAS, Y, P, TICKETS, M, N, stride_ym, offs_m, m_ok, offs_n, n_ok, pid_n, pid_k, SPLIT_K,
                     HAS_BIAS, REDUCE, FENCE, BLOCK_M, BLOCK_N)

    @triton.jit
    def _finish_rows(out, BIAS, Y, P, TICKETS, M, N, stride_ym, offs_m, m_ok, offs_n, n_ok, pid_n, pid_k,
                     SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr, FENCE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Rows ``offs_m`` of a product whose split partial sums ``out`` meet: published to ``P [SPLIT_K, M,
        N]``; REDUCE 0: a second kernel adds them. REDUCE 1 (2 with a fence by every thread, CUDA's
        threadFenceReduction pattern): the last split to arrive (atomic ticket) adds all of them in split
        order, adds the bias, writes y and resets the ticket."""
        mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K > 1:
            tl.store(P + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], out, mask=mask)
            if REDUCE == 0:
                last = pid_k < 0
            else:
                if FENCE:
                    offs_n = _thread_fence(offs_n)
                tl.debug_barrier()
                ticket = tl.atomic_add(TICKETS + pid_n, 1, sem="acq_rel")
                last = ticket == SPLIT_K - 1
                if last:
                    if FENCE:
                        offs_n = _thread_fence(offs_n)
                    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                    for s in range(0, SPLIT_K):
                        out += tl.load(P + s * M * N + offs_m[:, None] * N + offs_n[None, :], mask=mask, other=0.0,
                                       cache_modifier=".cg")
                    tl.atomic_xchg(TICKETS + pid_n, 0)
        else:
            last = pid_k == 0
        if last:
            if HAS_BIAS:
                out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], out.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _reduce_kernel(P, BIAS, Y, M, N, stride_ym, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
        """y = the split partial sums ``P [SPLIT_K, M, N]`` added in split order (+ bias)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M * N
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLIT_K):
            acc += tl.load(P + s * M * N + offs, mask=ok, other=0.0)
        n = offs % N
        if HAS_BIAS:
            acc += tl.load(BIAS + n, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + (offs // N) * stride_ym + n, acc.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _compact_events(X, T, S, k_lo, k_hi, HAS_T: tl.constexpr, T_VEC: tl.constexpr, CHUNK: tl.constexpr,
                        INPUTS: tl.constexpr):
        """Store the indices of the inputs ``k_lo .. k_hi`` that fire at ``S[0:count]``, in order; returns count."""
        count = 0
        for c0 in tl.static_range(0, INPUTS, CHUNK):
            offs = k_lo + c0 + tl.arange(0, CHUNK)
            _, fire = _fires(X, T, offs, offs < k_hi, HAS_T, T_VEC)
            f = fire.to(tl.int32)
            tl.store(S + count + tl.cumsum(f, axis=0) - 1, offs, mask=fire)
            count += tl.sum(f, axis=0)
        return count

    @triton.jit
    def _event_gemv_compact_kernel(X, T, WT, BIAS, Y, P, TICKETS, S, N, K, N_LOAD, stride_wk,
                                   SPLIT_K: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_T: tl.constexpr,
                                   T_VEC: tl.constexpr, HAS_BIAS: tl.constexpr, INPUTS: tl.constexpr,
                                   CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One row: each program compacts the firing inputs of its ``INPUTS`` into its own scratch ``S``,
        then gathers only their weight rows, ``BLOCK_K`` at a time (work and traffic follow the events)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        n_load = offs_n < N_LOAD
        k_lo = pid_k * INPUTS
        s = S + (pid_n * SPLIT_K + pid_k) * INPUTS
        count = _compact_events(X, T, s, k_lo, tl.minimum(k_lo + INPUTS, K), HAS_T, T_VEC, CHUNK, INPUTS)
        tl.debug_barrier()  # the scratch written by every thread is read by every thread
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        ar = tl.arange(0, BLOCK_K)
        for j in tl.range(0, count, BLOCK_K, num_stages=NUM_STAGES):
            ok = j + ar < count
            k = tl.load(s + j + ar, mask=ok, other=0)
            x = tl.load(X + k, mask=ok, other=0.0)
            w = tl.load(WT + k[:, None] * stride_wk + offs_n[None, :], mask=ok[:, None] & n_load[None, :], other=0.0)
            acc += x.to(tl.float32)[:, None] * w.to(tl.float32)
        _finish_row(tl.sum(acc, axis=0), BIAS, Y, P, TICKETS, N, offs_n, n_ok, pid_n, pid_k, SPLIT_K, SPLIT_P2,
                    HAS_BIAS)

    @triton.jit
    def _finish_row(out, BIAS, Y, P, TICKETS, N, offs_n, n_ok, pid_n, pid_k, SPLIT_K: tl.constexpr,
                    SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr):
        """One row's split partial sums ``out`` meet: the last program of this output block to arrive (an
        atomic ticket) adds them as one tree, adds the bias and writes ``y``."""
        last = pid_k == 0
        if SPLIT_K > 1:
            tl.store(P + pid_k * N + offs_n, out, mask=n_ok)
            tl.debug_barrier()
            ticket = tl.atomic_add(TICKETS + pid_n, 1, sem="acq_rel")
            last = ticket == SPLIT_K - 1
            if last:
                sp = tl.arange(0, SPLIT_P2)
                out = tl.sum(tl.load(P + sp[:, None] * N + offs_n[None, :], mask=(sp < SPLIT_K)[:, None] & n_ok[None, :],
                                     other=0.0, cache_modifier=".cg"), axis=0)
                tl.atomic_xchg(TICKETS + pid_n, 0)
        if last:
            if HAS_BIAS:
                out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(Y + offs_n, out.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _fires(X, T, offs, ok, HAS_T: tl.constexpr, T_VEC: tl.constexpr):
        """(x, whether each input fires) at ``offs``."""
        x = tl.load(X + offs, mask=ok, other=0.0)
        fire = (x != 0) & ok
        if HAS_T:
            if T_VEC:
                t = tl.load(T + offs, mask=ok, other=0.0)
            else:
                t = tl.load(T)
            fire = fire & (tl.abs(x) >= t)
        return x, fire

    @triton.jit
    def _event_list_kernel(X, T, IDX, VAL, COUNT, M, K, stride_xm, HAS_T: tl.constexpr, T_VEC: tl.constexpr,
                           CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, PDL: tl.constexpr):
        """The events of ``x [M, K]``, listed once: the inputs that fire in any row, in order, at
        ``IDX[0:count]``; their values (float32), row ``m``'s at ``VAL[m * K:][:count]`` (0 in the rows
        where the input is silent); ``count`` at ``COUNT``. Program ``c`` lists chunk ``c``; where its
        events go, it learns by counting the events of the chunks before it itself (one load of at most
        ``K`` inputs a row, no waiting on other programs)."""
        c = tl.program_id(0)
        if PDL:
            gdc_wait()  # x is written by the kernel before this one
            gdc_launch_dependents()  # the product's programs may take their places now (they wait for the list)
        chunks = tl.arange(0, CHUNKS_P2)
        ar = tl.arange(0, CHUNK)
        offs2 = chunks[:, None] * CHUNK + ar[None, :]
        earlier = (chunks[:, None] < c) & (offs2 < K)
        offs = c * CHUNK + ar
        if BLOCK_M == 1:
            _, fire2 = _fires(X, T, offs2, earlier, HAS_T, T_VEC)
            before = tl.sum(tl.sum(fire2.to(tl.int32), axis=1), axis=0)
            x, fire = _fires(X, T, offs, offs < K, HAS_T, T_VEC)
            f = fire.to(tl.int32)
            pos = before + tl.cumsum(f, axis=0) - 1
            tl.store(VAL + pos, x.to(tl.float32), mask=fire)
        else:
            seen = tl.zeros((CHUNKS_P2, CHUNK), dtype=tl.int32)
            for m in range(0, M):
                _, fire2 = _fires(X + m * stride_xm, T, offs2, earlier, HAS_T, T_VEC)
                seen = seen | fire2.to(tl.int32)
            before = tl.sum(tl.sum(seen, axis=1), axis=0)
            rows = tl.arange(0, BLOCK_M)
            r_ok = rows[:, None] < M
            x, fire_rows = _fires(X + rows[:, None] * stride_xm, T, offs[None, :], r_ok & (offs[None, :] < K),
                                  HAS_T, T_VEC)
            f = tl.max(fire_rows.to(tl.int32), axis=0)
            fire = f > 0
            pos = before + tl.cumsum(f, axis=0) - 1
            tl.store(VAL + rows[:, None] * K + pos[None, :], tl.where(fire_rows, x, 0.0).to(tl.float32),
                     mask=r_ok & fire[None, :])
        tl.store(IDX + pos, offs, mask=fire)
        if c == tl.num_programs(0) - 1:
            tl.store(COUNT, before + tl.sum(f, axis=0))

    @triton.jit
    def _event_list_gemv_kernel(IDX, VAL, COUNT, WT, BIAS, Y, P, TICKETS, M, N, K, N_LOAD, stride_wk, stride_ym,
                                SPLIT_K: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
                                NUM_STAGES: tl.constexpr, DOT_PRECISION: tl.constexpr, FMA: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                PDL: tl.constexpr):
        """The product from an event list: the ``SPLIT_K`` programs of an output block share its events
        evenly (whole ``BLOCK_K`` steps) and gather only their weight rows. Several rows: up to 4
        (``BLOCK_M`` 2 or 4, ``FMA``) with a partial sum per row in registers, more (``BLOCK_M`` 16)
        through ``tl.dot``."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        n_load = offs_n < N_LOAD
        if PDL:
            gdc_wait()  # the event list is written by the kernel before this one
        count = tl.load(COUNT)
        steps = tl.cdiv(count, BLOCK_K)
        lo = (pid_k * steps // SPLIT_K) * BLOCK_K
        hi = tl.minimum(((pid_k + 1) * steps // SPLIT_K) * BLOCK_K, count)
        ar = tl.arange(0, BLOCK_K)
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for j in tl.range(lo, hi, BLOCK_K, num_stages=NUM_STAGES):
                live = j + ar < hi
                k = tl.load(IDX + j + ar, mask=live, other=0)
                x = tl.load(VAL + j + ar, mask=live, other=0.0)
                w = tl.load(WT + k[:, None] * stride_wk + offs_n[None, :], mask=live[:, None] & n_load[None, :],
                            other=0.0)
                acc += x[:, None] * w.to(tl.float32)
            if PDL:
                gdc_launch_dependents()
            _finish_row(tl.sum(acc, axis=0), BIAS, Y, P, TICKETS, N, offs_n, n_ok, pid_n, pid_k, SPLIT_K, SPLIT_P2,
                        HAS_BIAS)
        else:
            rows = tl.arange(0, BLOCK_M)
            r_ok = rows < M
            if FMA:
                acc3 = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for j in tl.range(lo, hi, BLOCK_K, num_stages=NUM_STAGES):
                live = j + ar < hi
                k = tl.load(IDX + j + ar, mask=live, other=0)
                x = tl.load(VAL + rows[:, None] * K + (j + ar)[None, :], mask=r_ok[:, None] & live[None, :], other=0.0)
                w = tl.load(WT + k[:, None] * stride_wk + offs_n[None, :], mask=live[:, None] & n_load[None, :],
                            other=0.0)
                if FMA:
                    acc3 += x[:, :, None] * w.to(tl.float32)[None, :, :]
                else:
                    acc = tl.dot(x.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
            if FMA:
                acc = tl.sum(acc3, axis=1)
            if PDL:
                gdc_launch_dependents()
            _finish_rows(acc, BIAS, Y, P, TICKETS, M, N, stride_ym, rows, r_ok, offs_n, n_ok, pid_n, pid_k, SPLIT_K,
                         HAS_BIAS, 1, False, BLOCK_M, BLOCK_N)


@dataclass(frozen=True)
class KernelConfig:
    """Which kernel, its tile sizes and launch shape.

    ``algorithm``: ``"masked"`` (every input tile is visited and the weight rows of silent inputs
    are masked off: traffic follows the events, instructions do not), ``"compact"`` (one row
    only: each program first compacts the indices of its ``inputs`` firing inputs, then gathers
    just those weight rows ``block_k`` at a time, so work also follows the events) or
    ``"events"`` (two kernels: the first writes the event list of ``x`` once, indices and values,
    as the chip's producing core would send it; the product's programs then share the listed
    events evenly and gather their weight rows; for several rows, the inputs firing in any row,
    each weight row read once for all of them). Masked and events: ``waves`` is
    the aimed-for number of programs per multiprocessor, which sets the split of the inputs (of
    the events); masked: ``min_iters`` the fewest ``block_k`` steps a split may have. Compact and
    events: ``num_stages`` is Triton's pipelining depth of the gather loop. Events: ``fma_rows``,
    up to how many rows keep a partial sum per row in registers (more go through ``tl.dot``,
    whose tiles have 16 rows). ``pdl``: launch with
    programmatic dependent launch where the GPU and Triton have it (Hopper on): a kernel's
    programs take their places while the kernel before it finishes and wait for its results.
    :data:`DEFAULT_CONFIG` (masked) and :data:`COMPACT_CONFIG` are the fastest at 50% sparsity
    (geometric mean over four shapes) of ``benchmarks/gpu_sparse_gemv.py --sweep`` on an H200,
    :data:`EVENT_LIST_CONFIGS` the two fastest of a sweep of the events kernels' tiles on the same
    GPU (:data:`EVENT_LIST_ROWS_CONFIG` for several rows); :func:`best_kernel` picks among them
    (and dense) per shape and sparsity."""

    block_n: int = 64
    block_k: int = 64
    waves: int = 4
    min_iters: int = 4
    num_warps: int = 4
    num_stages: int = 1  # the kernel pipelines its loads by hand
    prefetch: int = 3    # weight tiles in flight per program: 2 or 3
    reduce: str = "ticket"  # how split partial sums meet: "separate" kernel, "ticket" or "fenced" ticket
    algorithm: str = "masked"  # or "compact", "events"
    inputs: int = 1024  # compact: inputs per program (a power of two)
    pdl: bool = False   # programmatic dependent launch, where available
    fma_rows: int = 0   # events: up to this many rows with a partial sum per row in registers, more through tl.dot

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(map(repr, ALGORITHMS))}, got {self.algorithm!r}")
        if self.inputs < 16 or self.inputs & (self.inputs - 1):
            raise ValueError(f"inputs must be a power of two >= 16, got {self.inputs}")


DEFAULT_CONFIG = KernelConfig()
COMPACT_CONFIG = KernelConfig(algorithm="compact", block_n=128, block_k=32, num_warps=4, num_stages=3, inputs=1024)
# The best of the sweep, and the best with other output blocks: wide blocks suit wide matrices (4096->14336),
# narrow ones the others (2048->8192).
EVENT_LIST_CONFIGS = (
    KernelConfig(algorithm="events", block_n=64, block_k=32, num_warps=4, num_stages=5, waves=2, pdl=True, fma_rows=4),
    KernelConfig(algorithm="events", block_n=32, block_k=64, num_warps=4, num_stages=5, waves=2, pdl=True, fma_rows=4))
# Several rows (tl.dot): the fastest of 18 tilings for 4 rows at 0% and 90% sparsity on an H200.
EVENT_LIST_ROWS_CONFIG = KernelConfig(algorithm="events", block_n=256, block_k=32, num_warps=8, num_stages=3, waves=2,
                                      pdl=True)
EVENT_LIST_CHUNK = 1024  # inputs per program of the event list
MAX_EVENT_LIST_INPUTS = 1 << 14  # each of its programs counts the events before its chunk in one load
MAX_SPLIT = 16


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _launch_shape(rows: int, N: int, K: int, n_sm: int, cfg: KernelConfig):
    """(BLOCK_M, BLOCK_K, inputs per split, number of splits) for one problem."""
    # Several rows go through tl.dot, which wants at least 16 rows and 16 inputs a tile.
    block_m = 1 if rows == 1 else 16
    block_k = cfg.block_k if rows == 1 else max(16, cfg.block_k)
    split = max(1, min(round(cfg.waves * n_sm / _cdiv(N, cfg.block_n)), K // (cfg.min_iters * block_k)))
    k_per_split = _cdiv(_cdiv(K, split), block_k) * block_k
    return block_m, block_k, k_per_split, _cdiv(K, k_per_split)


INTERPRETER_SM_COUNT = 8  # the launch shape Triton's CPU interpreter is given (tests may mimic a GPU's)
_workspaces: dict = {}


def _workspace(device: torch.device, split: int, rows: int, N: int, n_blocks: int):
    """Partial sums ``[split, rows, N]`` float32 and zeroed tickets, reused by every launch of that shape
    (launches on one stream run in order; the kernel leaves the tickets at zero)."""
    key = (device, split, rows, N, n_blocks)
    if key not in _workspaces:
        _workspaces[key] = (torch.empty(split * rows * N, device=device, dtype=torch.float32),
                            torch.zeros(n_blocks, device=device, dtype=torch.int32))
    return _workspaces[key]


def _compact_gemv(x2: torch.Tensor, weight_t: torch.Tensor, t: torch.Tensor | None, bias: torch.Tensor | None,
                  cfg: KernelConfig, n_load: int) -> torch.Tensor:
    K, N = weight_t.shape
    inputs = min(cfg.inputs, max(16, triton.next_power_of_2(K)))
    split, n_blocks = _cdiv(K, inputs), _cdiv(N, cfg.block_n)
    partials, tickets = _workspace(x2.device, split, 1, N, n_blocks)
    key = (x2.device, "compact scratch", n_blocks * split * inputs)  # each program's own index scratch
    if key not in _workspaces:
        _workspaces[key] = torch.empty(key[2], device=x2.device, dtype=torch.int32)
    scratch = _workspaces[key]
    y = torch.empty(1, N, device=x2.device, dtype=x2.dtype)
    has_t = t is not None
    _event_gemv_compact_kernel[(n_blocks, split)](
        x2, t if has_t else x2, weight_t, bias if bias is not None else x2, y, partials, tickets, scratch,
        N, K, n_load, weight_t.stride(0), SPLIT_K=split, SPLIT_P2=triton.next_power_of_2(split), HAS_T=has_t,
        T_VEC=has_t and t.ndim == 1, HAS_BIAS=bias is not None, INPUTS=inputs, CHUNK=min(inputs, 1024),
        NUM_STAGES=cfg.num_stages, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps)
    return y


def _pdl(cfg: KernelConfig, device: torch.device) -> bool:
    """Whether to launch ``cfg``'s kernels with programmatic dependent launch on ``device``."""
    return cfg.pdl and HAS_PDL and device.type == "cuda" and not _interpreting() and \
        torch.cuda.get_device_capability(device)[0] >= 9


class EventList(NamedTuple):
    """The events of ``rows`` input rows, in buffers of the module's (:func:`event_list`)."""

    indices: torch.Tensor  # int32 [K]: the inputs that fire in any row, in order, in the first `count`
    values: torch.Tensor   # float32 [rows, K]: their values, 0 in a row where the input is silent
    count: torch.Tensor    # int32 [1]

    def clone(self) -> "EventList":
        return EventList(*(a.clone() for a in self))


def event_list(x: torch.Tensor, t: torch.Tensor | None = None, *, pdl: bool = False) -> EventList:
    """The events of ``x [rows, K]`` (at most :data:`MAX_KERNEL_ROWS` rows; thresholded by ``t`` on the
    way): the inputs that fire in any row, listed once in order, with each row's values. The buffers
    belong to the module and are rewritten by the next call for the same ``K`` on this device
    (:meth:`EventList.clone` keeps a copy)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    rows = x2.shape[0]
    if K > MAX_EVENT_LIST_INPUTS:
        raise ValueError(f"an event list takes at most {MAX_EVENT_LIST_INPUTS} inputs, got {K}")
    if not 0 < rows <= MAX_KERNEL_ROWS:
        raise ValueError(f"an event list takes 1 to {MAX_KERNEL_ROWS} rows, got {rows}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    key = (x.device, "events", K)
    if key not in _workspaces:
        _workspaces[key] = (torch.empty(K, device=x.device, dtype=torch.int32),
                            torch.empty(MAX_KERNEL_ROWS * K, device=x.device, dtype=torch.float32),
                            torch.empty(1, device=x.device, dtype=torch.int32))
    idx, val, count = _workspaces[key]
    chunk = min(EVENT_LIST_CHUNK, triton.next_power_of_2(K))
    chunks = _cdiv(K, chunk)
    has_t = t is not None
    _event_list_kernel[(chunks,)](x2, t if has_t else x2, idx, val, count, rows, K, x2.stride(0), HAS_T=has_t,
                                  T_VEC=has_t and t.ndim == 1, CHUNKS_P2=triton.next_power_of_2(chunks), CHUNK=chunk,
                                  BLOCK_M=triton.next_power_of_2(rows), PDL=pdl, num_warps=4,
                                  **({"launch_pdl": True} if pdl else {}))
    return EventList(idx, val[:rows * K].view(rows, K), count)


def event_list_gemv(events: EventList, weight_t: torch.Tensor, bias: torch.Tensor | None, cfg: KernelConfig,
                    dtype: torch.dtype, *, pdl: bool = False) -> torch.Tensor:
    """``y [rows, out]`` (``dtype``) from an :func:`event_list` and ``W^T [in, out]``: only listed rows are
    read, once for all rows."""
    rows = events.values.shape[0]
    K, N = weight_t.shape
    n_blocks = _cdiv(N, cfg.block_n)
    n_sm = _sm_count(weight_t.device.index or 0) if weight_t.is_cuda else INTERPRETER_SM_COUNT
    split = max(1, min(MAX_SPLIT, round(cfg.waves * n_sm / n_blocks)))
    partials, tickets = _workspace(weight_t.device, split, rows, N, n_blocks)
    y = torch.empty(rows, N, device=weight_t.device, dtype=dtype)
    fma = 1 < rows <= cfg.fma_rows
    block_m = 1 if rows == 1 else (triton.next_power_of_2(rows) if fma else 16)
    _event_list_gemv_kernel[(n_blocks, split)](
        events.indices, events.values, events.count, weight_t, bias if bias is not None else weight_t, y, partials,
        tickets, rows, N, K, _n_load(weight_t), weight_t.stride(0), y.stride(0), SPLIT_K=split,
        SPLIT_P2=triton.next_power_of_2(split), HAS_BIAS=bias is not None, NUM_STAGES=cfg.num_stages,
        DOT_PRECISION="ieee" if weight_t.dtype == torch.float32 else "tf32", FMA=fma, BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k if rows == 1 or fma else max(16, cfg.block_k), PDL=pdl,
        num_warps=cfg.num_warps,
        **({"launch_pdl": True} if pdl else {}))
    return y


def _n_load(weight_t: torch.Tensor) -> int:
    """How far a row may be read: up to the padded row end when the storage holds it (transpose_weight's layout)."""
    K, N = weight_t.shape
    if weight_t.stride(0) > N and weight_t.untyped_storage().nbytes() >= \
            (weight_t.storage_offset() + K * weight_t.stride(0)) * weight_t.element_size():
        return weight_t.stride(0)
    return N


def _event_gemv_triton(x2: torch.Tensor, weight_t: torch.Tensor, t: torch.Tensor | None, bias: torch.Tensor | None,
                       cfg: KernelConfig) -> torch.Tensor:
    M, K = x2.shape
    N = weight_t.shape[1]
    n_load = _n_load(weight_t)
    if cfg.algorithm != "masked":
        if M == 1 and cfg.algorithm == "compact":
            return _compact_gemv(x2, weight_t, t, bias, cfg, n_load)
        if cfg.algorithm == "events" and K <= MAX_EVENT_LIST_INPUTS:
            pdl = _pdl(cfg, x2.device)
            return event_list_gemv(event_list(x2, t, pdl=pdl), weight_t, bias, cfg, x2.dtype, pdl=pdl)
        cfg = DEFAULT_CONFIG if DEFAULT_CONFIG.algorithm == "masked" else KernelConfig()  # otherwise: masked
    n_sm = _sm_count(x2.device.index or 0) if x2.is_cuda else INTERPRETER_SM_COUNT
    block_m, block_k, k_per_split, split = _launch_shape(M, N, K, n_sm, cfg)
    n_blocks = _cdiv(N, cfg.block_n)
    partials, tickets = _workspace(x2.device, split, M, N, n_blocks)
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    has_t = t is not None
    reduce = ("separate", "ticket", "fenced").index(cfg.reduce)
    _event_gemv_kernel[(n_blocks, split)](
        x2, t if has_t else x2, weight_t, bias if bias is not None else x2, y, partials, tickets,
        M, N, K, n_load, x2.stride(0), weight_t.stride(0), y.stride(0), K_PER_SPLIT=k_per_split, SPLIT_K=split,
        HAS_T=has_t, T_VEC=has_t and t.ndim == 1, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", ONE_ROW=block_m == 1,
        PREFETCH=cfg.prefetch, REDUCE=reduce, FENCE=reduce == 2 and not _interpreting(),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1 and reduce == 0:
        _reduce_kernel[(_cdiv(M * N, 1024),)](partials, bias if bias is not None else x2, y, M, N, y.stride(0),
                                              SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=1024)
    return y


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def event_gemv(x: torch.Tensor, weight_t: torch.Tensor, t: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, *, backend: str = "auto",
               config: KernelConfig | None = None) -> torch.Tensor:
    """``threshold(x, t) @ weight_t + bias`` reading only the weight rows of firing inputs.

    ``x``: ``[..., in]``; ``weight_t``: ``[in, out]`` with contiguous rows (:func:`transpose_weight`),
    same dtype as ``x``; ``t``: a scalar or per-input threshold (``None``: skip exact zeros only);
    float32 accumulation, result in ``x.dtype``. ``backend``: ``"triton"``, ``"torch"``
    (:func:`event_gemv_torch`) or ``"auto"`` (Triton on CUDA for at most :data:`MAX_KERNEL_ROWS`
    rows without autograd). ``config``: which kernel, its tiles and launch shape (default
    :data:`DEFAULT_CONFIG`, the masked kernel; :data:`COMPACT_CONFIG` compacts the events first and
    takes one row only: for several rows the masked kernel runs; :data:`EVENT_LIST_CONFIGS` list
    them once in a kernel of their own).
    """
    K, N = weight_t.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} inputs but weight_t is [{K}, {N}] ([in, out])")
    if x.dtype != weight_t.dtype:
        raise TypeError(f"x is {x.dtype} but the weights are {weight_t.dtype}")
    if t is not None:
        t = t.to(device=x.device, dtype=x.dtype)
        if t.ndim > 1 or (t.ndim == 1 and t.numel() != K):
            raise ValueError(f"the threshold must be a scalar or have {K} values, got shape {tuple(t.shape)}")
    rows = x.numel() // K if K else 0
    if backend == "auto":
        grad = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (x, weight_t, bias))
        backend = "triton" if HAS_TRITON and x.is_cuda and 0 < rows <= MAX_KERNEL_ROWS and not grad else "torch"
    if backend == "torch":
        return event_gemv_torch(x, weight_t, t, bias)
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'event-rwkv[gpu]')")
    if rows > MAX_KERNEL_ROWS:
        raise ValueError(f"the kernel takes at most {MAX_KERNEL_ROWS} rows, got {rows}")
    if weight_t.stride(1) != 1:
        raise ValueError("weight_t must be [in, out] with contiguous rows (W.t().contiguous(), see transpose_weight)")
    if K * weight_t.stride(0) >= 2 ** 31:
        raise ValueError(f"a [{K}, {N}] matrix is too large for the kernel's 32-bit offsets")
    x2 = x.reshape(rows, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = _event_gemv_triton(x2, weight_t, t.contiguous() if t is not None else None, bias, config or DEFAULT_CONFIG)
    return y.reshape(*x.shape[:-1], N)


def transpose_weight(weight: torch.Tensor) -> torch.Tensor:
    """``W [out, in]`` -> ``W^T [in, out]`` whose rows start 16-byte aligned (row stride padded to a
    multiple of 16 elements; the padding is never read), so every row loads with wide vector loads."""
    N, K = weight.shape
    padded = torch.zeros(K, _cdiv(N, 16) * 16, device=weight.device, dtype=weight.dtype)
    padded[:, :N] = weight.detach().t()
    return padded[:, :N]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

class EventThreshold(Threshold):
    """A :class:`~rllm.model.Threshold` that never synchronizes with the host and can defer its work.

    Made from a live site by ``site.__class__ = EventThreshold`` (see :func:`enable_event_kernels`).
    Whether the threshold is all zeros is read once per threshold tensor, not once per call. With
    ``deferred`` set, the site passes ``x`` through and the :class:`EventLinear` modules that read
    it apply the threshold (in the kernel); a site with forward hooks still thresholds itself.
    """

    deferred: bool = False

    def is_zero(self) -> bool:
        t = self.threshold
        seen = self.__dict__.get("_zero_for")
        if seen is None or seen[0] is not t or seen[1] != t._version:
            self.__dict__["_zero_for"] = (t, t._version, bool((t == 0).all()))
        return self.__dict__["_zero_for"][2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold.ndim > 1:  # per-sequence thresholds (batched calibration): the site's own rule
            return super().forward(x)
        if self.is_zero() or (self.deferred and not self._forward_hooks):
            return x
        return threshold(x, self.threshold)


class EventLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same hooks) whose product skips the weights of silent inputs.

    ``site``: the :class:`EventThreshold` whose output this module reads; when it is ``deferred``
    this module applies its threshold. ``mode``: ``"auto"`` (the kernel on CUDA for at most
    ``max_rows`` rows when ``use_kernel``, the dense product otherwise), ``"kernel"`` (always
    :func:`event_gemv`: the torch fallback on CPU) or ``"dense"``. ``use_kernel`` (and ``config``)
    are set by :func:`tune_event_kernels`: whichever of dense and the kernels is fastest for this
    shape at the measured sparsity (:func:`best_kernel`).
    ``max_rows`` is 1 by default: for batches of 4 on an H200 the masked kernel lost to cuBLAS at
    every sparsity and the event list won only from about 90% sparsity per row
    (``benchmarks/results/gpu_sparse_gemv.csv``). ``config``: the kernel and tiles
    (None: :data:`DEFAULT_CONFIG`), also set by :func:`tune_event_kernels`. The transposed weights are a
    cached copy (one more copy of each swapped matrix), remade when the weight changes (device,
    dtype, in-place update).
    """

    def __init__(self, linear: nn.Linear, site: EventThreshold | None = None, mode: str = "auto",
                 max_rows: int = 1):
        nn.Module.__init__(self)
        if mode not in ("auto", "kernel", "dense"):
            raise ValueError(f"mode must be 'auto', 'kernel' or 'dense', got {mode!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        # The wrapped module's hooks live on (EventOPT applies its sites as forward pre-hooks): share the
        # dicts themselves, so the handles that registered them still remove them.
        for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hasattr(linear, name):
                setattr(self, name, getattr(linear, name))
        self.__dict__["linear"] = linear  # unregistered: the original, put back by disable_event_kernels
        self.__dict__["site"] = site      # unregistered: the site stays where the model keeps it
        self.mode = mode
        self.max_rows = max_rows
        self.use_kernel = True
        self.config: KernelConfig | None = None  # the kernel to run; tune_event_kernels picks it
        self.sparsity: float | None = None  # measured by tune_event_kernels
        self._recording: list | None = None
        self._wt_key = self._wt = self._t_key = self._t = None

    @property
    def weight_t(self) -> torch.Tensor:
        """``W^T [in, out]`` (:func:`transpose_weight`): a firing input's weights are one contiguous row."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._wt_key != key:
            self._wt_key, self._wt = key, transpose_weight(w)
        return self._wt

    def _threshold(self, x: torch.Tensor) -> torch.Tensor | None:
        """The deferred site's threshold in ``x.dtype`` (cached), or None when there is nothing to apply."""
        site = self.site
        if site is None or not site.deferred or site.threshold.ndim > 1 or site.is_zero():
            return None
        t = site.threshold
        if self._t_key is None or self._t_key[0] is not t or self._t_key[1:] != (t._version, x.dtype, x.device):
            self._t_key, self._t = (t, t._version, x.dtype, x.device), t.to(device=x.device, dtype=x.dtype)
        return self._t

    def _kernel_wanted(self, x: torch.Tensor) -> bool:
        if self.mode != "auto":
            return self.mode == "kernel"
        if not (HAS_TRITON and x.is_cuda and self.use_kernel) or x.numel() > self.max_rows * self.in_features:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self._threshold(x)
        if self._recording is not None:  # tune_event_kernels: share of silent inputs (synchronizes)
            xt = threshold(x, t) if t is not None else x
            self._recording.append(float((xt == 0).float().mean()))
        if self._kernel_wanted(x):
            return event_gemv(x, self.weight_t, t, self.bias, config=self.config)
        if t is not None:
            x = threshold(x, t)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        sparsity = "" if self.sparsity is None else f", sparsity={self.sparsity:.2f}"
        kernel = "" if self.config is None else f", kernel={self.config.algorithm}"
        return f"{super().extra_repr()}, mode={self.mode}, use_kernel={self.use_kernel}{kernel}{sparsity}"


def _site_linears(model) -> list[tuple[nn.Module, str, Threshold]]:
    """(parent, attribute, site) of every Linear an activation site feeds."""
    if isinstance(model, RWKV):
        out = []
        for b in model.blocks:
            out += [(b.att, s, b.att.sites[s]) for s in ("key", "value", "receptance", "output")]
            out += [(b.ffn, s, b.ffn.sites[s]) for s in ("key", "receptance", "value")]
        return out + [(model, "head", model.head_site)]
    from rllm.opt import EventOPT

    if isinstance(model, EventOPT):
        dec, out = model.hf.model.decoder, []
        for layer, s in zip(dec.layers, model.layer_sites):
            att = layer.self_attn
            out += [(att, p, s["qkv"]) for p in ("q_proj", "k_proj", "v_proj")]
            out += [(att, "out_proj", s["out"]), (layer, "fc1", s["fc1"]), (layer, "fc2", s["fc2"])]
        out += [(dec, key, model.proj_sites[key]) for key in model.proj_sites]
        return out + [(model.hf, "lm_head", model.head_site)]
    raise TypeError(f"event kernels know rllm.model.RWKV and rllm.opt.EventOPT, not {type(model).__name__}")


def enable_event_kernels(model, *, mode: str = "auto", fuse_thresholds: bool = True, max_rows: int = 1,
                         sample: torch.Tensor | None = None) -> dict[str, EventLinear]:
    """Swap every site-fed Linear of ``model`` for an :class:`EventLinear`; returns them by site name
    (OPT's ``qkv`` site: ``name.q_proj`` etc.).

    Weights stay shared (and the transposed copies are made on first use on the model's device).
    ``fuse_thresholds``: the kernel applies each site's threshold as it reads the input (the site
    itself passes ``x`` through). ``sample`` (token ids ``[B, T]``): run :func:`tune_event_kernels`
    on it, so that each module runs the fastest of dense and the kernels at its sparsity; without
    it every module uses the masked kernel in ``auto`` mode wherever it can run. Enabling twice
    re-enables.
    """
    disable_event_kernels(model)
    pairs = _site_linears(model)
    fan_out = {}
    for _, _, site in pairs:
        fan_out[site.name] = fan_out.get(site.name, 0) + 1
    swapped: dict[str, EventLinear] = {}
    for parent, attr, site in pairs:
        site.__class__ = EventThreshold
        site.deferred = fuse_thresholds and mode != "dense"
        event = EventLinear(getattr(parent, attr), site, mode=mode, max_rows=max_rows)
        setattr(parent, attr, event)
        swapped[site.name if fan_out[site.name] == 1 else f"{site.name}.{attr}"] = event
    if sample is not None:
        tune_event_kernels(model, sample)
    return swapped


def disable_event_kernels(model) -> None:
    """Put the original Linear modules and plain Threshold sites back (a no-op if none were swapped)."""
    for parent, attr, site in _site_linears(model):
        module = getattr(parent, attr)
        if isinstance(module, EventLinear):
            setattr(parent, attr, module.linear)
        if isinstance(site, EventThreshold):
            site.__dict__.pop("deferred", None)
            site.__dict__.pop("_zero_for", None)
            site.__class__ = Threshold


@torch.no_grad()
def tune_event_kernels(model, sample: torch.Tensor, margin: float = 0.03) -> dict[str, float]:
    """Measure each EventLinear's input sparsity over step-mode decoding of ``sample`` (token ids
    ``[B, T]``), then give each the fastest of dense and the kernels (masked, compacting, event list) for its
    shape at that sparsity on this GPU (:func:`best_kernel`; a kernel must beat dense by ``margin``).
    Returns the measured sparsities."""
    events = [m for m in model.modules() if isinstance(m, EventLinear)]
    if not events:
        raise ValueError("no EventLinear modules: call enable_event_kernels first")
    for m in events:
        m._recording = []
    try:
        state = None
        for i in range(sample.shape[1]):
            _, state = model.step(sample[:, i], state)
    finally:
        recorded = {m: m._recording for m in events}
        for m in events:
            m._recording = None
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, EventLinear) and recorded[m]:
            m.sparsity = sum(recorded[m]) / len(recorded[m])
            rows = sample.shape[0]
            if m.weight.is_cuda and HAS_TRITON and rows <= m.max_rows:
                m.config = best_kernel(m.in_features, m.out_features, m.weight.dtype, m.weight.device,
                                       round(m.sparsity * 20) / 20, rows=rows, margin=margin)
                m.use_kernel = m.config is not None
            out[name] = m.sparsity
    return out


# --------------------------------------------------------------------------------------------
# Timing on the GPU
# --------------------------------------------------------------------------------------------

def capture_graph(fn, *, warmup: int = 3, calls: int = 1) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``calls`` calls of ``fn``, after ``warmup`` calls on a side stream (compilation,
    allocation: what graph capture must not see for the first time)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def gpu_time(fn, *, calls: int = 20, replays: int = 7) -> float:
    """Median seconds per call of ``fn`` on the current CUDA device, from CUDA-graph replays.

    ``fn`` is run a few times first (compilation, allocation), then ``calls`` calls are captured
    in one graph (so launch overhead from Python is not what is measured) and the graph replayed
    ``replays`` times, each timed with CUDA events.
    """
    graph = capture_graph(fn, calls=calls)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    times.sort()
    return times[len(times) // 2]


def sparse_inputs(rows: int, K: int, sparsity: float, copies: int, device, dtype, seed: int = 0) -> list[torch.Tensor]:
    """``copies`` random ``[rows, K]`` inputs, each row with exactly ``round(sparsity * K)`` zeros."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_zero = round(sparsity * K)
    out = []
    for _ in range(copies):
        x = torch.randn(rows, K, generator=g)
        for r in range(rows):
            x[r, torch.randperm(K, generator=g)[:n_zero]] = 0
        out.append(x.to(device=device, dtype=dtype))
    return out


def rotating_weights(K: int, N: int, device, dtype, min_bytes: int | None = None, seed: int = 0):
    """Enough independent ``[N, K]`` weight copies (and their ``W^T``) to overflow the L2 cache three times,
    so that timings read weights from memory as decoding does."""
    if min_bytes is None:
        min_bytes = 3 * getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    copies = max(2, math.ceil(min_bytes / (K * N * torch.finfo(dtype).bits // 8)))
    g = torch.Generator(device=device).manual_seed(seed)
    ws = [torch.randn(N, K, device=device, dtype=dtype, generator=g) / math.sqrt(K) for _ in range(copies)]
    return ws, [transpose_weight(w) for w in ws]


@functools.lru_cache(maxsize=None)
def break_even_sparsity(K: int, N: int, dtype: torch.dtype, device: torch.device, rows: int = 1,
                        margin: float = 0.03, config: KernelConfig | None = None) -> float:
    """Smallest sparsity (in steps of 0.05) at which the kernel (``config``) beats the dense product on
    this GPU by ``margin`` for an ``[N, K]`` matrix and ``rows`` input rows; 1.0 if it never does up to 0.9."""
    ws, wts = rotating_weights(K, N, device, dtype)
    for s in [i / 20 for i in range(19)]:
        xs = sparse_inputs(rows, K, s, len(ws), device, dtype, seed=1)
        dense = gpu_time(cycling(lambda i: F.linear(xs[i], ws[i]), len(ws)))
        kernel = gpu_time(cycling(lambda i: event_gemv(xs[i], wts[i], config=config), len(ws)))
        if kernel <= (1 - margin) * dense:
            return s
    return 1.0


def event_list_configs(rows: int) -> tuple[KernelConfig, ...]:
    """The event-list configurations :func:`best_kernel` tries for ``rows`` input rows."""
    if rows == 1:
        return EVENT_LIST_CONFIGS
    return tuple(c for c in EVENT_LIST_CONFIGS if rows <= c.fma_rows) + (EVENT_LIST_ROWS_CONFIG,)


@functools.lru_cache(maxsize=None)
def best_kernel(K: int, N: int, dtype: torch.dtype, device: torch.device, sparsity: float, rows: int = 1,
                margin: float = 0.03) -> KernelConfig | None:
    """The fastest of :data:`DEFAULT_CONFIG` (masked), the event lists (:func:`event_list_configs`) and,
    for one row, :data:`COMPACT_CONFIG` for an ``[N, K]`` matrix at input ``sparsity`` (each row's) on this GPU,
    timed against the dense product; None (use dense) unless it beats dense by ``margin``."""
    ws, wts = rotating_weights(K, N, device, dtype)
    xs = sparse_inputs(rows, K, sparsity, len(ws), device, dtype, seed=1)
    dense = gpu_time(cycling(lambda i: F.linear(xs[i], ws[i]), len(ws)))
    best, best_time = None, (1 - margin) * dense
    lists = event_list_configs(rows) if K <= MAX_EVENT_LIST_INPUTS else ()
    for cfg in (DEFAULT_CONFIG,) + ((COMPACT_CONFIG,) if rows == 1 else ()) + lists:
        t = gpu_time(cycling(lambda i: event_gemv(xs[i], wts[i], config=cfg), len(ws)))
        if t < best_time:
            best, best_time = cfg, t
    del ws, wts
    return best


def cycling(fn, n: int):
    """A no-argument callable running ``fn(0), fn(1), ..., fn(n - 1), fn(0), ...`` (rotating buffers)."""
    count = [0]

    def call():
        i = count[0] % n
        count[0] += 1
        return fn(i)
    return call
