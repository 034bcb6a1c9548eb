"""Tests for the chip description (seneca_sim/seneca.toml) and its loader (seneca_sim/arch.py)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from seneca_sim.arch import (
    DEFAULT_ARCH_PATH,
    DEFAULT_FANOUT,
    PUBLISHED_SOP_CONFIG,
    PUBLISHED_SOP_PJ,
    Arch,
    ArchError,
    dumps_toml,
    energy_per_sop,
    figures_markdown,
    load_arch,
    sop_energy_breakdown,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def arch() -> Arch:
    return load_arch()


@pytest.fixture()
def raw(arch) -> dict:
    return copy.deepcopy(arch.to_dict())


def _write(tmp_path: Path, data: dict, name: str = "chip.toml") -> Path:
    p = tmp_path / name
    p.write_text(dumps_toml(data), encoding="utf-8")
    return p


# ------------------------------------------------------------------------------ shipped table
def test_shipped_table_loads(arch):
    assert Path(arch.origin) == DEFAULT_ARCH_PATH
    assert arch.cores_per_chip == 32 * 32
    assert arch.core.npe_count == 8
    assert arch.core.data_memory_bytes == 256 * 1024
    assert arch.core.weight_format == "bf16"
    assert arch.chip.clock_hz == pytest.approx(200e6)
    assert arch.noc.flit_bits == 32
    # canonical units: energies in pJ, leakage in pW, sizes in bytes
    assert arch.e("weight_read_word") == pytest.approx(3.7)
    assert arch.energy["leakage_per_core"].unit == "pW"
    assert arch.leakage_pj_per_cycle == pytest.approx(arch.e("leakage_per_core") / 200e6)
    assert load_arch(DEFAULT_ARCH_PATH) == arch


def test_required_actions_present(arch):
    for action in ("event_ingest", "weight_read_word", "mac", "acc", "neuron_update", "state_read_word",
                   "state_write_word", "noc_hop_per_flit", "leakage_per_core"):
        assert action in arch.energy
    for action in ("controller_cycles_per_event", "npe_cycles_per_instruction"):
        assert action in arch.cycles


def test_every_figure_sourced_or_assumed_with_rationale(arch):
    assert len(arch.figures) >= 30
    for key, f in arch.figures.items():
        assert math.isfinite(f.value) and f.value >= 0, key
        if f.assumed:
            assert f.rationale.strip(), f"{key} is assumed without a rationale"
        else:
            sid = f.source.split(",")[0].strip()
            assert sid in arch.sources, f"{key} cites no known source: {f.source!r}"
            assert len(f.source) > len(sid) + 5, f"{key}: source names no table/section"
    # every energy and cycles entry is among the figures
    for k in arch.energy:
        assert f"energy.{k}" in arch.figures
    for k in arch.cycles:
        assert f"cycles.{k}" in arch.figures


def test_assumed_figures_are_few_and_listed_in_sources_doc(arch):
    assumed = arch.assumed_figures()
    assert set(assumed) == {
        "chip.max_chips", "core.instruction_memory_bytes", "noc.router_latency_cycles",
        "noc.inter_chip_latency_cycles", "energy.inter_chip_per_flit", "energy.leakage_per_core",
        "shared_memory.read_energy_per_bit", "shared_memory.latency_cycles", "shared_memory.capacity_bytes",
        "shared_memory.stream_buffer_columns",
    }
    doc = (REPO / "seneca_sim" / "ARCH_SOURCES.md").read_text(encoding="utf-8")
    for key in arch.figures:
        assert f"`{key}`" in doc, f"ARCH_SOURCES.md does not list {key}"
    for key in assumed:
        assert key in doc.split("## Assumed figures")[1], f"{key} missing from the assumed list"


def test_formats(arch):
    assert arch.bytes_per_element("bf16") == 2
    assert arch.bytes_per_element("int8") == 1
    assert arch.weights_per_word("bf16") == 1
    assert arch.weights_per_word("int8") == 2
    assert arch.weight_read_pj("int8") == pytest.approx(3.7 / 2)
    assert arch.mac_pj() == pytest.approx(2.8)  # default format bf16: FP16 MUL 1.4 + ADD 1.4
    with pytest.raises(KeyError):
        arch.fmt("int3")


def test_noc_flit_count(arch):
    noc = arch.noc
    assert noc.max_pairs_per_packet == 16
    assert noc.flits_for_pairs(0) == 0
    assert noc.flits_for_pairs(1) == 2  # header + 1 payload flit
    assert noc.flits_for_pairs(16) == 9
    assert noc.flits_for_pairs(17) == 2 + 9  # second packet with its own header


# --------------------------------------------------------------------------- energy per SOP
def test_energy_per_sop_published_configuration(arch):
    """The sourced per-instruction figures (Tang et al. 2023, Table 8) reproduce the published
    ~2.8 pJ/SOP for INT8 weights and binary events (accumulate), at the default fan-out.

    Tolerance +-30%: the 2.8 pJ figure is "around" (abstract), application dependent and "only for
    high-level comparison" (Table 3 footnote), from synthesis not silicon; and the control share
    depends on the fan-out (event_ingest / fanout), which the paper does not state.
    """
    e = energy_per_sop(arch, **PUBLISHED_SOP_CONFIG)
    assert e == pytest.approx(PUBLISHED_SOP_PJ, rel=0.30)
    assert e == pytest.approx(1.85 + 0.6 + 116 / DEFAULT_FANOUT)
    # the agreement is not an artifact of one fan-out: it holds from 128 outputs per core upwards
    for fanout in (128, 512, 1024, 4096):
        assert energy_per_sop(arch, "int8", fanout, "acc") == pytest.approx(PUBLISHED_SOP_PJ, rel=0.30)


def test_energy_per_sop_bf16_mac_is_about_2_5x_published(arch):
    """RWKV on SENECA: BF16 weights and graded activations -> one MAC = MUL + ADD (Table 8 lists no
    fused MAC). The sourced figures give ~6.95 pJ, ~2.5x the published 2.8 pJ/SOP; this is stated,
    not tuned away. The test pins the value so a change to the table is noticed."""
    b = sop_energy_breakdown(arch, "bf16", DEFAULT_FANOUT, "mac")
    assert b == pytest.approx({"weight_read": 3.7, "compute": 2.8, "control": 116 / 256})
    e = energy_per_sop(arch)  # defaults: bf16, fanout 256, mac
    assert e == pytest.approx(6.953, abs=1e-3)
    assert 2.0 < e / PUBLISHED_SOP_PJ < 3.0


def test_energy_per_sop_monotone_in_fanout_and_validates(arch):
    assert energy_per_sop(arch, fanout=64) > energy_per_sop(arch, fanout=256) > energy_per_sop(arch, fanout=4096)
    assert energy_per_sop(arch, op="acc") < energy_per_sop(arch, op="mac")
    with pytest.raises(ValueError):
        energy_per_sop(arch, fanout=0)
    with pytest.raises(ValueError):
        energy_per_sop(arch, op="fma")


# ------------------------------------------------------------------------------- round trip
def test_round_trip_dict(arch):
    d = arch.to_dict()
    assert Arch.from_dict(d) == arch
    d["energy"]["mac"]["value"] = 99.0  # to_dict is a copy: mutating it leaves the arch alone
    assert arch.e("mac") == pytest.approx(2.8)


def test_round_trip_file(arch, tmp_path):
    p = arch.save(tmp_path / "copy.toml")
    again = load_arch(p)
    assert again == arch
    assert again.to_dict() == arch.to_dict()


def test_modified_copy_changes_only_that_figure(raw, tmp_path, arch):
    raw["energy"]["mac"]["value"] = 2.0
    changed = load_arch(_write(tmp_path, raw))
    assert changed.e("mac") == pytest.approx(2.0)
    assert changed.e("acc") == arch.e("acc")
    assert changed != arch


def test_markdown_table_lists_every_figure(arch):
    md = figures_markdown(arch)
    for key in arch.figures:
        assert f"`{key}`" in md


# -------------------------------------------------------------------------- malformed files
def _expect(tmp_path: Path, data: dict, *needles: str) -> str:
    p = _write(tmp_path, data)
    with pytest.raises(ArchError) as ei:
        load_arch(p)
    msg = str(ei.value)
    assert "\n" not in msg, "message must be one line"
    assert str(p) in msg, "message must name the file"
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_missing_section(raw, tmp_path):
    del raw["noc"]
    _expect(tmp_path, raw, "[noc]", "add it")


def test_missing_key(raw, tmp_path):
    del raw["energy"]["weight_read_word"]
    _expect(tmp_path, raw, "energy.weight_read_word", "missing")


def test_negative_value(raw, tmp_path):
    raw["energy"]["mac"]["value"] = -1.0
    _expect(tmp_path, raw, "energy.mac", "negative")


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_value(raw, tmp_path, bad):
    raw["cycles"]["controller_cycles_per_event"]["value"] = bad
    _expect(tmp_path, raw, "cycles.controller_cycles_per_event", "not finite")


def test_non_numeric_value(raw, tmp_path):
    raw["energy"]["acc"]["value"] = "1.4"
    _expect(tmp_path, raw, "energy.acc", "not a number")


def test_unknown_unit(raw, tmp_path):
    raw["energy"]["mac"]["unit"] = "pj"
    _expect(tmp_path, raw, "energy.mac", "unknown unit 'pj'")


def test_wrong_dimension_unit(raw, tmp_path):
    raw["energy"]["mac"]["unit"] = "MHz"
    _expect(tmp_path, raw, "energy.mac", "expected energy")


def test_figure_without_source_or_assumed(raw, tmp_path):
    del raw["energy"]["state_write_word"]["source"]
    _expect(tmp_path, raw, "energy.state_write_word", "neither a source nor assumed")


def test_assumed_without_rationale(raw, tmp_path):
    del raw["energy"]["leakage_per_core"]["rationale"]
    _expect(tmp_path, raw, "energy.leakage_per_core", "rationale")


def test_unknown_source_id(raw, tmp_path):
    raw["noc"]["flit_bits"]["source"] = "mystery2030, Table 1"
    _expect(tmp_path, raw, "noc.flit_bits", "mystery2030")


def test_bare_number_instead_of_figure(raw, tmp_path):
    raw["chip"]["mesh_rows"] = 32
    _expect(tmp_path, raw, "chip.mesh_rows", "must be a table")


def test_non_integer_count(raw, tmp_path):
    raw["core"]["npe_count"]["value"] = 7.5
    _expect(tmp_path, raw, "core.npe_count", "whole number")


def test_zero_clock(raw, tmp_path):
    raw["chip"]["clock_hz"]["value"] = 0
    _expect(tmp_path, raw, "chip.clock_hz", "> 0")


def test_unknown_weight_format(raw, tmp_path):
    raw["core"]["weight_format"] = "fp8"
    _expect(tmp_path, raw, "core.weight_format", "fp8")


def test_format_pointing_to_missing_energy(raw, tmp_path):
    raw["formats"]["int8"]["mac"] = "mac_int4"
    _expect(tmp_path, raw, "formats.int8.mac", "mac_int4")


def test_not_toml(tmp_path):
    p = tmp_path / "chip.toml"
    p.write_text("this is [not toml = \n", encoding="utf-8")
    with pytest.raises(ArchError) as ei:
        load_arch(p)
    msg = str(ei.value)
    assert str(p) in msg and "not valid TOML" in msg and "\n" not in msg


def test_binary_file(tmp_path):
    p = tmp_path / "chip.bin"
    p.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(ArchError, match="not a text file"):
        load_arch(p)


def test_missing_file(tmp_path):
    with pytest.raises(ArchError, match="file not found"):
        load_arch(tmp_path / "nope.toml")


def test_arch_error_is_value_error():
    assert issubclass(ArchError, ValueError)


def test_hashable_and_fingerprint(arch, tmp_path):
    again = load_arch(arch.save(tmp_path / "copy.toml"))
    assert hash(again) == hash(arch)
    assert again.fingerprint() == arch.fingerprint()
    assert len({arch: 1, again: 2}) == 1


def test_the_readmes_assumed_figures_are_the_tomls(arch):
    from seneca_sim.arch import assumed_markdown
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = assumed_markdown(arch)
    assert table in readme, "README's assumed-figures table is stale: paste `python -m seneca_sim.arch --assumed`"
    listed = {line.split("`")[1] for line in table.splitlines()[2:]}
    assert listed == set(arch.assumed_figures())
