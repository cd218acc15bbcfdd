"""End to end: one short `dqmig compare` on a tiny guest (real migrations to a local
destination process), then `dqmig report` redrawing it from the saved results.json.

The guest's writer dirties its 8 MiB flat out, so plain pre-copy cannot converge (capped at
a few seconds) however fast or loaded the host is: even a sliver of a core re-dirties the
whole region within one iteration. (A rate-limited writer at 2x the bandwidth let `none`
converge on a loaded host.) Dirty-quota can. Every wait is bounded by x-max-time and the
runner's own timeouts.
"""

from __future__ import annotations

import contextlib
import io

import pytest

from dqmig.cli import main
from dqmig.experiments import results

TINY = """
name = "tiny"
description = "16 MiB, 2 vCPUs, one writer flat out"
policies = ["none", "dirty-quota"]
[guest]
vcpus = 2
memory = "16M"
dirty-ring = 1024
workload = "skewed"
writer-rate = 0
[network]
max-bandwidth = "16M"
[migration]
x-max-time = 4
[run]
warmup = 0.3
baseline = 0.5
after = 0.2
"""

FIGURES = {"summary.png", "progress.png", "migration.png", "throttle.png"}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    where = tmp_path_factory.mktemp("compare")
    (where / "tiny.toml").write_text(TINY)
    out = where / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        argv = ["compare", str(where / "tiny.toml"), "--policies", "none,dirty-quota", "--out", str(out), "--quiet"]
        code = main(argv)
    return code, out, printed.getvalue()


def test_compare_runs_each_policy_and_writes_a_report(compared):
    code, out, _ = compared
    assert code == 0
    doc = results.load(out)
    assert [r["policy"] for r in doc["runs"]] == ["none", "dirty-quota"]
    none, dq = doc["runs"]
    assert none["converged"] is False and none["status"] == "cancelled" and "did not converge" in none["error"]
    assert dq["status"] in ("completed", "cancelled"), dq["error"]  # a loaded machine may need longer than the cap
    for run in doc["runs"]:
        assert {v["class"] for v in run["vcpus"]} == {"writer", "reader"}
        assert all(v["baseline-rate"] > 0 for v in run["vcpus"])
        assert all(0 <= v["steal"] <= 1 and 0 <= v["baseline-steal"] <= 1 for v in run["vcpus"])
        assert set(run["net-slowdown"]) == set(run["slowdown"]) == {"writer", "reader"}
        assert run["series"]["guest"]["t"][0] < 0 < run["series"]["guest"]["t"][-1]
        assert "sync" in run["series"]["migration"]["event"]
        host = run["host"]
        assert len(host["load-before"]) == len(host["load-after"]) == 3 and min(host["load-after"]) >= 0
        assert host["steal"] is not None and 0 <= host["steal"] <= 1  # Linux: /proc/stat is there
    if dq["converged"]:
        assert dq["downtime"] is not None and dq["slowdown"]["writer"] > dq["slowdown"]["reader"]
    assert FIGURES <= {p.name for p in out.iterdir()}
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert (out / "scenario.toml").read_text().startswith('name = "tiny"')


COLUMNS = ("converged", "total s", "downtime ms", "sent MiB", "iters", "peak throttle %", "writers slowdown %")


def test_compare_prints_the_table(compared):
    printed = compared[2]
    header, rule, none, dq = printed.splitlines()[:4]
    assert header.startswith("policy") and all(c in header for c in (*COLUMNS, "readers slowdown %", "fairness"))
    assert set(rule) == {"-", " "}
    assert none.split()[:2] == ["none", "no"] and dq.startswith("dirty-quota")
    assert "report written to" in printed


def test_report_redraws_the_same_table_from_saved_results(compared, capsys):
    _, out, printed = compared
    assert main(["report", str(out), "--out", str(out.parent / "again")]) == 0
    redrawn = capsys.readouterr().out
    assert redrawn.split("\n\nreport written")[0] == printed.split("\n\nreport written")[0]
    assert FIGURES <= {p.name for p in (out.parent / "again").iterdir()}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "no-such-scenario"], "no scenario file 'no-such-scenario'"),
        (["compare", "--set", "guest.vcpus=0"], "guest.vcpus: must be >= 1"),
        (["compare", "--set", "guest.dirty-ring=0", "--policies", "dirty-limit"], "requires the dirty ring"),
        (["sweep"], "give a KIND"),
        (["sweep", "bandwidth", "--param", "downtime-limit"], "not both"),
        (["sweep", "--param", "warp-factor"], "unknown migration parameter"),
        (["sweep", "bandwidth", "--values", "fast"], "bad bandwidth 'fast'"),
    ],
)
def test_bad_experiment_commands_fail_before_running_anything(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
