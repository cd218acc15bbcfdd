"""Bad input on the migration stream: the destination (an `Incoming` on a thread, fed by a
raw socket) and `_native.Channel.receive` itself.

Every malformed stream must end in a clear error (IncomingError on the destination, a
MigrationStreamError subclass from the Channel) or a clean close: never a crash, a hang,
or a write outside guest memory. Page batches that are valid are applied exactly.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dqmig import _native
from dqmig.migration.channel import parse_uri
from dqmig.migration.destination import IncomingError
from dqmig.programs import ProgramSpec

REC = _native.RECORD_TYPES
NAME = {v: k for k, v in REC.items()}
ZERO = 1 << 63
PAGE = 4096
PAGES = 256  # the guest the valid handshakes describe: 1 MiB, one vCPU
MiB = 1 << 20
READ_S = 10.0  # longest we wait for the destination to answer or close

FUZZ = settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])


# -- building streams --------------------------------------------------------------------------


def record(t: int | str, payload: bytes = b"", *, length: int | None = None, reserved: bytes = b"\0\0\0") -> bytes:
    t = REC[t] if isinstance(t, str) else t
    return bytes([t]) + reserved + struct.pack("<I", len(payload) if length is None else length) + payload


def handshake(
    pages: int = PAGES,
    page_size: int = PAGE,
    vcpus: int = 1,
    dirty_ring: int = 0,
    channels: int = 1,
    caps: int = 0,
    *,
    magic: bytes = b"DQMIGSTR",
    version: int = 2,
    flags: int = 0,  # 1 = the rings reserve the PML buffer
) -> bytes:
    return magic + struct.pack("<IIQIIIQI", version, page_size, pages, vcpus, dirty_ring, channels, caps, flags)


def hs_record(**kw) -> bytes:
    return record("Handshake", handshake(**kw))


def batch(
    entries: list[int], data: bytes = b"", *, count: int | None = None, reserved: int = 0, length: int | None = None
) -> bytes:
    body = struct.pack("<II", len(entries) if count is None else count, reserved)
    body += b"".join(struct.pack("<Q", e) for e in entries) + data
    return record("Pages", body, length=length)


def page_data(value: int) -> bytes:
    return struct.pack("<Q", value) * (PAGE // 8)


def jrec(t: str, obj) -> bytes:
    return record(t, json.dumps(obj).encode())


VALID = hs_record()
ZERO_DIGEST = _native.Guest(PAGES, PAGE, 1).digest()


def idle_state() -> str:
    v = _native.Vcpu(_native.Guest(PAGES, PAGE, 1), 0, ProgramSpec("idle").to_json())
    return v.export_state()


def parse_records(data: bytes) -> list[tuple[str, bytes]]:
    out = []
    while len(data) >= 8:
        n = struct.unpack("<I", data[4:8])[0]
        out.append((NAME.get(data[0], str(data[0])), data[8 : 8 + n]))
        data = data[8 + n :]
    return out


def read_all(sock: socket.socket, timeout: float = READ_S) -> bytes:
    """What the destination sent, until it closed (or reset) the connection."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return got


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """The destination may close before reading all of it; that is its right."""
    try:
        sock.sendall(data)
    except OSError:
        pass


