"""Properties of the auto-converge and dirty-limit policies' pure parts (ALGORITHMS.md
sections 2 and 3): the throttle trigger, the throttle percentage steps, the dirty-limit
controller and its per-period measurement."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqmig.policies.autoconverge import PERIOD_S, Trigger, next_percentage
from dqmig.policies.dirtylimit import TOLERANCE_MBPS, DirtyLimiter, adjust_sleep, ring_full_time_us
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)

# -- auto-converge: the percentage ---------------------------------------------------------

pcts = st.integers(1, 99)  # cpu-throttle-initial, -increment and max-cpu-throttle: 1..99 (params.py)


@st.composite
def dirty_over_threshold(draw):
    """(bytes_dirty_period, bytes_dirty_threshold) of a sync that triggered: dirty > thr > 0."""
    thr = draw(st.one_of(st.integers(1, 10**12).map(float), st.floats(1e-3, 1e12)))
    dirty = draw(st.one_of(st.integers(1, 10**12).map(lambda d: thr + d), st.floats(1.0, 1e4).map(lambda r: thr * r)))
    if not dirty > thr:
        dirty = thr * 2
    return dirty, thr


@SETTINGS
@given(
    initial=pcts,
    increment=pcts,
    maximum=pcts,
    tailslow=st.booleans(),
    triggers=st.lists(dirty_over_threshold(), min_size=1, max_size=40),
)
def test_throttle_percentage_sequence(initial, increment, maximum, tailslow, triggers):
    """From 0 (not throttling), a run of triggers: the first sets cpu-throttle-initial, every
    later one adds at most cpu-throttle-increment; the percentage never decreases and stays
    within [1, max-cpu-throttle] (<= 99)."""
    pct, seen = 0, []
    for dirty, thr in triggers:
        new = next_percentage(
            pct,
            initial=initial,
            increment=increment,
            maximum=maximum,
            tailslow=tailslow,
            bytes_dirty_period=dirty,
            bytes_dirty_threshold=thr,
        )
        assert isinstance(new, int)
        assert 1 <= new <= maximum <= 99
        assert new >= pct, f"the throttle went down: {seen + [new]}"
        if pct == 0:
            # cpu-throttle-initial, capped at max-cpu-throttle when it is above (see
            # test_initial_above_max_cpu_throttle).
            assert new == min(initial, maximum)
        elif not tailslow:
            assert new == min(pct + increment, maximum)
        else:
            # tailslow: the step is cut to reach the ideal CPU share, never more than increment.
            cpu_now = 100 - pct
            cpu_ideal = cpu_now * thr / dirty
            assert new - pct <= increment
            assert new - pct <= cpu_now - cpu_ideal + 1e-9
            assert new == min(pct + int(min(cpu_now - cpu_ideal, increment)), maximum)
        seen.append(new)
        pct = new


def test_throttle_percentage_defaults():
    """QEMU's defaults: 20, then +10 per trigger up to 99."""
    kw = dict(initial=20, increment=10, maximum=99, tailslow=False, bytes_dirty_period=2.0, bytes_dirty_threshold=1.0)
    pct, seq = 0, []
    for _ in range(12):
        pct = next_percentage(pct, **kw)
        seq.append(pct)
    assert seq == [20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99, 99]


def test_tailslow_steps_toward_the_ideal():
    """At 50 %, dirtying 1.25 x the threshold: the ideal CPU share is 50 / 1.25 = 40 %, so the
    throttle goes to 60 % (+10); at 4 / 3.9 of the threshold only +1 (50 x (1 - 3.9 / 4) = 1.25)."""
    kw = dict(initial=20, increment=30, maximum=99, tailslow=True)
    assert next_percentage(50, bytes_dirty_period=125.0, bytes_dirty_threshold=100.0, **kw) == 60
    assert next_percentage(50, bytes_dirty_period=4.0, bytes_dirty_threshold=3.9, **kw) == 51
    assert next_percentage(50, bytes_dirty_period=1e6, bytes_dirty_threshold=1.0, **kw) == 80  # capped by increment


