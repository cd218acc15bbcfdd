"""Dirty-tracking and vCPU benchmarks for dqmig, each against a baseline taken in the same run.

Run against a release build in its own venv, not the editable dev install::

    maturin build --release -o /tmp/dqmig-wheels
    python -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install --force-reinstall /tmp/dqmig-wheels/dqmig-*.whl

    /tmp/bench-venv/bin/python benches/tracker.py            # readable table on stdout
    /tmp/bench-venv/bin/python benches/tracker.py --json     # exactly one JSON object on stdout
    /tmp/bench-venv/bin/python benches/tracker.py --quick    # about 15 s instead of 40, noisier
    /tmp/bench-venv/bin/python benches/tracker.py --strict   # exit status 1 if a bar is missed

Progress goes to stderr. These machines are shared and noisy, so the measurement and its
baseline always alternate (or interleave), a ratio is the median of paired ratios or the ratio
of the best repetitions (interference only ever slows a run down), and a latency is a median or
percentile. No figure is compared with a constant except in the final ``bars`` section.

Figures
-------
``marks_per_s``, ``mark_ratio``
    Dirty-marking throughput through the tracker (``bench_mark_rate``: bitmap mode, logging on,
    transition counting) over a plain atomic ``fetch_or`` loop on the same page order
    (``bench_fetch_or_rate``), both compiled into the same extension; median of back-to-back
    pairs. ``marks_per_s`` and ``fetch_or_per_s`` are the best repetitions. Bar: ratio >= 0.8.
``harvest_ms_4g_1pct`` (and ``_ring``, ``_ring_device``, ``harvest_ms_4g_clean``)
    Latency of ``Guest.harvest()`` on a 4 GiB guest (2**20 pages of 4 KiB) with 1 % of the pages,
    chosen at random with a fixed seed, dirtied by ``write_and_mark`` after ``start_dirty_log``;
    median over repetitions, re-dirtying in between (untimed).
    ``_ring``: a dirty-ring guest (4 vCPUs, 4096 entries each), the writes spread over the vCPUs
    so that every dirty page is a ring entry (about 2600 per ring, under the soft limit): the
    harvest reaps the rings and takes the collected bitmap. ``_ring_device``: the same ring
    guest with device writes (no vCPU), which go to the backup bitmap. ``_clean``: a harvest
    with nothing dirty (the bitmap scan).
``logging_overhead_ratio``
    Throughput (steps per second of run time) of one vCPU running the ``stress`` program over a
    256 MiB region with dirty logging on, over the same with logging off. The two conditions are
    interleaved ``run(0.05)`` by ``run(0.05)`` (off, on, on, off, ...) so both see the same
    background load; each logging-on slice starts from a clean log and is harvested after it
    (untimed), so pages keep turning clean-to-dirty, as during a migration. Median over blocks
    of about 1 s of run time per condition. Bar: >= 0.8.
``exit_roundtrip_us_median``, ``exit_roundtrip_us_p99``
    One dirty-quota exit to Python and back: a sequential writer (bitmap mode, logging on, its
    region pre-faulted and large enough that every page it touches is clean) with quota =
    count + 1, so every ``run()`` returns DIRTY_QUOTA_EXHAUSTED after one page; the loop
    re-arms ``quota = exit.count + 1`` and calls ``run`` again, timed per iteration.
    ``native_call_us_median`` is the same loop around a trivial native getter instead of
    ``run``: the floor the Python side alone costs. Bar: median <= 20 us.
``vcpu_scaling_2_over_1``
    Total stress throughput of 2 vCPUs, each in its own Python thread calling ``run(0.05)`` in
    a loop for 1.5 s over a disjoint region, over 1 vCPU alone in the same harness. The regions
    (256 KiB each) fit the per-core L2 cache, so the figure measures what ``run()`` allows (it
    releases the GIL), not the memory bus. Bar: >= 1.7 on a 2-core machine.
    Baselines and diagnostics, taken interleaved with it:
    ``cpu_scaling_2_over_1``: SHA-256 (GIL released) in 2 threads over 1, what two threads can
    get on this machine (only comparable when ``foreign_cpus`` was alike in both).
    ``vcpu_steps_per_cpu_s_2_over_1``: stress steps per CPU-second, 2 vCPUs over 1 (about 1 = the
    vCPUs do not slow each other down; a low scaling with this near 1 means the threads did not
    get the CPUs). Before each scaling run the script waits up to 1 s (8 s in all) for a quarter
    second in which other processes keep under 0.25 CPUs busy (it goes ahead regardless).
    ``vcpu_scaling_2_over_1_load_corrected``: the same ratio, each worker's rate taken over its
    wall time minus the time it sat runnable waiting for a CPU (Linux schedstat run_delay), so
    CPUs held by other processes drop out while a GIL or lock serialisation (time asleep) still
    counts; median of the runs. ``vcpu_blocked_fraction_max``: the largest fraction of a run any
    vCPU thread spent asleep (neither running nor waiting for a CPU); about 0 = nothing
    serialises the vCPU threads. ``detail.scaling.*`` has per-run ``cpu_util`` (each worker's
    CPU time over wall time), ``blocked`` and ``foreign_cpus`` (CPUs busy with other processes
    during the run, from /proc/stat).
    ``vcpu_scaling_2_over_1_dram`` repeats the vCPU figure with 64 MiB regions, where stress is
    bound by memory bandwidth, next to ``memwrite_scaling_2_over_1``: numpy ``fill`` of 64 MiB
    buffers (GIL released) in 2 threads over 1, the machine's own store-bandwidth scaling.
``warnings``
    Conditions that make a figure unreliable: no 1-vCPU or no 2-vCPU scaling run found the
    machine quiet (other processes keeping fewer than 0.25 CPUs busy).
``machine``
    CPU count and model, Python, platform, numpy, the extension's path (check that it is the
    release wheel) and ``foreign_cpus_during_run``: CPUs other processes kept busy on average.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dqmig import _native
from dqmig.programs import ProgramSpec

PAGE = 4096
MiB = 1 << 20
GUEST_PAGES_4G = 1 << 20  # 4 GiB of 4 KiB pages
QUOTA_EXIT = "DIRTY_QUOTA_EXHAUSTED"
# A machine is quiet when other processes keep fewer CPUs than this busy.
QUIET_CPUS = 0.25

# The pass/fail bars: (metric, comparison, threshold).
BARS: tuple[tuple[str, str, float], ...] = (
    ("mark_ratio", ">=", 0.8),
    ("logging_overhead_ratio", ">=", 0.8),
    ("exit_roundtrip_us_median", "<=", 20.0),
    ("vcpu_scaling_2_over_1", ">=", 1.7),
)


@dataclass(frozen=True)
class Config:
    """Sizes and repetition counts; `quick()` takes about a third of the run time."""

    mark_pages: int = 1 << 20
    mark_count: int = 50_000_000
    mark_reps: int = 7
    harvest_reps: int = 9
    harvest_seed: int = 20240601
    logging_region_mib: int = 256
    logging_run_s: float = 1.0
    logging_reps: int = 3
    exit_iterations: int = 20_000
    exit_warmup: int = 1_000
    scaling_cache_kib: int = 256
    scaling_dram_mib: int = 64
    scaling_run_s: float = 1.5
    scaling_reps: int = 3
    dram_run_s: float = 1.0
    dram_reps: int = 2
    baseline_run_s: float = 0.75
    settle_s: float = 1.0  # longest wait for a quiet machine before each scaling run
    settle_budget_s: float = 8.0  # and for all of them together
    timeslice_s: float = 0.05

    @classmethod
    def quick(cls) -> Config:
        return cls(
            mark_count=20_000_000,
            mark_reps=3,
            harvest_reps=5,
            logging_run_s=0.5,
            logging_reps=2,
            exit_iterations=10_000,
            scaling_run_s=0.75,
            scaling_reps=2,
            dram_run_s=0.5,
            baseline_run_s=0.5,
            settle_s=0.5,
            settle_budget_s=3.0,
            dram_reps=1,
        )


def log(msg: str) -> None:
    print(f"[tracker] {msg}", file=sys.stderr, flush=True)


def ms(ns: int) -> float:
    return ns / 1e6


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of an ascending sequence."""
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def stress_vcpu(guest: _native.Guest, index: int, start: int, pages: int) -> _native.Vcpu:
    spec = ProgramSpec(kind="stress", region_start=start, region_pages=pages, seed=index)
    return _native.Vcpu(guest, index, spec.to_json())