def shut_wr(sock: socket.socket) -> None:
    """Our end of the stream (EOF for the destination), if it is still connected."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@contextmanager
def fed_destination(start_destination, main: bytes, channels: list[bytes] = (), *, accept_timeout: float = 1.0):
    """Runs a destination, connects, sends `main` (then each of `channels` on its own
    connection), and yields (receiver, records the destination sent on the main channel).
    With page channels the main connection stays open, so the destination's verdict comes
    from the channels and not from the main channel closing."""
    with start_destination(accept_timeout=accept_timeout, io_timeout=2.0) as rx:
        addr = parse_uri(rx.uri)
        with socket.create_connection(addr, timeout=5) as s:
            send_quietly(s, main)
            extra = []
            try:
                for data in channels:
                    try:
                        c = socket.create_connection(addr, timeout=5)
                    except ConnectionError:
                        break  # the destination already gave up and closed its listener
                    extra.append(c)
                    send_quietly(c, data)
                    shut_wr(c)
                if not channels:
                    shut_wr(s)
                replies = parse_records(read_all(s))
            finally:
                for c in extra:
                    c.close()
        rx.join()
        yield rx, replies


def expect_refusal(start_destination, main: bytes, message: str, channels: list[bytes] = (), **kw) -> list:
    with fed_destination(start_destination, main, channels, **kw) as (rx, replies):
        assert rx.result is None
        assert isinstance(rx.error, IncomingError), repr(rx.error)
        assert re.search(message, str(rx.error)), str(rx.error)
        return replies


# -- before and at the handshake ---------------------------------------------------------------

BEFORE_HANDSHAKE = {
    "nothing": (b"", r"^no migration arrived on .* in time$"),  # a silent connection is skipped
    "truncated-header": (b"\x01\x00\x00", "truncated inside a record header"),
    "truncated-handshake": (VALID[:30], "truncated inside a Handshake record"),
    "unknown-type": (record(99, b"x"), "unknown record type 99"),
    "type-zero": (record(0), "unknown record type 0"),
    "reserved-header-bytes": (record("Handshake", handshake(), reserved=b"\0\x07\0"), "reserved header bytes"),
    "oversized-control": (record("Handshake", length=16 * MiB + 1), r"exceeds the 16777216-byte limit"),
    "oversized-u32": (record("Handshake", length=0xFFFFFFFF), "exceeds"),
    "not-a-handshake": (record("End"), "expected a handshake, got record type 10"),
    "device-state-first": (jrec("DeviceState", {}), "expected a handshake, got record type 6"),
    "pages-before-handshake": (batch([0 | ZERO]), "page batch out of place"),
}


@pytest.mark.parametrize("case", list(BEFORE_HANDSHAKE))
def test_destination_rejects_bad_stream_start(case, start_destination):
    data, message = BEFORE_HANDSHAKE[case]
    replies = expect_refusal(start_destination, data, message)
    assert all(name == "Error" for name, _ in replies), replies


HANDSHAKES = {
    "short": (record("Handshake", handshake()[:10]), "handshake is 10 bytes, expected 48"),
    "long": (record("Handshake", handshake() + b"x"), "handshake is 49 bytes, expected 48"),
    "empty": (record("Handshake"), "handshake is 0 bytes"),
    "wrong-magic": (hs_record(magic=b"QEVM\0\0\0\3"), "wrong magic .*not a dqmig migration stream"),
    "wrong-version": (hs_record(version=3), r"stream version 3 is not supported \(this dqmig speaks 2\)"),
    "version-zero": (hs_record(version=0), "stream version 0 is not supported"),
    "larger-than-host": (hs_record(pages=1 << 40), "does not fit this host's memory"),
    "largest-u64": (hs_record(pages=(1 << 64) - 1, page_size=1 << 30), "does not fit this host's memory"),
    "no-pages": (hs_record(pages=0), "does not fit|pages"),
    "no-vcpus": (hs_record(vcpus=0), r"0 vCPUs \(allowed 1..1024\)"),
    "too-many-vcpus": (hs_record(vcpus=5000), r"5000 vCPUs"),
    "no-channels": (hs_record(channels=0), r"0 channels \(allowed 1..255\)"),
    "too-many-channels": (hs_record(channels=256, caps=1), r"256 channels"),
    "bad-page-size": (hs_record(page_size=1000), "page size 1000 must be a power of two"),
    "zero-page-size": (hs_record(page_size=0), "page size 0"),
    "giant-page-size": (hs_record(page_size=1 << 31, pages=1), "page size 2147483648"),
    "bad-dirty-ring": (hs_record(dirty_ring=3), "dirty ring size 3"),
    "giant-dirty-ring": (hs_record(dirty_ring=1 << 31), "dirty ring size 2147483648"),
}


@pytest.mark.parametrize("case", list(HANDSHAKES))
def test_destination_refuses_bad_handshake(case, start_destination):
    """A refused handshake is an error here and an ERROR record to the source, with the reason."""
    data, message = HANDSHAKES[case]
    replies = expect_refusal(start_destination, data, "^handshake refused: .*(" + message + ")")
    assert len(replies) == 1 and replies[0][0] == "Error", replies
    assert re.search(message, replies[0][1].decode()), replies


# -- after a valid handshake ---------------------------------------------------------------------

AFTER_HANDSHAKE = {
    "batch-too-many-pages": (
        batch([], count=1001, length=8 + 8 * 1001),
        r"page batch of 1001 pages \(allowed 1..=1000\)",
    ),
    "batch-huge-count": (batch([], count=0xFFFFFFFF, length=0xFFFFFFFF), "allowed 1..=1000"),
    "batch-zero-pages": (batch([], count=0, length=8), "page batch of 0 pages"),
    "batch-shorter-than-count": (batch([], count=1, length=4), "shorter than its count"),
    "batch-reserved": (batch([1 | ZERO], reserved=5), "reserved field is not zero"),
    "batch-cannot-hold-entries": (batch([1 | ZERO], count=10, length=16), "cannot hold 10 entries"),
    "batch-over-16MiB": (batch([1], length=17 * MiB), "page batch length 17825792 does not match its 1 entries"),
    "batch-over-u32": (batch([1], length=0xFFFFFFFF), "does not match"),
    "page-out-of-range": (batch([PAGES], page_data(1)), f"page {PAGES} is out of range: the guest has {PAGES} pages"),
    "zero-page-out-of-range": (batch([PAGES | ZERO]), f"page {PAGES} is out of range"),
    "page-number-huge": (batch([(1 << 62) + 3], page_data(1)), "out of range"),
    "page-without-data": (batch([2]), "does not match"),
    "page-data-truncated": (batch([2], b"\x01" * 100, length=16 + PAGE), "truncated inside page data"),
    "entries-truncated": (batch([1 | ZERO], count=2, length=24), "truncated inside a page batch"),
    "second-handshake": (VALID, "unexpected Handshake record on the main channel"),
    "ack-from-source": (record("HandshakeAck"), "unexpected HandshakeAck record"),
    "resumed-from-source": (record("Resumed"), "unexpected Resumed record"),
    "end-on-main": (record("End"), "unexpected End record"),
    "unknown-type": (record(200), "unknown record type 200"),
    "source-error": (record("Error", b"disk on fire"), "source reported: disk on fire"),
    "complete-before-device-state": (jrec("Complete", {"digest": ZERO_DIGEST}), "completion before device state"),
    "device-state-not-json": (record("DeviceState", b"{nope"), "DeviceState record is not valid JSON"),
    # Nested past Python's recursion limit (a RecursionError escaped before) and past the bound.
    "device-state-nested-100k": (record("DeviceState", b"[" * 100_000 + b"]" * 100_000), "nests deeper than 32"),
    "device-state-nested-33": (record("DeviceState", b"[" * 33 + b"]" * 33), "nests deeper than 32"),
    "complete-nested": (
        jrec("DeviceState", {}) + record("Complete", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        "Complete record nests deeper than 32",
    ),
    "device-state-not-utf8": (record("DeviceState", b"\xff\xfe"), "not valid JSON"),
    "complete-not-json": (jrec("DeviceState", {}) + record("Complete", b"\x00"), "Complete record is not valid JSON"),
    "digest-mismatch": (
        jrec("DeviceState", {"vcpus": [idle_state()]}) + jrec("Complete", {"digest": 1}),
        f"memory digest mismatch: source 1, destination {ZERO_DIGEST}",
    ),
    "complete-not-an-object": (jrec("DeviceState", {}) + jrec("Complete", [1]), "memory digest mismatch: source None"),
    # A digest sent as a string used to read "source 123, destination 123".
    "digest-as-a-string": (
        jrec("DeviceState", {"vcpus": [idle_state()]}) + jrec("Complete", {"digest": str(ZERO_DIGEST)}),
        f"memory digest mismatch: source '{ZERO_DIGEST}' \\(a str, not an integer\\), destination {ZERO_DIGEST}",
    ),
    # The destination hashes its copy on the device state, then waits for the source's digest.
    "source-error-after-device-state": (
        jrec("DeviceState", {}) + record("Error", b"cancelled"),
        "source reported: cancelled",
    ),
    "device-state-then-pages": (
        jrec("DeviceState", {}) + batch([3], page_data(7)),
        "page batch out of place",
    ),
    "device-state-then-iteration": (
        jrec("DeviceState", {}) + record("Iteration", b"{}"),
        "expected the completion record after the device state, got Iteration",
    ),
    "closed-after-device-state": (jrec("DeviceState", {}), "^connection closed by peer$"),
    "truncated-after-pages": (batch([3], page_data(7)) + b"\x04\x00", "truncated inside a record header"),
    "closed-mid-migration": (batch([3], page_data(7)) + record("Iteration", b"{}"), "^connection closed by peer$"),
}


@pytest.mark.parametrize("case", list(AFTER_HANDSHAKE))
def test_destination_rejects_bad_records(case, start_destination):
    data, message = AFTER_HANDSHAKE[case]
    replies = expect_refusal(start_destination, VALID + data, message)
    assert replies and replies[0] == ("HandshakeAck", b"")
    if not case.startswith("closed-"):  # the source is gone; nobody to tell
        errors = [p.decode() for name, p in replies if name == "Error"]
        assert errors and errors[0], f"the source is told why: {replies}"


def complete_with(state) -> bytes:
    """Device state then a completion whose digest matches the (untouched, zero) memory."""
    body = state if isinstance(state, bytes) else json.dumps(state).encode()
    return record("DeviceState", body) + jrec("Complete", {"digest": ZERO_DIGEST})


def vcpu_state(**spec) -> str:
    return json.dumps({"spec": spec, "position": 0, "rng": 1, "progress": 0})


BAD_DEVICE_STATES = {
    "list": [],
    "string": "vcpus",
    "number": 5,
    "no-vcpus": {"dma": None},
    "vcpus-not-a-list": {"vcpus": 5},
    "vcpus-missing-one": {"vcpus": []},
    "vcpus-too-many": {"vcpus": [idle_state(), idle_state()]},
    "vcpu-not-json": {"vcpus": ["{"]},
    "vcpu-not-a-string": {"vcpus": [5]},
    "vcpu-state-a-list": {"vcpus": ["[]"]},
    "vcpu-no-spec": {"vcpus": ["{}"]},
    "spec-a-list": {"vcpus": ['{"spec": [1]}']},
    "spec-a-string": {"vcpus": ['{"spec": "uniform"}']},
    "spec-unknown-kind": {"vcpus": [vcpu_state(kind="bogus")]},
    "spec-no-kind": {"vcpus": [vcpu_state(seed=1)]},
    "spec-region-outside": {"vcpus": [vcpu_state(kind="uniform", region_start=PAGES)]},
    "spec-bad-rate": {"vcpus": [vcpu_state(kind="uniform", rate="fast")]},
    "spec-unknown-parameter": {"vcpus": [vcpu_state(kind="uniform", speed=3)]},
    "position-outside": {
        "vcpus": [json.dumps({"spec": {"kind": "sequential"}, "position": PAGES, "rng": 1, "progress": 0})]
    },
    "dma-a-number": {"vcpus": [idle_state()], "dma": 5},
    "dma-not-json": {"vcpus": [idle_state()], "dma": "{"},
    "dma-spec-a-number": {"vcpus": [idle_state()], "dma": '{"spec": 1}'},
}


@pytest.mark.parametrize("case", list(BAD_DEVICE_STATES))
def test_destination_rejects_bad_device_state(case, start_destination):
    """Memory arrived intact (the digest matches), but the vCPU state is malformed: the
    destination refuses with 'bad device state' and does not start a guest."""
    replies = expect_refusal(start_destination, VALID + complete_with(BAD_DEVICE_STATES[case]), "bad device state")
    errors = [p.decode() for name, p in replies if name == "Error"]
    assert errors and "bad device state" in errors[0], replies


def test_destination_accepts_a_minimal_valid_stream(start_destination):
    """Control for the cases above: handshake, a few pages, device state, completion."""
    src = _native.Guest(PAGES, PAGE, 1)
    src.write_page(5, page_data(42))
    src.write_page(6, page_data(43))
    stream = VALID + batch([5, 6, 7 | ZERO], page_data(42) + page_data(43))
    stream += record("Iteration", b"{}") + jrec("DeviceState", {"vcpus": [idle_state()], "dma": None})
    stream += jrec("Complete", {"digest": src.digest()})
    with fed_destination(start_destination, stream) as (rx, replies):
        assert rx.error is None, rx.error
        result = rx.result
        assert result is not None and result.vm is not None
        assert [name for name, _ in replies] == ["HandshakeAck", "Resumed"]
        assert "verify_time" in json.loads(replies[1][1])
        assert (result.pages_normal, result.pages_zero, result.iterations) == (2, 1, 1)
        assert result.bytes == 8 + 8 + 3 * 8 + 2 * PAGE
        assert result.digest == src.digest() == result.vm.guest.digest()
        assert result.vm.running


# -- multifd: page channels ----------------------------------------------------------------------

MULTIFD = hs_record(channels=2, caps=1)


def hello(i: int) -> bytes:
    return record("ChannelHello", struct.pack("<Q", i))


MULTIFD_CASES = {
    "no-channels-arrive": ([], "multifd page channel 1 of 2 did not connect to .* within"),
    "one-channel-missing": ([hello(0)], "multifd page channel 2 of 2 did not connect"),
    "pages-before-hello": ([batch([1 | ZERO]), hello(1)], "page batch out of place"),
    "index-out-of-range": ([hello(5), hello(1)], "bad multifd channel index 5"),
    "index-twice": ([hello(0), hello(0)], "bad multifd channel index 0"),
    "hello-short": ([record("ChannelHello", b"abc"), hello(1)], "ChannelHello record has 3 bytes, expected 8"),
    "hello-wrong-record": ([record("Sync", struct.pack("<Q", 0)), hello(1)], "expected ChannelHello, got Sync"),
    "hello-error": ([record("Error", b"no"), hello(1)], "peer reported: no"),
}


@pytest.mark.parametrize("case", list(MULTIFD_CASES))
def test_destination_rejects_bad_page_channels(case, start_destination):
    channels, message = MULTIFD_CASES[case]
    expect_refusal(start_destination, MULTIFD, message, channels, accept_timeout=0.5)


PAGE_CHANNEL_CASES = {
    "page-out-of-range": (batch([PAGES], page_data(1)), f"page {PAGES} is out of range"),
    "batch-too-many-pages": (batch([], count=1001, length=8 + 8 * 1001), "allowed 1..=1000"),
    "device-state-on-page-channel": (jrec("DeviceState", {}), "unexpected DeviceState record on a page channel"),
    "sync-short": (record("Sync", b"\x01"), "Sync record has 1 bytes, expected 8"),
    "unknown-type": (record(77), "unknown record type 77"),
}


@pytest.mark.parametrize("case", list(PAGE_CHANNEL_CASES))
def test_destination_reports_page_channel_errors(case, start_destination):
    """A bad record on a page channel fails the migration with that record's error (not just
    'connection closed'): the destination and the source are both told what was wrong."""
    data, message = PAGE_CHANNEL_CASES[case]
    replies = expect_refusal(start_destination, MULTIFD, message, [hello(0) + data, hello(1)])
    errors = [p.decode() for name, p in replies if name == "Error"]
    assert errors and re.search(message, errors[0]), replies


def test_destination_applies_page_channels(start_destination):
    src = _native.Guest(PAGES, PAGE, 1)
    for p in (1, 2, 200):
        src.write_page(p, page_data(p))
    sync = record("Sync", struct.pack("<Q", 2))
    ch0 = hello(0) + batch([1, 3 | ZERO], page_data(1)) + sync + record("End")
    ch1 = hello(1) + batch([2, 200], page_data(2) + page_data(200)) + sync + record("End")
    main = MULTIFD + jrec("DeviceState", {"vcpus": [idle_state()], "dma": None})
    main += jrec("Complete", {"digest": src.digest()})
    with start_destination(accept_timeout=2.0, io_timeout=2.0) as rx:
        addr = parse_uri(rx.uri)
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(MULTIFD)
            # The main channel's records must not overtake the page channels': send them
            # after the page channels have ended.
            conns = [socket.create_connection(addr, timeout=5) for _ in range(2)]
            for c, data in zip(conns, (ch0, ch1), strict=True):
                c.sendall(data)
            time.sleep(0.2)
            s.sendall(main[len(MULTIFD) :])
            replies = parse_records(read_all(s))
            for c in conns:
                c.close()
        rx.join()
        assert rx.error is None, rx.error
        assert [n for n, _ in replies] == ["HandshakeAck", "Resumed"]
        assert rx.result.digest == src.digest()
        assert (rx.result.pages_normal, rx.result.pages_zero) == (3, 1)


# -- fuzzing the destination ---------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=300))
def test_destination_survives_random_bytes(start_destination, data):
    with fed_destination(start_destination, data) as (rx, _):
        assert rx.result is None
        assert isinstance(rx.error, IncomingError), repr(rx.error)
        assert str(rx.error)


def mostly(valid: list[int], wild: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """A valid value seven times in eight, else anything `wild` draws."""
    return st.integers(0, 7).flatmap(lambda k: wild if k == 0 else st.sampled_from(valid))


def u(bits: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << bits) - 1)


handshakes = st.builds(
    handshake,
    # No guest between 256 pages and 'larger than this host': allocation is cheap (lazy),
    # but a random completion could make the destination hash gigabytes of zeros.
    pages=mostly([1, 16, PAGES], st.one_of(st.just(0), st.integers(1 << 40, (1 << 64) - 1))),
    page_size=mostly([4096, 8192, 65536], u(32)),
    vcpus=mostly([1, 2], st.integers(0, 5000)),
    dirty_ring=mostly([0, 256, 1024], u(32)),
    channels=mostly([1, 2], u(32)),
    caps=mostly([0], u(64)),
    version=mostly([2], u(32)),
    flags=mostly([0, 1], u(32)),
)

random_records = st.lists(
    st.builds(
        lambda t, payload, length, reserved: record(t, payload, length=length, reserved=reserved),
        t=st.one_of(st.sampled_from(sorted(REC.values())), st.integers(0, 255)),
        payload=st.binary(max_size=64),
        length=st.one_of(st.none(), st.none(), st.integers(0, (1 << 32) - 1)),
        reserved=st.one_of(st.just(b"\0\0\0"), st.just(b"\0\0\0"), st.binary(min_size=3, max_size=3)),
    ),
    max_size=6,
)


@FUZZ
@given(
    hs=handshakes, flips=st.lists(st.tuples(st.integers(0, 43), st.integers(1, 255)), max_size=2), tail=random_records
)
def test_destination_survives_mutated_handshake_and_random_records(start_destination, hs, flips, tail):
    body = bytearray(hs)
    for pos, x in flips:
        body[pos] ^= x
    with fed_destination(start_destination, record("Handshake", bytes(body)) + b"".join(tail), accept_timeout=0.3) as (
        rx,
        replies,
    ):
        assert rx.result is None, "random records cannot complete a migration"
        assert isinstance(rx.error, IncomingError), repr(rx.error)
        assert str(rx.error)
        assert all(name in ("HandshakeAck", "Error") for name, _ in replies), replies
        event("handshake accepted" if replies[:1] == [("HandshakeAck", b"")] else "handshake refused")


# -- _native.Channel directly --------------------------------------------------------------------


@contextmanager
def channel_pair(timeout: float = 2.0):
    """(a plain socket, a Channel on the other end of a loopback TCP connection)."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        a = socket.create_connection(lst.getsockname(), timeout=5)
        lst.settimeout(5)
        b, _ = lst.accept()
    ch = _native.Channel(b.detach(), timeout)
    try:
        yield a, ch
    finally:
        ch.shutdown()
        a.close()


