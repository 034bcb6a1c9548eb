"""The field's ways of choosing activation thresholds, on the same sites and calibration data as
the sequential method, each returning a :class:`~thresholds.schedule.Schedule` with its cost.

``uniform``  one target sparsity for every site: the threshold of a site is that quantile of
    ``|x|`` in its calibration activations (from the dense model, as TEAL and CATS build their
    histograms; ``stats="sequential"`` measures each site with the earlier thresholds on).
    A site whose natural zeros already exceed the target keeps threshold 0. ``target="mac"``
    solves for the one level that gives the requested MAC-weighted model-wide sparsity.

``teal``  TEAL's greedy block-wise allocation (Liu et al. 2024, "Training-Free Activation Sparsity in
    Large Language Models"; their ``teal/greedyopt.py``): for each block, from the dense model's
    input to that block, repeatedly raise by one step the sparsity of the site whose step costs the
    least error of the block output. The error is TEAL's: on the last quarter of the positions,
    the L2 norm over positions of each (sequence, channel) difference from the dense block's output,
    averaged. Steps are weighted by the size of the matrix a site feeds (TEAL's ``base_step_size``
    0.05 for the smallest matrices, ``0.05 * M_min / M_j`` for a site feeding ``M_j`` MACs), so every
    step removes the same work. Thresholds are quantiles of the dense model's ``|x|`` and the
    greedy uses every calibration token. The path of every block is recorded once
    (:func:`teal_trajectory`); a target takes, per block, the point nearest it (TEAL's lookup).

``cats``  CATS (Lee et al. 2024, "CATS: Contextually-Aware Thresholding for Sparsity in Large
    Language Models"; their ``Cats`` module on ``act_fn``): one threshold per layer on the gated
    FFN's inner activation only, the quantile of its ``|x|`` in the dense model at one target level
    for every layer. In RWKV-4's channel-mix that activation is the squared-ReLU output, the input
    of ``ffn.value``; in OPT the ReLU output, the input of ``fc2``. That site holds only 4/13 of an
    RWKV block's MACs and is already ~90% zero in trained RWKV, so CATS cannot reach a high
    model-wide sparsity: a target beyond its reach is capped and marked
    ``extra["target_reached"] = False``, never met by thresholding other sites.

``finetune``  the training-based reference: the weights are frozen, the thresholds are learned
    (``t = exp(theta)``, per site) with a straight-through estimator -- the forward pass uses the
    hard mask ``|x| >= t``, the backward pass the gradient of ``sigmoid((|x| - t) / (temperature
    * t))`` -- minimizing the calibration cross entropy plus a sparsity penalty: the MAC-weighted
    share of surviving activations (``penalty="density"``) or their normalized L1 norm
    (``penalty="l1"``, as the authors'); with a target ``sparsity`` the penalty only acts above the
    target density, and a final common rescaling of the thresholds hits the target exactly on
    the calibration data. Starts from a uniform schedule (default) or any given schedule
    (e.g. the sequential one).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from rllm.model import _shift
from rllm.wkv import wkv_sequence

from thresholds._core import (RWKVSegments, Stream, as_calib_tokens, block_sites, build_schedule, calibrating,
                              mac_weights, measure, model_device, progress_bar, quantiles_pooled, run_segments, _rep,
                              set_raw_threshold, solve_level, threshold_value, MAX_LEVEL, dense_capture, sorted_values)
from thresholds.schedule import Schedule

__all__ = ["uniform", "cats", "teal", "teal_trajectory", "teal_error", "TealTrajectory", "finetune", "ffn_inner_sites",
           "quantile_schedule"]

def ffn_inner_sites(model) -> list[str]:
    """The gated FFN's inner activation of every block: RWKV's squared ReLU feeds ``ffn.value``,
    OPT's ReLU feeds ``ffn.fc2``."""
    out = [n for n in block_sites(model) if n.endswith(("ffn.value", "ffn.fc2"))]
    if not out:
        raise ValueError(f"{getattr(model.config, 'name', 'model')} has no FFN inner-activation site "
                         f"(a name ending in ffn.value or ffn.fc2)")
    return out


# ------------------------------------------------------------------------------------------
# Uniform / CATS: one quantile level on a set of sites
# ------------------------------------------------------------------------------------------

