"""Grid sweeps (issue 13): axes by name, relative axes applied after the ones they depend on,
where each policy wins (ties, nothing converged), and the report's phase diagrams."""

from __future__ import annotations

import json

import pytest

from dqmig.cli import main
from dqmig.experiments import grid, report, scenario, sweep
from dqmig.experiments.scenario import ScenarioError
from dqmig.migration.params import parse_bandwidth


def _sim_base():
    s = scenario.load("default").with_value("engine", "sim").with_parameter("x-max-time", 5)
    return s.with_value("run.warmup", 0.2).with_value("run.baseline", 0.3)


def _axes(*texts):
    return [grid.parse_axis(t) for t in texts]


def test_an_axis_is_a_sweep_the_field_it_changes_or_a_migration_parameter():
    assert grid.parse_axis("dirty-rate=0.5,2").sweep.name == "dirty-rate"
    bw = grid.parse_axis("max-bandwidth=100Mbit, 1Gbit")
    assert bw.sweep.name == "bandwidth" and bw.name == "max-bandwidth"
    assert bw.values == (parse_bandwidth("100Mbit"), parse_bandwidth("1Gbit")) and bw.labels == ("100Mbit", "1Gbit")
    assert grid.parse_axis("downtime-limit=100,300").values == (100, 300)


@pytest.mark.parametrize(
    "texts, message",
    [
        (["dirty-rate"], "expected NAME=V1,V2"),
        (["dirty-rate="], "expected NAME=V1,V2"),
        (["no-such-thing=1,2"], "unknown axis 'no-such-thing'"),
        (["dirty-rate=fast"], "not a number"),
    ],
)
def test_a_bad_axis_is_a_clear_error(texts, message):
    with pytest.raises(ScenarioError, match=message):
        _axes(*texts)


def test_a_grid_has_two_or_three_axes_each_changing_its_own_field():
    with pytest.raises(ScenarioError, match="2 or 3 axes, not 1"):
        grid.check_axes(_axes("dirty-rate=1,2"))
    with pytest.raises(ScenarioError, match="2 or 3 axes, not 4"):
        grid.check_axes(_axes("dirty-rate=1", "bandwidth=1Gbit", "dq-interval=2", "dl-period=100"))
    with pytest.raises(ScenarioError, match="the same field"):
        grid.check_axes(_axes("bandwidth=1Gbit,10Gbit", "max-bandwidth=1Gbit"))


def test_dirty_rate_is_relative_to_the_cells_own_bandwidth_whatever_the_order_given():
    base = _sim_base()
    axes = _axes("dirty-rate=0.5,2", "max-bandwidth=100Mbit,1Gbit")
    points = grid.prepare(base, axes, ["none"], 1)
    assert len(points) == 4 == len(grid.cells(axes))
    for cell, p in zip(grid.cells(axes), points, strict=True):
        ratio, bandwidth = axes[0].values[cell[0]], axes[1].values[cell[1]]
        writers = [v for v in p.vm_config().programs if v.kind == "uniform"]
        total = sum(v.rate for v in writers) * p.guest.page_size
        assert total == pytest.approx(ratio * bandwidth), cell


def test_a_grid_larger_than_any_sweep_is_refused_before_it_runs():
    axes = _axes("dq-interval=" + ",".join(map(str, range(2, 402))), "dq-window=" + ",".join(map(str, range(100, 400))))
    with pytest.raises(ScenarioError, match="more than 100,000 runs"):
        grid.prepare(_sim_base(), axes, ["dirty-quota"], 1)


def _point(policy, converged, runs, time_ms, reader):
    spread = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
    return {"policy": policy, "converged": converged, "runs": runs, "total-time": spread(time_ms),
            "slowdown-reader": spread(reader)}  # fmt: skip


def test_a_near_tie_goes_to_the_policy_listed_first_and_a_mostly_failed_policy_does_not_count():
    pts = [_point("none", 1, 1, 1005, 0.0), _point("dirty-quota", 1, 1, 1000, 0.004)]
    assert grid._least(pts, "total-time")["policy"] == "none", "0.5 % faster is a tie"
    assert grid._least(pts, "slowdown-reader")["policy"] == "none"
    pts[0]["total-time"]["median"] = 1200
    assert grid._least(pts, "total-time")["policy"] == "dirty-quota"
    assert not grid.converged(_point("none", 1, 2, 1, 0)) and grid.converged(_point("none", 2, 3, 1, 0))


