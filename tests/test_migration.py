"""Live migration end to end on loopback: a source VM whose vCPUs (and DMA writer) keep
writing, the pre-copy source, and a destination on a thread of this process.

Invariants: no lost update (the destination's memory equals the source's at switchover,
byte for byte), the guest resumes on the destination, query-migrate and the time series
are sane, and migration is transparent to a deterministic guest.
"""

from __future__ import annotations

import json
import time

import pytest

from dqmig.migration.params import MigrationParameters
from dqmig.migration.source import Migration
from dqmig.programs import ProgramSpec, own_regions
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig

PAGE = 4096
MIGRATE_S = 30.0  # upper bound for a migration in these tests (they take well under 1 s)


def writer_config(
    memory: int = 32 * MiB,
    *,
    rate: float = 20000.0,
    ring: int = 0,
    dma: bool = False,
    steps: int = 0,
    vcpus: int = 2,
    prefill: float = 0.0,
) -> VmConfig:
    """Every vCPU (and the DMA writer) writes its own region, rate-limited so pre-copy
    converges; a mix of program kinds and write sizes, so memory holds zero and non-zero
    pages and partially and fully written pages."""
    pages = memory // PAGE
    regions = own_regions(pages, vcpus + (1 if dma else 0))
    kinds = [("uniform", 8), ("hot-cold", 64), ("sequential", 512), ("uniform", 4096)]

    def spec(i: int, kind: str, write: int, r: float, k: int) -> ProgramSpec:
        start, n = regions[i]
        return ProgramSpec(kind, region_start=start, region_pages=n, write_size=write, rate=r, seed=100 + i, steps=k)

    programs = [spec(i, *kinds[i % len(kinds)], rate, steps) for i in range(vcpus)]
    # The DMA writer copies whole pages at a quarter of the rate (and steps: same duration).
    device = spec(vcpus, "sequential", 4096, rate / 4, steps // 4) if dma else None
    return VmConfig(vcpus=vcpus, memory=memory, dirty_ring=ring, programs=programs, dma=device, prefill=prefill)


def params(*, multifd: bool = False, channels: int = 3, bandwidth: int = 0, downtime: int = 300) -> MigrationParameters:
    p = MigrationParameters()
    p.set("max-bandwidth", bandwidth)
    p.set("downtime-limit", downtime)
    p.set("multifd-channels", channels)
    p.set("x-max-time", MIGRATE_S)  # never loop forever if something regresses
    p.set_capability("multifd", multifd)
    return p


def progress(vm: VM) -> list[int]:
    return [v.progress for v in vm.all_writers]


def assert_progressing(vm: VM, wait_until, what: str) -> None:
    before = progress(vm)
    wait_until(lambda: all(a > b for a, b in zip(progress(vm), before, strict=True)), timeout=10, what=what)


def check_query(q: dict, vm: VM) -> None:
    """query-migrate of a completed migration."""
    g = vm.guest
    assert q["status"] == "completed"
    assert "error-desc" not in q
    for key in ("total-time", "setup-time", "downtime", "ram"):
        assert key in q, key
    assert 0 <= q["setup-time"] <= q["total-time"]
    assert 0 <= q["downtime"] <= q["x-blackout-time"] <= q["total-time"]
    ram = q["ram"]
    for key in (
        "transferred",
        "total",
        "remaining",
        "duplicate",
        "normal",
        "normal-bytes",
        "dirty-pages-rate",
        "mbps",
        "dirty-sync-count",
        "pages-per-second",
        "page-size",
        "precopy-bytes",
        "downtime-bytes",
    ):
        assert key in ram, key
        assert ram[key] >= 0, key
    assert ram["total"] == g.size
    assert ram["page-size"] == g.page_size
    assert ram["remaining"] == 0
    # Every page went at least once, as data or as a zero flag; data costs its bytes.
    assert ram["normal"] + ram["duplicate"] >= g.pages
    assert ram["normal-bytes"] == ram["normal"] * g.page_size
    assert ram["transferred"] >= ram["normal-bytes"] + 8 * (ram["normal"] + ram["duplicate"])
    assert ram["transferred"] >= ram["total"] - ram["duplicate"] * g.page_size
    assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
    assert ram["precopy-bytes"] > 0
    # Setup's sync, at least the final one at switchover.
    assert ram["dirty-sync-count"] >= 2


def check_downtime(m: Migration) -> None:
    """QEMU's downtime runs from stopping the vCPUs (migration_stop_vm) to the end of
    completion on the source (migration_completion_end -> migration_downtime_end): the last
    byte sent. dqmig's digest check and the resume round trip come after it, in
    x-blackout-time, never in downtime."""
    assert m.downtime is not None and m.blackout_time is not None and m.digest_time is not None
    assert m.blackout_time - m.downtime >= m.digest_time, "the source's digest is not downtime"
    assert m.verify_time is not None and m.blackout_time >= m.verify_time


def check_samples(m: Migration, vm: VM) -> None:
    events = [s["event"] for s in m.samples]
    assert events[0] == "setup"
    assert events[-1] == "complete"
    assert "stop" in events and events.index("stop") < len(events) - 1
    assert "sync" in events, events
    writers = len(vm.all_writers)
    last = [0] * writers
    for s in m.samples:
        assert {"t", "status", "threshold", "vcpus"} <= set(s)
        assert len(s["vcpus"]) == writers
        now = [row["progress"] for row in s["vcpus"]]
        assert all(a >= b for a, b in zip(now, last, strict=True)), "per-vCPU progress never goes back"
        last = now
    syncs = [s for s in m.samples if s["event"] == "sync"]
    for s in syncs:
        assert s["status"] == "active"
        for row in s["vcpus"]:
            assert {"progress", "pages-dirtied", "sleep-ns", "progress-rate"} <= set(row)
            assert row["progress"] > 0, "writers ran before the migration"
    assert [s["t"] for s in m.samples] == sorted(s["t"] for s in m.samples)
    report = json.loads(json.dumps(m.report()))
    assert len(report["samples"]) == len(m.samples)
    assert all("_t" not in s for s in report["samples"])
    assert report["result"]["status"] == "completed" and report["converged"] is True


CASES = {
    "bitmap": dict(),
    "multifd": dict(multifd=True),
    "dirty-ring": dict(ring=1024),
    "dirty-ring-multifd": dict(ring=1024, multifd=True),
    "dma": dict(dma=True),
    "dma-multifd": dict(dma=True, multifd=True, ring=1024),
    "bandwidth-cap": dict(bandwidth=256 * MiB, rate=8000.0),
    "prefilled": dict(prefill=0.75),  # memory holds data at boot: sent whole, not as zero pages
}


@pytest.mark.parametrize("case", list(CASES))
def test_end_to_end(case, start_destination, wait_until):
    kw = dict(CASES[case])
    multifd = kw.pop("multifd", False)
    bandwidth = kw.pop("bandwidth", 0)
    config = writer_config(**kw)
    with start_destination() as rx, VM(config) as vm:
        # The writers dirty memory before the migration starts.
        wait_until(lambda: all(progress(vm)), what="every writer to start")
        time.sleep(0.1)
        p = params(multifd=multifd, bandwidth=bandwidth)
        m = Migration(vm, rx.uri, p).start()
        assert m.wait(MIGRATE_S) == "completed", m.error_desc
        rx.join()
        assert rx.error is None, rx.error
        result = rx.result
        assert result is not None and result.vm is not None
        assert result.vm.guest.ring_soft_limit == vm.guest.ring_soft_limit, "the handshake carries PML"

        # No lost update: the destination's memory at resume is the source's at switchover.
        # The source stays stopped once the guest runs on the destination.
        assert not vm.running
        assert not vm.guest.dirty_logging
        src_digest = vm.guest.digest()
        assert result.digest == src_digest
        held = progress(vm)
        time.sleep(0.05)
        assert progress(vm) == held, "the source guest must stay stopped after completion"

        h = result.handshake
        g = vm.guest
        assert (h["pages"], h["page_size"], h["vcpus"], h["dirty_ring"]) == (g.pages, 4096, 2, config.dirty_ring)
        assert h["channels"] == (3 if multifd else 1)
        assert h["capabilities"] == (1 if multifd else 0)

        # What the destination applied is what the source sent.
        assert (result.pages_normal, result.pages_zero, result.bytes) == (m.normal, m.duplicate, m.transferred)
        assert result.iterations == sum(s["event"] == "sync" for s in m.samples)

        # The guest resumed on the destination from where it stopped.
        dst = result.vm
        assert dst.running
        assert (dst.dma is not None) == (config.dma is not None)
        at_resume = [row["progress"] for row in m.samples[-1]["vcpus"]]
        assert all(d >= s for d, s in zip(progress(dst), at_resume, strict=True))
        assert_progressing(dst, wait_until, "the destination guest to run")

        check_query(m.query(), vm)
        check_downtime(m)
        check_samples(m, vm)
        m.cancel()  # a no-op once completed
        assert m.status == "completed"


def test_destination_memory_equals_source_when_the_guest_stops_writing(start_destination, wait_until):
    """Writers that finish (steps) before the switchover: the destination's guest memory,
    read after it resumed, is byte for byte the source's."""
    config = writer_config(16 * MiB, rate=0.0, steps=3000, dma=True)
    with start_destination() as rx, VM(config) as vm:
        wait_until(lambda: all(vm.done), what="the programs to finish")
        m = Migration(vm, rx.uri, params()).start()
        assert m.wait(MIGRATE_S) == "completed", m.error_desc
        rx.join()
        assert rx.result is not None and rx.result.vm is not None
        dst = rx.result.vm
        wait_until(lambda: all(dst.done), what="the destination's programs to report done")
        assert dst.guest.digest() == vm.guest.digest() == rx.result.digest
        for a, b in zip(vm.all_writers, dst.all_writers, strict=True):
            assert a.export_state() == b.export_state()
        view_src, view_dst = vm.memory_view(), dst.memory_view()
        assert (view_src == view_dst).all()


@pytest.mark.parametrize(
    "multifd,dma,ring", [(False, False, 0), (True, True, 1024)], ids=["single", "multifd-dma-ring"]
)
def test_migration_is_transparent(multifd, dma, ring, start_destination, wait_until):
    """A guest run for K steps with a migration in the middle ends in the same memory state
    as the same guest run for K steps without one."""
    steps, rate = 16000, 20000.0  # about 0.8 s of guest time

    def config() -> VmConfig:
        return writer_config(16 * MiB, rate=rate, steps=steps, dma=dma, ring=ring)

    with VM(config()) as ref:
        wait_until(lambda: all(ref.done), what="the reference guest to finish")
        reference = ref.guest.digest()
        assert progress(ref) == [p.steps for p in ref.programs] + ([ref.config.dma.steps] if dma else [])

    with start_destination() as rx, VM(config()) as vm:
        time.sleep(0.1)
        m = Migration(vm, rx.uri, params(multifd=multifd)).start()
        assert m.wait(MIGRATE_S) == "completed", m.error_desc
        rx.join()
        assert rx.result is not None and rx.result.vm is not None
        stop = next(s for s in m.samples if s["event"] == "stop")
        at_switchover = [row["progress"] for row in stop["vcpus"]]
        assert any(p < steps for p in at_switchover), f"the migration ended after the guest: {at_switchover}"
        assert not all(vm.done)
        dst = rx.result.vm
        wait_until(lambda: all(dst.done), what="the migrated guest to finish")
        assert progress(dst) == progress(ref)
        assert dst.guest.digest() == reference


def test_expected_downtime_follows_qemus_rule():
    """QEMU's migration_update_counters: expected_downtime = dirty_bytes_last_sync /
    bandwidth, updated at a window only when the dirty-pages rate is non-zero and more than
    10000 bytes went out in it; query-migrate shows it until the downtime is known."""
    m = Migration(VM(VmConfig(vcpus=1, memory=16 * MiB)), "tcp:127.0.0.1:1")
    m.status, m.t_start = "active", time.monotonic()
    m._dirty_bytes_last_sync = 8 * MiB

    def window(nbytes: int, dirty_rate: float) -> dict:
        m._window_start, m._window_bytes, m.dirty_pages_rate = time.monotonic() - 0.1, nbytes, dirty_rate
        m._tick()
        return m.query()

    assert "expected-downtime" not in window(1 * MiB, 0.0), "no dirty rate yet"
    assert "expected-downtime" not in window(10000, 100.0), "10000 bytes are not enough"
    q = window(1 * MiB, 100.0)
    assert q["expected-downtime"] == pytest.approx(8 * MiB / m.bandwidth * 1000, abs=1)
    assert 600 < q["expected-downtime"] < 820  # 8 MiB at about 10 MiB/s
    m._dirty_bytes_last_sync = 0
    assert window(5000, 100.0)["expected-downtime"] == q["expected-downtime"], "kept when not updated"


def test_avail_switchover_bandwidth_replaces_the_measured_bandwidth():
    """migration_update_counters: with avail-switchover-bandwidth set, expected_bw_per_ms is
    that figure ("trust the user"), in the threshold and the expected downtime; the measured
    bandwidth is still reported (mbps)."""
    params = MigrationParameters(downtime_limit=300)
    params.set("avail-switchover-bandwidth", 100 * MiB)
    m = Migration(VM(VmConfig(vcpus=1, memory=16 * MiB)), "tcp:127.0.0.1:1", params)
    m.status, m.t_start = "active", time.monotonic()
    m._dirty_bytes_last_sync = 50 * MiB
    m._window_start, m._window_bytes, m.dirty_pages_rate = time.monotonic() - 0.1, 1 * MiB, 100.0
    m._tick()
    assert m.bandwidth == pytest.approx(10 * MiB, rel=0.2), "measured: about 1 MiB in 0.1 s"
    assert m.threshold == pytest.approx(100 * MiB * 0.3)
    assert m.query()["expected-downtime"] == 500  # 50 MiB at 100 MiB/s
    m.params.set("avail-switchover-bandwidth", 0)
    m._window_start, m._window_bytes = time.monotonic() - 0.1, 1 * MiB
    m._tick()
    assert m.threshold == pytest.approx(m.bandwidth * 0.3)


def test_lazy_dirty_log_clear_sends_a_page_written_before_its_send_once():
    """QEMU with manual dirty-log protect: a sync leaves the pages it reports write-enabled,
    and migration_clear_memory_region_dirty_bitmap re-protects a chunk (clear-bitmap-shift,
    2^18 pages) just before its first page is sent. A rewrite between the sync and the send
    is no new fault, so the next sync does not report the page again: it goes once. Clearing
    at the sync (x-clear-bitmap-shift=0, dqmig's option) sends it twice."""
    import numpy as np

    def sync_send_sync(shift: int) -> tuple[bool, int]:
        """(the rewrite faulted, pages the second sync found newly dirty)."""
        vm = VM(VmConfig(vcpus=1, memory=16 * MiB))
        p = MigrationParameters()
        p.set("x-clear-bitmap-shift", shift)
        m = Migration(vm, "tcp:127.0.0.1:1", p)
        vm.guest.start_dirty_log()
        assert vm.guest.write_and_mark(5, 1, 0)
        assert m._merge_harvest() == 1
        faulted = vm.guest.write_and_mark(5, 2, 0)  # after the sync, before the send
        assert m._take_dirty(1).tolist() == [5]
        m._protect(np.array([5], dtype=np.uint64))  # what _send does before reading the page
        return faulted, m._merge_harvest()

    assert sync_send_sync(18) == (False, 0), "lazy clear: the page goes once"
    assert sync_send_sync(0) == (True, 1), "clear at the sync: the page is reported and sent again"


def test_one_gib_pages_migrate(start_destination):
    """Adversarial pass, defect 7: a batch of 1 GiB pages overflowed the record's u32 length,
    so `--page-size 1G` always failed. Batches now hold at most what the length describes
    (3 such pages). One written page of 1 GiB goes as data, the other as a zero flag."""
    config = VmConfig(vcpus=1, memory=2 << 30, page_size=1 << 30, programs=[ProgramSpec("sequential", steps=1)])
    with start_destination(io_timeout=30) as rx, VM(config) as vm:
        deadline = time.monotonic() + 10
        while not vm.done[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        m = Migration(vm, rx.uri, params()).start()
        assert m.wait(MIGRATE_S) == "completed", m.error_desc
        rx.join()
        assert rx.error is None, rx.error
        assert (m.normal, m.duplicate) == (1, 1)
        assert rx.result is not None and rx.result.digest == vm.guest.digest()
        rx.result.vm.stop()
