"""Shared fixtures for the migration, stream and QMP tests.

`start_destination` runs a migration destination (`Incoming`) on a thread; the `Receiver` it
returns is a context manager that always ends that thread and stops the destination's VM.
`wait_until` polls a predicate with a timeout. Both are session-scoped helpers that hold no
per-test state, so hypothesis tests can use them too.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest

from dqmig.migration.destination import Incoming, IncomingResult

JOIN_S = 15.0  # longest we wait for a destination thread to end


def _wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Receiver:
    """An `Incoming` running on its own thread; `result` or `error` once it ends."""

    def __init__(self, uri: str = "tcp:127.0.0.1:0", accept_timeout: float = 10.0, io_timeout: float = 5.0) -> None:
        self.incoming = Incoming(uri, accept_timeout=accept_timeout, io_timeout=io_timeout)
        self.uri = self.incoming.address
        self.result: IncomingResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.incoming.run()
        except BaseException as e:  # inspected by the test
            self.error = e

    def join(self, timeout: float = JOIN_S) -> Receiver:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the destination did not finish within {timeout} s"
        return self

    def abort(self) -> None:
        """Ends a destination that is still waiting: wakes accept() and every blocked read."""
        for ch in list(self.incoming._channels):
            ch.shutdown()
        try:
            self.incoming.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.abort()
            self.thread.join(JOIN_S)
        if self.result is not None and self.result.vm is not None:
            self.result.vm.stop()
        if exc[0] is None:
            assert not self.thread.is_alive(), "the destination thread did not end"


@pytest.fixture(scope="session")
def start_destination() -> Callable[..., Receiver]:
    return Receiver


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., None]:
    return _wait_until
