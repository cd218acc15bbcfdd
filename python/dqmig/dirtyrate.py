"""QEMU's `calc-dirty-rate` in its three modes, on a running VM.

* page-sampling: hash 512 random pages per GiB, wait, hash again; the share that changed
  scales to the whole guest. Needs no dirty logging, and misses pages rewritten with the
  same bytes and repeated writes to one page. As QEMU (skip_sample_ramblock), a RAM block
  under 128 MiB is not sampled: a smaller guest gets rate 0 and a note saying so.
* dirty-bitmap: clear the dirty log, wait, count the dirty pages. Refused with the dirty ring
  on (as QEMU refuses it), and while a migration owns the dirty log: counting would take
  the migration's pages.
* dirty-ring: per-vCPU pages pushed to each dirty ring over the period (ring mode only),
  reaped once a second as QEMU's reaper thread does.
All rates are in MB/s (MiB/s, as QEMU's dirty-rate), integer-truncated like QEMU's.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from dqmig.units import GiB, MiB
from dqmig.vm import VM

SAMPLE_PAGES_PER_GIB = 512
MIN_RAMBLOCK_SIZE = 128 * MiB  # QEMU's dirtyrate.c: smaller RAM blocks are skipped
REAP_PERIOD_S = 1.0  # kvm_dirty_ring_reaper_thread: one reap a second


class Unavailable(ValueError):
    """A mode QEMU refuses for this guest; the message says why."""


@dataclass
class DirtyRate:
    mode: str
    calc_time: float
    dirty_rate: int  # MB/s for the whole VM
    vcpu_dirty_rate: list[int] = field(default_factory=list)  # dirty-ring mode only
    sampled_pages: int = 0  # page-sampling mode only
    note: str = ""  # why nothing was measured, when that is so


def page_sampling(
    vm: VM,
    calc_time: float = 1.0,
    seed: int = 0,
    pages_per_gib: int = SAMPLE_PAGES_PER_GIB,
    min_block: int = MIN_RAMBLOCK_SIZE,
) -> DirtyRate:
    g = vm.guest
    if g.size < min_block:
        note = f"not sampled: QEMU skips RAM blocks under {min_block // MiB} MiB (the guest has {g.size // MiB})"
        return DirtyRate("page-sampling", calc_time, 0, note=note)
    want = max(1, round(g.size / GiB * pages_per_gib))
    sample = sorted(random.Random(seed).sample(range(g.pages), min(want, g.pages)))
    before = g.page_digests(sample)
    time.sleep(calc_time)
    after = g.page_digests(sample)
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    rate = changed / len(sample) * g.size / MiB / calc_time
    return DirtyRate("page-sampling", calc_time, int(rate), sampled_pages=len(sample))


def _with_log(vm: VM, measure):  # runs `measure` with dirty logging on, restoring the state
    started = not vm.guest.dirty_logging
    if started:
        vm.start_dirty_log()
    try:
        return measure()
    finally:
        if started:
            vm.stop_dirty_log()


def dirty_bitmap(vm: VM, calc_time: float = 1.0) -> DirtyRate:
    if vm.guest.dirty_ring:
        raise Unavailable("dirty-bitmap mode is refused with the dirty ring on, as in QEMU: use dirty-ring")
    if vm.guest.dirty_logging:
        raise Unavailable("dirty-bitmap mode is refused while a migration owns the dirty log")

    def measure() -> DirtyRate:
        vm.guest.harvest()
        time.sleep(calc_time)
        pages = len(vm.guest.harvest())
        return DirtyRate("dirty-bitmap", calc_time, int(pages * vm.guest.page_size / MiB / calc_time))

    return _with_log(vm, measure)


def dirty_ring(vm: VM, calc_time: float = 1.0) -> DirtyRate:
    if not vm.guest.dirty_ring:
        raise Unavailable("dirty-ring mode needs the dirty ring (--dirty-ring ENTRIES)")
    ours = not vm.guest.dirty_logging  # else a migration's log: its pages are not ours to clear

    def measure() -> DirtyRate:
        if ours:
            vm.guest.harvest()  # start from clean pages
        before = [v.dirty_count for v in vm.vcpus]
        end = time.monotonic() + calc_time
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(REAP_PERIOD_S, left))
            vm.guest.reap()  # re-protect so rewritten pages count again, as KVM's reaper
        pages = [v.dirty_count - b for v, b in zip(vm.vcpus, before, strict=True)]
        per_vcpu = [int(p * vm.guest.page_size / MiB / calc_time) for p in pages]
        total = int(sum(pages) * vm.guest.page_size / MiB / calc_time)
        return DirtyRate("dirty-ring", calc_time, total, vcpu_dirty_rate=per_vcpu)

    return _with_log(vm, measure)


MODES = {"page-sampling": page_sampling, "dirty-bitmap": dirty_bitmap, "dirty-ring": dirty_ring}
