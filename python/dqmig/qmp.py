"""A QMP server on a unix socket that QEMU's own clients drive unchanged.

Input is a byte stream of JSON values framed as QEMU frames it (qmpjson.py): no newline is
needed, several values may share a line, one may span lines. Each reply and event is one
line ("\\r\\n", as QEMU's monitor writes). The server greets as QEMU 10.0 does, with the
`oob` capability, expects `qmp_capabilities` first, then dispatches as qapi/qmp-dispatch.c
does, and sends the monitor's events to every negotiated session.
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import stat
import threading
from typing import Any

from dqmig.monitor import QmpError, version_info
from dqmig.qapi import Enum, List, Struct, check
from dqmig.qmpjson import JsonStream

MAX_LINE = 1 << 20  # the longest input dqmig takes as one value (bytes since the previous one)
POLL_S = 0.5  # how often idle connections check for shutdown
SEND_TIMEOUT_S = 10.0  # a client that reads nothing for this long is dropped
MAX_QUEUED = 10_000  # replies and events waiting for a client that does not read
CAPABILITIES = ("oob",)  # QMPCapability


def greeting() -> dict[str, Any]:
    """qmp_greeting: query-version's answer and the capabilities offered."""
    return {"QMP": {"version": version_info(), "capabilities": list(CAPABILITIES)}}


def parse_unix_uri(uri: str) -> str:
    scheme, _, path = uri.partition(":")
    if scheme != "unix" or not path:
        raise ValueError(f"bad QMP address {uri!r}: expected unix:PATH")
    return path


class Session:
    """One client's conversation: bytes in, replies out (and events, once negotiated, to
    `deliver`)."""

    def __init__(self, monitor: Any, deliver: Any = None) -> None:
        self.monitor = monitor
        self.negotiated = False
        self.oob = False
        self.deliver = deliver  # where events go; None: none are taken
        self._stream = JsonStream(MAX_LINE)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The replies to what `data` completes, in order."""
        return [self._reply(v, err) for v, err in self._stream.feed(data)]

    def handle_line(self, line: bytes) -> dict[str, Any] | None:
        """`line` as a whole input (fed, then flushed): its first reply, or None."""
        replies = self.feed(line) + [self._reply(v, err) for v, err in self._stream.flush()]
        return replies[0] if replies else None

    def close(self) -> None:
        if self.negotiated and self.deliver is not None:
            self.monitor.events.unsubscribe(self.deliver)

    def _reply(self, request: Any, parse_error: str | None) -> dict[str, Any]:
        if parse_error is not None:
            return _error(parse_error)  # never an id (qmp_error_response)
        if not isinstance(request, dict):
            return _error("QMP input must be a JSON object")
        reply_id = {"id": request["id"]} if "id" in request else {}
        try:
            return {"return": self._dispatch(request), **reply_id}
        except QmpError as e:
            return {**_error(e.desc, e.cls), **reply_id}
        except Exception as e:  # a bug must not take the monitor down
            return {**_error(f"internal error: {e!r}"), **reply_id}

    def _dispatch(self, request: dict[str, Any]) -> Any:
        """qmp_dispatch_check_obj, then qmp_dispatch; before negotiation only
        qmp_capabilities exists (monitor_qmp_dispatch's message for the rest)."""
        exec_key = None
        for key, value in request.items():
            if key == "execute" or (key == "exec-oob" and self.oob):
                if not isinstance(value, str):
                    raise QmpError(f"QMP input member '{key}' must be a string")
                if exec_key:
                    raise QmpError(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise QmpError("QMP input lacks member 'execute'")
        command, args = request[exec_key], request.get("arguments", {})
        if command == "qmp_capabilities":
            return self._capabilities(args)
        if not self.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        if exec_key == "exec-oob" and command in self.monitor.commands:
            raise QmpError(f"The command {command} does not support OOB")  # none does here
        return self.monitor.execute(command, args)

    def _capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        """qmp_qmp_capabilities and qmp_caps_accept."""
        if self.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
        check(Struct({"*enable": List(Enum(CAPABILITIES))}), args)
        self.oob = "oob" in args.get("enable", [])
        self.negotiated = True
        if self.deliver is not None:
            self.monitor.events.subscribe(self.deliver)
        return {}


def _error(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


class _Connection:
    """A client: this thread reads and dispatches; a writer thread sends replies and events
    in order, so an event from the migration thread never waits on the client."""

    def __init__(self, server: QmpServer, conn: socket.socket) -> None:
        self.server, self.conn = server, conn
        self.out: queue.Queue[bytes | None] = queue.Queue()
        self.session = Session(server.monitor, self.queue)
        self.writer = threading.Thread(target=self._write, name="qmp-writer", daemon=True)
        self.reader = threading.Thread(target=self._read, name="qmp-client", daemon=True)

    def start(self) -> None:
        self.writer.start()
        self.reader.start()

    def queue(self, obj: dict[str, Any]) -> None:
        if self.out.qsize() > MAX_QUEUED:  # the client stopped reading: drop it
            self.close()
            return
        self.out.put(json.dumps(obj).encode() + b"\r\n")

    def close(self) -> None:
        """Sends what is queued, then closes (the reader sees the end)."""
        self.out.put(None)

    def _write(self) -> None:
        self.conn.settimeout(SEND_TIMEOUT_S)
        try:
            while (data := self.out.get()) is not None:
                self.conn.sendall(data)
        except OSError:
            pass
        finally:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _read(self) -> None:
        try:
            self.queue(greeting())
            while not self.server.stopping.is_set():
                ready = _wait_readable(self.conn, POLL_S)
                if not ready:
                    continue
                chunk = self.conn.recv(65536)
                if not chunk:
                    return
                for reply in self.session.feed(chunk):
                    self.queue(reply)
        except OSError:
            return
        finally:
            self.session.close()
            self.close()
            self.writer.join(SEND_TIMEOUT_S)
            self.conn.close()
            self.server.forget(self)


def _wait_readable(conn: socket.socket, timeout: float) -> bool:
    return bool(select.select([conn], [], [], timeout)[0])


class QmpServer:
    def __init__(self, uri: str, monitor: Any) -> None:
        self.path = parse_unix_uri(uri)
        self.monitor = monitor
        self.stopping = threading.Event()
        self.sock = _listen(uri, self.path)
        self.sock.settimeout(POLL_S)
        self._lock = threading.Lock()
        self._connections: list[_Connection] = []
        self._thread = threading.Thread(target=self._serve, name="qmp", daemon=True)

    def start(self) -> QmpServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stops accepting; every client gets what is queued for it (a SHUTDOWN event
        emitted just before, say), then its connection closes."""
        self.stopping.set()
        self._thread.join(POLL_S * 4)
        with self._lock:
            connections = list(self._connections)
        # Each reader ends its connection itself once it sees `stopping` (within POLL_S):
        # a reply it is still queuing (quit's, say) goes out before the end, never after.
        for c in connections:
            c.reader.join(POLL_S * 2 + SEND_TIMEOUT_S)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def forget(self, c: _Connection) -> None:
        with self._lock:
            if c in self._connections:
                self._connections.remove(c)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            c = _Connection(self, conn)
            with self._lock:
                self._connections.append(c)
            c.start()


def _listen(uri: str, path: str) -> socket.socket:
    """A listening socket at `path`, replacing a stale socket there; errors name the path."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(f"QMP {uri}: {path} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(8)
    except OSError as e:
        sock.close()
        raise OSError(f"QMP {uri}: cannot listen on {path}: {e.strerror or e}") from None
    return sock
