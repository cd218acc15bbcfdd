"""The policies behave as QEMU's code does (issue 9): each test names the QEMU function it
follows. Pure logic where possible (an injected clock, a fake migration); where vCPUs must
run, the test thread runs them itself, so the interleaving is fixed by construction."""

from __future__ import annotations

import threading
import time

import pytest

from dqmig import policies
from dqmig.migration.params import MigrationParameters
from dqmig.migration.source import Migration
from dqmig.monitor import Monitor, QmpError
from dqmig.policies import Policy
from dqmig.policies.autoconverge import AutoConverge, PeriodicSync
from dqmig.policies.dirtylimit import DirtyLimit, DirtyLimiter
from dqmig.programs import ProgramSpec
from dqmig.units import MiB
from dqmig.vm import VM, ContinueHandler, VmConfig

# -- item 1: the reap at a ring-full exit -----------------------------------------------------

RING = 1024
REGION_PAGES = 4096  # per writer: more than it dirties, so a sequential writer never wraps
PAGES_PER_TURN = 50  # pages each writer dirties per turn (a dirty-quota exit ends the turn)
TURNS = 70  # 3500 pages per writer: several ring-fulls at any soft limit below the ring size


def _writers_vm(writers: int) -> VM:
    programs = [
        ProgramSpec("sequential", region_start=i * REGION_PAGES, region_pages=REGION_PAGES) for i in range(writers)
    ]
    # PML off: the turns below are sized to a soft limit of RING - 64.
    config = VmConfig(
        vcpus=writers, memory=writers * REGION_PAGES * 4096, dirty_ring=RING, pml=False, programs=programs
    )
    return VM(config)


def _run_interleaved(vm: VM, handler: ContinueHandler) -> tuple[list[int], list[int]]:
    """Runs the (unstarted) VM's vCPUs on this thread in turns of PAGES_PER_TURN newly dirtied
    pages each, round robin: every writer has a partly filled ring whenever another's fills.
    Returns each vCPU's ring-full exits and its ring length at those exits."""
    exits = [0] * len(vm.vcpus)
    lengths: list[int] = []
    for _ in range(TURNS):
        for i, v in enumerate(vm.vcpus):
            v.quota = v.dirty_count + PAGES_PER_TURN
            while (e := v.run(10.0)).reason != "DIRTY_QUOTA_EXHAUSTED":
                if e.reason == "DIRTY_RING_FULL":
                    exits[i] += 1
                    lengths.append(vm.guest.ring_len(i))
                    handler.handle_exit(vm, v, e)
    return exits, lengths


@pytest.mark.parametrize("writers", [2, 3, 4])
def test_each_writer_takes_its_own_ring_full_sleeps(writers):
    """kvm_cpu_exec, KVM_EXIT_DIRTY_RING_FULL: while dirtylimit_in_service() QEMU reaps only
    the exiting vCPU's ring (kvm_dirty_ring_reap(s, cpu)), then dirtylimit_vcpu_execute
    sleeps that vCPU. So each writer fills its own ring every soft-limit pages and sleeps
    each time; reaping every ring would empty the others' rings before they fill (here the
    first writer would take every exit and the others none)."""
    vm = _writers_vm(writers)
    limiter = DirtyLimiter(vm)
    limiter._ensure_running = lambda: None  # no controller thread: the sleep per ring-full is fixed
    vm.dirty_limiter = limiter
    limiter.set(1)
    limiter.sleep_us = [1000] * writers
    slept: list[int] = []
    vm.throttle_sleep = lambda vcpu, seconds, **kw: slept.append(vcpu.index) or seconds  # type: ignore[method-assign]
    vm.guest.start_dirty_log()
    exits, lengths = _run_interleaved(vm, ContinueHandler())
    soft_limit = lengths[0]
    assert set(lengths) == {soft_limit}, "a ring-full exit comes at the soft limit"
    dirtied = TURNS * PAGES_PER_TURN
    assert dirtied % soft_limit, "premise: no turn ends exactly at a ring-full"
    expected = dirtied // soft_limit
    assert expected >= 3
    assert exits == [expected] * writers, f"ring-full exits per writer (soft limit {soft_limit})"
    assert [slept.count(i) for i in range(writers)] == exits, "one sleep per own ring-full"


