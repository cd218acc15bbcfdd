"""Every record has a deadline (issue 11, defect 5), and a peer that gives up says why (10).

Socket timeouts bound each system call; a record's deadline bounds the record whole
(stream.rs, `Deadline`: the channel's timeout plus the record's length at MIN_RECORD_RATE,
from its first byte). So a peer that trickles a byte now and then, or stops reading part-way
through a send, fails the migration within that bound instead of holding it open.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from dqmig import _native
from dqmig.migration import channel as channel_module
from dqmig.migration import destination as destination_module
from dqmig.migration.channel import parse_uri
from dqmig.migration.params import MigrationParameters
from dqmig.migration.source import BATCH_PAGES, Migration
from dqmig.programs import ProgramSpec
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig

REC = _native.RECORD_TYPES
IO_S = 1.0  # the channels' timeout in these tests (30 s in use)
RUN_S = 30.0
# A full page batch at the minimum rate, on top of the timeout.
BATCH_S = BATCH_PAGES * (4096 + 8) / _native.MIN_RECORD_RATE
SLACK_S = 1.5  # scheduling on a loaded 2-core host


def record(name: str, payload: bytes = b"") -> bytes:
    return bytes([REC[name], 0, 0, 0]) + struct.pack("<I", len(payload)) + payload


def handshake_record(pages: int = 256) -> bytes:
    return record("Handshake", _native.encode_handshake(4096, pages, 1, 0, 1, 0, 0))


def trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    """Sends `data` a byte at a time, `every` seconds apart, until done or stopped."""
    for i in range(len(data)):
        if stop.wait(every):
            return
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            return


def writer_vm(memory: int = 16 * MiB, filled: bool = False) -> VM:
    vm = VM(VmConfig(vcpus=1, memory=memory, programs=[ProgramSpec("uniform", rate=20000, seed=1)]))
    if filled:  # every page non-zero, so the page batches carry data and fill the buffers
        page = b"\xa5" * vm.guest.page_size
        for p in range(vm.guest.pages):
            vm.guest.write_page(p, page)
    return vm


def test_a_trickled_handshake_does_not_take_the_destinations_slot(start_destination, monkeypatch):
    """A client that starts a handshake and sends a byte every 0.2 s (each read returns in
    time; the record never completes) is dropped at its record deadline, and the real
    migration, which connected meanwhile, is received."""
    monkeypatch.setattr(destination_module, "HANDSHAKE_WAIT_S", IO_S)
    stop = threading.Event()
    with start_destination(accept_timeout=20, io_timeout=IO_S) as rx, writer_vm() as vm:
        slow = socket.create_connection(parse_uri(rx.uri), timeout=5)
        sender = threading.Thread(target=trickle, args=(slow, handshake_record(), 0.2, stop), daemon=True)
        sender.start()
        try:
            time.sleep(0.3)  # the trickle has begun: the destination is reading its handshake
            m = Migration(vm, rx.uri, MigrationParameters(max_bandwidth=0, x_max_time=RUN_S)).start()
            assert m.wait(RUN_S) == "completed", m.error_desc
            assert rx.incoming.result.idle_connections, "the trickler was dropped"
            # The source waited at most for the trickler's record deadline.
            assert m.setup_time < IO_S + SLACK_S, m.setup_time
            rx.join()
            assert rx.error is None and rx.result is not None
            assert rx.result.digest == vm.guest.digest()
        finally:
            stop.set()
            slow.close()


def test_silent_connections_wait_side_by_side_not_in_front_of_the_migration(start_destination, monkeypatch):
    """Review of issue 11: silent connections were examined one at a time, each for the
    handshake wait, so three or four of them outlasted the source's wait for its ack. They
    now wait together: the real migration's handshake is read as soon as it arrives."""
    wait = 3.0
    monkeypatch.setattr(destination_module, "HANDSHAKE_WAIT_S", wait)
    with start_destination(accept_timeout=20, io_timeout=IO_S) as rx, writer_vm() as vm:
        idle = [socket.create_connection(parse_uri(rx.uri), timeout=5) for _ in range(4)]
        try:
            time.sleep(0.2)
            m = Migration(vm, rx.uri, MigrationParameters(max_bandwidth=0, x_max_time=RUN_S)).start()
            assert m.wait(RUN_S) == "completed", m.error_desc
            assert m.setup_time < wait, f"the source waited behind a silent connection ({m.setup_time:.2f} s)"
            rx.join()
            assert rx.error is None and rx.result is not None
        finally:
            for s in idle:
                s.close()


def test_a_trickle_after_the_handshake_fails_the_destination_in_bounded_time(start_destination):
    """A source that sends a valid handshake, then a page batch a byte every 0.1 s: the
    destination fails at the batch's deadline (timeout + its length at the minimum rate),
    says so, and tells the source why."""
    batch = record("Pages", struct.pack("<IIQ", 1, 0, 3) + b"\x07" * 4096)
    stop = threading.Event()
    with start_destination(accept_timeout=5, io_timeout=IO_S) as rx:
        s = socket.create_connection(parse_uri(rx.uri), timeout=5)
        try:
            s.sendall(handshake_record())
            assert s.recv(8)[0] == REC["HandshakeAck"]
            t0 = time.monotonic()
            threading.Thread(target=trickle, args=(s, batch, 0.1, stop), daemon=True).start()
            rx.join(IO_S + 1 + SLACK_S + 5)
            waited = time.monotonic() - t0
        finally:
            stop.set()
        told = s.recv(4096)
        s.close()
    assert rx.result is None
    assert "record not complete within" in str(rx.error) and "stalled" in str(rx.error), rx.error
    assert waited < IO_S + len(batch) / _native.MIN_RECORD_RATE + SLACK_S, waited
    assert told[:1] == bytes([REC["Error"]]) and b"record not complete" in told


