"""Sequential initialization: sites are calibrated one by one in model order, each keeping the
largest candidate threshold whose calibration loss stays within a tolerance, with every
earlier site's threshold already on. Only forward passes.

Two variants share the search machinery:

``variant="paper"`` -- the authors' procedure, reproduced faithfully (Knunyants et al. 2025):
    one scalar threshold per site; candidates are the 10%, 20%, ..., 90% quantiles of ``|x|``
    at the site (for each token across channels, averaged over tokens); sites visited block 0
    to the last, inside a block att.key, att.receptance, att.value, att.output, ffn.receptance,
    ffn.key, ffn.value; candidates scanned from least to most sparse and accepted while
    ``loss / current_loss <= 1 + tolerance``; after each acceptance the current loss becomes the
    reference, so the allowed increase compounds over candidates and sites (the authors use
    ``tolerance = 5e-4``, i.e. a ratio of 1.0005). The scan stops at the first rejection.
    (Our reading of "accepted while": the scan ends at the first rejected candidate; the last
    accepted one is kept.)

``variant="budget"`` (default) -- ours:
    ``tolerance`` is a *global budget*: the total relative increase of the calibration loss over
    the dense model that the whole schedule may cost. After site ``k`` (of ``N``, in model order)
    the loss must satisfy ``loss <= dense_loss * (1 + tolerance * share_k)``, where ``share_k``
    is the cumulative share of the budget of sites ``1..k``: proportional to the site's MACs
    (``share="macs"``, default: the wide FFN sites, which hold most of the work, get most of the
    budget) or equal (``share="equal"``: ``k / N``). The reference is always the dense loss, so
    nothing compounds, the final calibration loss is at most ``dense_loss * (1 + tolerance)``,
    and budget a site leaves unused (because of the candidate grid) carries over to the next.
    Candidates are finer (5% steps up to 95%, then 98%) and are quantiles of the site's
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
      Candidates are scanned in order (``search="scan"``). With the KL objective and the
      uniform start below, on ``rwkv_tiny`` it beats uniform, TEAL- and CATS-style thresholds
      clearly at 63% sparsity; on all of ``eval.txt`` (101k tokens) it ties uniform at 40%
      (held-out log-perplexity difference -0.1e-3 +- 0.4e-3) and beats it at 50% (-3.5e-3 +- 1.0e-3)
      and CATS-style at both (``experiments/compare_thresholds.py``; the first 8,192 tokens alone
      are too few to tell these apart).
    * ``"share"``: every site may raise the loss up to its cumulative budget share (below): the
      simplest reading of "as far as the loss allows", and the one the authors' procedure follows
      with its per-acceptance tolerance. It over-spends on sites whose loss curve is steep.

    Where the scan starts (``floor``, with ``rule="slope"``): ``"auto"`` (default) first puts
    every site at one uniform quantile level, the highest whose loss uses ``floor_share`` (half)
    of the budget, and the scan then raises each site from there: the cheap, evenly spread
    silencing that uniform thresholds get right comes first, and the budget left goes where it
    buys the most. A level in ``[0, 1)`` fixes the start; ``0`` starts from dense. On
    ``rwkv_tiny`` it lowered the held-out cost at ~55% sparsity from +1.69% to +1.46%
    (``experiments/results/sequential_variants_floor/``).

    What the loss is (``objective``):

    * ``"kl"`` (default of ``budget``): the dense model's calibration NLL plus the KL divergence
      of the thresholded model's next-token distribution from the dense model's, per token. It
      has the scale of the NLL (its expectation over the data is the NLL increase of a
      well-calibrated model) but no noise from which token happened to come next, so the many
      comparisons of the scan select far less noise: on ``rwkv_tiny`` the held-out perplexity
      increase at ~55% sparsity fell from +6.4% (``nll``) to +2.8%
      (``experiments/results/sequential_variants/``);
    * ``"nll"`` (the authors'): the calibration cross entropy of the targets.

Both: ``tolerance <= 0`` returns all-zero thresholds (no candidate may raise the loss, and a
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

from thresholds._core import (Stream, block_sites, build_schedule, calibrating, mac_weights, progress_bar,
                              quantiles_per_channel, quantiles_per_token, quantiles_pooled, solve_level,
                              _sorted_quantile)
from thresholds.schedule import Schedule

__all__ = ["sequential", "shrink_toward_uniform", "PAPER_LEVELS", "FINE_LEVELS", "PAPER_TOLERANCE", "SHRINK_GRID"]

PAPER_LEVELS = tuple(round(0.1 * i, 2) for i in range(1, 10))             # 10%, ..., 90%
DEFAULT_MARGIN = 1.0                                                        # z of the noise guard (ours)
FINE_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.98,)    # 5%, ..., 95%, 98%
PAPER_TOLERANCE = 5e-4                                                      # ratio 1.0005 (RWKV)
SHRINK_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)                                   # lambdas tried by shrink="auto"


def sequential(model, calib_tokens: torch.Tensor, *, tolerance: float | None = None, variant: str = "budget",
               levels: Sequence[float] | None = None, per_channel: bool = False, share: str = "macs",
               include_head: bool = False, search: str | None = None, scan: str = "first_failure",
               patience: int | None = None, margin: float | None = None, quantiles: str | None = None,
               horizon: int | None = None, rule: str | None = None, kappa: float = 8.0,
               objective: str | None = None, floor: float | str | None = None, floor_share: float = 0.5,
               batch_tokens: int = 8192, candidate_batch: int | None = None, max_rows: int = 8192,
               shrink: float | str | None = None, seed: int = 0, device=None, progress: bool = True,
               model_name: str | None = None, calib_description: str = "", algorithm: str | None = None) -> Schedule:
    """Calibrate every site in model order; returns a :class:`Schedule` (see the module doc).

    ``calib_tokens``: ``[N, T]`` token ids. ``tolerance``: per-acceptance relative loss increase
    (``variant="paper"``, default 5e-4) or the global relative budget (``variant="budget"``,
    default 0.02). ``levels``: candidate quantile levels (increasing). ``quantiles``: how levels
    become thresholds: ``"per_token"`` (the authors'), ``"pooled"`` or ``"nonzero"`` (pooled over
    non-zero values; ours).

    ``search``: ``"scan"`` visits candidates from least to most sparse (the authors' way, and the
    only one their compounding reference allows; the default of ``variant="paper"``);
    ``"bisect"`` (default of ``variant="budget"``) finds the sparsest admissible candidate by
    bisection over the levels, assuming the loss grows with the level: about ``log2(levels)``
    evaluations per site instead of one per level up to the first failure (with
    ``candidate_batch = g``, ``g`` levels are probed per batched forward).
    ``scan`` (for ``search="scan"``): ``"first_failure"`` stops after ``patience`` consecutive
    rejected candidates (the authors' rule: ``patience=1``), ``"all"`` evaluates every candidate;
    either way the sparsest admissible candidate seen is kept.

    ``margin``: a guard against selecting on noise. A candidate is admissible only if its loss
    *plus* ``margin`` standard errors of its increment (the per-sequence change of the loss
    against the current schedule, over the calibration sequences) is within the limit. Without
    it (``margin=0``, the authors' rule) every site keeps the candidate whose loss happened to
    come out lowest on the calibration set, and on a small set those lucky draws add up to a
    held-out loss above the calibration loss. Default 1.0 for ``budget``, 0 for ``paper``.

    ``horizon``: ``None`` (default) measures every candidate's loss exactly, running all the
    remaining segments: ``O(L^2)`` segment passes in all. An integer ``H`` makes the cost linear
    in depth: a candidate runs only the ``H`` segments after its site, and its perturbation of
    the residual stream there is added to the cached residual at the head of the current
    schedule (a first-order estimate that ignores how later layers react). The accepted
    perturbation is folded into that cache, the final schedule's calibration loss is measured
    exactly, and ``summary["loss"]`` reports it (it may exceed the budget slightly).

    ``shrink`` (``variant="budget"`` only): shrink the per-site allocation toward uniform
    thresholds at the same MAC-weighted sparsity. With ``s_i`` the sparsity the schedule gives
    site ``i`` and ``u_i = max(u, natural_i)`` what the one uniform level ``u`` of equal
    MAC-weighted sparsity gives it, site ``i`` gets sparsity ``u_i + lambda * (s_i - u_i)``
    (plus one common shift that keeps the predicted MAC-weighted sparsity; thresholds are
    quantiles of the site's dense ``|x|``, as uniform's, one scalar per site). ``None`` (default)
    or ``1``: the sequential allocation as is; a float in ``[0, 1)``: that ``lambda``;
    ``"auto"``: ``lambda`` chosen by two-fold cross-fitting on the calibration sequences: the
    method runs with the same budget on each half, and the ``lambda`` in
    ``SHRINK_GRID`` whose blend has the lowest loss (the ``objective``) on the *other* half,
    averaged over both folds, is applied to the full-data schedule (``1`` keeps it unchanged).
    It guards against an allocation fitted to the calibration text: on ``rwkv_tiny`` (256 x 128
    calibration tokens, all of ``eval.txt`` held out) it picked ``lambda = 0.75`` at 40%
    MAC-weighted sparsity (held-out perplexity +0.17% instead of +0.26%; uniform +0.25%) and
    ``1`` at 50%, 63% and the 5% point. It costs two extra calibrations on half the data.
    """
    if shrink is not None:
        kw = dict(tolerance=tolerance, variant=variant, levels=levels, per_channel=per_channel, share=share,
                  include_head=include_head, search=search, scan=scan, patience=patience, margin=margin,
                  quantiles=quantiles, horizon=horizon, rule=rule, kappa=kappa, objective=objective, floor=floor,
                  floor_share=floor_share, batch_tokens=batch_tokens, candidate_batch=candidate_batch,
                  max_rows=max_rows, seed=seed, device=device, model_name=model_name,
                  calib_description=calib_description, algorithm=algorithm)
        return _shrunk(model, calib_tokens, shrink, kw, progress)
    t0 = time.perf_counter()
    if variant not in ("paper", "budget"):
        raise ValueError(f"variant must be 'paper' or 'budget', got {variant!r}")
    if scan not in ("first_failure", "all"):
        raise ValueError(f"scan must be 'first_failure' or 'all', got {scan!r}")
    paper = variant == "paper"
    search = search or ("scan" if paper else "bisect")
    if search not in ("scan", "bisect"):
        raise ValueError(f"search must be 'scan' or 'bisect', got {search!r}")
    if search == "bisect" and paper:
        raise ValueError("the authors' compounding reference needs search='scan'")
    if tolerance is None:
        tolerance = PAPER_TOLERANCE if paper else 0.02
    tolerance = float(tolerance)
    if not tolerance == tolerance or tolerance < 0:  # NaN or negative
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    levels = tuple(float(q) for q in (levels or (PAPER_LEVELS if paper else FINE_LEVELS)))
    if any(not 0 < q < 1 for q in levels) or list(levels) != sorted(levels):
        raise ValueError(f"levels must be increasing and inside (0, 1), got {levels}")
    quantiles = quantiles or ("per_token" if paper else "nonzero")
    patience = int(patience if patience is not None else (1 if paper else 2))
    margin = float(margin if margin is not None else (0.0 if paper else DEFAULT_MARGIN))
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if horizon is not None and int(horizon) < 1:
        raise ValueError(f"horizon must be a positive number of segments or None, got {horizon}")
    if per_channel and paper:
        raise ValueError("the authors' procedure uses one scalar per site; per_channel needs variant='budget'")
    rule = rule or ("share" if paper else "slope")
    objective = objective or ("nll" if paper else "kl")
    if floor is None and rule == "slope":
        floor = "auto"
    if floor in (0, 0.0):
        floor = None
    if floor is not None and floor != "auto" and not 0 <= float(floor) < 1:
        raise ValueError(f"floor must be None, 'auto' or a level in [0, 1), got {floor!r}")
    if floor is not None and rule != "slope":
        raise ValueError("floor needs rule='slope'")
    if rule not in ("share", "slope"):
        raise ValueError(f"rule must be 'share' or 'slope', got {rule!r}")
    if rule == "slope":
        if paper:
            raise ValueError("rule='slope' is a budget rule; it needs variant='budget'")
        search = "scan"  # the slope is measured between consecutive accepted candidates
    if share not in ("macs", "equal"):
        raise ValueError(f"share must be 'macs' or 'equal', got {share!r}")
    params = dict(variant=variant, tolerance=tolerance, levels=list(levels), per_channel=per_channel, share=share,
                  include_head=include_head, search=search, scan=scan, patience=patience, margin=margin, quantiles=quantiles, horizon=horizon, rule=rule, objective=objective,
                  floor=floor, floor_share=floor_share,
                  kappa=kappa,
                  max_rows=max_rows, seed=seed)
    names = block_sites(model, include_head)
    weights = mac_weights(model, names) if share == "macs" else {n: 1.0 / len(names) for n in names}
    trace: list[dict[str, Any]] = []
    chosen: dict[str, Any] = {}

    with calibrating(model, device) as dev:
        group = candidate_batch or (1 if dev.type == "cpu" else 8)
        stream = Stream(model, calib_tokens, dev, batch_tokens, horizon=horizon, objective=objective)
        dense, cur_rows = stream.loss(rows=True)
        n_seq = cur_rows.numel()
        per_seq = stream.n_targets / n_seq  # predicted tokens per sequence
        current = dense
        cum = 0.0
        cap_all = dense * (1 + tolerance)
        t_floor: dict[str, float] = {}
        level0 = 0.0
        if rule == "slope":  # natural zeros of the dense model: what each site can still save
            caps0 = stream.capture(names, max_values=1 << 16, run_all=True)
            nat0 = {n: c.natural for n, c in caps0.items()}
            wmac = mac_weights(model, names)
            if floor is not None:
                level0, t_floor = _floor(model, stream, names, caps0, floor, dense, tolerance * floor_share)
                current, cur_rows = stream.loss(rows=True)
            saveable = {n: wmac[n] * (1 - max(nat0[n], level0)) for n in names}
        bar = progress_bar(len(names), f"sequential[{variant}]", progress)
        for k, name in enumerate(names):
            site = model.sites[name]
            cum += weights[name]
            stream.advance_to(stream.segs.segment_of(name))
            entry = dict(site=name, level=0.0, loss=current, evaluated=0)
            if tolerance > 0:
                cap = stream.capture([name], max_rows=max_rows, seed=seed + k)[name]
                absx = cap.values
                if per_channel:
                    cands = quantiles_per_channel(absx, levels)
                elif quantiles == "per_token":
                    cands = [torch.tensor(v) for v in quantiles_per_token(absx, levels)]
                else:
                    cands = [torch.tensor(v) for v in quantiles_pooled(absx, levels, over_nonzero=quantiles == "nonzero")]
                # drop candidates that silence nothing (0) or repeat the previous one
                keep, lv, prev = [], [], None
                tf = t_floor.get(name, 0.0)
                for q, c in zip(levels, cands):
                    if float(c.max()) <= 0 or (prev is not None and torch.equal(c, prev)) or float(c.mean()) <= tf:
                        continue
                    keep.append(c), lv.append(q)
                    prev = c
                limit = dense * (1 + tolerance * cum)
                nz = absx[absx != 0]
                lvl_floor = float((nz < tf).float().mean()) if tf > 0 and nz.numel() else 0.0
                state = {"ref": current, "ref_level": lvl_floor, "best": None, "best_loss": None, "misses": 0}
                if rule == "slope":
                    # the loss per unit of MAC share the rest of the model can afford, on average
                    rest = sum(saveable[n] for n in names[k:])
                    # a calibration loss below dense is noise, not budget: it is not credited
                    lam = kappa * max(cap_all - max(current, dense), 0.0) / max(rest, 1e-12)
                    # MAC share silenced per unit of level (levels over non-zero values leave the zeros out)
                    w_site = wmac[name] * ((1 - cap.natural) if quantiles == "nonzero" else 1.0)
                rows: dict[int, torch.Tensor] = {}

                def admissible(j: int) -> bool:
                    loss = losses_seen[j]
                    if margin > 0 and n_seq > 1:  # standard error of this site's increment, over sequences
                        loss += margin * float(((rows[j] - cur_rows) / per_seq).std()) / n_seq ** 0.5
                    if rule == "slope":
                        saved = w_site * (lv[j] - state["ref_level"])
                        # the noise guard applies to the slope too: an increment must be small with margin
                        return loss <= cap_all and (loss - state["ref"]) <= lam * max(saved, 1e-12)
                    return loss <= (state["ref"] * (1 + tolerance) if paper else limit)

                losses_seen: dict[int, float] = {}

                def stop(j: int, loss: float) -> bool:
                    losses_seen[j] = loss
                    if admissible(j):
                        state["best"], state["best_loss"], state["misses"] = j, loss, 0
                        if paper:
                            state["ref"] = loss  # the compounding reference
                        if rule == "slope":
                            state["ref"], state["ref_level"] = loss, lv[j]
                        return False
                    state["misses"] += 1
                    return scan == "first_failure" and state["misses"] >= patience

                if search == "scan":
                    losses = stream.iter_candidate_losses(site, keep, group, stop, rows=rows)
                else:
                    losses = _bisect(stream, site, keep, group, admissible, rows, losses_seen)
                    ok = [j for j in losses if admissible(j)]
                    if ok:
                        state["best"] = max(ok)
                        state["best_loss"] = losses[state["best"]]
                entry["evaluated"] = len(losses)
                entry["natural"] = cap.natural
                if not paper:
                    entry["limit"] = limit
                if state["best"] is not None:
                    j = state["best"]
                    site.threshold = keep[j].to(dev, torch.float32)
                    stream.commit(site)
                    chosen[name] = keep[j]
                    current = state["best_loss"]
                    cur_rows = rows[j]
                    entry.update(level=lv[j], loss=current,
                                 threshold=float(keep[j].mean()) if keep[j].ndim else float(keep[j]))
            trace.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{current:.4f}", dense=f"{dense:.4f}")
        bar.close()
        thresholds = {n: chosen.get(n, torch.tensor(float(t_floor.get(n, 0.0)))) for n in model.sites}
        return build_schedule(model, calib_tokens, thresholds, algorithm=algorithm or ("paper" if paper else "sequential"),
                              params=params, calib_description=calib_description, t0=t0, device=dev,
                              model_name=model_name, batch_tokens=batch_tokens, dense=dense,
                              extra={"trace": trace, "search_loss": current})


def _floor(model, stream, names, caps, floor, dense: float, budget: float) -> tuple[float, dict[str, float]]:
    """A uniform starting level for every site (pooled quantile of its dense ``|x|``, zeros
    included), set on the model: ``floor`` itself, or with ``"auto"`` the highest level (by
    bisection) whose loss stays within ``dense * (1 + budget)``. Returns (level, thresholds)."""
    sorted_vals = {n: caps[n].values.reshape(-1).sort().values for n in names}

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
    from thresholds.baselines import MAX_LEVEL, _dense_capture
    lam = float(lam)
    if not 0 <= lam <= 1:
        raise ValueError(f"shrink lambda must be in [0, 1], got {lam}")
    names = block_sites(model, include_head)
    w = mac_weights(model, names)
    with calibrating(model, device) as dev:
        caps = _dense_capture(model, calib_tokens, dev, names, batch_tokens, max_values, seed)
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
        v = caps[n].values.reshape(-1).sort().values
        out[n] = float(_sorted_quantile(v, torch.tensor([q]))[0]) if q > nat[n] + 1e-9 else 0.0
    return out


def _objective_loss(model, tokens, thresholds, objective: str, device, batch_tokens: int) -> float:
    """Mean per-token loss of ``tokens`` under ``thresholds``: NLL, or dense NLL + KL from dense."""
    with calibrating(model, device) as dev:
        st = Stream(model, tokens, dev, batch_tokens, objective=objective)
        st.loss()  # the dense model first (the KL reference)
        model.set_thresholds({n: torch.as_tensor(t, dtype=torch.float32) for n, t in thresholds.items()})
        return st.loss()


def _shrunk(model, calib_tokens, shrink, kw: dict, progress: bool) -> Schedule:
    """``sequential(..., shrink=shrink)``: the schedule of ``kw`` shrunk toward uniform."""
    t0 = time.perf_counter()
    if kw["variant"] != "budget":
        raise ValueError("shrink needs variant='budget'")
    if not (shrink == "auto" or (isinstance(shrink, (int, float)) and 0 <= float(shrink) <= 1)):
        raise ValueError(f"shrink must be None, 'auto' or a lambda in [0, 1], got {shrink!r}")
    objective = kw["objective"] or "kl"
    dev_kw = dict(include_head=kw["include_head"], device=kw["device"], batch_tokens=kw["batch_tokens"])
    base = sequential(model, calib_tokens, progress=progress, **kw)
    info: dict[str, Any] = {"mode": shrink}
    n = calib_tokens.shape[0]
    if shrink == "auto" and n < 4:
        lam, info["note"] = 1.0, f"{n} calibration sequences: too few to cross-fit, allocation kept"
    elif shrink == "auto":
        halves = (calib_tokens[: n // 2], calib_tokens[n // 2:])
        cv = {lam: 0.0 for lam in SHRINK_GRID}
        fit_kw = {**kw, "calib_description": f"shrink cross-fit half of: {kw['calib_description']}"}
        for fit, val in (halves, halves[::-1]):
            s = sequential(model, fit, progress=False, **fit_kw)
            for lam in SHRINK_GRID:
                th = s.thresholds if lam == 1 else shrink_toward_uniform(model, fit, s, lam, **dev_kw)
                cv[lam] += _objective_loss(model, val, th, objective, kw["device"], kw["batch_tokens"]) / 2
        lam = min(reversed(SHRINK_GRID), key=lambda l: cv[l])  # ties keep the larger lambda
        info["cv_loss"] = {str(l): v for l, v in cv.items()}
    else:
        lam = float(shrink)
    info["lambda"] = lam
    params = {**base.params, "shrink": shrink}
    if lam == 1:
        return base.replace(params=params, cost_s=time.perf_counter() - t0,
                            extra={**dict(base.extra), "shrink": info})
    th = shrink_toward_uniform(model, calib_tokens, base, lam, **dev_kw)
    with calibrating(model, kw["device"]) as dev:
        return build_schedule(model, calib_tokens, th, algorithm=kw["algorithm"] or "sequential", params=params,
                              calib_description=kw["calib_description"], t0=t0, device=dev,
                              model_name=kw["model_name"], batch_tokens=kw["batch_tokens"],
                              extra={"trace": base.extra.get("trace"), "shrink": info,
                                     "unshrunk_sparsity_mac_weighted": base.sparsity_mac_weighted})
