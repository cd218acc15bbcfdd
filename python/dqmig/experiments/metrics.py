"""The numbers experiments report: slowdown, fairness, and summaries over repetitions.

Guest slowdown is measured per vCPU against that vCPU's own pace without migration, so a
compute-bound reader and a rate-limited writer can be compared on one scale:
`retained = pace during migration / pace before`, `slowdown = 1 - retained`.

On a shared host a vCPU thread also loses time to the migration thread, the destination and
other jobs: steal, the wall time it was neither running, nor asleep in a throttle, nor halted
in the guest. The net figures count progress per second that was not stolen, so they show
what the policy took; the raw ones what the guest saw.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class Pace(NamedTuple):
    rate: float  # progress per wall second
    net_rate: float  # progress per second not stolen
    steal: float  # share of the wall time stolen by the host


def pace(progress: int, wall: float, accounted: float) -> Pace:
    """A writer's pace over `wall` seconds, of which `accounted` were its own (CPU, throttle
    sleep, halt); the rest is steal, clamped to [0, wall] against clock granularity."""
    if wall <= 0:
        return Pace(0.0, 0.0, 0.0)
    own = min(max(accounted, 0.0), wall)
    return Pace(progress / wall, progress / own if own > 0 else 0.0, 1 - own / wall)


def jain(xs: Sequence[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n sum x^2): 1 when all are equal, 1/n when one
    takes everything. None for no values or all zero."""
    if not xs:
        return None
    square_sum = sum(x * x for x in xs)
    if square_sum == 0:
        return None
    return sum(xs) ** 2 / (len(xs) * square_sum)


def retained(before: float, during: float) -> float | None:
    """Share of its pace a vCPU kept; None for a vCPU that made no progress before (idle)."""
    return during / before if before > 0 else None


def class_means(vcpus: Iterable[dict[str, Any]], key: str) -> dict[str, float]:
    """Mean of `key` per vCPU class (writer, reader, ...), over the vCPUs that have it."""
    groups: dict[str, list[float]] = {}
    for v in vcpus:
        if v.get(key) is not None:
            groups.setdefault(v["class"], []).append(v[key])
    return {cls: sum(xs) / len(xs) for cls, xs in sorted(groups.items())}


def spread(xs: Sequence[float | None]) -> dict[str, Any]:
    """Median and min-max of the values that exist, and how many exist."""
    vals = [x for x in xs if x is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
