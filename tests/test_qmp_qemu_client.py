"""QEMU's own QMP client library (qemu.qmp, the one behind qmp-shell and QEMU's iotests),
unmodified, drives dqmig's QMP: its async QMPClient and its legacy QEMUMonitorProtocol.

Against QEMU 10.0's behaviour: events as monitor/qmp.c and qapi/qmp-event.c send them,
MIGRATION per migrate_set_state (migration/migration.c) and MIGRATION_PASS per
migration_bitmap_sync (migration/ram.c), both only with the `events` capability; STOP and
RESUME from vm_stop/vm_start (system/cpus.c, system/runstate.c); SHUTDOWN on quit
(qmp_quit, reason host-qmp-quit)."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from dqmig.migration.destination import free_port_uri
from dqmig.monitor import IncomingMonitor, Monitor
from dqmig.programs import ProgramSpec
from dqmig.qmp import QmpServer
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig

qmp = pytest.importorskip("qemu.qmp")
from qemu.qmp import ExecuteError, QMPClient  # noqa: E402
from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

T = 20.0  # the bound on any wait here


def guest(rate: float = 5000.0) -> VM:
    programs = [ProgramSpec("uniform", region_start=0, region_pages=1024, rate=rate, seed=1), ProgramSpec("idle")]
    return VM(VmConfig(vcpus=2, memory=16 * MiB, programs=programs))


@pytest.fixture
def sock_path():
    with tempfile.TemporaryDirectory(prefix="dqmig-qmp-") as d:
        yield os.path.join(d, "qmp.sock")


class Source:
    """A source as `dqmig migrate --qmp` runs one: a VM, its monitor, a QMP server, and the
    CLI's lifetime loop (quit: SHUTDOWN, then the server closes)."""

    def __init__(self, path: str, rate: float = 5000.0) -> None:
        self.vm = guest(rate).start()
        self.monitor = Monitor(self.vm)
        self.server = QmpServer(f"unix:{path}", self.monitor).start()
        self._lifetime = threading.Thread(target=self._wait_quit, daemon=True)
        self._lifetime.start()

    def _wait_quit(self) -> None:
        if self.monitor.quit_requested.wait(T * 3):
            self.monitor.shutdown()
            self.server.close()

    def close(self) -> None:
        self.monitor.quit_requested.set()
        self._lifetime.join(T)
        self.server.close()
        if self.monitor.migration is not None:
            self.monitor.migration.cancel()
            self.monitor.migration.wait(T)
        self.vm.stop()


@pytest.fixture
def source(sock_path):
    s = Source(sock_path)
    yield s
    s.close()


def caps(**states: bool) -> dict:
    return {"capabilities": [{"capability": k, "state": v} for k, v in states.items()]}


async def next_event(client: QMPClient, name: str, **data) -> dict:
    """The next event `name` whose data has `data` (others on the way are skipped)."""

    async def wait() -> dict:
        while True:
            event = await client.events.get()
            if event["event"] == name and all(event.get("data", {}).get(k) == v for k, v in data.items()):
                return dict(event)

    return await asyncio.wait_for(wait(), T)


def test_async_client_drives_a_full_migration(source, sock_path, start_destination):
    async def main(uri: str) -> dict:
        client = QMPClient("dqmig-test")
        await asyncio.wait_for(client.connect(sock_path), T)  # greeting, then qmp_capabilities with oob
        assert client.greeting.QMP.capabilities == ["oob"]
        version = await client.execute("query-version")
        assert version["qemu"] == {"major": 10, "minor": 0, "micro": 2}
        assert await client.execute("query-kvm") == {"enabled": True, "present": True}
        cpus = await client.execute("query-cpus-fast")
        assert [c["cpu-index"] for c in cpus] == [0, 1]
        assert [c["thread-id"] for c in cpus] == [t.native_id for t in source.vm._threads[:2]]
        # events together with another capability, as scripts for QEMU do: one call
        await client.execute("migrate-set-capabilities", caps(events=True, multifd=True))
        await client.execute("migrate-set-parameters", {"max-bandwidth": 0, "multifd-channels": 2})
        params = await client.execute("query-migrate-parameters")
        assert params["multifd-channels"] == 2 and params["tls-creds"] == "" and params["mode"] == "normal"
        await client.execute("migrate", {"uri": uri})
        await next_event(client, "MIGRATION", status="completed")
        info = await client.execute("query-migrate")
        assert info["status"] == "completed" and info["ram"]["remaining"] == 0
        assert info["ram"]["multifd-bytes"] == info["ram"]["transferred"] > 0
        assert await client.execute("query-status") == {"running": False, "status": "postmigrate"}
        await client.execute("quit")
        shutdown = await next_event(client, "SHUTDOWN")
        await client.disconnect()
        return shutdown

    with start_destination() as rx:
        shutdown = asyncio.run(main(rx.uri))
        rx.join()
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert set(shutdown["timestamp"]) == {"seconds", "microseconds"}
    assert abs(shutdown["timestamp"]["seconds"] - time.time()) < 60


