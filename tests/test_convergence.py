"""Telling a migration that cannot converge: no new low in the bytes left after a dirty sync
for STALL_ITERATIONS iterations and STALL_S seconds, and a hint naming what would help."""

from __future__ import annotations

import pytest

from dqmig.migration.convergence import STALL_ITERATIONS, STALL_S, Stall, hint, since_lowest, stalled
from dqmig.migration.params import MigrationParameters
from dqmig.units import MiB


def syncs(*left_mib: float, every: float = 5.0) -> list[tuple[float, int]]:
    return [(i * every, int(m * MiB)) for i, m in enumerate(left_mib)]


def test_a_shrinking_migration_is_not_stalled():
    assert not stalled(syncs(60, 50, 40, 30, 20, 10, 5))
    assert not stalled([])


def test_a_plateau_is_stalled_after_enough_iterations_and_time():
    flat = syncs(30, 31, 30.5, 32, every=STALL_S / STALL_ITERATIONS)
    assert len(flat) - 1 == STALL_ITERATIONS
    assert stalled(flat)
    assert not stalled(flat[:-1]), "one iteration short"


def test_fast_iterations_need_the_time_too():
    # A throttle ramping up holds the bytes left for a few fast iterations: no stall yet.
    ramp = syncs(23, 23, 24, 23, 23, 23, 23, every=0.5)
    assert not stalled(ramp)
    assert stalled(ramp, seconds=2.0)


def test_only_a_new_low_resets_it():
    # Noise around a level is no progress; a new low is.
    assert stalled(syncs(40, 30, 35, 31, 33, 30))
    assert not stalled(syncs(40, 30, 35, 31, 33, 29))


def test_since_lowest_counts_from_the_first_time_it_was_that_low():
    s = since_lowest(syncs(40, 30, 35, 30, 33))
    assert s == Stall(lowest=30 * MiB, iterations=3, seconds=15.0)


def test_iterations_must_be_positive():
    with pytest.raises(ValueError):
        stalled(syncs(1, 2), iterations=0)


STALL = Stall(lowest=32 * MiB, iterations=4, seconds=20.0)


def params(**overrides) -> dict:
    return MigrationParameters(**overrides).as_qmp()


def test_the_hint_says_how_far_off_switchover_is():
    text = hint("none", params(), STALL, threshold=9.6 * MiB)
    assert text.startswith("not converging: no dirty sync has left less than 32.0 MiB for 4 iterations (20 s)")
    assert "switchover needs <= 9.6 MiB (bandwidth x downtime-limit)" in text
    assert "a throttling policy" in text
    assert "a higher max-bandwidth (now 128.0 MiB/s)" in text and "a higher downtime-limit (now 300 ms)" in text


def test_unlimited_bandwidth_is_not_suggested():
    assert "max-bandwidth" not in hint("none", params(max_bandwidth=0), STALL, threshold=MiB)


@pytest.mark.parametrize(
    ("policy", "overrides", "expected", "absent"),
    [
        ("auto-converge", {}, "a higher cpu-throttle-increment (now 10) or cpu-throttle-initial (now 20)", "vcpu"),
        ("auto-converge", {"max_cpu_throttle": 80}, "a higher max-cpu-throttle (now 80)", "dirty-quota"),
        ("dirty-limit", {"vcpu_dirty_limit": 10}, "a lower vcpu-dirty-limit (now 10 MB/s)", "cpu-throttle"),
        ("dirty-limit", {}, "within 25 MB/s of vcpu-dirty-limit unslowed (now: under 26 MB/s)", "lower vcpu"),
        ("dirty-quota", {"x_dirty_quota_ratio": 2.0}, "a higher x-dirty-quota-ratio (now 2;", "throttling policy"),
    ],
)
def test_the_hint_names_the_policys_parameters(policy, overrides, expected, absent):
    text = hint(policy, params(**overrides), STALL, threshold=MiB)
    assert expected in text
    assert absent not in text


def test_a_throttle_at_its_maximum_is_not_told_to_rise():
    text = hint("auto-converge", params(), STALL, threshold=MiB, throttle=99)
    assert "cpu-throttle-increment" not in text and "max-cpu-throttle" not in text
    assert "max-bandwidth" in text


def test_the_hint_points_at_an_unthrottled_dma_writer():
    off = params(x_dirty_quota_dma=False)
    assert "x-dirty-quota-dma=on" in hint("dirty-quota", off, STALL, threshold=1, has_dma=True)
    assert "x-dirty-quota-dma" not in hint("dirty-quota", params(), STALL, threshold=1, has_dma=True)
    dl = hint("dirty-limit", params(), STALL, threshold=1, has_dma=True)
    assert "dirty-limit does not throttle the DMA writer" in dl
    assert "DMA" not in hint("dirty-limit", params(), STALL, threshold=1)
