"""Policies beyond the RFC: DMA throttling, the over-throttling fallback, byte accounting,
live control through QMP (capability toggle mid-migration, the dirty-limit commands)."""

from __future__ import annotations

import math
import threading
import time

import pytest

from dqmig import policies
from dqmig.migration.destination import Incoming
from dqmig.migration.params import MigrationParameters
from dqmig.migration.source import Migration
from dqmig.monitor import Monitor, QmpError
from dqmig.policies.allocator import QuotaAllocator
from dqmig.programs import ProgramSpec, own_regions
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig

MEMORY = 64 * MiB
BANDWIDTH = 32 * MiB


def config(writer: ProgramSpec, dma: ProgramSpec | None = None) -> VmConfig:
    (_, _), (r_start, r_pages) = own_regions(MEMORY // 4096, 2)
    idle = ProgramSpec("read-mostly", region_start=r_start, region_pages=r_pages, seed=2)
    return VmConfig(vcpus=2, memory=MEMORY, dirty_ring=4096, programs=[writer, idle], dma=dma)


def writer(rate: float) -> ProgramSpec:
    (w_start, w_pages), _ = own_regions(MEMORY // 4096, 2)
    return ProgramSpec("uniform", region_start=w_start, region_pages=w_pages, rate=rate, seed=1)


def dma_writer(rate: float = 16384) -> ProgramSpec:
    # 16384 steps/s: about 64 MiB/s of newly dirty pages over the whole guest, twice the bandwidth.
    return ProgramSpec("uniform", rate=rate, seed=9)


def run_migration(cfg: VmConfig, params: MigrationParameters, during=None, before=None) -> Migration:
    incoming = Incoming("tcp:127.0.0.1:0", accept_timeout=30, io_timeout=30)
    received: dict = {}

    def receive() -> None:
        try:
            received["r"] = incoming.run()
        except Exception as e:  # a migration that gives up closes the stream
            received["error"] = e

    dest = threading.Thread(target=receive, daemon=True)
    dest.start()
    vm = VM(cfg)
    if before:
        before(vm)
    vm.start()
    try:
        time.sleep(0.3)
        m = Migration(vm, incoming.address, params).start()
        if during:
            during(vm, m)
        m.wait(120)
        dest.join(30)
        if "r" in received:
            received["r"].vm.stop()
        return m
    finally:
        if not vm.running:
            vm.resume()
        vm.stop()


def params(policy: str, cap_s: float, **extra: object) -> MigrationParameters:
    p = MigrationParameters(max_bandwidth=BANDWIDTH, x_max_time=cap_s, **extra)
    policies.select(p, policy)
    return p


def dma_pages_per_s(cfg: VmConfig, seconds: float = 0.5) -> float:
    """The DMA writer's achieved rate (steps/s) on this host, in the full guest beside its
    vCPUs: what the host gives it, not what its spec asks for."""
    vm = VM(cfg).start()
    try:
        time.sleep(0.1)  # threads up
        t0, p0 = time.monotonic(), vm.counters()[-1]["progress"]
        time.sleep(seconds)
        return (vm.counters()[-1]["progress"] - p0) / (time.monotonic() - t0)
    finally:
        vm.stop()


def distinct_pages(rate: float, pages: int, seconds: float) -> float:
    """Expected distinct pages hit by `rate` uniform random writes per second over `pages`."""
    return pages * (1 - math.exp(-rate * seconds / pages))


def fill_memory(vm: VM) -> None:
    """Makes every page non-zero, so the bulk pass sends the whole guest."""
    page = bytes([0xA5]) * vm.guest.page_size
    for p in range(vm.guest.pages):
        vm.guest.write_page(p, page)


def dma_rate_during(m: Migration) -> float:
    """The DMA writer's steps/s over the migration, from its samples."""
    first, last = m.samples[0], m.samples[-1]
    return (last["vcpus"][-1]["progress"] - first["vcpus"][-1]["progress"]) / (last["t"] - first["t"])


def dma_bound_bandwidth(cfg: VmConfig) -> int:
    """A bandwidth at which the DMA writer alone keeps pre-copy from converging: the pages it
    dirties in one downtime-limit (300 ms) take three times that to send. Sized from the rate
    this host actually gives the DMA writer, so the premise does not hang on host speed."""
    rate = dma_pages_per_s(cfg)
    per_downtime = distinct_pages(rate, MEMORY // 4096, 0.3) * 4096
    bandwidth = min(BANDWIDTH, int(per_downtime / 0.3 / 3))
    assert bandwidth >= 4 * MiB, f"the DMA writer ran at {rate:.0f} steps/s: too slow a host for this test"
    return bandwidth


def assert_dma_kept_its_pace(m: Migration, cfg: VmConfig) -> None:
    expected = dma_pages_per_s(cfg, 0.3)
    achieved = dma_rate_during(m)
    assert achieved > expected / 3, f"premise: the DMA writer kept {achieved:.0f} of {expected:.0f} steps/s"


def test_dma_heavy_guest_converges_only_with_dma_throttling():
    # Every page starts non-zero, so the bulk pass lasts seconds: a mostly-zero guest
    # finishes it before the DMA writer has dirtied enough, and then converges (the
    # fresh-clone failure this replaces).
    cfg = lambda: config(writer(1000), dma_writer())  # noqa: E731
    bandwidth = dma_bound_bandwidth(cfg())
    off_params = params("dirty-quota", 8, x_dirty_quota_dma=False, x_dirty_quota_fallback=False)
    off_params.max_bandwidth = bandwidth
    off = run_migration(cfg(), off_params, before=fill_memory)
    assert off.status == "cancelled" and off.converged is False, (off.error_desc, bandwidth)
    assert_dma_kept_its_pace(off, cfg())
    on_params = params("dirty-quota", 60, x_dirty_quota_dma=True)
    on_params.max_bandwidth = bandwidth
    on = run_migration(cfg(), on_params, before=fill_memory)
    assert on.status == "completed", on.error_desc
    dma_exits = [s["quota-exits"][-1] for s in on.samples if "quota-exits" in s]
    assert sum(dma_exits) > 0, "the DMA writer drew quota from the budget"


def test_a_dma_bound_stall_does_not_fall_back_to_auto_converge():
    # A flat-out vCPU writer sleeps most of every interval, yet the DMA writer the quota
    # cannot see keeps the bytes left from shrinking. Auto-converge throttles vCPUs only
    # (QEMU's cpu_throttle_set slows vCPU threads; a device is not one), so falling back
    # could not help: dirty quota stays, and says what stalls it.
    # The DMA writer alone dirties about 1.2x what goes out between two syncs (~2 s apart).
    cfg = lambda: config(writer(0), dma_writer(32768))  # noqa: E731
    m = run_migration(cfg(), params("dirty-quota", 12, x_dirty_quota_dma=False))
    assert_dma_kept_its_pace(m, cfg())
    assert [c["policy"] for c in m.policy_changes] == ["dirty-quota"], m.policy_changes
    assert m.status == "cancelled" and m.converged is False
    assert m.policy is not None and m.policy.stalled_by == "dma"
    assert any(s.get("dirty-quota", {}).get("stalled-by") == "dma" for s in m.samples)


def fallback_rule(dma_pages_per_window: int) -> tuple[bool, str | None]:
    """Drives DirtyQuota's over-throttling rule through two dirty syncs 3 s apart, with the
    writer asleep 95 % of the time and the bytes left not shrinking; returns (fell back,
    stalled-by). 2048 pages go out in the window."""
    from types import SimpleNamespace

    from dqmig.policies import dirtyquota

    vm = VM(config(writer(0), dma_writer()))
    p = params("dirty-quota", 0, x_dirty_quota_dma=False)
    policy = dirtyquota.DirtyQuota(vm, p)
    policy.enforcing = True
    t = [100.0]
    dma = [0]
    policy._free_dma_dirtied = lambda: dma[0]
    m = SimpleNamespace(remaining=8 * MiB, transferred=0, page_size=4096)
    policy.clock = lambda: t[0]  # the policy's injected clock
    assert not policy._over_throttling(m)
    t[0] += 3.0
    policy.allocator.state[0].total_sleep = 0.95 * 3.0
    m.transferred, dma[0] = 2048 * 4096, dma_pages_per_window
    return policy._over_throttling(m), policy.stalled_by


def test_over_throttling_by_vcpus_falls_back_and_by_dma_does_not():
    """The fallback rule (dqmig, beyond the RFC): auto-converge only where it can help."""
    assert fallback_rule(dma_pages_per_window=100) == (True, None), "the vCPUs dirty: fall back"
    assert fallback_rule(dma_pages_per_window=4000) == (False, "dma"), "the DMA writer dirties: stay"


def test_skip_bulk_leaves_the_first_iteration_unthrottled():
    m = run_migration(config(writer(16384)), params("dirty-quota", 60, x_dirty_quota_skip_bulk=True))
    assert m.status == "completed", m.error_desc
    bulk = [s for s in m.samples if s["ram"]["dirty-sync-count"] <= 1 and "quota-exits" in s]
    assert bulk and all(sum(s["quota-exits"]) == 0 for s in bulk)
    assert sum(sum(s.get("quota-exits", [0])) for s in m.samples) > 0


def test_dirty_quota_switched_on_mid_migration_through_qmp():
    def toggle(vm: VM, m: Migration) -> None:
        time.sleep(1.0)
        monitor = Monitor(vm, m.params)
        monitor.migration = m
        monitor.execute("migrate-set-capabilities", {"capabilities": [{"capability": "dirty-quota", "state": True}]})
        monitor.execute("migrate-set-parameters", {"x-dirty-quota-interval": 20})

    m = run_migration(config(writer(16384)), params("none", 60), during=toggle)
    assert m.status == "completed", m.error_desc
    assert [c["policy"] for c in m.policy_changes] == ["none", "dirty-quota"]
    assert m.policy_changes[1]["reason"] == "migrate-set-capabilities"


def test_qmp_refuses_other_capabilities_mid_migration_and_bad_combinations():
    vm = VM(config(writer(100)))
    monitor = Monitor(vm, MigrationParameters())
    set_caps = lambda caps: monitor.execute(  # noqa: E731
        "migrate-set-capabilities", {"capabilities": [{"capability": c, "state": True} for c in caps]}
    )
    with pytest.raises(QmpError, match="conflicts"):
        set_caps(["auto-converge", "dirty-limit"])
    assert not monitor.params.capabilities["auto-converge"], "all or nothing"
    bitmap = Monitor(VM(VmConfig(vcpus=1, memory=16 * MiB)), MigrationParameters())
    with pytest.raises(QmpError, match="dirty ring"):
        bitmap.execute("migrate-set-capabilities", {"capabilities": [{"capability": "dirty-limit", "state": True}]})


def test_qmp_dirty_limit_commands_slow_only_the_writer():
    vm = VM(config(writer(16384))).start()
    try:
        monitor = Monitor(vm)
        vm.start_dirty_log()
        monitor.execute("set-vcpu-dirty-limit", {"cpu-index": 0, "dirty-rate": 4})
        assert monitor.execute("query-vcpu-dirty-limit", {})[0]["limit-rate"] == 4
        limiter = vm.dirty_limiter
        deadline = time.monotonic() + 8  # a few controller periods of 1 s
        while limiter.sleep_us[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert limiter.sleep_us[0] > 0, "the writer sleeps at each ring-full"
        assert limiter.sleep_us[1] == 0 and limiter.limit[1] is None
        monitor.execute("cancel-vcpu-dirty-limit", {})
        assert monitor.execute("query-vcpu-dirty-limit", {}) == []
        with pytest.raises(QmpError, match="cpu-index"):
            monitor.execute("set-vcpu-dirty-limit", {"cpu-index": 7, "dirty-rate": 4})
    finally:
        vm.stop()
    bitmap = Monitor(VM(VmConfig(vcpus=1, memory=16 * MiB)))
    with pytest.raises(QmpError, match="dirty ring"):
        bitmap.execute("set-vcpu-dirty-limit", {"dirty-rate": 4})


def test_byte_accounting_a_larger_page_charges_its_full_size():
    small = QuotaAllocator(writers=2, page_size=4096, initial_throughput=1 << 34)
    huge = QuotaAllocator(writers=2, page_size=2 * MiB, initial_throughput=1 << 34)
    assert small.limit * 4096 == pytest.approx(huge.limit * 2 * MiB), "same bytes per second"
    assert huge.share >= 2
    assert abs(small.share * 4096 - huge.share * 2 * MiB) <= 2 * MiB, "same bytes per interval, to a page"


def test_retune_starts_fresh_intervals_and_keeps_the_pool():
    t = [0.0]
    a = QuotaAllocator(writers=1, interval=0.01, clock=lambda: t[0])
    a.on_exit(0, 1, 1)
    a.pool = 5
    a.retune(interval=0.02, ratio=4.0, window=1.0)
    assert (a.interval, a.ratio, a.pool) == (0.02, 4.0, 5)
    assert a.on_exit(0, 10, 10).sleep == 0, "a fresh interval after a retune"
