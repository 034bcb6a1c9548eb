"""experiments.run and experiments.sweep end to end, on a small checkpoint the tests write
(a random 2-layer RWKV-4 with the shipped tokenizer and slices of the shipped texts), so the
whole pipeline -- calibrate, evaluate, trace, compile, simulate, plot -- runs in seconds."""
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from experiments import run, sweep
from rllm.model import RWKV, RWKVConfig, randomize_weights
from rllm.weights import save_checkpoint

ASSET = Path(__file__).resolve().parents[1] / "rllm" / "assets" / "rwkv_tiny"
FAST = ["--calib-tokens", "512", "--eval-tokens", "512", "--cloze-items", "4", "--mc-items", "4", "--tokens", "16",
        "--quiet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("mini")
    m = randomize_weights(RWKV(RWKVConfig(vocab_size=4096, n_layer=2, n_embd=32, name="mini")), seed=0)
    save_checkpoint(m, d, tokenizer=ASSET / "tokenizer.json")
    (d / "calib.txt").write_text((ASSET / "calib.txt").read_text()[:20000])
    (d / "eval.txt").write_text((ASSET / "eval.txt").read_text()[:20000])
    shutil.copy(ASSET / "cloze.jsonl", d / "cloze.jsonl")
    shutil.copy(ASSET / "mc.jsonl", d / "mc.jsonl")
    return d


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVENT_RWKV_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_run_writes_the_table_the_results_and_every_plot(ckpt, tmp_path, capsys):
    out = tmp_path / "res"
    assert run.main([str(ckpt), "--algorithm", "uniform", "--sparsity", "0.5", "--out", str(out)] + CURVE + FAST) == 0
    text = capsys.readouterr().out
    for label in ("MAC-weighted sparsity", "perplexity", "energy per token", "latency per token", "per-site sparsity",
                  "ffn.value"):
        assert label in text
    for f in ("schedule.json", "config.json", "points.csv", "sites.csv", "summary.md", "energy_by_layer.csv",
              "neurobench.csv", "sparsity_by_site.png", "energy_breakdown.png", "latency_breakdown.png",
              "energy_vs_accuracy.png", "chip/summary.json", "chip_dense/summary.json"):
        assert (out / f).is_file(), f
    pts = pd.read_csv(out / "points.csv")
    # the curve: the sequential method and three baselines, each at several knob values
    assert {"sequential", "uniform", "teal", "cats"} <= set(pts.algorithm)
    this = pts[pts.point == "this run"].iloc[0]
    dense = pts[pts.point == "dense"].iloc[0]
    assert this.eval_sparsity_mac > dense.eval_sparsity_mac
    # and the run's own schedule with its thresholds scaled (--curve-scales, default 0.25 0.5 0.75): less
    # sparse the smaller the scale, all below the run itself
    scaled = pts[pts.algorithm == "uniform, scaled"].sort_values("knob_value")
    assert list(scaled.knob_value) == [0.25, 0.5, 0.75] and set(scaled.knob) == {"scale"}
    assert list(scaled.sparsity_mac) == sorted(scaled.sparsity_mac) and scaled.sparsity_mac.max() < this.sparsity_mac
    # multiple choice is scored by lm-eval's acc and acc_mutual_info
    assert 0 <= this.mc_acc <= 1 and 0 <= this.mc_acc_mi <= 1 and "mutual information" in text
    # one dense baseline in the folder: every row's, the chip report's and the table's are one number
    assert this.energy_uJ < dense.energy_uJ
    assert (pts.dense_energy_uJ == dense.energy_uJ).all() and (pts.dense_latency_us == dense.latency_us).all()
    chip_dense = json.loads((out / "chip_dense" / "summary.json").read_text())["summary"]
    assert chip_dense["energy_uJ_per_token"] == dense.energy_uJ and chip_dense["latency_us_per_token"] == dense.latency_us
    assert f"{dense.energy_uJ:.4g}" in (out / "summary.md").read_text()
    # the tuned mapping is a labelled second comparison against the same dense run
    tuned = pts[pts.point == "this run, tuned mapping"].iloc[0]
    assert tuned.mapping == "tuned to this run" and set(pts.mapping) == {"dense run's", "tuned to this run"}
    assert tuned.energy_gain == pytest.approx(dense.energy_uJ / tuned.energy_uJ)
    assert "mapping tuned to this run" in text
    # a rerun with the same inputs reuses every cached point and gives the same table
    assert run.main([str(ckpt), "--algorithm", "uniform", "--sparsity", "0.5", "--out", str(out)] + CURVE + FAST) == 0
    again = pd.read_csv(out / "points.csv")
    pd.testing.assert_frame_equal(pts, again)
    # results are ordinary files: readable by others under the default umask, like any file
    old = os.umask(0o022)
    os.umask(old)
    if old == 0o022:
        for f in ("points.csv", "summary.md", "config.json", "schedule.json", "chip/summary.json", "sites.csv"):
            assert (out / f).stat().st_mode & 0o777 == 0o644, f
    # the config replays the run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["algorithm"] == "uniform" and cfg["knob_value"] == 0.5


def test_random_weights_are_labelled_everywhere(tmp_path, capsys):
    # rwkv_169m's real shape would take minutes on CPU; the zoo's smallest published shape is used
    out = tmp_path / "rw"
    code = run.main(["rwkv_169m", "--random-weights", "--sparsity", "0.5", "--algorithm", "uniform",
                     "--calib-tokens", "128", "--tokens", "4", "--no-curve", "--quiet", "--out", str(out)])
    assert code == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    assert "RANDOM WEIGHTS" in (out / "summary.md").read_text()
    assert (out / "energy_breakdown.png").is_file()


@pytest.mark.parametrize("args, needle", [
    (["rwkv_tinny"], "unknown model"),
    (["{ckpt}", "--schedule", "{bad_schedule}"], "schedule"),
    (["{ckpt}", "--arch", "{bad_arch}"], "a.toml"),
    (["{ckpt}", "--algorithm", "uniform", "--tolerance", "0.1"], "--sparsity"),
    (["{ckpt}", "--algorithm", "uniform", "--sparsity", "1.5"], "[0, 1)"),
    (["{ckpt}", "--curve-scales", "0.5", "-1"], "--curve-scales must be numbers >= 0, got -1"),
    (["{ckpt}", "--curve-scales", "nan"], "--curve-scales must be numbers >= 0, got nan"),
])
def test_bad_input_is_one_line_and_exit_2_and_keeps_results(ckpt, tmp_path, capsys, args, needle):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "points.csv").write_text("earlier results\n")
    bad_schedule = tmp_path / "s.json"
    bad_schedule.write_text('{"version": 1, "thresholds": {"nope": 1.0}}')
    bad_arch = tmp_path / "a.toml"
    bad_arch.write_text("[chip]\nmesh = 'x'\n")
    args = [x.format(ckpt=ckpt, bad_schedule=bad_schedule, bad_arch=bad_arch) for x in args]
    assert run.main(args + ["--out", str(out), "--no-curve"] + FAST) == 2
    assert needle in one_line_error(capsys)
    assert (out / "points.csv").read_text() == "earlier results\n"


