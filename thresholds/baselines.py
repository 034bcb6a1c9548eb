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

from thresholds._core import (Stream, as_calib_tokens, block_sites, build_schedule, calibrating, mac_weights,
                              measure, model_device, progress_bar, quantiles_pooled, run_segments, _rep,
                              set_raw_threshold, solve_level, threshold_value, MAX_LEVEL, dense_capture)
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
        the closest row, the earlier on a tie)."""
        out: dict[str, float] = {}
        reached = []
        for pts in self.points:
            pick = min(pts, key=lambda p: abs(p[0] - sparsity))
            out.update(pick[1])
            reached.append(pick[0])
        return out, reached


def teal_trajectory(model, calib_tokens, *, step: float = 0.05, max_sparsity: float = 0.9,
                    last_fraction: float = 0.25, max_level: float = MAX_LEVEL, batch_tokens: int = 8192,
                    max_values: int = 1 << 19, seed: int = 0, device=None, progress: bool = True) -> TealTrajectory:
    """Run TEAL's greedy allocation of every block once (see the module doc), on all of
    ``calib_tokens``: the activation histograms and the block inputs come from the dense model.

    ``step``: TEAL's ``base_step_size``, the sparsity step of the sites feeding the smallest
    matrices; a site feeding ``M_j`` MACs moves ``step * M_min / M_j``. ``max_sparsity``: each
    block's path stops there (TEAL's default target 0.9). ``last_fraction``: the block-output error
    is measured on that last share of the positions (TEAL's 0.25).
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
        sorted_vals = {n: caps[n].values.reshape(-1).sort().values for n in names}
        stream = Stream(model, calib_tokens, dev, batch_tokens)
        bar = progress_bar(stream.segs.n_blocks, "teal greedy", progress)
        for i in range(stream.segs.n_blocks):
            points.append(_teal_block(model, stream, i, names, natural, sorted_vals, step, max_sparsity,
                                      last_fraction, max_level))
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
    return torch.linalg.vector_norm((y[:, start:] - ref[:, start:]).double(), dim=1).mean(-1)


def _teal_block(model, stream, i, names, natural, sorted_vals, step, max_sparsity, last_fraction, max_level):
    """One block's greedy path, from the dense model's input to the block (TEAL's ``process_layer``)."""
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
        while pts[-1][0] < max_sparsity:
            cand = [n for n in blk if level[n] + delta[n] <= max_level + 1e-9]
            if not cand:
                break
            new_t = {n: q(n, level[n] + delta[n]) for n in cand}
            K = len(cand)
            err = torch.zeros(K, dtype=torch.float64)
            for h, r in zip(stream.h, ref):
                mb = h.shape[0]
                for n, s in zip(blk, sites):
                    tv = torch.tensor([new_t[n] if c == n else thr[n] for c in cand], device=dev)
                    set_raw_threshold(s, tv.repeat_interleave(mb).view(K * mb, 1, 1))
                y = run_segments(model, _rep(h, K), a, b)
                err += teal_error(y, r.repeat(K, 1, 1), last_fraction).view(K, mb).sum(1).cpu()
            best = cand[int(torch.argmin(err))]  # the first of equal errors, as TEAL's strict '<'
            level[best] += delta[best]
            thr[best] = new_t[best]
            set_all(thr)
            pts.append((sum(w[n] * level[n] for n in blk), dict(thr)))
    finally:  # TEAL: every block is calibrated on the dense model's input
        set_all({n: 0.0 for n in blk})
    return pts


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
