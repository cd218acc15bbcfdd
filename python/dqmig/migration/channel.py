"""The migration stream's Python side: URIs, connections and control records.

Page batches and record framing live in Rust (`_native.Channel`); this module opens and
accepts TCP connections, hands each socket to a Channel, and encodes control payloads.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import threading
import time
from typing import Any

from dqmig import _native

REC = _native.RECORD_TYPES  # name -> wire number
REC_NAME = {v: k for k, v in REC.items()}

# Waits on the wire never block forever.
CONNECT_TIMEOUT_S = 10.0
IO_TIMEOUT_S = 30.0
POLL_S = 0.1
# The destination builds the guest before it acknowledges the handshake, and with
# --mem-prealloc backs every page first: measured 1-5 s per GiB on a virtualized host, more
# when it is loaded. The source's wait for the ack allows this much per GiB on top of
# IO_TIMEOUT_S (a bound on a hung destination, not an expected time).
PREALLOC_S_PER_GIB = 30.0
# Likewise each side hashes the whole guest at switchover (about 0.2 s per GiB here, quiet)
# while the other waits for its completion record or its resume.
DIGEST_S_PER_GIB = 10.0


def handshake_timeout(guest_bytes: int) -> float:
    """How long the source waits for the handshake ack of a guest of `guest_bytes`."""
    return IO_TIMEOUT_S + PREALLOC_S_PER_GIB * guest_bytes / (1 << 30)


def digest_timeout(guest_bytes: int) -> float:
    """How long either side waits while the other hashes a guest of `guest_bytes`."""
    return IO_TIMEOUT_S + DIGEST_S_PER_GIB * guest_bytes / (1 << 30)


StreamError = _native.MigrationStreamError


class PeerError(StreamError):
    """The peer said why it failed (an Error record): it is alive and knows the outcome."""


def parse_uri(uri: str) -> tuple[str, int]:
    """('127.0.0.1', 4444) from 'tcp:127.0.0.1:4444' (QEMU's form; IPv6 as tcp:[::1]:4444)."""
    scheme, _, rest = uri.partition(":")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if scheme != "tcp" or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad migration URI {uri!r}: expected tcp:HOST:PORT")
    return host, int(port)


def connect(
    uri: str,
    timeout: float = CONNECT_TIMEOUT_S,
    io_timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> _native.Channel:
    """Connects (non-blocking, so `cancel` ends the wait at once) and wraps the socket
    (`io_timeout`: IO_TIMEOUT_S)."""
    host, port = parse_uri(uri)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ConnectionError(f"cannot connect to {uri}: {e.strerror or e}") from None
    try:
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        deadline = time.monotonic() + timeout
        while err in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN):
            if cancel is not None and cancel.is_set():
                raise ConnectionError(f"connecting to {uri} was cancelled")
            if time.monotonic() >= deadline:
                raise ConnectionError(f"cannot connect to {uri}: timed out after {timeout:g} s")
            if select.select([], [sock], [], POLL_S)[1]:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectionError(f"cannot connect to {uri}: {os.strerror(err)}")
    except BaseException:
        sock.close()
        raise
    return wrap(sock, io_timeout)


def wrap(sock: socket.socket, io_timeout: float | None = None) -> _native.Channel:
    """Hands a connected socket to Rust. `io_timeout` (IO_TIMEOUT_S) bounds the wait for a
    record and, plus its length at MIN_RECORD_RATE, each whole record: a peer that stalls
    or trickles fails the migration within that bound (stream.rs, Deadline)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    return _native.Channel(sock.detach(), IO_TIMEOUT_S if io_timeout is None else io_timeout)


def listen(uri: str) -> socket.socket:
    host, port = parse_uri(uri)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConnectionError(f"cannot listen on {uri}: {e.strerror or e}") from None
    sock.listen(64)
    return sock


def send_json(ch: _native.Channel, record: str, obj: Any) -> None:
    ch.send_record(REC[record], json.dumps(obj).encode())


MAX_JSON_DEPTH = 32  # control records nest a few levels; their size is bounded in Rust (16 MiB)


def decode_json(record: str, payload: bytes) -> Any:
    """A control record's JSON, nested at most MAX_JSON_DEPTH deep; anything else is a
    protocol error naming the record (never a RecursionError escaping the receiver)."""
    try:
        value = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _native.ProtocolError(f"{record} record is not valid JSON: {e}") from None
    except RecursionError:
        value, depth = None, MAX_JSON_DEPTH + 1
    else:
        depth = _depth(value)
    if depth > MAX_JSON_DEPTH:
        raise _native.ProtocolError(f"{record} record nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, walked without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def send_u64(ch: _native.Channel, record: str, value: int) -> None:
    ch.send_record(REC[record], struct.pack("<Q", value))


def decode_u64(record: str, payload: bytes) -> int:
    if len(payload) != 8:
        raise _native.ProtocolError(f"{record} record has {len(payload)} bytes, expected 8")
    return struct.unpack("<Q", payload)[0]


PEER_REASON_WAIT_S = 2.0


def peer_reason(ch: _native.Channel) -> str | None:
    """After a send failed because the peer closed: the reason it sent first, if any (a
    destination that gives up sends an Error record, then closes)."""
    try:
        ch.set_timeout(PEER_REASON_WAIT_S)
        t, payload, _ = ch.receive(None)
    except (StreamError, ValueError):
        return None
    return payload.decode(errors="replace") if REC_NAME.get(t) == "Error" else None


def expect(ch: _native.Channel, *records: str) -> tuple[str, bytes]:
    """Reads one control record that must be one of `records`; an ERROR record from the peer
    becomes a StreamError carrying its reason."""
    t, payload, _ = ch.receive()
    name = REC_NAME.get(t, str(t))
    if name == "Error":
        raise PeerError(f"peer reported: {payload.decode(errors='replace')}")
    if name not in records:
        raise _native.ProtocolError(f"expected {' or '.join(records)}, got {name}")
    return name, payload