@contextmanager
def channels(timeout: float = 5.0):
    """Two Channels joined by loopback TCP."""
    with channel_pair(timeout) as (a, ch):
        other = _native.Channel(a.detach(), timeout)
        try:
            yield other, ch
        finally:
            other.shutdown()


def receive_all(data: bytes, guest: _native.Guest | None, timeout: float = 2.0) -> list:
    """Feeds `data` then EOF to a Channel; receives until an error, which is returned last."""
    out: list = []
    with channel_pair(timeout) as (a, ch):
        send_quietly(a, data)
        shut_wr(a)
        for _ in range(1000):
            try:
                out.append(ch.receive(guest))
            except _native.MigrationStreamError as e:
                out.append(e)
                return out
    raise AssertionError("the stream never ended")


CHANNEL_CASES = {
    **{
        f"start-{k}": (d, m)
        for k, (d, m) in BEFORE_HANDSHAKE.items()
        if k not in ("nothing", "not-a-handshake", "device-state-first")
    },
    "start-nothing": (b"", r"^connection closed by peer$"),
    **{k: (d, m) for k, (d, m) in AFTER_HANDSHAKE.items() if k.startswith(("batch", "page", "entries", "truncated"))},
}


@pytest.mark.parametrize("case", list(CHANNEL_CASES))
def test_channel_receive_rejects_bad_records(case):
    data, message = CHANNEL_CASES[case]
    guest = None if case == "start-pages-before-handshake" else _native.Guest(PAGES, PAGE, 1)
    got = receive_all(data, guest)
    err = got[-1]
    assert isinstance(err, _native.MigrationStreamError)
    assert re.search(message, str(err)), str(err)
    expected = _native.StreamClosed if "closed" in message else _native.ProtocolError
    assert type(err) is expected, repr(err)