def test_legacy_client_events_cancel_and_retry(sock_path, start_destination):
    """QEMUMonitorProtocol as iotests use it: negotiate, events on, parameters, a migration
    that cannot converge cancelled (cancelling, then cancelled; the guest runs on), then a
    new `migrate` on the same source that completes."""
    s = Source(sock_path, rate=0)
    try:
        mon = QEMUMonitorProtocol(sock_path)
        mon.settimeout(T)
        greeting = mon.connect(negotiate=True)
        assert greeting["QMP"]["version"]["package"].startswith("dqmig ")
        assert mon.cmd("migrate-set-capabilities", **caps(events=True)) == {}
        assert mon.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MiB, "downtime-limit": 1}) == {}
        with start_destination() as rx:
            mon.cmd("migrate", uri=rx.uri)
            events = [mon.pull_event(wait=T) for _ in range(3)]
            assert [(e["event"], e["data"]) for e in events] == [
                ("MIGRATION", {"status": "setup"}),
                ("MIGRATION_PASS", {"pass": 1}),
                ("MIGRATION", {"status": "active"}),
            ]
            threads = mon.cmd("query-migrationthreads")
            assert threads[0]["name"] == "mig/src/main" and threads[0]["thread-id"] > 0
            mon.cmd("migrate_cancel")
            statuses = []
            while not statuses or statuses[-1] != "cancelled":
                e = mon.pull_event(wait=T)
                if e["event"] == "MIGRATION":
                    statuses.append(e["data"]["status"])
            assert statuses == ["cancelling", "cancelled"]
            rx.join()
        assert mon.cmd("query-migrate")["status"] == "cancelled"
        assert mon.cmd("query-status") == {"running": True, "status": "running"}
        assert mon.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 2000}) == {}
        mon.clear_events()
        with start_destination() as rx:
            mon.cmd("migrate", uri=rx.uri)
            names, statuses = [], []
            while (e := mon.pull_event(wait=T)).get("data") != {"status": "completed"}:
                names.append(e["event"])
                if e["event"] == "MIGRATION":
                    statuses.append(e["data"]["status"])
            assert "STOP" in names and "MIGRATION_PASS" in names, names
            # Stop-and-copy stays "active" (migration_maybe_pause: DEVICE needs pause-before-switchover).
            assert statuses == ["setup", "active"], statuses
            rx.join()
        assert mon.cmd("query-migrate")["status"] == "completed"
        assert len(s.monitor.attempts) == 2
        assert mon.cmd("quit") == {}
        assert mon.pull_event(wait=T)["event"] == "SHUTDOWN"
        mon.close()
    finally:
        s.close()


def test_stop_and_cont_with_their_events(source, sock_path):
    mon = QEMUMonitorProtocol(sock_path)
    mon.settimeout(T)
    mon.connect()
    assert mon.cmd("stop") == {}
    assert mon.pull_event(wait=T)["event"] == "STOP"
    assert mon.cmd("query-status") == {"running": False, "status": "paused"}
    assert mon.cmd("stop") == {}  # already stopped: no second STOP (do_vm_stop)
    assert mon.cmd("cont") == {}
    assert mon.pull_event(wait=T)["event"] == "RESUME"
    assert mon.get_events() == []
    assert mon.cmd("query-status") == {"running": True, "status": "running"}
    mon.close()


def test_every_qmp_error_class_dqmig_raises(source, sock_path):
    """qapi/error.json: GenericError and CommandNotFound are what dqmig's commands can
    raise; DeviceNotActive, DeviceNotFound and KVMMissingCap belong to commands dqmig has
    not got (devices, KVM capabilities)."""

    async def main() -> list[tuple[str, str]]:
        client = QMPClient()
        await asyncio.wait_for(client.connect(sock_path), T)
        found = []
        for cmd, args in [
            ("no-such-command", None),
            ("query-status", {"x": 1}),
            ("migrate-set-parameters", {"downtime-limit": "fast"}),
            ("set-vcpu-dirty-limit", {"dirty-rate": 1, "cpu-index": "0"}),
            ("migrate-set-capabilities", caps(xbzrle=True, events=True)),
            ("migrate-set-parameters", {"tls-creds": "tls0"}),
            ("migrate-set-parameters", {"multifd-compression": "zstd"}),
            ("migrate", {"channels": [{"channel-type": "main", "addr": {"transport": "exec", "args": ["cat"]}}]}),
            ("qmp_capabilities", None),
        ]:
            with pytest.raises(ExecuteError) as e:
                await client.execute(cmd, args)
            found.append((e.value.error_class, e.value.error.error.desc))
        caps_now = {c["capability"]: c["state"] for c in await client.execute("query-migrate-capabilities")}
        await client.disconnect()
        assert caps_now["events"] is False, "all or nothing: events was not set with xbzrle"
        return found

    assert asyncio.run(main()) == [
        ("CommandNotFound", "The command no-such-command has not been found"),
        ("GenericError", "Parameter 'x' is unexpected"),
        ("GenericError", "Parameter 'downtime-limit' expects uint64"),
        ("GenericError", "Invalid parameter type for 'cpu-index', expected: integer"),
        ("GenericError", "Capability 'xbzrle': dqmig does not emulate it; it can only be false"),
        ("GenericError", 'Parameter \'tls-creds\': dqmig does not emulate "tls0"; it accepts only ""'),
        ("GenericError", 'Parameter \'multifd-compression\': dqmig does not emulate "zstd"; it accepts only "none"'),
        ("GenericError", "dqmig migrates over TCP only (transport socket, type inet), not exec"),
        ("CommandNotFound", "Capabilities negotiation is already complete, command ignored"),
    ]


