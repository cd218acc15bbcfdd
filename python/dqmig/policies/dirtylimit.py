"""QEMU's dirty-limit (8.1): each vCPU's dirty rate, measured from its dirty ring, is held to
a limit by sleeping the vCPU at each of its DIRTY_RING_FULL exits. vCPUs that do not write
never fill a ring and are never slowed."""

from __future__ import annotations

from typing import Any

from dqmig.engine import Host, MigrationView, Timer, Writer
from dqmig.policies.autoconverge import Trigger
from dqmig.policies.base import Policy
from dqmig.units import MiB

TOLERANCE_MBPS = 25  # DIRTYLIMIT_TOLERANCE_RANGE
LINEAR_ADJUSTMENT_PCT = 50  # DIRTYLIMIT_LINEAR_ADJUSTMENT_PCT
THROTTLE_PCT_MAX = 99  # DIRTYLIMIT_THROTTLE_PCT_MAX: sleep at most 99 x the ring-full time
OUTSIDE_MIGRATION_PERIOD_MS = 1000  # DIRTYLIMIT_CALC_TIME_MS


def ring_full_time_us(ring_entries: int, page_size: int, max_rate_mbps: int) -> int:
    """How long a vCPU dirtying at the highest rate seen takes to fill its ring, in integer
    µs as dirtylimit_dirty_ring_full_time computes it: the ring's size in whole MiB
    (qemu_target_pages_to_MiB) x 1e6 / the rate. 0 before any rate was seen."""
    if max_rate_mbps <= 0:
        return 0
    return ring_entries * page_size // MiB * 1_000_000 // max_rate_mbps


def within_tolerance(quota: int, current: int) -> bool:
    """dirtylimit_done: the rate is within 25 MB/s of the limit, so the sleep stays."""
    return abs(quota - current) <= TOLERANCE_MBPS


def adjust_sleep(quota: int, current: int, sleep_us: int, ring_full_us: int) -> int:
    """QEMU's dirtylimit_set_throttle: the next sleep per ring-full (integer µs) of a vCPU
    with limit `quota` and measured rate `current` (MB/s), outside the tolerance. Off when
    the vCPU dirtied nothing. A gap of more than 50 % of the larger rate (integer division,
    dirtylimit_need_linear_adjustment) moves the sleep by ring_full x pct / (100 - pct),
    truncated; a smaller one by ring_full / 10. Clamped to [0, 99 x ring_full]."""
    if current == 0:
        return 0
    if abs(quota - current) * 100 // max(quota, current) > LINEAR_ADJUSTMENT_PCT:
        if current > quota:
            pct = (current - quota) * 100 // current
            sleep_us += int(ring_full_us * pct / (100 - pct))
        else:
            pct = (quota - current) * 100 // quota
            sleep_us -= int(ring_full_us * pct / (100 - pct))
    elif current > quota:
        sleep_us += ring_full_us // 10
    else:
        sleep_us -= ring_full_us // 10
    return max(min(sleep_us, THROTTLE_PCT_MAX * ring_full_us), 0)