def test_channel_validates_a_whole_batch_before_touching_memory():
    """A batch whose last entry is bad is refused whole: none of its pages is written, and
    nothing outside guest memory either (the guest's neighbours stay as they were)."""
    guests = [_native.Guest(PAGES, PAGE, 1) for _ in range(3)]
    target = guests[1]
    target.write_page(10, page_data(99))
    before = target.digest()
    entries = [1, 2 | ZERO, 10 | ZERO, PAGES]
    got = receive_all(batch(entries, page_data(5) + page_data(6)), target)
    assert isinstance(got[-1], _native.ProtocolError) and "out of range" in str(got[-1])
    assert target.digest() == before
    assert target.read_page(10) == page_data(99)
    assert all(g.digest() == ZERO_DIGEST for g in (guests[0], guests[2]))


def test_channel_receive_without_guest_returns_control_records():
    stream = record("End") + record("Error", b"why") + record("Iteration", b'{"n": 2}')
    got = receive_all(stream, None)
    assert got[:3] == [(REC["End"], b"", None), (REC["Error"], b"why", None), (REC["Iteration"], b'{"n": 2}', None)]
    assert isinstance(got[3], _native.StreamClosed)


def test_channel_receive_times_out():
    with channel_pair(timeout=0.2) as (a, ch):
        t0 = time.monotonic()
        with pytest.raises(_native.StreamTimeout, match="timed out"):
            ch.receive(None)
        a.sendall(b"\x01\x00")  # half a header, then silence
        with pytest.raises(_native.StreamTimeout):
            ch.receive(None)
        assert time.monotonic() - t0 < 5


