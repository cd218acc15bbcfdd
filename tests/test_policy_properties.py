"""Properties of the auto-converge and dirty-limit policies' pure parts (ALGORITHMS.md
sections 2 and 3): the throttle trigger, the throttle percentage steps, the dirty-limit
controller and its per-period measurement."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqmig.policies.autoconverge import PERIOD_S, Trigger, next_percentage
from dqmig.policies.dirtylimit import (
    TOLERANCE_MBPS,
    DirtyLimiter,
    adjust_sleep,
    ring_full_time_us,
    within_tolerance,
)
from dqmig.units import MiB
from dqmig.vm import VM, VmConfig

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)

# -- auto-converge: the percentage ---------------------------------------------------------

pcts = st.integers(1, 99)  # cpu-throttle-initial, -increment and max-cpu-throttle: 1..99 (params.py)


@st.composite
def dirty_over_threshold(draw):
    """(bytes_dirty_period, bytes_dirty_threshold) of a sync that triggered: integer bytes,
    as QEMU's uint64_t, dirty > threshold >= 0."""
    thr = draw(st.one_of(st.integers(0, 10**12), st.integers(0, 1000)))
    dirty = thr + draw(st.one_of(st.integers(1, 10**12), st.integers(1, 10), st.integers(1, max(1, thr))))
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
    """mig_throttle_guest_down then cpu_throttle_set, from 0 (not throttling): the first
    trigger sets cpu-throttle-initial, which max-cpu-throttle does not cap; every later one
    adds the increment (tailslow: at most the step to the ideal CPU share, cpu_ideal
    truncated to an integer, so the step is never 0) and is capped at max-cpu-throttle; the
    result is clamped to [1, 99]. So the throttle rises by >= 1 per trigger until the cap,
    and only a first step above the cap is ever undone."""
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
        assert 1 <= new <= 99
        if pct == 0:
            assert new == initial
        else:
            inc = increment
            if tailslow:
                cpu_now = 100 - pct
                cpu_ideal = int(cpu_now * (thr / dirty))
                inc = min(cpu_now - cpu_ideal, increment)
                assert inc >= 1, "the step rounds up, never 0"
            assert new == min(pct + inc, maximum)
            if pct < maximum:
                assert new > pct, f"the throttle did not rise: {seen + [new]}"
            assert new <= max(pct, maximum), f"above the cap: {seen + [new]}"
        seen.append(new)
        pct = new


def test_throttle_percentage_defaults():
    """QEMU's defaults: 20, then +10 per trigger up to 99."""
    kw = dict(initial=20, increment=10, maximum=99, tailslow=False, bytes_dirty_period=2, bytes_dirty_threshold=1)
    pct, seq = 0, []
    for _ in range(12):
        pct = next_percentage(pct, **kw)
        seq.append(pct)
    assert seq == [20, 30, 40, 50, 60, 70, 80, 90, 99, 99, 99, 99]


def test_tailslow_steps_toward_the_ideal_rounding_up():
    """mig_throttle_guest_down with cpu-throttle-tailslow: at 50 %, dirtying 1.25 x the
    threshold, the ideal CPU share is 50 / 1.25 = 40 %, so +10; at 4 / 3.9 of it the ideal
    share 48.75 % is truncated to 48 (cpu_ideal is a uint64_t), so +2, not +1."""
    kw = dict(initial=20, increment=30, maximum=99, tailslow=True)
    assert next_percentage(50, bytes_dirty_period=125, bytes_dirty_threshold=100, **kw) == 60
    assert next_percentage(50, bytes_dirty_period=40, bytes_dirty_threshold=39, **kw) == 52
    assert next_percentage(50, bytes_dirty_period=10**6, bytes_dirty_threshold=1, **kw) == 80  # capped by increment
    # A hair over the threshold: the truncation still makes a step of 1, never 0.
    assert next_percentage(50, bytes_dirty_period=10**9 + 1, bytes_dirty_threshold=10**9, **kw) == 51


