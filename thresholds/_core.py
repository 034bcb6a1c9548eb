"""Machinery shared by every algorithm: calibration tokens, the model cut into segments with a
cached residual stream, batched candidate evaluation, activation capture, quantiles, and
measuring a finished schedule.

Segments: the model is cut at every half block: segment ``2i`` is block ``i``'s time-mix (with
``ln0`` first for block 0), segment ``2i + 1`` its channel-mix; the head closes the stream.
A site lives in exactly one segment. Calibrating a site therefore only needs the residual
stream at the *input of its segment* (with every earlier threshold applied), which is cached,
and every candidate runs that segment and the ones after it.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rllm.events import SparsityMeter, nonzeros, summarize

from thresholds.schedule import Schedule, model_fingerprint, now_iso


# ------------------------------------------------------------------------------------------
# Calibration tokens
# ------------------------------------------------------------------------------------------

def as_calib_tokens(tokens: Any, seq_len: int | None = None, n_seq: int | None = None) -> torch.Tensor:
    """Calibration token ids as ``[N, T]`` (``T`` >= 2: inputs ``[:, :-1]`` predict ``[:, 1:]``).

    A 1-D stream is cut into ``seq_len``-token sequences (default 256; the remainder is dropped);
    ``n_seq`` keeps the first ``n_seq`` sequences.
    """
    t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens).long().cpu()
    if t.ndim == 1:
        L = int(seq_len or 256)
        if t.numel() < L:
            raise ValueError(f"calibration stream has {t.numel()} tokens, fewer than one sequence of {L}")
        t = t[: (t.numel() // L) * L].reshape(-1, L)
    elif t.ndim != 2:
        raise ValueError(f"calibration tokens must be 1-D (a stream) or 2-D [N, T], got shape {tuple(t.shape)}")
    if t.shape[1] < 2:
        raise ValueError("calibration sequences need at least 2 tokens")
    if n_seq is not None:
        t = t[:n_seq]
    return t.contiguous()


def tokens_sha256(tokens: torch.Tensor) -> str:
    t = tokens.to(torch.int64).cpu().contiguous()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def calib_info(tokens: torch.Tensor, description: str = "") -> dict:
    return {"description": description or "token ids", "sha256": tokens_sha256(tokens),
            "n_sequences": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
            "n_tokens": int(tokens.numel())}


def batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def rows_per_batch(seq_len: int, batch_tokens: int) -> int:
    return max(1, int(batch_tokens) // max(int(seq_len) - 1, 1))


# ------------------------------------------------------------------------------------------
# Model state helpers
# ------------------------------------------------------------------------------------------

def model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def calibrating(model, device=None, zero: bool = True) -> Iterator[torch.device]:
    """Eval mode, no grad, (optionally) on ``device``; all thresholds 0 inside if ``zero``;
    the model's thresholds, training flag and device are restored on exit."""
    saved = model.get_thresholds()
    was_training = model.training
    old_dev = model_device(model)
    dev = torch.device(device) if device is not None else old_dev
    if dev != old_dev:
        model.to(dev)
    model.eval()
    try:
        if zero:
            model.set_thresholds({n: 0.0 for n in model.sites})
        with torch.no_grad():
            yield dev
    finally:
        if dev != old_dev:
            model.to(old_dev)
        model.set_thresholds({n: t.to(old_dev) for n, t in saved.items()})
        model.train(was_training)


def set_raw_threshold(site, t: torch.Tensor) -> None:
    """Set a site's threshold buffer to any broadcastable tensor (e.g. one per batch row)."""
    site.threshold = t.to(site.threshold.device, torch.float32)


def threshold_value(t: torch.Tensor) -> float | list:
    t = t.detach().float().cpu()
    return float(t) if t.ndim == 0 else [float(v) for v in t.tolist()]


def block_sites(model, include_head: bool = False) -> list[str]:
    return [n for n in model.sites if include_head or n != "head"]


def mac_weights(model, names: Sequence[str]) -> dict[str, float]:
    sites = model.sites
    macs = {n: sites[n].width * sites[n].macs_per_event for n in names}
    tot = sum(macs.values())
    return {n: m / tot for n, m in macs.items()}