def test_without_a_dirty_limit_a_ring_full_exit_reaps_every_ring():
    """kvm_cpu_exec, KVM_EXIT_DIRTY_RING_FULL without dirtylimit_in_service():
    kvm_dirty_ring_reap(s, NULL) reaps every vCPU's ring (fewer exits overall)."""
    vm = _writers_vm(2)
    vm.guest.start_dirty_log()
    exits, _ = _run_interleaved(vm, ContinueHandler())
    assert exits[0] >= 3 and exits[1] == 0, "vCPU 0 fills first each time and empties vCPU 1's ring"
    assert vm.guest.ring_len(1) > 0 and vm.guest.dirty_count() >= 2 * TURNS * PAGES_PER_TURN - 2 * RING


def test_reap_vcpu_needs_a_ring_and_a_vcpu():
    bitmap = VM(VmConfig(vcpus=1, memory=16 * MiB))
    with pytest.raises(ValueError, match="dirty ring"):
        bitmap.guest.reap_vcpu(0)
    with pytest.raises(IndexError):
        _writers_vm(2).guest.reap_vcpu(2)


# -- items 3, 5, 8: the trigger, the periodic sync, the limit, with a fake migration -----------


class FakeMigration:
    """What the policies read from a Migration; the test moves its counters."""

    def __init__(self) -> None:
        self.page_size = 4096
        self.new_dirty_pages = 0
        self.transferred = 0
        self.dirty_sync_count = 1  # the setup sync has run when Policy.start is called
        self.t_start = 0.0


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _policy(name: str, vm: VM, **params: object) -> tuple[Policy, FakeMigration, Clock]:
    p = MigrationParameters(**params)
    policies.select(p, name)
    policy = policies.make_policy(vm, p)
    clock = Clock()
    policy.clock = clock  # type: ignore[method-assign]
    if isinstance(policy, DirtyLimit):
        policy.limiter._ensure_running = lambda: None  # no controller thread
    m = FakeMigration()
    policy.start(m)  # type: ignore[arg-type]
    return policy, m, clock


def _sync(policy: Policy, m: FakeMigration, clock: Clock, t: float, dirtied: int, sent: int) -> None:
    """A dirty sync at `t` after `dirtied` new dirty pages and `sent` bytes."""
    clock.t = t
    m.new_dirty_pages += dirtied
    m.transferred += sent
    m.dirty_sync_count += 1
    policy.on_sync(m)  # type: ignore[arg-type]


HOT = (20_000, 100 * MiB)  # 80 MiB dirtied while 100 MiB went: above the 50 % threshold


def _ring_vm() -> VM:
    return VM(VmConfig(vcpus=2, memory=16 * MiB, dirty_ring=RING))


def test_auto_converge_first_throttles_at_the_third_sync():
    """migration_bitmap_sync: time_last_bitmap_sync is set at the setup sync (sync 1), so
    migration_trigger_throttle first checks at sync 2, the end of the bulk pass (hit 1),
    and a second hot period fires at sync 3: 20 % at the third sync, as QEMU 10 does. dqmig
    began the period at sync 2 and throttled one sync late."""
    policy, m, clock = _policy("auto-converge", _ring_vm())
    assert isinstance(policy, AutoConverge)
    _sync(policy, m, clock, 4.0, *HOT)  # sync 2: the bulk pass took 4 s
    assert policy.trigger.high_count == 1 and policy.percentage == 0
    _sync(policy, m, clock, 5.5, *HOT)  # sync 3
    assert policy.percentage == 20
    _sync(policy, m, clock, 7.0, *HOT)
    _sync(policy, m, clock, 8.5, *HOT)  # every second hot sync: +10
    assert policy.percentage == 30