def prefault(vcpu: _native.Vcpu, steps: int, timeslice: float) -> None:
    """Runs `vcpu` for at least `steps` steps so its region is backed before timing."""
    start = vcpu.progress
    while vcpu.progress - start < steps:
        vcpu.run(timeslice)


# --- marking ------------------------------------------------------------------------------


def measure_marking(cfg: Config) -> tuple[dict[str, float], dict[str, Any]]:
    """Pairs of back-to-back runs of the tracker loop and the fetch_or loop (alternating which
    goes first); the ratio is the median of the per-pair ratios, so a change in machine load
    between pairs cancels out."""
    marks: list[float] = []
    base: list[float] = []
    for rep in range(cfg.mark_reps):
        if rep % 2 == 0:
            marks.append(_native.bench_mark_rate(cfg.mark_pages, cfg.mark_count))
            base.append(_native.bench_fetch_or_rate(cfg.mark_pages, cfg.mark_count))
        else:
            base.append(_native.bench_fetch_or_rate(cfg.mark_pages, cfg.mark_count))
            marks.append(_native.bench_mark_rate(cfg.mark_pages, cfg.mark_count))
    ratios = [m / b for m, b in zip(marks, base, strict=True)]
    figures = {
        "marks_per_s": max(marks),
        "fetch_or_per_s": max(base),
        "mark_ratio": statistics.median(ratios),
    }
    log(
        "marking: {marks_per_s:.3g} marks/s vs fetch_or {fetch_or_per_s:.3g}/s, ratio {mark_ratio:.3f}".format(
            **figures
        )
    )
    return figures, {"marks_per_s": marks, "fetch_or_per_s": base, "ratios": ratios}


