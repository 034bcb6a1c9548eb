"""Activation patterns and their prediction: which inputs of a site will fire at the next token.

Dhar et al. (2024) ask how similar and how predictable activation patterns are, so that an edge
device fetches only the weights that will be used, ahead of time. This module measures that on
event traces (:func:`rllm.events.trace`), per site:

* :func:`pattern_stats`: density, the Jaccard overlap of consecutive tokens' firing sets, and how
  skewed firing is (the share of events carried by the most active 10% and 20% of inputs);
* predictors of token ``t``'s firing set, each fitted on calibration traces only and each using
  only what is known before the site computes at token ``t``:

  - ``previous``: the set that fired at token ``t - 1`` (ties broken by calibration frequency);
  - ``hot``: a static hot set, the inputs that fire most often on the calibration text
    (PowerInfer's hot/cold neurons);
  - ``lowrank``: a rank-``r`` linear map from the block's normalized input to one score per
    input of the site (Deja Vu's low-rank predictor in shape), fitted in closed form by
    reduced-rank ridge regression (on the input's leading principal directions); its own cost
    (MACs and weights per site) is :meth:`cost`;
  - ``oracle`` (the true set, at any budget) and ``none`` (nothing), the two ends every policy
    is checked against.

A predictor scores every input; at a *fetch budget* ``m`` it predicts the ``round(m * density *
width)`` best-scored inputs of a site (``density``: the site's calibration firing rate), so all
predictors are compared at the same number of fetched rows. :func:`evaluate` gives precision,
recall and F1 per site, predictor and budget as a tidy table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from rllm.events import EventTrace

PREDICTORS = ("previous", "hot", "lowrank", "oracle", "none")


def block_of(site: str) -> str:
    """The key of :attr:`EventTrace.inputs` a site's block reads: ``"3"`` for ``blocks.3.*``."""
    parts = site.split(".")
    return parts[1] if parts[0] in ("blocks", "layers") and len(parts) > 2 else "head"


def site_kind(site: str) -> str:
    parts = site.split(".")
    return ".".join(parts[2:]) if parts[0] in ("blocks", "layers") and len(parts) > 2 else site


def _layer(site: str) -> int:
    b = block_of(site)
    return int(b) if b.isdigit() else -1


# ------------------------------------------------------------------------------------ patterns
def _jaccard_consecutive(m: np.ndarray) -> float:
    """Mean over tokens of |A_t ∩ A_{t-1}| / |A_t ∪ A_{t-1}| (tokens where both are empty skipped)."""
    inter = (m[1:] & m[:-1]).sum(axis=1)
    union = (m[1:] | m[:-1]).sum(axis=1)
    ok = union > 0
    return float((inter[ok] / union[ok]).mean()) if ok.any() else float("nan")


def _top_share(m: np.ndarray, frac: float) -> float:
    """Share of all events carried by the ``frac`` most active inputs."""
    per = np.sort(m.sum(axis=0))[::-1]
    total = per.sum()
    k = max(1, int(round(frac * per.size)))
    return float(per[:k].sum() / total) if total else float("nan")