def quantile_schedule(model, calib_tokens, *, sparsity: float, active: Sequence[str] | None = None,
                      target: str = "site", stats: str = "dense", include_head: bool = False,
                      max_level: float = MAX_LEVEL, batch_tokens: int = 8192, max_values: int = 1 << 19,
                      seed: int = 0, device=None, progress: bool = True, model_name: str | None = None,
                      calib_description: str = "", algorithm: str = "uniform",
                      params: Mapping | None = None) -> Schedule:
    """Threshold every ``active`` site at the quantile ``level`` of its ``|x|`` (zeros included, so
    the site's sparsity is ``max(level, natural)``); others stay 0. ``target="site"``: level =
    ``sparsity``; ``target="mac"``: the level that makes the predicted MAC-weighted model-wide
    sparsity (block sites) equal ``sparsity``, capped at ``max_level``."""
    t0 = time.perf_counter()
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if target not in ("site", "mac"):
        raise ValueError(f"target must be 'site' or 'mac', got {target!r}")
    if stats not in ("dense", "sequential"):
        raise ValueError(f"stats must be 'dense' or 'sequential', got {stats!r}")
    names = block_sites(model, include_head)
    active = list(names if active is None else active)
    extra: dict[str, Any] = {}
    with calibrating(model, device) as dev:
        caps = dense_capture(model, calib_tokens, dev, names, batch_tokens, max_values, seed)
        natural = {n: caps[n].natural for n in names}
        if target == "mac":
            w = mac_weights(model, block_sites(model))
            level = solve_level(w, {n: natural[n] for n in w}, sparsity, [a for a in active if a in w])
        else:
            level = sparsity
        if level > max_level:
            warnings.warn(f"{algorithm}: target {sparsity:.3f} needs level {level:.3f} > {max_level} on sites "
                          f"{active[0]}...; capped (the target is not reached)")
            extra["target_reached"] = False
            level = max_level
        extra["level"] = level
        thresholds: dict[str, Any] = {}
        if stats == "dense":
            for n in active:
                thresholds[n] = caps[n].pooled_quantiles([level])[0] if level > 0 else 0.0
        else:
            stream = Stream(model, calib_tokens, dev, batch_tokens)
            for k, n in enumerate(active):
                stream.advance_to(stream.segs.segment_of(n))
                cap = stream.capture([n], max_values=max_values, seed=seed + k)[n]
                t = quantiles_pooled(cap.values, [level])[0] if level > 0 else 0.0
                model.sites[n].threshold = torch.tensor(float(t), device=dev)
                thresholds[n] = t
        p = dict(sparsity=sparsity, target=target, stats=stats, include_head=include_head, max_level=max_level,
                 sites=active if len(active) < len(names) else "all", seed=seed)
        p.update(params or {})
        return build_schedule(model, calib_tokens, thresholds, algorithm=algorithm, params=p,
                              calib_description=calib_description, t0=t0, device=dev, model_name=model_name,
                              batch_tokens=batch_tokens, extra=extra)


def uniform(model, calib_tokens, *, sparsity: float, target: str = "site", stats: str = "dense",
            include_head: bool = False, **kw) -> Schedule:
    """One quantile level for every block site (see the module doc)."""
    return quantile_schedule(model, calib_tokens, sparsity=sparsity, target=target, stats=stats,
                             include_head=include_head, algorithm=kw.pop("algorithm", "uniform"), **kw)


def cats(model, calib_tokens, *, sparsity: float, target: str = "mac", **kw) -> Schedule:
    """CATS: the FFN's inner activation only, one quantile level for every layer (see the module
    doc). ``target="mac"`` (default): ``sparsity`` is the model-wide MAC-weighted target;
    ``"site"``: the level at the FFN inner sites."""
    return quantile_schedule(model, calib_tokens, sparsity=sparsity, active=ffn_inner_sites(model), target=target,
                             algorithm=kw.pop("algorithm", "cats"), **kw)


# ------------------------------------------------------------------------------------------
# TEAL-style greedy allocation
# ------------------------------------------------------------------------------------------

@dataclass
class TealTrajectory:
    """The greedy path of every block: ``points[i]`` = list of ``(block_sparsity, {site: threshold})``,
    increasing; ``cost_s`` = the wall time it took to compute. ``fingerprint`` and ``calib_sha256``
    name the weights and calibration tokens it was computed on, ``params`` its settings."""

    points: list[list[tuple[float, dict[str, float]]]]
    natural: dict[str, float]
    params: dict
    cost_s: float
    fingerprint: str = ""
    calib_sha256: str = ""

    def key(self) -> dict:
        """Everything the trajectory depends on (a schedule made from it is cached under this)."""
        return {"params": dict(self.params), "weights": self.fingerprint, "calib": self.calib_sha256}

    def thresholds_for(self, sparsity: float) -> tuple[dict[str, float], list[float]]:
        """Per block, the greedy point whose block sparsity is nearest ``sparsity`` (TEAL's lookup:
        the closest row, the earlier on a tie). A block's points never decrease (a step only
        raises a level), so no point past the first at or above ``sparsity`` is nearer: a path cut
        at ``max_sparsity >= sparsity`` gives the same thresholds as the whole one."""
        out: dict[str, float] = {}
        reached = []
        for pts in self.points:
            pick = min(pts, key=lambda p: abs(p[0] - sparsity))
            out.update(pick[1])
            reached.append(pick[0])
        return out, reached


