"""The RWKV-4 WKV operator: a chunked sequence form and the one-token recurrence.

For every channel, with decay ``w = exp(time_decay) > 0`` and bonus ``u = time_first``::

    wkv_t = (sum_{i<t} e^{k_i - (t-1-i) w} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{k_i - (t-1-i) w}     + e^{u + k_t})

i.e. ``wkv_t`` is a softmax-weighted average of the values seen so far, with logits
``k_i - (t-1-i) w`` for the past and ``u + k_t`` for the current token. The recurrent state
is kept in the RWKV-4 ``(aa, bb, pp)`` form: numerator ``aa * e^pp`` and denominator
``bb * e^pp``, so that no exponential is ever evaluated on an unbounded argument.

``wkv_sequence`` evaluates whole sequences chunk by chunk: inside a chunk the weights form
a small lower-triangular logit matrix, and the state carried in from earlier chunks enters
as one extra "virtual" element with logit ``pp + log(bb)`` and value ``aa / bb``. It is plain
torch (autograd and any device work), vectorized over batch, channels and chunk positions.
All WKV arithmetic is float32 whatever the model's dtype, as in the reference CUDA kernel.

On CPU without autograd, ``wkv_sequence`` runs ``_wkv_numba``: the recurrence itself, token by
token, parallel over batch x channels; it is ~100x faster there than the chunked tensors. On
CUDA it runs the same recurrence as Triton kernels (``rllm.gpu.wkv``) where Triton is installed,
with an exact hand-written gradient when autograd needs one (training).
"""
from __future__ import annotations

import numba
import numpy as np
import torch

NEG_INF = -1e38  # the reference's "minus infinity" for an empty state: exp() of it is 0


