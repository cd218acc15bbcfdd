"""QEMU's auto-converge: one throttle percentage for every vCPU, raised at dirty syncs while
the guest dirties more than a share of what the network carries."""

from __future__ import annotations

from typing import Any

from dqmig.engine import Exit, Host, MigrationView, Writer
from dqmig.policies.base import Policy

TIMESLICE_S = 0.010  # CPU_THROTTLE_TIMESLICE: each vCPU runs this long between sleeps
PERIOD_S = 1.0  # the trigger is checked at a dirty sync at most once per period
PERIODIC_SYNC_S = 5.0  # CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_MS (QEMU 9.2+)


class Trigger:
    """QEMU's migration_trigger_throttle, shared by auto-converge and dirty-limit.

    The period begins at the setup sync (`start`; migration_bitmap_sync sets
    time_last_bitmap_sync at the first sync), so the first check can come at sync 2, the end
    of the bulk pass. At a dirty sync more than 1 s after the period began, the bytes newly
    dirtied in the period are compared with `throttle-trigger-threshold` % of the bytes sent
    in it (integer bytes, as QEMU's uint64 arithmetic); above it and at the second such hit,
    it fires, and a new period begins. Quirk kept from QEMU: the hit count is never reset
    when the condition is false, so two hits need not be consecutive.
    """

    def __init__(self, threshold_pct: int) -> None:
        self.threshold_pct = threshold_pct
        self.high_count = 0
        self.period_start: float | None = None
        self.dirty_at_start = 0
        self.xfer_at_start = 0
        self.bytes_dirty_period = 0
        self.bytes_dirty_threshold = 0

    def start(self, m: MigrationView, t: float) -> None:
        """Begins the first period: call at the setup sync (Policy.start)."""
        self._reset(m, t)

    def check(self, m: MigrationView, t: float) -> bool:
        if self.period_start is None:
            raise RuntimeError("Trigger.check before Trigger.start (the setup sync)")
        if t - self.period_start <= PERIOD_S:  # QEMU: end_time > time_last_bitmap_sync + 1000
            return False
        self.bytes_dirty_period = (m.new_dirty_pages - self.dirty_at_start) * m.page_size
        bytes_xfer_period = m.transferred - self.xfer_at_start
        self.bytes_dirty_threshold = bytes_xfer_period * self.threshold_pct // 100
        self._reset(m, t)
        if self.bytes_dirty_period > self.bytes_dirty_threshold:
            self.high_count += 1
            if self.high_count >= 2:
                self.high_count = 0
                return True
        return False

    def _reset(self, m: MigrationView, t: float) -> None:
        self.period_start, self.dirty_at_start, self.xfer_at_start = t, m.new_dirty_pages, m.transferred


class PeriodicSync:
    """QEMU 9.2+'s dirty-sync timer under auto-converge (cpu_throttle_dirty_sync_timer_tick):
    armed when the migration starts, it ticks every 5 s. A tick does nothing while
    dirty-sync-count <= 1 (the bulk pass sends everything anyway); after that it syncs only
    when no sync happened since the previous tick. The migration thread asks `due` between
    send steps; a tick it notices late counts from when it was noticed, as QEMU re-arms the
    timer 5 s after each tick ran."""

    def __init__(self, armed_at: float, interval: float = PERIODIC_SYNC_S) -> None:
        self.interval = interval
        self.next_tick = armed_at + interval
        self.count_prev = 0  # dirty-sync-count at the previous tick (throttle_dirty_sync_count_prev)

    def due(self, t: float, sync_count: int) -> bool:
        """True when a tick at or before `t` calls for a dirty sync; the caller then syncs."""
        if t < self.next_tick:
            return False
        self.next_tick = t + self.interval
        sync = sync_count > 1 and sync_count == self.count_prev
        self.count_prev = sync_count + 1 if sync else sync_count  # the count after this tick
        return sync


def next_percentage(
    pct: int,
    *,
    initial: int,
    increment: int,
    maximum: int,
    tailslow: bool,
    bytes_dirty_period: int,
    bytes_dirty_threshold: int,
) -> int:
    """mig_throttle_guest_down then cpu_throttle_set: the new throttle percentage after a
    trigger. The first trigger sets `cpu-throttle-initial`, which max-cpu-throttle does not
    cap (so a later step, capped, can lower the throttle); later ones add the increment, or
    with tailslow at most the step to the ideal CPU share, whose integer truncation makes the
    step round up (never 0). cpu_throttle_set clamps the result to [1, 99]."""
    if pct == 0:  # !cpu_throttle_active()
        new = initial
    else:
        inc = increment
        if tailslow and bytes_dirty_period > 0:
            cpu_now = 100 - pct
            cpu_ideal = int(cpu_now * (bytes_dirty_threshold / bytes_dirty_period))  # uint64_t
            inc = min(cpu_now - cpu_ideal, increment)
        new = min(pct + inc, maximum)
    return max(1, min(new, 99))


class AutoConverge(Policy):
    name = "auto-converge"

    def __init__(self, vm, params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(vm, params)
        self.percentage = 0
        self.trigger = Trigger(params.throttle_trigger_threshold)
        self.periodic: PeriodicSync | None = None
        self._next_sleep = [0.0] * len(vm.all_writers)
        self.history: list[tuple[float, int]] = []

    def start(self, migration: MigrationView) -> None:
        super().start(migration)
        self.trigger.start(migration, self.clock())
        if self.params.x_cpu_throttle_periodic_sync:
            # QEMU arms the timer in migration_thread, before the setup; a policy switched to
            # mid-migration (dirty quota's fallback) arms it now.
            setup = migration.dirty_sync_count <= 1
            self.periodic = PeriodicSync(migration.t_start if setup else self.clock())

    def periodic_sync_due(self, m: MigrationView, t: float) -> bool:
        return self.periodic is not None and self.periodic.due(t, m.dirty_sync_count)

    def on_sync(self, m: MigrationView) -> None:
        if self.trigger.check(m, self.clock()):
            p = self.params
            self.percentage = next_percentage(
                self.percentage,
                initial=p.cpu_throttle_initial,
                increment=p.cpu_throttle_increment,
                maximum=p.max_cpu_throttle,
                tailslow=p.cpu_throttle_tailslow,
                bytes_dirty_period=self.trigger.bytes_dirty_period,
                bytes_dirty_threshold=self.trigger.bytes_dirty_threshold,
            )
            self.history.append((self.clock(), self.percentage))

    @property
    def wants_timeslices(self) -> bool:  # type: ignore[override]
        return self.percentage > 0  # the actuator runs at timeslice exits once throttling

    def handle_exit(self, vm: Host, vcpu: Writer, exit: Exit) -> None:
        super().handle_exit(vm, vcpu, exit)
        pct = self.percentage
        if not pct or vcpu.is_device:
            return  # QEMU throttles vCPUs only
        slot = self.slot(vcpu)
        t = vm.clock()  # the actuator's time is the host's, as its sleeps are
        if t >= self._next_sleep[slot]:
            # Ran a timeslice: sleep p/(1-p) of it, so the vCPU sleeps a share p of the time.
            slept = vm.throttle_sleep(vcpu, pct / (100 - pct) * TIMESLICE_S)
            self._next_sleep[slot] = t + slept + TIMESLICE_S

    def stop(self) -> None:
        super().stop()
        self.percentage = 0

    def query(self) -> dict[str, Any]:
        return {"cpu-throttle-percentage": self.percentage}

    def sample(self) -> dict[str, Any]:
        return {"cpu-throttle-percentage": self.percentage}