def teal_trajectory(model, calib_tokens, *, step: float = 0.05, max_sparsity: float = 0.9,
                    last_fraction: float = 0.25, max_level: float = MAX_LEVEL, batch_tokens: int = 8192,
                    max_values: int = 1 << 19, seed: int = 0, device=None, progress: bool = True,
                    fast: bool | None = None) -> TealTrajectory:
    """Run TEAL's greedy allocation of every block once (see the module doc), on all of
    ``calib_tokens``: the activation histograms and the block inputs come from the dense model.

    ``step``: TEAL's ``base_step_size``, the sparsity step of the sites feeding the smallest
    matrices; a site feeding ``M_j`` MACs moves ``step * M_min / M_j``. ``max_sparsity``: each
    block's path stops there (TEAL's default target 0.9). ``last_fraction``: the block-output error
    is measured on that last share of the positions (TEAL's 0.25).

    A path computed with a lower ``max_sparsity`` is the prefix of the default one (each block's
    points up to the first at or above it: the greedy's choices do not depend on where it stops),
    so its :meth:`TealTrajectory.thresholds_for` agrees with the full path's for every target up
    to that ``max_sparsity``. ``fast``: RWKV-4 candidates run only what they change on the
    positions the error reads (see :class:`_RWKVBlockEval`; ~6x less work a step on rwkv_pd12);
    ``False`` runs the whole block for every candidate (the reference: the same path, its errors
    equal to float rounding). ``None`` (default): fast on a CPU only -- on a GPU the fast path's
    many small kernels have not been timed against the few large ones of the reference.
    """
    from thresholds.schedule import model_fingerprint
    from thresholds._core import tokens_sha256
    t0 = time.perf_counter()
    if not 0 < step <= 1 or not 0 < last_fraction <= 1:
        raise ValueError(f"teal: step and last_fraction must be in (0, 1], got {step} and {last_fraction}")
    names = block_sites(model)
    points: list[list[tuple[float, dict[str, float]]]] = []
    with calibrating(model, device) as dev:
        caps = dense_capture(model, calib_tokens, dev, names, batch_tokens, max_values, seed)
        natural = {n: caps[n].natural for n in names}
        sorted_vals = {n: sorted_values(caps[n].values.reshape(-1)) for n in names}
        stream = Stream(model, calib_tokens, dev, batch_tokens)
        fast = dev.type == "cpu" if fast is None else bool(fast)
        bar = progress_bar(stream.segs.n_blocks, "teal greedy", progress)
        for i in range(stream.segs.n_blocks):
            points.append(_teal_block(model, stream, i, names, natural, sorted_vals, step, max_sparsity,
                                      last_fraction, max_level, fast))
            bar.update(1)
        bar.close()
    params = dict(step=step, max_sparsity=max_sparsity, last_fraction=last_fraction, max_level=max_level,
                  max_values=max_values, seed=seed)
    return TealTrajectory(points=points, natural=natural, params=params, cost_s=time.perf_counter() - t0,
                          fingerprint=model_fingerprint(model)["weights"], calib_sha256=tokens_sha256(calib_tokens))


def teal_error(y: torch.Tensor, ref: torch.Tensor, last_fraction: float) -> torch.Tensor:
    """TEAL's block-output error (``calculate_activation_error``), summed over rows: on the last
    ``last_fraction`` of the positions, the L2 norm over positions of each (row, channel), averaged
    over channels. ``y``, ``ref``: ``[B, T, C]``; returns ``[B]``."""
    start = int(y.shape[1] * (1 - last_fraction))
    return _l2_over_positions(y[:, start:] - ref[:, start:])


def _l2_over_positions(d: torch.Tensor) -> torch.Tensor:
    """``||d[b, :, c]||_2`` in float64, averaged over channels: ``[B, T, C] -> [B]``. (The sum of
    squares over the positions, not ``linalg.vector_norm(dim=1)``, whose strided float64 reduction
    took 18x longer on a CPU: 0.85 against 0.045 ms for 16 x 32 x 256, equal to 1e-15.)"""
    return d.double().square().sum(1).sqrt().mean(-1)