# --- harvest -------------------------------------------------------------------------------


def timed_harvests(
    guest: _native.Guest,
    pages: Sequence[int],
    vcpus: int | None,
    reps: int,
) -> list[float]:
    """Harvest latencies in ms. Each repetition dirties `pages` (untimed): with `vcpus`, spread
    round-robin over that many vCPUs, else as device writes; then harvests (timed). One extra,
    untimed warm-up repetition faults the pages in."""
    guest.start_dirty_log()
    times: list[float] = []
    for rep in range(reps + 1):
        for i, p in enumerate(pages):
            guest.write_and_mark(p, rep + 1, None if vcpus is None else i % vcpus)
        t0 = time.perf_counter_ns()
        got = guest.harvest()
        t1 = time.perf_counter_ns()
        if len(got) != len(pages):
            raise RuntimeError(f"harvest returned {len(got)} pages, expected {len(pages)}")
        if rep > 0:
            times.append(ms(t1 - t0))
    guest.stop_dirty_log()
    return times


def measure_harvest(cfg: Config) -> tuple[dict[str, float], dict[str, Any]]:
    n = GUEST_PAGES_4G
    pages = random.Random(cfg.harvest_seed).sample(range(n), n // 100)
    detail: dict[str, Any] = {"dirty_pages": len(pages)}

    guest = _native.Guest(n)
    detail["bitmap"] = timed_harvests(guest, pages, None, cfg.harvest_reps)
    # The scan alone: nothing dirty.
    guest.start_dirty_log()
    clean: list[float] = []
    for _ in range(cfg.harvest_reps):
        t0 = time.perf_counter_ns()
        guest.harvest()
        clean.append(ms(time.perf_counter_ns() - t0))
    detail["clean"] = clean

    # Ring mode: with the writes spread over 4 vCPUs each ring gets ~2600 entries, under the
    # soft limit, so every dirty page is a ring entry; device writes go to the backup bitmap.
    vcpus, ring = 4, 4096
    guest = _native.Guest(n, vcpus=vcpus, dirty_ring=ring)
    guest.start_dirty_log()
    for i, p in enumerate(pages):
        guest.write_and_mark(p, 1, i % vcpus)
    lens = [guest.ring_len(v) for v in range(vcpus)]
    if max(lens) > ring - 64 or sum(lens) != len(pages):
        raise RuntimeError(f"the dirty pages do not fit the rings as entries: {lens}")
    guest.harvest()
    detail["ring"] = timed_harvests(guest, pages, vcpus, cfg.harvest_reps)
    detail["ring_device"] = timed_harvests(guest, pages, None, cfg.harvest_reps)
    del guest

    med = statistics.median
    figures = {
        "harvest_ms_4g_1pct": med(detail["bitmap"]),
        "harvest_ms_4g_1pct_ring": med(detail["ring"]),
        "harvest_ms_4g_1pct_ring_device": med(detail["ring_device"]),
        "harvest_ms_4g_clean": med(clean),
    }
    log(
        "harvest 4 GiB, 1 %: bitmap {harvest_ms_4g_1pct:.3f} ms, ring {harvest_ms_4g_1pct_ring:.3f} ms, "
        "ring/device {harvest_ms_4g_1pct_ring_device:.3f} ms, clean {harvest_ms_4g_clean:.3f} ms".format(**figures)
    )
    return figures, detail


# --- logging overhead ---------------------------------------------------------------------


def logging_block(guest: _native.Guest, vcpu: _native.Vcpu, run_s: float, timeslice: float) -> dict[str, float]:
    """About `run_s` of stress run time with logging on and as much with it off, interleaved
    slice by slice (off, on, on, off, ...) so both see the same background load. An on-slice
    starts from a clean log and is harvested after it (untimed), as in a migration."""
    steps = {False: 0, True: 0}
    run_ns = {False: 0, True: 0}
    k = 0
    while min(run_ns.values()) < run_s * 1e9:
        logging = k % 4 in (1, 2)
        k += 1
        if logging:
            guest.start_dirty_log()
        p0 = vcpu.progress
        t0 = time.perf_counter_ns()
        vcpu.run(timeslice)
        run_ns[logging] += time.perf_counter_ns() - t0
        steps[logging] += vcpu.progress - p0
        if logging:
            guest.harvest()
            guest.stop_dirty_log()
    return {
        "on": steps[True] / (run_ns[True] / 1e9),
        "off": steps[False] / (run_ns[False] / 1e9),
    }


def measure_logging_overhead(cfg: Config) -> tuple[dict[str, float], dict[str, Any]]:
    region = cfg.logging_region_mib * MiB // PAGE
    guest = _native.Guest(region)
    vcpu = stress_vcpu(guest, 0, 0, region)
    prefault(vcpu, region, cfg.timeslice_s)
    blocks = [logging_block(guest, vcpu, cfg.logging_run_s, cfg.timeslice_s) for _ in range(cfg.logging_reps)]
    ratios = [b["on"] / b["off"] for b in blocks]
    figures = {
        "stress_steps_per_s_logging_off": max(b["off"] for b in blocks),
        "stress_steps_per_s_logging_on": max(b["on"] for b in blocks),
        "logging_overhead_ratio": statistics.median(ratios),
    }
    log(
        "logging overhead: on {stress_steps_per_s_logging_on:.3g} steps/s, "
        "off {stress_steps_per_s_logging_off:.3g} steps/s, ratio {logging_overhead_ratio:.3f}".format(**figures)
    )
    return figures, {"region_mib": cfg.logging_region_mib, "blocks": blocks, "ratios": ratios}


# --- quota exit round trip ----------------------------------------------------------------


def measure_exit_roundtrip(cfg: Config) -> tuple[dict[str, float], dict[str, Any]]:
    total = cfg.exit_warmup + cfg.exit_iterations
    region = total + 1024  # every page written during the measurement is clean
    guest = _native.Guest(region)
    spec = ProgramSpec(kind="sequential", region_pages=region)
    vcpu = _native.Vcpu(guest, 0, spec.to_json())
    # Fault the region in with logging off (no marks, no quota), then log from clean.
    prefault(vcpu, region, cfg.timeslice_s)
    guest.start_dirty_log()
    exit_ = None
    count = vcpu.dirty_count
    samples = [0] * total
    clock = time.perf_counter_ns
    for i in range(total):
        t0 = clock()
        vcpu.quota = count + 1
        exit_ = vcpu.run(1.0)
        count = exit_.count
        samples[i] = clock() - t0
    assert exit_ is not None
    if exit_.reason != QUOTA_EXIT or vcpu.dirty_count != total:
        raise RuntimeError(f"unexpected exit {exit_!r} after {vcpu.dirty_count} dirty pages")
    us = sorted(s / 1e3 for s in samples[cfg.exit_warmup :])

    # Floor: the same Python loop around a trivial native getter instead of run().
    floor = [0] * cfg.exit_iterations
    for i in range(cfg.exit_iterations):
        t0 = clock()
        vcpu.quota = count + 1
        count = vcpu.dirty_count
        floor[i] = clock() - t0
    floor_us = statistics.median(floor) / 1e3

    figures = {
        "exit_roundtrip_us_median": statistics.median(us),
        "exit_roundtrip_us_p99": percentile(us, 0.99),
        "exit_roundtrip_us_min": us[0],
        "native_call_us_median": floor_us,
    }
    log(
        f"quota exit round trip: median {figures['exit_roundtrip_us_median']:.2f} us, "
        f"p99 {figures['exit_roundtrip_us_p99']:.2f} us (native getter floor {floor_us:.2f} us)"
    )
    return figures, {"iterations": cfg.exit_iterations, "p90_us": percentile(us, 0.9)}


# --- scaling ------------------------------------------------------------------------------


def run_delay_s() -> float | None:
    """Time the calling thread has spent runnable but waiting for a CPU (Linux schedstat)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class WorkerResult:
    units: float
    wall_s: float
    cpu_s: float
    wait_s: float | None  # runnable but not running: the CPUs were busy with someone else

    @property
    def rate(self) -> float:
        return self.units / self.wall_s

    @property
    def load_corrected_rate(self) -> float | None:
        """Units per second of the time the worker ran or was blocked (on the GIL, a lock,
        I/O), leaving out only the time it waited for a CPU other processes held."""
        return None if self.wait_s is None else self.units / (self.wall_s - self.wait_s)

    @property
    def blocked(self) -> float | None:
        """Fraction of the wall time neither running nor waiting for a CPU: asleep."""
        if self.wait_s is None:
            return None
        return max(0.0, 1 - (self.cpu_s + self.wait_s) / self.wall_s)


def run_parallel(steps: Sequence[Callable[[], float]], duration: float) -> list[WorkerResult]:
    """Runs each `step` in a loop in its own thread for `duration` seconds, all starting
    together; `step` returns the units of work it did."""
    barrier = threading.Barrier(len(steps))
    results: list[WorkerResult | None] = [None] * len(steps)

    def worker(i: int, step: Callable[[], float]) -> None:
        barrier.wait()
        w0, c0, t0 = run_delay_s(), time.thread_time(), time.perf_counter()
        deadline = t0 + duration
        units = 0.0
        while time.perf_counter() < deadline:
            units += step()
        wall, cpu, w1 = time.perf_counter() - t0, time.thread_time() - c0, run_delay_s()
        wait = None if w0 is None or w1 is None else w1 - w0
        results[i] = WorkerResult(units, wall, cpu, wait)

    threads = [threading.Thread(target=worker, args=(i, s)) for i, s in enumerate(steps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None for r in results):
        raise RuntimeError("a benchmark worker thread failed")
    return [r for r in results if r is not None]


@dataclass
class Scaling:
    """The 1-worker and 2-worker runs of one workload, in the order they ran."""

    one: list[float] = field(default_factory=list)  # units/s of the lone worker
    two: list[float] = field(default_factory=list)  # total units/s of both workers
    one_per_cpu: list[float] = field(default_factory=list)  # units per CPU-second
    two_per_cpu: list[float] = field(default_factory=list)
    one_load_corrected: list[float] = field(default_factory=list)  # see WorkerResult
    two_load_corrected: list[float] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)  # per run, 1 or 2
    cpu_util: list[list[float]] = field(default_factory=list)  # per run and worker: CPU / wall
    blocked: list[list[float]] = field(default_factory=list)  # per run and worker, see WorkerResult
    foreign_cpus: list[float] = field(default_factory=list)  # per run: CPUs other processes used

    @property
    def ratio(self) -> float:
        return max(self.two) / max(self.one)

    @property
    def per_cpu_ratio(self) -> float:
        return max(self.two_per_cpu) / max(self.one_per_cpu)

    @property
    def load_corrected_ratio(self) -> float | None:
        if not self.one_load_corrected or not self.two_load_corrected:
            return None
        return statistics.median(self.two_load_corrected) / statistics.median(self.one_load_corrected)

    def add(self, res: list[WorkerResult], foreign_cpus: float) -> None:
        two = len(res) == 2
        (self.two if two else self.one).append(sum(r.rate for r in res))
        per_cpu = sum(r.units for r in res) / sum(r.cpu_s for r in res)
        (self.two_per_cpu if two else self.one_per_cpu).append(per_cpu)
        corrected = [r.load_corrected_rate for r in res]
        if all(c is not None for c in corrected):
            (self.two_load_corrected if two else self.one_load_corrected).append(
                sum(c for c in corrected if c is not None)
            )
        self.workers.append(len(res))
        self.cpu_util.append([round(r.cpu_s / r.wall_s, 3) for r in res])
        self.blocked.append([round(b, 3) for r in res if (b := r.blocked) is not None])
        self.foreign_cpus.append(round(foreign_cpus, 2))


class LoadMeter:
    """CPUs kept busy by everything except this process since the meter started, from
    /proc/stat (Linux; NaN elsewhere)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.own = time.process_time()
        self.busy = self._machine_busy_s()

    @staticmethod
    def _machine_busy_s() -> float:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        idle = ticks[3] + ticks[4]  # idle + iowait
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def foreign_cpus(self) -> float:
        wall = time.perf_counter() - self.wall
        own = time.process_time() - self.own
        return max(0.0, (self._machine_busy_s() - self.busy - own) / wall)


class Settler:
    """Waits for a quiet machine before each scaling run: a shared machine's builds and test
    runs come in bursts, and a scaling figure taken during one says more about them than about
    dqmig. Each wait lasts until a `window` in which other processes keep fewer than
    `quiet_cpus` CPUs busy, at most `per_wait_s`, and all waits together at most `budget_s`
    (so a busy machine cannot stretch the run); the measurement goes ahead either way."""

    def __init__(
        self, per_wait_s: float, budget_s: float, window: float = 0.25, quiet_cpus: float = QUIET_CPUS
    ) -> None:
        self.per_wait_s = per_wait_s
        self.remaining_s = budget_s
        self.window = window
        self.quiet_cpus = quiet_cpus

    def wait(self) -> None:
        start = time.perf_counter()
        deadline = start + min(self.per_wait_s, self.remaining_s)
        while time.perf_counter() < deadline:
            meter = LoadMeter()
            time.sleep(self.window)
            if meter.foreign_cpus() < self.quiet_cpus:
                break
        self.remaining_s -= time.perf_counter() - start


def measure_1_vs_2(
    steps: Sequence[Callable[[], float]], duration: float, rep: int, into: Scaling, settler: Settler
) -> None:
    """One repetition: the lone worker (alternately the first and the second) and both
    together, in alternating order, each after the settler's wait for a quiet machine."""
    order = ["one", "two"] if rep % 2 == 0 else ["two", "one"]
    for which in order:
        group = [steps[rep % 2]] if which == "one" else list(steps)
        settler.wait()
        meter = LoadMeter()
        res = run_parallel(group, duration)
        into.add(res, meter.foreign_cpus())


def vcpu_steppers(region_pages: int, cfg: Config) -> list[Callable[[], float]]:
    """Two stress vCPUs on disjoint regions of one guest, pre-faulted; each step is one
    run(timeslice) and returns the steps it made."""
    guest = _native.Guest(2 * region_pages, vcpus=2)
    vcpus = [stress_vcpu(guest, i, i * region_pages, region_pages) for i in range(2)]
    for v in vcpus:
        prefault(v, region_pages, cfg.timeslice_s)

    def stepper(v: _native.Vcpu) -> Callable[[], float]:
        def step() -> float:
            p0 = v.progress
            v.run(cfg.timeslice_s)
            return v.progress - p0

        return step

    return [stepper(v) for v in vcpus]


def memwrite_steppers(mib: int) -> list[Callable[[], float]]:
    """Two numpy buffers; each step fills one (numpy releases the GIL) and returns bytes."""

    def stepper(buf: np.ndarray) -> Callable[[], float]:
        value = [1]

        def step() -> float:
            value[0] += 2  # odd, never zero: a real store pattern, not a memset(0)
            buf.fill(value[0])
            return float(buf.nbytes)

        return step

    return [stepper(np.ones(mib * MiB // 8, dtype=np.uint64)) for _ in range(2)]


def cpu_steppers() -> list[Callable[[], float]]:
    """Pure CPU work that releases the GIL: SHA-256 of 256 KiB (hashlib drops the GIL for
    large inputs). Its 2-over-1 scaling is what two threads can get on this machine now."""
    data = bytes(range(256)) * 1024

    def step() -> float:
        hashlib.sha256(data).digest()
        return 1.0

    return [step, step]


def measure_scaling(cfg: Config) -> tuple[dict[str, float | None], dict[str, Any]]:
    cache, cpu, dram, mem = Scaling(), Scaling(), Scaling(), Scaling()
    settler = Settler(cfg.settle_s, cfg.settle_budget_s)
    cache_steps = vcpu_steppers(cfg.scaling_cache_kib * 1024 // PAGE, cfg)
    hash_steps = cpu_steppers()
    # The bar figure and its CPU baseline, interleaved so both see the same machine.
    for rep in range(cfg.scaling_reps):
        measure_1_vs_2(cache_steps, cfg.scaling_run_s, rep, cache, settler)
        measure_1_vs_2(hash_steps, cfg.baseline_run_s, rep, cpu, settler)
    log(
        f"vCPU scaling 2/1, {cfg.scaling_cache_kib} KiB regions: {cache.ratio:.3f} "
        f"(CPU baseline {cpu.ratio:.3f}, other processes {statistics.mean(cache.foreign_cpus):.2f} CPUs)"
    )
    dram_steps = vcpu_steppers(cfg.scaling_dram_mib * MiB // PAGE, cfg)
    mem_steps = memwrite_steppers(cfg.scaling_dram_mib)
    for rep in range(cfg.dram_reps):
        measure_1_vs_2(dram_steps, cfg.dram_run_s, rep, dram, settler)
        measure_1_vs_2(mem_steps, cfg.baseline_run_s, rep, mem, settler)
    log(
        f"vCPU scaling 2/1, {cfg.scaling_dram_mib} MiB regions: {dram.ratio:.3f} "
        f"(memory-write baseline {mem.ratio:.3f})"
    )
    figures = {
        "vcpu_scaling_2_over_1": cache.ratio,
        "cpu_scaling_2_over_1": cpu.ratio,
        "vcpu_steps_per_cpu_s_2_over_1": cache.per_cpu_ratio,
        "vcpu_scaling_2_over_1_load_corrected": cache.load_corrected_ratio,
        "vcpu_blocked_fraction_max": max((b for run in cache.blocked for b in run), default=None),
        "vcpu_scaling_2_over_1_dram": dram.ratio,
        "memwrite_scaling_2_over_1": mem.ratio,
    }
    runs = {"cache": cache, "cpu": cpu, "dram": dram, "memwrite": mem}
    detail: dict[str, Any] = {name: asdict(s) for name, s in runs.items()}
    # 2 threads need both CPUs; a 2-vCPU figure with no run on a quiet machine is a figure
    # about the other processes (and a lone vCPU starved in every run inflates it).
    for n in (1, 2):
        busy = [f for f, w in zip(cache.foreign_cpus, cache.workers, strict=True) if w == n]
        if busy and min(busy) >= QUIET_CPUS:
            detail.setdefault("warnings", []).append(
                f"vcpu_scaling_2_over_1: other processes kept {min(busy):.2f}-{max(busy):.2f} CPUs "
                f"busy during every {n}-vCPU run, so the figure measures the machine's load; see "
                f"vcpu_scaling_2_over_1_load_corrected, or rerun when the machine is quiet"
            )
    return figures, detail


# --- report -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "dqmig_native": _native.__file__,
    }


def bars(figures: dict[str, float | None]) -> dict[str, bool]:
    out = {}
    for name, op, limit in BARS:
        value = figures[name]
        out[name] = value is not None and (value >= limit if op == ">=" else value <= limit)
    return out


def print_table(result: dict[str, Any]) -> None:
    limits = {name: f"{op} {limit:g}" for name, op, limit in BARS}
    rows = [
        (
            name,
            "n/a" if value is None else f"{value:.4g}",
            limits.get(name, ""),
            "" if name not in limits else ("PASS" if result["bars"][name] else "FAIL"),
        )
        for name, value in result["figures"].items()
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  {'value':>10}  {'bar':<8}  ")
    for name, value, bar, verdict in rows:
        print(f"{name:<{width}}  {value:>10}  {bar:<8}  {verdict}")
    m = result["machine"]
    print(f"\n{m['cpu_count']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['platform']}")
    print(f"elapsed {result['elapsed_s']:.1f} s")
    for w in result["warnings"]:
        print(f"warning: {w}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repetitions")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a bar is missed")
    args = parser.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()

    repo = Path(__file__).resolve().parents[1]
    if repo in Path(_native.__file__).resolve().parents:
        log(f"warning: {_native.__file__} is the in-tree dev build, not a release wheel")

    started = time.perf_counter()
    load = LoadMeter()
    figures: dict[str, float | None] = {}
    detail: dict[str, Any] = {}
    warnings: list[str] = []
    for name, measure in [
        ("marking", measure_marking),
        ("harvest", measure_harvest),
        ("logging", measure_logging_overhead),
        ("exit", measure_exit_roundtrip),
        ("scaling", measure_scaling),
    ]:
        t0 = time.perf_counter()
        f, d = measure(cfg)
        figures.update(f)
        warnings += d.pop("warnings", [])
        detail[name] = {**d, "elapsed_s": round(time.perf_counter() - t0, 2)}

    result: dict[str, Any] = {
        **figures,
        "bars": bars(figures),
        "warnings": warnings,
        "machine": {**machine(), "foreign_cpus_during_run": round(load.foreign_cpus(), 2)},
        "config": {"quick": args.quick, **asdict(cfg)},
        "elapsed_s": time.perf_counter() - started,
        "detail": detail,
    }
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table({**result, "figures": figures})
    return 1 if args.strict and not all(result["bars"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