def test_unwritable_output_is_one_line(ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run.main([str(ckpt), "--out", str(blocker / "sub"), "--no-curve"] + FAST) == 2
    assert "not writable" in one_line_error(capsys)


CURVE = ["--curve", "sequential:0.02", "uniform:0.3,0.6", "teal:0.5", "cats:0.4"]
SWEEP = ["--algorithms", "sequential", "uniform", "cats", "--tolerances", "0.02", "--sparsities", "0.4", "0.6",
         "--workers", "1"] + FAST


def test_an_interrupted_sweep_resumes_and_equals_an_uninterrupted_one(ckpt, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert sweep.main([str(ckpt), "--out", str(a)] + SWEEP) == 0
    assert sweep.main([str(ckpt), "--out", str(b), "--max-points", "2"] + SWEEP) == 0  # "interrupted" after 2
    assert len(list((b / "points").glob("*.json"))) == 2
    before = {p.name: p.stat().st_mtime_ns for p in (b / "points").glob("*.json")}
    assert sweep.main([str(ckpt), "--out", str(b)] + SWEEP) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (b / "points").glob("*.json")}
    assert all(after[n] == t for n, t in before.items())  # finished points were not redone
    assert len(after) == 5
    assert (a / "sweep.csv").read_text() == (b / "sweep.csv").read_text()
    assert (b / "energy_vs_accuracy.png").is_file()


PARALLEL = ["--algorithms", "uniform", "cats", "--sparsities", "0.4", "0.6"] + FAST


def test_a_sweep_on_two_workers_equals_one_worker_byte_for_byte(ckpt, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert sweep.main([str(ckpt), "--out", str(one), "--workers", "1"] + PARALLEL) == 0
    assert sweep.main([str(ckpt), "--out", str(two), "--workers", "2"] + PARALLEL) == 0
    assert (one / "sweep.csv").read_bytes() == (two / "sweep.csv").read_bytes()
    assert len(pd.read_csv(two / "sweep.csv")) == 4


def work_or_die(alg, knob):
    """The sweep's point, except that the worker holding cats 0.6 is killed part-way through it."""
    if (alg, knob) == ("cats", 0.6):
        sweep._CTX.calib_loss()  # the point has started
        os.kill(os.getpid(), signal.SIGKILL)
    return sweep._work(alg, knob)


def test_a_worker_killed_mid_point_fails_that_point_and_a_rerun_retries_only_it(ckpt, tmp_path, monkeypatch, capsys):
    out, ref = tmp_path / "killed", tmp_path / "ref"
    monkeypatch.setattr(sweep, "_work", work_or_die)  # the workers import this module's function by name
    assert sweep.main([str(ckpt), "--out", str(out), "--workers", "2"] + PARALLEL) == 1
    err = capsys.readouterr().err
    assert "point cats 0.6 failed: worker process died (exit code -9)" in err and "rerun" in err
    assert len(list((out / "points").glob("*.json"))) == 3 and len(list((out / "failed").glob("*.txt"))) == 1
    before = {p.name: p.stat().st_mtime_ns for p in (out / "points").glob("*.json")}
    monkeypatch.undo()
    assert sweep.main([str(ckpt), "--out", str(out), "--workers", "2"] + PARALLEL) == 0
    assert "3 already done, 1 to run" in capsys.readouterr().out
    assert all((out / "points" / n).stat().st_mtime_ns == t for n, t in before.items())
    assert not list((out / "failed").glob("*.txt"))
    assert sweep.main([str(ckpt), "--out", str(ref), "--workers", "1"] + PARALLEL) == 0
    assert (out / "sweep.csv").read_bytes() == (ref / "sweep.csv").read_bytes()


def test_a_model_that_does_not_load_in_the_workers_is_one_line(tmp_path, capsys):
    assert sweep.main(["rwkv_tinny", "--out", str(tmp_path / "o"), "--workers", "2"] + PARALLEL) == 2
    assert "unknown model" in one_line_error(capsys)


def test_a_malformed_sweep_file_is_one_line(ckpt, tmp_path, capsys):
    f = tmp_path / "sweep.json"
    f.write_text('{"algorithms": ["magic"]}')
    assert sweep.main([str(ckpt), "--sweep-file", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "unknown algorithm" in one_line_error(capsys)


def test_a_sweep_on_ray_equals_the_local_one(ckpt, tmp_path):
    """The optional cluster engine (``pip install ray``; skipped without it): a local Ray
    instance runs the same points and the CSV is the same."""
    ray = pytest.importorskip("ray")
    args = ["--algorithms", "uniform", "cats", "--sparsities", "0.4", "--quiet"] + FAST
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert sweep.main([str(ckpt), "--out", str(local), "--workers", "1"] + args) == 0
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        assert sweep.main([str(ckpt), "--out", str(remote), "--engine", "ray"] + args) == 0
    finally:
        ray.shutdown()
    assert (local / "sweep.csv").read_text() == (remote / "sweep.csv").read_text()


def ray_point_or_die(setup, alg, knob):
    if knob == 0.6:
        os.kill(os.getpid(), signal.SIGKILL)
    return sweep._ray_point(setup, alg, knob)


def test_a_ray_worker_that_dies_fails_its_point_and_the_sweep_goes_on(ckpt, tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(sweep, "_ray_point", ray_point_or_die)
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent)]
                                                                      + [p for p in sys.path if p])}})
    try:
        code = sweep.main([str(ckpt), "--out", str(tmp_path / "r"), "--engine", "ray", "--algorithms", "uniform",
                           "--sparsities", "0.4", "0.6", "--quiet"] + FAST)
    finally:
        ray.shutdown()
    assert code == 1 and "point uniform 0.6 failed" in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "r" / "sweep.csv")) == 1