def _teal_block(model, stream, i, names, natural, sorted_vals, step, max_sparsity, last_fraction, max_level,
                fast: bool = True):
    """One block's greedy path, from the dense model's input to the block (TEAL's ``process_layer``).

    ``fast`` (RWKV-4 only; OPT always takes the generic path): each step evaluates its candidates
    with :class:`_RWKVBlockEval`, which runs only what a candidate changes on the positions the
    error reads, instead of the whole block on every position for every candidate; the errors
    agree with the generic path's to float rounding, so the greedy choices are the same."""
    segs, dev = stream.segs, stream.device
    a, b = segs.block_span(i)
    stream.advance_to(a)
    blk = [n for n in segs.block_sites(i) if n in names]
    sites = [model.sites[n] for n in blk]
    macs = {n: model.sites[n].width * model.sites[n].macs_per_event for n in blk}
    w = {n: m / sum(macs.values()) for n, m in macs.items()}
    delta = {n: step * min(macs.values()) / macs[n] for n in blk}
    ref = [run_segments(model, h, a, b) for h in stream.h]
    # every site starts at its natural zeros: the steps below them change nothing (zero extra
    # error), so TEAL's greedy, which starts at 0, takes them first
    level = {n: natural[n] for n in blk}
    thr = {n: 0.0 for n in blk}

    def q(n, lv):
        s = sorted_vals[n]
        return float(s[min(len(s) - 1, max(0, int(math.ceil(lv * len(s))) - 1))]) if lv > 0 and len(s) else 0.0

    def set_all(values):
        for n, s in zip(blk, sites):
            s.threshold = torch.tensor(values[n], device=dev)

    pts = [(sum(w[n] * level[n] for n in blk), dict(thr))]
    try:
        ev = _RWKVBlockEval(model, i, stream.h, ref, last_fraction) if fast and isinstance(segs, RWKVSegments) else None
        while pts[-1][0] < max_sparsity:
            cand = [n for n in blk if level[n] + delta[n] <= max_level + 1e-9]
            if not cand:
                break
            new_t = {n: q(n, level[n] + delta[n]) for n in cand}
            if ev is not None:
                err = ev.errors(cand, new_t, thr)
            else:
                err = _block_errors(model, stream.h, ref, a, b, cand, new_t, thr, last_fraction)
            best = cand[int(torch.argmin(err))]  # the first of equal errors, as TEAL's strict '<'
            level[best] += delta[best]
            thr[best] = new_t[best]
            set_all(thr)
            if ev is not None:
                ev.accept(best)
            pts.append((sum(w[n] * level[n] for n in blk), dict(thr)))
    finally:  # TEAL: every block is calibrated on the dense model's input
        set_all({n: 0.0 for n in blk})
    return pts


def _block_errors(model, hs, refs, a, b, cand, new_t, thr, last_fraction) -> torch.Tensor:
    """TEAL's error (summed over the calibration rows) of each candidate ``cand[j]`` raised to
    ``new_t[cand[j]]``, the block's other sites at ``thr``: the whole block (segments ``a..b``)
    on every position, the ``K`` candidates side by side (rows ``j*mb ...``); ``[K]`` float64.
    Leaves per-row thresholds on the sites of ``thr``."""
    K = len(cand)
    err = torch.zeros(K, dtype=torch.float64)
    for h, r in zip(hs, refs):
        mb = h.shape[0]
        for n in thr:
            tv = torch.tensor([new_t[n] if c == n else thr[n] for c in cand], device=h.device)
            set_raw_threshold(model.sites[n], tv.repeat_interleave(mb).view(K * mb, 1, 1))
        y = run_segments(model, _rep(h, K), a, b)
        err += teal_error(y, r.repeat(K, 1, 1), last_fraction).view(K, mb).sum(1).cpu()
    return err