def test_initial_above_max_cpu_throttle():
    """dqmig caps even the first step at max-cpu-throttle (QEMU's cpu_throttle_set(initial)
    would not, and its next step MIN(pct + inc, max) would then lower the throttle)."""
    kw = dict(increment=10, maximum=30, tailslow=False, bytes_dirty_period=2.0, bytes_dirty_threshold=1.0)
    assert next_percentage(0, initial=50, **kw) == 30
    assert next_percentage(30, initial=50, **kw) == 30


# -- auto-converge: the trigger --------------------------------------------------------------


class FakeMigration:
    """What Trigger.check reads from a Migration."""

    def __init__(self, page_size: int = 4096) -> None:
        self.new_dirty_pages = 0
        self.page_size = page_size
        self.transferred = 0


syncs = st.lists(
    st.tuples(
        st.one_of(st.floats(0, 0.6), st.floats(0.6, 2.5), st.sampled_from([0.5, 1.0, 1.5, 2.0])),  # s since last sync
        st.integers(0, 50_000),  # pages newly dirtied since the last sync
        st.integers(0, 200_000_000),  # bytes sent since the last sync
    ),
    min_size=1,
    max_size=40,
)


@SETTINGS
@given(threshold=st.integers(1, 100), page_size=st.sampled_from([4096, 2 * MiB]), syncs=syncs, t0=st.floats(0, 1e5))
def test_trigger_fires_on_every_second_hit_at_period_checks(threshold, page_size, syncs, t0):
    """At a dirty sync, the trigger looks at the period only when >= 1 s have passed since the
    period began (the first sync begins it; each check begins a new one). A check is a hit when
    the bytes dirtied in the period exceed threshold % of the bytes sent in it. It fires at
    every second hit, counting hits since it last fired whether or not misses came between
    (QEMU's quirk: a miss does not reset the count), and at nothing else."""
    m = FakeMigration(page_size)
    trig = Trigger(threshold)
    t = t0
    start = None  # the model: period start and the counters there
    dirty0 = xfer0 = hits = 0
    for i, (dt, pages, sent) in enumerate(syncs):
        t += dt
        m.new_dirty_pages += pages
        m.transferred += sent
        fired = trig.check(m, t)
        if start is None:
            start, dirty0, xfer0 = t, m.new_dirty_pages, m.transferred
            assert not fired, "the first sync only begins the period"
            continue
        if t - start < PERIOD_S:
            assert not fired, f"fired {t - start} s into the period"
            continue
        dirty = (m.new_dirty_pages - dirty0) * page_size
        xfer = m.transferred - xfer0
        assert trig.bytes_dirty_period == dirty
        assert trig.bytes_dirty_threshold == pytest.approx(xfer * threshold / 100)
        start, dirty0, xfer0 = t, m.new_dirty_pages, m.transferred
        if dirty > xfer * threshold / 100:
            hits += 1
        assert fired == (hits == 2), f"sync {i}: fired={fired} after {hits} hit(s) since the last firing"
        if fired:
            hits = 0
    # Between two firings there are exactly two hits, however many misses.
    assert trig.high_count == hits


def _sync(trig, m, t, pages, sent):
    m.new_dirty_pages += pages
    m.transferred += sent
    return trig.check(m, t)


def test_trigger_quirk_two_non_consecutive_hits_fire():
    m, trig = FakeMigration(), Trigger(50)
    assert not _sync(trig, m, 0.0, 0, 0)  # begins the period
    assert not _sync(trig, m, 1.0, 1000, 1000)  # hit 1 (4 MB dirtied > 50 % of 1000 B sent)
    assert not _sync(trig, m, 2.0, 0, 10**9)  # a miss: does not reset the count
    assert not _sync(trig, m, 3.0, 0, 10**9)  # another miss
    assert _sync(trig, m, 4.0, 1000, 1000)  # hit 2: fires
    assert trig.high_count == 0
    assert not _sync(trig, m, 5.0, 1000, 1000)  # hit 1 of the next pair
    assert _sync(trig, m, 6.0, 1000, 1000)


