"""A QMP-compatible control socket: JSON objects, one per line, over a unix socket.

The server greets, expects `qmp_capabilities` first (as QEMU does), then executes commands
through a Monitor. Bad input gets a QMP error reply and the connection keeps serving.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from typing import Any

from dqmig import __version__
from dqmig.monitor import Monitor, QmpError

MAX_LINE = 1 << 20
POLL_S = 0.5  # how often idle connections check for shutdown


def greeting() -> dict[str, Any]:
    major, minor, micro = (int(x) for x in __version__.split(".")[:3])
    return {
        "QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": f"dqmig {__version__}",
            },
            "capabilities": [],
        }
    }


def parse_unix_uri(uri: str) -> str:
    scheme, _, path = uri.partition(":")
    if scheme != "unix" or not path:
        raise ValueError(f"bad QMP address {uri!r}: expected unix:PATH")
    return path


class Session:
    """One client's conversation: line in, line out."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.negotiated = False

    def handle_line(self, line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            return _error(f"JSON parse error, {e}")
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
        command = request.get("execute")
        if not isinstance(command, str):
            raise QmpError("QMP input lacks member 'execute'")
        unknown = set(request) - {"execute", "arguments", "id"}
        if unknown:
            raise QmpError(f"QMP input member '{sorted(unknown)[0]}' is unexpected")
        args = request.get("arguments", {})
        if not isinstance(args, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        if command == "qmp_capabilities":
            if self.negotiated:
                raise QmpError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
            self.negotiated = True
            return {}
        if not self.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
        return self.monitor.execute(command, args)


def _error(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


class QmpServer:
    def __init__(self, uri: str, monitor: Monitor) -> None:
        self.path = parse_unix_uri(uri)
        self.monitor = monitor
        self._stop = threading.Event()
        self.sock = _listen(uri, self.path)
        self.sock.settimeout(POLL_S)
        self._thread = threading.Thread(target=self._serve, name="qmp", daemon=True)

    def start(self) -> QmpServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(POLL_S * 4)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), name="qmp-client", daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        session = Session(self.monitor)
        conn.settimeout(POLL_S)
        buf = b""
        discarding = False  # inside a line already refused as too long: drop to its end
        with conn:
            try:
                _send(conn, greeting())
                while not self._stop.is_set():
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        return
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if discarding:
                            discarding = False
                        elif len(line) > MAX_LINE:
                            _send(conn, _too_long())
                        elif (reply := session.handle_line(line)) is not None:
                            _send(conn, reply)
                    if len(buf) > MAX_LINE:  # refused as a whole, whatever follows on the line
                        buf = b""
                        if not discarding:
                            _send(conn, _too_long())
                        discarding = True
            except OSError:
                return


def _too_long() -> dict[str, Any]:
    return _error(f"QMP input line longer than {MAX_LINE} bytes: refused whole")


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


def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\r\n")