@pytest.fixture(scope="module")
def small_grid():
    axes = _axes("dirty-rate=0.5,2", "max-bandwidth=100Mbit,1Gbit")
    return grid.run(_sim_base(), axes, ["none", "dirty-quota"], 1, argv=[], progress=False)


def test_each_cell_names_the_fastest_of_the_policies_that_converged_there(small_grid):
    summary = sweep.summarize(small_grid)
    phases = grid.phases(small_grid)
    assert [p["cell"] for p in phases] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    for ph in phases:
        mine = [p for p in summary if p["point"] == ph["point"] and grid.converged(p)]
        assert ph["converged"] == [p["policy"] for p in mine]
        if not mine:
            assert ph["fastest"] is None and ph["gentlest"] is None
            continue
        times = {p["policy"]: p["total-time"]["median"] for p in mine}
        assert times[ph["fastest"]] <= min(times.values()) * 1.01
    assert any(not ph["converged"] for ph in phases), "2x the dirty rate over 100 Mbit/s converges nowhere in 5 s"
    assert any(ph["converged"] for ph in phases)


def test_the_grid_report_leads_with_the_phase_diagram_and_has_a_heat_map_per_policy(small_grid, tmp_path):
    files = {p.name for p in report.write(small_grid, tmp_path)}
    assert {"phase.png", "grid-none.png", "grid-dirty-quota.png", "index.html"} <= files
    page = (tmp_path / "index.html").read_text()
    assert (
        page.index("Phase diagram") < page.index("<h2>Results</h2>") < page.index("dirty-quota: total time and readers")
    )
    text = report.text(small_grid)
    assert "nothing converged" in text and "readers' pace best" in text


def test_three_axes_draw_one_row_of_panels_per_value_of_the_third(tmp_path):
    axes = _axes("dirty-rate=0.5,2", "max-bandwidth=100Mbit,1Gbit", "dq-interval=2,50")
    doc = grid.run(_sim_base().with_parameter("x-max-time", 2), axes, ["dirty-quota"], 1, argv=[], progress=False)
    assert len(doc["runs"]) == 8 and doc["sweep"]["cells"][-1] == [1, 1, 1]
    files = {p.name for p in report.write(doc, tmp_path)}
    assert {"phase.png", "grid-dirty-quota.png"} <= files


def test_the_cli_runs_and_resumes_a_grid(tmp_path, capsys):
    out = tmp_path / "g"
    argv = ["sweep", "--grid", "dirty-rate=0.5,2", "--grid", "max-bandwidth=100Mbit,1Gbit", "--engine", "sim"]
    argv += ["--policies", "none", "--set", "x-max-time=3", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert "Where each policy wins" in capsys.readouterr().out
    lines = (out / "runs.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    (out / "runs.jsonl").write_text(lines[0] + "\n")
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["point"] for r in runs) == [0, 1, 2, 3] and first in runs
    assert main(["sweep", "dirty-rate", "--grid", "dirty-rate=1,2", "--grid", "bandwidth=1Gbit"]) == 2
    assert "give no KIND" in capsys.readouterr().err
    assert main(["sweep", "--grid", "dirty-rate=1,2", "--engine", "sim"]) == 2
    assert "2 or 3 axes, not 1" in capsys.readouterr().err


def test_a_cell_whose_runs_all_failed_is_not_run_rather_than_not_converged(small_grid, tmp_path):
    doc = json.loads(json.dumps(small_grid))
    doc["failed"] = [{"point": 3, "policy": p, "repeat": 0, "error": "RuntimeError: x"} for p in doc["policies"]]
    doc["runs"] = [r for r in doc["runs"] if r["point"] != 3]
    phases = grid.phases(doc)
    assert not phases[3]["ran"] and all(p["ran"] for p in phases[:3])
    assert "not run (failed)" in report.text(doc)
    report.write(doc, tmp_path)
    assert "failed, not in the results" in (tmp_path / "index.html").read_text()
