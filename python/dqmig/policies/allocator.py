"""The dirty-quota allocator: pure logic, no threads, an injected clock.

Time is cut into fixed quota intervals (10 ms by default), counted from the allocator's
start. Every writer (vCPU, and the DMA writer when it is throttled) is entitled to a share
`q = L x interval` pages per interval, where the per-writer rate limit L (pages/s) is the
measured network throughput / ratio / writers. As in the RFC, the ratio is 1 in steady state
and only the initial estimate (1 Gbit/s, before any throughput is measured) is halved;
x-dirty-quota-ratio > 1 is dqmig's extension, leaving the network headroom. A writer runs until it has dirtied its quota
(the KVM exit DIRTY_QUOTA_EXHAUSTED), then asks here:

1. Overshoot (count > quota, PML-batched accounting): a penalty sleep of overshoot / L, and
   the overshoot is charged to the writer's own share (so it is not paid for twice by the
   pool, and the penalty lowers the VM's dirty rate).
2. Its share of the current interval not yet granted: it gets q.
3. Otherwise: claim up to q from the common pool and go on; with the pool empty, sleep to the
   start of its next interval and get that interval's share. A sleep is capped at 0.99 of an
   interval; a writer the cap wakes before its next interval gets nothing and asks again, so
   an interval's share is never granted twice nor used before the interval begins.

The ledger. Each writer accrues entitlement for every interval that has ended since its
first exit, at the q in force when it is settled (at its exits, and for every writer before
q changes, so a throughput update never revalues past intervals). Entitlement not spent on
its own grants or overshoot goes to the pool; pool claims are kept apart. So quota only
enters as entitlement and leaves as grants: granted + pool <= entitlement, and over a run a
writer dirties at most L x elapsed + q from its own share, plus what it claims from others'
unused share, plus its (penalised) overshoot.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SLEEP_SHARE = 0.99  # no sleep but the overshoot penalty exceeds this share of an interval


@dataclass
class Decision:
    grant: int  # pages: re-arm with quota = count + grant
    sleep: float  # seconds to sleep before running again (penalty + wait for the interval)
    penalty: float = 0.0  # the overshoot part of `sleep`
    from_pool: int = 0  # the part of `grant` claimed from the pool


@dataclass
class WriterState:
    interval: int = -1  # the latest interval whose share was granted (-1: none yet)
    accrued_until: int | None = None  # entitlement is settled for intervals < this
    entitled: int = 0  # pages of share accrued over ended intervals
    own: int = 0  # pages of its own share granted, plus overshoot charged
    pooled: int = 0  # pages of its entitlement given to the pool
    claimed: int = 0  # pages claimed from the pool
    total_granted: int = 0  # own grants + claims
    total_sleep: float = 0.0
    exits: int = 0

    @property
    def credit(self) -> int:
        """Entitlement of ended intervals neither granted nor pooled (negative: ahead)."""
        return self.entitled - self.own - self.pooled


@dataclass
class QuotaAllocator:
    writers: int
    interval: float = 0.010  # s
    ratio: float = 1.0  # steady state: L = throughput / ratio / writers (the RFC: 1)
    initial_throughput: float = 125_000_000  # bytes/s (1 Gbit/s), as the RFC assumes
    initial_ratio: float = 2.0  # the RFC halves its initial estimate, and only that
    page_size: int = 4096
    window: float = 0.5  # s of throughput measurements averaged
    clock: Callable[[], float] = field(default=lambda: 0.0)
    pool: int = 0
    state: list[WriterState] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.writers < 1 or not self.interval > 0 or not self.ratio > 0 or not self.initial_ratio > 0:
            raise ValueError("allocator needs writers >= 1 and positive interval, ratio and page size")
        if self.page_size < 1:
            raise ValueError("allocator needs writers >= 1 and positive interval, ratio and page size")
        self.t0 = self.clock()
        self.state = [WriterState() for _ in range(self.writers)]
        self._samples: deque[tuple[float, float]] = deque()
        self.throughput = self.initial_throughput / self.initial_ratio  # an estimate until measured
        self.pool_in = 0  # totals, for conservation checks and telemetry
        self.pool_out = 0

    # -- the rate limit ------------------------------------------------------------------

    @property
    def limit(self) -> float:
        """L: pages/s each writer may dirty."""
        return self.throughput / self.ratio / self.page_size / self.writers

    @property
    def share(self) -> int:
        """q: pages per writer per interval (at least 1, so a writer always progresses)."""
        return max(1, math.floor(self.limit * self.interval))

    def update_throughput(self, bytes_per_s: float) -> None:
        """A network throughput measurement (the migration's, every >= 100 ms). L follows the
        mean over the last `window` seconds; past intervals are settled at the old q first."""
        now = self.clock()
        if bytes_per_s <= 0 or not math.isfinite(bytes_per_s):
            return
        self._settle_all(now)
        self._samples.append((now, bytes_per_s))
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()
        self.throughput = sum(b for _, b in self._samples) / len(self._samples)

    def retune(self, *, interval: float, ratio: float, window: float) -> None:
        """Parameters changed mid-migration (migrate-set-parameters). A new interval length
        starts fresh interval numbering from now; every writer keeps its credit, and the pool
        is kept."""
        if not (interval > 0 and ratio > 0 and window > 0):
            raise ValueError("interval, ratio and window must be positive")
        now = self.clock()
        self._settle_all(now)
        self.ratio, self.window = ratio, window
        if interval != self.interval:
            self.interval, self.t0 = interval, now
            for s in self.state:
                s.interval = -1
                if s.accrued_until is not None:
                    s.accrued_until = 0

    # -- the ledger ------------------------------------------------------------------------

    def interval_at(self, t: float) -> int:
        return math.floor((t - self.t0) / self.interval)

    def _settle(self, s: WriterState, k: int) -> None:
        """Accrues the writer's share of intervals ended before k and pools unused credit."""
        if s.accrued_until is None:
            s.accrued_until = k  # entitlement starts at the writer's first exit
            return
        if k > s.accrued_until:
            s.entitled += (k - s.accrued_until) * self.share
            s.accrued_until = k
        credit = s.credit
        if credit > 0:
            s.pooled += credit
            self.pool += credit
            self.pool_in += credit

    def _settle_all(self, now: float) -> None:
        k = self.interval_at(now)
        for s in self.state:
            if s.accrued_until is not None:
                self._settle(s, k)

    # -- exits ---------------------------------------------------------------------------

    def on_exit(self, writer: int, count: int, quota: int) -> Decision:
        """A DIRTY_QUOTA_EXHAUSTED exit (count >= quota) of `writer` now."""
        now = self.clock()
        s = self.state[writer]
        s.exits += 1
        q = self.share
        overshoot = max(0, count - quota) if quota else 0
        penalty = overshoot / self.limit
        s.own += overshoot  # dirtied without a grant: paid from its own share
        self._settle(s, self.interval_at(now))
        k = self.interval_at(now + penalty)  # where the writer will be after the penalty
        grant, wait, from_pool = 0, 0.0, 0
        if k > s.interval:
            grant = self._grant_own(s, k, q)
        elif self.pool > 0:
            from_pool = grant = min(self.pool, q)
            self.pool -= grant
            self.pool_out += grant
            s.claimed += grant
        else:
            target = s.interval + 1
            start = self.t0 + target * self.interval
            needed = start - (now + penalty)
            wait = max(0.0, min(needed, MAX_SLEEP_SHARE * self.interval))
            if needed <= wait:  # it wakes in its next interval; else it asks again then
                grant = self._grant_own(s, target, q)
        s.total_granted += grant
        s.total_sleep += penalty + wait
        return Decision(grant=grant, sleep=penalty + wait, penalty=penalty, from_pool=from_pool)

    def _grant_own(self, s: WriterState, k: int, q: int) -> int:
        s.interval = k
        s.own += q
        return q
