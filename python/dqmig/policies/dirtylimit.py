"""QEMU's dirty-limit (8.1): each vCPU's dirty rate, measured from its dirty ring, is held to
a limit by sleeping the vCPU at each of its DIRTY_RING_FULL exits. vCPUs that do not write
never fill a ring and are never slowed."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from dqmig import _native
from dqmig.policies.autoconverge import Trigger
from dqmig.policies.base import Policy, now
from dqmig.units import MiB

if TYPE_CHECKING:
    from dqmig.migration.source import Migration
    from dqmig.vm import VM

TOLERANCE_MBPS = 25
OUTSIDE_MIGRATION_PERIOD_MS = 1000


def ring_full_time_us(ring_entries: int, page_size: int, max_rate_mbps: int) -> float:
    """How long a vCPU dirtying at its highest rate seen takes to fill its ring."""
    if max_rate_mbps <= 0:
        return 0.0
    return ring_entries * page_size / MiB * 1e6 / max_rate_mbps


def adjust_sleep(quota: int, current: int, sleep_us: float, ring_full_us: float) -> float:
    """QEMU's dirtylimit_set_throttle: the next sleep per ring-full (µs) for one vCPU with
    limit `quota` and measured rate `current` (MB/s). As in QEMU the tolerance comes first:
    a vCPU within 25 MB/s of its limit keeps its sleep, even one that stopped writing (it no
    longer fills its ring, so it no longer sleeps)."""
    if abs(quota - current) <= TOLERANCE_MBPS:
        return sleep_us
    if current == 0:
        return 0.0
    if abs(quota - current) * 100 / max(quota, current) > 50:
        if current > quota:
            pct = (current - quota) * 100 // current
            sleep_us += ring_full_us * pct / (100 - pct)
        else:
            pct = (quota - current) * 100 // quota
            sleep_us -= ring_full_us * pct / (100 - pct)
    elif current > quota:
        sleep_us += ring_full_us / 10
    else:
        sleep_us -= ring_full_us / 10
    return min(max(sleep_us, 0.0), 99 * ring_full_us)


class DirtyLimiter:
    """Per-vCPU limits and the controller thread. Usable with or without a migration (QMP's
    set-vcpu-dirty-limit works on a running VM)."""

    def __init__(self, vm: VM, period_ms: int = OUTSIDE_MIGRATION_PERIOD_MS) -> None:
        if not vm.guest.dirty_ring:
            raise ValueError("dirty-limit requires the dirty ring (a guest with dirty-ring-size set)")
        n = len(vm.vcpus)
        self.vm = vm
        self.period_ms = period_ms
        self.limit: list[int | None] = [None] * n  # MB/s
        self.sleep_us = [0.0] * n
        self.current = [0] * n  # MB/s, last period
        self.max_rate = [0] * n  # MB/s, high water (never decreases)
        self.interruptible = False  # a stop ends a sleep (x-dirty-limit-interruptible); QEMU: no
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, rate_mbps: int, cpu: int | None = None) -> None:
        for i in self._cpus(cpu):
            self.limit[i] = rate_mbps
        self._ensure_running()

    def cancel(self, cpu: int | None = None) -> None:
        for i in self._cpus(cpu):
            self.limit[i] = None
            self.sleep_us[i] = 0.0

    def _cpus(self, cpu: int | None) -> range:
        if cpu is None:
            return range(len(self.limit))
        if not 0 <= cpu < len(self.limit):
            raise ValueError(f"cpu-index {cpu} out of range (0..{len(self.limit) - 1})")
        return range(cpu, cpu + 1)

    @property
    def limiting(self) -> bool:
        return any(lim is not None for lim in self.limit)

    def query(self) -> list[dict[str, Any]]:
        """query-vcpu-dirty-limit."""
        return [
            {"cpu-index": i, "limit-rate": lim, "current-rate": self.current[i]}
            for i, lim in enumerate(self.limit)
            if lim is not None
        ]

    def ring_full_us(self, i: int) -> float:
        return ring_full_time_us(self.vm.guest.dirty_ring, self.vm.guest.page_size, self.max_rate[i])

    def _ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="dirtylimit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
        self.cancel()

    def _loop(self) -> None:
        last = [v.dirty_count for v in self.vm.vcpus]
        t_last = now()
        while not self._stop.wait(self.period_ms / 1000):
            t = now()
            counts = [v.dirty_count for v in self.vm.vcpus]
            self.measure(counts, last, t - t_last)
            last, t_last = counts, t

    def measure(self, counts: list[int], last: list[int], seconds: float) -> None:
        """One controller step from per-vCPU dirty counts (pages pushed to each ring)."""
        page = self.vm.guest.page_size
        for i, (c, p) in enumerate(zip(counts, last, strict=True)):
            rate = int((c - p) * page / MiB / seconds) if seconds > 0 else 0
            self.current[i] = rate
            self.max_rate[i] = max(self.max_rate[i], rate)
            lim = self.limit[i]
            if lim is not None:
                self.sleep_us[i] = adjust_sleep(lim, rate, self.sleep_us[i], self.ring_full_us(i))

    def on_ring_full(self, vm: VM, vcpu: _native.Vcpu) -> None:
        """dirtylimit_vcpu_execute, after the exit handler reaped this vCPU's ring: sleep its
        time. QEMU sleeps with g_usleep, which a stop does not end: so does this, unless
        `interruptible`."""
        i = vcpu.index
        if i is not None and self.limit[i] is not None and self.sleep_us[i] > 0:
            vm.throttle_sleep(vcpu, self.sleep_us[i] / 1e6, interruptible=self.interruptible)


class DirtyLimit(Policy):
    """dirty-limit as a migration capability: the auto-converge trigger decides when, then
    every vCPU is limited to vcpu-dirty-limit at once."""

    name = "dirty-limit"

    def __init__(self, vm: VM, params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(vm, params)
        if vm.dirty_limiter is None:
            vm.dirty_limiter = DirtyLimiter(vm)
        self.limiter: DirtyLimiter = vm.dirty_limiter  # the VM's, shared with QMP's commands
        self.trigger = Trigger(params.throttle_trigger_threshold)
        self.triggered = False

    def start(self, migration: Migration) -> None:
        super().start(migration)
        self.limiter.period_ms = self.params.x_vcpu_dirty_limit_period
        self.limiter.interruptible = self.params.x_dirty_limit_interruptible

    def on_sync(self, m: Migration) -> None:
        if not self.triggered and self.trigger.check(m, now()):
            self.triggered = True
            self.limiter.set(self.params.vcpu_dirty_limit)

    def stop(self) -> None:
        super().stop()
        if self.triggered:
            self.limiter.stop()
        self.limiter.period_ms = OUTSIDE_MIGRATION_PERIOD_MS
        self.limiter.interruptible = False

    def query(self) -> dict[str, Any]:
        lim = self.limiter
        limited = [i for i, x in enumerate(lim.limit) if x is not None]
        return {
            "dirty-limit-throttle-time-per-round": int(max((lim.sleep_us[i] for i in limited), default=0)),
            "dirty-limit-ring-full-time": int(max((lim.ring_full_us(i) for i in limited), default=0)),
        }

    def sample(self) -> dict[str, Any]:
        lim = self.limiter
        return {
            **self.query(),
            "vcpu-dirty-rate": list(lim.current),
            "vcpu-sleep-per-ring-full-us": [int(s) for s in lim.sleep_us],
        }