def test_initial_is_not_capped_by_max_cpu_throttle():
    """mig_throttle_guest_down: the first trigger is cpu_throttle_set(cpu-throttle-initial),
    not capped by max-cpu-throttle; the next is MIN(pct + increment, max), which lowers it."""
    kw = dict(increment=10, maximum=30, tailslow=False, bytes_dirty_period=2, bytes_dirty_threshold=1)
    assert next_percentage(0, initial=50, **kw) == 50
    assert next_percentage(50, initial=50, **kw) == 30
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
    """migration_bitmap_sync / migration_trigger_throttle: the period begins at the setup
    sync (Trigger.start), so the very next sync (sync 2, the end of the bulk pass) may be
    checked. At a dirty sync the trigger looks at the period only when more than 1 s has
    passed since it began (each check begins a new one). A check is a hit when the bytes
    dirtied in the period exceed threshold % of the bytes sent in it (integer bytes). It
    fires at every second hit, counting hits since it last fired whether or not misses came
    between (QEMU's quirk: a miss does not reset the count), and at nothing else."""
    m = FakeMigration(page_size)
    trig = Trigger(threshold)
    t = t0
    trig.start(m, t)  # the setup sync: counters at 0
    start, dirty0, xfer0, hits = t, 0, 0, 0  # the model
    for i, (dt, pages, sent) in enumerate(syncs):
        t += dt
        m.new_dirty_pages += pages
        m.transferred += sent
        fired = trig.check(m, t)
        if t - start <= PERIOD_S:
            assert not fired, f"fired {t - start} s into the period"
            continue
        dirty = (m.new_dirty_pages - dirty0) * page_size
        xfer = m.transferred - xfer0
        assert trig.bytes_dirty_period == dirty
        assert trig.bytes_dirty_threshold == xfer * threshold // 100
        start, dirty0, xfer0 = t, m.new_dirty_pages, m.transferred
        if dirty > xfer * threshold // 100:
            hits += 1
        assert fired == (hits == 2), f"sync {i + 2}: fired={fired} after {hits} hit(s) since the last firing"
        if fired:
            hits = 0
    # Between two firings there are exactly two hits, however many misses.
    assert trig.high_count == hits


def _sync(trig, m, t, pages, sent):
    m.new_dirty_pages += pages
    m.transferred += sent
    return trig.check(m, t)


def _started(t: float = 0.0, page_size: int = 4096) -> tuple[FakeMigration, Trigger]:
    m, trig = FakeMigration(page_size), Trigger(50)
    trig.start(m, t)
    return m, trig


def test_trigger_quirk_two_non_consecutive_hits_fire():
    m, trig = _started(0.0)
    assert not _sync(trig, m, 1.5, 1000, 1000)  # sync 2: hit 1 (4 MB dirtied > 50 % of 1000 B sent)
    assert not _sync(trig, m, 3.0, 0, 10**9)  # a miss: does not reset the count
    assert not _sync(trig, m, 4.5, 0, 10**9)  # another miss
    assert _sync(trig, m, 6.0, 1000, 1000)  # hit 2: fires
    assert trig.high_count == 0
    assert not _sync(trig, m, 7.5, 1000, 1000)  # hit 1 of the next pair
    assert _sync(trig, m, 9.0, 1000, 1000)


def test_trigger_waits_over_a_second_and_keeps_the_period_open():
    """migration_bitmap_sync checks only when end_time > time_last_bitmap_sync + 1000 ms."""
    m, trig = _started(10.0)
    for t in (10.1, 10.5, 11.0):  # syncs within the second (1 s is not more): not checked
        assert not _sync(trig, m, t, 10_000, 0)
    assert trig.bytes_dirty_period == 0 and trig.period_start == 10.0
    assert not _sync(trig, m, 11.001, 0, 0)  # > 1 s: checked, the whole period's 30_000 pages count
    assert trig.bytes_dirty_period == 30_000 * 4096 and trig.high_count == 1
    assert not _sync(trig, m, 11.5, 10_000, 0)
    assert _sync(trig, m, 12.01, 0, 0)  # > 1 s after the last check: the second hit


def test_trigger_threshold_is_strict():
    """bytes_dirty_period must exceed (not equal) threshold % of the bytes sent."""
    m, trig = _started(0.0, page_size=100)
    for t in (1.5, 3.0, 4.5):
        assert not _sync(trig, m, t, 1, 200)  # 100 B dirtied == 50 % of 200 B
    assert trig.high_count == 0


def test_trigger_must_start_at_the_setup_sync():
    with pytest.raises(RuntimeError, match="setup sync"):
        Trigger(50).check(FakeMigration(), 1.0)


# -- dirty-limit: the controller ---------------------------------------------------------------

RING = 1024
rates = st.one_of(st.integers(0, 200), st.integers(0, 100_000))  # MB/s, integer-truncated
limits = st.one_of(st.integers(1, 200), st.integers(1, 100_000))  # vcpu-dirty-limit >= 1


@st.composite
def controller_state(draw):
    """(quota, current, sleep_us, ring_full_us) outside the tolerance, with the ring-full time
    of a max rate >= current and a sleep within its range."""
    quota, current = draw(limits), draw(rates)
    if within_tolerance(quota, current):
        current = quota + TOLERANCE_MBPS + draw(st.integers(1, 1000))
    max_rate = max(current, 1) + draw(st.one_of(st.just(0), st.integers(0, 100_000)))
    rf = ring_full_time_us(draw(st.sampled_from([256, 1024, 4096])), 4096, max_rate)
    sleep = draw(st.one_of(st.just(0), st.just(99 * rf), st.integers(0, 99 * rf)))
    return quota, current, sleep, rf