class _RWKVBlockEval:
    """TEAL's candidate errors for RWKV-4 block ``i``, running only what each candidate changes.

    The error reads the block output at positions ``start..T-1`` (``start = int(T * (1 -
    last_fraction))``). The channel-mix (``x + ffn(ln2(x))``) is position-local but for its token
    shift, so it runs on positions ``lo = max(start - 1, 0)..T-1`` only: position ``lo`` supplies
    the shift of ``start`` (its own output is wrong and dropped). Both halves are kept in pieces
    under the current thresholds -- the time-mix's mixes ``xk, xv``, projections ``k, v`` and WKV on
    every position (a recurrence), ``xr``, ``r`` and its output ``xmid`` on the tail; the
    channel-mix's ``xk, xr, r, k`` (after the squared ReLU) and ``v`` on the tail -- and a
    candidate recomputes only what its site feeds: ``att.key``/``att.value`` their projection and
    the WKV, ``att.receptance``/``att.output`` their tail, then the whole channel-mix (the time-mix
    candidates side by side in one batch); ``ffn.receptance`` one projection, ``ffn.key`` two,
    ``ffn.value`` one, on the tail, with the time-mix untouched. The accepted candidate's pieces
    become the current ones (the numbers recomputing them would give). The formulas are those of
    ``rllm.model.TimeMix``/``ChannelMix`` through the model's own modules; a test holds this path
    to the generic one (the whole block for every candidate)."""

    def __init__(self, model, i: int, hs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], last_fraction: float):
        self.blk = blk = model.blocks[i]
        att = blk.att
        self.prefix = f"blocks.{i}."
        T = hs[0].shape[1]  # every minibatch of the stream has the same length
        start = int(T * (1 - last_fraction))  # as teal_error
        self.lo = lo = max(start - 1, 0)
        self.skip = start - lo
        self.state: list[dict[str, torch.Tensor]] = []
        self.pending: list[dict[str, dict[str, torch.Tensor]]] = []
        # Pieces kept from earlier steps, one slot per (minibatch, tag), with the thresholds they
        # were computed under: a step that moved another site leaves most of them valid (a step
        # on a channel-mix site changes no time-mix piece), so they are not recomputed.
        self.memo: dict[tuple, tuple[tuple, Any]] = {}
        self.memo_hits = 0
        for h, r in zip(hs, refs):
            base = blk.ln0(h) if i == 0 else h  # RWKVSegments.run: ln0 opens segment 0
            x = blk.ln1(base)
            xx = _shift(x, None)
            st = dict(xk=x * att.time_mix_k + xx * (1 - att.time_mix_k),
                      xv=x * att.time_mix_v + xx * (1 - att.time_mix_v),
                      xr=(x * att.time_mix_r + xx * (1 - att.time_mix_r))[:, lo:],
                      base=base[:, lo:], ref=r[:, start:])
            st["k"] = att.key(att.sites["key"](st["xk"]))
            st["v"] = att.value(att.sites["value"](st["xv"]))
            st["r"] = torch.sigmoid(att.receptance(att.sites["receptance"](st["xr"])))
            st["wkv"] = self._wkv(st["k"], st["v"])
            st["xmid"] = self._att_out(st, st["r"], st["wkv"])
            st.update(self._ffn_pieces(st["xmid"]))
            self.state.append(st)

    # --- pieces kept between steps ----------------------------------------------------------
    def _live(self, seg: str) -> tuple[float, ...]:
        """The thresholds now on the segment's sites (``att`` or ``ffn``), raised candidates included."""
        return tuple(float(s.threshold) for s in getattr(self.blk, seg).sites.values())

    def _cached(self, slot: tuple, key: tuple, compute):
        """``compute()``, or what it returned for the same ``slot`` under the same ``key`` (the
        thresholds and inputs it depends on): the same tensors, so the same numbers."""
        hit = self.memo.get(slot)
        if hit is not None and hit[0] == key:
            self.memo_hits += 1
            return hit[1]
        value = compute()
        self.memo[slot] = (key, value)
        return value

    # --- the time-mix (TimeMix.forward), its output on the tail ---------------------------
    def _wkv(self, k, v):
        """The WKV on every position (a recurrence), kept on the tail."""
        att = self.blk.att
        return wkv_sequence(k, v, att.time_decay, att.time_first)[0][:, self.lo:]

    def _att_out(self, st, r, wkv):
        """The time-mix segment's output on the tail: the residual plus the time-mix."""
        att = self.blk.att
        return st["base"] + att.output(att.sites["output"](r * wkv.to(r.dtype)))

    def _att_candidate(self, st, site: str) -> dict[str, torch.Tensor]:
        """The time-mix pieces that change when ``att.<site>`` has the threshold now set on it."""
        att = self.blk.att
        s = att.sites[site]
        new: dict[str, torch.Tensor] = {}
        if site == "key":
            new["k"] = att.key(s(st["xk"]))
            new["wkv"] = self._wkv(new["k"], st["v"])
        elif site == "value":
            new["v"] = att.value(s(st["xv"]))
            new["wkv"] = self._wkv(st["k"], new["v"])
        elif site == "receptance":
            new["r"] = torch.sigmoid(att.receptance(s(st["xr"])))
        new["xmid"] = self._att_out(st, new.get("r", st["r"]), new.get("wkv", st["wkv"]))
        return new

    # --- the channel-mix (ChannelMix._mix) on the tail -------------------------------------
    def _ffn_pieces(self, xmid, cache: tuple | None = None) -> dict[str, torch.Tensor]:
        """The channel-mix pieces of ``xmid`` under the current thresholds. ``cache``: ``(slot,
        key)`` naming ``xmid`` (the thresholds it came from), to keep each piece for later steps."""
        ffn = self.blk.ffn
        s = ffn.sites

        def piece(tag, deps, compute):
            return compute() if cache is None else self._cached((*cache[0], tag), (cache[1], deps), compute)

        def mixes():
            x = self.blk.ln2(xmid)
            xx = _shift(x, None)  # wrong at the tail's first position only, which is not scored
            return x * ffn.time_mix_k + xx * (1 - ffn.time_mix_k), x * ffn.time_mix_r + xx * (1 - ffn.time_mix_r)

        t_r, t_k, t_v = (float(s[n].threshold) for n in ("receptance", "key", "value"))
        p = dict(zip(("fxk", "fxr"), piece("mix", (), mixes)))
        p["fr"] = piece("fr", t_r, lambda: torch.sigmoid(ffn.receptance(s["receptance"](p["fxr"]))))
        p["fk"] = piece("fk", t_k, lambda: self._ffn_k(p["fxk"]))
        p["fv"] = piece("fv", (t_k, t_v), lambda: ffn.value(s["value"](p["fk"])))
        return p

    def _ffn_k(self, xk):
        ffn = self.blk.ffn
        k = torch.relu(ffn.key(ffn.sites["key"](xk)))
        return k * k  # as ChannelMix._mix

    def _ffn_candidate(self, b: int, st, site: str) -> dict[str, torch.Tensor]:
        """The channel-mix pieces that change when ``ffn.<site>`` has the threshold now set on it
        (minibatch ``b``; kept for a later step under the same thresholds)."""
        ffn = self.blk.ffn
        att, (t_r, t_k, t_v) = self._live("att"), self._live("ffn")
        if site == "receptance":
            return {"fr": self._cached((b, "cand fr"), (att, t_r),
                                       lambda: torch.sigmoid(ffn.receptance(ffn.sites["receptance"](st["fxr"]))))}
        if site == "key":
            k = self._cached((b, "cand fk"), (att, t_k), lambda: self._ffn_k(st["fxk"]))
            return {"fk": k, "fv": self._cached((b, "cand fv of fk"), (att, t_k, t_v),
                                                lambda: ffn.value(ffn.sites["value"](k)))}
        return {"fv": self._cached((b, "cand fv"), (att, t_k, t_v), lambda: ffn.value(ffn.sites["value"](st["fk"])))}

    def _err(self, xmid, fr, fv, st, n: int) -> torch.Tensor:
        """TEAL's error of ``n`` stacked candidates (rows ``j*mb ...``), summed over rows: ``[n]``."""
        y = (xmid + fr * fv)[:, self.skip:]  # Block: x + ffn(ln2(x)), ChannelMix: r * value(k)
        ref = st["ref"]
        d = (y.view(n, *ref.shape) - ref).view(y.shape)
        return _l2_over_positions(d).view(n, -1).sum(1)

    @contextmanager
    def _raised(self, name: str, t: float):
        """Site ``name`` at threshold ``t`` inside the block (then back to its current one)."""
        seg, site = name[len(self.prefix):].split(".")
        m = getattr(self.blk, seg).sites[site]
        saved = m.threshold
        m.threshold = torch.tensor(t, dtype=torch.float32, device=saved.device)
        try:
            yield seg, site
        finally:
            m.threshold = saved

    def errors(self, cand: Sequence[str], new_t: Mapping[str, float], thr: Mapping[str, float]) -> torch.Tensor:
        """TEAL's error (summed over the calibration rows) of each candidate ``cand[j]`` raised to
        ``new_t[cand[j]]``, the others at their current thresholds (``thr``, which the model's
        sites hold); ``[K]`` float64."""
        err = torch.zeros(len(cand), dtype=torch.float64, device=self.state[0]["ref"].device)
        att_idx = [j for j, n in enumerate(cand) if n[len(self.prefix):].startswith("att.")]
        self.pending = []
        for b, st in enumerate(self.state):
            pend: dict[str, dict[str, torch.Tensor]] = {}
            for j, n in enumerate(cand):
                if j not in att_idx:
                    with self._raised(n, new_t[n]) as (_, site):
                        pend[n] = self._ffn_candidate(b, st, site)
                    err[j] += self._err(st["xmid"], pend[n].get("fr", st["fr"]), pend[n].get("fv", st["fv"]), st, 1)[0]
            if att_idx:
                new, keys = [], []
                for j in att_idx:
                    with self._raised(cand[j], new_t[cand[j]]) as (_, site):
                        keys.append((site, self._live("att")))
                        new.append(self._cached((b, "cand att", site), keys[-1], lambda: self._att_candidate(st, site)))
                # [n_att * mb, T - lo, C] under the current ffn thresholds
                x = self._cached((b, "cand xmid"), tuple(keys), lambda: torch.cat([p["xmid"] for p in new]))
                f = self._ffn_pieces(x, cache=((b, "cand ffn"), tuple(keys)))
                err[att_idx] += self._err(x, f["fr"], f["fv"], st, len(att_idx))
                mb = st["xmid"].shape[0]
                for q, (j, p) in enumerate(zip(att_idx, new)):
                    pend[cand[j]] = {**p, **{k: v[q * mb:(q + 1) * mb] for k, v in f.items()}}
            self.pending.append(pend)
        return err.cpu()

    def accept(self, name: str) -> None:
        """``name``'s candidate was taken (its threshold is now set on the model): its pieces
        become the current ones."""
        for st, pend in zip(self.state, self.pending):
            st.update(pend[name])
        self.pending = []