class DirtyLimiter:
    """Per-vCPU limits and the controller thread (system/dirtylimit.c). Usable with or
    without a migration (QMP's set-vcpu-dirty-limit works on a running VM); one per VM, as
    QEMU's state is one per process, so the high-water dirty rate outlives a migration."""

    def __init__(self, vm: Host, period_ms: int = OUTSIDE_MIGRATION_PERIOD_MS) -> None:
        if not vm.guest.dirty_ring:
            raise ValueError("dirty-limit requires the dirty ring (a guest with dirty-ring-size set)")
        n = len(vm.vcpus)
        self.vm = vm
        self.period_ms = period_ms
        self.limit: list[int | None] = [None] * n  # MB/s
        self.sleep_us = [0] * n  # throttle_us_per_full
        self.current = [0] * n  # MB/s, last period
        self.max_rate = 0  # MB/s: QEMU's one high-water rate (a static), never decreases
        self.migration_quota: int | None = None  # the vcpu-dirty-limit a migration last applied
        self.interruptible = False  # a stop ends a sleep (x-dirty-limit-interruptible); QEMU: no
        self._timer: Timer | None = None
        self._last: tuple[list[int], float] | None = None  # counts and time of the last round

    def set(self, rate_mbps: int, cpu: int | None = None) -> None:
        for i in self._cpus(cpu):
            self.limit[i] = rate_mbps
        self._ensure_running()

    def cancel(self, cpu: int | None = None) -> None:
        for i in self._cpus(cpu):
            self.limit[i] = None
            self.sleep_us[i] = 0

    def _cpus(self, cpu: int | None) -> range:
        if cpu is None:
            return range(len(self.limit))
        if not 0 <= cpu < len(self.limit):
            raise ValueError(f"cpu-index {cpu} out of range (0..{len(self.limit) - 1})")
        return range(cpu, cpu + 1)

    @property
    def limiting(self) -> bool:
        """dirtylimit_in_service: some vCPU has a limit."""
        return any(lim is not None for lim in self.limit)

    def query(self) -> list[dict[str, Any]]:
        """query-vcpu-dirty-limit."""
        return [
            {"cpu-index": i, "limit-rate": lim, "current-rate": self.current[i]}
            for i, lim in enumerate(self.limit)
            if lim is not None
        ]

    def ring_full_time(self, rate_mbps: int) -> int:
        """dirtylimit_dirty_ring_full_time: raises the high-water rate to `rate_mbps` if it is
        higher, then the ring-full time (µs) at the high-water rate."""
        self.max_rate = max(self.max_rate, rate_mbps)
        return ring_full_time_us(self.vm.guest.dirty_ring, self.vm.guest.page_size, self.max_rate)

    def throttle_time_per_round(self) -> int:
        """dirtylimit_throttle_time_per_round: the longest sleep per ring-full of any vCPU."""
        return max(self.sleep_us, default=0)

    def average_ring_full_time(self, running: list[int]) -> int:
        """dirtylimit_ring_full_time (query-migrate's dirty-limit-ring-full-time): the
        ring-full time at the mean current rate of the running vCPUs, 0 when they dirty
        nothing. As in QEMU it goes through dirtylimit_dirty_ring_full_time, so the mean also
        raises the high-water rate."""
        total = sum(self.current[i] for i in running)
        if not total:
            return 0
        return self.ring_full_time(total // len(running))

    def _ensure_running(self) -> None:
        """The controller (QEMU's dirtylimit thread): a round every period on the host's
        timer (a thread on the emulator, events in virtual time on the simulator); started
        again if it has ended (a round that raised ends it)."""
        if self._timer is None or not self._timer.alive:
            self._last = ([v.dirty_count for v in self.vm.vcpus], self.vm.clock())
            self._timer = self.vm.start_timer(lambda: self.period_ms / 1000, self._round, "dirtylimit")

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.cancel()

    def _round(self, t: float) -> None:
        counts = [v.dirty_count for v in self.vm.vcpus]
        assert self._last is not None
        last, t_last = self._last
        self.measure(counts, last, t - t_last)
        self._last = (counts, t)

    def measure(self, counts: list[int], last: list[int], seconds: float) -> None:
        """One controller round from per-vCPU dirty counts (pages pushed to each ring):
        vcpu_dirty_rate_stat_collect, then dirtylimit_process over the limited vCPUs in
        order. Only a limited vCPU outside the tolerance that dirtied something feeds the
        high-water rate (dirtylimit_adjust_throttle -> dirtylimit_set_throttle)."""
        page = self.vm.guest.page_size
        for i, (c, p) in enumerate(zip(counts, last, strict=True)):
            self.current[i] = int((c - p) * page / MiB / seconds) if seconds > 0 else 0
        for i, lim in enumerate(self.limit):
            rate = self.current[i]
            if lim is None or within_tolerance(lim, rate):
                continue
            if rate == 0:
                self.sleep_us[i] = 0
                continue
            self.sleep_us[i] = adjust_sleep(lim, rate, self.sleep_us[i], self.ring_full_time(rate))

    def on_ring_full(self, vm: Host, vcpu: Writer) -> None:
        """dirtylimit_vcpu_execute, after the exit handler reaped this vCPU's ring: sleep its
        time. QEMU sleeps with g_usleep, which a stop does not end: so does this, unless
        `interruptible`."""
        i = vcpu.index
        if i is not None and self.limit[i] is not None and self.sleep_us[i] > 0:
            vm.throttle_sleep(vcpu, self.sleep_us[i] / 1e6, interruptible=self.interruptible)


class DirtyLimit(Policy):
    """dirty-limit as a migration capability: the auto-converge trigger decides when, then
    every vCPU is limited to vcpu-dirty-limit at once (migration_dirty_limit_guest, at every
    firing: a vcpu-dirty-limit changed meanwhile is applied then)."""

    name = "dirty-limit"

    def __init__(self, vm: Host, params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(vm, params)
        if vm.dirty_limiter is None:
            vm.dirty_limiter = DirtyLimiter(vm)
        self.limiter: DirtyLimiter = vm.dirty_limiter  # the VM's, shared with QMP's commands
        self.trigger = Trigger(params.throttle_trigger_threshold)
        self.triggered = False

    def start(self, migration: MigrationView) -> None:
        super().start(migration)
        self.trigger.start(migration, self.clock())
        self.limiter.period_ms = self.params.x_vcpu_dirty_limit_period
        self.limiter.interruptible = self.params.x_dirty_limit_interruptible

    def on_tick(self, m: MigrationView) -> None:
        # vcpu_dirty_rate_stat_collect reads x-vcpu-dirty-limit-period at every round.
        self.limiter.period_ms = self.params.x_vcpu_dirty_limit_period

    def on_sync(self, m: MigrationView) -> None:
        if self.trigger.check(m, self.clock()):
            self.limit_guest()

    def limit_guest(self) -> None:
        """migration_dirty_limit_guest: limits every vCPU to vcpu-dirty-limit, unless a limit
        is in service already at the value this did last."""
        lim, quota = self.limiter, self.params.vcpu_dirty_limit
        if lim.limiting and lim.migration_quota == quota:
            return
        lim.migration_quota = quota
        lim.set(quota)
        self.triggered = True

    def stop(self) -> None:
        super().stop()
        if self.triggered:
            self.limiter.stop()
        self.limiter.period_ms = OUTSIDE_MIGRATION_PERIOD_MS
        self.limiter.interruptible = False

    def query(self) -> dict[str, Any]:
        """populate_ram_info: the dirty-limit fields, while a limit is in service."""
        lim = self.limiter
        if not lim.limiting:
            return {}
        return {
            "dirty-limit-throttle-time-per-round": lim.throttle_time_per_round(),
            "dirty-limit-ring-full-time": lim.average_ring_full_time(self._running_vcpus()),
        }

    def _running_vcpus(self) -> list[int]:
        """The vCPUs QEMU counts as running (cpu->running): none while the VM is stopped, and
        never one that halts (an idle program) or has finished its program."""
        if not self.vm.running:
            return []
        classes = self.vm.vcpu_classes()
        return [i for i in range(len(self.vm.vcpus)) if classes[i] != "idle" and not self.vm.done[i]]

    def sample(self) -> dict[str, Any]:
        lim = self.limiter
        return {
            **self.query(),
            "vcpu-dirty-rate": list(lim.current),
            "vcpu-sleep-per-ring-full-us": list(lim.sleep_us),
        }
