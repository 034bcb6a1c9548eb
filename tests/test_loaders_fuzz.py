"""Every user-facing loader under fuzzing: mutated and truncated files either load or raise the
loader's own error (one clear line at the CLI), never another exception (hypothesis)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rllm.model import RWKV, RWKVConfig, randomize_weights
from rllm.weights import ModelLoadError, load_checkpoint, save_checkpoint
from seneca_sim.arch import DEFAULT_ARCH_PATH, ArchError, load_arch
from thresholds import Schedule, ScheduleError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ASSET = Path(__file__).resolve().parents[1] / "rllm" / "assets" / "rwkv_tiny"


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """``seed`` truncated, with bytes flipped, inserted or deleted, or a chunk of it repeated."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "repeat"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[i:]
        elif op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "repeat":
            data[i:i] = data[i:i + draw(st.integers(1, 64))]
    return bytes(data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = randomize_weights(RWKV(RWKVConfig(vocab_size=4096, n_layer=1, n_embd=16, name="fz")), seed=0).eval()
    save_checkpoint(model, d, tokenizer=ASSET / "tokenizer.json")
    return model, d


@pytest.fixture(scope="module")
def schedule_bytes(tiny):
    model, _ = tiny
    sched = Schedule(thresholds={n: 0.1 for n in model.sites}, model="fz")
    return json.dumps(sched.to_dict()).encode()


def test_the_seed_files_load(tiny, schedule_bytes, tmp_path):
    (tmp_path / "s.json").write_bytes(schedule_bytes)
    Schedule.load(tmp_path / "s.json")
    load_arch(DEFAULT_ARCH_PATH)
    load_checkpoint(tiny[1])


@SETTINGS
@given(data=st.data())
def test_a_mutated_schedule_loads_or_is_a_schedule_error(data, schedule_bytes, tiny, tmp_path):
    f = tmp_path / "s.json"
    f.write_bytes(data.draw(mutated(schedule_bytes)))
    try:
        Schedule.load(f, model=tiny[0])
    except ScheduleError as e:
        assert "\n" not in str(e).strip()


@SETTINGS
@given(data=st.data())
def test_a_mutated_chip_description_loads_or_is_an_arch_error(data, tmp_path):
    f = tmp_path / "chip.toml"
    f.write_bytes(data.draw(mutated(DEFAULT_ARCH_PATH.read_bytes())))
    try:
        load_arch(f)
    except ArchError:
        pass


@SETTINGS
@given(data=st.data(), part=st.sampled_from(["config.json", "model.safetensors", "tokenizer.json"]))
def test_a_mutated_checkpoint_loads_or_is_a_model_load_error(data, part, tiny, tmp_path):
    d = tmp_path / "ckpt"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(tiny[1], d)
    (d / part).write_bytes(data.draw(mutated((tiny[1] / part).read_bytes())))
    try:
        load_checkpoint(d)
    except ModelLoadError:
        pass


# --- task files, --config and sweep files -------------------------------------------------------

PIQA = b"".join(json.dumps({"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Eat the lid.",
                            "label": i % 2}).encode() + b"\n" for i in range(3))


@SETTINGS
@given(data=st.data(), gz=st.booleans())
def test_a_mutated_task_file_loads_or_is_a_task_data_error(data, gz, tmp_path):
    import gzip

    from rllm.taskdata import TaskDataError
    from rllm.zeroshot import load_suite
    f = tmp_path / ("piqa.jsonl.gz" if gz else "piqa.jsonl")
    raw = data.draw(mutated(gzip.compress(PIQA, mtime=0) if gz else PIQA))
    f.write_bytes(raw)
    try:
        suite = load_suite([("piqa", str(f))])
        assert suite["piqa"].items
    except TaskDataError as e:
        assert "\n" not in str(e).strip()


def _config_bytes() -> bytes:
    import dataclasses

    from experiments import pipeline as P
    setup = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(P.Setup()).items()}
    return json.dumps({"setup": setup, "algorithm": "uniform", "knob_value": 0.5}, indent=1).encode()


@SETTINGS
@given(data=st.data())
def test_a_mutated_config_replays_or_is_an_experiment_error(data, tmp_path):
    from experiments import pipeline as P
    from experiments import run
    f = tmp_path / "config.json"
    f.write_bytes(data.draw(mutated(_config_bytes())))
    try:
        setup, knob = run._setup(run.parser().parse_args(["--config", str(f)]))
        assert isinstance(setup, P.Setup)
    except P.ExperimentError as e:
        assert "\n" not in str(e).strip()


def test_the_config_seed_replays(tmp_path):
    from experiments import run
    (tmp_path / "config.json").write_bytes(_config_bytes())
    setup, knob = run._setup(run.parser().parse_args(["--config", str(tmp_path / "config.json")]))
    assert knob == 0.5 and setup.model == "rwkv_pd12"


@SETTINGS
@given(data=st.data())
def test_a_mutated_sweep_file_loads_or_is_an_experiment_error(data, tmp_path):
    from experiments import pipeline as P
    from experiments.sweep import read_sweep_file
    f = tmp_path / "sweep.json"
    f.write_bytes(data.draw(mutated(b'{"algorithms": ["sequential", "uniform"], "tolerances": [0.01, 0.02], '
                                    b'"sparsities": [0.3, 0.5]}')))
    try:
        algs, tols, sps = read_sweep_file(str(f), ["uniform"], [0.01], [0.5])
        assert all(a in P.KNOB for a in algs) and all(isinstance(x, float) for x in tols + sps)
    except P.ExperimentError as e:
        assert "\n" not in str(e).strip()