def test_defaults_of_unemulated_parameters_and_capabilities_are_accepted(source, sock_path):
    mon = QEMUMonitorProtocol(sock_path)
    mon.settimeout(T)
    mon.connect()
    defaults = mon.cmd("query-migrate-parameters")
    assert mon.cmd("migrate-set-parameters", **defaults) == {}, "every reported value can be set back"
    assert mon.cmd("migrate-set-parameters", **{"tls-creds": None, "zero-page-detection": "legacy"}) == {}
    off = [{"capability": c["capability"], "state": False} for c in mon.cmd("query-migrate-capabilities")]
    assert mon.cmd("migrate-set-capabilities", capabilities=off) == {}
    mon.close()


def raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(T)
    sock.connect(path)
    return sock


def lines(sock: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\r\n") < n:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        buf += chunk
    return [json.loads(line) for line in buf.split(b"\r\n")[:n]]


def test_pretty_printed_and_back_to_back_json(source, sock_path):
    sock = raw(sock_path)
    assert "QMP" in lines(sock, 1)[0]
    sock.sendall(b'{"execute":"qmp_capabilities"}{"execute":"query-name","id":1}{"execute":"query-version","id":2}')
    replies = lines(sock, 3)
    assert replies[0] == {"return": {}} and replies[1] == {"return": {}, "id": 1} and replies[2]["id"] == 2
    pretty = json.dumps({"execute": "query-status", "id": "p"}, indent=4).encode()
    assert pretty.count(b"\n") >= 3
    for i in range(0, len(pretty), 5):  # in pieces, as a slow writer sends it
        sock.sendall(pretty[i : i + 5])
    assert lines(sock, 1) == [{"return": {"running": True, "status": "running"}, "id": "p"}]
    sock.close()


def test_incoming_qmp_defer_and_the_destination_states(sock_path, tmp_path):
    """`dqmig incoming defer --qmp`: inmigrate until the guest runs here; migrate-incoming
    starts listening; the incoming side's query-migrate and events; quit ends it."""
    src_sock = str(tmp_path / "src.sock")
    if len(src_sock) > 100:
        pytest.skip("socket path too long")
    dst = subprocess.Popen(
        [sys.executable, "-m", "dqmig", "incoming", "defer", "--qmp", f"unix:{sock_path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([dst.stdout], [], [], T)  # never an unbounded wait
        assert ready and "migrate-incoming" in dst.stdout.readline()  # type: ignore[union-attr]
        mon = QEMUMonitorProtocol(sock_path)
        mon.settimeout(T)
        _connect_retrying(mon)
        assert mon.cmd("query-status") == {"running": False, "status": "inmigrate"}
        assert mon.cmd("query-migrate") == {}
        assert mon.cmd("migrate-set-capabilities", **caps(events=True)) == {}
        uri = free_port_uri()
        assert mon.cmd("migrate-incoming", uri=uri) == {}
        assert mon.pull_event(wait=T)["data"] == {"status": "setup"}
        host, port = uri.split(":")[1:]
        assert mon.cmd("query-migrate") == {
            "status": "setup",
            "socket-address": [{"type": "inet", "host": host, "port": port}],
        }
        with pytest.raises(ExecuteError, match="already been started"):
            mon.cmd("migrate-incoming", uri=uri)
        s = Source(src_sock)
        try:
            s.monitor.migrate({"uri": uri})
            assert s.monitor.migration.wait(T) == "completed"
        finally:
            s.close()
        events = [mon.pull_event(wait=T) for _ in range(3)]
        assert [(e["event"], e.get("data")) for e in events] == [
            ("MIGRATION", {"status": "active"}),
            ("RESUME", None),
            ("MIGRATION", {"status": "completed"}),
        ]
        assert mon.cmd("query-status") == {"running": True, "status": "running"}
        assert len(mon.cmd("query-cpus-fast")) == 2
        assert mon.cmd("quit") == {}
        assert mon.pull_event(wait=T)["event"] == "SHUTDOWN"
        mon.close()
        out, err = dst.communicate(timeout=T)
    finally:
        dst.kill()
    assert dst.returncode == 0, err
    assert "completed" in out


def _connect_retrying(mon: QEMUMonitorProtocol) -> None:
    end = time.monotonic() + T
    while True:
        try:
            mon.connect()
            return
        except Exception:  # the socket is not there yet
            assert time.monotonic() < end
            time.sleep(0.05)


def test_incoming_monitor_refuses_migrate_incoming_without_defer():
    m = IncomingMonitor()
    with pytest.raises(Exception, match="'-incoming' was not specified"):
        m.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