@settings(SETTINGS, max_examples=400)
@given(controller_state())
def test_adjust_sleep_properties(state):
    """dirtylimit_set_throttle: integer µs within [0, 99 x ring-full]; off when nothing was
    dirtied; more sleep when too fast, less when too slow, unless at a bound."""
    q, c, sleep, rf = state
    new = adjust_sleep(q, c, sleep, rf)
    assert isinstance(new, int)
    assert 0 <= new <= 99 * rf
    if c == 0:
        assert new == 0  # nothing dirtied: no throttle
    elif c > q:
        assert new >= sleep  # too fast: never less sleep ...
        assert new > sleep or new == 99 * rf or rf < 10  # ... and more unless at the cap
    else:
        assert new <= sleep  # too slow: never more sleep ...
        assert new < sleep or new == 0 or rf < 10  # ... and less unless at 0


def test_adjust_sleep_steps():
    """dirtylimit_set_throttle by example: ring-full time 4000 µs (a 4 MiB ring at 1000 MB/s)."""
    rf = ring_full_time_us(1024, 4096, 1000)
    assert rf == 4000
    # Far above the quota (|q - c| / c > 50 %): pct = (1000 - 100) * 100 // 1000 = 90 -> +9 x rf.
    assert adjust_sleep(100, 1000, 0, rf) == 9 * rf
    # Close (<= 50 %): +- rf / 10.
    assert adjust_sleep(700, 1000, 1000, rf) == 1400
    assert adjust_sleep(1000, 700, 1000, rf) == 600
    # Far below: pct = (1000 - 100) * 100 // 1000 = 90 -> -9 x rf, clamped at 0.
    assert adjust_sleep(1000, 100, 10 * rf, rf) == rf
    assert adjust_sleep(1000, 100, rf, rf) == 0
    # Clamped at 99 x rf; nothing dirtied: no sleep.
    assert adjust_sleep(1, 100_000, 98 * rf, rf) == 99 * rf
    assert adjust_sleep(100, 0, 1234, rf) == 0
    # Truncated µs: pct = (300 - 1) * 100 // 300 = 99 -> 7 x 99 / 1 = 693; 7 // 10 = 0.
    assert adjust_sleep(1, 300, 0, 7) == 693
    assert adjust_sleep(200, 300, 5, 7) == 5


def test_linear_adjustment_test_uses_integer_division():
    """dirtylimit_need_linear_adjustment: (max - min) * 100 / max > 50 in uint64_t. A gap of
    50.5 % of the larger rate truncates to 50: the fixed rf / 10 step, not the linear one."""
    rf = 10_000
    # 505 / 1000 = 50.5 %: integer 50, not > 50 -> + rf / 10.
    assert adjust_sleep(495, 1000, 0, rf) == rf // 10
    # 510 / 1000 = 51 %: linear, pct = 51 -> rf x 51 / 49, truncated.
    assert adjust_sleep(490, 1000, 0, rf) == int(rf * 51 / 49)
    # Too slow by 50.5 %: - rf / 10 rather than the linear step.
    assert adjust_sleep(1000, 495, 5 * rf, rf) == 5 * rf - rf // 10


def test_within_tolerance():
    """dirtylimit_done: |quota - current| <= 25 MB/s."""
    assert within_tolerance(100, 125) and within_tolerance(125, 100) and within_tolerance(1, 0)
    assert not within_tolerance(100, 126) and not within_tolerance(27, 1)


