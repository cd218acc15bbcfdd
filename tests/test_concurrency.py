"""No lost update through the Python API: native vCPUs run in Python threads (Vcpu.run
releases the GIL) while another thread harvests the dirty log over and over.

Every page a writer touched must show up in some harvest, and the page contents read right
after a page's last harvest must be its final contents: a write that races a harvest is
either in that harvest's read or marked for a later one."""

from __future__ import annotations

import threading
import time

import pytest

from dqmig import _native
from dqmig.programs import ProgramSpec, own_regions

PAGES = 1024
VCPUS = 3
RUN_FOR_S = 0.3  # writers' deadline
JOIN_S = 20.0  # every join is bounded
TIMESLICE = 0.005


def programs(with_device: bool) -> list[ProgramSpec]:
    """Uniform writers on disjoint regions (the device, if any, gets the last one)."""
    writers = VCPUS + (1 if with_device else 0)
    return [
        ProgramSpec("uniform", region_start=start, region_pages=n, seed=1000 + i, write_size=8 << (i % 3))
        for i, (start, n) in enumerate(own_regions(PAGES, writers))
    ]


def build(guest: _native.Guest, specs: list[ProgramSpec], with_device: bool) -> list[_native.Vcpu]:
    vs = [_native.Vcpu(guest, i, s.to_json()) for i, s in enumerate(specs[:VCPUS])]
    if with_device:
        vs.append(_native.Vcpu.device(guest, specs[VCPUS].to_json()))
    return vs


def join_all(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(JOIN_S)
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads did not finish: {stuck}"


def writer_loop(guest: _native.Guest, v: _native.Vcpu, deadline: float, errors: list) -> None:
    try:
        while time.monotonic() < deadline:
            e = v.run(TIMESLICE)
            if e.reason == "DIRTY_RING_FULL":
                guest.reap()
            elif e.reason not in ("TIMESLICE", "KICKED"):
                raise AssertionError(f"unexpected exit {e!r}")
    except BaseException as exc:  # reported by the test
        errors.append(exc)


class Harvester:
    """Harvests until told to stop, recording each harvested page's digest at harvest time."""

    def __init__(self, guest: _native.Guest) -> None:
        self.guest = guest
        self.last_digest: dict[int, int] = {}
        self.union: set[int] = set()
        self.rounds = 0
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def harvest_once(self) -> list[int]:
        pages = self.guest.harvest().tolist()
        # Read after the harvest cleared the pages' bits, as a migration sends them.
        for p, d in zip(pages, self.guest.page_digests(pages), strict=True):
            self.last_digest[p] = d
        self.union.update(pages)
        self.rounds += 1
        return pages

    def loop(self) -> None:
        try:
            while True:
                self.harvest_once()
                if self.stop.wait(0.001):
                    return
        except BaseException as exc:
            self.errors.append(exc)


def written_pages(guest: _native.Guest) -> set[int]:
    """Memory starts zeroed and the writers never write a whole zero page."""
    return {p for p in range(guest.pages) if not guest.is_zero_page(p)}


@pytest.mark.parametrize("with_device", [False, True], ids=["vcpus", "vcpus+dma"])
@pytest.mark.parametrize("ring", [0, 256], ids=["bitmap", "ring"])
def test_no_lost_update_with_concurrent_harvests(ring, with_device):
    guest = _native.Guest(PAGES, vcpus=VCPUS, dirty_ring=ring, pml=False)
    specs = programs(with_device)
    vs = build(guest, specs, with_device)
    guest.start_dirty_log()
    guest.harvest()  # warm up (the first call sets up numpy) before the threads race

    harvester = Harvester(guest)
    errors: list[BaseException] = []
    deadline = time.monotonic() + RUN_FOR_S
    writers = [
        threading.Thread(target=writer_loop, args=(guest, v, deadline, errors), name=f"w{i}") for i, v in enumerate(vs)
    ]
    h = threading.Thread(target=harvester.loop, name="harvester")
    h.start()
    for t in writers:
        t.start()
    join_all(writers)
    harvester.stop.set()
    join_all([h])
    assert not errors, errors
    assert not harvester.errors, harvester.errors
    concurrent_rounds = harvester.rounds
    harvester.harvest_once()  # the final sync, writers stopped
    assert concurrent_rounds >= 1
    assert guest.dirty_count() == 0

    written = written_pages(guest)
    assert written, "the writers wrote something"
    assert harvester.union == written, "every written page was harvested, and no other"
    lost = {p for p in written if harvester.last_digest[p] != guest.page_digest(p)}
    assert not lost, f"pages whose last write no harvest saw: {sorted(lost)[:10]}"
    for s in specs:
        region = set(range(s.region_start, s.region_start + s.region_pages))
        assert written & region, "each writer wrote in its own region"

    # Independent check: the same programs run straight, for the same number of steps, on a
    # fresh guest (no logging, no concurrency) end in the same memory.
    fresh = _native.Guest(PAGES, vcpus=VCPUS)
    for v, s in zip(vs, specs, strict=True):
        assert v.progress > 0
        s.steps = v.progress
    for r in build(fresh, specs, with_device):
        assert r.run(60.0).reason == "DONE"
    assert written_pages(fresh) == written
    assert fresh.digest() == guest.digest()


@pytest.mark.parametrize("ring", [0, 256], ids=["bitmap", "ring"])
def test_page_written_after_a_harvest_shows_up_in_a_later_one(ring):
    """While a vCPU writes its own region flat out, pages written (by another vCPU or a
    device) after a harvest always appear in a later harvest."""
    guest = _native.Guest(256, vcpus=2, dirty_ring=ring, pml=False)
    busy = _native.Vcpu(guest, 0, ProgramSpec("uniform", region_start=0, region_pages=128).to_json())
    guest.start_dirty_log()
    errors: list[BaseException] = []
    t = threading.Thread(target=writer_loop, args=(guest, busy, time.monotonic() + 0.3, errors))
    t.start()
    try:
        for i in range(50):
            page = 128 + i
            before = guest.harvest().tolist()
            assert page not in before, "not written yet"
            writer = None if i % 3 == 0 else 1
            assert guest.write_and_mark(page, i + 1, writer) is True, "clean after the harvest"
            got = guest.harvest().tolist()
            assert page in got
            assert guest.read_page(page)[:8] == (i + 1).to_bytes(8, "little")
    finally:
        join_all([t])
    assert not errors, errors


@pytest.mark.parametrize("ring", [0, 256], ids=["bitmap", "ring"])
def test_rewritten_pages_are_harvested_again(ring):
    """A vCPU that rewrites pages it already dirtied, after they were harvested, dirties them
    again (quota exits split the run so harvests fall between the writes)."""
    guest = _native.Guest(64, vcpus=1, dirty_ring=ring, pml=False)
    v = _native.Vcpu(guest, 0, ProgramSpec("sequential", region_start=8, region_pages=16).to_json())
    guest.start_dirty_log()
    count = 0
    for _ in range(5):
        v.quota = count + 16
        e = v.run(10.0)
        assert e.reason == "DIRTY_QUOTA_EXHAUSTED"
        count = e.count
        assert guest.harvest().tolist() == list(range(8, 24))
    assert v.progress == 80