def teal(model, calib_tokens, *, sparsity: float, trajectory: TealTrajectory | None = None, step: float = 0.05,
         max_sparsity: float = 0.9, last_fraction: float = 0.25, batch_tokens: int = 8192, seed: int = 0,
         device=None, progress: bool = True, model_name: str | None = None, calib_description: str = "",
         algorithm: str = "teal") -> Schedule:
    """TEAL schedule at ``sparsity``: every block at the greedy point nearest that MAC-weighted
    target. Pass a precomputed ``trajectory`` (made for these weights and tokens) to reuse one
    greedy run for several targets; its cost is then counted in each schedule's ``cost_s``."""
    from thresholds._core import tokens_sha256
    from thresholds.schedule import model_fingerprint
    t0 = time.perf_counter()
    if trajectory is None:
        trajectory = teal_trajectory(model, calib_tokens, step=step, max_sparsity=max_sparsity,
                                     last_fraction=last_fraction, batch_tokens=batch_tokens, seed=seed,
                                     device=device, progress=progress)
        traj_cost = 0.0  # already inside this call's wall time
    else:
        traj_cost = trajectory.cost_s
        if (trajectory.fingerprint != model_fingerprint(model)["weights"]
                or trajectory.calib_sha256 != tokens_sha256(calib_tokens)):
            raise ValueError("teal: the trajectory was computed for other weights or calibration tokens; "
                             "recompute it with teal_trajectory(model, calib_tokens)")
    thresholds, reached = trajectory.thresholds_for(sparsity)
    with calibrating(model, device) as dev:
        sched = build_schedule(model, calib_tokens, thresholds, algorithm=algorithm,
                               params=dict(sparsity=sparsity, **trajectory.params),
                               calib_description=calib_description, t0=t0, device=dev, model_name=model_name,
                               batch_tokens=batch_tokens,
                               extra={"block_sparsity_predicted": reached, "trajectory_cost_s": trajectory.cost_s})
    return sched.replace(cost_s=sched.cost_s + traj_cost)