def test_channel_shutdown_unblocks_a_blocked_receive():
    with channel_pair(timeout=30) as (_, ch):
        box: list = []
        t = threading.Thread(target=lambda: box.append(_catch(ch.receive, None)), daemon=True)
        t.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        ch.shutdown()
        t.join(5)
        assert not t.is_alive() and time.monotonic() - t0 < 5
        assert isinstance(box[0], _native.StreamClosed)


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


def test_channel_argument_checks():
    with pytest.raises(ValueError, match="bad file descriptor"):
        _native.Channel(-1, 1.0)
    with channel_pair() as (_, ch):
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="bad timeout"):
                ch.set_timeout(bad)
        with pytest.raises(ValueError, match="unknown record type 99"):
            ch.send_record(99, b"")
        with pytest.raises(_native.ProtocolError, match="exceeds"):
            ch.send_record(REC["Error"], bytes(16 * MiB + 1))
    assert issubclass(_native.StreamClosed, _native.MigrationStreamError)
    assert issubclass(_native.StreamTimeout, _native.MigrationStreamError)
    assert issubclass(_native.ProtocolError, _native.MigrationStreamError)
    assert REC == {
        "Handshake": 1,
        "HandshakeAck": 2,
        "ChannelHello": 3,
        "Pages": 4,
        "Sync": 5,
        "DeviceState": 6,
        "Complete": 7,
        "Resumed": 8,
        "Error": 9,
        "End": 10,
        "Iteration": 11,
    }
    assert _native.MAX_BATCH_PAGES == 1000


