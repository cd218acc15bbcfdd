"""The VM (vCPU threads around Vcpu.run), its sampler, and calc-dirty-rate's three modes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dqmig import _native, dirtyrate
from dqmig.programs import ProgramSpec, own_regions, preset
from dqmig.sampler import Sampler
from dqmig.units import MiB
from dqmig.vm import VM, ContinueHandler, VmConfig, VmError

MEMORY = 16 * MiB
PAGES = MEMORY // 4096
WAIT_S = 5.0  # upper bound for anything we poll for


def wait_until(predicate, timeout: float = WAIT_S, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def writer_and_idle(ring: int = 0, **kwargs) -> VmConfig:
    """vCPU 0 writes uniformly in its half of memory; vCPU 1 idles."""
    (r0, n0), _ = own_regions(PAGES, 2)
    programs = [ProgramSpec("uniform", region_start=r0, region_pages=n0, seed=1), ProgramSpec("idle")]
    return VmConfig(vcpus=2, memory=MEMORY, dirty_ring=ring, pml=False, programs=programs, **kwargs)


def progress(vm: VM) -> list[int]:
    return [c["progress"] for c in vm.counters()]


# -- lifecycle -----------------------------------------------------------------------------------


def test_start_and_stop_in_a_with_block():
    vm = VM(VmConfig.with_workload("uniform", vcpus=2, memory=MEMORY))
    assert not vm.running
    with vm:
        assert vm.running
        wait_until(lambda: all(p > 0 for p in progress(vm)), what="both vCPUs to make progress")
        threads = list(vm._threads)
    assert not vm.running
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(VmError, match="already started"):
        vm.start()


def test_pause_stops_every_vcpu_and_resume_restarts_them():
    with VM(VmConfig.with_workload("uniform", vcpus=2, memory=MEMORY)) as vm:
        wait_until(lambda: all(p > 0 for p in progress(vm)))
        vm.pause()
        assert not vm.running
        first = progress(vm)
        time.sleep(0.05)
        assert progress(vm) == first, "no vCPU runs while paused"
        digest = vm.guest.digest()
        time.sleep(0.02)
        assert vm.guest.digest() == digest, "memory is still while paused"
        vm.resume()
        assert vm.running
        wait_until(lambda: all(n > p for n, p in zip(progress(vm), first, strict=True)), what="progress")
        # Pause again: a second pause/resume cycle works the same.
        vm.pause()
        second = progress(vm)
        time.sleep(0.02)
        assert progress(vm) == second
        vm.resume()


def test_pause_with_a_finished_program_does_not_hang():
    programs = [ProgramSpec("sequential", steps=100), ProgramSpec("uniform", region_start=PAGES // 2)]
    with VM(VmConfig(vcpus=2, memory=MEMORY, programs=programs)) as vm:
        wait_until(lambda: vm.done[0], what="vCPU 0 to finish")
        t0 = time.monotonic()
        vm.pause()
        assert time.monotonic() - t0 < WAIT_S
        assert progress(vm)[0] == 100
        vm.resume()


def test_default_programs_are_idle():
    vm = VM(VmConfig(vcpus=3, memory=MEMORY))
    assert [p.kind for p in vm.programs] == ["idle"] * 3
    assert vm.vcpu_classes() == ["idle"] * 3
    with vm:
        time.sleep(0.05)
    assert progress(vm) == [0, 0, 0]


# -- exit handlers -------------------------------------------------------------------------------


class QuotaHandler(ContinueHandler):
    """Re-arms vCPU 0's quota by GRANT pages at every DIRTY_QUOTA_EXHAUSTED exit."""

    GRANT = 64

    def __init__(self) -> None:
        self.exits: list[tuple[int, int, str]] = []
        self.lock = threading.Lock()

    def handle_exit(self, vm, vcpu, exit):
        if exit.reason == "DIRTY_QUOTA_EXHAUSTED":
            with self.lock:
                self.exits.append((exit.count, exit.quota, threading.current_thread().name))
            vcpu.quota = exit.count + self.GRANT
        else:
            super().handle_exit(vm, vcpu, exit)