def small_arch(tmp_path, memory_bytes: int) -> Path:
    """The shipped chip with 4x4 meshes of small cores: the test model needs more than one."""
    import copy
    from seneca_sim.arch import Arch, default_arch
    raw = copy.deepcopy(default_arch().to_dict())
    raw["core"]["data_memory_bytes"] = {"value": memory_bytes, "unit": "bytes", "assumed": True, "rationale": "test"}
    for k in ("mesh_rows", "mesh_cols"):
        raw["chip"][k] = {"value": 4, "unit": "cores", "assumed": True, "rationale": "test"}
    return Arch.from_dict(raw, origin="test").save(tmp_path / f"chip{memory_bytes}.toml")


def test_run_on_fewer_chips_streams_weights_and_reports_the_fetch_policy(ckpt, tmp_path, capsys):
    out = tmp_path / "streamed"
    arch = small_arch(tmp_path, 16384)
    assert run.main([str(ckpt), "--arch", str(arch), "--chips", "1", "--prefetch", "hot", "--algorithm", "uniform",
                     "--sparsity", "0.5", "--no-curve", "--out", str(out)] + FAST) == 0
    text = capsys.readouterr().out
    assert "matrices streamed from shared memory" in text and "prefetch (hot)" in text
    pts = pd.read_csv(out / "points.csv").set_index("point")
    assert pts.loc["this run", "fetch"] == "prefetch (hot)" and pts.loc["dense", "fetch"] == "dense"
    assert pts.loc["this run", "chips"] == 1 and pts.loc["this run", "streamed_matrices"] >= 1