# ------------------------------------------------------------------------------------------
# Segments
# ------------------------------------------------------------------------------------------

class _StopForward(Exception):
    pass


class RWKVSegments:
    """RWKV-4 cut at every half block: segment ``2i`` is block ``i``'s time-mix (``ln0`` first
    for block 0), ``2i + 1`` its channel-mix. The stream between segments is the residual."""

    def __init__(self, model):
        self.model = model
        self.L = len(model.blocks)
        self.n = 2 * self.L
        self.n_blocks = self.L

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model.emb(idx)

    def run(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        for s in range(start, self.n if stop is None else stop):
            b = self.model.blocks[s // 2]
            if s % 2 == 0:
                if s == 0:
                    x = b.ln0(x)
                x = x + b.att(b.ln1(x))[0]
            else:
                x = x + b.ffn(b.ln2(x))[0]
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.head_input(x))

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the head's matrix multiplies: the final LayerNorm's output through the head's site."""
        m = self.model
        return m.head_site(m.ln_out(x))

    @property
    def head(self) -> torch.nn.Linear:
        return self.model.head

    def segment_of(self, name: str) -> int:
        return segment_of(name, self.L)

    def block_span(self, i: int) -> tuple[int, int]:
        return 2 * i, 2 * i + 2

    def block_sites(self, i: int) -> list[str]:
        return [n for n in self.model.sites if n.startswith(f"blocks.{i}.")]


class OPTSegments:
    """OPT (``rllm.opt.EventOPT``) cut at every decoder layer; segment ``i`` is layer ``i``, run by
    ``transformers``' own layer module. Segment 0 starts from the token ids (embeddings,
    positions and ``project_in`` included), so its stream is the id tensor; later ones carry the
    hidden states. Calibration windows are unpadded and start at position 0, so the keyword
    arguments the decoder passes its layers (causal mask, positions) are captured once per
    length from a one-row forward and broadcast to any batch."""

    def __init__(self, model):
        self.model = model
        self.dec = model.hf.model.decoder
        self.L = len(self.dec.layers)
        self.n = self.L
        self.n_blocks = self.L
        self._kw: dict[int, dict] = {}

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return idx

    def _layer_kwargs(self, T: int, device) -> dict:
        if T not in self._kw:
            got = {}

            def grab(module, args, kwargs):
                got.update(kwargs)
                raise _StopForward

            h = self.dec.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
            try:
                self.model.hf(input_ids=torch.zeros(1, T, dtype=torch.long, device=device), use_cache=False)
            except _StopForward:
                pass
            finally:
                h.remove()
            got.pop("hidden_states", None)
            self._kw[T] = got
        return self._kw[T]

    def _broadcast(self, kw: dict, B: int) -> dict:
        return {k: (v.expand(B, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.ndim >= 2 and v.shape[0] == 1 else v)
                for k, v in kw.items()}

    def _first(self, idx: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer 0 for token ids ``idx`` (HF's embedding path)."""
        got = {}

        def grab(module, args, kwargs):
            got["h"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        h = self.dec.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model.hf(input_ids=idx, use_cache=False)
        except _StopForward:
            pass
        finally:
            h.remove()
        return got["h"]

    def run(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        stop = self.n if stop is None else stop
        if start >= stop:
            return x
        if start == 0:
            x = self._first(x)
        kw = self._broadcast(self._layer_kwargs(x.shape[1], x.device), x.shape[0])
        for i in range(start, stop):
            out = self.dec.layers[i](x, **kw)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.dec.final_layer_norm is not None:
            x = self.dec.final_layer_norm(x)
        if self.dec.project_out is not None:
            x = self.dec.project_out(x)
        return self.model.hf.lm_head(x)

    def segment_of(self, name: str) -> int:
        if name == "project_in":
            return 0
        if name in ("project_out", "head"):
            return self.n
        return int(name.split(".")[1])

    def block_span(self, i: int) -> tuple[int, int]:
        return i, i + 1

    def block_sites(self, i: int) -> list[str]:
        out = [n for n in self.model.sites if n.startswith(f"layers.{i}.")]
        return (["project_in"] + out) if i == 0 and "project_in" in self.model.sites else out


def segments(model):
    """The model's segment adapter (RWKV-4 or OPT), cached on the model."""
    seg = model.__dict__.get("_calib_segments")
    if seg is None:
        seg = OPTSegments(model) if hasattr(model, "hf") else RWKVSegments(model)
        model.__dict__["_calib_segments"] = seg
    return seg


def segment_of(name: str, n_layer: int) -> int:
    """RWKV segment of a site: ``2i`` for ``blocks.i.att.*``, ``2i+1`` for ``blocks.i.ffn.*``, ``2L`` for the head."""
    if name == "head":
        return 2 * n_layer
    parts = name.split(".")
    return 2 * int(parts[1]) + (0 if parts[2] == "att" else 1)


def run_segment(model, s: int, x: torch.Tensor) -> torch.Tensor:
    return segments(model).run(x, s, s + 1)


def run_segments(model, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
    return segments(model).run(x, start, stop)


def head_nll(model, x: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 8192) -> torch.Tensor:
    """Summed next-token NLL per batch row: ``x [B, T, C]`` residual at the head, ``targets [B, T]`` -> ``[B]``."""
    B, T = x.shape[:2]
    out = torch.zeros(B, dtype=torch.float64, device=x.device)
    rows = max(1, chunk_rows // max(T, 1))
    seg = segments(model)
    for sl in batches(B, rows):
        logits = seg.logits(x[sl])
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets[sl].reshape(-1), reduction="none")
        out[sl] = ce.view(-1, T).double().sum(1)
    return out


LSE_ROWS = 128  # positions per piece of _head_logsumexp: a 128 x 12,288 float32 piece (6 MiB) stays in cache


def _head_logsumexp(head: torch.nn.Linear, z: torch.Tensor) -> torch.Tensor:
    """``logsumexp(head(z))`` over the vocabulary, ``z [..., C]`` -> ``[...]`` float32, on a CPU
    computed ``LSE_ROWS`` positions at a time so that each piece of logits is reduced while still in
    cache (on a 2-core CPU: 102 against 133 ms for 2,048 positions x 12,288 tokens, the same values)."""
    flat = z.reshape(-1, z.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=z.device)
    step = LSE_ROWS if z.device.type == "cpu" else max(1, flat.shape[0])  # a GPU wants one large product
    for s in range(0, flat.shape[0], step):
        out[s:s + step] = torch.logsumexp(head(flat[s:s + step]).float(), -1)
    return out.view(z.shape[:-1])


def _rep(h: torch.Tensor, K: int) -> torch.Tensor:
    """``K`` copies of a minibatch stacked on the batch axis (token ids or hidden states)."""
    return h.repeat(K, *([1] * (h.ndim - 1)))


# Memory the KL objective may spend keeping the dense model's log-probabilities, by device type
# (float32, tokens x vocabulary): 2 GiB covers the shipped models' calibration sets on a CPU,
# 16 GiB the 430M model's 64k tokens on a large GPU.
DENSE_CACHE_BYTES = {"cpu": 2 << 30, "cuda": 16 << 30}


class Stream:
    """The calibration set flowing through the model, cached at the input of the current segment.

    ``h[k]``: residual stream of minibatch ``k`` at the input of segment ``self.seg``, computed
    with the thresholds set on the model when it was advanced.
    """

    def __init__(self, model, tokens: torch.Tensor, device, batch_tokens: int = 8192, horizon: int | None = None,
                 objective: str = "nll"):
        self.model = model
        if objective not in ("nll", "kl"):
            raise ValueError(f"objective must be 'nll' or 'kl', got {objective!r}")
        self.objective = objective
        self.dense_final: list[torch.Tensor] | None = None  # kl: the dense model's residual at the head
        self.dense_rows: torch.Tensor | None = None
        self._lp_cache: dict[int, torch.Tensor] | bool | None = None  # kl: dense log-probabilities (see _score)
        if horizon is not None and int(horizon) < 1:
            raise ValueError(f"horizon must be >= 1 segment (or None for the exact loss), got {horizon}")
        self.horizon = None if horizon is None else int(horizon)
        self.final: list[torch.Tensor] | None = None  # horizon mode: residual at the head, current schedule
        self.device = device
        self.segs = segments(model)
        self.n_seg = self.segs.n
        T = tokens.shape[1] - 1
        self.mb = rows_per_batch(tokens.shape[1], batch_tokens)
        self.slices = batches(tokens.shape[0], self.mb)
        self.inputs = [tokens[sl, :-1].to(device) for sl in self.slices]
        self.targets = [tokens[sl, 1:].to(device) for sl in self.slices]
        self.n_targets = int(tokens.shape[0] * T)
        self.h = [self.segs.embed(x) for x in self.inputs]
        self.seg = 0

    def advance_to(self, seg: int) -> None:
        if seg < self.seg:
            raise ValueError("the stream only moves forward")
        while self.seg < seg:
            self.h = [self.segs.run(h, self.seg, self.seg + 1) for h in self.h]
            self.seg += 1

    def loss(self, rows: bool = False):
        """Mean NLL with the model's current thresholds, from the cached segment input
        (with ``rows``: also the summed NLL of every calibration sequence, float64 ``[N]``).
        In horizon mode this also (re)sets the cached residual stream at the head."""
        finals = [run_segments(self.model, h, self.seg) for h in self.h]
        if self.horizon is not None:
            self.final = finals
        if self.objective == "kl" and self.dense_final is None:  # the first call sees the dense model
            self.dense_final = finals
            self.dense_rows = torch.cat([head_nll(self.model, x, y).cpu() for x, y in zip(finals, self.targets)])
        per = torch.cat([self._score(k, x, 1).cpu() for k, x in enumerate(finals)])
        mean = float(per.sum()) / self.n_targets
        return (mean, per) if rows else mean

    def _score(self, k: int, x: torch.Tensor, K: int) -> torch.Tensor:
        """Per-row score of minibatch ``k`` from the residual at the head (``K`` stacked copies):
        ``nll``: summed NLL of the targets; ``kl``: the dense model's summed NLL plus the summed
        KL divergence of the thresholded model's next-token distribution from the dense one's
        (the same scale, but no noise from which token happened to come next)."""
        y = self.targets[k]
        if self.objective == "nll":
            return head_nll(self.model, x, y.repeat(K, 1))
        B, T = x.shape[:2]
        mb = B // K
        out = torch.zeros(B, dtype=torch.float64, device=x.device)
        rows = max(1, 8192 // max(T, 1))
        for sl in batches(B, rows):
            idx = torch.arange(sl.start, sl.stop, device=x.device) % mb
            out[sl] = self._kl(k, idx, rows, x[sl]).double().sum(1)
        base = self.dense_rows[k * self.mb: k * self.mb + mb].to(x.device) if self.dense_rows is not None else 0
        return out + (base.repeat(K) if K > 1 and isinstance(base, torch.Tensor) else base)

    def _kl(self, k: int, idx: torch.Tensor, rows: int, x: torch.Tensor) -> torch.Tensor:
        """``KL(dense || thresholded)`` per position ``[R, T]`` of rows ``idx`` of minibatch ``k``,
        from the thresholded model's residual ``x`` at the head.

        Every candidate of every site compares with the same dense distribution ``p``, so when
        all of it fits ``DENSE_CACHE_BYTES`` it is computed once and kept with its negative
        entropy and mass, and the divergence is ``sum p log p - p . logits + logsumexp(logits) sum p``:
        one product-sum and one log-sum-exp over the vocabulary instead of a log-softmax and
        three elementwise passes. Where the head is one linear map of a head input ``z`` (RWKV),
        ``p . logits = (p W) . z + p . b``, and ``p W`` is kept too: a product-sum over the model's
        width instead of the vocabulary (the logits are then read once, by the log-sum-exp).
        Else both sides are recomputed each time."""
        dense = self.dense_final[k]
        if self._lp_cache is None:
            V = self.model.config.vocab_size
            need = sum(int(h.shape[0] * h.shape[1]) for h in self.dense_final) * V * 4
            self._lp_cache = {} if need <= DENSE_CACHE_BYTES.get(dense.device.type, 0) else False
        if self._lp_cache is False:
            lp = F.log_softmax(self.segs.logits(dense[idx]).float(), -1)
            return (lp.exp() * (lp - F.log_softmax(self.segs.logits(x).float(), -1))).sum(-1)
        if k not in self._lp_cache:
            self._lp_cache[k] = self._dense_distribution(dense, rows)
        p, neg_entropy, mass, pw, pb = self._lp_cache[k]
        a = int(idx[0])
        if int(idx[-1]) - a + 1 == idx.numel():  # consecutive rows (always on CPU): a view, not a copy
            idx = slice(a, a + idx.numel())
        if pw is not None:
            z = self.segs.head_input(x)
            dot = (pw[idx] * z.float()).sum(-1) + (pb[idx] if pb is not None else 0.0)
            return neg_entropy[idx] - dot + _head_logsumexp(self.segs.head, z) * mass[idx]
        else:
            logits = self.segs.logits(x).float()
            # (einsum's batched product here was off by up to 4e-3 nats on CPU; the plain product and
            # sum are within 2e-5 of a float64 evaluation)
            dot = (p[idx] * logits).sum(-1)
        # p's mass (1 to 1e-5) is kept exact
        return neg_entropy[idx] - dot + torch.logsumexp(logits, -1) * mass[idx]

    def _dense_distribution(self, dense: torch.Tensor, rows: int) -> tuple:
        """The kept dense side of one minibatch: ``sum p log p`` and ``sum p``, and where the head is
        linear in ``head_input`` (RWKV) ``p W`` and ``p . b``, else ``p`` itself (the others None)."""
        lp = torch.cat([F.log_softmax(self.segs.logits(dense[sl]).float(), -1) for sl in batches(dense.shape[0], rows)])
        p = lp.exp()
        pw = pb = None
        head = getattr(self.segs, "head", None)
        if head is not None:
            pw = p @ head.weight.float()  # [rows, T, C]
            pb = p @ head.bias.float() if head.bias is not None else None
        return (p if pw is None else None), (p * lp).sum(-1), p.sum(-1), pw, pb

    def _stop(self) -> int:
        n = self.n_seg
        return n if self.horizon is None else min(n, self.seg + self.horizon)

    def _at_head(self, k: int, x: torch.Tensor, ref: torch.Tensor | None, K: int) -> torch.Tensor:
        """The residual at the head for minibatch ``k``: ``x`` itself when it ran to the end; in
        horizon mode, the current schedule's cached head residual plus the candidate's
        perturbation ``x - ref`` observed ``horizon`` segments after the site (carried to the head
        unchanged along the residual connections: a first-order estimate)."""
        if self._stop() == self.n_seg:
            return x
        return _rep(self.final[k], K) + (x - _rep(ref, K))

    def commit(self, site) -> None:
        """Horizon mode: fold the perturbation of ``site``'s now-set threshold into the cached head
        residual (exact when the horizon reaches the head). Call after accepting a candidate."""
        if self.horizon is None:
            return
        stop = self._stop()
        saved = site.threshold.clone()
        for k, h in enumerate(self.h):
            x = run_segments(self.model, h, self.seg, stop)
            if stop == self.n_seg:
                self.final[k] = x
                continue
            site.threshold = torch.zeros((), device=saved.device)
            try:
                ref = run_segments(self.model, h, self.seg, stop)
            finally:
                site.threshold = saved
            self.final[k] = self.final[k] + (x - ref)

    def candidate_losses(self, site, candidates: Sequence[torch.Tensor], group: int = 1,
                         rows: dict | None = None) -> list[float]:
        """Mean NLL for each candidate threshold of ``site`` (which must be in segment ``self.seg``);
        ``group`` candidates share one batched forward (rows ``k*mb + b``). ``rows``, if given, is
        filled with candidate index -> per-sequence summed NLL (float64 ``[N]``)."""
        return list(self.iter_candidate_losses(site, candidates, group, rows=rows).values())

    def iter_candidate_losses(self, site, candidates, group: int = 1, stop: Callable[[int, float], bool] | None = None,
                              rows: dict | None = None) -> dict[int, float]:
        """Like :meth:`candidate_losses`, evaluated group by group in order; after each group,
        ``stop(j, loss_j)`` is asked for each new candidate and evaluation ends once it says True."""
        saved = site.threshold.clone()
        out: dict[int, float] = {}
        end = self._stop()
        # horizon mode: the stream ``horizon`` segments ahead without this site's threshold
        refs = ([run_segments(self.model, h, self.seg, end) for h in self.h] if end < self.n_seg
                else [None] * len(self.h))
        try:
            for g0 in range(0, len(candidates), group):
                cand = [torch.as_tensor(c, dtype=torch.float32, device=self.device) for c in candidates[g0:g0 + group]]
                K = len(cand)
                parts = []
                for kb, (h, y) in enumerate(zip(self.h, self.targets)):
                    mb = h.shape[0]
                    if K == 1 and cand[0].numel() == 1:  # one scalar candidate: the site's fast scalar path
                        set_raw_threshold(site, cand[0].reshape(()))
                    else:
                        t = torch.stack([c.reshape(-1) for c in cand])  # [K, 1 or W]
                        set_raw_threshold(site, t.repeat_interleave(mb, dim=0).unsqueeze(1))  # [K*mb, 1, 1 or W]
                    x = run_segments(self.model, _rep(h, K), self.seg, end)
                    x = self._at_head(kb, x, refs[kb], K)
                    parts.append(self._score(kb, x, K).view(K, mb).cpu())
                per = torch.cat(parts, dim=1)  # [K, N]
                done = False
                for k in range(K):
                    j = g0 + k
                    out[j] = float(per[k].sum()) / self.n_targets
                    if rows is not None:
                        rows[j] = per[k]
                    if stop is not None and stop(j, out[j]):
                        done = True
                        break
                if done:
                    break
        finally:
            site.threshold = saved
        return out

    def capture(self, names: Iterable[str], max_values: int = 1 << 20, max_rows: int = 8192,
                seed: int = 0, run_all: bool = False) -> dict[str, "Capture"]:
        """Run the current segment (or all remaining ones with ``run_all``) and return, per site
        named, a row sample of its input (``|x|``) and its exact count of zeros."""
        sites = self.model.sites
        names = list(names)
        caps = {n: Capture(sites[n].width, self.n_targets, max_values, max_rows, seed + i) for i, n in enumerate(names)}
        hooks = [sites[n].register_forward_hook(_capture_hook(caps[n])) for n in names]
        try:
            for h in self.h:
                if run_all or self.seg >= self.n_seg:  # the head closes the last segment
                    self.segs.logits(self.segs.run(h, self.seg))
                else:
                    self.segs.run(h, self.seg, self.seg + 1)
        finally:
            for hk in hooks:
                hk.remove()
        return caps


class Capture:
    """A reproducible row sample of one site's ``|x|`` (float32, CPU) and its exact zero count."""

    def __init__(self, width: int, n_rows: int, max_values: int, max_rows: int, seed: int):
        self.width = width
        self.keep = max(1, min(n_rows, max_rows, max(1, max_values // width)))
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randperm(n_rows, generator=g)[: self.keep].sort().values
        self.offset = 0
        self.parts: list[torch.Tensor] = []
        self.zeros = 0
        self.total = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.width)
        n = x.shape[0]
        self.total += x.numel()
        self.zeros += x.numel() - nonzeros(x)
        lo = torch.searchsorted(self.rows, self.offset)
        hi = torch.searchsorted(self.rows, self.offset + n)
        idx = (self.rows[lo:hi] - self.offset).to(x.device)
        if idx.numel():
            self.parts.append(x.index_select(0, idx).abs().float().cpu())
        self.offset += n

    @property
    def values(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0, self.width)

    @property
    def natural(self) -> float:
        return self.zeros / self.total if self.total else 0.0

    def pooled_quantiles(self, levels: Sequence[float]) -> list[float]:
        """``quantiles_pooled(self.values, levels)``, the sort done once per capture: a memoized dense
        capture serves every target of uniform, CATS and the curve's points."""
        if getattr(self, "_sorted", None) is None:
            v = self.values.reshape(-1)
            if v.numel() > (1 << 24):  # as quantiles_pooled
                v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
            self._sorted = sorted_values(v)
        return [float(q) for q in _sorted_quantile(self._sorted, torch.tensor(list(levels), dtype=torch.float32))]


def _capture_hook(cap: Capture):
    def hook(module, inputs, output):
        cap.add(inputs[0])
    return hook


# ------------------------------------------------------------------------------------------
# Candidate thresholds from quantiles
# ------------------------------------------------------------------------------------------

def sorted_values(v: torch.Tensor) -> torch.Tensor:
    """``v.sort().values`` of a 1-D tensor. On a CPU through NumPy, whose sort takes the AVX-512
    kernels where the processor has them: 15.5 against 47.4 ms for 2^19 float32 on the 2-core
    development machine (the same order; NaN last in both)."""
    if v.device.type == "cpu" and v.ndim == 1 and v.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(np.sort(v.detach().contiguous().numpy()))
    return v.sort().values


def _sorted_quantile(sorted_vals: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Linear-interpolation quantiles (numpy's default) of an already sorted 1-D tensor."""
    n = sorted_vals.numel()
    if n == 0:
        return torch.zeros_like(qs)
    pos = qs.clamp(0, 1) * (n - 1)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = (pos - lo.float())
    return sorted_vals[lo] * (1 - frac) + sorted_vals[hi] * frac


def quantiles_pooled(absx: torch.Tensor, levels: Sequence[float], over_nonzero: bool = False) -> list[float]:
    """Quantiles of every value of ``|x|`` pooled (``over_nonzero``: of the values that are not
    exactly zero, so a level is the share of the *remaining* activations it silences)."""
    v = absx.reshape(-1)
    if over_nonzero:
        v = v[v != 0]
    if v.numel() > (1 << 24):
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
    s = sorted_values(v)
    return [float(q) for q in _sorted_quantile(s, torch.tensor(list(levels), dtype=torch.float32))]


def quantiles_per_token(absx: torch.Tensor, levels: Sequence[float]) -> list[float]:
    """The authors' candidates: quantile of ``|x|`` across channels for each token, averaged over tokens."""
    s = absx.sort(dim=1).values  # [R, C]
    C = s.shape[1]
    out = []
    for q in levels:
        pos = q * (C - 1)
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        frac = pos - lo
        out.append(float((s[:, lo] * (1 - frac) + s[:, hi] * frac).mean()))
    return out


def quantiles_per_channel(absx: torch.Tensor, levels: Sequence[float]) -> list[torch.Tensor]:
    """Per channel, the quantile of its non-zero ``|x|`` over tokens (``[C]`` per level)."""
    s = absx.sort(dim=0).values  # [R, C]; zeros first
    R = s.shape[0]
    nz = (s != 0).sum(0)  # [C]
    out = []
    for q in levels:
        pos = (R - nz) + (q * (nz - 1).clamp(min=0).float()).floor().long()
        pos = pos.clamp(0, R - 1)
        t = s.gather(0, pos.unsqueeze(0)).squeeze(0)
        out.append(torch.where(nz > 0, t, torch.zeros_like(t)))
    return out


def solve_level(weights: Mapping[str, float], natural: Mapping[str, float], target: float,
                active: Iterable[str] | None = None) -> float:
    """Level ``s`` such that ``sum_j w_j * (max(s, nat_j) if j active else nat_j) = target``
    (bisection; clipped to [0, 1])."""
    active = set(weights if active is None else active)

    def pred(s):
        return sum(w * (max(s, natural[n]) if n in active else natural[n]) for n, w in weights.items())

    if pred(0.0) >= target:
        return 0.0
    if pred(1.0) <= target:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pred(mid) < target else (lo, mid)
    return hi


# ------------------------------------------------------------------------------------------
# Measuring and packaging
# ------------------------------------------------------------------------------------------

def measure(model, tokens: torch.Tensor, thresholds: Mapping[str, Any], device, batch_tokens: int = 8192):
    """Per-site sparsity table, its summary and the mean NLL of ``tokens`` under ``thresholds``."""
    saved = model.get_thresholds()
    try:
        model.set_thresholds({n: torch.as_tensor(t, dtype=torch.float32) for n, t in thresholds.items()})
        nll, n = 0.0, 0
        mb = rows_per_batch(tokens.shape[1], batch_tokens)
        with SparsityMeter(model) as meter, torch.no_grad():
            for sl in batches(tokens.shape[0], mb):
                x = tokens[sl].to(device)
                logits = model(x[:, :-1])
                nll += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                             reduction="sum"))
                n += x[:, 1:].numel()
        table = meter.table()
    finally:
        model.set_thresholds(saved)
    summ = summarize(table)
    blk = table[table.site != "head"]
    w = blk.macs / blk.macs.sum()
    summ["added_mean"] = float(blk.added.mean())
    summ["added_mac_weighted"] = float((blk.added * w).sum())
    summ["loss"] = nll / n
    return table, summ


_MEMO: "OrderedDict[tuple, Any]" = OrderedDict()
_MEMO_SIZE = 4


def _memo_key(model, tokens, *rest) -> tuple:
    from thresholds.schedule import weights_digest
    return (id(model), weights_digest(model), tokens_sha256(tokens), *rest)


def memoized(key: tuple, compute: Callable[[], Any]) -> Any:
    """A tiny LRU for results that only depend on the weights and the calibration tokens
    (dense loss, dense activation samples), so that sweeps over targets do not recompute them."""
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    val = compute()
    _MEMO[key] = val
    while len(_MEMO) > _MEMO_SIZE:
        _MEMO.popitem(last=False)
    return val


def dense_loss(model, tokens, device, batch_tokens: int = 8192) -> float:
    return memoized(_memo_key(model, tokens, "dense_loss", str(device)),
                    lambda: measure(model, tokens, {n: 0.0 for n in model.sites}, device, batch_tokens)[1]["loss"])


def build_schedule(model, tokens: torch.Tensor, thresholds: Mapping[str, Any], *, algorithm: str,
                   params: Mapping, calib_description: str, t0: float, device, model_name: str | None = None,
                   extra: Mapping | None = None, batch_tokens: int = 8192,
                   dense: float | None = None) -> Schedule:
    """Measure ``thresholds`` on the calibration tokens and package them with their provenance."""
    full = {n: threshold_value(torch.as_tensor(thresholds.get(n, 0.0))) for n in model.sites}
    table, summ = measure(model, tokens, full, device, batch_tokens)
    if dense is None:
        dense = dense_loss(model, tokens, device, batch_tokens)
    summ["dense_loss"] = dense
    summ["loss_increase"] = summ["loss"] / dense - 1.0
    sp = {r.site: {"sparsity": float(r.sparsity), "natural": float(r.natural), "added": float(r.added)}
          for r in table.itertuples()}
    return Schedule(thresholds=full, model=model_name or getattr(model.config, "name", "model"),
                    fingerprint=model_fingerprint(model), algorithm=algorithm, params=dict(params),
                    calibration=calib_info(tokens, calib_description), sparsity=sp, summary=summ,
                    cost_s=time.perf_counter() - t0, created=now_iso(), extra=dict(extra or {}))


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


MAX_LEVEL = 0.99  # the highest quantile level a uniform-style schedule may ask of a site


def dense_capture(model, tokens, dev, names, batch_tokens, max_values, seed):
    """Activation samples of ``names`` in the dense model (memoized per weights and tokens); the
    quantile baselines and sequential's shrinkage toward uniform both start from them."""
    def compute():
        stream = Stream(model, tokens, dev, batch_tokens)
        return stream.capture(names, max_values=max_values, seed=seed, run_all=True)
    return memoized(_memo_key(model, tokens, "dense_capture", tuple(names), max_values, seed, str(dev)), compute)