def pattern_stats(trace: EventTrace) -> pd.DataFrame:
    """Per site: layer, kind, width, density, consecutive-token Jaccard, top-10% and top-20% shares."""
    rows = []
    for site in trace.sites:
        m = trace.mask(site)
        rows.append(dict(site=site, layer=_layer(site), kind=site_kind(site), width=m.shape[1],
                         density=float(m.mean()), jaccard_consecutive=_jaccard_consecutive(m),
                         top10_share=_top_share(m, 0.10), top20_share=_top_share(m, 0.20)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- predictors
@dataclass
class Predictor:
    """Scores every input of every site at every token; ``fit`` sees calibration traces only.

    ``kind``: one of :data:`PREDICTORS`. ``rank``/``ridge``: the low-rank predictor's size and
    regularization; it is fitted in the span of the block input's ``input_dims`` leading principal
    directions (all of them when the input is no wider), which keeps wide models' fits cheap. After :meth:`fit`: ``freq[site]`` (calibration firing rate per input),
    ``density[site]`` (mean of it) and, for ``lowrank``, ``maps[site] = (W1 [C, r], W2 [r, W], b [W])``.
    """

    kind: str
    rank: int = 16
    ridge: float = 1.0
    input_dims: int = 256          # the block input's principal directions the low-rank map reads
    freq: dict[str, np.ndarray] = field(default_factory=dict)
    density: dict[str, float] = field(default_factory=dict)
    maps: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.kind!r}; choose one of {', '.join(PREDICTORS)}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")

    def fit(self, trace: EventTrace) -> "Predictor":
        """Firing frequencies of every site (all predictors use them to break ties) and, for
        ``lowrank``, the maps; needs ``trace.inputs`` (``trace(..., block_inputs=True)``)."""
        if self.kind == "lowrank" and trace.inputs is None:
            raise ValueError("the lowrank predictor needs the blocks' inputs: trace(..., block_inputs=True)")
        bases: dict[str, np.ndarray | None] = {}
        for site in trace.sites:
            m = trace.mask(site)
            self.freq[site] = m.mean(axis=0).astype(np.float32)
            self.density[site] = float(m.mean())
            if self.kind == "lowrank":
                X = trace.inputs[block_of(site)]
                if block_of(site) not in bases:  # one basis per block input, shared by its sites
                    bases[block_of(site)] = _input_basis(X, self.input_dims)
                self.maps[site] = _reduced_rank_fit(X, m, self.rank, self.ridge, bases[block_of(site)])
        return self

    def scores(self, trace: EventTrace, site: str) -> np.ndarray:
        """``float32 [T, W]``: higher means more likely to fire at that token."""
        if site not in self.freq:
            raise KeyError(f"predictor was not fitted on site {site!r}")
        f = self.freq[site]
        tie = f / (2 * max(float(f.max()), 1e-30))  # < 1/2: orders only inputs the main score ties
        if self.kind in ("hot", "none"):
            return np.broadcast_to(f, (trace.n_tokens, f.size)).copy()
        if self.kind == "oracle":  # only for ranking; predict() returns the true set itself
            return trace.mask(site).astype(np.float32) + tie
        if self.kind == "previous":
            m = trace.mask(site).astype(np.float32)
            prev = np.vstack([np.zeros((1, f.size), np.float32), m[:-1]])
            return prev + tie
        W1, W2, b = self.maps[site]
        return (trace.inputs[block_of(site)] @ W1) @ W2 + b

    def budget(self, site: str, multiplier: float) -> int:
        """Inputs predicted at fetch budget ``multiplier`` x the site's calibration firing count."""
        w = self.freq[site].size
        return int(min(w, max(0, round(multiplier * self.density[site] * w))))

    def ranking(self, trace: EventTrace, site: str) -> np.ndarray:
        """``[T, W]`` input indices of each token, best-scored first (ties by index)."""
        return np.argsort(-self.scores(trace, site), axis=1, kind="stable")

    def predict(self, trace: EventTrace, site: str, multiplier: float,
                ranking: np.ndarray | None = None) -> np.ndarray:
        """``bool [T, W]``: the inputs predicted to fire (``none`` predicts nothing); ``ranking``:
        :meth:`ranking`'s result, when several budgets are asked of the same trace."""
        if self.kind == "oracle":  # the true set, whatever the budget: the bound every policy is checked against
            return trace.mask(site).copy()
        T, w = trace.n_tokens, self.freq[site].size
        out = np.zeros((T, w), dtype=bool)
        k = 0 if self.kind == "none" else self.budget(site, multiplier)
        if k:
            top = (self.ranking(trace, site) if ranking is None else ranking)[:, :k]
            np.put_along_axis(out, top, True, axis=1)
        return out

    def cost(self, site: str) -> dict[str, int]:
        """Per token, what predicting one site costs: MACs and stored weights (``lowrank`` only)."""
        if self.kind != "lowrank":
            return {"macs": 0, "params": 0}
        W1, W2, b = self.maps[site]
        return {"macs": int(W1.size + W2.size), "params": int(W1.size + W2.size + b.size)}


def _reduced_rank_fit(X: np.ndarray, Y: np.ndarray, rank: int, ridge: float, basis: np.ndarray | None = None):
    """Rank-``rank`` ridge regression of the 0/1 targets ``Y [N, W]`` on ``X [N, C]``, in the span of
    ``basis [C, k]`` (the block input's leading principal directions, :func:`_input_basis`): the
    ridge solution projected onto the top right singular directions of its fitted values (the
    least-squares optimal rank-r fit there), returned as factors ``W1 [C, r]``, ``W2 [r, W]`` and a
    bias. (torch's linear algebra: MKL, reproducible on any thread count.)"""
    X = torch.as_tensor(X, dtype=torch.float64)
    Y = torch.as_tensor(Y, dtype=torch.float64)
    xm, ym = X.mean(dim=0), Y.mean(dim=0)
    V = torch.eye(X.shape[1], dtype=X.dtype) if basis is None else torch.as_tensor(basis, dtype=X.dtype)
    Z, Yc = (X - xm) @ V, Y - ym                                   # [N, k]
    k = Z.shape[1]
    B = torch.linalg.solve(Z.T @ Z + ridge * torch.eye(k, dtype=X.dtype), Z.T @ Yc)  # [k, W]
    r = min(rank, min(B.shape))
    # the fitted values Z B = Q (R B) share their right singular vectors with the small R B
    R = torch.linalg.qr(Z, mode="r")[1]
    Vr = torch.linalg.svd(R @ B, full_matrices=False)[2][:r].T     # [W, r]
    W1, W2 = V @ (B @ Vr), Vr.T
    bias = ym - (xm @ W1) @ W2
    return tuple(t.float().numpy() for t in (W1, W2, bias))


def _input_basis(X: np.ndarray, k: int) -> np.ndarray | None:
    """The ``k`` leading principal directions of ``X [N, C]`` (None when ``k >= C``: all of them)."""
    if k >= X.shape[1]:
        return None
    Xc = torch.as_tensor(X, dtype=torch.float64)
    Xc = Xc - Xc.mean(dim=0)
    return torch.linalg.svd(Xc, full_matrices=False)[2][:k].T.numpy()


def fit_predictor(kind: str, trace: EventTrace, **kw) -> Predictor:
    return Predictor(kind, **kw).fit(trace)


# ---------------------------------------------------------------------------------- evaluation
def _scores_at(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    tp = float((pred & true).sum())
    p, a = float(pred.sum()), float(true.sum())
    precision = tp / p if p else float("nan")
    recall = tp / a if a else float("nan")
    f1 = 2 * tp / (p + a) if p + a else float("nan")
    return dict(precision=precision, recall=recall, f1=f1)


def evaluate(predictors: Sequence[Predictor], trace: EventTrace, budgets: Iterable[float] = (0.5, 1.0, 1.5, 2.0),
             sites: Sequence[str] | None = None) -> pd.DataFrame:
    """Precision, recall and F1 (over all tokens of ``trace``, which should be held out) per site,
    predictor and fetch budget; ``fetched`` is the share of the site's rows fetched."""
    rows = []
    for site in sites or trace.sites:
        true = trace.mask(site)
        for p in predictors:
            order = p.ranking(trace, site) if p.kind in ("previous", "hot", "lowrank") else None
            for m in budgets:
                pred = p.predict(trace, site, m, order)
                rows.append(dict(site=site, layer=_layer(site), kind=site_kind(site), predictor=p.kind, budget=m,
                                 k=float(pred.sum(axis=1).mean()), fetched=float(pred.mean()),
                                 **_scores_at(pred, true), **p.cost(site)))
    return pd.DataFrame(rows)


def by_kind(table: pd.DataFrame) -> pd.DataFrame:
    """Mean precision / recall / F1 per site kind, predictor and budget (the README's table)."""
    return (table.groupby(["kind", "predictor", "budget"], sort=False)[["precision", "recall", "f1", "fetched"]]
            .mean().reset_index())


def predicted_trace(predictor: Predictor, trace: EventTrace, multiplier: float,
                    sites: Sequence[str] | None = None) -> EventTrace:
    """The predicted firing sets as an :class:`EventTrace` (what a prefetching chip fetches ahead)."""
    names = tuple(sites or trace.sites)
    masks = {s: np.packbits(predictor.predict(trace, s, multiplier), axis=1, bitorder="little") for s in names}
    return EventTrace(model=f"{trace.model} [{predictor.kind} prediction x{multiplier:g}]", sites=names,
                      widths=tuple(trace.width(s) for s in names), n_tokens=trace.n_tokens, masks=masks,
                      thresholds=dict(trace.thresholds))


__all__ = ["PREDICTORS", "Predictor", "fit_predictor", "pattern_stats", "evaluate", "by_kind", "predicted_trace",
           "block_of", "site_kind"]