def test_a_model_that_does_not_fit_fails_before_calibrating(ckpt, tmp_path, capsys):
    arch = small_arch(tmp_path, 4096)
    code = run.main([str(ckpt), "--arch", str(arch), "--chips", "1", "--out", str(tmp_path / "o")] + FAST)
    assert code == 2
    captured = capsys.readouterr()
    assert "does not fit 1 chip" in captured.err and "calibrating" not in captured.out


def test_the_prefetch_study_writes_its_tables_and_plots(ckpt, tmp_path, capsys):
    from experiments import prefetch
    out = tmp_path / "pf"
    arch = small_arch(tmp_path, 16384)
    assert prefetch.main([str(ckpt), "--arch", str(arch), "--chips", "1", "--tokens", "24", "--calib-tokens", "256",
                          "--out", str(out), "--quiet"]) == 0
    for f in ("patterns.csv", "predictors.csv", "predictors_by_kind.csv", "policies.csv", "predictors.png",
              "policies.png"):
        assert (out / f).is_file(), f
    pol = pd.read_csv(out / "policies.csv")
    streamed = pol[pol.mapping == "streamed"].set_index("policy")
    assert set(streamed.index) == set(prefetch.POLICIES) and (pol.mapping == "on core").any()
    assert streamed.loc["oracle", "latency_us"] <= streamed.loc["demand", "latency_us"]
    assert streamed.loc["dense", "shared_MB_per_token"] >= streamed.loc["demand", "shared_MB_per_token"]
    kinds = pd.read_csv(out / "predictors_by_kind.csv")
    assert (kinds[kinds.predictor == "oracle"].f1 == 1.0).all()
    assert prefetch.main([str(ckpt), "--chips", "0", "--out", str(out)]) == 2


