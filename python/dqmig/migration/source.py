"""The migration source: QEMU's pre-copy loop over a real TCP stream.

setup (all pages dirty, dirty logging on, first sync) -> active (send dirty pages in
100 ms rate-limit windows; when the pages left fit in bandwidth x downtime-limit, sync the
dirty log, which is one iteration) -> device (stop the vCPUs, final sync, send the rest
unthrottled, device state, digest) -> completed once the destination says its guest runs.
Any failure or cancel ends in failed/cancelled with the source VM running.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dqmig import _native
from dqmig.migration import channel
from dqmig.migration.channel import REC, StreamError
from dqmig.migration.params import MigrationParameters
from dqmig.migration.precopy import (  # noqa: F401  (re-exported: the loop's names)
    ACTIVE_STATES,
    BATCH_PAGES,
    STEP_S,
    WINDOW_S,
    Cancelled,
    NotConverged,
    PreCopy,
)
from dqmig.vm import VM

SCAN_PAGES = 1 << 16  # dirty-bitmap scan window
RESUME_TIMEOUT_S = 30.0  # destination: verify digest and start its vCPUs (plus its hash's share)


class Migration(PreCopy):
    """One outgoing migration of `vm` to `uri`. `start()` runs it on its own thread;
    `query()` is QEMU's query-migrate; `cancel()` is migrate_cancel."""

    def __init__(self, vm: VM, uri: str, params: MigrationParameters | None = None) -> None:
        g = vm.guest
        super().__init__(params, g.page_size, g.pages)
        self.vm = vm
        self.uri = uri
        self._dirty = np.zeros(g.pages, dtype=bool)  # the migration bitmap
        self._cursor = 0
        # Lazy dirty-log clear (bitmap mode): chunk -> pages the last sync reported there,
        # still unprotected in the log until the chunk's first page is sent.
        self._unprotected: dict[int, np.ndarray] = {}
        self._cancel = threading.Event()
        self._cancel_reason = "cancelled"
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._channels: list[Any] = []  # page channels; [0] is main without multifd
        self._main: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._sent_all_t: float | None = None
        self.verify_time: float | None = None
        self.digest_time: float | None = None  # the source's own hash at switchover
        self._committed = False  # the completion record went out: the destination decides
        self.outcome_unknown = False  # failed after the commit: the guest may run there
        # The wait for "resumed": the destination may still be hashing its copy.
        self.resume_timeout = RESUME_TIMEOUT_S + channel.digest_timeout(g.size)
        self.run_state_lock = threading.Lock()  # held by the switchover's stop and by QMP stop/cont
        self._paused_by_us = False

    def clock(self) -> float:
        return time.monotonic()

    @property
    def thread_id(self) -> int | None:
        """The migration thread's TID while it runs."""
        t = self._thread
        return t.native_id if t is not None and t.is_alive() else None

    def multifd_thread_ids(self) -> list[int]:
        """The multifd sender threads' TIDs (they start with the first pages sent)."""
        pool = self._pool
        threads = sorted(getattr(pool, "_threads", ()), key=lambda t: t.name) if pool is not None else []
        return [t.native_id for t in threads if t.is_alive() and t.native_id is not None]

    # -- control ---------------------------------------------------------------------------

    def start(self) -> Migration:
        if self._thread:
            raise RuntimeError("migration already started")
        self.status = "setup"
        self._thread = threading.Thread(target=self.run, name="migration", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> str:
        if self._thread:
            self._thread.join(timeout)
        return self.status

    def cancel(self, reason: str = "cancelled by migrate_cancel") -> None:
        """Cancels an active migration: the source VM keeps (or resumes) running. Once the
        completion record has gone out it is too late, and the cancel is ignored: the
        destination may already run the guest, and resuming here would run it twice."""
        with self._lock:
            if not self.active or self._committed:
                return
            self._cancel_reason = reason
            self._cancel.set()
            self.status = "cancelling"  # QEMU's state between migrate_cancel and cancelled
        for ch in self._all_channels():
            ch.shutdown()

    def _all_channels(self) -> list[Any]:
        return ([self._main] if self._main else []) + [c for c in self._channels if c is not self._main]

    # -- the migration thread --------------------------------------------------------------

    def run(self) -> None:
        self.status = "setup"
        self.t_start = time.monotonic()
        try:
            self._setup()
            self.status = "active"
            self._iterate()
            self._complete()
        except Cancelled:
            self._fail("cancelled", self._cancel_reason)
        except NotConverged as e:
            self.converged = False
            self._fail("cancelled", str(e))
        except Exception as e:  # anything else fails the migration; the source VM runs on
            e = self._with_peer_reason(e)
            reason = _reason(e)
            if self._committed and not isinstance(e, channel.PeerError):
                # Silence after the commit: the destination may be running the guest.
                self._fail_after_commit(reason)
            elif self._cancel.is_set():
                self._fail("cancelled", self._cancel_reason)
            else:
                self._fail("failed", reason)
        finally:
            self.total_time = time.monotonic() - self.t_start
            self._close()

    def _with_peer_reason(self, e: Exception) -> Exception:
        """A send that failed because the destination closed: the reason it sent before
        closing (an Error record) instead of "connection closed by peer"."""
        closed = isinstance(e, _native.StreamClosed) or type(e) is StreamError
        if not closed or self._main is None or self._cancel.is_set():
            return e
        told = channel.peer_reason(self._main)
        return e if told is None else channel.PeerError(f"the destination gave up: {told}")

    def _fail_after_commit(self, reason: str) -> None:
        """Past the point of no return (the completion record went out) the destination may
        run the guest: the source never resumes by itself. It stays paused and says the
        outcome is unknown; QMP `cont` refuses to run it (see Monitor.cont)."""
        self.outcome_unknown = True
        self.vm.switchover_unknown = True  # for every later attempt and monitor too
        self._paused_by_us = False  # so _fail leaves the guest paused
        self._fail(
            "failed",
            f"switchover outcome unknown: {reason}. The guest stays paused here: the destination "
            "may be running it (check there before resuming this copy)",
        )

    def _fail(self, status: str, reason: str) -> None:
        self._stop_policy()
        self.vm.stop_dirty_log()
        if self._paused_by_us:
            self.vm.resume()
            self._paused_by_us = False
        self.error_desc = reason
        self.status = status
        self._sample("end")

    def _close(self) -> None:
        for ch in self._all_channels():
            ch.shutdown()
        if self._pool:
            self._pool.shutdown(wait=True)

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise Cancelled

    def _setup(self) -> None:
        p, g = self.params, self.vm.guest
        self._main = channel.connect(self.uri, cancel=self._cancel)
        hs = _native_handshake(g, p)
        self._main.send_record(REC["Handshake"], hs)
        # The destination acks once its guest memory exists (and, with mem-prealloc, is
        # backed): give that time in proportion to the guest, then back to the usual bound.
        wait = channel.handshake_timeout(g.size)
        self._main.set_timeout(wait)
        try:
            channel.expect(self._main, "HandshakeAck")
        except _native.StreamTimeout:
            raise _native.StreamTimeout(
                f"the destination did not acknowledge the handshake within {wait:g} s "
                "(it builds, and with mem-prealloc backs, the guest's memory first)"
            ) from None
        self._main.set_timeout(channel.IO_TIMEOUT_S)
        if p.capabilities["multifd"]:
            self._channels = []
            for i in range(p.multifd_channels):
                self._check_cancel()
                ch = channel.connect(self.uri, cancel=self._cancel)
                channel.send_u64(ch, "ChannelHello", i)
                self._channels.append(ch)
            self._pool = ThreadPoolExecutor(len(self._channels), thread_name_prefix="multifd")
        else:
            self._channels = [self._main]
        self._check_cancel()
        self._dirty[:] = True  # every page starts dirty
        self._dirty_count = self._pages
        self.vm.start_dirty_log()
        self._begin()

    # -- what the pre-copy loop asks of the engine ------------------------------------------

    def _wait(self, seconds: float) -> None:
        if self._cancel.wait(seconds):
            raise Cancelled

    def _send_dirty(self, limit: int, *, precopy: bool) -> None:
        self._send(self._take_dirty(limit), precopy=precopy)

    def _after_sync(self) -> None:
        self._barrier()
        channel.send_json(self._main, "Iteration", {"n": self.dirty_sync_count, "remaining": self.remaining})

    @property
    def _channel_count(self) -> int:
        return len(self._channels)

    def _account(self, nbytes: int, duplicate: int, normal: int, pages: int, *, precopy: bool) -> None:
        with self._lock:  # query() reads these from other threads
            super()._account(nbytes, duplicate, normal, pages, precopy=precopy)

    def _ram(self) -> dict[str, Any]:
        with self._lock:
            return super()._ram()

    def _take_dirty(self, n: int) -> np.ndarray:
        """Up to n dirty pages from the cursor on (wrapping), cleared in the bitmap."""
        taken: list[np.ndarray] = []
        got = scanned = 0
        while got < n and scanned < self._pages:
            # Never scan past where this call started: a page taken is not cleared yet.
            seg = self._dirty[self._cursor : self._cursor + min(SCAN_PAGES, self._pages - scanned)]
            idx = np.flatnonzero(seg)[: n - got]
            if len(idx):
                taken.append(idx + self._cursor)
                got += len(idx)
            if got >= n:
                advance = int(idx[-1]) + 1
            else:
                advance = len(seg)
            scanned += advance
            self._cursor = (self._cursor + advance) % self._pages
        pages = np.concatenate(taken).astype(np.uint64) if taken else np.empty(0, np.uint64)
        self._dirty[pages] = False
        self._dirty_count -= len(pages)
        return pages

    def _protect(self, pages: np.ndarray) -> None:
        """Clears the dirty log of every chunk `pages` touch that the last sync left
        unprotected, before those pages are read for sending."""
        if not self._unprotected:
            return
        for chunk in np.unique(pages >> np.uint64(self.params.x_clear_bitmap_shift)).tolist():
            reported = self._unprotected.pop(chunk, None)
            if reported is not None:
                self.vm.guest.clear_dirty(reported)

    def _send(self, pages: np.ndarray, *, precopy: bool) -> None:
        if not len(pages):
            return
        self._protect(pages)
        g = self.vm.guest
        if len(self._channels) == 1:
            results = [self._channels[0].send_pages(g, pages, BATCH_PAGES)]
        else:
            parts = np.array_split(pages, len(self._channels))
            assert self._pool is not None
            futures = [
                self._pool.submit(ch.send_pages, g, part, BATCH_PAGES)
                for ch, part in zip(self._channels, parts, strict=True)
                if len(part)
            ]
            results = [f.result(timeout=channel.IO_TIMEOUT_S * 2) for f in futures]
        self._account(
            sum(r[0] for r in results),
            sum(r[1] for r in results),
            sum(r[2] for r in results),
            len(pages),
            precopy=precopy,
        )

    def _merge_harvest(self, final: bool = False) -> int:
        """Harvests the dirty log into the migration bitmap; returns the pages newly dirty.

        As QEMU with manual dirty-log protect (migration_clear_memory_region_dirty_bitmap),
        bitmap mode leaves the reported pages unprotected and clears each chunk of
        2^x-clear-bitmap-shift pages only before its first page is sent (`_protect`), so a
        page written between the sync and its send goes once. The final sync (vCPUs
        stopped) takes the log whole."""
        g = self.vm.guest
        shift = self.params.x_clear_bitmap_shift
        lazy = bool(shift) and not final and not g.dirty_ring
        harvested = g.harvest_lazy() if lazy else g.harvest()
        self._unprotected = _by_chunk(harvested, shift) if lazy else {}
        new = int(np.count_nonzero(~self._dirty[harvested]))
        self._dirty[harvested] = True
        self._dirty_count += new
        return new

    def _barrier(self) -> None:
        """multifd: every page channel marks the end of this round, so the destination
        never applies a page from a later round before an earlier copy of it."""
        if self._channels != [self._main]:
            for ch in self._channels:
                channel.send_u64(ch, "Sync", self.dirty_sync_count)

    # -- switchover ------------------------------------------------------------------------

    def _complete(self) -> None:
        with self.run_state_lock:  # a QMP stop/cont sees either state, never half of this
            self.status = "device"
            self.t_stop = time.monotonic()
            was_running = self.vm.running
            # Downtime starts. Interruptible throttle sleeps end at once; dirty-limit's (QEMU's
            # g_usleep) are waited out, and the time that takes is the stop latency.
            self.stop_latency = self.vm.pause()
            self._paused_by_us = was_running  # a guest the user had stopped stays stopped on failure
        self._stop_policy()
        self._sample("stop")
        self._merge_harvest(final=True)
        self.dirty_sync_count += 1
        self._drain()
        self._barrier()
        if self._channels != [self._main]:
            for ch in self._channels:
                ch.send_record(REC["End"], b"")
        channel.send_json(self._main, "DeviceState", self._device_state())
        # QEMU's downtime ends here (migration_completion_end): everything is sent. What
        # follows is dqmig's own digest check and the resume round trip (x-blackout-time).
        self._sent_all_t = time.monotonic()
        self.vm.stop_dirty_log()
        # The vCPUs are stopped, so memory is final. Hashing only now leaves the cores to the
        # sender and receiver while pages move; the destination hashes its copy meanwhile.
        self._check_cancel()
        t0 = time.monotonic()
        digest = self.vm.guest.digest()
        self.digest_time = time.monotonic() - t0
        with self._lock:  # the commit point: no cancel after this
            self._check_cancel()
            self._committed = True
        complete = {"digest": digest, "transferred": self.transferred, "digest_time": self.digest_time}
        channel.send_json(self._main, "Complete", complete)
        self._main.set_timeout(self.resume_timeout)
        _, payload = channel.expect(self._main, "Resumed")
        now = time.monotonic()
        self.downtime = self._sent_all_t - self.t_stop
        self.blackout_time = now - self.t_stop
        info = channel.decode_json("Resumed", payload)
        self.verify_time = info.get("verify_time") if isinstance(info, dict) else None
        self.converged = True
        self.status = "completed"
        self.total_time = now - self.t_start
        self._paused_by_us = False  # the guest lives on the destination now
        self._sample("complete")

    def _device_state(self) -> dict[str, Any]:
        vm = self.vm
        return {
            "vcpus": [v.export_state() for v in vm.vcpus],
            "dma": vm.dma.export_state() if vm.dma else None,
            "counters": vm.counters(),
        }

    # -- telemetry -------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        samples = [{k: v for k, v in s.items() if k != "_t"} for s in self.samples]
        return {
            "uri": self.uri,
            "parameters": self.params.as_qmp(),
            "capabilities": self.params.capabilities_qmp(),
            "result": self.query(),
            "converged": self.converged,
            "policy-changes": self.policy_changes,
            "verify-time": None if self.verify_time is None else int(self.verify_time * 1000),
            "digest-time": None if self.digest_time is None else int(self.digest_time * 1000),
            "samples": samples,
        }


def _reason(e: BaseException) -> str:
    """A failure's reason for query-migrate's error-desc, never empty: an error with no
    message (TimeoutError()) is named by its type."""
    text = str(e) if isinstance(e, StreamError | OSError | ValueError) else repr(e)
    return text or f"{type(e).__name__} (no detail)"


def _by_chunk(pages: np.ndarray, shift: int) -> dict[int, np.ndarray]:
    """Ascending pages grouped by chunk of 2^shift pages: chunk number -> its pages."""
    if not len(pages):
        return {}
    chunks = pages >> np.uint64(shift)
    bounds = np.flatnonzero(np.diff(chunks)) + 1
    return {int(c[0]): p for c, p in zip(np.split(chunks, bounds), np.split(pages, bounds), strict=True)}


def _native_handshake(guest: Any, p: MigrationParameters) -> bytes:
    return _native.encode_handshake(
        guest.page_size, guest.pages, guest.vcpus, guest.dirty_ring, p.channels, p.capability_bits(), int(guest.pml)
    )
