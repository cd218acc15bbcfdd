"""QEMU's pre-copy loop, shared by both engines.

`PreCopy` holds query-migrate's counters and the loop's decisions: 100 ms rate-limit and
bandwidth windows, threshold = bandwidth x downtime-limit, expected downtime, the dirty
syncs (one per iteration) and their dirty-rate period, the switchover decision, the caps,
the policy's hooks and the telemetry samples. An engine supplies what moves pages and time:

- `clock()`: its time (the emulator's monotonic clock, the simulator's virtual clock);
- `_send_dirty(limit, precopy=)`: take up to `limit` dirty pages from the cursor on and send
  them, accounting through `_account` (the emulator over TCP, the simulator over its link
  model, which advances virtual time);
- `_merge_harvest(final=)`: harvest the dirty log into the migration bitmap, returning the
  pages newly dirty, and `_dirty_count`, the pages in that bitmap;
- `_wait(seconds)`: the rate limiter's sleep (cancellable on the emulator);
- `_after_sync()`: what goes on the wire at a sync (the emulator's barrier and record);
- `vm`: an engine.Host with `counters()`.

The emulator's `migration.source.Migration` adds the TCP stream and the switchover (stop,
final sync, device state, digest, commit); the simulator's `sim.engine.SimMigration` its own
switchover in virtual time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from dqmig.migration.params import MigrationParameters
from dqmig.policies import Policy, make_policy

WINDOW_S = 0.100  # QEMU's BUFFER_DELAY: rate-limit and bandwidth window
STEP_S = 0.050  # longest send step before the loop re-checks (QEMU: 50 ms)
DIRTY_RATE_PERIOD_S = 1.0  # dirty-pages-rate is computed over >= 1 s
BATCH_PAGES = 512  # pages per batch record (2 MiB at 4 KiB)
CHUNK_BYTES = 16 << 20  # per channel per trip into Rust (fewer Python round trips), at most
RECORD_HEADER = 8  # bytes: every record's header (stream.rs HEADER_LEN)
BATCH_HEADER = 8  # bytes: a page batch's count and reserved field
ENTRY_BYTES = 8  # bytes: a page batch's entry per page (page number, zero flag)

ACTIVE_STATES = ("setup", "active", "cancelling", "device")
ENDED_STATES = ("completed", "failed", "cancelled")


class Cancelled(Exception):
    pass


class NotConverged(Exception):
    pass


def batch_bytes(pages: int, normal: int, page_size: int, batch: int = BATCH_PAGES) -> int:
    """Bytes on the wire for `pages` pages sent in batches of `batch`, `normal` of them with
    data (the rest zero pages, sent as flags): stream.rs send_pages."""
    if pages <= 0:
        return 0
    batches = math.ceil(pages / batch)
    return batches * (RECORD_HEADER + BATCH_HEADER) + pages * ENTRY_BYTES + normal * page_size


class PreCopy:
    """The engine-independent part of an outgoing migration (see the module doc)."""

    vm: Any  # an engine.Host with counters()

    def __init__(self, params: MigrationParameters | None, page_size: int, pages: int) -> None:
        # QEMU's events, if set: ("MIGRATION", {"status"}) at each status change and
        # ("MIGRATION_PASS", {"pass"}) at each dirty sync. Called on the changing thread.
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        self.params = params or MigrationParameters()
        self.multifd = self.params.capabilities["multifd"]  # fixed for the migration, as in QEMU
        self.status = "none"
        self.error_desc: str | None = None
        self.converged: bool | None = None
        self.samples: list[dict[str, Any]] = []
        self.page_size = page_size
        self._pages = pages
        self._dirty_count = 0
        # query-migrate counters
        self.t_start = 0.0
        self.setup_time = 0.0
        self.total_time = 0.0
        self.downtime: float | None = None  # QEMU's: stop to the last byte of device state sent
        self.blackout_time: float | None = None  # dqmig's x-blackout-time: stop to the guest running there
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
        self.expected_downtime: float | None = None  # s, updated at a window (QEMU's rule)
        self._dirty_bytes_last_sync = 0
        self._window_start = 0.0
        self._window_bytes = 0
        self._window_pages = 0
        self._period_start = 0.0
        self._period_new_dirty = 0
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

    # -- what an engine provides -------------------------------------------------------------

    def clock(self) -> float:
        raise NotImplementedError

    def _send_dirty(self, limit: int, *, precopy: bool) -> None:
        raise NotImplementedError

    def _merge_harvest(self, final: bool = False) -> int:
        raise NotImplementedError

    def _wait(self, seconds: float) -> None:
        raise NotImplementedError

    def _check_cancel(self) -> None:
        pass

    def _after_sync(self) -> None:
        pass

    @property
    def _channel_count(self) -> int:
        return self.params.channels

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATES

    # -- setup and throttling --------------------------------------------------------------

    def _begin(self) -> None:
        """The setup sync is done (every page dirty, logging on): dirty-sync-count 1, the
        first window and dirty-rate period begin, the policy starts."""
        self.dirty_sync_count = 1
        now = self.clock()
        self.setup_time = now - self.t_start
        self._window_start = self._period_start = now
        self._start_policy(make_policy(self.vm, self.params), "setup")
        self._sample("setup")

    def _start_policy(self, policy: Policy, reason: str) -> None:
        self.policy = policy
        self.policy_changes.append(
            {"t": round(self.clock() - self.t_start, 4), "policy": policy.name, "reason": reason}
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
        """Until the pages left fit in the threshold after a sync: then return, and the
        engine stops the guest (stop-and-copy)."""
        while True:
            self._check_cancel()
            self._check_caps()
            self._apply_policy_request()
            if self.policy is not None and self.policy.periodic_sync_due(self, self.clock()):
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
        if p.x_max_time and self.clock() - self.t_start > p.x_max_time:
            raise NotConverged(f"did not converge within {p.x_max_time:g} s")

    def _send_step(self) -> None:
        """Sends dirty pages until rate-limited, clean, or STEP_S has passed."""
        step_end = self.clock() + STEP_S
        budget = self.params.max_bandwidth * WINDOW_S
        while self._dirty_count and self.clock() < step_end:
            self._check_cancel()
            self._tick()
            if budget and self._window_bytes >= budget:
                # Rate-limited: sleep to the window's end (cancel ends it early). Never a
                # zero wait on a virtual clock: rounding can leave the window just short.
                self._wait(max(0.0, self._window_start + WINDOW_S - self.clock()))
                continue
            limit = self._chunk_pages() * self._channel_count
            if budget:
                limit = min(limit, max(1, int((budget - self._window_bytes) // self.page_size) + 1))
            self._send_dirty(limit, precopy=True)

    def _chunk_pages(self) -> int:
        """Pages per channel for one trip into Rust: CHUNK_BYTES, but no more than a step's
        worth at the measured bandwidth (one batch until it is measured), so a slow link
        still ticks every window."""
        if not self.bandwidth:
            return BATCH_PAGES
        step = int(self.bandwidth * STEP_S / self._channel_count)
        return max(1, min(CHUNK_BYTES, step) // self.page_size)

    def _account(self, nbytes: int, duplicate: int, normal: int, pages: int, *, precopy: bool) -> None:
        """Counts a send: query-migrate's totals and the current window."""
        self.transferred += nbytes
        self.duplicate += duplicate
        self.normal += normal
        if precopy:
            self.precopy_bytes += nbytes
        else:
            self.downtime_bytes += nbytes
        self._window_bytes += nbytes
        self._window_pages += pages

    def _drain(self) -> None:
        """Stop-and-copy: sends every page left, without rate limit."""
        while self._dirty_count > 0:
            self._check_cancel()
            self._send_dirty(self._chunk_pages() * self._channel_count, precopy=False)

    def _tick(self) -> None:
        """Closes a >= 100 ms window: bandwidth, threshold, expected downtime, a sample."""
        now = self.clock()
        elapsed = now - self._window_start
        if elapsed < WINDOW_S:
            return
        self.bandwidth = self._window_bytes / elapsed
        self.pages_per_second = self._window_pages / elapsed
        # migration_update_counters: avail-switchover-bandwidth, when set, stands in for the
        # measured bandwidth in the threshold and the expected downtime ("trust the user").
        expected_bw = self.params.avail_switchover_bandwidth or self.bandwidth
        self.threshold = expected_bw * self.params.downtime_limit / 1000
        # Expected downtime only with a dirty rate and more than 10000 bytes sent.
        if self.dirty_pages_rate and self._window_bytes > 10000:
            self.expected_downtime = self._dirty_bytes_last_sync / expected_bw
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
        now = self.clock()
        if now - self._period_start >= DIRTY_RATE_PERIOD_S:
            self.dirty_pages_rate = self._period_new_dirty / (now - self._period_start)
            self._period_start, self._period_new_dirty = now, 0
        if self.policy is not None:
            self.policy.on_sync(self)
        self._after_sync()
        self._sample("sync")

    # -- telemetry -------------------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """QEMU's query-migrate."""
        now = self.clock()
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
        out["ram"] = self._ram()
        if self.stop_latency is not None:
            out["x-stop-latency"] = int(self.stop_latency * 1000)
        if self.policy is not None and self.policy.active:
            out.update(self.policy.query())
        if self.error_desc:
            out["error-desc"] = self.error_desc
        return out

    def _ram(self) -> dict[str, Any]:
        return {
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

    def _sample(self, event: str) -> None:
        """A time-series point: query-migrate plus per-vCPU guest progress."""
        now = self.clock()
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
        self._keep_sample(sample)

    def _keep_sample(self, sample: dict[str, Any]) -> None:
        self.samples.append(sample)