@pytest.mark.parametrize("ring", [0, 4096])
def test_custom_handler_gets_quota_exits(ring):
    handler = QuotaHandler()
    with VM(writer_and_idle(ring), handler) as vm:
        vm.start_dirty_log()
        v = vm.vcpus[0]
        v.quota = v.dirty_count + QuotaHandler.GRANT
        end = time.monotonic() + WAIT_S
        while len(handler.exits) < 10 and time.monotonic() < end:
            vm.guest.harvest()  # re-protect pages so the writer keeps faulting
            time.sleep(0.01)
        vm.pause()
        assert v.dirty_count <= v.quota, "never dirties past its quota (pml_batch=1)"
    exits = list(handler.exits)
    assert len(exits) >= 10
    assert all(name == "vcpu0" for *_, name in exits), "handled on the vCPU's own thread"
    assert all(count >= quota for count, quota, _ in exits)
    # Every re-armed quota is met exactly (the first was set while the vCPU ran).
    assert all(count == quota for count, quota, _ in exits[1:])
    counts = [count for count, *_ in exits]
    assert all(b - a == QuotaHandler.GRANT for a, b in zip(counts[1:], counts[2:], strict=False))
    c = vm.counters()
    assert c[0]["exits"]["DIRTY_QUOTA_EXHAUSTED"] >= len(exits)
    assert c[1]["exits"]["DIRTY_QUOTA_EXHAUSTED"] == 0
    assert c[0]["handler_ns"] > 0


def test_continue_handler_turns_off_a_spent_quota_and_reaps_full_rings():
    with VM(writer_and_idle(ring=256)) as vm:
        vm.start_dirty_log()
        vm.vcpus[0].quota = 1
        wait_until(lambda: vm.vcpus[0].quota == 0, what="the default handler to drop the quota")
        wait_until(lambda: vm.counters()[0]["exits"]["DIRTY_RING_FULL"] > 0, what="a ring-full exit")
        before = vm.vcpus[0].dirty_count
        wait_until(lambda: vm.vcpus[0].dirty_count > before + 1000, what="the writer to go on")


class SleepyHandler(ContinueHandler):
    """Throttles vCPU 0 for 30 s at its first time-slice exit."""

    def __init__(self) -> None:
        self.sleeping = threading.Event()
        self.slept: list[float] = []

    def handle_exit(self, vm, vcpu, exit):
        if exit.reason == "TIMESLICE" and vcpu.index == 0 and not self.slept:
            self.sleeping.set()
            self.slept.append(vm.throttle_sleep(vcpu, 30.0))
        else:
            super().handle_exit(vm, vcpu, exit)


@pytest.mark.parametrize("end", ["pause", "stop"])
def test_throttle_sleep_ends_when_the_vm_pauses_or_stops(end):
    handler = SleepyHandler()
    vm = VM(writer_and_idle(), handler)
    with vm:
        assert handler.sleeping.wait(WAIT_S)
        time.sleep(0.05)
        t0 = time.monotonic()
        if end == "pause":
            vm.pause()
            took = time.monotonic() - t0
            vm.resume()
    if end == "stop":
        took = time.monotonic() - t0
    assert took < 1.0, f"{end} waited {took:.2f} s for a throttled vCPU"
    assert len(handler.slept) == 1 and 0.04 < handler.slept[0] < 1.0
    assert vm.counters()[0]["sleep_ns"] == int(handler.slept[0] * 1e9)


def test_throttle_sleep_sleeps_and_records():
    vm = VM(writer_and_idle())
    assert vm.throttle_sleep(vm.vcpus[1], 0) == 0.0
    slept = vm.throttle_sleep(vm.vcpus[1], 0.02)
    assert slept >= 0.02
    assert vm.sleep_ns == [0, int(slept * 1e9)]


# -- DMA writer, counters, memory view -----------------------------------------------------------


@pytest.mark.parametrize("ring", [0, 256])
def test_dma_writer_has_its_own_counter(ring):
    config = VmConfig(vcpus=2, memory=MEMORY, dirty_ring=ring, pml=False, dma=ProgramSpec("sequential", rate=5000))
    with VM(config) as vm:
        assert vm.dma is not None and vm.dma.is_device
        assert len(vm.all_writers) == 3
        vm.start_dirty_log()
        wait_until(lambda: vm.dma.dirty_count >= 50, what="DMA writes")
        assert [vm.guest.ring_len(i) for i in range(2)] == [0, 0], "device writes bypass rings"
        vm.pause()
        pages = vm.guest.harvest().tolist()
        dma_count = vm.dma.dirty_count
        assert pages and pages == list(range(pages[0], pages[0] + len(pages))), "sequential"
        assert len(pages) == dma_count
    c = vm.counters()
    assert len(c) == 3
    assert c[2]["pages_dirtied"] == dma_count
    assert c[0]["pages_dirtied"] == c[1]["pages_dirtied"] == 0


