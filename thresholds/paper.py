"""The authors' threshold procedure, as published (Knunyants et al. 2025, "Explore Activation
Sparsity in Recurrent LLMs for Energy-Efficient Neuromorphic Computing"; their code:
ERNIS-LAB/LLM-activation-sparsity, ``RWKV-v4neo/experiment.py``, ``find_threshold_val``, run by
``experiment_run_v2.sh`` with ``start_k=0.9`` and ``loss_inc=1.0005``). The facts of that code,
written anew on this project's machinery:

1. Sites in model order: block 0 to the last; inside a block att.key, att.receptance, att.value,
   att.output, ffn.receptance, ffn.key, ffn.value. A site's threshold stays on for later sites.
2. Candidates: at levels 10%, 20%, ..., 90%, the quantile of ``|x|`` across the channels of each
   token, averaged over the calibration tokens, measured with every earlier threshold on and the
   site itself dense.
3. One reference loss per site: every candidate of a site is compared with the loss the previous
   site ended on (the dense loss for the first) and passes iff ``loss / reference < 1 + tolerance``
   (strictly; ``tolerance = 5e-4`` is their 1.0005). The reference moves once the site is done.
4. Where a site's scan starts (:func:`start_index`): at the level kept most often by the earlier
   sites of the same type (``att.key``...), ties to the sparser; at 10% without history.
   From 10%: scan sparser while candidates pass, stop at the first failure. From a higher start
   that passes: keep it and scan sparser the same way. From one that fails: scan denser and
   keep the first that passes.
5. If no candidate passes, the site keeps the least sparse one (the 10% quantile) all the same,
   and the next reference is the unchanged old one (their code returns it with the fallback).
6. Otherwise the next reference is the loss of the kept candidate: a site's allowance is relative
   to where the previous one ended, so the increase compounds over sites.

Three details differ from their code without changing what it computes on equal inputs:
their hardshrink silences ``|x| <= t`` and our sites ``|x| < t`` (the candidates are averages of
quantiles, so a value equal to one is an event of probability zero); their running average of
per-batch means is our mean over tokens when the batches are equal; their loss is the validation
loss averaged over equal batches, ours the mean NLL per predicted token.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from thresholds._core import Stream, block_sites, build_schedule, calibrating, progress_bar, quantiles_per_token
from thresholds.schedule import Schedule

__all__ = ["paper", "run_sites", "choose", "start_index", "site_type", "SiteChoice", "resolve_settings", "PAPER_LEVELS",
           "PAPER_TOLERANCE"]

PAPER_LEVELS = tuple(round(0.1 * i, 2) for i in range(1, 10))   # their perc_vals 0.9 ... 0.1, as 1 - perc
PAPER_TOLERANCE = 5e-4                                          # loss_inc = 1.0005 (RWKV)


@dataclass(frozen=True)
class SiteChoice:
    """What one site ends with: the candidate ``index`` kept, the reference ``loss`` passed on to
    the next site, whether a candidate ``passed`` (False: the 10% fallback), and every
    ``(index, loss)`` evaluated, in order."""

    index: int
    loss: float
    passed: bool
    tried: tuple[tuple[int, float], ...]


def site_type(name: str) -> str:
    """A site's name without its block: ``blocks.3.att.key`` -> ``att.key`` (OPT: ``layers.2.fc1`` -> ``fc1``)."""
    parts = name.split(".")
    return ".".join(parts[2:]) if len(parts) > 2 and parts[0] in ("blocks", "layers") else name


def start_index(history: Sequence[int]) -> int:
    """The candidate index kept most often by earlier sites of a type, ties to the sparser (the larger
    index, as ``np.unique`` + ``argmax`` over their keep fractions gives); 0 without history."""
    if not history:
        return 0
    counts = Counter(history)
    top = max(counts.values())
    return max(i for i, c in counts.items() if c == top)


def choose(loss_at: Callable[[int], float], n: int, ref: float, ratio: float, start: int) -> SiteChoice:
    """One site of the authors' scan (``find_threshold_val``): candidates ``0..n-1`` from least to most
    sparse, ``loss_at(i)`` the calibration loss with candidate ``i`` on, ``ref`` the site's one
    reference, ``start`` where the scan begins (see the module doc, steps 3-5)."""
    tried: list[tuple[int, float]] = []

    def passes(i: int) -> bool:
        tried.append((i, float(loss_at(i))))
        return tried[-1][1] / ref < ratio

    kept = None
    if passes(start):
        kept = start
        for i in range(start + 1, n):
            if not passes(i):
                break
            kept = i
    else:
        for i in range(start - 1, -1, -1):
            if passes(i):
                kept = i
                break
    if kept is None:
        return SiteChoice(0, ref, False, tuple(tried))
    return SiteChoice(kept, dict(tried)[kept], True, tuple(tried))