def initial_state(batch: int, channels: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty WKV state ``(aa, bb, pp)``, each ``[batch, channels]`` float32."""
    aa = torch.zeros(batch, channels, device=device, dtype=torch.float32)
    bb = torch.zeros(batch, channels, device=device, dtype=torch.float32)
    pp = torch.full((batch, channels), NEG_INF, device=device, dtype=torch.float32)
    return aa, bb, pp


def wkv_step(
    k: torch.Tensor,
    v: torch.Tensor,
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One token of the recurrence, exactly as the RWKV-4 reference writes it.

    ``k, v``: ``[B, C]``; returns ``wkv [B, C]`` (float32) and the new state.
    """
    k = k.float()
    v = v.float()
    aa, bb, pp = state
    w = -torch.exp(time_decay.float())
    u = time_first.float()
    # Output: combine the state with the current token, rescaled by the larger exponent.
    ww = u + k
    p = torch.maximum(pp, ww)
    e1 = torch.exp(pp - p)
    e2 = torch.exp(ww - p)
    out = (e1 * aa + e2 * v) / (e1 * bb + e2)
    # State update: decay the state by e^w, then add the current token (without the bonus u).
    ww = pp + w
    p = torch.maximum(ww, k)
    e1 = torch.exp(ww - p)
    e2 = torch.exp(k - p)
    return out, (e1 * aa + e2 * v, e1 * bb + e2, p)


@numba.njit(parallel=True, cache=True, fastmath=False)
def _wkv_numba(k, v, w, u, aa, bb, pp, out):  # pragma: no cover - compiled
    """The ``wkv_step`` recurrence over ``T`` tokens; k, v, out ``[B, T, C]``, state ``[B, C]`` updated in place."""
    B, T, C = k.shape
    for bc in numba.prange(B * C):
        b, c = bc // C, bc % C
        a_, b_, p_ = aa[b, c], bb[b, c], pp[b, c]
        for t in range(T):
            kt, vt = k[b, t, c], v[b, t, c]
            ww = u[c] + kt
            p = max(p_, ww)
            e1, e2 = np.exp(p_ - p), np.exp(ww - p)
            out[b, t, c] = (e1 * a_ + e2 * vt) / (e1 * b_ + e2)
            ww = p_ + w[c]
            p = max(ww, kt)
            e1, e2 = np.exp(ww - p), np.exp(kt - p)
            a_, b_, p_ = e1 * a_ + e2 * vt, e1 * b_ + e2, p
        aa[b, c], bb[b, c], pp[b, c] = a_, b_, p_


def _wkv_cpu(k, v, time_decay, time_first, state):
    B, T, C = k.shape
    aa, bb, pp = (s.detach().float().contiguous().numpy().copy() for s in state)
    out = np.empty((B, T, C), dtype=np.float32)
    w = (-torch.exp(time_decay.detach().float())).numpy()
    _wkv_numba(k.detach().float().contiguous().numpy(), v.detach().float().contiguous().numpy(), w,
               time_first.detach().float().contiguous().numpy(), aa, bb, pp, out)
    return torch.from_numpy(out), tuple(torch.from_numpy(s) for s in (aa, bb, pp))


def _recurrence_backend(device: torch.device) -> str:
    """The token-by-token kernel for ``device`` where one exists, else the chunked torch form."""
    if device.type == "cpu":
        return "numba"
    if device.type == "cuda":
        from rllm.gpu.wkv import HAS_TRITON
        return "triton" if HAS_TRITON else "torch"
    return "torch"


def wkv_sequence(
    k: torch.Tensor,
    v: torch.Tensor,
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    chunk: int = 16,
    backend: str = "auto",
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """WKV over a whole sequence. ``k, v``: ``[B, T, C]``; returns ``wkv [B, T, C]`` float32 and the final state.

    ``backend``: ``"torch"`` (chunked tensors of length ``chunk``: autograd, any device),
    ``"numba"`` (the recurrence, CPU, no autograd), ``"triton"`` (the recurrence, CUDA; with
    autograd its gradient reaches k, v, time_decay and time_first, not the initial state) or
    ``"auto"`` (Triton on CUDA where it is installed and no gradient reaches the state, numba on
    CPU without autograd, torch otherwise). Agrees with ``wkv_step`` applied token by token (to float32 rounding).
    """
    B, T, C = k.shape
    if state is None:
        state = initial_state(B, C, k.device)
    grad_on = torch.is_grad_enabled()
    needs_grad = grad_on and any(t.requires_grad for t in (k, v, time_decay, time_first, *state))
    state_grad = grad_on and any(s.requires_grad for s in state)
    if backend == "auto":
        backend = _recurrence_backend(k.device)
        if needs_grad and (backend == "numba" or state_grad):
            backend = "torch"
    if backend == "numba" and needs_grad:
        raise ValueError("the numba WKV has no autograd: use backend='torch' (or 'triton' on CUDA) for training")
    if backend == "numba":
        return _wkv_cpu(k, v, time_decay, time_first, state)
    if backend == "triton":
        from rllm.gpu.wkv import wkv_triton, wkv_triton_train  # lazy: Triton's import is slow and CUDA-only
        return (wkv_triton_train if needs_grad else wkv_triton)(k, v, time_decay, time_first, state)
    return _wkv_chunked(k, v, time_decay, time_first, state, chunk)


def _wkv_chunked(k, v, time_decay, time_first, state, chunk: int):
    """The chunked torch form (autograd, any device): inside a chunk the weights form a small
    lower-triangular logit matrix; the carried state enters as one virtual element."""
    B, T, C = k.shape
    k = k.float()
    v = v.float()
    w = torch.exp(time_decay.float())  # per-step decay of the logits, > 0
    u = time_first.float()
    aa, bb, pp = state
    outs = []
    for start in range(0, T, chunk):
        kc = k[:, start:start + chunk]  # [B, L, C]
        vc = v[:, start:start + chunk]
        L = kc.shape[1]
        j = torch.arange(L, device=k.device, dtype=torch.float32)
        # The carried state as one virtual element: logit pp + log(bb), value aa / bb, decayed j steps at position j.
        # bb == 0 only for the empty state, whose pp = -1e38 makes its weight vanish anyway.
        bb_safe = torch.where(bb > 0, bb, torch.ones_like(bb))
        s_logit = (pp + torch.log(bb_safe)).unsqueeze(1) - j.view(1, L, 1) * w  # [B, L, C]
        s_value = aa / bb_safe  # [B, C]
        # Logits of past tokens i < t inside the chunk: k_i - (t-1-i) w; the current token: u + k_t.
        dist = (j.view(L, 1) - 1 - j.view(1, L))  # [t, i]
        past = kc.unsqueeze(1) - dist.view(1, L, L, 1) * w  # [B, t, i, C]
        diag = torch.eye(L, dtype=torch.bool, device=k.device).view(1, L, L, 1)
        logits = torch.where(diag, (u + kc).unsqueeze(1), past)
        causal = torch.ones(L, L, dtype=torch.bool, device=k.device).tril().view(1, L, L, 1)
        logits = logits.masked_fill(~causal, float("-inf"))
        logits = torch.cat([s_logit.unsqueeze(2), logits], dim=2)  # [B, t, 1 + i, C]
        weights = torch.softmax(logits, dim=2)
        values = torch.cat([s_value.unsqueeze(1), vc], dim=1)  # [B, 1 + i, C]
        outs.append(torch.einsum("btic,bic->btc", weights, values))
        # State after the chunk's last token (no bonus u): logits k_i - (L-1-i) w, and the old state decayed L steps.
        end_logits = torch.cat([(pp + torch.log(bb_safe) - L * w).unsqueeze(1),
                                kc - (L - 1 - j).view(1, L, 1) * w], dim=1)  # [B, 1 + L, C]
        p = end_logits.max(dim=1).values
        e = torch.exp(end_logits - p.unsqueeze(1))
        aa = (e * values).sum(dim=1)
        bb = e.sum(dim=1)
        pp = p
    return torch.cat(outs, dim=1), (aa, bb, pp)