def test_counters_include_vm_times():
    with VM(writer_and_idle()) as vm:
        wait_until(lambda: progress(vm)[0] > 0, what="the writer to run")
        wait_until(lambda: vm.counters()[1]["halt_ns"] > 0, what="the idle vCPU to halt")
    c = vm.counters()
    assert len(c) == 2
    for d in c:
        assert {"progress", "pages_dirtied", "bytes_written", "run_ns", "halt_ns", "exits"} <= set(d)
        assert {"sleep_ns", "handler_ns"} <= set(d)
    assert c[0]["progress"] > 0 and c[0]["run_ns"] > 0
    assert c[1]["progress"] == 0 and c[1]["halt_ns"] > 0


def test_memory_view_is_read_only_and_matches_read_page():
    with VM(writer_and_idle()) as vm:
        wait_until(lambda: progress(vm)[0] > 1000)
        vm.pause()
        view = vm.memory_view()
        assert isinstance(view, np.ndarray)
        assert view.shape == (PAGES, 4096) and view.dtype == np.uint8
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0, 0] = 1
        nonzero = np.flatnonzero(view.any(axis=1))
        assert len(nonzero) > 0 and nonzero.max() < PAGES // 2, "only vCPU 0's half is written"
        for p in [*nonzero[:5].tolist(), PAGES - 1]:
            assert view[p].tobytes() == vm.guest.read_page(p)
        vm.resume()


