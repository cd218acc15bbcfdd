"""`dqmig validate`: the bars on synthetic numbers, then one short run of the harness (the
default scenario shrunk by --set: one emulator run and one simulated run of auto-converge),
checking only the structure of what it prints and writes: the emulator's figures depend on
the host's load."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from dqmig.cli import main
from dqmig.experiments import results, validate

MEDIANS = {"total-time": 10_000, "transferred": 100 * 2**20, "iterations": 10}


def _checks(**sim):
    values = dict(MEDIANS) | sim
    return validate.verdict([True, True, True], True, MEDIANS, values)


def test_within_15_percent_of_the_median_passes_and_beyond_misses():
    assert validate.within(100.0, 115.0)["ok"] and validate.within(100.0, 85.0)["ok"]
    assert not validate.within(100.0, 115.5)["ok"] and not validate.within(100.0, 84.0)["ok"]
    assert validate.within(100.0, 120.0)["delta"] == pytest.approx(0.2)
    checks = _checks(**{"total-time": 11_400, "transferred": 80 * 2**20})
    assert checks["total-time"]["ok"] and not checks["transferred"]["ok"]
    assert checks["transferred"]["delta"] == pytest.approx(-0.2)


def test_iterations_pass_within_two_even_beyond_15_percent():
    assert _checks(iterations=12)["iterations"]["ok"]  # +20 %, but only 2 more
    assert not _checks(iterations=13)["iterations"]["ok"]
    few = validate.verdict([True], True, MEDIANS | {"iterations": 3}, MEDIANS | {"iterations": 5})
    assert few["iterations"]["ok"]  # +67 %, 2 more
    many = validate.verdict([True], True, MEDIANS | {"iterations": 40}, MEDIANS | {"iterations": 46})
    assert many["iterations"]["ok"] and not validate.within(40, 47, absolute=2)["ok"]


def test_the_convergence_verdict_follows_the_emulators_majority():
    assert not validate.verdict([True, True, False], False, MEDIANS, MEDIANS)["converged"]["ok"]
    assert validate.verdict([False, False, True], False, MEDIANS, MEDIANS)["converged"]["ok"]
    split = validate.verdict([True, False], False, MEDIANS, MEDIANS)["converged"]
    assert split["ok"] and split["emu"] == "1/2"  # a split emulator accepts either verdict


def test_missing_figures_pass_only_when_missing_on_both():
    assert validate.within(None, None)["ok"]
    assert not validate.within(300.0, None)["ok"] and not validate.within(None, 300.0)["ok"]


def test_throttle_steps_are_compared_by_their_syncs():
    emu = [[[3, 20], [5, 30], [7, 40]], [[3, 20], [6, 30]]]
    same = validate.verdict([True, True], True, MEDIANS, MEDIANS, emu, [[3, 20], [6, 30]])
    assert same["throttle-steps"] == {"ok": True, "matched": "1/2"}
    other = validate.verdict([True, True], True, MEDIANS, MEDIANS, emu, [[3, 20], [4, 30]])
    assert not other["throttle-steps"]["ok"]


def test_throttle_steps_from_a_series():
    series = {
        "event": ["setup", "tick", "sync", "tick", "sync", "tick", "tick", "sync", "stop"],
        "cpu-throttle-percentage": [None, None, None, None, 20, 20, 30, 30, 30],
    }
    run = {"policy": "auto-converge", "series": {"migration": series}}
    assert validate.throttle_steps(run) == [[3, 20], [3, 30]]
    empty = {"event": [], "cpu-throttle-percentage": []}
    assert validate.throttle_steps({"policy": "none", "series": {"migration": empty}}) is None


# the built-in default scenario made tiny: 16 MiB, the writer flat out, 2 s cap
TINY = {
    "guest.memory": "16M",
    "guest.dirty-ring": 1024,
    "guest.writer-rate": 0,
    "network.max-bandwidth": "16M",
    "x-max-time": 2,
    "run.warmup": 0.2,
    "run.baseline": 0.3,
    "run.after": 0.1,
}


def test_validate_runs_both_engines_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    argv = ["validate", "default", "--policies", "auto-converge", "--repeat", "1", "--out", str(out), "--quiet"]
    for field, value in TINY.items():
        argv += ["--set", f"{field}={value}"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    doc = json.loads((out / "validation.json").read_text())
    assert doc["schema"] == validate.SCHEMA and doc["repeat"] == 1
    assert doc["machine"]["cpus"] and len(doc["machine"]["load-average"]) == 3
    (entry,) = doc["scenarios"]
    (row,) = entry["policies"]
    assert entry["name"] == "default" and row["policy"] == "auto-converge"
    assert set(row["checks"]) == {"converged", "total-time", "transferred", "iterations", "throttle-steps"}
    assert row["ok"] == all(c["ok"] for c in row["checks"].values())
    assert row["emu"]["runs"] == 1 and len(row["emu"]["load"]) == 1 and len(row["emu"]["load"][0]) == 3
    for key in ("total-time", "transferred", "iterations", "downtime", "peak-throttle", "slowdown-writer"):
        assert set(row["emu"]["figures"][key]) == {"median", "min", "max", "n"}
        assert key in row["sim"]["figures"]
    assert isinstance(row["sim"]["throttle-steps"], list)
    emu, sim = results.load(out / "default" / "emu.json"), results.load(out / "default" / "sim.json")
    assert [r["engine"] for r in emu["runs"]] == ["emu"] and [r["engine"] for r in sim["runs"]] == ["sim"]
    md = (out / "validation.md").read_text()
    assert "## default" in md and "| policy | converged emu/sim | total s |" in md
    text = printed.getvalue()
    assert "auto-converge" in text and "scenario x policy pairs meet every bar" in text
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["validate", "--from", str(out)]) == 0  # judged again from the saved runs
    again = json.loads((out / "validation.json").read_text())
    assert again["scenarios"] == doc["scenarios"]
    (out / "default" / "sim.json").unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["validate", "--from", str(out), "--resimulate", "--quiet"]) == 0  # the sim side only
    resimulated = json.loads((out / "validation.json").read_text())
    assert resimulated["scenarios"] == doc["scenarios"], "the simulator is deterministic"
    assert results.load(out / "default" / "emu.json") == emu, "the emulator's runs are kept"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["validate", "--from", str(out), "--resimulate", "--calibrate", "--quiet"]) == 0
    speeds = results.load(out / "default" / "sim.json")["scenario"]["guest"]["sim-speeds"]
    reader_pace = emu["runs"][0]["vcpus"][1]["baseline-rate"]
    assert len(speeds) == 2 and speeds[1] == round(reader_pace, 1), "the flat-out reader runs at the emulator's pace"
    (sim_run,) = results.load(out / "default" / "sim.json")["runs"]
    assert sim_run["vcpus"][1]["baseline-rate"] == pytest.approx(reader_pace, rel=1e-3)


def test_validate_refuses_an_engine_and_a_resimulation_without_saved_runs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["validate", "default", "--engine", "sim"])
    assert e.value.code == 2
    assert "unrecognized arguments: --engine" in capsys.readouterr().err
    assert main(["validate", "default", "--resimulate"]) != 0
    assert "--resimulate needs --from" in capsys.readouterr().err
