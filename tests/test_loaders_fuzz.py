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