def test_dirty_limit_trigger_also_counts_from_the_setup_sync():
    """migration_trigger_throttle serves dirty-limit too: the limit comes at sync 3."""
    vm = _ring_vm()
    policy, m, clock = _policy("dirty-limit", vm)
    _sync(policy, m, clock, 4.0, *HOT)
    assert not vm.dirty_limiter.limiting
    _sync(policy, m, clock, 5.5, *HOT)
    assert vm.dirty_limiter.limit == [1, 1]


def test_dirty_limit_reapplies_a_changed_vcpu_dirty_limit_at_the_next_firing():
    """migration_dirty_limit_guest runs at every firing of the trigger: it returns while a
    limit is in service at the vcpu-dirty-limit it applied last, and applies a changed one
    (migrate-set-parameters during the migration) to every vCPU."""
    vm = _ring_vm()
    policy, m, clock = _policy("dirty-limit", vm)
    t = 4.0
    for _ in range(2):
        _sync(policy, m, clock, t, *HOT)
        t += 1.5
    lim = vm.dirty_limiter
    assert lim.limit == [1, 1]
    lim.limit[1] = 7  # as if changed behind the migration's back: an unchanged quota is left alone
    for _ in range(2):
        _sync(policy, m, clock, t, *HOT)
        t += 1.5
    assert lim.limit == [1, 7]
    Monitor(vm, policy.params).execute("migrate-set-parameters", {"vcpu-dirty-limit": 50})
    _sync(policy, m, clock, t, *HOT)
    assert lim.limit == [1, 7], "applied at a firing, not at once"
    _sync(policy, m, clock, t + 1.5, *HOT)
    assert lim.limit == [50, 50]


class ActiveMigration:
    active = True


def test_qmp_refuses_dirty_limit_commands_during_a_dirty_limit_migration():
    """qmp_set_vcpu_dirty_limit / qmp_cancel_vcpu_dirty_limit: dirtylimit_is_allowed is
    false while a migration with the dirty-limit capability runs and a limit is in service
    (the migration owns the limits); allowed before the limit is in service, with another
    capability, and once the migration is over."""
    vm = _ring_vm()
    params = MigrationParameters()
    policies.select(params, "dirty-limit")
    monitor = Monitor(vm, params)
    lim = monitor._limiter()
    lim._ensure_running = lambda: None
    monitor.migration = ActiveMigration()  # type: ignore[assignment]
    monitor.execute("set-vcpu-dirty-limit", {"dirty-rate": 5})  # not yet in service: allowed
    with pytest.raises(QmpError, match="can't set dirty page rate limit while migration is running"):
        monitor.execute("set-vcpu-dirty-limit", {"cpu-index": 0, "dirty-rate": 9})
    with pytest.raises(QmpError, match="can't cancel dirty page rate limit while migration is running"):
        monitor.execute("cancel-vcpu-dirty-limit", {})
    assert lim.limit == [5, 5]
    policies.select(params, "auto-converge")
    monitor.execute("set-vcpu-dirty-limit", {"cpu-index": 0, "dirty-rate": 9})
    policies.select(params, "dirty-limit")
    monitor.migration = None
    monitor.execute("cancel-vcpu-dirty-limit", {})
    assert not lim.limiting


def test_periodic_sync_follows_qemus_dirty_sync_timer():
    """cpu_throttle_dirty_sync_timer_tick (QEMU 9.2+): a tick every 5 s from the migration's
    start; nothing while dirty_sync_count <= 1; otherwise a sync only when the count did not
    move since the previous tick (the forced sync counts, so a long iteration syncs every
    5 s). dqmig's old rule synced whenever 5 s had passed since the last sync, even in the
    bulk pass."""
    ps = PeriodicSync(armed_at=100.0)
    assert not ps.due(104.9, 1)
    assert not ps.due(105.0, 1)  # tick: still in the bulk pass
    assert not ps.due(109.9, 1)
    assert not ps.due(110.0, 1)  # tick: still the bulk pass, however long
    assert not ps.due(115.0, 2)  # tick: a sync came since the last tick
    assert ps.due(120.0, 2)  # tick: none came: sync (the caller's sync makes it 3)
    assert ps.due(125.0, 3)  # none but the forced one: sync again
    assert not ps.due(130.0, 5)  # two came: nothing
    assert not ps.due(134.0, 5) and ps.due(135.1, 5)
    assert not ps.due(139.0, 6) and ps.due(140.1, 6), "the timer re-arms 5 s after a late tick"


