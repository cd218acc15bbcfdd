"""Sizes (dqmig.units) and guest programs / workload presets (dqmig.programs)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqmig import _native
from dqmig.programs import (
    KINDS,
    PRESETS,
    ProgramSpec,
    classify,
    own_regions,
    parse_program,
    preset,
)
from dqmig.units import GiB, KiB, MiB, format_size, parse_size

# -- parse_size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("256M", 256 * MiB),
        ("256m", 256 * MiB),
        ("4G", 4 * GiB),
        ("2MiB", 2 * MiB),
        ("2mib", 2 * MiB),
        ("64K", 64 * KiB),
        ("64KB", 64 * KiB),
        ("1T", 1 << 40),
        ("1.5K", 1536),
        ("0.5G", GiB // 2),
        (" 4 G ", 4 * GiB),
        ("4096B", 4096),
        (4096, 4096),
    ],
)
def test_parse_size_accepts(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "   ", "12Q", "G", "-1", "-4K", "1e3", "4 GB GB", "0x100", "1.5", "0.3K", "four", "4GiBs"]
)
def test_parse_size_rejects_with_clear_message(text):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    msg = str(e.value)
    assert msg.startswith("bad size")
    assert repr(text) in msg, "the message quotes the bad input"


def test_parse_size_rejects_fractional_bytes_saying_so():
    with pytest.raises(ValueError, match="whole number of bytes"):
        parse_size("0.3K")


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(0, 1 << 20),
    unit=st.sampled_from([("", 0), ("K", 10), ("M", 20), ("G", 30), ("T", 40)]),
    suffix=st.sampled_from(["", "B", "iB"]),
    lower=st.booleans(),
)
def test_parse_size_integer_with_unit(n, unit, suffix, lower):
    letter, shift = unit
    if lower:
        letter = letter.lower()
    if not letter:
        suffix = suffix.replace("i", "")  # '4096B' is fine, '4096iB' is not a unit
    text = f"{n}{letter}{suffix}"
    assert parse_size(text) == n << shift


def test_parse_size_is_exact_for_large_byte_counts():
    # A plain byte count must come back exactly, whatever its size (no float rounding).
    n = (1 << 53) + 1
    assert parse_size(str(n)) == n


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(2 * KiB) == "2.0 KiB"
    assert format_size(256 * MiB) == "256.0 MiB"
    assert format_size(4 * GiB) == "4.0 GiB"


# -- ProgramSpec ---------------------------------------------------------------------------------


def test_program_spec_defaults():
    s = ProgramSpec()
    assert s.kind == "idle"
    assert (s.region_start, s.region_pages, s.write_size, s.rate, s.seed, s.steps) == (0, 0, 8, 0.0, 0, 0)
    assert s.params == {}


def test_program_spec_kind_params_get_defaults():
    assert ProgramSpec("hot-cold").params == {"hot_fraction": 0.1, "hot_probability": 0.9}
    rm = ProgramSpec("read-mostly").params
    assert set(rm) == {"write_share", "compute"}
    assert 0 < rm["write_share"] < 0.5, "a reader by default"
    assert rm["compute"] > 0 and rm["compute"] == int(rm["compute"])
    assert ProgramSpec("hot-cold", params={"hot_fraction": 0.3}).params == {
        "hot_fraction": 0.3,
        "hot_probability": 0.9,
    }
    assert ProgramSpec("read-mostly", params={"compute": 5}).params == {**rm, "compute": 5}
    for kind in ("idle", "sequential", "uniform", "stress"):
        assert ProgramSpec(kind).params == {}


def test_program_spec_unknown_kind():
    with pytest.raises(ValueError, match="unknown guest program 'nope'") as e:
        ProgramSpec("nope")
    for kind in KINDS:
        assert kind in str(e.value), "the message lists the kinds"


@pytest.mark.parametrize(
    ("kind", "param"),
    [("uniform", "hot_fraction"), ("hot-cold", "write_share"), ("idle", "compute"), ("stress", "x")],
)
def test_program_spec_unknown_param_is_named(kind, param):
    with pytest.raises(ValueError, match=f"takes no parameter '{param}'"):
        ProgramSpec(kind, params={param: 1.0})


@pytest.mark.parametrize("kind", KINDS)
def test_to_json_is_accepted_by_the_native_vcpu(kind):
    spec = ProgramSpec(kind, region_start=4, region_pages=8, seed=3, steps=10, write_size=16)
    d = json.loads(spec.to_json())
    assert d["kind"] == kind
    assert "params" not in d
    for k, v in spec.params.items():
        assert d[k] == v
    if kind == "read-mostly":
        assert isinstance(d["compute"], int)
    guest = _native.Guest(32)
    v = _native.Vcpu(guest, 0, spec.to_json())
    exit = v.run(0.01 if kind == "idle" else 5.0)
    if kind == "idle":
        assert exit.reason == "TIMESLICE"
    else:
        assert exit.reason == "DONE"
        assert v.progress == 10


# -- parse_program -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_parse_program_kinds_use_own_region_and_seed(kind):
    s = parse_program(kind, region=(10, 20), seed=7)
    assert (s.kind, s.region_start, s.region_pages, s.seed) == (kind, 10, 20, 7)
    assert s.params == ProgramSpec(kind).params


def test_parse_program_params():
    s = parse_program("read-mostly:write_share=0.05,compute=200", region=(0, 8), seed=1)
    assert s.kind == "read-mostly"
    assert s.params == {"write_share": 0.05, "compute": 200.0}
    assert json.loads(s.to_json())["compute"] == 200

    s = parse_program("hot-cold:hot-fraction=0.2", region=(0, 8), seed=1)
    assert s.params["hot_fraction"] == 0.2, "dashes in keys become underscores"


def test_parse_program_common_keys():
    s = parse_program("uniform:rate=5000,steps=100,seed=9,write=64", region=(4, 4), seed=1)
    assert s.rate == 5000.0 and isinstance(s.rate, float)
    assert s.steps == 100 and s.seed == 9 and s.write_size == 64
    s = parse_program("uniform:region_start=3,region_pages=5", region=(40, 10), seed=0)
    assert (s.region_start, s.region_pages) == (3, 5)
    s = parse_program("sequential:write_size=32", region=(0, 1), seed=0)
    assert s.write_size == 32


def test_parse_program_region_shared():
    s = parse_program("uniform:rate=5000,region=shared", region=(100, 50), seed=2)
    assert (s.region_start, s.region_pages) == (0, 0)
    assert s.rate == 5000.0


def test_parse_program_tolerates_spaces_and_empty_items():
    s = parse_program(" uniform :rate = 10,,", region=(0, 4), seed=0)
    assert s.kind == "uniform" and s.rate == 10.0


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("uniform:rate=fast", "rate"),
        ("uniform:steps=1.5", "steps"),
        ("uniform:seed=x", "seed"),
        ("uniform:write=big", "write"),
        ("uniform:region_pages=", "region_pages"),
        ("hot-cold:hot_fraction=lots", "hot_fraction"),
        ("uniform:bogus=1", "bogus"),
        ("uniform:hot_fraction=0.5", "hot_fraction"),
        ("uniform:rate", "rate"),
        ("uniform:region=mine", "region"),
        ("wobbly", "wobbly"),
    ],
)
def test_parse_program_bad_input_names_the_parameter(text, named):
    with pytest.raises(ValueError) as e:
        parse_program(text, region=(0, 8), seed=0)
    assert named in str(e.value)


def _build(text: str, pages: int = 64) -> _native.Vcpu:
    """Parses a program and hands it to the native vCPU, as the CLI does."""
    spec = parse_program(text, region=(0, 0), seed=0)
    return _native.Vcpu(_native.Guest(pages), 0, spec.to_json())


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("hot-cold:hot_fraction=5", "hot_fraction"),
        ("hot-cold:hot_fraction=0", "hot_fraction"),
        ("hot-cold:hot_probability=1.5", "hot_probability"),
        ("read-mostly:write_share=-0.1", "write_share"),
        ("uniform:write=12", "write_size"),
        ("uniform:write=0", "write_size"),
        ("uniform:write=8192", "write_size"),
        ("uniform:rate=-1", "rate"),
        ("uniform:region_start=64", "region_start"),
        ("uniform:region_start=60,region_pages=8", "region"),
    ],
)
def test_out_of_range_values_rejected_naming_the_parameter(text, named):
    with pytest.raises(ValueError, match=named):
        _build(text)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("uniform:rate=nan", "rate"),
        ("uniform:rate=inf", "rate"),
        ("uniform:steps=-1", "steps"),
        ("uniform:seed=-1", "seed"),
        ("read-mostly:compute=-1", "compute"),
    ],
)
def test_non_finite_or_negative_values_rejected_naming_the_parameter(text, named):
    # Either parse_program or the native vCPU may reject these, but the error must say which
    # parameter is wrong (the CLI shows it to the user as is).
    with pytest.raises(ValueError, match=named):
        _build(text)


# -- presets -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(PRESETS),
    vcpus=st.integers(1, 8),
    extra=st.integers(0, 5000),
    seed=st.integers(0, 100),
)
def test_presets_have_disjoint_regions_covering_memory(name, vcpus, extra, seed):
    pages = vcpus + extra
    specs = preset(name, vcpus, pages, seed)
    assert len(specs) == vcpus
    covered = []
    for s in specs:
        assert s.region_pages > 0
        covered.extend(range(s.region_start, s.region_start + s.region_pages))
    assert covered == list(range(pages)), "regions are disjoint, in vCPU order, and cover memory"
    assert len({s.seed for s in specs}) == vcpus, "each vCPU gets its own seed"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_on_the_native_vcpu(name):
    vcpus, pages = 3, 96
    guest = _native.Guest(pages, vcpus=vcpus)
    for i, s in enumerate(preset(name, vcpus, pages)):
        s.steps = 50
        v = _native.Vcpu(guest, i, s.to_json())
        if s.kind == "idle":
            assert v.run(0.01).reason == "TIMESLICE"
        else:
            assert v.run(5.0).reason == "DONE"
            assert v.progress == 50


@pytest.mark.parametrize(
    ("name", "classes"),
    [
        ("idle", ["idle"] * 3),
        ("uniform", ["writer"] * 3),
        ("skewed", ["writer", "reader", "reader"]),
        ("stress", ["writer"] * 3),
        ("hot-cold", ["writer"] * 3),
        ("sequential", ["writer"] * 3),
    ],
)
def test_preset_kinds_and_classes(name, classes):
    specs = preset(name, 3, 300)
    assert [classify(s) for s in specs] == classes
    expected = {"skewed": ["uniform", "read-mostly", "read-mostly"]}.get(name, [name] * 3)
    assert [s.kind for s in specs] == expected


@pytest.mark.parametrize("name", PRESETS)
def test_preset_writer_rate_applies_to_rate_limited_writers_only(name):
    assert all(s.rate == 0 for s in preset(name, 3, 300)), "flat out by default"
    for s in preset(name, 3, 300, seed=1, writer_rate=5000.0):
        expected = 5000.0 if s.kind in ("uniform", "hot-cold", "sequential") else 0.0
        assert s.rate == expected, s.kind


def test_presets_cover_all_names():
    assert set(PRESETS) == {"idle", "uniform", "skewed", "stress", "hot-cold", "sequential"}


def test_classify():
    assert classify(ProgramSpec("idle")) == "idle"
    assert classify(ProgramSpec("read-mostly")) == "reader"
    assert classify(ProgramSpec("read-mostly", params={"write_share": 0.9})) == "writer"
    for kind in ("sequential", "uniform", "hot-cold", "stress"):
        assert classify(ProgramSpec(kind)) == "writer"


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown workload 'bogus'"):
        preset("bogus", 2, 100)
    with pytest.raises(ValueError, match="cannot be shared"):
        preset("uniform", 4, 3)


def test_own_regions_last_takes_remainder():
    assert own_regions(10, 3) == [(0, 3), (3, 3), (6, 4)]
    assert own_regions(8, 1) == [(0, 8)]
    with pytest.raises(ValueError):
        own_regions(0, 1)
