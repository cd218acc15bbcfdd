"""The dirty-quota policy: the KVM + QEMU patch series, as it was meant to work.

Every throttled writer gets a dirty quota; at each DIRTY_QUOTA_EXHAUSTED exit the allocator
(allocator.py) decides how long it sleeps and how much quota it gets next. Beyond the RFC:
the DMA writer draws from the same budget (x-dirty-quota-dma), the bulk iteration can run
unthrottled (x-dirty-quota-skip-bulk), and over-throttling falls back to auto-converge
(x-dirty-quota-fallback), by this rule:

    over a window of FALLBACK_WINDOW_S seconds (judged at dirty syncs), the writers the
    allocator made sleep in it slept more than FALLBACK_SLEEP_SHARE of the time on average,
    and the bytes left to send shrank by less than FALLBACK_MIN_PROGRESS of what they were,
    and the vCPUs are what dirties: an unthrottled DMA writer (x-dirty-quota-dma off) did not
    itself dirty more than (1 - FALLBACK_MIN_PROGRESS) of what was sent in the window.

Then the quota's budget is too generous for these vCPUs (the network estimate is wrong), and
auto-converge, which throttles vCPUs by their run time rather than by a budget, takes over.
When the DMA writer is what keeps the bytes left from shrinking, auto-converge cannot help
either (QEMU throttles vCPUs only): the migration stays with dirty quota, and query-migrate's
`dirty-quota.stalled-by` says "dma" (x-dirty-quota-dma is what would help).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from dqmig.engine import Exit, Host, MigrationView, Writer
from dqmig.policies.allocator import QuotaAllocator
from dqmig.policies.base import Policy

FALLBACK_WINDOW_S = 3.0
FALLBACK_SLEEP_SHARE = 0.9
FALLBACK_MIN_PROGRESS = 0.10


class DirtyQuota(Policy):
    name = "dirty-quota"

    def __init__(self, vm: Host, params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(vm, params)
        self.writers = list(vm.vcpus) + ([vm.dma] if vm.dma and params.x_dirty_quota_dma else [])
        self.allocator = QuotaAllocator(
            writers=len(self.writers),
            interval=params.x_dirty_quota_interval / 1000,
            ratio=params.x_dirty_quota_ratio,
            initial_throughput=params.x_dirty_quota_initial_throughput,
            page_size=vm.guest.page_size,
            window=params.x_dirty_quota_window / 1000,
            clock=lambda: self.clock(),
        )
        self.enforcing = False
        self.fell_back = False
        self._lock = threading.Lock()
        # (t, remaining, sleep per writer, pages the unthrottled DMA writer dirtied, bytes sent)
        self._history: deque[tuple[float, int, list[float], int, int]] = deque()
        self.stalled_by: str | None = None
        self._last_sample: list[tuple[int, int, int]] | None = None  # (granted, dirtied, exits)

    def _slot(self, vcpu: Writer) -> int | None:
        if vcpu.is_device:
            return len(self.vm.vcpus) if len(self.writers) > len(self.vm.vcpus) else None
        return vcpu.index

    def start(self, migration: MigrationView) -> None:
        super().start(migration)
        if not self.params.x_dirty_quota_skip_bulk:
            self._arm()

    def _arm(self) -> None:
        """Quota 1 above the count: each writer's next dirtied page exits, and the allocator
        hands out the first grant (the RFC's start of dirty logging)."""
        self.enforcing = True
        for w in self.writers:
            w.quota = w.dirty_count + 1

    def stop(self) -> None:
        self.enforcing = False
        for w in self.writers:
            w.quota = 0  # throttling off
        super().stop()

    def on_tick(self, m: MigrationView) -> None:
        p = self.params  # read live: QMP may tune them mid-migration
        with self._lock:
            self.allocator.retune(
                interval=p.x_dirty_quota_interval / 1000,
                ratio=p.x_dirty_quota_ratio,
                window=p.x_dirty_quota_window / 1000,
            )
            self.allocator.update_throughput(m.bandwidth)

    def on_sync(self, m: MigrationView) -> None:
        if not self.enforcing and m.dirty_sync_count >= 2:
            self._arm()  # the bulk iteration is over
        if self.params.x_dirty_quota_fallback and self._over_throttling(m):
            self.fell_back = True
            m.request_policy("auto-converge", "dirty-quota over-throttling: falling back to auto-converge")

    def _over_throttling(self, m: MigrationView) -> bool:
        t = self.clock()
        slept = [s.total_sleep for s in self.allocator.state]
        self._history.append((t, m.remaining, slept, self._free_dma_dirtied(), m.transferred))
        # Keep the newest entry at or before the window's start: syncs may be seconds apart.
        while len(self._history) > 1 and self._history[1][0] <= t - FALLBACK_WINDOW_S:
            self._history.popleft()
        t0, remaining0, slept0, dma0, sent0 = self._history[0]
        if not self.enforcing or t - t0 < FALLBACK_WINDOW_S:
            return False
        shares = [(b - a) / (t - t0) for a, b in zip(slept0, slept, strict=True) if b > a] or [0.0]
        if m.remaining <= remaining0 * (1 - FALLBACK_MIN_PROGRESS):
            self.stalled_by = None
            return False  # converging
        sent_pages = (m.transferred - sent0) / m.page_size
        if self._free_dma_dirtied() - dma0 > sent_pages * (1 - FALLBACK_MIN_PROGRESS):
            self.stalled_by = "dma"  # auto-converge would not throttle it either
            return False
        return sum(shares) / len(shares) > FALLBACK_SLEEP_SHARE

    def _free_dma_dirtied(self) -> int:
        """Pages dirtied by a DMA writer this policy does not throttle (0 when there is none)."""
        dma = self.vm.dma
        return dma.dirty_count if dma is not None and dma not in self.writers else 0

    def handle_exit(self, vm: Host, vcpu: Writer, exit: Exit) -> None:
        slot = self._slot(vcpu)
        if exit.reason != "DIRTY_QUOTA_EXHAUSTED" or not self.enforcing or slot is None:
            super().handle_exit(vm, vcpu, exit)
            return
        with self._lock:
            d = self.allocator.on_exit(slot, exit.count, exit.quota)
        if d.sleep > 0:
            vm.throttle_sleep(vcpu, d.sleep)
        if self.enforcing:  # a stop while asleep turned throttling off
            vcpu.quota = exit.count + d.grant

    def query(self) -> dict[str, Any]:
        a = self.allocator
        return {
            "dirty-quota": {
                "interval-ms": round(a.interval * 1000, 3),
                "limit-pages-per-second": int(a.limit),
                "share-pages": a.share,
                "pool-pages": a.pool,
                "throughput": int(a.throughput),
                "enforcing": self.enforcing,
                "fell-back": self.fell_back,
                "stalled-by": self.stalled_by,
            }
        }

    def sample(self) -> dict[str, Any]:
        """Per writer since the last sample: pages granted, pages dirtied, quota exits."""
        a = self.allocator
        cur = [(s.total_granted, w.dirty_count, s.exits) for s, w in zip(a.state, self.writers, strict=True)]
        last = self._last_sample or cur
        self._last_sample = cur
        return {
            **self.query(),
            "quota-granted": [c[0] - p[0] for c, p in zip(cur, last, strict=True)],
            "quota-used": [c[1] - p[1] for c, p in zip(cur, last, strict=True)],
            "quota-exits": [c[2] - p[2] for c, p in zip(cur, last, strict=True)],
        }
