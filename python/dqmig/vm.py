"""The VM: guest memory, vCPUs and an optional DMA writer, one thread per vCPU around the
emulated KVM_RUN loop.

Each vCPU thread calls `Vcpu.run(timeslice)` (Rust, GIL released) and hands every exit to
the VM's exit handler, the throttling policy, then runs again: the loop QEMU runs around
KVM_RUN. Handlers must be short; a throttle sleep goes through `VM.throttle_sleep`, which
releases the GIL. An interruptible sleep ends at once when the VM is paused or stopped (QEMU's
cpu_throttle_thread checks cpu->stop); an uninterruptible one (dirty-limit's g_usleep) runs to
its end, and a pause waits for it: `pause()` returns that stop latency.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqmig import _native
from dqmig.engine import Clock, ExitHandler
from dqmig.policies.base import ContinueHandler
from dqmig.programs import ProgramSpec, classify, preset
from dqmig.units import MiB, format_size

# No wait in the VM is unbounded: a thread that does not answer in this long is an error.
JOIN_TIMEOUT_S = 10.0


MAX_VCPUS = 1024  # what a destination accepts; checked on the source before anything starts


@dataclass
class VmConfig:
    vcpus: int = 2
    memory: int = 512 * MiB
    page_size: int = 4096
    dirty_ring: int = 0  # entries per vCPU (KVM dirty-ring-size); 0 = dirty bitmap
    pml: bool = True  # rings reserve Intel PML's 512-entry buffer, as KVM on VMX
    programs: list[ProgramSpec] = field(default_factory=list)  # one per vCPU; empty = idle
    dma: ProgramSpec | None = None  # a DMA writer device, if any
    timeslice: float = 0.010  # seconds per run() before a TIMESLICE exit
    pml_batch: int = 1  # see Vcpu: emulate PML-batched quota accounting
    prefill: float = 0.0  # share of memory written before the guest starts (0: all zero pages)
    # The simulator only: each vCPU's flat-out steps/s (0 or absent: its kind's SPEED), e.g.
    # the paces the emulator measured on a host (`dqmig validate --calibrate`).
    sim_speeds: tuple[float, ...] = ()

    @property
    def prefilled_pages(self) -> int:
        """Pages 0..n hold data at boot: a guest that has used its memory, so pre-copy sends
        them whole rather than as zero pages (QEMU's save_zero_page finds none there)."""
        return math.ceil(self.prefill * self.pages)

    @property
    def pages(self) -> int:
        return self.memory // self.page_size

    @classmethod
    def with_workload(
        cls,
        workload: str,
        *,
        vcpus: int = 2,
        memory: int = 512 * MiB,
        seed: int = 0,
        writer_rate: float = 0.0,
        **kwargs: object,
    ) -> VmConfig:
        page_size = int(kwargs.get("page_size", 4096))  # type: ignore[call-overload]
        programs = preset(workload, vcpus, memory // page_size, seed, writer_rate)
        return cls(vcpus=vcpus, memory=memory, programs=programs, **kwargs)  # type: ignore[arg-type]

    def validate(self) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus must be in 1..{MAX_VCPUS} (a destination hosts at most that), not {self.vcpus}")
        if self.page_size < 4096 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page size {self.page_size} must be a power of two >= 4096")
        if self.memory < self.page_size:
            raise ValueError(f"memory {self.memory} must hold at least one page")
        if self.dirty_ring < 0:
            raise ValueError(f"dirty ring size must be >= 0 entries (0 = dirty bitmap), not {self.dirty_ring}")
        if self.memory % self.page_size:
            raise ValueError(f"memory {self.memory} is not a multiple of the page size {self.page_size}")
        if self.programs and len(self.programs) != self.vcpus:
            raise ValueError(f"{len(self.programs)} programs given for {self.vcpus} vCPUs")
        if len(self.sim_speeds) > self.vcpus or not all(s >= 0 and math.isfinite(s) for s in self.sim_speeds):
            raise ValueError(f"sim-speeds must be at most {self.vcpus} finite steps/s >= 0, not {self.sim_speeds}")
        if not 0 <= self.prefill <= 1:
            raise ValueError(f"prefill must be a share of memory from 0 to 1, not {self.prefill}")
        if not (self.timeslice > 0 and math.isfinite(self.timeslice)):
            raise ValueError(f"timeslice must be > 0 s, not {self.timeslice}")


class VmError(RuntimeError):
    pass


class Writers:
    """Names, classes and programs of a VM's writers (the emulator's and the simulator's)."""

    config: VmConfig
    programs: list[ProgramSpec]
    vcpus: Any
    dma: Any

    def vcpu_classes(self) -> list[str]:
        return [classify(p) for p in self.programs]

    def writer_names(self) -> list[str]:
        """Names of all_writers, in order: vcpu0, vcpu1, ..., then dma."""
        return [f"vcpu{i}" for i in range(len(self.vcpus))] + (["dma"] if self.dma else [])

    def writer_classes(self) -> list[str]:
        """Classes of all_writers: each vCPU's (writer/reader/idle), then device."""
        return self.vcpu_classes() + (["device"] if self.dma else [])

    def writer_programs(self) -> list[ProgramSpec]:
        return self.programs + ([self.config.dma] if self.config.dma else [])


def _available_ram() -> int | None:
    """MemAvailable in bytes (None where /proc/meminfo does not say)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_prefill_fits(config: VmConfig) -> None:
    """Prefilled pages are backed by RAM (written pages cannot stay unbacked): refuse a
    prefill the host cannot hold rather than let the kernel's OOM killer decide."""
    need = config.prefilled_pages * config.page_size
    free = _available_ram()
    if free is not None and need > free * 0.9:
        raise ValueError(
            f"prefill {config.prefill:g} writes {format_size(need)} of guest memory, but the host has only "
            f"{format_size(free)} available: lower the prefill or the memory (or use --engine sim)"
        )


class VM(Writers):
    """A running guest. `start()` launches the vCPU threads; `pause()`/`resume()` stop and
    restart them (pause returns once every vCPU is out of run()); `stop()` ends them."""

    def __init__(
        self, config: VmConfig, handler: ExitHandler | None = None, guest: _native.Guest | None = None
    ) -> None:
        """`guest` reuses existing memory (a migration destination's), which must match."""
        config.validate()
        self.config = config
        if guest is None:
            _check_prefill_fits(config)
            guest = _native.Guest(config.pages, config.page_size, config.vcpus, config.dirty_ring, config.pml)
            guest.fill(0, config.prefilled_pages)
        elif (guest.pages, guest.page_size, guest.vcpus, guest.dirty_ring, guest.pml) != (
            config.pages,
            config.page_size,
            config.vcpus,
            config.dirty_ring,
            config.pml and config.dirty_ring > 0,
        ):
            raise ValueError("the guest's memory does not match the VM configuration")
        self.guest = guest
        programs = config.programs or [ProgramSpec("idle")] * config.vcpus
        self.programs = list(programs)
        self.vcpus = [_native.Vcpu(self.guest, i, p.to_json(), config.pml_batch) for i, p in enumerate(programs)]
        self.dma = _native.Vcpu.device(self.guest, config.dma.to_json()) if config.dma else None
        self.handler: ExitHandler = handler or ContinueHandler()
        self.dirty_limiter: Any = None  # a policies.dirtylimit.DirtyLimiter once a limit is set
        # Called with False once a pause has stopped a running guest, with True when a resume
        # restarts a paused one: QEMU's STOP and RESUME events.
        self.on_run_state: Callable[[bool], None] | None = None
        # A migration failed past its point of no return: another copy of this guest may run
        # on the destination. Until the operator overrides (QMP cont with
        # x-override-split-brain-check), this copy neither resumes nor migrates again.
        self.switchover_unknown = False
        n = len(self.all_writers)
        self.sleep_ns = [0] * n  # throttle sleep per writer (vCPUs, then the DMA writer)
        self._sleep_started: list[float | None] = [None] * n  # a sleep in progress counts too
        self._sleep_until: list[float | None] = [None] * n  # the end of an uninterruptible one
        self.handler_ns = [0] * n  # time spent in the exit handler
        self._cpu_s = [0.0] * n  # last thread CPU time read per writer
        self.done = [False] * n
        self._cv = threading.Condition()
        self._paused = False
        self._stopping = False
        self._held = False  # start(): threads wait at their first step until all exist
        self._parked = 0
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._ran = [False] * n  # each writer came back from its first run()

    @property
    def all_writers(self) -> list[_native.Vcpu]:
        """The vCPUs, then the DMA writer if there is one."""
        return self.vcpus + ([self.dma] if self.dma else [])

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> VM:
        """Starts every writer's thread held at its first step, then releases them together:
        a thread start waits for the GIL, which running vCPUs would take every timeslice
        (256 vCPUs took a minute to start that way)."""
        if self._threads:
            raise VmError("VM already started")
        self._held = True
        for slot, (v, name) in enumerate(zip(self.all_writers, self.writer_names(), strict=True)):
            t = threading.Thread(target=self._vcpu_loop, args=(slot, v), name=name, daemon=True)
            self._threads.append(t)
            t.start()
        with self._cv:
            self._held = False
            self._cv.notify_all()
        return self

    def __enter__(self) -> VM:
        return self.start() if not self._threads else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._paused and not self._stopping

    def _kick_all(self) -> None:
        for v in self.all_writers:
            v.kick()

    def pause(self, timeout: float = JOIN_TIMEOUT_S) -> float:
        """Stops every vCPU (QEMU's `stop`): returns, once none is inside run() or its exit
        handler, the seconds that took (the stop latency). Interruptible throttle sleeps end
        at once; a vCPU in an uninterruptible one parks when it is over, and the wait allows
        `timeout` beyond the end of every such sleep."""
        t0 = time.monotonic()
        was_running = self.running
        with self._cv:
            self._paused = True
            self._cv.notify_all()  # ends interruptible throttle sleeps
        self._kick_all()
        live = sum(t.is_alive() for t in self._threads)
        with self._cv:
            while self._parked < self._live(live):
                ends = [t0] + [u for u in self._sleep_until if u is not None]
                left = max(ends) + timeout - time.monotonic()
                if left <= 0:
                    raise VmError(f"vCPUs did not stop within {timeout} s")
                self._cv.wait(left)
        if was_running and self.on_run_state is not None:
            self.on_run_state(False)
        return time.monotonic() - t0

    def wait_running(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Returns once every writer's thread has run its program (come back from a first
        run()); raises VmError if one failed or did not get there in time."""
        with self._cv:
            ok = self._cv.wait_for(lambda: self._errors or all(self._ran), timeout)
        if self._errors:
            raise VmError(f"a vCPU thread failed: {self._errors[0]!r}") from self._errors[0]
        if not ok:
            stuck = [n for n, ran in zip(self.writer_names(), self._ran, strict=True) if not ran]
            raise VmError(f"vCPUs did not start running within {timeout} s: {', '.join(stuck)}")

    def _live(self, started: int) -> int:
        return min(started, sum(t.is_alive() for t in self._threads))

    def resume(self) -> None:
        with self._cv:
            was_paused = self._paused and bool(self._threads) and not self._stopping
            self._paused = False
            self._cv.notify_all()
        if was_paused and self.on_run_state is not None:
            self.on_run_state(True)

    def vcpu_thread_id(self, index: int) -> int:
        """The host TID of vCPU `index`'s thread (0 before the VM starts)."""
        t = self._threads[index] if index < len(self._threads) else None
        return (t.native_id or 0) if t is not None else 0

    def stop(self, timeout: float = JOIN_TIMEOUT_S) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._kick_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise VmError(f"vCPU threads did not stop within {timeout} s: {', '.join(stuck)}")
        if self._errors:
            raise VmError(f"a vCPU thread failed: {self._errors[0]!r}") from self._errors[0]

    # -- the KVM_RUN loop ------------------------------------------------------------------

    def _vcpu_loop(self, slot: int, vcpu: _native.Vcpu) -> None:
        timeslice = self.config.timeslice
        with self._cv:
            while self._held and not self._stopping:
                self._cv.wait(0.5)
        try:
            while True:
                if self._paused or self._stopping:
                    if not self._park():
                        return
                    continue
                exit = vcpu.run(timeslice)
                if not self._ran[slot]:
                    with self._cv:
                        self._ran[slot] = True
                        self._cv.notify_all()
                if exit.reason == "DONE":
                    self.done[slot] = True
                    self._park_until_stop()
                    return
                t0 = time.perf_counter_ns()
                self.handler.handle_exit(self, vcpu, exit)
                self.handler_ns[slot] += time.perf_counter_ns() - t0
        except BaseException as e:  # surfaced by stop()
            self._errors.append(e)
            with self._cv:
                self._cv.notify_all()

    def _park(self) -> bool:
        """Waits out a pause; False when the VM is stopping."""
        with self._cv:
            self._parked += 1
            self._cv.notify_all()
            while self._paused and not self._stopping:
                self._cv.wait(0.5)
            self._parked -= 1
            return not self._stopping

    def _park_until_stop(self) -> None:
        """A finished program counts as parked for pause() and waits for stop()."""
        with self._cv:
            self._parked += 1
            self._cv.notify_all()
            while not self._stopping:
                self._cv.wait(0.5)

    def throttle_sleep(self, vcpu: _native.Vcpu, seconds: float, *, interruptible: bool = True) -> float:
        """Sleeps a throttled vCPU (GIL released); returns the time slept. An interruptible
        sleep ends at once when the VM pauses or stops; an uninterruptible one ends early only
        when the VM stops for good (`stop()`), and a pause waits for it."""
        if seconds <= 0:
            return 0.0
        slot = self.slot(vcpu)
        with self._cv:  # the sleep fields change together under the lock counters() takes
            t0 = self._sleep_started[slot] = time.monotonic()
            if interruptible:
                self._cv.wait_for(lambda: self._paused or self._stopping, seconds)
            else:
                self._sleep_until[slot] = t0 + seconds
                self._cv.wait_for(lambda: self._stopping, seconds)
                self._sleep_until[slot] = None
            slept = time.monotonic() - t0
            self._sleep_started[slot] = None
            self.sleep_ns[slot] += int(slept * 1e9)
        return slept

    def slot(self, vcpu: _native.Vcpu) -> int:
        """A writer's index in all_writers (vCPUs, then the DMA writer)."""
        return len(self.vcpus) if vcpu.is_device else vcpu.index  # type: ignore[return-value]

    @property
    def clock(self) -> Clock:
        """The emulator's time: the host's monotonic clock."""
        return time.monotonic

    def start_timer(self, period: Callable[[], float], tick: Callable[[float], None], name: str) -> _ThreadTimer:
        """Calls `tick(now)` on a thread of its own every `period()` seconds until stopped."""
        return _ThreadTimer(period, tick, name)

    # -- dirty logging ---------------------------------------------------------------------

    def start_dirty_log(self) -> None:
        """Clears and starts dirty logging, then waits until every vCPU has left run() once,
        as KVM makes vCPUs exit when a memslot starts logging: writes made before are visible
        to whoever reads memory next, and every later write is logged."""
        self.guest.start_dirty_log()
        _native.Vcpu.sync_all(self.all_writers)

    def stop_dirty_log(self) -> None:
        self.guest.stop_dirty_log()

    # -- inspection ------------------------------------------------------------------------

    def counters(self) -> list[dict]:
        """Native counters of every writer plus the VM's sleep and handler times."""
        out = []
        with self._cv:
            now = time.monotonic()
            sleep_ns = [
                ns + (int((now - started) * 1e9) if started is not None else 0)
                for ns, started in zip(self.sleep_ns, self._sleep_started, strict=True)
            ]
        for slot, v in enumerate(self.all_writers):
            c = v.counters()
            c["sleep_ns"] = sleep_ns[slot]
            c["handler_ns"] = self.handler_ns[slot]
            c["cpu_ns"] = int(self.cpu_time(slot) * 1e9)
            out.append(c)
        return out

    def cpu_time(self, slot: int) -> float:
        """CPU seconds the host has given writer `slot`'s thread (its thread CPU clock, read
        from outside: nothing on the vCPU's path). With the throttle sleeps and halts it
        tells a policy's slowdown from a busy host's: the rest of the wall time is steal."""
        t = self._threads[slot] if slot < len(self._threads) else None
        if t is None or t.ident is None or not t.is_alive():  # an ended thread's id may be reused
            return self._cpu_s[slot]
        try:
            self._cpu_s[slot] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, ProcessLookupError):  # the thread has ended: its last reading stands
            pass
        return self._cpu_s[slot]

    def memory_view(self):  # -> numpy.ndarray
        """A read-only numpy view of guest memory, one row per page."""
        import numpy as np

        return np.frombuffer(self.guest, dtype=np.uint8).reshape(self.guest.pages, self.guest.page_size)


class _ThreadTimer:
    """engine.Timer on a daemon thread: each round waits `period()` (read again every round)."""

    def __init__(self, period: Callable[[], float], tick: Callable[[float], None], name: str) -> None:
        self._period, self._tick = period, tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._period()):
            self._tick(time.monotonic())

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
