"""The policies behave as QEMU's code does (issue 9): each test names the QEMU function it
follows. Pure logic where possible (an injected clock, a fake migration); where vCPUs must
run, the test thread runs them itself, so the interleaving is fixed by construction."""

from __future__ import annotations

import pytest

from dqmig.policies.dirtylimit import DirtyLimiter
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
    return VM(VmConfig(vcpus=writers, memory=writers * REGION_PAGES * 4096, dirty_ring=RING, programs=programs))


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