def test_decode_with_event_kernels_gives_the_same_tokens(ckpt, capsys):
    from experiments import decode
    assert decode.main([str(ckpt), "--sparsity", "0.5", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "greedy tokens agree: 16/16" in out and "event kernels" in out
    assert decode.main([str(ckpt), "--device", "cuda"] if not torch.cuda.is_available() else ["rwkv_tinny"]) == 2
    one_line_error(capsys)


def test_head_flag_thresholds_the_head_and_the_chip_counts_it(ckpt, tmp_path, capsys):
    """--head makes the head's input a site: calibrated, traced and skipped on the chip; without it
    the head stays dense (threshold 0, counted dense); an algorithm that cannot is one line."""
    rows = {}
    for flag in ([], ["--head"]):
        out = tmp_path / ("head" if flag else "plain")
        assert run.main([str(ckpt), "--algorithm", "uniform", "--sparsity", "0.5", "--no-curve", "--out", str(out)]
                        + flag + FAST) == 0
        sched = json.loads((out / "schedule.json").read_text())
        rows[bool(flag)] = (pd.read_csv(out / "points.csv").set_index("point").loc["this run"], sched)
    (plain, s0), (head, s1) = rows[False], rows[True]
    assert s0["algorithm"]["params"]["include_head"] is False and s1["algorithm"]["params"]["include_head"] is True
    assert s0["thresholds"]["head"] == 0 and s1["thresholds"]["head"] > 0
    assert head.chip_mac_sparsity > plain.chip_mac_sparsity and head.energy_uJ < plain.energy_uJ
    # the --head schedule replayed without the flag: its thresholded head is still counted as a site
    out = tmp_path / "replayed"
    assert run.main([str(ckpt), "--schedule", str(tmp_path / "head" / "schedule.json"), "--no-curve", "--out", str(out)]
                    + FAST) == 0
    replayed = pd.read_csv(out / "points.csv").set_index("point").loc["this run"]
    assert replayed.chip_mac_sparsity == head.chip_mac_sparsity and replayed.energy_uJ == head.energy_uJ
    capsys.readouterr()
    assert run.main([str(ckpt), "--algorithm", "teal", "--head", "--no-curve", "--out", str(tmp_path / "t")] + FAST) == 2
    assert "--head" in one_line_error(capsys)


def test_the_curve_plots_a_task_accuracy_only_where_the_curve_has_one():
    """The default run scores the task sets on dense and the run alone: no task panel (two points
    are no curve); with --curve-tasks the multiple-choice and cloze panels join perplexity."""
    import numpy as np
    import pandas as pd

    from experiments.plots import _accuracy_columns

    nan = np.nan
    df = pd.DataFrame({"algorithm": ["dense", "sequential", "uniform", "teal"], "ppl": [80.0, 85, 90, 86],
                       "mc_acc_mi": [0.37, 0.40, nan, nan], "cloze_acc": [0.08, 0.07, nan, nan]})
    assert [c for c, _ in _accuracy_columns(df)] == ["ppl"]
    df.loc[2:, ["mc_acc_mi", "cloze_acc"]] = [[0.35, 0.05], [0.36, 0.06]]
    assert [c for c, _ in _accuracy_columns(df)] == ["ppl", "mc_acc_mi", "cloze_acc"]
    assert [c for c, _ in _accuracy_columns(df.assign(zs_avg=0.4))] == ["zs_avg"]
