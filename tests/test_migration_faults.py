"""Migration faults: an unreachable or dying destination, connections dropped in every
phase, migrate_cancel in every phase, a migration that does not converge.

Each must end the source in 'failed' or 'cancelled' with a clear error-desc, with its VM
running and its memory intact. "Intact" is checked exactly: the guest programs are
deterministic and each vCPU writes its own region, so memory after a vCPU has run n steps
depends only on n. After the fault the source is paused, each writer's step count read,
and a fresh VM replays exactly those steps flat out: the two memories must be identical.
"""

from __future__ import annotations

import dataclasses
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from dqmig import _native
from dqmig.migration import channel as channel_module
from dqmig.migration import destination as destination_module
from dqmig.migration.channel import parse_uri
from dqmig.migration.destination import IncomingError, free_port_uri
from dqmig.migration.params import MigrationParameters
from dqmig.migration.source import Migration
from dqmig.programs import ProgramSpec, own_regions
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig

PAGE = 4096
END_S = 15.0  # a failed or cancelled migration ends well within this
CLOSED = re.compile(r"closed|reset|broken pipe|peer", re.I)


def fault_config(memory: int = 16 * MiB, *, dma: bool = False, rate: float = 20000.0) -> VmConfig:
    """Two vCPUs (and optionally a DMA writer) writing their own regions, forever."""
    pages = memory // PAGE
    regions = own_regions(pages, 3 if dma else 2)
    kinds = [("uniform", 8), ("hot-cold", 64)]
    programs = [
        ProgramSpec(kind, region_start=regions[i][0], region_pages=regions[i][1], write_size=w, rate=rate, seed=7 + i)
        for i, (kind, w) in enumerate(kinds)
    ]
    dma_spec = None
    if dma:
        start, n = regions[2]
        dma_spec = ProgramSpec("sequential", region_start=start, region_pages=n, write_size=4096, rate=rate / 4, seed=9)
    return VmConfig(vcpus=2, memory=memory, programs=programs, dma=dma_spec)


def params(
    *, bandwidth: int = 0, downtime: int = 300, multifd: bool = False, max_time: float = 20.0
) -> MigrationParameters:
    p = MigrationParameters()
    p.set("max-bandwidth", bandwidth)
    p.set("downtime-limit", downtime)
    p.set("multifd-channels", 2)
    p.set("x-max-time", max_time)  # a safety net: no test can loop forever
    p.set_capability("multifd", multifd)
    return p


# A migration that does not converge: with downtime-limit 0 only an empty dirty set ends it.
NEVER_CONVERGES = dict(bandwidth=64 * MiB, downtime=0)
FAST = 200_000.0  # steps/s for those: writers that never leave a sync with nothing dirty
# One that converges at once, even through the (slow, Python) proxy on a busy machine.
CONVERGES = dict(downtime=5000)


def progress(vm: VM) -> list[int]:
    return [v.progress for v in vm.all_writers]