def run_sites(names: Sequence[str], loss_at: Callable[[str, int], float], keep: Callable[[str, SiteChoice], None],
              n: int, dense: float, ratio: float) -> list[tuple[str, int, float, SiteChoice]]:
    """The authors' main loop over ``names`` in order (steps 3-6 of the module doc):
    ``loss_at(name, i)`` is the calibration loss with candidate ``i`` of site ``name`` on (and
    every earlier kept threshold), ``keep(name, choice)`` sets the kept one. Returns, per site,
    ``(name, start index, reference, choice)``."""
    history: dict[str, list[int]] = {}
    ref, out = dense, []
    for name in names:
        kind = site_type(name)
        start = start_index(history.get(kind, []))
        c = choose(lambda i: loss_at(name, i), n, ref, ratio, start)
        keep(name, c)
        history.setdefault(kind, []).append(c.index)
        out.append((name, start, ref, c))
        ref = c.loss
    return out


def _candidates(stream: Stream, name: str, levels: Sequence[float]) -> list[torch.Tensor]:
    """The per-token quantiles of ``|x|`` at ``levels``, averaged over every calibration token
    (the site's segment is run once with the model's current thresholds)."""
    site = stream.model.sites[name]
    sums = torch.zeros(len(levels), dtype=torch.float64)
    rows = [0]

    def hook(module, inputs, output):
        a = inputs[0].detach().abs().float().reshape(-1, site.width).cpu()
        sums.add_(torch.tensor(quantiles_per_token(a, levels), dtype=torch.float64) * a.shape[0])
        rows[0] += a.shape[0]

    h = site.register_forward_hook(hook)
    try:
        for x in stream.h:
            if stream.seg >= stream.n_seg:  # a site before the head (OPT's project_out): the head closes the stream
                stream.segs.logits(stream.segs.run(x, stream.seg))
            else:
                stream.segs.run(x, stream.seg, stream.seg + 1)
    finally:
        h.remove()
    return [torch.tensor(float(v) / rows[0]) for v in sums]


def paper(model, calib_tokens: torch.Tensor, *, tolerance: float = PAPER_TOLERANCE,
          levels: Sequence[float] = PAPER_LEVELS, batch_tokens: int = 8192, device=None, progress: bool = True,
          model_name: str | None = None, calib_description: str = "", algorithm: str = "paper") -> Schedule:
    """The authors' procedure (see the module doc) on ``calib_tokens`` (``[N, T]`` token ids).

    ``tolerance``: a candidate passes iff ``loss / reference < 1 + tolerance`` (5e-4: their 1.0005).
    ``levels``: the candidate quantile levels, least sparse first (their ``start_k=0.9`` grid).
    ``extra["trace"]`` records every site's start, the candidates tried and what it kept.
    """
    t0 = time.perf_counter()
    settings = resolve_settings(dict(tolerance=tolerance, levels=levels))
    levels = settings["levels"]
    names = block_sites(model)
    with calibrating(model, device) as dev:
        stream = Stream(model, calib_tokens, dev, batch_tokens)
        dense = stream.loss()
        cands: dict[str, list[torch.Tensor]] = {}
        bar = progress_bar(len(names), "paper", progress)

        def loss_at(name: str, i: int) -> float:
            if name not in cands:  # a new site: its stream input and candidates, earlier thresholds on
                stream.advance_to(stream.segs.segment_of(name))
                cands[name] = _candidates(stream, name, levels)
            return stream.candidate_losses(model.sites[name], [cands[name][i]])[0]

        def keep(name: str, c: SiteChoice) -> None:
            model.sites[name].threshold = cands[name][c.index].to(dev, torch.float32)
            bar.update(1)

        done = run_sites(names, loss_at, keep, len(levels), dense, 1.0 + settings["tolerance"])
        bar.close()
        chosen = {name: float(cands[name][c.index]) for name, _, _, c in done}
        trace = [dict(site=name, start=levels[start], level=levels[c.index], passed=c.passed, reference=ref,
                      threshold=chosen[name], tried=[(levels[i], loss) for i, loss in c.tried])
                 for name, start, ref, c in done]
        return build_schedule(model, calib_tokens, chosen, algorithm=algorithm, params=settings,
                              calib_description=calib_description, t0=t0, device=dev, model_name=model_name,
                              batch_tokens=batch_tokens, dense=dense,
                              extra={"trace": trace, "search_loss": done[-1][3].loss if done else dense})


def resolve_settings(p: dict) -> dict:
    """The settings that decide the schedule, checked: ``tolerance`` (>= 0) and ``levels``."""
    tol = float(p["tolerance"])
    if not tol >= 0:
        raise ValueError(f"tolerance must be >= 0 (a candidate passes iff loss / reference < 1 + tolerance), got {tol}")
    levels = [float(q) for q in p["levels"]]
    if not levels or any(not 0 < q < 1 for q in levels) or levels != sorted(levels):
        raise ValueError(f"levels must be increasing and inside (0, 1), got {levels}")
    return dict(tolerance=tol, levels=levels)
