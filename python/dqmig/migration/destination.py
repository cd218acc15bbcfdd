"""The migration destination (QEMU's -incoming): accept one migration, check the handshake,
apply page batches into guest memory, verify the memory digest, resume the guest.
"""

from __future__ import annotations

import json
import math
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dqmig import _native
from dqmig.migration import channel
from dqmig.migration.channel import REC, REC_NAME, StreamError
from dqmig.programs import ProgramSpec
from dqmig.vm import MAX_VCPUS, VM, VmConfig, VmError

RUNNING_TIMEOUT_S = 30.0  # every vCPU back from its first run() before "resumed" goes out
HANDSHAKE_WAIT_S = 10.0  # a connection that says nothing this long is not the migration
POLL_FLOOR_S = 0.01  # a wait of zero left is still a (short) wait, never "no timeout"
WORKER_GRACE_S = 1.0  # after the main channel fails, how long page channels get to report
MAX_CHANNELS = 255


class IncomingError(Exception):
    """The migration could not be received; the message says why."""


@dataclass
class IncomingResult:
    handshake: dict[str, Any] = field(default_factory=dict)
    pages_zero: int = 0
    pages_normal: int = 0
    bytes: int = 0
    iterations: int = 0
    digest: int = 0
    verify_time: float = 0.0  # from the last page to the comparison: both hashes, in parallel
    digest_time: float = 0.0  # this side's hash
    source_digest_time: float | None = None  # the source's, from its completion record
    vm: VM | None = None
    unconfirmed: str | None = None  # the guest runs here but the source may not know it
    idle_connections: list[str] = field(default_factory=list)  # dropped: no handshake in time


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_handshake(h: dict[str, Any]) -> None:
    """Refuses a guest this host cannot or should not build."""
    size = h["page_size"] * h["pages"]
    if not 1 <= h["vcpus"] <= MAX_VCPUS:
        raise IncomingError(f"handshake: {h['vcpus']} vCPUs (allowed 1..{MAX_VCPUS})")
    if not 1 <= h["channels"] <= MAX_CHANNELS:
        raise IncomingError(f"handshake: {h['channels']} channels (allowed 1..{MAX_CHANNELS})")
    if h["pages"] == 0:
        raise IncomingError("handshake: a guest of 0 pages")
    if size > host_memory():
        raise IncomingError(f"handshake: guest of {size} bytes does not fit this host's memory")