def prefilled_guest(config: VmConfig) -> _native.Guest:
    """Guest memory whose every page holds data before the guest runs (loaded, not dirtied)."""
    g = _native.Guest(config.pages, config.page_size, config.vcpus, config.dirty_ring)
    for p in range(g.pages):
        g.write_page(p, struct.pack("<QQ", p + 1, 0x5EED) * (config.page_size // 16))
    return g


def replay_digest(config: VmConfig, steps: list[int], wait_until, prefilled: bool = False) -> int:
    """Memory after each writer ran exactly `steps[i]` steps (flat out: the rate only paces)."""
    assert all(n > 0 for n in steps), "steps=0 would mean 'forever'"
    programs = [dataclasses.replace(p, steps=n, rate=0.0) for p, n in zip(config.programs, steps, strict=False)]
    dma = dataclasses.replace(config.dma, steps=steps[-1], rate=0.0) if config.dma else None
    replay = dataclasses.replace(config, programs=programs, dma=dma)
    with VM(replay, guest=prefilled_guest(config) if prefilled else None) as vm:
        wait_until(lambda: all(vm.done), what="the replay to finish")
        assert progress(vm) == steps
        return vm.guest.digest()


def assert_source_intact(vm: VM, wait_until, prefilled: bool = False) -> None:
    """The source runs again, no longer logs dirty pages, and its memory is exactly what its
    own guest programs wrote (over `prefilled_guest` memory if `prefilled`)."""
    assert vm.running, "the source VM must run after a failed or cancelled migration"
    assert not vm.guest.dirty_logging
    before = progress(vm)
    wait_until(
        lambda: all(a > b for a, b in zip(progress(vm), before, strict=True)),
        what="every source writer to make progress",
    )
    vm.pause()
    steps = progress(vm)
    digest = vm.guest.digest()
    replayed = replay_digest(vm.config, steps, wait_until, prefilled)
    assert replayed == digest, "source memory was changed by the migration"
    vm.resume()


def ram(m: Migration, key: str) -> int:
    """A query-migrate ram counter."""
    return m.query().get("ram", {}).get(key, 0)


def assert_ended(m: Migration, status: str, desc: re.Pattern | str) -> dict:
    assert m.wait(END_S) == status, (m.status, m.error_desc)
    assert not m.active
    q = m.query()
    assert q["status"] == status
    assert q.get("error-desc"), "a failed or cancelled migration says why"
    assert re.search(desc, q["error-desc"]), q["error-desc"]
    assert m.samples and m.samples[-1]["event"] == "end"
    return q


def assert_destination_failed(rx) -> IncomingError:
    rx.join()
    assert rx.result is None
    assert isinstance(rx.error, IncomingError), repr(rx.error)
    assert str(rx.error)
    return rx.error


class CuttingProxy:
    """A TCP proxy between source and destination. It forwards every connection both ways
    and cuts all of them (both sides, with a reset) once `limit` bytes went from source to
    destination in total, or when `cut()` is called."""

    def __init__(self, upstream: str, limit: int | None = None) -> None:
        self.upstream = parse_uri(upstream)
        self.limit = limit
        self.forwarded = 0
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.uri = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy", daemon=True)
        self._acceptor.start()

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if self._cut.is_set():
                    _reset(down)
                    continue
                up = socket.create_connection(self.upstream, timeout=5)
                self.connections += 1
                self._socks += [down, up]
                for src, dst, counted in ((down, up, True), (up, down, False)):
                    t = threading.Thread(target=self._pump, args=(src, dst, counted), name="proxy-pump", daemon=True)
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        src.settimeout(0.1)
        while not self._cut.is_set():
            try:
                chunk = src.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if counted and self.limit is not None:
                with self._lock:
                    room = max(0, self.limit - self.forwarded)
                    chunk = chunk[:room]
                    self.forwarded += len(chunk)
                    reached = self.forwarded >= self.limit
            else:
                reached = False
            try:
                if chunk:
                    dst.sendall(chunk)
            except OSError:
                return
            if reached:
                self.cut()
                return

    def cut(self) -> None:
        """Drops every connection: both the source and the destination see a reset."""
        with self._lock:
            if self._cut.is_set():
                return
            self._cut.set()
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        me = threading.current_thread()
        for t in list(self._threads):
            if t is not me:
                t.join(2)
        for s in socks:
            _reset(s)

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._acceptor.join(2)
        self.listener.close()

    def __enter__(self) -> CuttingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reset(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    s.close()


# -- the harness itself ----------------------------------------------------------------------


@pytest.mark.parametrize("prefilled", [False, True])
def test_replay_reproduces_a_paused_guest(prefilled, wait_until):
    """The 'memory intact' check is exact: a guest paused after any number of steps equals
    its replay, and differs from a replay that is one step off."""
    config = fault_config(dma=True)
    with VM(config, guest=prefilled_guest(config) if prefilled else None) as vm:
        wait_until(lambda: all(progress(vm)), what="every writer to start")
        time.sleep(0.05)
        vm.pause()
        steps = progress(vm)
        digest = vm.guest.digest()
        assert replay_digest(config, steps, wait_until, prefilled) == digest
        off = [steps[0] + 1, *steps[1:]]
        assert replay_digest(config, off, wait_until, prefilled) != digest


def test_migration_through_the_proxy_completes(start_destination):
    """Control: the proxy alone does not disturb a migration."""
    with start_destination() as rx, CuttingProxy(rx.uri) as proxy, VM(fault_config()) as vm:
        time.sleep(0.05)
        m = Migration(vm, proxy.uri, params(multifd=True, **CONVERGES)).start()
        assert m.wait(END_S) == "completed", m.error_desc
        rx.join()
        assert rx.result is not None and rx.result.digest == vm.guest.digest()
        assert proxy.connections == 3


# -- the destination is not there or goes away -----------------------------------------------


def test_unreachable_destination(wait_until):
    uri = free_port_uri()
    with VM(fault_config()) as vm:
        time.sleep(0.05)
        m = Migration(vm, uri, params()).start()
        q = assert_ended(m, "failed", "cannot connect")
        assert uri in q["error-desc"]
        assert q["ram"]["transferred"] == 0
        assert_source_intact(vm, wait_until)


def test_connection_dropped_during_setup(start_destination, wait_until):
    """The proxy cuts in the middle of the handshake record."""
    with start_destination() as rx, CuttingProxy(rx.uri, limit=20) as proxy, VM(fault_config()) as vm:
        time.sleep(0.05)
        m = Migration(vm, proxy.uri, params()).start()
        q = assert_ended(m, "failed", CLOSED)
        assert proxy.is_cut
        assert q["ram"]["dirty-sync-count"] == 0, "setup never finished"
        assert "setup" not in [s["event"] for s in m.samples]
        err = assert_destination_failed(rx)
        assert re.search(r"truncated|closed", str(err)), err
        assert_source_intact(vm, wait_until)


@pytest.mark.parametrize("multifd", [False, True], ids=["single", "multifd"])
def test_connection_dropped_during_bulk(multifd, start_destination, wait_until):
    """The proxy cuts 1 MiB into the first pass over memory. Every page holds data before the
    guest starts (zero pages would travel as 8-byte flags), so the pass is 32 MiB long."""
    config = fault_config(32 * MiB)
    guest = prefilled_guest(config)
    with start_destination() as rx, CuttingProxy(rx.uri, limit=1 * MiB) as proxy, VM(config, guest=guest) as vm:
        time.sleep(0.05)
        m = Migration(vm, proxy.uri, params(multifd=multifd, bandwidth=128 * MiB, downtime=10)).start()
        q = assert_ended(m, "failed", CLOSED)
        assert proxy.is_cut
        assert q["ram"]["dirty-sync-count"] == 1, "still in the first pass (bulk)"
        assert q["ram"]["transferred"] < config.memory
        assert_destination_failed(rx)
        assert_source_intact(vm, wait_until, prefilled=True)


@pytest.mark.parametrize("multifd", [False, True], ids=["single", "multifd"])
def test_connection_dropped_during_iterations(multifd, start_destination, wait_until):
    """The proxy cuts once the source has synced the dirty log a few times."""
    with start_destination() as rx, CuttingProxy(rx.uri) as proxy, VM(fault_config(rate=FAST)) as vm:
        time.sleep(0.05)
        m = Migration(vm, proxy.uri, params(multifd=multifd, **NEVER_CONVERGES)).start()
        wait_until(lambda: ram(m, "dirty-sync-count") >= 4 or not m.active, what="a few iterations")
        assert m.status == "active"
        proxy.cut()
        q = assert_ended(m, "failed", CLOSED)
        assert q["ram"]["dirty-sync-count"] >= 4
        assert_destination_failed(rx)
        assert_source_intact(vm, wait_until)


@pytest.mark.parametrize("multifd", [False, True], ids=["single", "multifd"])
def test_connection_dropped_during_stop_and_copy(multifd, start_destination, wait_until):
    """A hook on the source VM's pause (the start of stop-and-copy) cuts the connection
    right after the vCPUs stopped: the device phase is too short to hit from outside."""
    with start_destination() as rx, CuttingProxy(rx.uri) as proxy, VM(fault_config()) as vm:
        pause = vm.pause
        statuses = []

        def pause_then_cut(*args, **kwargs):
            pause(*args, **kwargs)
            statuses.append(m.status)
            proxy.cut()

        vm.pause = pause_then_cut
        time.sleep(0.05)
        m = Migration(vm, proxy.uri, params(multifd=multifd, **CONVERGES)).start()
        assert_ended(m, "failed", CLOSED)
        del vm.pause
        assert statuses == ["device"]
        assert "stop" in [s["event"] for s in m.samples]
        assert "downtime" not in m.query()
        assert_destination_failed(rx)
        assert_source_intact(vm, wait_until)


def test_destination_refuses_at_switchover(start_destination, wait_until, monkeypatch):
    """The destination fails after it got everything (here: it cannot rebuild the vCPUs): it
    says why, and the source, stopped waiting for 'resumed', runs again."""

    def broken(*args, **kwargs):
        raise ValueError("injected failure")

    monkeypatch.setattr(destination_module, "_vm_from_device_state", broken)
    with start_destination() as rx, VM(fault_config()) as vm:
        time.sleep(0.05)
        m = Migration(vm, rx.uri, params()).start()
        q = assert_ended(m, "failed", "peer reported: bad device state: injected failure")
        assert "stop" in [s["event"] for s in m.samples]
        assert q["ram"]["remaining"] == 0
        err = assert_destination_failed(rx)
        assert "bad device state: injected failure" in str(err)
        assert_source_intact(vm, wait_until)


def _slow_guest_build(monkeypatch, delay: float) -> None:
    """The destination takes `delay` s to build its guest before it acks the handshake (as a
    large --mem-prealloc does), and every other wire wait is bounded by 0.5 s."""
    build = destination_module.Incoming._build_guest

    def slow(self, h):
        time.sleep(delay)
        return build(self, h)

    monkeypatch.setattr(destination_module.Incoming, "_build_guest", slow)
    monkeypatch.setattr(channel_module, "IO_TIMEOUT_S", 0.5)


def test_handshake_wait_allows_for_preallocation(start_destination, monkeypatch):
    """A destination slower to ack than the I/O timeout (it backs the guest's memory first)
    is waited for: the ack's timeout grows with the guest's size."""
    _slow_guest_build(monkeypatch, delay=1.5)
    monkeypatch.setattr(channel_module, "PREALLOC_S_PER_GIB", 1000.0)  # 16 MiB: 15.6 s
    with start_destination() as rx, VM(fault_config()) as vm:
        time.sleep(0.05)
        m = Migration(vm, rx.uri, params(**CONVERGES)).start()
        assert m.wait(END_S) == "completed", m.error_desc
        rx.join()
        assert rx.result is not None and rx.result.digest == vm.guest.digest()


def test_handshake_wait_is_bounded(start_destination, wait_until, monkeypatch):
    """Without the allowance the same destination is given up on, and the reason says what
    the source was waiting for."""
    _slow_guest_build(monkeypatch, delay=1.5)
    monkeypatch.setattr(channel_module, "PREALLOC_S_PER_GIB", 0.0)
    with start_destination() as rx, VM(fault_config()) as vm:
        time.sleep(0.05)
        m = Migration(vm, rx.uri, params()).start()
        q = assert_ended(m, "failed", "did not acknowledge the handshake within 0.5 s")
        assert q["ram"]["dirty-sync-count"] == 0, "setup never finished"
        assert_destination_failed(rx)
        assert_source_intact(vm, wait_until)


def test_destination_page_channels_killed(start_destination, wait_until):
    """The destination's connections are shut down in the middle of a multifd migration."""
    with start_destination() as rx, VM(fault_config(rate=FAST)) as vm:
        time.sleep(0.05)
        m = Migration(vm, rx.uri, params(multifd=True, **NEVER_CONVERGES)).start()
        wait_until(lambda: ram(m, "dirty-sync-count") >= 3 or not m.active, what="a few iterations")
        assert m.status == "active"
        for ch in list(rx.incoming._channels)[1:]:  # the page channels, not the main one
            ch.shutdown()
        assert_ended(m, "failed", CLOSED)
        assert_destination_failed(rx)
        assert_source_intact(vm, wait_until)


def test_destination_process_killed(wait_until):
    cmd = [sys.executable, "-m", "dqmig", "incoming", "tcp:127.0.0.1:0", "--accept-timeout", "20", "--run-after", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        line = proc.stdout.readline() if ready else ""
        assert "listening on " in line, line
        uri = line.rsplit("listening on ", 1)[1].strip()
        config = fault_config(32 * MiB)
        # Every page holds data, so the first pass takes about a second at 32 MiB/s.
        with VM(config, guest=prefilled_guest(config)) as vm:
            time.sleep(0.05)
            m = Migration(vm, uri, params(bandwidth=32 * MiB)).start()
            wait_until(lambda: ram(m, "transferred") > 2 * MiB or not m.active, what="the migration to be under way")
            assert m.status == "active"
            proc.kill()
            proc.wait(10)
            assert_ended(m, "failed", CLOSED)
            assert_source_intact(vm, wait_until, prefilled=True)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


# -- migrate_cancel ----------------------------------------------------------------------------


def test_cancel_during_setup(wait_until):
    """A destination that takes the handshake and never answers holds the source in setup."""
    with socket.create_server(("127.0.0.1", 0)) as listener, VM(fault_config()) as vm:
        listener.settimeout(10)
        uri = f"tcp:127.0.0.1:{listener.getsockname()[1]}"
        m = Migration(vm, uri, params()).start()
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            got = b""
            while len(got) < 8 + 44:  # header + handshake: the source now waits for the ack
                chunk = conn.recv(4096)
                assert chunk, "the source closed before sending its handshake"
                got += chunk
            assert got[8:16] == b"DQMIGSTR"
            assert m.status == "setup"
            t0 = time.monotonic()
            m.cancel()
            assert_ended(m, "cancelled", "cancelled by migrate_cancel")
            assert time.monotonic() - t0 < 5, "cancel must not wait for an I/O timeout"
            assert conn.recv(4096) == b"", "the source closed the connection"
        assert_source_intact(vm, wait_until)


@pytest.mark.parametrize("multifd", [False, True], ids=["single", "multifd"])
def test_cancel_while_active(multifd, start_destination, wait_until):
    with start_destination() as rx, VM(fault_config(rate=FAST)) as vm:
        time.sleep(0.05)
        m = Migration(vm, rx.uri, params(multifd=multifd, **NEVER_CONVERGES)).start()
        wait_until(
            lambda: (ram(m, "dirty-sync-count") >= 2 and ram(m, "mbps") > 0) or not m.active,
            what="the migration to iterate and measure its bandwidth",
        )
        q = m.query()
        assert q["status"] == "active"
        assert "downtime" not in q and q.get("expected-downtime", 0) >= 0, q
        assert q["ram"]["mbps"] > 0 and q["ram"]["transferred"] > 0
        assert q["total-time"] >= q["setup-time"]
        m.cancel()
        assert_ended(m, "cancelled", "cancelled by migrate_cancel")
        assert m.converged is None
        assert_destination_failed(rx)
        assert_source_intact(vm, wait_until)


def hold_after_first_call(vm: VM, method: str) -> tuple[threading.Event, threading.Event]:
    """Makes the first call of `vm.<method>` run and then hold until released, to cancel at
    a moment that otherwise lasts milliseconds. Returns (reached, release); `del vm.<method>`
    restores the method."""
    original = getattr(vm, method)
    reached, release = threading.Event(), threading.Event()

    def run_and_hold(*args, **kwargs):
        result = original(*args, **kwargs)
        if not reached.is_set():
            reached.set()
            release.wait(10)
        return result

    setattr(vm, method, run_and_hold)
    return reached, release


def test_cancel_during_device_phase(start_destination, wait_until):
    """The device phase (vCPUs stopped, last pages going out) lasts milliseconds; a hook on
    the source VM's pause holds it until the test has cancelled."""
    with start_destination() as rx, VM(fault_config(dma=True)) as vm:
        stopped, cancelled = hold_after_first_call(vm, "pause")
        time.sleep(0.05)
        m = Migration(vm, rx.uri, params()).start()
        assert stopped.wait(END_S), "the migration never reached stop-and-copy"
        assert m.status == "device"
        assert not vm.running
        m.cancel()
        cancelled.set()
        assert_ended(m, "cancelled", "cancelled by migrate_cancel")
        del vm.pause
        assert "downtime" not in m.query()
        assert_destination_failed(rx)
        assert_source_intact(vm, wait_until)


def test_cancel_while_the_source_hashes(start_destination, wait_until):
    """Between the device state and the completion record the source hashes its memory; a
    cancel then still wins: no completion record goes out, the destination gives up."""
    with start_destination() as rx, VM(fault_config()) as vm:
        hashing, cancelled = hold_after_first_call(vm, "stop_dirty_log")  # just before the digest
        time.sleep(0.05)
        m = Migration(vm, rx.uri, params()).start()
        assert hashing.wait(END_S), "the migration never reached its digest"
        m.cancel()
        cancelled.set()
        assert_ended(m, "cancelled", "cancelled by migrate_cancel")
        del vm.stop_dirty_log
        assert_destination_failed(rx)
        assert_source_intact(vm, wait_until)


def test_cancel_after_the_completion_record_is_ignored(start_destination, monkeypatch):
    """Once the completion record is out the destination decides; a late cancel must not
    resume the source while the destination resumes its copy (two guests running)."""
    verified, go = threading.Event(), threading.Event()
    build = destination_module._vm_from_device_state

    def verified_then_hold(*args):
        verified.set()
        go.wait(10)
        return build(*args)

    monkeypatch.setattr(destination_module, "_vm_from_device_state", verified_then_hold)
    with start_destination() as rx, VM(fault_config()) as vm:
        time.sleep(0.05)
        m = Migration(vm, rx.uri, params()).start()
        assert verified.wait(END_S), "the destination never verified the digest"
        m.cancel()
        go.set()
        assert m.wait(END_S) == "completed", (m.status, m.error_desc)
        assert not vm.running, "the guest runs on the destination only"
        rx.join()
        assert rx.result is not None and rx.result.vm is not None, repr(rx.error)
        assert rx.result.vm.running
        assert rx.result.source_digest_time is not None and rx.result.digest_time >= 0
        rx.result.vm.stop()


def test_cancel_before_start_and_after_end_are_no_ops(wait_until):
    with VM(fault_config()) as vm:
        m = Migration(vm, free_port_uri(), params())
        m.cancel()
        assert m.status == "none"
        m.start()
        assert_ended(m, "failed", "cannot connect")
        m.cancel()
        assert m.status == "failed"
        with pytest.raises(RuntimeError, match="already started"):
            m.start()
        assert_source_intact(vm, wait_until)


def test_not_converging_gives_up(start_destination, wait_until):
    """x-max-iterations: a migration that does not converge is cancelled, not left running."""
    with start_destination() as rx, VM(fault_config(rate=FAST)) as vm:
        time.sleep(0.05)
        p = params(**NEVER_CONVERGES)
        p.set("x-max-iterations", 3)
        m = Migration(vm, rx.uri, p).start()
        q = assert_ended(m, "cancelled", "did not converge within 3 iterations")
        assert m.converged is False
        assert q["ram"]["dirty-sync-count"] == 4
        assert_destination_failed(rx)
        assert_source_intact(vm, wait_until)


def test_cancel_while_connecting(wait_until):
    """migrate_cancel takes effect promptly even while the TCP connect is still pending.
    A listener with a full accept queue (backlog 0, one connection queued) drops further
    SYNs, so the source's connect hangs until its timeout unless cancel interrupts it."""
    with socket.socket() as listener, VM(fault_config()) as vm:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        addr = listener.getsockname()
        fillers = []
        try:
            for _ in range(3):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(addr)
                fillers.append(s)
            time.sleep(0.1)
            m = Migration(vm, f"tcp:127.0.0.1:{addr[1]}", params()).start()
            time.sleep(0.3)
            assert m.status == "setup" and m._main is None, "the connect should still be pending"
            t0 = time.monotonic()
            m.cancel()
            m.wait(3)
            took = time.monotonic() - t0
            assert m.status == "cancelled", f"still {m.status} {took:.1f} s after migrate_cancel"
            assert m.error_desc == "cancelled by migrate_cancel"
        finally:
            for s in fillers:
                s.close()
        assert_source_intact(vm, wait_until)


def test_a_resume_the_source_never_hears_of_leaves_exactly_one_guest(start_destination, wait_until, monkeypatch):
    """The connection drops after the destination started its guest but before 'resumed'
    could reach the source. Past the commit the source never resumes its own copy: it fails
    with the outcome unknown and stays paused, so the destination's guest runs on, the only
    one. A hook on the destination cuts the proxy right after it built the guest."""
    built: list[VM] = []
    build = destination_module._vm_from_device_state

    with start_destination() as rx, CuttingProxy(rx.uri) as proxy, VM(fault_config()) as vm:

        def build_then_cut(guest, state):
            dst = build(guest, state)
            built.append(dst)
            proxy.cut()
            return dst

        monkeypatch.setattr(destination_module, "_vm_from_device_state", build_then_cut)
        time.sleep(0.05)
        m = Migration(vm, proxy.uri, params(**CONVERGES)).start()
        assert_ended(m, "failed", "switchover outcome unknown")
        assert m.outcome_unknown and not vm.running, "the source's copy stays paused"
        rx.join()
        assert len(built) == 1
        try:
            assert built[0].running, "the destination's guest is the one that runs"
        finally:
            built[0].stop()


@pytest.mark.parametrize("phase", ["active", "device"])
def test_failed_migration_leaves_a_paused_guest_paused(phase, start_destination, monkeypatch):
    """A guest the user stopped before migrating stays stopped when the migration fails
    (QEMU resumes only a guest that was running when the migration started)."""
    if phase == "device":
        monkeypatch.setattr(destination_module, "_vm_from_device_state", _raise_injected)
    config = fault_config()
    with start_destination() as rx, VM(config, guest=prefilled_guest(config)) as vm:
        time.sleep(0.05)
        vm.pause()
        held = progress(vm)
        # A stopped guest dirties nothing: only a slow first pass (every page holds data)
        # holds the migration active.
        p = params(**(dict(bandwidth=2 * MiB, downtime=1) if phase == "active" else {}))
        m = Migration(vm, rx.uri, p).start()
        if phase == "active":
            end = time.monotonic() + END_S
            while not (m.status == "active" and ram(m, "transferred")) and m.active and time.monotonic() < end:
                time.sleep(0.005)
            assert m.status == "active" and ram(m, "dirty-sync-count") == 1
            m.cancel()
            assert_ended(m, "cancelled", "cancelled by migrate_cancel")
        else:
            assert_ended(m, "failed", "injected failure")
        assert_destination_failed(rx)
        time.sleep(0.05)
        assert not vm.running, "the migration resumed a guest the user had stopped"
        assert progress(vm) == held


def _raise_injected(*args, **kwargs):
    raise ValueError("injected failure")


def test_a_failure_without_a_message_still_says_why(monkeypatch, wait_until):
    """Adversarial pass, defect 10: an error with no text (TimeoutError()) left error-desc
    empty; it is named by its type."""
    from dqmig.migration import channel as channel_module

    def silent(*args, **kwargs):
        raise TimeoutError()

    monkeypatch.setattr(channel_module, "connect", silent)
    with VM(fault_config()) as vm:
        m = Migration(vm, "tcp:127.0.0.1:1", params()).start()
        assert m.wait(END_S) == "failed"
        assert m.error_desc == "TimeoutError (no detail)"
        assert m.query()["error-desc"] == "TimeoutError (no detail)"
        wait_until(lambda: vm.running, what="the source to keep running")
