"""Schedule: JSON round trip, validation of every malformed case, apply, and the cache."""
import json
import math

import pytest
import torch

from rllm.model import RWKV, RWKVConfig, randomize_weights
from thresholds import Schedule, ScheduleCache, ScheduleError, calibrate, model_fingerprint


pytestmark = pytest.mark.usefixtures("one_thread")


def small(seed=0, n_embd=16):
    return randomize_weights(RWKV(RWKVConfig(vocab_size=53, n_layer=2, n_embd=n_embd)), seed=seed).eval()


@pytest.fixture
def model():
    return small()


@pytest.fixture
def sched(model):
    th = {n: 0.05 * (i % 3) for i, n in enumerate(model.sites)}
    th["blocks.1.att.key"] = [0.01 * i for i in range(16)]  # per-channel
    return Schedule(thresholds=th, model="small", fingerprint=model_fingerprint(model), algorithm="manual",
                    params={"x": 1}, calibration={"sha256": "abc"}, summary={"sparsity_mean": 0.3})


def write(tmp_path, d, name="s.json"):
    p = tmp_path / name
    p.write_text(json.dumps(d) if not isinstance(d, str) else d)
    return p


def test_round_trip_and_apply(model, sched, tmp_path):
    p = sched.save(tmp_path / "sub" / "s.json")
    assert not list(p.parent.glob("*.tmp"))
    back = Schedule.load(p, model=model)
    assert back.thresholds == sched.thresholds and back.params == {"x": 1} and back.model == "small"
    assert json.loads(p.read_text())["format"] == "event-rwkv-schedule"
    back.apply(model)
    got = model.get_thresholds()
    assert torch.allclose(got["blocks.1.att.key"], torch.tensor(sched.thresholds["blocks.1.att.key"]))
    assert float(got["blocks.0.att.receptance"]) == pytest.approx(0.05)
    sched.replace(model="again").save(p)  # overwrite in place
    assert Schedule.load(p).model == "again"


def bad_cases(model, sched):
    d = sched.to_dict()
    site = "blocks.0.att.value"

    def mut(f):
        x = json.loads(json.dumps(d))
        f(x)
        return x
    other = small(n_embd=24)
    return {
        "not json": ("{not json", "not JSON"),
        "wrong format": (mut(lambda x: x.update(format="something-else")), "not a threshold schedule"),
        "newer version": (mut(lambda x: x.update(version=99)), "newer"),
        "unknown site": (mut(lambda x: x["thresholds"].update({"blocks.7.att.key": 0.1})), "blocks.7.att.key"),
        "missing site": (mut(lambda x: x["thresholds"].pop(site)), site),
        "negative": (mut(lambda x: x["thresholds"].update({site: -0.1})), site),
        "nan": (mut(lambda x: x["thresholds"].update({site: float("nan")})), site),
        "inf": (mut(lambda x: x["thresholds"].update({site: float("inf")})), site),
        "not a number": (mut(lambda x: x["thresholds"].update({site: "0.1"})), site),
        "per-channel length": (mut(lambda x: x["thresholds"].update({site: [0.1] * 5})), site),
        "other model": (mut(lambda x: x["model"].update(fingerprint=model_fingerprint(other))), "another model"),
        "other weights": (mut(lambda x: x["model"].update(fingerprint=model_fingerprint(small(seed=5)))), "other weights"),
    }


@pytest.mark.parametrize("case", ["not json", "wrong format", "newer version", "unknown site", "missing site",
                                  "negative", "nan", "inf", "not a number", "per-channel length", "other model",
                                  "other weights"])