# -- sampler -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ring", [0, 4096])
def test_sampler_reports_per_vcpu_rates(ring):
    with VM(writer_and_idle(ring)) as vm:
        vm.start_dirty_log()
        sampler = Sampler(vm, clear_log=True).start()
        time.sleep(0.55)
        samples = sampler.stop()
    assert len(samples) >= 3
    ts = [s.t for s in samples]
    assert all(b > a for a, b in zip(ts, ts[1:], strict=False))
    gaps = sorted(b - a for a, b in zip(ts, ts[1:], strict=False))
    assert 0.05 < gaps[len(gaps) // 2] < 0.3, f"about every 100 ms: {ts}"
    for s in samples:
        assert len(s.progress_rate) == len(s.dirty_rate) == len(s.write_rate) == 2
        assert s.progress_rate[1] == 0 and s.dirty_rate[1] == 0, "the idle vCPU"
        assert set(s.as_dict()) == {
            "t",
            "progress_rate",
            "dirty_rate",
            "write_rate",
            "sleep_share",
            "ms_per_gib",
            "dirty_pages",
        }
    assert sum(s.dirty_rate[0] > 0 for s in samples) >= len(samples) // 2
    assert sum(s.progress_rate[0] > 0 for s in samples) >= len(samples) // 2
    assert any(s.dirty_pages > 0 for s in samples)


# -- calc-dirty-rate -----------------------------------------------------------------------------

CALC = 0.2


def test_dirty_rate_modes_on_a_writer_workload():
    with VM(VmConfig.with_workload("uniform", vcpus=2, memory=MEMORY)) as vm:
        r = dirtyrate.page_sampling(vm, CALC, pages_per_gib=4096, min_block=0)
        assert r.mode == "page-sampling" and r.sampled_pages == 64 and r.dirty_rate > 0
        assert not vm.guest.dirty_logging
        r = dirtyrate.dirty_bitmap(vm, CALC)
        assert r.mode == "dirty-bitmap" and r.dirty_rate > 0
        assert not vm.guest.dirty_logging, "logging is restored to off"
        with pytest.raises(dirtyrate.Unavailable, match="dirty ring"):
            dirtyrate.dirty_ring(vm, CALC)


def test_page_sampling_skips_a_guest_under_128_mib():
    """QEMU's dirtyrate.c skip_sample_ramblock: RAM blocks under MIN_RAMBLOCK_SIZE (128 MiB)
    are not sampled, so a small guest measures nothing; dqmig says so."""
    with VM(VmConfig.with_workload("uniform", vcpus=1, memory=MEMORY)) as vm:
        r = dirtyrate.page_sampling(vm, CALC)
    assert (r.dirty_rate, r.sampled_pages) == (0, 0)
    assert "QEMU skips RAM blocks under 128 MiB" in r.note


def test_dirty_bitmap_mode_is_refused_with_the_ring_or_a_migration_log():
    """QEMU's qmp_calc_dirty_rate refuses dirty-bitmap mode when the KVM dirty ring is on;
    and it never consumes the migration's dirty log: with logging on (a migration's),
    dqmig refuses it rather than harvest pages the migration has yet to send."""
    with VM(VmConfig(vcpus=1, memory=MEMORY, dirty_ring=256, pml=False)) as vm:
        with pytest.raises(dirtyrate.Unavailable, match="refused with the dirty ring on"):
            dirtyrate.dirty_bitmap(vm, CALC)
    vm = VM(VmConfig(vcpus=1, memory=MEMORY, programs=[ProgramSpec("sequential", steps=100)]))
    vm.start_dirty_log()
    with vm:
        wait_until(lambda: vm.done[0], what="the writer to finish")
        with pytest.raises(dirtyrate.Unavailable, match="owns the dirty log"):
            dirtyrate.dirty_bitmap(vm, CALC)
        assert len(vm.guest.harvest()) == 100, "the migration's dirty pages are still there"


PER_VCPU_CALC = 1.0  # QEMU's MB/s are integers: a vCPU must dirty >= 256 pages to show one


def test_dirty_ring_mode_on_a_writer_workload():
    with VM(VmConfig.with_workload("uniform", vcpus=2, memory=MEMORY, dirty_ring=4096)) as vm:
        vm.wait_running()
        r = dirtyrate.dirty_ring(vm, PER_VCPU_CALC)
        assert r.mode == "dirty-ring" and r.dirty_rate > 0
        assert len(r.vcpu_dirty_rate) == 2 and all(x > 0 for x in r.vcpu_dirty_rate)
        assert not vm.guest.dirty_logging
        vm.start_dirty_log()
        dirtyrate.dirty_ring(vm, CALC)
        assert vm.guest.dirty_logging, "logging that was on stays on"


def test_dirty_ring_mode_leaves_a_migration_log_alone():
    """The dirty log a migration started is the migration's: dirty-ring mode counts ring
    pushes without clearing the pages the migration has yet to send."""
    vm = VM(VmConfig(vcpus=1, memory=MEMORY, dirty_ring=4096, programs=[ProgramSpec("sequential", steps=100)]))
    vm.start_dirty_log()
    with vm:
        wait_until(lambda: vm.done[0], what="the writer to finish")
        assert dirtyrate.dirty_ring(vm, CALC).dirty_rate == 0, "it finished before the measurement"
        assert len(vm.guest.harvest()) == 100


def test_dirty_rate_modes_on_an_idle_guest():
    with VM(VmConfig(vcpus=2, memory=MEMORY)) as vm:
        assert dirtyrate.page_sampling(vm, CALC, min_block=0).dirty_rate == 0
        assert dirtyrate.dirty_bitmap(vm, CALC).dirty_rate == 0
    with VM(VmConfig(vcpus=2, memory=MEMORY, dirty_ring=256, pml=False)) as vm:
        r = dirtyrate.dirty_ring(vm, CALC)
        assert r.dirty_rate == 0 and r.vcpu_dirty_rate == [0, 0]


def test_dirty_ring_rate_is_per_vcpu():
    with VM(writer_and_idle(ring=4096)) as vm:
        vm.wait_running()
        r = dirtyrate.dirty_ring(vm, PER_VCPU_CALC)
    assert r.vcpu_dirty_rate[0] > 0 and r.vcpu_dirty_rate[1] == 0


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"vcpus": 0}, "vcpus", id="vcpus=0"),
        pytest.param({"vcpus": -1}, "vcpus", id="vcpus=-1"),
        pytest.param({"memory": MEMORY + 100}, "page size", id="memory-not-page-multiple"),
        pytest.param({"programs": [ProgramSpec("idle")] * 3}, "3 programs", id="programs!=vcpus"),
        pytest.param({"timeslice": 0}, "timeslice", id="timeslice=0"),
        pytest.param({"timeslice": float("nan")}, "timeslice", id="timeslice=nan"),
        pytest.param({"dirty_ring": 100}, "dirty ring", id="dirty_ring=100"),
        pytest.param({"dirty_ring": -1}, "dirty ring", id="dirty_ring=-1"),
        pytest.param({"memory": 0}, "page", id="memory=0"),
        pytest.param({"page_size": 0}, "page size", id="page_size=0"),
        pytest.param({"page_size": 1000, "memory": 1000 * 64}, "page size", id="page_size=1000"),
        pytest.param(
            {"programs": [ProgramSpec("uniform", region_start=PAGES), ProgramSpec("idle")]},
            "region_start",
            id="program-outside-memory",
        ),
    ],
)
def test_bad_config_raises_value_error(kwargs, match):
    config = VmConfig(**{"vcpus": 2, "memory": MEMORY, **kwargs})
    with pytest.raises(ValueError, match=match):
        VM(config)


