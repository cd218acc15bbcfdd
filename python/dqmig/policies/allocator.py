"""The dirty-quota allocator: pure logic, no threads, an injected clock.

Time is cut into fixed quota intervals (10 ms by default), counted from the allocator's
start. Every writer (vCPU, and the DMA writer when it is throttled) is entitled to a share
`q = L x interval` pages per interval, where the per-writer rate limit L (pages/s) is the
measured network throughput / ratio / writers. A writer runs until it has dirtied its quota
(the KVM exit DIRTY_QUOTA_EXHAUSTED), then asks here:

1. Overshoot (count > quota, PML-batched accounting): a penalty sleep of overshoot / L.
2. Still in the interval of its last grant: claim up to q from the common pool and go on;
   with the pool empty, sleep to the end of the interval (at most 0.99 of an interval) and
   take a fresh grant there.
3. In a later interval: what it was entitled to over the elapsed intervals and did not get
   goes to the pool; it gets a fresh grant of q.

Conservation: quota only enters through entitlements (q per writer per interval) and only
leaves through grants; a writer's unused entitlement reaches the pool when it next asks.
So over any run, pages granted <= writers x q x (intervals elapsed + 1), i.e. L x elapsed
per writer plus one interval's share: the overshoot bound (plus PML overshoot, penalised).
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
    interval: int = -1  # index of the interval of the last fresh grant (-1: none yet)
    granted: int = 0  # pages granted since that fresh grant (fresh + pool claims)
    total_granted: int = 0
    total_sleep: float = 0.0
    exits: int = 0


@dataclass
class QuotaAllocator:
    writers: int
    interval: float = 0.010  # s
    ratio: float = 2.0
    initial_throughput: float = 125_000_000  # bytes/s (1 Gbit/s), as the RFC assumes
    page_size: int = 4096
    window: float = 0.5  # s of throughput measurements averaged
    clock: Callable[[], float] = field(default=lambda: 0.0)
    pool: int = 0
    state: list[WriterState] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.writers < 1 or not self.interval > 0 or not self.ratio > 0 or self.page_size < 1:
            raise ValueError("allocator needs writers >= 1 and positive interval, ratio and page size")
        self.t0 = self.clock()
        self.state = [WriterState() for _ in range(self.writers)]
        self._samples: deque[tuple[float, float]] = deque()
        self.throughput = float(self.initial_throughput)
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
        mean over the last `window` seconds."""
        now = self.clock()
        if bytes_per_s <= 0 or not math.isfinite(bytes_per_s):
            return
        self._samples.append((now, bytes_per_s))
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()
        self.throughput = sum(b for _, b in self._samples) / len(self._samples)

    def retune(self, *, interval: float, ratio: float, window: float) -> None:
        """Parameters changed mid-migration (migrate-set-parameters). A new interval length
        starts a fresh interval for every writer from now; the pool is kept."""
        if not (interval > 0 and ratio > 0 and window > 0):
            raise ValueError("interval, ratio and window must be positive")
        self.ratio, self.window = ratio, window
        if interval != self.interval:
            self.interval, self.t0 = interval, self.clock()
            for s in self.state:
                s.interval, s.granted = -1, 0

    # -- exits ---------------------------------------------------------------------------

    def interval_at(self, t: float) -> int:
        return math.floor((t - self.t0) / self.interval)

    def on_exit(self, writer: int, count: int, quota: int) -> Decision:
        """A DIRTY_QUOTA_EXHAUSTED exit (count >= quota) of `writer` now."""
        now = self.clock()
        s = self.state[writer]
        s.exits += 1
        q = self.share
        penalty = max(0, count - quota) / self.limit if quota else 0.0
        k = self.interval_at(now + penalty)  # where the writer will be after the penalty
        if k > s.interval:
            grant, wait, from_pool = self._fresh(s, k, q), 0.0, 0
        elif self.pool > 0:
            from_pool = min(self.pool, q)
            self._take(from_pool)
            s.granted += from_pool
            grant, wait = from_pool, 0.0
        else:
            end = self.t0 + (k + 1) * self.interval
            wait = min(end - (now + penalty), MAX_SLEEP_SHARE * self.interval)
            grant, from_pool = self._fresh(s, k + 1, q), 0
        s.total_granted += grant
        s.total_sleep += penalty + wait
        return Decision(grant=grant, sleep=penalty + wait, penalty=penalty, from_pool=from_pool)

    def _fresh(self, s: WriterState, k: int, q: int) -> int:
        """Interval k begins for this writer: unused entitlement to the pool, grant q."""
        if s.interval >= 0:
            unused = (k - s.interval) * q - s.granted
            if unused > 0:
                self.pool += unused
                self.pool_in += unused
        s.interval, s.granted = k, q
        return q

    def _take(self, pages: int) -> None:
        self.pool -= pages
        self.pool_out += pages
