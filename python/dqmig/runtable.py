"""What `dqmig run` prints when the run ends: a row per writer (past GROUP_ABOVE vCPUs, a
row per class and program), what the columns mean, and calc-dirty-rate's three modes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dqmig import dirtyrate
from dqmig.sampler import Sample
from dqmig.units import MiB
from dqmig.vm import VM

GROUP_ABOVE = 16  # more vCPUs than this: one row per class and program


@dataclass
class Row:
    name: str  # the writer, or its class in a grouped table
    cls: str
    program: str
    writers: int
    progress: float  # guest steps/s per writer (the mean over a group)
    dirty: float  # pages newly dirtied/s, summed over the row's writers
    write: float  # bytes written/s, summed
    ms_per_gib: float  # stress programs' last ms per GiB (the mean over a group); nan if none


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def writer_rows(vm: VM, samples: list[Sample]) -> list[Row]:
    rows = []
    names, classes, programs = vm.writer_names(), vm.writer_classes(), vm.writer_programs()
    for i, name in enumerate(names):
        ms = samples[-1].ms_per_gib[i] if samples else 0.0
        rows.append(
            Row(
                name=name,
                cls=classes[i],
                program=programs[i].kind,
                writers=1,
                progress=_mean([s.progress_rate[i] for s in samples]),
                dirty=_mean([s.dirty_rate[i] for s in samples]),
                write=_mean([s.write_rate[i] for s in samples]),
                ms_per_gib=ms or math.nan,
            )
        )
    return rows


def class_rows(rows: list[Row]) -> list[Row]:
    """One row per (class, program), in the order they first appear."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.cls, r.program), []).append(r)
    out = []
    for (cls, program), members in groups.items():
        ms = [r.ms_per_gib for r in members if not math.isnan(r.ms_per_gib)]
        out.append(
            Row(
                name=cls,
                cls=cls,
                program=program,
                writers=len(members),
                progress=_mean([r.progress for r in members]),
                dirty=sum(r.dirty for r in members),
                write=sum(r.write for r in members),
                ms_per_gib=_mean(ms) if ms else math.nan,
            )
        )
    return out


def print_table(vm: VM, samples: list[Sample]) -> None:
    rows = writer_rows(vm, samples)
    grouped = len(vm.vcpus) > GROUP_ABOVE
    if grouped:
        rows = class_rows(rows)
    stress = any(r.program == "stress" for r in rows)
    page_mb = vm.guest.page_size / MiB
    first = f"{'class':<7} {'program':<12} {'count':>5}" if grouped else f"{'writer':<7} {'class':<7} {'program':<12}"
    print(
        f"\n{first} {'progress/s':>12} {'dirty pages/s':>14} {'dirty MB/s':>11} {'write MB/s':>11}"
        + (f" {'ms/GiB':>8}" if stress else "")
    )
    for r in rows:
        lead = f"{r.cls:<7} {r.program:<12} {r.writers:>5}" if grouped else f"{r.name:<7} {r.cls:<7} {r.program:<12}"
        print(
            f"{lead} {r.progress:>12.0f} {r.dirty:>14.0f} {r.dirty * page_mb:>11.1f} {r.write / MiB:>11.1f}"
            + (f" {_ms(r.ms_per_gib):>8}" if stress else "")
        )
    total = sum(r.dirty for r in rows)
    print(f"{'VM':<28} {'':>12} {total:>14.0f} {total * page_mb:>11.1f}")
    print(_legend(grouped, stress, len(samples)))


def _ms(ms_per_gib: float) -> str:
    return "-" if math.isnan(ms_per_gib) else f"{ms_per_gib:.0f}"


def _legend(grouped: bool, stress: bool, samples: int) -> str:
    lines = [
        f"  means over {samples} samples, one every 100 ms, with the dirty log cleared at each;",
        "  progress/s: guest program steps per second" + (", per writer (a row's mean)" if grouped else ""),
        "  dirty: pages newly dirtied (clean to dirty) per second; write: bytes the program stored per second"
        + (" (both summed over a row's writers)" if grouped else ""),
    ]
    if stress:
        lines.append("  ms/GiB: a stress program's time per GiB it last wrote (guestperf's stress figure)")
    return "\n".join(lines)


def print_dirty_rates(rates: dict[str, dirtyrate.DirtyRate | str], classes: list[str]) -> None:
    """`rates`: each mode's rate, or why QEMU would refuse the mode here. `classes`: each
    vCPU's; past GROUP_ABOVE vCPUs the dirty-ring mode's per-vCPU rates are summed per class."""
    print("\ncalc-dirty-rate:")
    for mode, r in rates.items():
        if isinstance(r, str):
            print(f"  {mode:<14} unavailable: {r}")
            continue
        extra = ""
        if r.note:
            extra = f"  ({r.note})"
        elif r.vcpu_dirty_rate and len(r.vcpu_dirty_rate) > GROUP_ABOVE:
            sums: dict[str, int] = {}
            for cls, x in zip(classes, r.vcpu_dirty_rate, strict=True):
                sums[cls] = sums.get(cls, 0) + x
            extra = "  per class (sum over its vCPUs) " + ", ".join(f"{c} {x}" for c, x in sums.items()) + " MB/s"
        elif r.vcpu_dirty_rate:
            extra = "  per vCPU " + ", ".join(f"{x}" for x in r.vcpu_dirty_rate) + " MB/s"
        elif r.sampled_pages:
            extra = f"  ({r.sampled_pages} pages sampled)"
        print(f"  {mode:<14} {r.dirty_rate:>8} MB/s over {r.calc_time:g} s{extra}")
