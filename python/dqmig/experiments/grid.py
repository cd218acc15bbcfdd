"""Grid sweeps: two or three parameters at once, and where each policy wins.

`--grid dirty-rate=0.5,1,2 --grid max-bandwidth=100Mbit,1Gbit` runs every cell of the
product (each cell x policy x repetition one run, on a cluster as any sweep). An axis is a
named sweep (`dqmig sweep --help` lists them), the field a named sweep changes (so
`max-bandwidth` is the bandwidth sweep) or any migration parameter by QEMU's name.

Axes that are defined relative to others apply last, whatever order they are given in:
dirty-rate is a multiple of the cell's max-bandwidth, and skew splits the cell's dirty rate.

The document is a sweep's (`doc["sweep"]`, one point per cell, so tables, journal and resume
are the sweep's) with `grid` (the axes) and `cells` (each point's value indices) added.
`phases` says, per cell, which policy converged fastest and which kept the read-mostly
vCPUs' pace best: a policy counts as converged in a cell when most of its runs there did.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dqmig.experiments import results, sweep
from dqmig.experiments.scenario import Scenario, ScenarioError

MIN_AXES, MAX_AXES = 2, 3
MAX_RUNS = 100_000  # cells x policies x repetitions: beyond this a typo, not a sweep
STAGE = {"dirty-rate": 1, "skew": 2}  # relative axes, applied after the ones they depend on
TIES = {"total-time": (0.01, 0.0), "slowdown-reader": (0.0, 0.01)}  # (relative, absolute): 1 %, 1 point


@dataclass(frozen=True)
class Axis:
    name: str  # as the user wrote it (max-bandwidth, not the bandwidth sweep's name)
    sweep: sweep.Sweep
    labels: tuple[str, ...]  # the values as given
    values: tuple[Any, ...]  # parsed


def lookup(name: str) -> sweep.Sweep:
    """A grid axis by name: a named sweep, the field one changes, or a migration parameter."""
    if name in sweep.SWEEPS:
        return sweep.SWEEPS[name]
    by_field = [s for s in sweep.SWEEPS.values() if s.field == name and not s.field.startswith("guest.")]
    if by_field:
        return by_field[0]
    try:
        return sweep.param_sweep(name)
    except ScenarioError:
        kinds = ", ".join(sweep.SWEEPS)
        raise ScenarioError(f"--grid: unknown axis {name!r}: not a KIND ({kinds}) nor a migration parameter") from None


def parse_axis(text: str) -> Axis:
    """`NAME=V1,V2,...` as given to --grid."""
    name, eq, rest = text.partition("=")
    labels = tuple(v.strip() for v in rest.split(",") if v.strip())
    if not eq or not name.strip() or not labels:
        raise ScenarioError(f"--grid {text!r}: expected NAME=V1,V2,... (e.g. dirty-rate=0.5,1,2)")
    s = lookup(name.strip())
    return Axis(name.strip(), s, labels, tuple(s.parse(v) for v in labels))


def check_axes(axes: list[Axis]) -> None:
    if not MIN_AXES <= len(axes) <= MAX_AXES:
        raise ScenarioError(f"--grid: give {MIN_AXES} or {MAX_AXES} axes, not {len(axes)} (one axis: dqmig sweep KIND)")
    fields = [a.sweep.field for a in axes]
    if len(set(fields)) < len(fields):
        raise ScenarioError(f"--grid: two axes change the same field ({', '.join(fields)})")


def cells(axes: list[Axis]) -> list[tuple[int, ...]]:
    """Every cell as value indices, the first axis varying slowest."""
    return list(itertools.product(*(range(len(a.values)) for a in axes)))


def prepare(base: Scenario, axes: list[Axis], policies: list[str], repeat: int) -> list[Scenario]:
    """The scenario in every cell, all validated before anything runs."""
    check_axes(axes)
    every = cells(axes)
    if len(every) * len(policies) * repeat > MAX_RUNS:
        raise ScenarioError(
            f"--grid: {len(every)} cells x {len(policies)} policies x {repeat} = more than {MAX_RUNS:,} runs"
        )
    order = sorted(range(len(axes)), key=lambda k: STAGE.get(axes[k].sweep.name, 0))
    points = []
    for cell in every:
        s = base
        for k in order:
            s = axes[k].sweep.apply(s, axes[k].values[cell[k]])
        s.check_policies(policies)
        points.append(s)
    return points


def policies_for(axes: list[Axis], scenario_policies: list[str]) -> list[str]:
    """The policies a grid is about when none are given: those of its policy-specific axes."""
    named = [p for a in axes for p in a.sweep.policies]
    return list(dict.fromkeys(named)) or list(scenario_policies)


def label(axes: list[Axis], cell: tuple[int, ...]) -> str:
    return ", ".join(f"{a.name}={a.labels[i]}" for a, i in zip(axes, cell, strict=True))


def describe(axes: list[Axis], points: list[Scenario], repeat: int) -> dict[str, Any]:
    """The grid as `doc["sweep"]`: a sweep whose points are the cells."""
    every = cells(axes)
    return {
        "name": "grid",
        "field": " x ".join(a.sweep.field for a in axes),
        "axis": " x ".join(a.name for a in axes),
        "log": False,
        "values": [label(axes, c) for c in every],
        "x": [float(i) for i in range(len(every))],
        "labels": [label(axes, c) for c in every],
        "repeat": repeat,
        "scenarios": [p.to_dict() for p in points],
        "grid": [
            {
                "name": a.name,
                "field": a.sweep.field,
                "axis": a.sweep.axis,
                "log": a.sweep.log,
                "labels": list(a.labels),
                "x": [a.sweep.x(v) for v in a.values],
            }
            for a in axes
        ],
        "cells": [list(c) for c in every],
    }


def is_grid(doc: dict[str, Any]) -> bool:
    return doc.get("kind") == "sweep" and "grid" in doc.get("sweep", {})


# -- where each policy wins ----------------------------------------------------------------------


def converged(point: dict[str, Any]) -> bool:
    """Most of this policy's runs in the cell converged."""
    return point["runs"] > 0 and 2 * point["converged"] > point["runs"]


