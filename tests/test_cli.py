"""The `dqmig` command: `dqmig run` output, --json, and clear errors for bad arguments."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from dqmig import runtable
from dqmig.cli import main

QUICK = ["run", "--seconds", "0.3", "--calc-time", "0.2", "--memory", "32M"]


def dirty_rate_lines(out: str) -> dict[str, str]:
    lines = out.split("calc-dirty-rate:", 1)[1].strip().splitlines()
    return {line.split()[0]: line for line in lines}


def test_run_prints_table_and_dirty_rates(capsys):
    assert main(QUICK) == 0
    out = capsys.readouterr().out
    assert out.startswith("dqmig run: 2 vCPUs, 32.0 MiB, workload skewed, dirty ring 4096")
    header = next(line for line in out.splitlines() if line.startswith("writer"))
    for col in ("class", "program", "progress/s", "dirty pages/s", "dirty MB/s", "write MB/s"):
        assert col in header
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("vcpu", "VM "))}
    assert rows["vcpu0"][1:3] == ["writer", "uniform"]
    assert rows["vcpu1"][1:3] == ["reader", "read-mostly"]
    assert float(rows["vcpu0"][3]) > 0, "the writer makes progress"
    assert "VM" in rows
    rates = dirty_rate_lines(out)
    assert set(rates) == {"page-sampling", "dirty-bitmap", "dirty-ring"}
    assert "MB/s over 0.2 s" in rates["dirty-ring"] and "per vCPU" in rates["dirty-ring"]
    # QEMU's rules: no sampling of a RAM block under 128 MiB, no dirty-bitmap mode with the ring.
    assert "QEMU skips RAM blocks under 128 MiB" in rates["page-sampling"]
    assert "unavailable: dirty-bitmap mode is refused with the dirty ring on" in rates["dirty-bitmap"]


def test_run_explains_its_columns_and_shows_ms_per_gib_only_for_stress(capsys):
    assert main(QUICK) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("writer"))
    assert "ms/GiB" not in header and "ms/GiB" not in out, "no stress program, no ms/GiB"
    assert "progress/s: guest program steps per second" in out
    assert "dirty: pages newly dirtied (clean to dirty) per second" in out
    assert main([*QUICK, "--program", "stress", "--program", "idle"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("writer"))
    assert header.split()[-1] == "ms/GiB"
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("vcpu")}
    assert rows["vcpu1"][-1] == "-", "an idle vCPU has no ms/GiB"
    # The stress vCPU has one once it has written a GiB, which a slow host may not do in 0.3 s.
    assert rows["vcpu0"][-1] == "-" or float(rows["vcpu0"][-1]) > 0
    assert "ms/GiB: a stress program's time per GiB" in out


def test_run_with_many_vcpus_prints_a_row_per_class(capsys):
    vcpus = runtable.GROUP_ABOVE + 4
    assert main([*QUICK, "--vcpus", str(vcpus), "--dma", "sequential:rate=2000"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert not any(line.startswith("vcpu") for line in lines), "no row per vCPU"
    header = next(line for line in lines if line.startswith("class"))
    assert header.split()[:3] == ["class", "program", "count"]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("writer ", "reader ", "device "))}
    assert rows["writer"][1:3] == ["uniform", "1"]
    assert rows["reader"][1:3] == ["read-mostly", str(vcpus - 1)]
    assert rows["device"][1:3] == ["sequential", "1"]
    ring = dirty_rate_lines(out)["dirty-ring"]
    assert "per class (sum over its vCPUs) writer" in ring and "reader" in ring


def test_class_rows_sum_rates_and_average_progress():
    rows = [
        runtable.Row("vcpu0", "reader", "read-mostly", 1, 100.0, 10.0, 1.0, math.nan),
        runtable.Row("vcpu1", "writer", "stress", 1, 50.0, 5.0, 2.0, 400.0),
        runtable.Row("vcpu2", "reader", "read-mostly", 1, 300.0, 30.0, 3.0, math.nan),
        runtable.Row("vcpu3", "writer", "stress", 1, 70.0, 7.0, 4.0, 200.0),
    ]
    reader, writer = runtable.class_rows(rows)
    assert (reader.cls, reader.writers, reader.progress, reader.dirty, reader.write) == ("reader", 2, 200.0, 40.0, 4.0)
    assert math.isnan(reader.ms_per_gib)
    assert (writer.cls, writer.writers, writer.progress, writer.dirty) == ("writer", 2, 60.0, 12.0)
    assert writer.ms_per_gib == 300.0


def test_run_with_dirty_bitmap_says_ring_unavailable(capsys):
    assert main([*QUICK, "--dirty-ring", "0", "--workload", "uniform", "--vcpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "dirty bitmap" in out.splitlines()[0]
    rates = dirty_rate_lines(out)
    assert "unavailable: dirty-ring mode needs the dirty ring" in rates["dirty-ring"]
    assert "MB/s over 0.2 s" in rates["dirty-bitmap"] and "MB/s" in rates["page-sampling"]


def test_run_writes_json(tmp_path, capsys):
    path = tmp_path / "run.json"
    argv = [*QUICK, "--program", "uniform:rate=20000", "--program", "idle", "--dma", "sequential:rate=2000"]
    assert main([*argv, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"time series written to {path}" in out
    assert any(line.startswith("dma ") for line in out.splitlines())
    report = json.loads(path.read_text())
    assert set(report) >= {"config", "samples", "calc_dirty_rate", "counters"}
    assert report["config"]["vcpus"] == 2 and report["config"]["memory"] == 32 << 20
    assert [p["kind"] for p in report["config"]["programs"]] == ["uniform", "idle"]
    assert report["config"]["dma"]["kind"] == "sequential"
    samples = report["samples"]
    assert len(samples) >= 1
    for s in samples:
        assert len(s["progress_rate"]) == len(s["dirty_rate"]) == 3  # two vCPUs and the DMA writer
    assert {r["mode"] for r in report["calc_dirty_rate"]} == {"page-sampling", "dirty-ring"}  # ring on
    assert len(report["counters"]) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--memory", "12Q"], "bad size '12Q'", id="memory"),
        pytest.param(["--vcpus", "0"], "--vcpus", id="vcpus=0"),
        pytest.param(["--vcpus", "two"], "--vcpus", id="vcpus=two"),
        pytest.param(["--seconds", "-1"], "--seconds", id="seconds"),
        pytest.param(["--workload", "nope"], "invalid choice", id="workload"),
        pytest.param(["--dirty-ring", "x"], "--dirty-ring", id="dirty-ring=x"),
        pytest.param(["--bogus"], "unrecognized arguments", id="unknown-option"),
    ],
)
def test_bad_arguments_exit_2_from_argparse(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main([*QUICK, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_version_names_the_commit_or_says_it_is_unknown(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(
        r"dqmig \d+\.\d+\.\d+ \((commit [0-9a-f]{12} (of this checkout|recorded at build)"
        r"(, with local changes|, local changes unknown)?|commit unknown: .*)\)",
        out,
    ), out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "usage: dqmig" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--program", "bogus"], "unknown guest program 'bogus'", id="program-kind"),
        pytest.param(["--program", "uniform:rate=fast"], "rate='fast' is not a number", id="program-value"),
        pytest.param(["--program", "uniform:oops=1"], "'oops'", id="program-param"),
        pytest.param(["--program", "hot-cold:hot_fraction=5"], "hot_fraction", id="program-range"),
        pytest.param(["--program", "idle"] * 3, "3 --program given for 2 vCPUs", id="too-many-programs"),
        pytest.param(["--dma", "sideways"], "unknown guest program 'sideways'", id="dma"),
        pytest.param(["--dirty-ring", "100"], "dirty ring size 100", id="dirty-ring=100"),
        pytest.param(["--page-size", "1000"], "page size 1000", id="page-size"),
        pytest.param(["--memory", "0"], "cannot be shared", id="memory=0"),
        pytest.param(["--dirty-ring", "-1"], "dirty-ring", id="dirty-ring=-1"),
        pytest.param(["--seed", "-1"], "seed", id="seed=-1"),
        pytest.param(["--program", "uniform:rate=nan"], "rate", id="program-rate=nan"),
    ],
)
def test_bad_values_return_2_with_a_clear_message(args, message, capsys):
    # Caught by argparse (SystemExit 2) or by main (returns 2): either way exit 2, no traceback.
    try:
        code = main([*QUICK, *args])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error: " in err.splitlines()[-1] and "Traceback" not in err
    assert message in err


@pytest.mark.parametrize(
    ("option", "value"),
    [("--seconds", "nan"), ("--calc-time", "nan"), ("--calc-time", "inf")],
)
def test_non_finite_durations_are_rejected(option, value, capsys):
    argv = [*QUICK, option, value]
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2, f"{option} {value} was accepted"
    err = capsys.readouterr().err
    assert option in err or option.lstrip("-") in err, err
    assert "Traceback" not in err


def dqmig_script() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "dqmig")
    found = here if os.path.exists(here) else shutil.which("dqmig")
    assert found, "the dqmig console script is installed"
    return found


def test_console_script_runs():
    proc = subprocess.run(
        [dqmig_script(), *QUICK],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "calc-dirty-rate:" in proc.stdout
    assert "vcpu0" in proc.stdout
    assert proc.stderr == "", "no progress line on a non-tty stderr"


def test_console_script_bad_argument_has_no_traceback():
    proc = subprocess.run([dqmig_script(), "run", "--memory", "12Q"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "bad size '12Q'" in proc.stderr
    assert "Traceback" not in proc.stderr
