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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dqmig import _native
from dqmig.migration import channel
from dqmig.migration.channel import REC, StreamError
from dqmig.migration.params import MigrationParameters
from dqmig.policies import Policy, make_policy
from dqmig.vm import VM

WINDOW_S = 0.100  # QEMU's BUFFER_DELAY: rate-limit and bandwidth window
STEP_S = 0.050  # longest send step before the loop re-checks (QEMU: 50 ms)
DIRTY_RATE_PERIOD_S = 1.0  # dirty-pages-rate is computed over >= 1 s
BATCH_PAGES = 512  # pages per batch record (2 MiB at 4 KiB)
CHUNK_BYTES = 16 << 20  # per channel per trip into Rust (fewer Python round trips), at most
SCAN_PAGES = 1 << 16  # dirty-bitmap scan window
RESUME_TIMEOUT_S = 30.0  # destination: verify digest and start its vCPUs (plus its hash's share)

ACTIVE_STATES = ("setup", "active", "cancelling", "device")
ENDED_STATES = ("completed", "failed", "cancelled")


class Cancelled(Exception):
    pass


class NotConverged(Exception):
    pass


class Migration:
    """One outgoing migration of `vm` to `uri`. `start()` runs it on its own thread;
    `query()` is QEMU's query-migrate; `cancel()` is migrate_cancel."""

    def __init__(self, vm: VM, uri: str, params: MigrationParameters | None = None) -> None:
        # QEMU's events, if set: ("MIGRATION", {"status"}) at each status change and
        # ("MIGRATION_PASS", {"pass"}) at each dirty sync. Called on the changing thread.
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        self.vm = vm
        self.uri = uri
        self.params = params or MigrationParameters()
        self.multifd = self.params.capabilities["multifd"]  # fixed for the migration, as in QEMU
        self.status = "none"
        self.error_desc: str | None = None
        self.converged: bool | None = None
        self.samples: list[dict[str, Any]] = []
        g = vm.guest
        self.page_size = g.page_size
        self._pages = g.pages
        self._dirty = np.zeros(g.pages, dtype=bool)  # the migration bitmap
        self._dirty_count = 0
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
        # query-migrate counters
        self.t_start = 0.0
        self.setup_time = 0.0
        self.total_time = 0.0
        self.downtime: float | None = None  # QEMU's: stop to the last byte of device state sent
        self.blackout_time: float | None = None  # dqmig's x-blackout-time: stop to the guest running there
        self._sent_all_t: float | None = None
        self.stop_latency: float | None = None  # from the stop request to every vCPU parked
        self.t_stop: float | None = None
        self.transferred = 0
        self.duplicate = 0
        self.normal = 0
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.dirty_sync_count = 0
        self.dirty_pages_rate = 0.0
        self.bandwidth = 0.0  # bytes/s over the last window
        self.threshold = 0.0  # bytes
        self.pages_per_second = 0.0
        self.verify_time: float | None = None
        self.expected_downtime: float | None = None  # s, updated at a window (QEMU's rule)
        self._dirty_bytes_last_sync = 0
        self.digest_time: float | None = None  # the source's own hash at switchover
        self._committed = False  # the completion record went out: the destination decides
        self.outcome_unknown = False  # failed after the commit: the guest may run there
        # The wait for "resumed": the destination may still be hashing its copy.
        self.resume_timeout = RESUME_TIMEOUT_S + channel.digest_timeout(g.size)
        self.run_state_lock = threading.Lock()  # held by the switchover's stop and by QMP stop/cont
        self._window_start = 0.0
        self._window_bytes = 0
        self._window_pages = 0
        self._period_start = 0.0
        self._period_new_dirty = 0
        self._paused_by_us = False
        self._last_sample: dict[str, Any] | None = None
        self.new_dirty_pages = 0  # pages newly dirtied, summed over syncs (auto-converge trigger)
        self.policy: Policy | None = None
        self.policy_changes: list[dict[str, Any]] = []
        self._policy_request: tuple[str, str] | None = None

    # -- observed state: each change is an event (see on_event) ---------------------------

    @property
    def status(self) -> str:
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        """migrate_set_state. Once cancelling, the migration only ends (cancelled, or failed
        or completed if it was too late): a step of the thread never takes it back."""
        old = self.__dict__.get("_status")
        if old == "cancelling" and value not in ENDED_STATES:
            return
        self._status = value
        if value != old and self.on_event is not None:
            self.on_event("MIGRATION", {"status": value})

    @property
    def dirty_sync_count(self) -> int:
        return self._dirty_sync_count

    @dirty_sync_count.setter
    def dirty_sync_count(self, value: int) -> None:
        """Each sync of the dirty log (migration_bitmap_sync) is a MIGRATION_PASS event."""
        old = self.__dict__.get("_dirty_sync_count", 0)
        self._dirty_sync_count = value
        if value > old and self.on_event is not None:
            self.on_event("MIGRATION_PASS", {"pass": value})

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

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

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
        self.dirty_sync_count = 1
        now = time.monotonic()
        self.setup_time = now - self.t_start
        self._window_start = self._period_start = now
        self._start_policy(make_policy(self.vm, self.params), "setup")
        self._sample("setup")

    # -- throttling ------------------------------------------------------------------------

    def _start_policy(self, policy: Policy, reason: str) -> None:
        self.policy = policy
        self.policy_changes.append(
            {"t": round(time.monotonic() - self.t_start, 4), "policy": policy.name, "reason": reason}
        )
        policy.start(self)

    def _stop_policy(self) -> None:
        if self.policy is not None:
            self.policy.stop()

    def request_policy(self, name: str, reason: str) -> None:
        """Switches the throttling policy at the migration thread's next step (QMP toggling a
        capability mid-migration, or dirty-quota falling back to auto-converge)."""
        self._policy_request = (name, reason)

    def _apply_policy_request(self) -> None:
        request, self._policy_request = self._policy_request, None
        if request is None:
            return
        name, reason = request
        if self.policy is not None and self.policy.name == name:
            return
        self._stop_policy()
        self._start_policy(make_policy(self.vm, self.params, name), reason)

    # -- pre-copy --------------------------------------------------------------------------

    @property
    def remaining(self) -> int:
        return self._dirty_count * self.page_size

    def _iterate(self) -> None:
        while True:
            self._check_cancel()
            self._check_caps()
            self._apply_policy_request()
            if self.policy is not None and self.policy.periodic_sync_due(self, time.monotonic()):
                self._sync()  # QEMU 9.2: a long iteration still syncs (and re-checks the throttle)
            if self.remaining < self.threshold or self._dirty_count == 0:
                self._sync()
                if self.remaining < self.threshold or self._dirty_count == 0:
                    return
            self._send_step()

    def _check_caps(self) -> None:
        p = self.params
        if p.x_max_iterations and self.dirty_sync_count > p.x_max_iterations:
            raise NotConverged(f"did not converge within {p.x_max_iterations} iterations")
        if p.x_max_time and time.monotonic() - self.t_start > p.x_max_time:
            raise NotConverged(f"did not converge within {p.x_max_time:g} s")

    def _send_step(self) -> None:
        """Sends dirty pages until rate-limited, clean, or STEP_S has passed."""
        step_end = time.monotonic() + STEP_S
        budget = self.params.max_bandwidth * WINDOW_S
        while self._dirty_count and time.monotonic() < step_end:
            self._check_cancel()
            self._tick()
            if budget and self._window_bytes >= budget:
                # Rate-limited: sleep to the window's end (cancel ends it early).
                left = self._window_start + WINDOW_S - time.monotonic()
                if left > 0 and self._cancel.wait(left):
                    raise Cancelled
                continue
            limit = self._chunk_pages() * len(self._channels)
            if budget:
                limit = min(limit, max(1, int((budget - self._window_bytes) // self.page_size) + 1))
            self._send(self._take_dirty(limit), precopy=True)

    def _chunk_pages(self) -> int:
        """Pages per channel for one trip into Rust: CHUNK_BYTES, but no more than a step's
        worth at the measured bandwidth (one batch until it is measured), so a slow link
        still ticks every window."""
        if not self.bandwidth:
            return BATCH_PAGES
        step = int(self.bandwidth * STEP_S / len(self._channels))
        return max(1, min(CHUNK_BYTES, step) // self.page_size)

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
        nbytes = sum(r[0] for r in results)
        with self._lock:
            self.transferred += nbytes
            self.duplicate += sum(r[1] for r in results)
            self.normal += sum(r[2] for r in results)
            if precopy:
                self.precopy_bytes += nbytes
            else:
                self.downtime_bytes += nbytes
        self._window_bytes += nbytes
        self._window_pages += len(pages)

    def _tick(self) -> None:
        """Closes a >= 100 ms window: bandwidth, threshold, expected downtime, a sample."""
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed < WINDOW_S:
            return
        self.bandwidth = self._window_bytes / elapsed
        self.pages_per_second = self._window_pages / elapsed
        self.threshold = self.bandwidth * self.params.downtime_limit / 1000
        # migration_update_counters: only with a dirty rate and more than 10000 bytes sent.
        if self.dirty_pages_rate and self._window_bytes > 10000:
            self.expected_downtime = self._dirty_bytes_last_sync / self.bandwidth
        self._window_start, self._window_bytes, self._window_pages = now, 0, 0
        if self.policy is not None:
            self.policy.on_tick(self)
        self._sample("tick")

    def _sync(self) -> None:
        """One iteration: harvest the dirty log into the migration bitmap."""
        self._tick()
        new = self._merge_harvest()
        self._period_new_dirty += new
        self.new_dirty_pages += new
        self._dirty_bytes_last_sync = self.remaining
        self.dirty_sync_count += 1
        now = time.monotonic()
        if now - self._period_start >= DIRTY_RATE_PERIOD_S:
            self.dirty_pages_rate = self._period_new_dirty / (now - self._period_start)
            self._period_start, self._period_new_dirty = now, 0
        if self.policy is not None:
            self.policy.on_sync(self)
        self._barrier()
        channel.send_json(self._main, "Iteration", {"n": self.dirty_sync_count, "remaining": self.remaining})
        self._sample("sync")

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
        while self._dirty_count > 0:
            self._check_cancel()
            self._send(self._take_dirty(self._chunk_pages() * len(self._channels)), precopy=False)
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

    def query(self) -> dict[str, Any]:
        """QEMU's query-migrate."""
        now = time.monotonic()
        out: dict[str, Any] = {"status": self.status}
        if self.status == "none":
            return out
        total = (now - self.t_start) if self.active else self.total_time
        out["total-time"] = int(total * 1000)
        out["setup-time"] = int(self.setup_time * 1000)
        if self.downtime is not None and self.blackout_time is not None:
            out["downtime"] = int(self.downtime * 1000)
            out["x-blackout-time"] = int(self.blackout_time * 1000)
        elif self.expected_downtime is not None:
            out["expected-downtime"] = int(self.expected_downtime * 1000)
        with self._lock:
            out["ram"] = {
                "transferred": self.transferred,
                "total": self._pages * self.page_size,
                "remaining": self.remaining,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal * self.page_size,
                "dirty-pages-rate": int(self.dirty_pages_rate),
                "mbps": round(self.bandwidth * 8 / 1e6, 3),
                "dirty-sync-count": self.dirty_sync_count,
                "pages-per-second": int(self.pages_per_second),
                "page-size": self.page_size,
                "precopy-bytes": self.precopy_bytes,
                "downtime-bytes": self.downtime_bytes,
            }
        if self.stop_latency is not None:
            out["x-stop-latency"] = int(self.stop_latency * 1000)
        if self.policy is not None and self.policy.active:
            out.update(self.policy.query())
        if self.error_desc:
            out["error-desc"] = self.error_desc
        return out

    def _sample(self, event: str) -> None:
        """A time-series point: query-migrate plus per-vCPU guest progress."""
        now = time.monotonic()
        counters = self.vm.counters()
        prev = self._last_sample
        vcpus = []
        for i, c in enumerate(counters):
            row = {
                "progress": c["progress"],
                "pages-dirtied": c["pages_dirtied"],
                "sleep-ns": c["sleep_ns"],
                "cpu-ns": c["cpu_ns"],  # the vCPU thread's CPU time
                "halt-ns": c["halt_ns"],  # halted in the guest (idle, rate limit)
                "quota-exits": c["exits"]["DIRTY_QUOTA_EXHAUSTED"],
                "ring-full-exits": c["exits"]["DIRTY_RING_FULL"],
            }
            if prev and now > prev["_t"]:
                dt = now - prev["_t"]
                row["progress-rate"] = (c["progress"] - prev["vcpus"][i]["progress"]) / dt
            vcpus.append(row)
        sample = {"t": round(now - self.t_start, 4), "_t": now, "event": event, **self.query()}
        sample["threshold"] = int(self.threshold)
        sample["vcpus"] = vcpus
        if self.policy is not None:
            sample["policy"] = self.policy.name
            sample.update(self.policy.sample())
        self._last_sample = sample
        self.samples.append(sample)

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