def test_trigger_waits_a_full_second_and_keeps_the_period_open():
    m, trig = FakeMigration(), Trigger(50)
    assert not _sync(trig, m, 10.0, 0, 0)
    for t in (10.1, 10.5, 10.999):  # syncs within the second: not checked, period not reset
        assert not _sync(trig, m, t, 10_000, 0)
    assert trig.bytes_dirty_period == 0 and trig.period_start == 10.0
    assert not _sync(trig, m, 11.0, 0, 0)  # >= 1 s: checked, the whole period's 30_000 pages count
    assert trig.bytes_dirty_period == 30_000 * 4096 and trig.high_count == 1
    assert not _sync(trig, m, 11.5, 10_000, 0)
    assert _sync(trig, m, 12.0, 0, 0)  # 1 s after the last check: the second hit


def test_trigger_threshold_is_strict():
    """bytes_dirty_period must exceed (not equal) threshold % of the bytes sent."""
    m, trig = FakeMigration(page_size=100), Trigger(50)
    _sync(trig, m, 0.0, 0, 0)
    for t in (1.0, 2.0, 3.0):
        assert not _sync(trig, m, t, 1, 200)  # 100 B dirtied == 50 % of 200 B
    assert trig.high_count == 0


# -- dirty-limit: the controller ---------------------------------------------------------------

RING = 1024
rates = st.one_of(st.integers(0, 200), st.integers(0, 100_000))  # MB/s, integer-truncated
limits = st.one_of(st.integers(1, 200), st.integers(1, 100_000))  # vcpu-dirty-limit >= 1


@st.composite
def controller_state(draw):
    """(quota, current, sleep_us, ring_full_us) with the ring-full time of a max rate >= current
    and a sleep within its range."""
    quota, current = draw(limits), draw(rates)
    max_rate = max(current, 1) + draw(st.one_of(st.just(0), st.integers(0, 100_000)))
    rf = ring_full_time_us(draw(st.sampled_from([256, 1024, 4096])), 4096, max_rate)
    sleep = draw(st.one_of(st.just(0.0), st.just(99 * rf), st.floats(0, 99 * rf)))
    return quota, current, sleep, rf


@settings(SETTINGS, max_examples=400)
@given(controller_state())
def test_adjust_sleep_properties(state):
    q, c, sleep, rf = state
    new = adjust_sleep(q, c, sleep, rf)
    assert 0 <= new <= 99 * rf
    if abs(q - c) <= TOLERANCE_MBPS:
        assert new == sleep  # within the tolerance: no change (checked first, as in QEMU)
    elif c == 0:
        assert new == 0  # nothing dirtied: no throttle
    elif c > q:
        assert new >= sleep  # too fast: never less sleep ...
        assert new > sleep or new == 99 * rf  # ... and more unless at the cap
    else:
        assert new <= sleep  # too slow: never more sleep ...
        assert new < sleep or new == 0  # ... and less unless at 0


def test_adjust_sleep_steps():
    """ALGORITHMS.md section 3 by example: ring-full time 4000 µs (4 MiB ring at 1000 MB/s)."""
    rf = ring_full_time_us(1024, 4096, 1000)
    assert rf == 4000
    # Far above the quota (|q - c| / c > 50 %): pct = (1000 - 100) * 100 // 1000 = 90 -> +9 x rf.
    assert adjust_sleep(100, 1000, 0.0, rf) == 9 * rf
    # Close (<= 50 %) but outside the tolerance: +- rf / 10.
    assert adjust_sleep(700, 1000, 1000.0, rf) == 1400.0
    assert adjust_sleep(1000, 700, 1000.0, rf) == 600.0
    # Far below: pct = (1000 - 100) * 100 // 1000 = 90 -> -9 x rf, clamped at 0.
    assert adjust_sleep(1000, 100, 10 * rf, rf) == rf
    assert adjust_sleep(1000, 100, rf, rf) == 0.0
    # Clamped at 99 x rf; the tolerance (25 MB/s) leaves the sleep alone.
    assert adjust_sleep(1, 100_000, 98 * rf, rf) == 99 * rf
    assert adjust_sleep(100, 125, 1234.0, rf) == 1234.0
    assert adjust_sleep(100, 0, 1234.0, rf) == 0.0


@SETTINGS
@given(
    entries=st.sampled_from([256, 1024, 2048, 4096, 65536]),
    page=st.sampled_from([4096, 2 * MiB]),
    rates=st.lists(st.integers(1, 10**6), min_size=2, max_size=20, unique=True),
)
def test_ring_full_time_decreases_as_the_max_rate_grows(entries, page, rates):
    rates.sort()
    times = [ring_full_time_us(entries, page, r) for r in rates]
    assert all(a > b for a, b in zip(times, times[1:], strict=False))
    for r, t in zip(rates, times, strict=True):
        assert t == pytest.approx(entries * page / MiB * 1e6 / r)
    assert ring_full_time_us(entries, page, 0) == 0.0  # no rate measured yet


