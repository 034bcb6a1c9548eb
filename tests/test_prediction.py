"""Activation-pattern statistics and the predictors of the next token's firing set, on synthetic
traces whose answers are known by construction."""
from __future__ import annotations

import numpy as np
import pytest

from rllm.events import EventTrace
from rllm.prediction import Predictor, by_kind, evaluate, fit_predictor, pattern_stats, predicted_trace


def make_trace(masks: dict[str, np.ndarray], inputs: dict[str, np.ndarray] | None = None) -> EventTrace:
    sites = tuple(masks)
    T = next(iter(masks.values())).shape[0]
    return EventTrace(model="synthetic", sites=sites, widths=tuple(m.shape[1] for m in masks.values()), n_tokens=T,
                      masks={s: np.packbits(m, axis=1, bitorder="little") for s, m in masks.items()}, inputs=inputs)


def test_pattern_stats_measure_overlap_and_skew_by_hand():
    m = np.zeros((3, 10), dtype=bool)
    m[0, [0, 1, 2]] = True
    m[1, [1, 2, 3]] = True   # J(0, 1) = 2/4
    m[2, [1, 2, 3]] = True   # J(1, 2) = 1
    row = pattern_stats(make_trace({"blocks.0.att.key": m})).iloc[0]
    assert row.jaccard_consecutive == pytest.approx((0.5 + 1.0) / 2)
    assert row.density == pytest.approx(9 / 30)
    # input 1 and input 2 fire 3 times each (6 of 9 events): the top 10% is 1 input of 10
    assert row.top10_share == pytest.approx(3 / 9) and row.top20_share == pytest.approx(6 / 9)
    assert (row.kind, row.layer) == ("att.key", 0)


def test_a_constant_set_is_predicted_perfectly_by_the_previous_set_and_the_hot_set():
    rng = np.random.default_rng(0)
    m = np.zeros((50, 64), dtype=bool)
    m[:, rng.choice(64, 16, replace=False)] = True
    fit, held = make_trace({"s": m}), make_trace({"s": m[:20]})
    for kind in ("previous", "hot"):
        p = fit_predictor(kind, fit)
        assert p.budget("s", 1.0) == 16
        pred = p.predict(held, "s", 1.0)
        assert (pred[1:] == m[1:20]).all()  # token 0 has no previous token: the hot set fills in


def test_the_low_rank_predictor_learns_a_set_the_block_input_decides():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((32, 2)) @ rng.standard_normal((2, 48))  # a rank-2 rule
    def data(T, seed):
        x = np.random.default_rng(seed).standard_normal((T, 32)).astype(np.float32)
        return x, (x @ A) > 0.5
    xf, mf = data(2000, 2)
    xh, mh = data(400, 3)
    fit = make_trace({"blocks.0.ffn.key": mf}, inputs={"0": xf})
    held = make_trace({"blocks.0.ffn.key": mh}, inputs={"0": xh})
    ps = [fit_predictor(k, fit, rank=4) for k in ("previous", "hot", "lowrank", "oracle", "none")]
    tab = evaluate(ps, held, budgets=(1.0,)).set_index("predictor")
    assert tab.loc["lowrank", "f1"] > 0.8 > tab.loc["hot", "f1"] and tab.loc["lowrank", "f1"] > tab.loc["previous", "f1"]
    assert tab.loc["oracle", "precision"] == tab.loc["oracle", "recall"] == 1.0
    assert tab.loc["none", "recall"] == 0.0 and tab.loc["none", "fetched"] == 0.0
    assert tab.loc["lowrank", "macs"] == 4 * (32 + 48) and tab.loc["hot", "macs"] == 0
    assert set(by_kind(evaluate(ps, held)).budget) == {0.5, 1.0, 1.5, 2.0}


def test_budgets_match_the_number_of_rows_fetched():
    rng = np.random.default_rng(4)
    m = rng.random((30, 100)) < 0.2
    fit = make_trace({"s": m})
    p = fit_predictor("hot", fit)
    for mult in (0.5, 1.0, 2.0):
        k = p.budget("s", mult)
        assert k == round(mult * m.mean() * 100)
        assert (p.predict(fit, "s", mult).sum(axis=1) == k).all()
    pt = predicted_trace(p, fit, 1.0)
    assert pt.sites == ("s",) and (pt.mask("s") == p.predict(fit, "s", 1.0)).all()


def test_bad_predictor_settings_are_refused():
    with pytest.raises(ValueError, match="unknown predictor"):
        Predictor("psychic")
    with pytest.raises(ValueError, match="block_inputs"):
        fit_predictor("lowrank", make_trace({"s": np.ones((3, 4), bool)}))