def test_send_pages_refuses_pages_outside_the_guest():
    guest = _native.Guest(PAGES, PAGE, 1)
    with channel_pair() as (a, ch):
        with pytest.raises(_native.ProtocolError, match="out of range"):
            ch.send_pages(guest, np.array([0, PAGES], dtype=np.uint64))
        a.settimeout(0.2)
        with pytest.raises(TimeoutError):
            a.recv(1)  # nothing of the refused batch went out


@pytest.mark.parametrize(
    "pages",
    [[5, 1, 3], [10, 3, 3, 11], [0, 40, 2], [63, 0], [7, 7, 7]],
    ids=["descending", "dip", "jump", "wrap", "repeats"],
)
def test_send_pages_takes_pages_in_any_order(pages):
    """send_pages takes any list of in-range pages (the source's dirty scan wraps around the
    end of memory), repeats included, and the receiver gets exactly those pages."""
    src, dst = _native.Guest(64, PAGE, 1), _native.Guest(64, PAGE, 1)
    for p in range(64):
        src.write_page(p, page_data(p + 1))
    with channels() as (tx, rx):
        sent = tx.send_pages(src, np.array(pages, dtype=np.uint64))
        assert sent == (8 + 8 + 8 * len(pages) + len(pages) * PAGE, 0, len(pages))
        assert rx.receive(dst) == (REC["Pages"], None, sent)
    for p in range(64):
        assert dst.read_page(p) == (page_data(p + 1) if p in pages else bytes(PAGE))


