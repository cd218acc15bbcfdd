"""Sweeps on a Dask cluster (issue 13): a local 2-worker cluster gives the same runs as the
serial sweep, a killed worker costs one retried run and nothing else, an interrupted sweep
resumes without running anything twice, and an unreachable scheduler is a clear error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from dqmig.cli import main  # noqa: E402
from dqmig.experiments import cli as cli_module  # noqa: E402
from dqmig.experiments import cluster, grid, report, scenario, sweep  # noqa: E402

FIGURES = ("policy", "point", "repeat", "converged", "total-time", "transferred", "iterations", "downtime")


def _sim_base():
    s = scenario.load("default").with_value("engine", "sim").with_parameter("x-max-time", 5)
    return s.with_value("run.warmup", 0.2).with_value("run.baseline", 0.3)


def _sweep(**kw):
    kind = sweep.SWEEPS["dq-interval"]
    return sweep.run(_sim_base(), kind, ["2", "10"], ["none", "dirty-quota"], 1, argv=[], progress=False, **kw)


def _figures(doc):
    return sorted(tuple(r[k] for k in FIGURES) for r in doc["runs"])


def test_a_local_cluster_gives_the_serial_sweeps_runs(tmp_path):
    serial = _sweep()
    journal = tmp_path / "runs.jsonl"
    on_dask = _sweep(workers=2, journal=journal)
    assert _figures(on_dask) == _figures(serial), "the simulator is deterministic wherever it runs"
    assert all(r["retried"] == 0 and r["machine"]["hostname"] for r in on_dask["runs"])
    assert len(journal.read_text().splitlines()) == 4


def test_a_small_sim_grid_on_a_local_cluster_equals_the_serial_grid():
    axes = [grid.parse_axis("dirty-rate=0.5,2"), grid.parse_axis("max-bandwidth=100Mbit,1Gbit")]
    run = lambda **kw: grid.run(_sim_base(), axes, ["none", "dirty-quota"], 1, argv=[], progress=False, **kw)  # noqa: E731
    serial, on_dask = run(), run(workers=2)
    assert len(on_dask["runs"]) == 8 and _figures(on_dask) == _figures(serial)
    assert grid.phases(on_dask) == grid.phases(serial)


def test_a_killed_worker_costs_one_retried_run(tmp_path, monkeypatch):
    monkeypatch.setenv(cluster.KILL_ENV, "1-dirty-quota-0")  # inherited by the worker processes
    doc = _sweep(workers=2, journal=tmp_path / "runs.jsonl")
    assert _figures(doc) == _figures(_sweep()), "the sweep finished, nothing lost"
    retried = {(r["point"], r["policy"]): r["retried"] for r in doc["runs"]}
    assert retried.pop((1, "dirty-quota")) == 1, "the killed run ran again"
    # A run the dead worker had finished but not yet handed over is lost with it, and rerun.
    assert set(retried.values()) <= {0, 1}
    report.write(doc, tmp_path / "report")
    assert "dirty-quota at 10, repetition 1: retried 1 time(s)" in (tmp_path / "report" / "index.html").read_text()


def test_a_run_whose_worker_dies_on_every_attempt_fails_alone(tmp_path, monkeypatch):
    monkeypatch.setenv(cluster.KILL_ENV, "0-none-0*")
    doc = _sweep(workers=2, journal=tmp_path / "runs.jsonl")
    assert [(f["point"], f["policy"]) for f in doc["failed"]] == [(0, "none")]
    assert "died on every attempt" in doc["failed"][0]["error"]
    assert sorted(_figures(doc)) == sorted(f for f in _figures(_sweep()) if f[:2] != ("none", 0)), "the rest ran"
    monkeypatch.delenv(cluster.KILL_ENV)
    resumed = sweep.resume(doc, tmp_path / "runs.jsonl", progress=False)
    assert not resumed["failed"] and _figures(resumed) == _figures(_sweep())


def test_a_run_that_raises_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    real = cluster.runner.run

    def run(scenario, policy, **kw):
        if policy == "dirty-quota" and scenario.parameters.get("x-dirty-quota-interval") == 10:
            raise RuntimeError("a bug at this point")
        return real(scenario, policy, **kw)

    monkeypatch.setattr(cluster.runner, "run", run)
    out = tmp_path / "sw"
    argv = ["sweep", "dq-interval", "--engine", "sim", "--values", "2,10", "--policies", "none,dirty-quota"]
    argv += ["--set", "x-max-time=5", "--quiet", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "run dirty-quota at 10, repetition 1 failed: RuntimeError: a bug at this point" in err
    assert f"--resume {out}" in err
    assert len((out / "runs.jsonl").read_text().splitlines()) == 3
    assert "failed, not in the results" in (out / "index.html").read_text()
    monkeypatch.setattr(cluster.runner, "run", real)
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == 4


def test_an_interrupted_sweep_resumes_without_running_anything_twice(tmp_path):
    journal = tmp_path / "runs.jsonl"
    seen, saved_docs = [], []

    def interrupt(doc):
        seen.append(len(doc["runs"]))
        if not saved_docs:
            saved_docs.append(json.loads(json.dumps(doc)))  # results.json as saved before the first run
        if len(doc["runs"]) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _sweep(journal=journal, on_run=interrupt)
    saved = json.loads(journal.read_text().splitlines()[0])
    assert len(journal.read_text().splitlines()) == 2
    assert seen[0] == 0, "the document is saved before the first run"
    resumed = sweep.resume(saved_docs[0], journal, progress=False)
    keys = [(r["point"], r["policy"], r["repeat"]) for r in resumed["runs"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 4, "each run once, none missing"
    assert len(journal.read_text().splitlines()) == 4, "only the two missing runs ran"
    assert saved in resumed["runs"]
    assert _figures(resumed) == _figures(_sweep())


def test_a_journal_belongs_to_one_sweep(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "dq-interval", "--engine", "sim", "--values", "2,10", "--policies", "none", "--quiet"]
    argv += ["--set", "x-max-time=5", "--out", str(out)]
    assert main(argv) == 0
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert main([*argv[:5], "1,2,3", *argv[6:]]) == 2, "a new sweep into a directory with a journal"
    assert "holds a sweep (--resume" in capsys.readouterr().err
    assert (out / "runs.jsonl").read_text().splitlines() == lines, "nothing appended"
    stranger = json.loads(lines[0]) | {"sweep-id": "another", "point": 1}
    (out / "runs.jsonl").write_text(lines[0] + "\n" + json.dumps(stranger) + "\n")
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["point"] for r in runs) == [0, 1] and all(r["sweep-id"] != "another" for r in runs)
    for extra in (["--repeat", "2"], ["--out", str(tmp_path / "elsewhere")]):
        assert main(["sweep", "--resume", str(out), *extra]) == 2
        assert "give no KIND" in capsys.readouterr().err


def test_a_scheduler_port_that_does_not_speak_dask_is_an_error_in_bounded_time(capsys):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        argv = ["sweep", "dq-interval", "--engine", "sim", "--values", "2", "--quiet", "--cluster"]
        assert main([*argv, f"tcp://127.0.0.1:{port}"]) == 2
        assert time.monotonic() - t0 < cluster.CONNECT_TIMEOUT_S + 15
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert main([*argv, "foo"]) == 2
    assert "expected tcp://HOST:PORT" in capsys.readouterr().err


def test_runs_no_worker_can_take_are_an_error_not_a_hang(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cluster, "NO_WORKER_S", 3.0)
    port = _free_port()
    log = (tmp_path / "dask.log").open("w")
    scheduler = _dask("scheduler", "--port", str(port), "--no-dashboard", log=log)
    try:
        base = scenario.load("default").with_parameter("x-max-time", 2)
        kind = sweep.SWEEPS["dq-interval"]
        t0 = time.monotonic()
        with pytest.raises(cluster.ClusterError, match="no worker with the resource host=1"):
            sweep.run(
                base, kind, ["10"], ["none"], 1, argv=[], progress=False, cluster_address=f"tcp://127.0.0.1:{port}"
            )
        assert time.monotonic() - t0 < 60
    finally:
        os.killpg(scheduler.pid, signal.SIGKILL)
        scheduler.wait(timeout=10)
        log.close()


def test_the_cli_resumes_a_sweep_directory(tmp_path, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", "dq-interval", "--engine", "sim", "--values", "2,10", "--policies", "none", "--quiet"]
    argv += ["--set", "x-max-time=5", "--out", str(out)]
    assert main(argv) == 0
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # cut mid-line
    assert main(["sweep", "--resume", str(out), "--quiet"]) == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == 3  # the cut line, and the rerun
    assert main(["sweep", "--resume", str(out), "--values", "1"]) == 2
    assert "give no KIND" in capsys.readouterr().err


def test_an_unreachable_scheduler_is_a_clear_error_in_bounded_time(capsys):
    t0 = time.monotonic()
    argv = ["sweep", "dq-interval", "--engine", "sim", "--values", "2", "--quiet", "--cluster", "tcp://127.0.0.1:9"]
    assert main(argv) == 2
    assert time.monotonic() - t0 < cluster.CONNECT_TIMEOUT_S + 15
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err


def test_an_emulator_sweep_on_a_local_cluster_has_the_serial_verdicts(tmp_path):
    base = scenario.load("default").with_parameter("x-max-time", 2)
    for field, value in {"run.warmup": 0.2, "run.baseline": 0.3, "run.after": 0.1}.items():
        base = base.with_value(field, value)
    kind = sweep.SWEEPS["dq-interval"]
    run = lambda **kw: sweep.run(base, kind, ["10"], ["dirty-quota"], 1, argv=[], progress=False, **kw)  # noqa: E731
    serial, on_dask = run(), run(workers=2)
    assert [r["converged"] for r in on_dask["runs"]] == [r["converged"] for r in serial["runs"]]
    assert on_dask["runs"][0]["engine"] == "emu"


def test_more_local_workers_than_cpus_is_refused_before_anything_runs(tmp_path, capsys):
    argv = ["sweep", "dq-interval", "--engine", "sim", "--values", "2", "--workers", "1000", "--quiet"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()
    assert "more workers only share them" in capsys.readouterr().err


def _dask(*args, log):
    exe = Path(sys.executable).parent / "dask"
    return subprocess.Popen([str(exe), *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_lost_scheduler_stops_the_sweep_with_what_finished_kept(tmp_path, capsys):
    port = _free_port()
    log = (tmp_path / "dask.log").open("w")
    scheduler = _dask("scheduler", "--port", str(port), "--no-dashboard", log=log)
    worker = _dask("worker", f"tcp://127.0.0.1:{port}", "--nworkers", "1", "--nthreads", "1", "--no-dashboard", log=log)
    out = tmp_path / "sw"
    try:
        journal = out / "runs.jsonl"

        def lose_scheduler(doc):
            if len(doc["runs"]) == 1:
                scheduler.kill()

        argv = ["sweep", "dq-interval", "--engine", "sim", "--values", "2,10,50", "--policies", "none,dirty-quota"]
        argv += ["--set", "x-max-time=5", "--quiet", "--out", str(out), "--cluster", f"tcp://127.0.0.1:{port}"]
        t0 = time.monotonic()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cli_module, "_saver", lambda out, every_s=0: _chain(cli_module_saver(out), lose_scheduler))
            assert main(argv) == 2
        assert time.monotonic() - t0 < 120
        err = capsys.readouterr().err
        assert "lost the Dask scheduler" in err and f"--resume {out}" in err
        kept = len(journal.read_text().splitlines())
        assert 1 <= kept < 6
        assert main(["sweep", "--resume", str(out), "--quiet", "--workers", "2"]) == 0
        runs = json.loads((out / "results.json").read_text())["runs"]
        assert len(runs) == 6 and len(journal.read_text().splitlines()) == 6
    finally:
        for p in (worker, scheduler):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        log.close()


cli_module_saver = cli_module._saver


def _chain(*fns):
    def call(doc):
        for fn in fns:
            fn(doc)

    return call


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