def test_periodic_sync_is_on_with_auto_converge_and_can_be_turned_off():
    """migration_thread arms the timer whenever auto-converge is on (QEMU 9.2+);
    x-cpu-throttle-periodic-sync=off is dqmig's way to show once-per-iteration control."""
    policy, m, _ = _policy("auto-converge", _ring_vm())
    m.dirty_sync_count = 2
    assert not policy.periodic_sync_due(m, 4.9)  # type: ignore[arg-type]
    assert not policy.periodic_sync_due(m, 5.0)  # type: ignore[arg-type]
    assert policy.periodic_sync_due(m, 10.0)  # type: ignore[arg-type]
    off, m, _ = _policy("auto-converge", _ring_vm(), x_cpu_throttle_periodic_sync=False)
    m.dirty_sync_count = 2
    assert not any(off.periodic_sync_due(m, t) for t in (5.0, 10.0, 15.0, 20.0))  # type: ignore[arg-type]
    for name in ("none", "dirty-limit", "dirty-quota"):
        other, m, _ = _policy(name, _ring_vm())
        m.dirty_sync_count = 2
        assert not any(other.periodic_sync_due(m, t) for t in (5.0, 10.0, 15.0)), name  # type: ignore[arg-type]


# -- item 4: dirty-limit's sleep is not interrupted by a stop ------------------------------------

WAIT_S = 10.0  # longest any wait below may take before the test fails


class UninterruptibleSleeper(ContinueHandler):
    """Sleeps vCPU 0 for `seconds` at its first exit, as dirtylimit_vcpu_execute's g_usleep
    (or not, with interruptible=True)."""

    def __init__(self, seconds: float, interruptible: bool = False) -> None:
        self.seconds, self.interruptible = seconds, interruptible
        self.sleeping = threading.Event()
        self.started_at = 0.0
        self.slept: list[float] = []

    def handle_exit(self, vm, vcpu, exit):  # type: ignore[no-untyped-def]
        if vcpu.index == 0 and not self.sleeping.is_set():
            self.started_at = time.monotonic()
            self.sleeping.set()
            self.slept.append(vm.throttle_sleep(vcpu, self.seconds, interruptible=self.interruptible))
        else:
            super().handle_exit(vm, vcpu, exit)


def _sleeper_vm(handler: ContinueHandler) -> VM:
    writer = ProgramSpec("uniform", region_pages=1024, rate=1000)
    return VM(VmConfig(vcpus=2, memory=16 * MiB, programs=[writer, ProgramSpec("idle")]), handler)


def test_pause_waits_for_an_uninterruptible_sleep_and_reports_the_stop_latency():
    """dirtylimit_vcpu_execute sleeps with g_usleep: a stop (vm_stop -> pause_all_vcpus)
    waits until every vCPU has left that sleep. VM.pause does the same, even past its
    timeout, and returns the time from the request to every vCPU parked."""
    handler = UninterruptibleSleeper(0.6)
    with _sleeper_vm(handler) as vm:
        assert handler.sleeping.wait(WAIT_S)
        t0 = time.monotonic()
        latency = vm.pause(timeout=0.2)
        parked = time.monotonic()
        assert parked >= handler.started_at + 0.6, "a vCPU parked before its sleep was over"
        assert handler.slept[0] >= 0.6
        assert latency >= handler.started_at + 0.6 - t0
        assert latency <= parked - t0
        vm.resume()