def test_with_workload_builds_the_preset():
    c = VmConfig.with_workload("skewed", vcpus=3, memory=MEMORY, seed=2, dirty_ring=512, pml=False)
    assert c.pages == PAGES and c.dirty_ring == 512
    assert c.programs == preset("skewed", 3, PAGES, 2)
    vm = VM(c)
    assert vm.vcpu_classes() == ["writer", "reader", "reader"]
    assert vm.guest.dirty_ring == 512 and vm.guest.vcpus == 3
    assert isinstance(vm.vcpus[0], _native.Vcpu)


def test_vm_can_reuse_a_matching_guest():
    config = writer_and_idle(ring=256)
    guest = _native.Guest(PAGES, 4096, 2, 256, False)
    guest.write_page(PAGES - 1, bytes([7]) * 4096)
    vm = VM(config, guest=guest)
    assert vm.guest is guest
    assert vm.memory_view()[PAGES - 1, 0] == 7
    for bad in (
        _native.Guest(PAGES // 2, 4096, 2, 256, False),
        _native.Guest(PAGES, 4096, 3, 256, False),
        _native.Guest(PAGES, 4096, 2, 0),
    ):
        with pytest.raises(ValueError, match="does not match"):
            VM(config, guest=bad)


def test_dirty_rings_reserve_the_pml_buffer_by_default():
    """KVM's kvm_dirty_ring_get_rsvd_entries: a ring is soft-full at size - (64 +
    kvm_cpu_dirty_log_size()), the latter the 512-entry PML buffer on Intel VMX. So a
    4096-entry ring exits DIRTY_RING_FULL after 3520 pages, not 4032."""
    vm = VM(VmConfig(vcpus=1, memory=MEMORY, dirty_ring=4096))
    assert vm.guest.pml and vm.guest.ring_soft_limit == 3520
    assert VM(VmConfig(vcpus=1, memory=MEMORY, dirty_ring=4096, pml=False)).guest.ring_soft_limit == 4032
    assert VM(VmConfig(vcpus=1, memory=MEMORY)).guest.ring_soft_limit == 0, "bitmap mode"
    with pytest.raises(ValueError, match="576 reserved entries"):
        VM(VmConfig(vcpus=1, memory=MEMORY, dirty_ring=512))
    # The soft limit is where the vCPU exits: a sequential writer fills exactly that much.
    g = _native.Guest(PAGES, dirty_ring=1024)
    g.start_dirty_log()
    v = _native.Vcpu(g, 0, ProgramSpec("sequential").to_json())
    assert v.run(5.0).reason == "DIRTY_RING_FULL"
    assert g.ring_len(0) == 1024 - 576


def test_the_supported_vcpu_range_is_checked_first_and_1024_vcpus_run():
    """Adversarial pass, defect 6: 2000 vCPUs were refused by the destination only after
    minutes of starting threads; the limit is now checked before anything starts. Threads
    start held and are released together, so a large VM starts while no vCPU holds the GIL."""
    with pytest.raises(ValueError, match=r"vcpus must be in 1\.\.1024"):
        VM(VmConfig(vcpus=1025, memory=MEMORY))
    vm = VM(VmConfig.with_workload("uniform", vcpus=1024, memory=64 * MiB, writer_rate=100))
    with vm:
        vm.wait_running(120)  # every vCPU thread came back from a run
        assert all(t.is_alive() for t in vm._threads)
        vm.pause()
        assert not vm.running


def test_a_prefill_the_host_cannot_hold_is_refused(monkeypatch):
    """Written pages are backed by RAM: a prefill beyond what the host has is a clear error,
    not a run the OOM killer ends."""
    import dqmig.vm as vm_module

    monkeypatch.setattr(vm_module, "_available_ram", lambda: 8 * MiB)
    with pytest.raises(ValueError, match="prefill 1 writes 16.0 MiB .* only 8.0 MiB available"):
        VM(VmConfig(vcpus=1, memory=16 * MiB, prefill=1.0))
    VM(VmConfig(vcpus=1, memory=16 * MiB, prefill=0.25)).stop()  # 4 MiB fits