def test_send_pages_refuses_an_out_of_range_page_anywhere():
    guest = _native.Guest(64, PAGE, 1)
    for pages in ([0, 1000, 5], [1000, 0], [3, 64]):
        with channel_pair() as (_, ch):
            with pytest.raises(_native.ProtocolError, match="out of range"):
                ch.send_pages(guest, np.array(pages, dtype=np.uint64))


def test_handshake_encoding():
    raw = _native.encode_handshake(PAGE, PAGES, 1, 0, 1, 0, 0)
    assert raw == handshake()
    assert _native.decode_handshake(_native.encode_handshake(PAGE, PAGES, 1, 1024, 1, 0, 1))["pml"] is True
    assert _native.decode_handshake(raw) == {
        "version": 2,
        "page_size": PAGE,
        "pages": PAGES,
        "vcpus": 1,
        "dirty_ring": 0,
        "channels": 1,
        "capabilities": 0,
        "pml": False,
    }
    for bad, message in [
        (raw[:-1], "47 bytes"),
        (b"X" + raw[1:], "wrong magic"),
        (handshake(version=7), "version 7"),
    ]:
        with pytest.raises(_native.ProtocolError, match=message):
            _native.decode_handshake(bad)


@FUZZ
@given(data=st.binary(max_size=80))
def test_decode_handshake_never_crashes(data):
    try:
        h = _native.decode_handshake(data)
    except _native.ProtocolError as e:
        assert str(e).startswith("bad stream:")
    else:
        assert len(data) == 44 and data[:8] == b"DQMIGSTR" and h["version"] == 1


@FUZZ
@given(data=st.binary(max_size=400), valid_prefix=st.booleans())
def test_channel_receive_survives_random_bytes(data, valid_prefix):
    """Random bytes (after a valid page batch, or alone) end in a stream error; a page
    batch that got through was applied inside the guest."""
    guest = _native.Guest(16, PAGE, 1)
    prefix = batch([3], page_data(11)) if valid_prefix else b""
    got = receive_all(prefix + data, guest)
    assert isinstance(got[-1], _native.MigrationStreamError)
    for rec in got[:-1]:
        t, payload, stats = rec
        assert (payload is None) == (t == REC["Pages"])
        if stats:
            assert stats[1] + stats[2] >= 1 and stats[0] >= 16 + 8 * (stats[1] + stats[2])
    if valid_prefix:
        assert got[0] == (REC["Pages"], None, (8 + 16 + PAGE, 0, 1))