@SETTINGS
@given(
    entries=st.sampled_from([256, 1024, 2048, 4096, 65536]),
    page=st.sampled_from([4096, 2 * MiB]),
    rates=st.lists(st.integers(1, 10**6), min_size=2, max_size=20, unique=True),
)
def test_ring_full_time_falls_as_the_max_rate_grows(entries, page, rates):
    """dirtylimit_dirty_ring_full_time: ring size in whole MiB x 1e6 / max rate, integer µs."""
    rates.sort()
    times = [ring_full_time_us(entries, page, r) for r in rates]
    assert all(a >= b for a, b in zip(times, times[1:], strict=False))
    for r, t in zip(rates, times, strict=True):
        assert t == entries * page // MiB * 1_000_000 // r
    assert ring_full_time_us(entries, page, 0) == 0  # no rate measured yet


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
    """vcpu_dirty_rate_stat_collect then dirtylimit_process: each period, the rate (MB/s,
    truncated) from the pages each vCPU pushed to its ring. One high-water rate for the whole
    VM (QEMU's static max_dirtyrate), raised only by a limited vCPU outside the tolerance
    that dirtied something, in vCPU order; that vCPU's sleep follows adjust_sleep with the
    ring-full time at the raised mark. Within the tolerance the sleep stays; an unlimited
    vCPU is never slowed and never moves the mark."""
    lim = _limiter(limits)
    page = _vm().guest.page_size
    counts = [0, 0]
    high = 0
    for pages, seconds in periods:
        last, counts = counts, [c + p for c, p in zip(counts, pages, strict=True)]
        sleep_before = list(lim.sleep_us)
        lim.measure(counts, last, seconds)
        expected_sleep = list(sleep_before)
        for i in range(2):
            rate = int(pages[i] * page / MiB / seconds) if seconds > 0 else 0
            assert lim.current[i] == rate
            q = limits[i]
            if q is None or within_tolerance(q, rate):
                continue
            if rate == 0:
                expected_sleep[i] = 0
                continue
            high = max(high, rate)
            expected_sleep[i] = adjust_sleep(q, rate, sleep_before[i], ring_full_time_us(RING, page, high))
        assert lim.max_rate == high
        assert lim.sleep_us == expected_sleep
        assert all(lim.sleep_us[i] == 0 for i in range(2) if limits[i] is None)
    assert [q["cpu-index"] for q in lim.query()] == [i for i, q in enumerate(limits) if q is not None]


def test_dirty_limiter_example():
    """vCPU 0 limited to 1 MB/s dirties 1000 MB/s: the first period throttles it hard; the
    unlimited vCPU 1's 3000 MB/s does not move the high-water rate."""
    lim = _limiter([1, None])
    lim.measure([256_000, 768_000], [0, 0], 1.0)  # 256_000 pages x 4 KiB = 1000 MiB in 1 s
    assert lim.current == [1000, 3000] and lim.max_rate == 1000
    rf = ring_full_time_us(RING, 4096, 1000)
    assert rf == 4000
    assert lim.sleep_us == [99 * rf, 0]  # pct = 99 -> +99 x rf, the cap
    lim.measure([256_000, 768_000], [256_000, 768_000], 1.0)  # it stopped: c == 0, within 25 of 1
    assert lim.current == [0, 0] and lim.max_rate == 1000 and lim.sleep_us == [99 * rf, 0]
    lim.cancel()
    assert lim.query() == [] and not lim.limiting


def test_high_water_rate_is_shared_and_moves_only_outside_the_tolerance():
    """dirtylimit_dirty_ring_full_time keeps one static max_dirtyrate for every vCPU, and
    dirtylimit_adjust_throttle calls it only when !dirtylimit_done: a vCPU within 25 MB/s of
    its limit never raises it, and a slower vCPU's sleep uses the faster one's mark."""
    lim = _limiter([100, 100])
    lim.measure([30_000, 0], [0, 0], 1.0)  # 117 MB/s: within the tolerance of 100
    assert lim.current == [117, 0] and lim.max_rate == 0, "within the tolerance: no update"
    lim.measure([30_000 + 256_000, 51_200], [30_000, 0], 1.0)  # 1000 MB/s and 200 MB/s
    assert lim.current == [1000, 200] and lim.max_rate == 1000
    rf = ring_full_time_us(RING, 4096, 1000)
    assert lim.sleep_us == [adjust_sleep(100, 1000, 0, rf), adjust_sleep(100, 200, 0, rf)]
    assert lim.ring_full_time(0) == rf, "the mark never decreases"


def test_ring_full_time_telemetry_is_at_the_mean_rate_and_feeds_the_mark():
    """dirtylimit_ring_full_time (query-migrate's dirty-limit-ring-full-time): ring size over
    the mean current rate of the running vCPUs, through dirtylimit_dirty_ring_full_time, so
    the mean also raises the high-water rate; 0 when nothing runs or dirties."""
    lim = _limiter([1, 1])
    lim.current = [600, 200]
    assert lim.average_ring_full_time([]) == 0
    assert lim.average_ring_full_time([0, 1]) == ring_full_time_us(RING, 4096, 400)
    assert lim.max_rate == 400
    assert lim.average_ring_full_time([1]) == ring_full_time_us(RING, 4096, 400), "the mark stays at 400"
    lim.current = [0, 0]
    assert lim.average_ring_full_time([0, 1]) == 0
    lim.sleep_us = [7, 3]
    assert lim.throttle_time_per_round() == 7


def test_dirty_limiter_needs_the_dirty_ring():
    with pytest.raises(ValueError, match="dirty ring"):
        DirtyLimiter(VM(VmConfig(vcpus=1, memory=16 * MiB)))