# ------------------------------------------------------------------------------------------
# Fine-tuned thresholds
# ------------------------------------------------------------------------------------------

def finetune(model, calib_tokens, *, sparsity: float | None = None, init: str | Schedule = "uniform",
             init_sparsity: float | None = None, steps: int = 100, lr: float = 0.05, penalty: str = "density",
             penalty_weight: float = 1.0, temperature: float = 0.1, batch_seqs: int = 8, train_len: int = 128,
             hit_target: bool = True, include_head: bool = False, batch_tokens: int = 8192, seed: int = 0,
             device=None, progress: bool = True, model_name: str | None = None, calib_description: str = "",
             algorithm: str = "finetune") -> Schedule:
    """Learn the thresholds with the weights frozen (see the module doc).

    ``sparsity``: MAC-weighted target (None: plain penalty, no target). ``init``: ``"uniform"``
    (at ``init_sparsity``, default ``sparsity`` or 0.5), ``"sequential"`` (budget 0.02) or a
    :class:`Schedule`. ``train_len``: tokens per training sequence (random crops of the
    calibration sequences). ``extra`` records ``objective_start``/``objective_end`` (the training
    objective on a fixed batch before and after) and the loss curve.
    """
    t0 = time.perf_counter()
    if penalty not in ("density", "l1"):
        raise ValueError(f"penalty must be 'density' or 'l1', got {penalty!r}")
    names = block_sites(model, include_head)
    init_sched = _finetune_init(model, calib_tokens, init, init_sparsity, sparsity, include_head, batch_tokens, seed,
                                device, progress)
    knobs = dict(steps=steps, lr=lr, penalty=penalty, penalty_weight=penalty_weight, temperature=temperature,
                 batch_seqs=batch_seqs, train_len=train_len, seed=seed)
    with _frozen(model, device) as dev:
        learned, record = _learn(model, calib_tokens, names, init_sched, sparsity, dev, batch_tokens, progress, **knobs)
        bad = [n for n, t in learned.items() if not torch.isfinite(t).all()]
        if bad:
            raise FloatingPointError(f"finetune: threshold of {bad[0]} diverged; lower lr ({lr})")
        scale = 1.0
        if sparsity is not None and hit_target:
            scale = _scale_to_target(model, calib_tokens, learned, float(sparsity), dev, batch_tokens)
            learned = {n: t * scale for n, t in learned.items()}
    params = dict(sparsity=sparsity, init=init if isinstance(init, str) else f"schedule:{init.algorithm}",
                  init_sparsity=init_sparsity, **{k: v for k, v in knobs.items() if k != "seed"},
                  hit_target=hit_target, include_head=include_head, seed=seed)
    with calibrating(model, device) as dev2:
        sched = build_schedule(model, calib_tokens, dict(learned), algorithm=algorithm,
                               params=params, calib_description=calib_description, t0=t0, device=dev2,
                               model_name=model_name, batch_tokens=batch_tokens,
                               extra={**record, "final_scale": scale, "init_cost_s": init_sched.cost_s})
    return sched.replace(cost_s=sched.cost_s)


def _finetune_init(model, calib_tokens, init, init_sparsity, sparsity, include_head, batch_tokens, seed, device,
                   progress) -> Schedule:
    """The schedule finetuning starts from: a given one, uniform, or sequential (budget 0.02)."""
    if isinstance(init, Schedule):
        return init
    if init == "uniform":
        level = init_sparsity if init_sparsity is not None else (sparsity if sparsity is not None else 0.5)
        return uniform(model, calib_tokens, sparsity=level, target="mac", include_head=include_head,
                       batch_tokens=batch_tokens, seed=seed, device=device, progress=False)
    if init == "sequential":
        from thresholds.sequential import sequential
        return sequential(model, calib_tokens, tolerance=0.02, batch_tokens=batch_tokens, device=device,
                          progress=progress)
    raise ValueError(f"init must be 'uniform', 'sequential' or a Schedule, got {init!r}")


