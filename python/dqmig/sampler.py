"""Telemetry: a thread that samples every vCPU's progress and dirty rate every 100 ms."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from dqmig.vm import JOIN_TIMEOUT_S, VM

SAMPLE_PERIOD_S = 0.100


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    progress_rate: list[float]  # guest steps/s per writer (vCPUs, then DMA)
    dirty_rate: list[float]  # pages newly dirtied/s per writer
    write_rate: list[float]  # bytes written/s per writer
    sleep_share: list[float]  # share of the period spent in throttle sleeps
    ms_per_gib: list[float]  # stress programs: last ms per GiB written (0 if none yet)
    dirty_pages: int  # pages the log held at this sample (before any clearing)

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class Sampler:
    """Samples `vm` every `period` seconds on its own thread.

    Dirty rates count clean-to-dirty transitions. A page only becomes clean again when the
    log is harvested, so with `clear_log` the sampler harvests at every sample (the cadence
    of a migration's dirty sync); during a migration the migration's syncs do that instead.
    """

    vm: VM
    period: float = SAMPLE_PERIOD_S
    clear_log: bool = False
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
        self._paused = threading.Event()

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(JOIN_TIMEOUT_S)
        return self.samples

    def pause_clearing(self) -> None:
        """Stop harvesting the log (keep sampling), e.g. while something else measures it."""
        self._paused.set()

    def _loop(self) -> None:
        t0 = last_t = time.monotonic()
        last = self.vm.counters()
        while not self._stop.wait(self.period - ((time.monotonic() - t0) % self.period)):
            now = time.monotonic()
            dirty = self.vm.guest.dirty_count()
            if self.clear_log and not self._paused.is_set() and self.vm.guest.dirty_logging:
                self.vm.guest.harvest()
            cur = self.vm.counters()
            dt = now - last_t
            self.samples.append(_sample(now - t0, dt, last, cur, dirty))
            last, last_t = cur, now


def _sample(t: float, dt: float, last: list[dict], cur: list[dict], dirty: int) -> Sample:
    def rate(key: str) -> list[float]:
        return [(c[key] - p[key]) / dt for p, c in zip(last, cur, strict=True)]

    return Sample(
        t=round(t, 4),
        progress_rate=rate("progress"),
        dirty_rate=rate("pages_dirtied"),
        write_rate=rate("bytes_written"),
        sleep_share=[min(1.0, (c["sleep_ns"] - p["sleep_ns"]) / 1e9 / dt) for p, c in zip(last, cur, strict=True)],
        ms_per_gib=[c["stress_last_ms_per_gib"] for c in cur],
        dirty_pages=dirty,
    )