class StallingDestination:
    """Acknowledges the handshake, then stops reading (as if stopped with SIGSTOP): the
    source's socket buffers fill and its sends block. With `give_up`, it instead reads a
    little, sends an Error record with that reason and closes."""

    def __init__(self, give_up: str | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.uri = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.give_up = give_up
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _take_handshake(self) -> socket.socket:
        """Accepts the source and reads its handshake record."""
        conn, _ = self.listener.accept()
        self.conn = conn
        conn.settimeout(10)
        header = conn.recv(8, socket.MSG_WAITALL)
        conn.recv(struct.unpack("<I", header[4:])[0], socket.MSG_WAITALL)
        return conn

    def _run(self) -> None:
        conn = self._take_handshake()
        conn.sendall(record("HandshakeAck"))
        if self.give_up is not None:
            conn.recv(1 << 16)
            conn.sendall(record("Error", self.give_up.encode()))
            conn.close()

    def close(self) -> None:
        self.thread.join(10)
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def test_a_destination_that_stops_reading_fails_the_source_within_one_record_deadline(monkeypatch):
    """The adversarial pass saw 64 s against a stated 30 s: partial writes restarted the
    per-call timeout. Now the blocked page batch fails at its deadline; the source's guest
    runs on (the failure came before the commit)."""
    monkeypatch.setattr(channel_module, "IO_TIMEOUT_S", IO_S)
    dst = StallingDestination()
    try:
        with writer_vm(64 * MiB, filled=True) as vm:
            m = Migration(vm, dst.uri, MigrationParameters(max_bandwidth=0, x_max_time=RUN_S)).start()
            # Sending until the socket buffers are full takes little; then one deadline.
            assert m.wait(IO_S + BATCH_S + SLACK_S + 5) == "failed", m.status
            assert m.total_time is not None and m.total_time < IO_S + BATCH_S + SLACK_S + 1, m.total_time
            assert "record not complete within" in (m.error_desc or ""), m.error_desc
            assert vm.running, "a failure before the commit leaves the source running"
    finally:
        dst.close()


def test_the_source_shows_the_reason_a_destination_gave_up_with():
    """Defect 10: the destination sent its reason and closed; the source's next send saw
    only the closed connection ("connection closed by peer"). It reads the reason."""
    dst = StallingDestination(give_up="out of disk space for the guest")
    try:
        with writer_vm(64 * MiB, filled=True) as vm:
            m = Migration(vm, dst.uri, MigrationParameters(max_bandwidth=0, x_max_time=RUN_S)).start()
            assert m.wait(RUN_S) == "failed", m.status
            assert m.error_desc == "the destination gave up: out of disk space for the guest", m.error_desc
            assert vm.running
    finally:
        dst.close()


# -- a malicious destination ------------------------------------------------------------------


class ScriptedDestination(StallingDestination):
    """Reads the handshake, then sends `reply` (bytes) instead of a well-formed ack, reads
    what comes for 0.2 s, and closes."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        super().__init__()

    def _run(self) -> None:
        conn = self._take_handshake()
        conn.sendall(self.reply)
        conn.settimeout(0.2)
        try:
            conn.recv(1 << 16)  # whatever the source sends next, if anything
        except OSError:
            pass
        conn.close()


MALICIOUS_REPLIES = {
    "unknown-record": (bytes([99, 0, 0, 0, 0, 0, 0, 0]), "unknown record type 99"),
    "oversized-record": (bytes([REC["HandshakeAck"], 0, 0, 0]) + struct.pack("<I", 0xFFFFFFFF), "exceeds"),
    "resumed-instead-of-ack": (record("Resumed"), "expected HandshakeAck, got Resumed"),
    "refusal": (record("Error", b"no room for this guest"), "no room for this guest"),
    "half-a-header": (bytes([REC["HandshakeAck"], 0]), "truncated inside a record header"),
    "nothing-then-close": (b"", "connection closed by peer"),
}


@pytest.mark.parametrize("case", list(MALICIOUS_REPLIES))
def test_a_malicious_destination_fails_the_migration_with_the_reason(case):
    """Adversarial pass, a malicious destination: whatever it answers, the source fails with
    a message that says what was wrong, within its bounds, and its guest runs on."""
    reply, message = MALICIOUS_REPLIES[case]
    dst = ScriptedDestination(reply)
    try:
        with writer_vm() as vm:
            m = Migration(vm, dst.uri, MigrationParameters(max_bandwidth=0, x_max_time=RUN_S)).start()
            assert m.wait(RUN_S) == "failed", m.status
            assert message in (m.error_desc or ""), m.error_desc
            assert vm.running and not m.outcome_unknown
    finally:
        dst.close()