class Incoming:
    """Listens on `uri` for one migration. `accept_timeout` bounds the wait for the source
    (None = wait as long as it takes, like QEMU)."""

    def __init__(
        self,
        uri: str,
        accept_timeout: float | None = None,
        io_timeout: float = channel.IO_TIMEOUT_S,
        mem_prealloc: bool = False,
    ):
        self.mem_prealloc = mem_prealloc
        self.uri = uri
        self.accept_timeout = accept_timeout
        self.io_timeout = io_timeout
        self.listener = channel.listen(uri)
        self.result = IncomingResult()
        self._channels: list[Any] = []
        self._early: list[socket.socket] = []  # accepted while waiting for the main channel
        self._errors: list[BaseException] = []
        self._count_lock = threading.Lock()
        self.on_handshake: Any = None  # called once the handshake is accepted (QMP: active)

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"tcp:{host}:{port}" if ":" not in host else f"tcp:[{host}]:{port}"

    def _accept(self, timeout: float | None, what: str = "") -> _native.Channel:
        """The next connection; `what` names it in the timeout's message (default: the
        migration's main channel). Connections taken while the main channel was awaited
        come first, in the order they arrived."""
        if self._early:
            return channel.wrap(self._early.pop(0), self.io_timeout)
        self.listener.settimeout(timeout)
        try:
            sock, _ = self.listener.accept()
        except TimeoutError:
            if what:
                raise IncomingError(f"{what} did not connect to {self.address} within {timeout:g} s") from None
            raise IncomingError(f"no migration arrived on {self.address} in time") from None
        return channel.wrap(sock, self.io_timeout)

    def run(self) -> IncomingResult:
        """Receives the migration and returns with the guest running on this side."""
        try:
            return self._run()
        except StreamError as e:
            raise IncomingError(str(e)) from None
        finally:
            self.listener.close()
            for ch in self._channels:
                ch.shutdown()
            for sock in self._early:  # connected early, never used
                sock.close()

    def _accept_main(self) -> tuple[_native.Channel, bytes]:
        """The migration's main channel and its handshake record: from the first connection
        that sends a whole record within HANDSHAKE_WAIT_S of connecting (and its record
        deadline). Silent connections wait side by side, so several cannot queue the real
        migration behind them; one that stays silent, trickles, or closes first is dropped
        and the listener goes on waiting (until accept_timeout)."""
        end = None if self.accept_timeout is None else time.monotonic() + self.accept_timeout
        pending: dict[socket.socket, tuple[float, str]] = {}  # connected, silent: deadline, peer
        try:
            while True:
                now = time.monotonic()
                for sock, (deadline, peer) in list(pending.items()):
                    if deadline <= now:
                        self._drop(pending, sock, peer)
                if end is not None and now >= end:
                    raise IncomingError(f"no migration arrived on {self.address} in time")
                waits = [d for d, _ in pending.values()] + ([end] if end is not None else [])
                timeout = max(POLL_FLOOR_S, min(waits) - now) if waits else None
                ready = select.select([self.listener, *pending], [], [], timeout)[0]
                if self.listener in ready:
                    self._accept_pending(pending, end)
                for sock in (r for r in ready if r is not self.listener):
                    deadline, peer = pending.pop(sock)
                    got = self._receive_handshake(sock, deadline)
                    if got is not None:
                        return got
                    self.result.idle_connections.append(peer)
        finally:
            # Still silent when the main channel arrived: they may be its page channels,
            # connected early; the page channels' accept takes them first.
            self._early = list(pending)

    def _accept_pending(self, pending: dict[socket.socket, tuple[float, str]], end: float | None) -> None:
        self.listener.settimeout(POLL_FLOOR_S)  # select said one is there; never block long
        try:
            sock, addr = self.listener.accept()
        except (BlockingIOError, TimeoutError):
            return  # it went away before we took it
        deadline = time.monotonic() + HANDSHAKE_WAIT_S
        pending[sock] = (deadline if end is None else min(deadline, end), f"{addr[0]}:{addr[1]}")

    def _drop(self, pending: dict[socket.socket, tuple[float, str]], sock: socket.socket, peer: str) -> None:
        del pending[sock]
        sock.close()
        self.result.idle_connections.append(peer)

    def _receive_handshake(self, sock: socket.socket, deadline: float) -> tuple[_native.Channel, bytes] | None:
        """The first record of a connection that has started talking, within what is left
        of its wait (and the record deadline); None if it trickles or closes first."""
        main = channel.wrap(sock, max(min(deadline - time.monotonic(), self.io_timeout), POLL_FLOOR_S))
        self._channels.append(main)  # shut down by run() if the handshake is bad
        try:
            t, payload, _ = main.receive(None)
        except (_native.StreamTimeout, _native.StreamClosed):
            self._channels.remove(main)
            main.shutdown()
            return None
        if REC_NAME.get(t) != "Handshake":
            raise IncomingError(f"expected a handshake, got record type {t}")
        main.set_timeout(self.io_timeout)
        return main, payload

    def _run(self) -> IncomingResult:
        main, payload = self._accept_main()
        try:
            h = _native.decode_handshake(payload)
            check_handshake(h)
            guest = self._build_guest(h)
        except (StreamError, IncomingError, ValueError) as e:
            _tell(main, f"handshake refused: {e}")
            raise IncomingError(f"handshake refused: {e}") from None
        self.result.handshake = h
        main.send_record(REC["HandshakeAck"], b"")
        if self.on_handshake is not None:
            self.on_handshake()
        workers = self._start_page_channels(h, guest) if h["capabilities"] & 1 else []
        try:
            state = self._receive_main(main, guest)
        except BaseException as e:
            # Let the page channels say what they saw before choosing what to report: a
            # failed page channel is what stops the main channel's reads.
            self._end_page_channels(workers, grace=WORKER_GRACE_S)
            reason = self._channel_failure() if self._errors else str(e)
            _tell(main, reason)
            if self._errors:
                raise IncomingError(reason) from None
            raise
        self._end_page_channels(workers, grace=self.io_timeout)
        if any(w.is_alive() for w in workers):
            # Never resume while a channel could still write guest memory.
            _tell(main, "a page channel did not finish")
            raise IncomingError("a page channel did not finish")
        if self._errors:
            _tell(main, self._channel_failure())
            raise IncomingError(self._channel_failure())
        self.result.vm = self._verify_and_resume(main, guest, state)
        return self.result

    def _build_guest(self, h: dict[str, Any]) -> _native.Guest:
        """The guest the handshake describes; with mem-prealloc every page is backed before
        the ack (the source allows for this: `channel.handshake_timeout`)."""
        guest = _native.Guest(h["pages"], h["page_size"], h["vcpus"], h["dirty_ring"], h["pml"])
        if self.mem_prealloc and not guest.prealloc():
            raise IncomingError("cannot preallocate guest memory (mem-prealloc)")
        return guest

    def _start_page_channels(self, h: dict[str, Any], guest: _native.Guest) -> list[threading.Thread]:
        n = h["channels"]
        barrier = threading.Barrier(n, timeout=self.io_timeout)
        chans: dict[int, Any] = {}
        for i in range(n):
            # The source opens them right after the ack.
            ch = self._accept(self.io_timeout, f"multifd page channel {i + 1} of {n}")
            self._channels.append(ch)
            _, payload = channel.expect(ch, "ChannelHello")
            index = channel.decode_u64("ChannelHello", payload)
            if index >= n or index in chans:
                raise IncomingError(f"bad multifd channel index {index}")
            chans[index] = ch
        threads = [
            threading.Thread(target=self._page_channel, args=(ch, guest, barrier), name=f"multifd{i}", daemon=True)
            for i, ch in sorted(chans.items())
        ]
        for t in threads:
            t.start()
        return threads

    def _page_channel(self, ch: Any, guest: _native.Guest, barrier: threading.Barrier) -> None:
        try:
            while True:
                t, payload, stats = ch.receive(guest)
                name = REC_NAME.get(t)
                if stats:
                    self._count(stats)
                elif name == "Sync":
                    channel.decode_u64("Sync", payload)
                    barrier.wait()  # no page of the next round before this round is applied
                elif name == "End":
                    return
                else:
                    raise _native.ProtocolError(f"unexpected {name} record on a page channel")
        except BaseException as e:
            self._errors.append(e)
            barrier.abort()
            main, *pages = self._channels
            for other in pages:
                other.shutdown()
            main.shutdown(read_only=True)  # unblock the main thread, which tells the source why

    def _end_page_channels(self, workers: list[threading.Thread], grace: float) -> None:
        """Waits up to `grace` s for the page-channel threads to end by themselves, then
        shuts their connections so none is left blocked."""
        deadline = time.monotonic() + grace
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        if any(w.is_alive() for w in workers):
            for ch in self._channels[1:]:
                ch.shutdown()
            for w in workers:
                w.join(self.io_timeout)

    def _channel_failure(self) -> str:
        """The most telling page-channel error: a channel closed because the source hung up
        after another one's fault says less than that fault."""
        telling = [e for e in self._errors if not isinstance(e, _native.StreamClosed)]
        e = (telling or self._errors)[0]
        return f"page channel failed: {str(e) or type(e).__name__}"  # some errors have no message

    def _count(self, stats: tuple[int, int, int]) -> None:
        with self._count_lock:  # multifd channel threads count concurrently
            r = self.result
            r.bytes += stats[0]
            r.pages_zero += stats[1]
            r.pages_normal += stats[2]

    def _receive_main(self, main: Any, guest: _native.Guest) -> dict[str, Any]:
        """Applies the main channel's records up to the device state, which follows the
        last page; returns that state."""
        while True:
            t, payload, stats = main.receive(guest)
            name = REC_NAME.get(t, str(t))
            if stats:
                self._count(stats)
            elif name == "Iteration":
                self.result.iterations += 1
            elif name == "DeviceState":
                return channel.decode_json(name, payload)
            elif name == "Complete":
                raise _native.ProtocolError("completion before device state")
            elif name == "Error":
                raise IncomingError(f"source reported: {payload.decode(errors='replace')}")
            else:
                raise _native.ProtocolError(f"unexpected {name} record on the main channel")

    def _verify_and_resume(self, main: Any, guest: _native.Guest, state: dict[str, Any]) -> VM:
        """Verifies the copy and starts the guest here. An Error record goes to the source only
        while no guest runs here: the source may then resume its own (it knows the outcome)."""
        # Every page is in: hash this copy while the source hashes its own (the source's
        # digest comes in the completion record), then compare.
        t0 = time.monotonic()
        digest = guest.digest()
        self.result.digest_time = time.monotonic() - t0
        try:
            main.set_timeout(channel.digest_timeout(guest.size))  # the source is hashing too
            complete = _receive_complete(main)
        except (StreamError, IncomingError) as e:
            _tell(main, str(e))
            raise
        self.result.verify_time = time.monotonic() - t0
        self.result.digest = digest
        if isinstance(complete, dict):  # the source's hash time: reported, never relied on
            self.result.source_digest_time = _seconds(complete.get("digest_time"))
        if not isinstance(complete, dict) or complete.get("digest") != digest:
            source = complete.get("digest") if isinstance(complete, dict) else None
            shown = source if isinstance(source, int) and not isinstance(source, bool) else repr(source)
            kind = "" if shown is source else f" (a {type(source).__name__}, not an integer)"
            msg = f"memory digest mismatch: source {shown}{kind}, destination {digest}"
            _tell(main, msg)
            raise IncomingError(msg)
        try:
            vm = _vm_from_device_state(guest, state)
        except Exception as e:  # any malformed shape is the stream's fault, not a crash
            reason = f"bad device state: {e or type(e).__name__}"
            _tell(main, reason)
            raise IncomingError(reason) from None
        vm.start()  # the guest runs here now: downtime ends
        try:
            vm.wait_running(RUNNING_TIMEOUT_S)  # "resumed" only once every vCPU really runs
        except VmError as e:
            vm.stop()
            _tell(main, f"the guest did not run on the destination: {e}")
            raise IncomingError(f"the guest did not run on the destination: {e}") from None
        try:
            channel.send_json(main, "Resumed", {"verify_time": self.result.verify_time})
        except (StreamError, OSError) as e:
            # Past the completion record the source never resumes its copy by itself (it
            # stays paused, outcome unknown), so the guest keeps running here: exactly one.
            self.result.unconfirmed = f"the source did not get the resume confirmation: {e}"
        return vm