@contextmanager
def _frozen(model, device):
    """The model on ``device`` in eval mode with every weight frozen and no thresholds; its
    thresholds, device, mode and ``requires_grad`` flags are restored afterwards."""
    saved, was_training, old_dev = model.get_thresholds(), model.training, model_device(model)
    dev = torch.device(device) if device is not None else old_dev
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        model.to(dev).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        model.set_thresholds({n: 0.0 for n in model.sites})
        yield dev
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.to(old_dev)
        model.set_thresholds(saved)
        model.train(was_training)


def _ste_hook(theta, stats: dict, n: str, temperature: float, penalty: str):
    """Forward hook of site ``n``: the hard threshold ``exp(theta[n])`` in the forward pass, a
    sigmoid's gradient in the backward one (straight-through), and the site's penalty in ``stats``."""
    def hook(module, inputs, output):
        x = inputs[0]
        t = torch.exp(theta[n]).to(x.dtype)
        a = x.abs()
        hard = (a >= t).to(x.dtype)
        soft = torch.sigmoid((a - t) / (temperature * t))
        m = hard + soft - soft.detach()
        if penalty == "density":
            stats[n] = soft.mean()
        else:
            stats[n] = (x.abs() * soft).mean() / (x.abs().mean().detach() + 1e-12)
        return x * m
    return hook


def _learn(model, calib_tokens, names, init_sched, sparsity, dev, batch_tokens, progress, *, steps, lr, penalty,
           penalty_weight, temperature, batch_seqs, train_len, seed) -> tuple[dict, dict]:
    """Adam on the log-thresholds (weights frozen): returns the learned thresholds and the record
    (objective on a fixed batch before and after, the loss curve)."""
    g = torch.Generator().manual_seed(seed)
    w = mac_weights(model, names)
    # floors for sites starting at 0: 1e-3 of the site's mean |x| (a threshold that silences ~nothing)
    with torch.no_grad():
        caps = Stream(model, calib_tokens[: max(1, batch_seqs)], dev, batch_tokens).capture(
            names, max_values=1 << 16, seed=seed, run_all=True)
    floor = {n: max(float(caps[n].values.mean()) * 1e-3, 1e-8) for n in names}
    theta = {n: torch.log(torch.clamp(torch.as_tensor(init_sched.thresholds[n], dtype=torch.float32), min=floor[n]))
             .to(dev).requires_grad_(True) for n in names}
    opt = torch.optim.Adam(list(theta.values()), lr=lr)
    stats: dict[str, torch.Tensor] = {}
    target_density = None if sparsity is None else 1.0 - float(sparsity)

    def objective(idx):
        stats.clear()
        logits = model(idx[:, :-1])
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
        dens = sum(w[n] * stats[n] for n in names)
        pen = dens if target_density is None else torch.relu(dens - target_density)
        return ce + penalty_weight * pen, ce, dens

    N, T = calib_tokens.shape
    Lc = min(T, train_len + 1)
    fixed = calib_tokens[: min(N, batch_seqs), :Lc].to(dev)
    curve: list[float] = []
    hooks = [model.sites[n].register_forward_hook(_ste_hook(theta, stats, n, temperature, penalty)) for n in names]
    try:
        with torch.no_grad():
            obj0 = float(objective(fixed)[0])
        bar = progress_bar(steps, "finetune", progress)
        for _ in range(steps):
            rows = torch.randint(0, N, (min(N, batch_seqs),), generator=g)
            start = int(torch.randint(0, T - Lc + 1, (1,), generator=g))
            obj, ce, dens = objective(calib_tokens[rows, start:start + Lc].to(dev))
            opt.zero_grad(set_to_none=True)
            obj.backward()
            opt.step()
            curve.append(float(obj.detach()))
            bar.update(1)
            bar.set_postfix(obj=f"{curve[-1]:.4f}", ce=f"{float(ce.detach()):.4f}", density=f"{float(dens.detach()):.3f}")
        bar.close()
        with torch.no_grad():
            obj1 = float(objective(fixed)[0])
    finally:
        for h in hooks:
            h.remove()
    learned = {n: torch.exp(theta[n].detach()).cpu() for n in names}
    return learned, {"objective_start": obj0, "objective_end": obj1, "curve": curve[::max(1, steps // 50)]}


def _scale_to_target(model, tokens, thresholds, target, dev, batch_tokens, iters: int = 14) -> float:
    """Common factor on all thresholds so the measured MAC-weighted sparsity matches ``target`` (bisection in log space)."""
    def sp(scale):
        with torch.no_grad():
            return measure(model, tokens, {n: t * scale for n, t in thresholds.items()}, dev, batch_tokens)[1][
                "sparsity_mac_weighted"]
    lo, hi = -3.0, 3.0
    if sp(math.exp(lo)) > target:
        return math.exp(lo)
    if sp(math.exp(hi)) < target:
        return math.exp(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        s = sp(math.exp(mid))
        if abs(s - target) < 2e-3:
            return math.exp(mid)
        lo, hi = (mid, hi) if s < target else (lo, mid)
    return math.exp((lo + hi) / 2)