page_writes = st.lists(
    st.lists(
        st.tuples(st.integers(0, 63), st.one_of(st.none(), st.integers(1, (1 << 64) - 1))),
        min_size=1,
        max_size=40,
    ),
    min_size=1,
    max_size=6,
)


@FUZZ
@given(batches=page_writes, batch_size=st.integers(1, 1000))
def test_page_batches_are_applied_exactly(batches, batch_size):
    """Any sequence of page batches (zero and non-zero pages, repeats, any batch size) sent
    with Channel.send_pages leaves the destination identical to the source."""
    src, dst = _native.Guest(64, PAGE, 1), _native.Guest(64, PAGE, 1)
    for page in {p for b in batches for p, _ in b}:
        dst.write_page(page, b"\xa5" * PAGE)  # stale data every sent page must replace
    received: list = []
    with channels() as (tx, rx):

        def receive() -> None:
            while True:
                t, _, stats = rx.receive(dst)
                if t == REC["End"]:
                    return
                received.append(stats)

        thread = threading.Thread(target=lambda: received.append(_catch(receive)), daemon=True)
        thread.start()
        sent = []
        for b in batches:
            for page, value in b:
                src.write_page(page, bytes(PAGE) if value is None else struct.pack("<QQ", value, page) * (PAGE // 16))
            sent.append(tx.send_pages(src, np.array([p for p, _ in b], dtype=np.uint64), batch_size))
        tx.send_record(REC["End"], b"")
        thread.join(10)
        assert not thread.is_alive()
    assert received[-1] is None, received[-1]
    stats = received[:-1]
    assert all(isinstance(s, tuple) for s in stats), stats
    assert [sum(s[i] for s in stats) for i in range(3)] == [sum(s[i] for s in sent) for i in range(3)]
    assert sum(s[1] + s[2] for s in sent) == sum(len(b) for b in batches)
    assert dst.digest() == src.digest()


def test_destination_does_not_wait_forever_for_page_channels(start_destination):
    """`dqmig incoming` waits as long as it takes for a migration to arrive (no accept
    timeout, like QEMU's -incoming), but once a source has connected and announced page
    channels, a source that dies before opening them must not leave the destination waiting
    forever: every wait after the handshake is bounded by the I/O timeout."""
    with start_destination(accept_timeout=None, io_timeout=1.0) as rx:
        with socket.create_connection(parse_uri(rx.uri), timeout=5) as s:
            s.sendall(MULTIFD)
            assert parse_records(s.recv(8)) == [("HandshakeAck", b"")]
        # The source is gone. Give the destination a few I/O timeouts to notice.
        rx.thread.join(4.0)
        hung = rx.thread.is_alive()
        if hung:
            rx.abort()
            rx.thread.join(5)
        assert not hung, "the destination still waits for page channels of a source that is gone"
        assert isinstance(rx.error, IncomingError), repr(rx.error)


def test_destination_does_not_resume_while_a_page_channel_is_still_writing(start_destination):
    """A page channel that never ends (it keeps sending pages) while the main channel
    completes: the destination must not verify and start the guest while that channel can
    still write into guest memory; it fails the migration instead."""
    main = MULTIFD + jrec("DeviceState", {"vcpus": [idle_state()], "dma": None})
    main += jrec("Complete", {"digest": ZERO_DIGEST})
    with start_destination(accept_timeout=2.0, io_timeout=1.0) as rx:
        addr = parse_uri(rx.uri)
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(MULTIFD)
            ch0 = socket.create_connection(addr, timeout=5)
            ch1 = socket.create_connection(addr, timeout=5)
            try:
                ch0.sendall(hello(0))
                ch1.sendall(hello(1) + record("End"))
                s.sendall(main[len(MULTIFD) :])
                # Channel 0 keeps writing (zero pages) for three I/O timeouts.
                end = time.monotonic() + 3.0
                while time.monotonic() < end and rx.thread.is_alive():
                    send_quietly(ch0, batch([9 | ZERO]))
                    time.sleep(0.1)
                replies = parse_records(read_all(s))
            finally:
                ch0.close()
                ch1.close()
        rx.join()
        assert "Resumed" not in [n for n, _ in replies], "the guest was resumed with a page channel still open"
        assert rx.result is None
        assert isinstance(rx.error, IncomingError), repr(rx.error)