def test_interruptible_sleep_ends_at_a_pause_and_stop_ends_any_sleep():
    """cpu_throttle_thread (auto-converge) checks cpu->stop: its sleep ends at a stop, as
    dirty-limit's does with x-dirty-limit-interruptible. Ending the VM ends any sleep."""
    handler = UninterruptibleSleeper(30.0, interruptible=True)
    with _sleeper_vm(handler) as vm:
        assert handler.sleeping.wait(WAIT_S)
        assert vm.pause() < 15.0, "the pause ended the 30 s sleep"
        vm.resume()
    handler = UninterruptibleSleeper(30.0)
    vm = _sleeper_vm(handler).start()
    assert handler.sleeping.wait(WAIT_S)
    t0 = time.monotonic()
    vm.stop()
    assert time.monotonic() - t0 < 15.0 and handler.slept[0] < 15.0


def test_dirty_limit_sleeps_follow_x_dirty_limit_interruptible():
    """dirtylimit_vcpu_execute's sleep is uninterruptible by default; the policy passes
    x-dirty-limit-interruptible to the limiter for the migration, then restores QEMU's."""
    vm = _ring_vm()
    calls: list[bool] = []
    vm.throttle_sleep = lambda vcpu, s, interruptible=True: calls.append(interruptible) or s  # type: ignore[method-assign]
    for flag in (False, True):
        policy, _, _ = _policy("dirty-limit", vm, x_dirty_limit_interruptible=flag)
        lim = vm.dirty_limiter
        lim.set(1)
        lim.sleep_us = [1000, 1000]
        lim.on_ring_full(vm, vm.vcpus[0])
        policy.stop()
        assert not lim.interruptible
    assert calls == [False, True]
    assert MigrationParameters().x_dirty_limit_interruptible is False


SLEEP_S = 1.5  # vCPU 0's sleep per ring-full: much longer than the migration of an idle 16 MiB guest


@pytest.mark.parametrize("interruptible", [False, True])
def test_stop_latency_is_reported_in_query_migrate(interruptible, start_destination):
    """migration_completion_precopy starts the downtime, then migration_stop_vm waits for
    every vCPU: a vCPU in dirty-limit's sleep at the stop adds the rest of that sleep to the
    downtime. dqmig reports that wait as x-stop-latency (ms), inside the downtime; with
    x-dirty-limit-interruptible it is short."""
    writer = ProgramSpec("sequential", region_pages=1024)
    vm = VM(VmConfig(vcpus=2, memory=16 * MiB, dirty_ring=256, pml=False, programs=[writer, ProgramSpec("idle")]))
    lim = vm.dirty_limiter = DirtyLimiter(vm)
    lim._ensure_running = lambda: None  # a fixed sleep per ring-full, no controller
    lim.set(1, 0)
    lim.sleep_us[0] = int(SLEEP_S * 1e6)
    # What the policy sets from x-dirty-limit-interruptible at its start; set before, since
    # the sleep the stop meets begins before the migration.
    lim.interruptible = interruptible
    sleeps: list[float] = []
    throttle_sleep = vm.throttle_sleep

    def recorded(vcpu, seconds, **kw):  # type: ignore[no-untyped-def]
        sleeps.append(time.monotonic())
        return throttle_sleep(vcpu, seconds, **kw)

    vm.throttle_sleep = recorded  # type: ignore[method-assign]
    p = MigrationParameters(x_max_time=30, x_dirty_limit_interruptible=interruptible)
    policies.select(p, "dirty-limit")
    with start_destination() as rx, vm:
        vm.start_dirty_log()  # vCPU 0 fills its ring at once and goes to sleep
        deadline = time.monotonic() + WAIT_S
        while not sleeps and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sleeps, "vCPU 0 filled its ring"
        m = Migration(vm, rx.uri, p).start()
        assert m.wait(30) == "completed", m.error_desc
        rx.join()
    q = m.query()
    asleep_at_stop = [t for t in sleeps if t <= m.t_stop < t + SLEEP_S]
    assert asleep_at_stop, "premise: vCPU 0 was in its sleep when the migration stopped the VM"
    left = asleep_at_stop[0] + SLEEP_S - m.t_stop
    assert q["x-stop-latency"] == int(m.stop_latency * 1000)
    assert q["downtime"] >= q["x-stop-latency"]
    if interruptible:
        assert m.stop_latency < left, "the stop ended the sleep"
    else:
        assert m.stop_latency >= left, "the stop waited for the sleep"
