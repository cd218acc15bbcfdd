"""`dqmig migrate` and `dqmig incoming` as a user runs them: subprocesses, exit codes, the
last line, the JSON report, and clear errors."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

from dqmig.migration.destination import free_port_uri

RUN_S = 60.0  # subprocess timeout: these take a couple of seconds
SMALL = ["--memory", "32M", "--warmup", "0.2", "--run-after", "0.3"]


def dqmig(*args: str, timeout: float = RUN_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dqmig", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_migrate_to_a_local_destination(tmp_path):
    report_path = tmp_path / "report.json"
    p = dqmig("migrate", *SMALL, "--report", str(report_path))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[-1] == "completed"
    assert lines[0].startswith("dqmig migrate: 2 vCPUs, 32.0 MiB, workload skewed")
    assert any(line.startswith("status completed:") for line in lines)
    assert any(line.startswith("destination: digest verified") for line in lines)
    assert f"report written to {report_path}" in p.stdout
    assert "Traceback" not in p.stderr

    report = json.loads(report_path.read_text())
    assert {"dqmig", "argv", "vm", "vcpu-classes", "migration", "destination"} <= set(report)
    assert report["vm"]["memory"] == 32 << 20
    m = report["migration"]
    assert m["result"]["status"] == "completed"
    assert m["converged"] is True
    assert m["result"]["ram"]["dirty-sync-count"] >= 2
    events = [s["event"] for s in m["samples"]]
    assert events[0] == "setup" and events[-1] == "complete"
    assert all(len(s["vcpus"]) == 2 for s in m["samples"])
    dest = report["destination"]
    assert dest is not None
    assert dest["handshake"]["pages"] == (32 << 20) // 4096
    assert dest["pages-normal"] == m["result"]["ram"]["normal"]
    assert dest["pages-zero"] == m["result"]["ram"]["duplicate"]
    assert dest["iterations"] == events.count("sync")
    assert isinstance(dest["digest"], int)
    # The writer runs on the destination after resume.
    assert dest["progress-after-resume"]["vcpu0"] > 0


def test_migrate_to_nothing_fails_with_the_reason(tmp_path):
    uri = free_port_uri()
    report_path = tmp_path / "report.json"
    p = dqmig("migrate", *SMALL, "--to", uri, "--report", str(report_path))
    assert p.returncode != 0
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("failed: cannot connect to " + uri), p.stdout
    assert "Traceback" not in p.stderr
    report = json.loads(report_path.read_text())
    assert report["migration"]["result"]["status"] == "failed"
    assert report["destination"] is None


def test_migrate_with_a_bad_uri_is_a_clear_error(tmp_path):
    p = dqmig("migrate", *SMALL, "--to", "nonsense", "--report", str(tmp_path / "r.json"))
    assert p.returncode != 0
    assert "bad migration URI 'nonsense'" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr, p.stderr


def test_incoming_with_bad_uris():
    for uri in ("nonsense", "tcp:127.0.0.1", "tcp:127.0.0.1:99999", "unix:/tmp/x"):
        p = dqmig("incoming", uri, "--accept-timeout", "1")
        assert p.returncode != 0, uri
        assert f"bad migration URI {uri!r}: expected tcp:HOST:PORT" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


def test_incoming_on_a_busy_port():
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        p = dqmig("incoming", f"tcp:127.0.0.1:{port}", "--accept-timeout", "1")
    assert p.returncode != 0
    assert f"cannot listen on tcp:127.0.0.1:{port}" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_incoming_gives_up_when_nothing_arrives():
    p = dqmig("incoming", "tcp:127.0.0.1:0", "--accept-timeout", "0.3")
    assert p.returncode == 1
    assert "listening on tcp:127.0.0.1:" in p.stdout
    assert "no migration arrived" in p.stderr and "in time" in p.stderr
    assert "Traceback" not in p.stderr


def _qmp(path: str, timeout: float = 10.0):
    """A minimal QMP client over a unix socket: returns a function command -> reply."""
    import os
    import time

    end = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < end, f"no QMP socket at {path}"
        time.sleep(0.05)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    sock.connect(path)
    reader = sock.makefile("rb")
    json.loads(reader.readline())  # greeting

    def cmd(command: str, **arguments) -> dict:
        sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while "event" in (reply := json.loads(reader.readline())):  # e.g. STOP at the switchover
            pass
        return reply

    assert cmd("qmp_capabilities") == {"return": {}}
    return cmd


def test_qmp_migrate_retried_after_a_failure_reports_the_last_attempt(tmp_path):
    import time

    sock, report_path = str(tmp_path / "q.sock"), tmp_path / "r.json"
    args = [sys.executable, "-m", "dqmig", "migrate", *SMALL, "--qmp", f"unix:{sock}", "--defer"]
    proc = subprocess.Popen([*args, "--report", str(report_path)], stdout=subprocess.PIPE, text=True)
    try:
        banner = proc.stdout.readline() + proc.stdout.readline()  # type: ignore[union-attr]
        dest = banner.rsplit("(destination ", 1)[1].split(")")[0]
        cmd = _qmp(sock)
        nothing = free_port_uri()
        assert cmd("migrate", uri=nothing) == {"return": {}}
        end = time.monotonic() + 10
        while cmd("query-migrate")["return"]["status"] != "failed":
            assert time.monotonic() < end, "the first attempt did not fail"
            time.sleep(0.05)
        assert cmd("migrate", uri=dest) == {"return": {}}
        end = time.monotonic() + RUN_S
        while cmd("query-migrate")["return"]["status"] != "completed":
            assert time.monotonic() < end, "the second attempt did not complete"
            time.sleep(0.05)
        # As QEMU's, the source stays up after the migration, postmigrate, until quit.
        assert cmd("query-status")["return"] == {"running": False, "status": "postmigrate"}
        assert cmd("quit") == {"return": {}}
        out, _ = proc.communicate(timeout=RUN_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    lines = out.strip().splitlines()
    assert lines[-1] == "completed"
    assert any(line.startswith(f"attempt 1 of 2: failed: cannot connect to {nothing}") for line in lines), out
    report = json.loads(report_path.read_text())
    assert report["migration"]["result"]["status"] == "completed"
    assert report["migration"]["uri"] == dest
    assert [(a["attempt"], a["status"]) for a in report["attempts"]] == [(1, "failed")]


def start_migrate(*args: str) -> subprocess.Popen:
    """`dqmig migrate` in a session of its own, so a signal to its process group is what a
    Ctrl-C at a terminal sends."""
    return subprocess.Popen(
        [sys.executable, "-m", "dqmig", "migrate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_line(stream, prefix: str, timeout: float = RUN_S) -> str:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if select.select([stream], [], [], left)[0]:
            line = stream.readline()
            if line.startswith(prefix):
                return line
            assert line, f"the stream ended before a line starting {prefix!r}"
    raise AssertionError(f"no line starting {prefix!r} within {timeout} s")


def interrupt(p: subprocess.Popen) -> tuple[str, str]:
    os.killpg(p.pid, signal.SIGINT)
    try:
        out, err = p.communicate(timeout=RUN_S)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return out, err


def test_ctrl_c_during_migrate_cancels_and_writes_the_report(tmp_path):
    report_path = tmp_path / "report.json"
    # A 1 MiB/s link for a writer's 16 MiB: still in the first iteration when interrupted.
    p = start_migrate("--memory", "32M", "--warmup", "0.2", "--writer-rate", "0", "--max-bandwidth", "1M",
                      "--report", str(report_path))  # fmt: skip
    wait_for_line(p.stderr, "active")
    out, err = interrupt(p)
    assert p.returncode == 130, out + err
    lines = out.strip().splitlines()
    assert lines[-1] == "cancelled: interrupted (SIGINT)"
    assert f"report written to {report_path}" in out
    assert "Traceback" not in err
    result = json.loads(report_path.read_text())["migration"]["result"]
    assert result["status"] == "cancelled" and result["error-desc"] == "interrupted (SIGINT)"
    assert 0 < result["ram"]["transferred"] < result["ram"]["total"]


def test_ctrl_c_before_the_migration_starts(tmp_path):
    report_path = tmp_path / "report.json"
    p = start_migrate("--memory", "32M", "--warmup", "30", "--report", str(report_path))
    wait_for_line(p.stdout, "dqmig migrate:")
    out, err = interrupt(p)
    assert p.returncode == 130, out + err
    assert out.strip().splitlines()[-1] == "cancelled: interrupted before the migration started"
    assert "Traceback" not in err
    assert not report_path.exists(), "no migration, no report"
