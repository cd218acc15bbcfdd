"""Vcpu.run exits: dirty quota (exact, re-armed, PML-batched), dirty ring full, kick,
time slice and done."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqmig import _native
from dqmig.programs import ProgramSpec

# Exits under test come long before this; it only bounds a run if the exit never comes.
LONG = 10.0
PAGES = 4096
SETTINGS = settings(max_examples=40, deadline=None)

writer_kind = st.sampled_from(["sequential", "uniform"])


def vcpu(kind="sequential", *, pages=PAGES, ring=0, pml_batch=1, log=True, **spec):
    g = _native.Guest(pages, dirty_ring=ring, pml=False)
    if log:
        g.start_dirty_log()
    v = _native.Vcpu(g, 0, ProgramSpec(kind, **spec).to_json(), pml_batch)
    return g, v


@SETTINGS
@given(q=st.integers(1, 1500), kind=writer_kind, seed=st.integers(0, 2**32))
def test_quota_exit_is_exact(q, kind, seed):
    g, v = vcpu(kind, seed=seed)
    v.quota = q
    e = v.run(LONG)
    assert (e.reason, e.count, e.quota) == ("DIRTY_QUOTA_EXHAUSTED", q, q)
    assert v.dirty_count == q, "no page dirtied past the quota"
    assert v.counters()["pages_dirtied"] == q
    assert len(g.harvest()) == q
    # Still exhausted: exits again at once without dirtying anything.
    e = v.run(LONG)
    assert (e.reason, e.count) == ("DIRTY_QUOTA_EXHAUSTED", q)
    assert v.counters()["exits"]["DIRTY_QUOTA_EXHAUSTED"] == 2


@SETTINGS
@given(q=st.integers(1, 400))
def test_sequential_quota_dirties_exactly_the_first_q_pages(q):
    g, v = vcpu("sequential", region_start=100, region_pages=1000)
    v.quota = q
    assert v.run(LONG).reason == "DIRTY_QUOTA_EXHAUSTED"
    assert g.harvest().tolist() == list(range(100, 100 + q))
    assert v.progress == q


@SETTINGS
@given(
    first=st.integers(1, 200),
    grants=st.lists(st.integers(1, 200), min_size=1, max_size=8),
    kind=writer_kind,
    seed=st.integers(0, 1000),
)
def test_rearmed_quota_exits_at_each_new_quota(first, grants, kind, seed):
    _, v = vcpu(kind, seed=seed)
    v.quota = first
    e = v.run(LONG)
    assert (e.reason, e.count, e.quota) == ("DIRTY_QUOTA_EXHAUSTED", first, first)
    for grant in grants:
        v.quota = e.count + grant
        e = v.run(LONG)
        assert e.reason == "DIRTY_QUOTA_EXHAUSTED"
        assert e.count == e.quota == v.quota
        assert v.dirty_count == e.count
    assert v.dirty_count == first + sum(grants)


@SETTINGS
@given(
    q=st.integers(1, 1000),
    batch=st.integers(1, 64),
    kind=writer_kind,
    seed=st.integers(0, 1000),
)
def test_pml_batch_overshoot_is_bounded(q, batch, kind, seed):
    _, v = vcpu(kind, pml_batch=batch, seed=seed)
    v.quota = q
    e = v.run(LONG)
    assert e.reason == "DIRTY_QUOTA_EXHAUSTED"
    assert e.quota == q
    assert q <= e.count <= q + batch - 1
    assert q <= v.dirty_count <= q + batch - 1
    assert e.count <= v.dirty_count


@SETTINGS
@given(
    batch=st.integers(1, 32),
    grants=st.lists(st.integers(1, 100), min_size=1, max_size=6),
)
def test_pml_batch_overshoot_is_bounded_after_rearm(batch, grants):
    _, v = vcpu("uniform", pml_batch=batch, seed=batch)
    count = 0
    for grant in grants:
        v.quota = count + grant
        e = v.run(LONG)
        assert e.reason == "DIRTY_QUOTA_EXHAUSTED"
        assert v.quota <= v.dirty_count <= v.quota + batch - 1
        count = e.count


@SETTINGS
@given(steps=st.integers(1, 3000), kind=writer_kind)
def test_quota_zero_never_exits_for_quota(steps, kind):
    _, v = vcpu(kind, steps=steps)
    v.quota = 0
    e = v.run(LONG)
    assert e.reason == "DONE"
    assert v.progress == steps
    assert v.counters()["exits"]["DIRTY_QUOTA_EXHAUSTED"] == 0


@SETTINGS
@given(steps=st.integers(1, 3000), q=st.integers(1, 10), compute=st.integers(0, 8))
def test_read_only_program_never_exits_for_quota(steps, q, compute):
    g, v = vcpu("read-mostly", steps=steps, params={"write_share": 0.0, "compute": compute})
    v.quota = q
    e = v.run(LONG)
    assert e.reason == "DONE"
    assert v.progress == steps
    assert v.dirty_count == 0
    assert g.dirty_count() == 0


def test_quota_with_logging_off_never_exits():
    # The quota counts write faults, which only happen while dirty logging is on.
    _, v = vcpu("sequential", log=False, steps=5000)
    v.quota = 1
    assert v.run(LONG).reason == "DONE"
    assert v.dirty_count == 0


@settings(max_examples=12, deadline=None)
@given(size=st.sampled_from([256, 512, 1024]), kind=writer_kind, seed=st.integers(0, 100))
def test_ring_full_exit_after_soft_limit(size, kind, seed):
    soft = size - 64
    g, v = vcpu(kind, pages=8192, ring=size, seed=seed)
    e = v.run(LONG)
    assert e.reason == "DIRTY_RING_FULL"
    assert e.count == v.dirty_count == soft
    assert g.ring_len(0) == soft
    # Still full: exits again without dirtying.
    assert v.run(LONG).reason == "DIRTY_RING_FULL"
    assert v.dirty_count == soft
    assert g.reap() == [soft]
    assert g.ring_len(0) == 0
    e = v.run(LONG)
    assert e.reason == "DIRTY_RING_FULL"
    assert v.dirty_count == 2 * soft


def test_quota_exit_comes_before_ring_full():
    g, v = vcpu("sequential", ring=256)
    v.quota = 192
    e = v.run(LONG)
    assert (e.reason, e.count) == ("DIRTY_QUOTA_EXHAUSTED", 192)
    v.quota = 300
    assert v.run(LONG).reason == "DIRTY_RING_FULL"
    g.reap()
    e = v.run(LONG)
    assert (e.reason, e.count) == ("DIRTY_QUOTA_EXHAUSTED", 300)


def test_kick_before_run_returns_kicked():
    _, v = vcpu("uniform")
    v.kick()
    e = v.run(LONG)
    assert e.reason == "KICKED"
    assert v.progress == 0
    # The kick is consumed: the next run goes on until its time slice ends.
    assert v.run(0.01).reason == "TIMESLICE"
    assert v.counters()["exits"]["KICKED"] == 1


@pytest.mark.parametrize("kind", ["idle", "uniform"])
@pytest.mark.parametrize("how", ["kick", "sync"])
def test_kick_stops_a_running_vcpu(kind, how):
    _, v = vcpu(kind)
    result = []
    t = threading.Thread(target=lambda: result.append(v.run(LONG)))
    t.start()
    threading.Event().wait(0.02)
    if how == "kick":
        v.kick()
    else:
        v.sync()  # kicks, then waits until no run is in progress
    t.join(LONG)
    assert not t.is_alive()
    assert result[0].reason == "KICKED"


@pytest.mark.parametrize("kind", ["idle", "uniform", "sequential"])
def test_timeslice(kind):
    _, v = vcpu(kind, log=False)
    e = v.run(0.02)
    assert e.reason == "TIMESLICE"
    c = v.counters()
    assert c["exits"]["TIMESLICE"] == 1
    if kind == "idle":
        assert v.progress == 0
        assert c["halt_ns"] > 0
    else:
        assert v.progress > 0


@SETTINGS
@given(
    steps=st.integers(1, 5000),
    kind=st.sampled_from(["sequential", "uniform", "hot-cold", "read-mostly", "stress"]),
)
def test_steps_run_to_done(steps, kind):
    _, v = vcpu(kind, pages=64, steps=steps)
    e = v.run(LONG)
    assert e.reason == "DONE"
    assert v.progress == steps
    assert v.counters()["progress"] == steps
    assert v.run(LONG).reason == "DONE", "a finished program stays done"
    assert v.progress == steps


@SETTINGS
@given(
    steps=st.integers(1, 2000),
    kind=st.sampled_from(["sequential", "uniform", "hot-cold", "stress"]),
    seed=st.integers(0, 2**32),
    write_size=st.sampled_from([8, 64, 512]),
)
def test_same_program_same_memory(steps, kind, seed, write_size):
    digests = []
    for _ in range(2):
        g, v = vcpu(kind, pages=64, steps=steps, seed=seed, write_size=write_size)
        assert v.run(LONG).reason == "DONE"
        digests.append(g.digest())
    assert digests[0] == digests[1]


@SETTINGS
@given(q=st.integers(1, 60), steps=st.integers(61, 500), seed=st.integers(0, 100))
def test_quota_exits_do_not_change_what_the_program_writes(q, steps, seed):
    """An exit rewinds the step it refused, so the program with quota exits along the way
    ends in the same memory as a straight run."""
    g1, v1 = vcpu("uniform", pages=64, steps=steps, seed=seed)
    assert v1.run(LONG).reason == "DONE"
    g2, v2 = vcpu("uniform", pages=64, steps=steps, seed=seed)
    v2.quota = q
    while (e := v2.run(LONG)).reason != "DONE":
        assert e.reason == "DIRTY_QUOTA_EXHAUSTED"
        g2.harvest()
        v2.quota = e.count + q
    assert v2.progress == steps
    assert g1.digest() == g2.digest()


def test_counters_shape():
    _, v = vcpu("sequential", steps=10, write_size=16)
    assert v.run(LONG).reason == "DONE"
    c = v.counters()
    assert set(c) == {
        "pages_dirtied",
        "bytes_written",
        "progress",
        "run_ns",
        "halt_ns",
        "quota",
        "stress_gib",
        "stress_last_ms_per_gib",
        "exits",
    }
    assert set(c["exits"]) == set(_native.EXIT_REASONS)
    assert c["progress"] == 10 and c["pages_dirtied"] == 10 and c["bytes_written"] == 160
    assert c["exits"]["DONE"] == 1


def test_vcpu_construction_errors():
    g = _native.Guest(16, vcpus=2)
    with pytest.raises(ValueError, match="vcpu index 2"):
        _native.Vcpu(g, 2, ProgramSpec("uniform").to_json())
    with pytest.raises(ValueError, match="bad guest program"):
        _native.Vcpu(g, 0, "{not json")
    with pytest.raises(ValueError, match="bad guest program"):
        _native.Vcpu(g, 0, '{"kind": "teleport"}')
    v = _native.Vcpu(g, 1, ProgramSpec("idle").to_json())
    assert v.index == 1 and not v.is_device
    d = _native.Vcpu.device(g, ProgramSpec("sequential").to_json())
    assert d.index is None and d.is_device
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeslice"):
            v.run(bad)


def test_device_writer_has_own_counter_and_quota_and_no_ring():
    g = _native.Guest(PAGES, vcpus=1, dirty_ring=256, pml=False)
    g.start_dirty_log()
    d = _native.Vcpu.device(g, ProgramSpec("sequential").to_json())
    d.quota = 500  # beyond the vCPU ring's soft limit: a device has no ring to fill
    e = d.run(LONG)
    assert (e.reason, e.count, e.quota) == ("DIRTY_QUOTA_EXHAUSTED", 500, 500)
    assert g.ring_len(0) == 0
    assert g.harvest().tolist() == list(range(500))