# -- dirty-limit: DirtyLimiter.measure -------------------------------------------------------


@functools.cache
def _vm() -> VM:
    """A guest with a 1024-entry dirty ring per vCPU, never started (measure needs only its
    geometry)."""
    return VM(VmConfig(vcpus=2, memory=16 * MiB, dirty_ring=RING))


def _limiter(limits: list[int | None]) -> DirtyLimiter:
    lim = DirtyLimiter(_vm())
    lim._ensure_running = lambda: None  # no controller thread: the test calls measure itself
    for i, q in enumerate(limits):
        if q is not None:
            lim.set(q, i)
    return lim


periods = st.lists(
    st.tuples(
        st.lists(st.one_of(st.integers(0, 300), st.integers(0, 3_000_000)), min_size=2, max_size=2),  # pages
        st.sampled_from([1.0, 0.1, 0.5, 0.001, 0.0]),  # seconds
    ),
    min_size=1,
    max_size=30,
)


@SETTINGS
@given(limits=st.lists(st.one_of(st.none(), limits), min_size=2, max_size=2), periods=periods)
def test_dirty_limiter_measure(limits, periods):
    """Each period: the rate (MB/s, truncated) from the pages each vCPU pushed to its ring; the
    max rate is a high-water mark (never decreases), so the ring-full time never grows; a
    limited vCPU's sleep follows adjust_sleep with the updated ring-full time and stays within
    [0, 99 x ring-full time]; an unlimited vCPU is never slowed."""
    lim = _limiter(limits)
    page = _vm().guest.page_size
    counts = [0, 0]
    high = [0, 0]
    rf_prev = [float("inf"), float("inf")]
    for pages, seconds in periods:
        last, counts = counts, [c + p for c, p in zip(counts, pages, strict=True)]
        sleep_before = list(lim.sleep_us)
        lim.measure(counts, last, seconds)
        for i in range(2):
            rate = int(pages[i] * page / MiB / seconds) if seconds > 0 else 0
            assert lim.current[i] == rate
            high[i] = max(high[i], rate)
            assert lim.max_rate[i] == high[i] >= rate
            rf = lim.ring_full_us(i)
            assert rf == ring_full_time_us(RING, page, high[i])
            if high[i]:
                assert rf <= rf_prev[i]
                rf_prev[i] = rf
            if limits[i] is None:
                assert lim.sleep_us[i] == 0.0
            else:
                assert lim.sleep_us[i] == adjust_sleep(limits[i], rate, sleep_before[i], rf)
                assert 0 <= lim.sleep_us[i] <= 99 * rf
    assert [q["cpu-index"] for q in lim.query()] == [i for i, q in enumerate(limits) if q is not None]


def test_dirty_limiter_example():
    """vCPU 0 limited to 1 MB/s dirties 1000 MB/s: the first period throttles it hard."""
    lim = _limiter([1, None])
    lim.measure([256_000, 256_000], [0, 0], 1.0)  # 256_000 pages x 4 KiB = 1000 MiB in 1 s
    assert lim.current == [1000, 1000] and lim.max_rate == [1000, 1000]
    rf = ring_full_time_us(RING, 4096, 1000)
    assert lim.ring_full_us(0) == rf == 4000
    assert lim.sleep_us == [99 * rf, 0.0]  # pct = 99 -> +99 x rf, the cap
    lim.measure([256_000, 256_000], [256_000, 256_000], 1.0)  # it stopped: c == 0, within 25 of 1
    assert lim.current == [0, 0] and lim.max_rate == [1000, 1000] and lim.sleep_us == [99 * rf, 0.0]
    lim.cancel()
    assert lim.query() == [] and not lim.limiting


def test_dirty_limiter_needs_the_dirty_ring():
    with pytest.raises(ValueError, match="dirty ring"):
        DirtyLimiter(VM(VmConfig(vcpus=1, memory=16 * MiB)))