def _seconds(value: Any) -> float | None:
    """A duration from the stream, or None if it is not a finite, non-negative number."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _receive_complete(main: Any) -> Any:
    """The completion record (the source's digest), or the source's reason for failing."""
    t, payload, _ = main.receive(None)
    name = REC_NAME.get(t, str(t))
    if name == "Error":
        raise IncomingError(f"source reported: {payload.decode(errors='replace')}")
    if name != "Complete":
        raise _native.ProtocolError(f"expected the completion record after the device state, got {name}")
    return channel.decode_json(name, payload)


def _vm_from_device_state(guest: _native.Guest, state: dict[str, Any]) -> VM:
    """The destination VM: the source's programs, resumed where they stopped."""
    vcpus = state["vcpus"]
    if not isinstance(vcpus, list) or len(vcpus) != guest.vcpus:
        raise ValueError(f"device state does not carry the guest's {guest.vcpus} vCPUs")
    dma = state.get("dma")
    config = VmConfig(
        vcpus=guest.vcpus,
        memory=guest.size,
        page_size=guest.page_size,
        dirty_ring=guest.dirty_ring,
        pml=guest.pml,
        programs=[ProgramSpec.from_native(json.loads(s)["spec"]) for s in vcpus],
        dma=ProgramSpec.from_native(json.loads(dma)["spec"]) if dma else None,
    )
    vm = VM(config, guest=guest)
    for v, s in zip(vm.all_writers, vcpus + ([dma] if dma else []), strict=True):
        v.import_state(s)
    return vm


def _tell(ch: Any, reason: str) -> None:
    """Best effort: tell the peer why we stop."""
    try:
        ch.send_record(REC["Error"], reason.encode()[:4096])
    except (StreamError, OSError):
        pass


def free_port_uri(host: str = "127.0.0.1") -> str:
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp:{host}:{s.getsockname()[1]}"
