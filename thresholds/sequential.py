"""Sequential initialization (ours): sites are calibrated one by one in model order, each keeping
the largest candidate threshold its share of a global loss budget allows, with every earlier
site's threshold already on. Only forward passes. (The authors' procedure, which shares the
idea but not the rules, is :mod:`thresholds.paper`.)

The rules:
    ``tolerance`` is a *global budget*: the total relative increase of the calibration loss over
    the dense model that the whole schedule may cost. After site ``k`` (of ``N``, in model order)
    the loss must satisfy ``loss <= dense_loss * (1 + tolerance * share_k)``, where ``share_k``
    is the cumulative share of the budget of sites ``1..k``: proportional to the site's MACs
    (``share="macs"``, default: the wide FFN sites, which hold most of the work, get most of the
    budget) or equal (``share="equal"``: ``k / N``). The reference is always the dense loss, so
    nothing compounds, the final calibration loss is at most ``dense_loss * (1 + tolerance)``,
    and budget a site leaves unused (because of the candidate grid) carries over to the next.
    Candidates (10% steps up to 90%, then 95% and 98%: ``LEVELS``) are quantiles of the site's
    activations that are *not already zero*, so the squared-ReLU site, mostly zeros, still gets
    a full grid; the scan tolerates one rejected candidate before stopping (``patience=2``: a
    single noisy bump of the loss curve does not end it); with ``per_channel=True`` each channel gets its own threshold (the per-channel
    quantile at the level), which spreads the silencing evenly over channels.

    How far each site goes inside the budget (``rule``):

    * ``"slope"`` (default): equal marginal cost. A candidate is accepted only while the loss it
      adds over the site's last accepted candidate, per unit of MAC share it silences, stays under
      ``lambda_k = kappa * R_k / M_k``, where ``R_k`` is the loss budget left when the site is
      reached and ``M_k`` the MAC share the remaining sites could still silence: a site whose loss
      rises steeply stops early and leaves its budget to later sites, a cheap one goes far. The
      rate adapts as the calibration proceeds (budget left unspent raises ``lambda`` for the
      sites after), and the whole schedule stays within ``dense_loss * (1 + tolerance)``.
      Candidates are scanned in order (``search="scan"``).
    * ``"share"``: every site may raise the loss up to its cumulative budget share (below): the
      simplest reading of "as far as the loss allows". It over-spends on sites whose loss curve is
      steep.

    Where the scan starts (``floor``, with ``rule="slope"``): ``"auto"`` (default) first puts
    every site at one uniform quantile level, the highest whose loss uses ``floor_share`` (half)
    of the budget, and the scan then raises each site from there: the cheap, evenly spread
    silencing that uniform thresholds get right comes first, and the budget left goes where it
    buys the most. A level in ``[0, 1)`` fixes the start; ``0`` starts from dense.

    What the loss is (``objective``):

    * ``"kl"`` (default): the dense model's calibration NLL plus the KL divergence of the
      thresholded model's next-token distribution from the dense model's, per token. It has the
      scale of the NLL (its expectation over the data is the NLL increase of a well-calibrated
      model) but no noise from which token happened to come next, so the many comparisons of the
      scan select less noise;
    * ``"nll"`` (the authors'): the calibration cross entropy of the targets.

The defaults were chosen on the development split (``experiments/sequential_variants.py``:
calibration on the start of ``calib.txt``, scores on its last 32,768 tokens, never on
``eval.txt``; README, "Threshold algorithms at matched sparsity"): ``kl`` and the ``auto`` floor
were kept (``nll`` lost by 8.7 standard errors; no floor tied), and ``kappa`` went from 8 to 16,
which beat 8 by 4.5 standard errors (16 was the largest value tried).

``tolerance <= 0`` returns all-zero thresholds (no candidate may raise the loss, and a
candidate that lowers it on the calibration set is noise, not a reason to threshold).

Cost: the residual stream at the input of the segment (half block) being calibrated is cached,
so a candidate only runs the remaining segments and the head. The work per site is therefore
proportional to the remaining depth, and a full calibration costs ``O(L^2)`` segment passes per
candidate level (about half of rerunning the whole model for every candidate): calibration
time grows roughly quadratically with depth (``benchmarks/calibration_scaling.py`` measures it).
``candidate_batch`` candidates share one batched forward (worth it on GPU; on CPU the default 1
lets the scan stop as soon as a candidate is rejected).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from thresholds._core import (MAX_LEVEL, Stream, block_sites, build_schedule, calibrating, dense_capture, mac_weights,
                              progress_bar, quantiles_per_channel, quantiles_per_token, quantiles_pooled, solve_level,
                              sorted_values, _sorted_quantile)
from thresholds.schedule import Schedule

__all__ = ["sequential", "resolve_settings", "shrink_toward_uniform", "FINE_LEVELS", "LEVELS", "SHRINK_GRID"]

DEFAULT_MARGIN = 1.0                                                        # z of the noise guard (ours)
FINE_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.98,)    # 5%, ..., 95%, 98%
# The default grid: 10% steps, then 95% and 98%. On rwkv_pd12's development split (16 x 128 calibration
# tokens, experiments/results/sequential_variants_pd12_16) it beat the 5% grid by 8.4 paired SEs, with fewer
# candidates (the main command's calibration: 405 against 597); coarser steps spend less budget on noise.
LEVELS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + (0.95, 0.98)
SHRINK_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)                                   # lambdas tried by shrink="auto"


def sequential(model, calib_tokens: torch.Tensor, *, tolerance: float = 0.02,
               levels: Sequence[float] = LEVELS, per_channel: bool = False, share: str = "macs",
               include_head: bool = False, search: str | None = None, scan: str = "first_failure",
               patience: int = 2, margin: float = DEFAULT_MARGIN, quantiles: str = "nonzero",
               horizon: int | None = None, rule: str = "slope", kappa: float = 16.0,
               objective: str = "kl", floor: float | str | None = None, floor_share: float = 0.5,
               batch_tokens: int = 8192, candidate_batch: int | None = None, max_rows: int = 8192,
               shrink: float | str | None = None, seed: int = 0, device=None, progress: bool = True,
               model_name: str | None = None, calib_description: str = "", algorithm: str | None = None) -> Schedule:
    """Calibrate every site in model order; returns a :class:`Schedule` (see the module doc).

    ``calib_tokens``: ``[N, T]`` token ids. ``tolerance``: the global relative budget of the
    calibration loss. ``levels``: candidate quantile levels (increasing). ``quantiles``: how
    levels become thresholds: ``"nonzero"`` (pooled over the site's non-zero values), ``"pooled"``
    or ``"per_token"`` (the authors' way).

    ``search`` (with ``rule="share"``; ``"slope"`` always scans): ``"scan"`` visits candidates
    from least to most sparse; ``"bisect"`` (the default for ``"share"``) finds the sparsest
    admissible candidate by bisection over the levels, assuming the loss grows with the level:
    about ``log2(levels)`` evaluations per site (with ``candidate_batch = g``, ``g`` levels are
    probed per batched forward). ``scan``: ``"first_failure"`` stops after ``patience``
    consecutive rejected candidates, ``"all"`` evaluates every candidate; either way the sparsest
    admissible candidate seen is kept.

    ``margin``: a guard against selecting on noise. A candidate is admissible only if its loss
    *plus* ``margin`` standard errors of its increment (the per-sequence change of the loss
    against the current schedule, over the calibration sequences) is within the limit. Without
    it every site keeps the candidate whose loss happened to come out lowest on the calibration
    set, and on a small set those lucky draws add up to a held-out loss above the calibration loss.

    ``horizon``: ``None`` (default) measures every candidate's loss exactly, running all the
    remaining segments: ``O(L^2)`` segment passes in all. An integer ``H`` makes the cost linear
    in depth: a candidate runs only the ``H`` segments after its site, and its perturbation of
    the residual stream there is added to the cached residual at the head of the current
    schedule (a first-order estimate that ignores how later layers react). The accepted
    perturbation is folded into that cache, the final schedule's calibration loss is measured
    exactly, and ``summary["loss"]`` reports it (it may exceed the budget slightly).

    ``floor`` (``rule="slope"``): ``None`` means ``"auto"`` (see the module doc); ``0`` starts from dense.

    ``shrink``: shrink the per-site allocation toward uniform thresholds at the same MAC-weighted
    sparsity. With ``s_i`` the sparsity the schedule gives site ``i`` and ``u_i = max(u, natural_i)``
    what the one uniform level ``u`` of equal MAC-weighted sparsity gives it, site ``i`` gets
    sparsity ``u_i + lambda * (s_i - u_i)`` (plus one common shift that keeps the predicted
    MAC-weighted sparsity; thresholds are quantiles of the site's dense ``|x|``, as uniform's, one
    scalar per site). ``None`` (default) or ``1``: the sequential allocation as is; a float in
    ``[0, 1)``: that ``lambda``; ``"auto"``: ``lambda`` chosen by two-fold cross-fitting on the
    calibration sequences: the method runs with the same budget on each half, and the ``lambda``
    in ``SHRINK_GRID`` whose blend has the lowest loss (the ``objective``) on the *other* half,
    averaged over both folds, is applied to the full-data schedule (``1`` keeps it unchanged).
    It costs two extra calibrations on half the data.
    """
    kw = dict(tolerance=tolerance, levels=levels, per_channel=per_channel, share=share, include_head=include_head,
              search=search, scan=scan, patience=patience, margin=margin, quantiles=quantiles, horizon=horizon,
              rule=rule, kappa=kappa, objective=objective, floor=floor, floor_share=floor_share, max_rows=max_rows,
              shrink=shrink, seed=seed)
    p = resolve_settings(kw)
    run = dict(batch_tokens=batch_tokens, candidate_batch=candidate_batch, device=device, model_name=model_name,
               calib_description=calib_description, algorithm=algorithm or "sequential")
    if p["shrink"] is not None:
        return _shrunk(model, calib_tokens, p, run, progress)
    return _calibrate(model, calib_tokens, p, run, progress)


def resolve_settings(kw: dict) -> dict:
    """The settings that decide the schedule, checked, with every default resolved (``search`` and
    ``floor`` depend on ``rule``). ``sequential`` records them as ``params`` and the cache keys on them."""
    p = dict(kw)
    p["tolerance"] = float(p["tolerance"])
    if not p["tolerance"] >= 0:  # NaN or negative
        raise ValueError(f"tolerance must be >= 0, got {p['tolerance']}")
    p["levels"] = [float(q) for q in p["levels"]]
    if not p["levels"] or any(not 0 < q < 1 for q in p["levels"]) or p["levels"] != sorted(p["levels"]):
        raise ValueError(f"levels must be increasing and inside (0, 1), got {p['levels']}")
    for name, allowed in (("rule", ("share", "slope")), ("share", ("macs", "equal")), ("scan", ("first_failure", "all")),
                          ("quantiles", ("nonzero", "pooled", "per_token")), ("objective", ("kl", "nll"))):
        if p[name] not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {p[name]!r}")
    p["patience"], p["margin"], p["kappa"] = int(p["patience"]), float(p["margin"]), float(p["kappa"])
    if p["patience"] < 1 or not p["margin"] >= 0:
        raise ValueError(f"patience must be >= 1 and margin >= 0, got {p['patience']} and {p['margin']}")
    if p["horizon"] is not None and int(p["horizon"]) < 1:
        raise ValueError(f"horizon must be a positive number of segments or None, got {p['horizon']}")
    if p["rule"] == "slope":
        p["search"] = "scan"  # the slope is measured between consecutive accepted candidates
        p["floor"] = "auto" if p["floor"] is None else p["floor"]
        if p["floor"] != "auto" and not 0 <= float(p["floor"]) < 1:
            raise ValueError(f"floor must be None, 'auto' or a level in [0, 1), got {p['floor']!r}")
        p["floor"] = p["floor"] if p["floor"] == "auto" else float(p["floor"])
    else:
        if p["floor"] not in (None, 0, 0.0):
            raise ValueError("floor needs rule='slope'")
        p["floor"], p["search"] = 0.0, p["search"] or "bisect"
        if p["search"] not in ("scan", "bisect"):
            raise ValueError(f"search must be 'scan' or 'bisect', got {p['search']!r}")
    shrink = p["shrink"]
    if shrink is not None and not (shrink == "auto" or (isinstance(shrink, (int, float)) and 0 <= float(shrink) <= 1)):
        raise ValueError(f"shrink must be None, 'auto' or a lambda in [0, 1], got {shrink!r}")
    return p


def _candidates(absx: torch.Tensor, natural: float, p: dict, t_floor: float) -> tuple[list, list[float]]:
    """Candidate thresholds of a site from a sample of its ``|x|`` and the levels they stand for,
    least sparse first; those that silence nothing, repeat the previous one or fall below the
    site's floor threshold are dropped."""
    levels = p["levels"]
    if p["per_channel"]:
        cands = quantiles_per_channel(absx, levels)
    elif p["quantiles"] == "per_token":
        cands = [torch.tensor(v) for v in quantiles_per_token(absx, levels)]
    else:
        cands = [torch.tensor(v) for v in quantiles_pooled(absx, levels, over_nonzero=p["quantiles"] == "nonzero")]
    keep, lv, prev = [], [], None
    for q, c in zip(levels, cands):
        if float(c.max()) <= 0 or (prev is not None and torch.equal(c, prev)) or float(c.mean()) <= t_floor:
            continue
        keep.append(c)
        lv.append(q)
        prev = c
    return keep, lv


class _Budget:
    """Where the calibration stands: the dense and current loss, each sequence's current loss, and
    (rule ``slope``) what every site can still silence."""

    def __init__(self, dense: float, rows: torch.Tensor, n_targets: int):
        self.dense = self.current = dense
        self.rows = rows
        self.n_seq = rows.numel()
        self.per_seq = n_targets / self.n_seq  # predicted tokens per sequence
        self.cum = 0.0
        self.saveable: dict[str, float] = {}
        self.wmac: dict[str, float] = {}


def _calibrate(model, calib_tokens, p: dict, run: dict, progress: bool) -> Schedule:
    t0 = time.perf_counter()
    names = block_sites(model, p["include_head"])
    weights = mac_weights(model, names) if p["share"] == "macs" else {n: 1.0 / len(names) for n in names}
    trace: list[dict[str, Any]] = []
    chosen: dict[str, Any] = {}
    with calibrating(model, run["device"]) as dev:
        group = run["candidate_batch"] or (1 if dev.type == "cpu" else 8)
        stream = Stream(model, calib_tokens, dev, run["batch_tokens"], horizon=p["horizon"], objective=p["objective"])
        dense, rows = stream.loss(rows=True)
        b = _Budget(dense, rows, stream.n_targets)
        t_floor = _start(model, stream, names, p, b)
        bar = progress_bar(len(names), "sequential", progress)
        for k, name in enumerate(names):
            b.cum += weights[name]
            stream.advance_to(stream.segs.segment_of(name))
            entry = dict(site=name, level=0.0, loss=b.current, evaluated=0)
            if p["tolerance"] > 0:
                _site(model, stream, name, k, names, p, b, t_floor.get(name, 0.0), group, entry, chosen)
            trace.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{b.current:.4f}", dense=f"{dense:.4f}")
        bar.close()
        thresholds = {n: chosen.get(n, torch.tensor(float(t_floor.get(n, 0.0)))) for n in model.sites}
        return build_schedule(model, calib_tokens, thresholds, algorithm=run["algorithm"], params=p,
                              calib_description=run["calib_description"], t0=t0, device=dev,
                              model_name=run["model_name"], batch_tokens=run["batch_tokens"], dense=dense,
                              extra={"trace": trace, "search_loss": b.current})


def _start(model, stream, names, p: dict, b: _Budget) -> dict[str, float]:
    """Rule ``slope``: the dense model's natural zeros (what each site can still save) and the
    uniform floor set on the model; returns the floor's thresholds."""
    if p["rule"] != "slope":
        return {}
    caps0 = stream.capture(names, max_values=1 << 16, run_all=True)
    nat0 = {n: c.natural for n, c in caps0.items()}
    b.wmac = mac_weights(model, names)
    level0, t_floor = 0.0, {}
    if p["floor"] not in (0.0,) and p["tolerance"] > 0:
        level0, t_floor = _floor(model, stream, names, caps0, p["floor"], b.dense, p["tolerance"] * p["floor_share"])
        b.current, b.rows = stream.loss(rows=True)
    b.saveable = {n: b.wmac[n] * (1 - max(nat0[n], level0)) for n in names}
    return t_floor


def _site(model, stream, name, k, names, p, b: _Budget, tf: float, group: int, entry: dict, chosen: dict) -> None:
    """Calibrate one site: its candidates, the scan (or bisection), and the candidate kept."""
    site = model.sites[name]
    cap = stream.capture([name], max_rows=p["max_rows"], seed=p["seed"] + k)[name]
    absx = cap.values
    keep, lv = _candidates(absx, cap.natural, p, tf)
    nz = absx[absx != 0]
    state = {"ref": b.current, "ref_level": float((nz < tf).float().mean()) if tf > 0 and nz.numel() else 0.0,
             "best": None, "best_loss": None, "misses": 0}
    admissible = _admissible_rule(p, b, name, names, k, cap, lv, state)
    rows: dict[int, torch.Tensor] = {}
    losses_seen: dict[int, float] = {}

    def stop(j: int, loss: float) -> bool:
        losses_seen[j] = loss
        if admissible(j, loss, rows[j]):
            state["best"], state["best_loss"], state["misses"] = j, loss, 0
            if p["rule"] == "slope":
                state["ref"], state["ref_level"] = loss, lv[j]
            return False
        state["misses"] += 1
        return p["scan"] == "first_failure" and state["misses"] >= p["patience"]

    if p["search"] == "scan":
        losses = stream.iter_candidate_losses(site, keep, group, stop, rows=rows)
    else:
        losses = _bisect(stream, site, keep, group, lambda j: admissible(j, losses_seen[j], rows[j]), rows, losses_seen)
        ok = [j for j in losses if admissible(j, losses[j], rows[j])]
        if ok:
            state["best"] = max(ok)
            state["best_loss"] = losses[state["best"]]
    entry.update(evaluated=len(losses), natural=cap.natural, limit=b.dense * (1 + p["tolerance"] * b.cum))
    if state["best"] is not None:
        j = state["best"]
        site.threshold = keep[j].to(stream.device, torch.float32)
        stream.commit(site)
        chosen[name] = keep[j]
        b.current, b.rows = state["best_loss"], rows[j]
        entry.update(level=lv[j], loss=b.current, threshold=float(keep[j].mean()) if keep[j].ndim else float(keep[j]))


def _admissible_rule(p, b: _Budget, name, names, k, cap, lv, state):
    """``admissible(j, loss, rows)``: whether candidate ``j`` (of loss ``loss``, per-sequence
    losses ``rows``) may be kept under the budget rule, with the noise guard of ``margin``."""
    limit = b.dense * (1 + p["tolerance"] * b.cum)
    cap_all = b.dense * (1 + p["tolerance"])
    lam = w_site = 0.0
    if p["rule"] == "slope":
        # the loss per unit of MAC share the rest of the model can afford, on average
        rest = sum(b.saveable[n] for n in names[k:])
        # a calibration loss below dense is noise, not budget: it is not credited
        lam = p["kappa"] * max(cap_all - max(b.current, b.dense), 0.0) / max(rest, 1e-12)
        # MAC share silenced per unit of level (levels over non-zero values leave the zeros out)
        w_site = b.wmac[name] * ((1 - cap.natural) if p["quantiles"] == "nonzero" else 1.0)

    def admissible(j: int, loss: float, rows: torch.Tensor) -> bool:
        if p["margin"] > 0 and b.n_seq > 1:  # standard error of this site's increment, over sequences
            loss += p["margin"] * float(((rows - b.rows) / b.per_seq).std()) / b.n_seq ** 0.5
        if p["rule"] == "slope":
            saved = w_site * (lv[j] - state["ref_level"])
            # the noise guard applies to the slope too: an increment must be small with margin
            return loss <= cap_all and (loss - state["ref"]) <= lam * max(saved, 1e-12)
        return loss <= limit
    return admissible


def _floor(model, stream, names, caps, floor, dense: float, budget: float) -> tuple[float, dict[str, float]]:
    """A uniform starting level for every site (pooled quantile of its dense ``|x|``, zeros
    included), set on the model: ``floor`` itself, or with ``"auto"`` the highest level (by
    bisection) whose loss stays within ``dense * (1 + budget)``. Returns (level, thresholds)."""
    sorted_vals = {n: sorted_values(caps[n].values.reshape(-1)) for n in names}

    def at(level):
        from thresholds._core import _sorted_quantile
        return {n: float(_sorted_quantile(sorted_vals[n], torch.tensor([level]))[0]) if level > 0 else 0.0
                for n in names}

    def apply(th):
        for n, t in th.items():
            model.sites[n].threshold = torch.tensor(t, device=model.sites[n].threshold.device)

    if floor != "auto":
        th = at(float(floor))
        apply(th)
        return float(floor), th
    lo, hi, best = 0.0, 0.95, {n: 0.0 for n in names}
    for _ in range(7):
        mid = (lo + hi) / 2
        th = at(mid)
        apply(th)
        if stream.loss() <= dense * (1 + budget):
            lo, best = mid, th
        else:
            hi = mid
    apply(best)
    return lo, best


def _bisect(stream, site, cands, group, admissible, rows, losses) -> dict[int, float]:
    """Losses of the candidates probed while bisecting for the largest admissible index
    (``group`` evenly spaced probes per round, one batched forward each)."""
    lo, hi = -1, len(cands)  # invariant (if admissibility is monotone): lo admissible (or -1), hi not (or end)
    while hi - lo > 1:
        n = min(group, hi - lo - 1)
        probes = sorted({lo + max(1, round((i + 1) * (hi - lo) / (n + 1))) for i in range(n)})
        probes = [j for j in probes if lo < j < hi]
        local: dict[int, torch.Tensor] = {}
        res = stream.candidate_losses(site, [cands[j] for j in probes], len(probes), rows=local)
        rows.update({j: local[i] for i, j in enumerate(probes)})
        losses.update(zip(probes, res))
        ok = [j for j in probes if admissible(j)]
        if ok:
            lo = max(ok)
        bad = [j for j in probes if j > lo and not admissible(j)]
        hi = min(bad) if bad else hi
    return losses


# ------------------------------------------------------------------------------------------
# Shrinking the allocation toward uniform (``shrink``)
# ------------------------------------------------------------------------------------------

def shrink_toward_uniform(model, calib_tokens, sched: Schedule, lam: float, *, include_head: bool = False,
                          device=None, batch_tokens: int = 8192, max_values: int = 1 << 19,
                          seed: int = 0) -> dict[str, float]:
    """Thresholds that move ``sched``'s per-site sparsity a fraction ``lam`` of the way from uniform
    (``lam = 0``: the uniform level of equal MAC-weighted sparsity; ``1``: ``sched``'s own
    allocation, re-derived from dense quantiles). See ``shrink`` in :func:`sequential`."""
    lam = float(lam)
    if not 0 <= lam <= 1:
        raise ValueError(f"shrink lambda must be in [0, 1], got {lam}")
    names = block_sites(model, include_head)
    w = mac_weights(model, names)
    with calibrating(model, device) as dev:
        caps = dense_capture(model, calib_tokens, dev, names, batch_tokens, max_values, seed)
    nat = {n: caps[n].natural for n in names}
    s = {n: float(sched.sparsity[n]["sparsity"]) for n in names}
    target = sum(w[n] * s[n] for n in names)
    u = solve_level(w, nat, target)
    raw = {n: max(u, nat[n]) + lam * (s[n] - max(u, nat[n])) for n in names}

    def level(n, c):
        return min(max(nat[n], raw[n] + c), MAX_LEVEL)

    lo, hi = -1.0, 1.0  # one common shift keeps the predicted MAC-weighted sparsity at the target
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(w[n] * level(n, mid) for n in names) < target else (lo, mid)
    out = {}
    for n in names:
        q = level(n, (lo + hi) / 2)
        v = sorted_values(caps[n].values.reshape(-1))
        out[n] = float(_sorted_quantile(v, torch.tensor([q]))[0]) if q > nat[n] + 1e-9 else 0.0
    return out


def _objective_loss(model, tokens, thresholds, objective: str, device, batch_tokens: int) -> float:
    """Mean per-token loss of ``tokens`` under ``thresholds``: NLL, or dense NLL + KL from dense."""
    with calibrating(model, device) as dev:
        st = Stream(model, tokens, dev, batch_tokens, objective=objective)
        st.loss()  # the dense model first (the KL reference)
        model.set_thresholds({n: torch.as_tensor(t, dtype=torch.float32) for n, t in thresholds.items()})
        return st.loss()


def _shrunk(model, calib_tokens, p: dict, run: dict, progress: bool) -> Schedule:
    """``sequential(..., shrink=...)``: the schedule of settings ``p`` shrunk toward uniform."""
    t0 = time.perf_counter()
    shrink = p["shrink"]
    dev_kw = dict(include_head=p["include_head"], device=run["device"], batch_tokens=run["batch_tokens"])
    base = _calibrate(model, calib_tokens, p, run, progress)
    info: dict[str, Any] = {"mode": shrink}
    n = calib_tokens.shape[0]
    if shrink == "auto" and n < 4:
        lam, info["note"] = 1.0, f"{n} calibration sequences: too few to cross-fit, allocation kept"
    elif shrink == "auto":
        halves = (calib_tokens[: n // 2], calib_tokens[n // 2:])
        cv = {lam: 0.0 for lam in SHRINK_GRID}
        fit_run = {**run, "calib_description": f"shrink cross-fit half of: {run['calib_description']}"}
        for fit, val in (halves, halves[::-1]):
            s = _calibrate(model, fit, p, fit_run, False)
            for lam in SHRINK_GRID:
                th = s.thresholds if lam == 1 else shrink_toward_uniform(model, fit, s, lam, **dev_kw)
                cv[lam] += _objective_loss(model, val, th, p["objective"], run["device"], run["batch_tokens"]) / 2
        lam = min(reversed(SHRINK_GRID), key=lambda l: cv[l])  # ties keep the larger lambda
        info["cv_loss"] = {str(l): v for l, v in cv.items()}
    else:
        lam = float(shrink)
    info["lambda"] = lam
    if lam == 1:
        return base.replace(cost_s=time.perf_counter() - t0, extra={**dict(base.extra), "shrink": info})
    th = shrink_toward_uniform(model, calib_tokens, base, lam, **dev_kw)
    with calibrating(model, run["device"]) as dev:
        return build_schedule(model, calib_tokens, th, algorithm=run["algorithm"], params=p,
                              calib_description=run["calib_description"], t0=t0, device=dev,
                              model_name=run["model_name"], batch_tokens=run["batch_tokens"],
                              extra={"trace": base.extra.get("trace"), "shrink": info,
                                     "unshrunk_sparsity_mac_weighted": base.sparsity_mac_weighted})