def phases(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell: `fastest` (least median total time) and `gentlest` (least median reader
    slowdown) among the policies that converged there, None where none did (or, for
    `gentlest`, where the guest has no read-mostly vCPU); `ran` is False where every run
    failed (nothing measured, unlike nothing converged)."""
    by_point: dict[int, list[dict[str, Any]]] = {}
    for p in sweep.summarize(doc):
        by_point.setdefault(p["point"], []).append(p)
    out = []
    for i, cell in enumerate(doc["sweep"]["cells"]):
        mine = by_point.get(i, [])
        ok = [p for p in mine if converged(p)]
        fastest = _least(ok, "total-time")
        gentlest = _least([p for p in ok if p["slowdown-reader"]["median"] is not None], "slowdown-reader")
        out.append(
            {
                "point": i,
                "cell": list(cell),
                "label": doc["sweep"]["labels"][i],
                "ran": any(p["runs"] for p in mine),  # False: every run here failed
                "converged": [p["policy"] for p in ok],
                "fastest": fastest["policy"] if fastest else None,
                "total-time": fastest["total-time"]["median"] if fastest else None,
                "gentlest": gentlest["policy"] if gentlest else None,
                "slowdown-reader": gentlest["slowdown-reader"]["median"] if gentlest else None,
            }
        )
    return out


def _least(points: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The point with the least median `key`, where a value within TIES[key] of the least
    is a tie, won by the policy listed first (none before any throttling): a 0.3 % faster
    migration or a 0.2-point gentler one is not a win a figure should show."""
    if not points:
        return None
    least = min(p[key]["median"] for p in points)
    relative, absolute = TIES[key]
    return next(p for p in points if p[key]["median"] <= least + max(relative * abs(least), absolute))


def run(
    base: Scenario,
    axes: list[Axis],
    policies: list[str],
    repeat: int,
    *,
    argv: list[str],
    progress: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    journal: Path | None = None,
    cluster_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Runs every cell x policy x repetition; returns the results document (as `sweep.run`)."""
    points = prepare(base, axes, policies, repeat)
    doc = results.new("sweep", base.to_dict(), policies, argv)
    doc["sweep"] = describe(axes, points, repeat)
    return sweep.run_points(doc, base, points, policies, repeat, progress, on_run, journal, cluster_address, workers)