def test_malformed_schedules_raise_one_clear_error(model, sched, tmp_path, case):
    content, needle = bad_cases(model, sched)[case]
    p = write(tmp_path, content)
    with pytest.raises(ScheduleError) as e:
        Schedule.load(p, model=model)
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_save_refuses_invalid_and_weights_check_can_be_skipped(model, sched, tmp_path):
    bad = sched.replace(thresholds={**sched.thresholds, "blocks.0.att.key": math.nan})
    with pytest.raises(ScheduleError, match="blocks.0.att.key"):
        bad.save(tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    p = sched.save(tmp_path / "s.json")
    other = small(seed=5)
    Schedule.load(p, model=other, check_weights=False).apply(other, check_weights=False)


def test_cache_hit_returns_the_same_schedule_instantly(model, tmp_path):
    tok = torch.randint(0, 53, (4, 17), generator=torch.Generator().manual_seed(0))
    a = calibrate(model, tok, "uniform", sparsity=0.4, cache=tmp_path, progress=False)
    assert a.extra["cache"]["hit"] is False
    b = calibrate(model, tok, "uniform", sparsity=0.4, cache=tmp_path, progress=False)
    assert b.extra["cache"]["hit"] is True and b.extra["cache"]["loaded_in_s"] < 1.0
    assert b.thresholds == a.thresholds and b.cost_s == a.cost_s
    c = calibrate(model, tok, "uniform", sparsity=0.5, cache=tmp_path, progress=False)  # other params: miss
    assert c.extra["cache"]["hit"] is False
    d = calibrate(model, tok[:, :9], "uniform", sparsity=0.4, cache=ScheduleCache(tmp_path), progress=False)
    assert d.extra["cache"]["hit"] is False  # other calibration data: miss
    model2 = small(seed=3)
    e = calibrate(model2, tok, "uniform", sparsity=0.4, cache=tmp_path, progress=False)
    assert e.extra["cache"]["hit"] is False  # other weights: miss


# --- cache keys that cannot go stale ------------------------------------------------------

def key(model, tok, algorithm, **params):
    from thresholds.calibrate import resolve_params, schedule_key
    return schedule_key(model, tok, algorithm, resolve_params(algorithm, params))


SEQ_CHANGES = dict(tolerance=0.03, levels=[0.1, 0.5], per_channel=True, share="equal", include_head=True,
                   scan="all", patience=3, margin=0.5, quantiles="pooled", horizon=2, rule="share", kappa=4.0,
                   objective="nll", floor=0.3, floor_share=0.25, max_rows=100, shrink=0.5, seed=1)


def test_every_parameter_changes_the_key_and_defaults_are_keyed_resolved(model):
    from thresholds.calibrate import resolve_params
    tok = torch.randint(0, 53, (4, 17), generator=torch.Generator().manual_seed(0))
    base = key(model, tok, "sequential")
    keys = {n: key(model, tok, "sequential", **{n: v}) for n, v in SEQ_CHANGES.items()}
    assert base not in keys.values() and len(set(keys.values())) == len(keys)
    assert set(SEQ_CHANGES) | {"search"} == {n for n in resolve_params("sequential", {})
                                            if n not in ("device", "progress", "model_name", "calib_description",
                                                         "algorithm", "batch_tokens", "candidate_batch")}
    # a default given explicitly is the same run, hence the same key; so is a setting the rule implies
    assert key(model, tok, "sequential", objective="kl", floor="auto", search="scan") == base
    assert key(model, tok, "sequential", rule="share") == key(model, tok, "sequential", rule="share", search="bisect")
    assert key(model, tok, "paper") == key(model, tok, "paper", tolerance=5e-4)
    assert key(model, tok, "paper", tolerance=1e-3) != key(model, tok, "paper")
    assert key(model, tok, "finetune", sparsity=0.5) == key(model, tok, "finetune", sparsity=0.5, init_sparsity=0.5)
    for alg, a, b in (("uniform", {"sparsity": 0.4}, {"sparsity": 0.4, "target": "mac"}),
                      ("cats", {"sparsity": 0.3}, {"sparsity": 0.3, "max_level": 0.9}),
                      ("finetune", {"sparsity": 0.5}, {"sparsity": 0.5, "steps": 7})):
        assert key(model, tok, alg, **a) != key(model, tok, alg, **b), alg


def test_the_teal_trajectory_is_part_of_the_key(model, tmp_path):
    from thresholds import teal_trajectory
    tok = torch.randint(0, 53, (4, 17), generator=torch.Generator().manual_seed(0))
    t1 = teal_trajectory(model, tok, step=0.1, progress=False)
    t2 = teal_trajectory(model, tok, step=0.3, max_sparsity=0.7, progress=False)
    assert key(model, tok, "teal", sparsity=0.5, trajectory=t1) != key(model, tok, "teal", sparsity=0.5, trajectory=t2)
    a = calibrate(model, tok, "teal", sparsity=0.5, trajectory=t1, cache=tmp_path, progress=False)
    b = calibrate(model, tok, "teal", sparsity=0.5, trajectory=t2, cache=tmp_path, progress=False)
    assert b.extra["cache"]["hit"] is False and b.params["step"] == 0.3 and a.params["step"] == 0.1


def test_one_changed_weight_changes_the_key_and_fails_validation(model):
    tok = torch.randint(0, 53, (4, 17), generator=torch.Generator().manual_seed(0))
    before = key(model, tok, "uniform", sparsity=0.4)
    sched = calibrate(model, tok, "uniform", sparsity=0.4, cache=False, progress=False)
    w = model.blocks[1].ffn.key.weight
    with torch.no_grad():
        w.view(-1)[w.numel() // 2 + 17] *= 1.0 + 2 ** -20  # one weight, by its last few bits
    assert key(model, tok, "uniform", sparsity=0.4) != before
    with pytest.raises(ScheduleError, match="other weights"):
        sched.validate(model)
    with torch.no_grad():
        w.view(-1)[w.numel() // 2 + 17] /= 1.0 + 2 ** -20
    if key(model, tok, "uniform", sparsity=0.4) == before:  # the division restored the bits exactly
        sched.validate(model)


def test_the_algorithms_source_is_part_of_the_key(tmp_path, monkeypatch):
    from thresholds import schedule
    src = tmp_path / "algorithm.py"
    src.write_text("x = 1\n")
    monkeypatch.setattr(schedule, "_ALGORITHM_SOURCES", (str(src),))
    schedule.code_digest.cache_clear()
    k1 = schedule.cache_key({}, "uniform", {}, "calib")
    src.write_text("x = 2\n")
    schedule.code_digest.cache_clear()
    assert schedule.cache_key({}, "uniform", {}, "calib") != k1
    schedule.code_digest.cache_clear()
