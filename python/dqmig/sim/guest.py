"""The modelled guest: vCPUs (and a DMA writer) running the same program specs as the
emulator, dirtying memory in virtual time, with no per-page state.

Memory is cut into *atoms*: maximal page ranges written by the same writers the same way (a
vCPU's own region, the hot and cold parts of a hot-cold region, the pieces a shared DMA region
overlaps). An atom holds counts, not pages: pages in the dirty log (`log`), pages reaped from
rings since the last sync (`pend`), pages in the migration bitmap ahead of and behind the
migration's cursor, pages still zero and zero pages in the bitmap.

Dirtying, per atom of W pages receiving k page writes:
- random writes (uniform, hot-cold, read-mostly, DMA): by the exact expectation of distinct
  pages, a clean page stays clean with probability (1 - 1/W)^k, so the log grows
  `(W - log) * (1 - (1 - 1/W)^k)`;
- sequential writes (sequential, stress) by the atom's one writer: exactly, `min(W - log, k)`.
Newly dirtied pages count as each writer's clean-to-dirty transitions (its dirty counter,
quota and ring), split by the writers' shares of the atom's writes.

A writer progresses at its program's rate (or the flat-out `SPEED` of its kind) while it
runs, and not while it sleeps in a throttle, is stopped, or has finished. A rate-limited
writer has the emulator's token bucket: the tokens saved while it did not run (at most
RATE_BURST_S of its rate) are spent flat out when it runs again, so it catches up after
sleeps of up to 10 ms. Its exits
(DIRTY_QUOTA_EXHAUSTED when its counter reaches its quota, DIRTY_RING_FULL when its ring
reaches KVM's soft limit, TIMESLICE for a policy that wants them, DONE) are predicted in
closed form (or by bisection) and happen as events at the virtual time they would.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dqmig.engine import ExitHandler
from dqmig.policies.base import ContinueHandler
from dqmig.programs import ProgramSpec
from dqmig.vm import VmConfig, Writers

# Flat-out steps per CPU second of each program kind (an 8-byte write, a whole 4 KiB page for
# stress, a read and `compute` rotations for read-mostly), measured with the emulator on this
# project's machine (`dqmig run`, one vCPU); programs with a rate run at that rate.
SPEED = {"sequential": 2.0e7, "uniform": 1.5e7, "hot-cold": 1.5e7, "stress": 1.0e6, "read-mostly": 4.0e6}
READ_MOSTLY_COMPUTE = 256  # the compute the read-mostly speed was measured at; speed scales by it
RING_RESERVE = 64  # KVM's soft-full reserve
PML_BUFFER = 512  # Intel PML's buffer, reserved too with PML on
EPS = 1e-9
RATE_BURST_S = 0.01  # the emulator's token bucket holds at most this many seconds of a rate
INSTANT_BURST_S = 1e-4  # a catch-up burst shorter than this is written at once (see _write_at_once)
MAX_EXITS_AT_ONCE = 100_000  # exits of one writer at one instant: a handler that never lets it run


class SimError(RuntimeError):
    pass


class Atom:
    """A page range with one pattern of writers; all counts are pages."""

    __slots__ = (
        "start",
        "pages",
        "lam",
        "log",
        "pend",
        "ahead",
        "behind",
        "zero",
        "mig_zero",
        "writers",
        "rate",
        "t",
        "sequential",
        "carry",
    )

    def __init__(self, start: int, pages: int) -> None:
        self.start, self.pages = start, pages
        self.lam = -math.log1p(-1.0 / pages) if pages > 1 else 50.0  # -log(1 - 1/W)
        self.log = 0.0  # pages whose dirty bit is set (dirtied since the last clear)
        self.pend = 0.0  # ring mode: distinct pages reaped since the last sync
        self.ahead = 0  # pages in the migration bitmap at or past the cursor
        self.behind = 0  # ... before the cursor (sent after it wraps)
        self.zero = float(pages)  # pages never written
        self.mig_zero = 0.0  # zero pages in the migration bitmap
        self.writers: list[tuple[SimWriter, float]] = []  # (writer, page writes per step)
        self.rate = 0.0  # page writes/s of the running writers
        self.t = 0.0  # settled up to
        self.sequential = False  # one writer writing it in order
        self.carry = 0.0  # fractional new dirty pages not yet counted at a sync

    @property
    def mig(self) -> int:
        return self.ahead + self.behind

    def settle(self, t: float) -> None:
        """Advances the atom's counts to virtual time `t` at its writers' current rates."""
        dt = t - self.t
        if dt <= 0:
            return
        self.t = t
        rate = self.rate
        if rate <= 0:
            return
        new = self.write(rate * dt)
        if new <= 0:
            return
        if len(self.writers) == 1:
            self.writers[0][0].count += new
        else:
            for wr, per_step in self.writers:
                if wr.running:
                    wr.count += new * wr.step_rate * per_step / rate
                    wr.log_share[self] = wr.log_share.get(self, 0.0) + new * wr.step_rate * per_step / rate

    def write(self, k: float) -> float:
        """`k` page writes, spread over the atom as its writers spread them: the pages they
        newly dirty (added to the log) and the zero pages they touch."""
        clean = self.pages - self.log
        if self.sequential:
            new = min(clean, k)
            touched = min(self.zero, k)
            if self.zero > 0:
                self.mig_zero -= touched * self.mig_zero / self.zero
            self.zero -= touched
        else:
            keep = math.exp(-k * self.lam)
            new = clean * (1.0 - keep)
            self.zero *= keep
            self.mig_zero *= keep
        if new > 0:
            self.log += new
        return new

    def gain(self, writer: SimWriter, dt: float) -> float:
        """Transitions `writer` would cause here over the next `dt` seconds (rates as now)."""
        rate = self.rate
        if rate <= 0 or dt <= 0:
            return 0.0
        clean = self.pages - self.log
        share = writer.step_rate * self._per_step(writer) / rate
        if self.sequential:
            return min(clean, rate * dt) * share
        return clean * -math.expm1(-rate * dt * self.lam) * share

    def _per_step(self, writer: SimWriter) -> float:
        for wr, per_step in self.writers:
            if wr is writer:
                return per_step
        return 0.0

    def clear_log(self, writer: SimWriter | None = None) -> float:
        """Clears the dirty bits (of `writer`'s pages, or all); returns the pages cleared."""
        if writer is None or len(self.writers) == 1:
            cleared, self.log = self.log, 0.0
            for wr, _ in self.writers:
                wr.log_share.pop(self, None)
            return cleared
        cleared = min(writer.log_share.pop(self, 0.0), self.log)
        self.log -= cleared
        return cleared


class SimWriter:
    """A modelled vCPU (or the DMA writer): engine.Writer for the policies."""

    def __init__(self, vm: SimVM, slot: int, spec: ProgramSpec, index: int | None, speed: float = 0.0) -> None:
        self.vm = vm
        self.slot = slot
        self._index = index
        self.spec = spec
        self.kind = spec.kind
        if not speed:
            speed = SPEED.get(spec.kind, 0.0)
            if spec.kind == "read-mostly":
                speed *= READ_MOSTLY_COMPUTE / max(1.0, spec.params.get("compute", READ_MOSTLY_COMPUTE))
        self.speed = speed
        self.step_rate = 0.0 if spec.kind == "idle" else (min(spec.rate, speed) if spec.rate else speed)
        self.base_rate = self.step_rate  # step_rate is `speed` during a token burst
        self.cpu_share = self.step_rate / speed if speed else 0.0  # the rest of running time halts
        self.limited = 0 < self.step_rate < speed  # a rate limit: a token bucket (see SimVM._run)
        self.tokens = 0.0  # steps the bucket held when the writer last stopped running
        self.stopped_at: float | None = None  # when it last stopped running (its bucket refills)
        self.burst_until = 0.0  # running flat out on saved tokens until then
        self.due: str | None = None  # the exit its next event was predicted to be, if any
        self.targets: list[tuple[Atom, float]] = []
        self.sharing: list[SimWriter] = []  # the other writers of its atoms
        self.log_share: dict[Atom, float] = {}
        self.count = 0.0  # clean-to-dirty transitions (float: an expectation)
        self._quota = 0
        self.ring_base = 0.0  # count at the last reap of its ring
        self.running = False  # writing now (not asleep, stopped or done)
        self.state = "run"  # run | sleep | stop | done
        self.wake = 0.0
        self.interruptible = True
        self.sleep_started = 0.0
        self.run_start = 0.0  # when it last entered KVM_RUN (its timeslice counts from here)
        self.t = 0.0
        self.progress = 0.0
        self.cpu_s = self.halt_s = self.sleep_s = 0.0
        self.exits = {"DIRTY_QUOTA_EXHAUSTED": 0, "DIRTY_RING_FULL": 0, "TIMESLICE": 0, "KICK": 0, "DONE": 0}
        self.version = 0

    # -- engine.Writer

    @property
    def index(self) -> int | None:
        return self._index

    @property
    def is_device(self) -> bool:
        return self._index is None

    @property
    def dirty_count(self) -> int:
        self.vm.settle_writer(self)
        return int(self.count + EPS)

    @property
    def quota(self) -> int:
        return self._quota

    @quota.setter
    def quota(self, value: int) -> None:
        self._quota = int(value)
        self.vm.repredict(self)

    # -- time

    def settle(self, t: float) -> None:
        dt = t - self.t
        if dt <= 0:
            return
        self.t = t
        if self.state == "run":
            self.progress += self.step_rate * dt
            self.cpu_s += self.cpu_share * dt if self.speed else 0.0
            self.halt_s += (1.0 - self.cpu_share) * dt if self.speed else dt
        elif self.state == "sleep":
            self.sleep_s += dt


@dataclass
class SimExit:
    """engine.Exit."""

    reason: str
    count: int
    quota: int


class SimTimer:
    def __init__(self, vm: SimVM, period: Callable[[], float], tick: Callable[[float], None]) -> None:
        self.vm, self.period, self.tick = vm, period, tick
        self.stopped = False
        vm.schedule(vm.now + period(), self._fire)

    def _fire(self) -> None:
        if self.stopped:
            return
        self.tick(self.vm.now)
        if not self.stopped:
            self.vm.schedule(self.vm.now + self.period(), self._fire)

    @property
    def alive(self) -> bool:
        return not self.stopped

    def stop(self) -> None:
        self.stopped = True


class SimGuest:
    """engine.Memory: geometry, dirty logging and rings, and the migration bitmap's counts."""

    def __init__(self, vm: SimVM, config: VmConfig) -> None:
        self.vm = vm
        self.page_size = config.page_size
        self.pages = config.pages
        self.vcpus = config.vcpus
        self.dirty_ring = config.dirty_ring
        self.pml = config.pml and config.dirty_ring > 0
        reserve = RING_RESERVE + (PML_BUFFER if self.pml else 0)
        self.ring_soft = max(1, self.dirty_ring - reserve) if self.dirty_ring else 0
        self.logging = False
        self.atoms: list[Atom] = []

    def reap(self) -> None:
        for w in self.vm.all_writers:
            self.reap_writer(w, repredict=False)
        self.vm.repredict_all()

    def reap_vcpu(self, index: int) -> None:
        if not 0 <= index < len(self.vm.vcpus):
            raise IndexError(f"vCPU {index} out of range")
        self.reap_writer(self.vm.vcpus[index])

    def reap_writer(self, w: SimWriter, repredict: bool = True) -> None:
        """Moves `w`'s ring to the migration's set: its pages' dirty bits clear."""
        if not self.dirty_ring:
            return
        self.vm.settle_writer(w)
        if w.count - w.ring_base <= 0:
            return
        for atom, _ in w.targets:
            cleared = atom.clear_log(w)
            atom.pend += cleared - atom.pend * cleared / atom.pages
        w.ring_base = w.count
        if repredict:
            self.vm.repredict_sharing(w)


class SimVM(Writers):
    """engine.Host: the modelled VM and its event loop in virtual time."""

    def __init__(self, config: VmConfig, handler: ExitHandler | None = None) -> None:
        config.validate()
        self.config = config
        self.now = 0.0
        self._events: list[tuple[float, int, Any, Any]] = []  # see advance_to
        self._seq = 0
        self.guest = SimGuest(self, config)
        self.programs = list(config.programs or [ProgramSpec("idle")] * config.vcpus)
        speeds = list(config.sim_speeds) + [0.0] * (config.vcpus - len(config.sim_speeds))
        self.vcpus = [SimWriter(self, i, p, i, speeds[i]) for i, p in enumerate(self.programs)]
        self.dma = SimWriter(self, len(self.vcpus), config.dma, None) if config.dma else None
        self._writers = self.vcpus + ([self.dma] if self.dma else [])
        self.handler: ExitHandler = handler or ContinueHandler()
        self.dirty_limiter: Any = None
        self.done = [False] * len(self._writers)
        self.paused = False
        self.timeslice = config.timeslice
        self._wants_timeslices = False
        self._handling: SimWriter | None = None  # the writer whose event is being handled
        self._build_atoms()
        self.resume()

    # -- memory layout

    def _build_atoms(self) -> None:
        pages = self.config.pages
        cuts = {0, pages}
        pieces: list[tuple[SimWriter, int, int, float, bool]] = []  # writer, start, end, writes/page/step, seq
        for w in self._writers:
            spec = w.spec
            if spec.kind == "idle":
                continue
            start = spec.region_start
            n = spec.region_pages or pages - start
            if spec.kind in ("sequential", "stress"):
                pieces.append((w, start, start + n, 1.0 / n, True))
            elif spec.kind == "hot-cold":
                hot = min(n, max(1, math.ceil(n * spec.params["hot_fraction"])))
                p_hot = 1.0 if hot == n else spec.params["hot_probability"]
                pieces.append((w, start, start + hot, p_hot / hot, False))
                if hot < n:
                    pieces.append((w, start + hot, start + n, (1 - p_hot) / (n - hot), False))
            else:
                share = spec.params.get("write_share", 1.0) if spec.kind == "read-mostly" else 1.0
                pieces.append((w, start, start + n, share / n, False))
        for _, a, b, _, _ in pieces:
            cuts.update((a, b))
        bounds = sorted(cuts)
        self.guest.atoms = atoms = [Atom(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
        starts = [a.start for a in atoms]
        for w, a, b, per_page, seq in pieces:
            i = bisect.bisect_left(starts, a)
            while i < len(atoms) and atoms[i].start < b:
                atom = atoms[i]
                per_step = per_page * atom.pages
                atom.writers.append((w, per_step))
                atom.sequential = seq and len(atom.writers) == 1
                w.targets.append((atom, per_step))
                i += 1
        for w in self._writers:
            others = {o.slot: o for atom, _ in w.targets for o, _ in atom.writers if o is not w}
            w.sharing = list(others.values())  # writers whose exits move when w's rate does
        for atom in atoms:
            if len(atom.writers) > 1:
                atom.sequential = False
            written = min(atom.pages, max(0, self.config.prefilled_pages - atom.start))
            atom.zero = float(atom.pages - written)

    # -- engine.Host

    @property
    def clock(self) -> Callable[[], float]:
        return lambda: self.now

    @property
    def all_writers(self) -> list[SimWriter]:
        return self._writers

    @property
    def running(self) -> bool:
        return not self.paused

    def slot(self, vcpu: SimWriter) -> int:
        return vcpu.slot

    def throttle_sleep(self, vcpu: SimWriter, seconds: float, *, interruptible: bool = True) -> float:
        """The writer sleeps from now: it stops writing until `now + seconds` (or a stop, if
        interruptible). Returns the planned sleep."""
        if seconds <= 0 or self.paused:
            return 0.0
        self._halt(vcpu)
        vcpu.state = "sleep"
        vcpu.wake = self.now + seconds
        vcpu.sleep_started = self.now
        vcpu.interruptible = interruptible
        return seconds

    def start_timer(self, period: Callable[[], float], tick: Callable[[float], None], name: str) -> SimTimer:
        return SimTimer(self, period, tick)

    # -- dirty logging (the migration's side)

    def start_dirty_log(self) -> None:
        self.settle_all()
        for atom in self.guest.atoms:
            atom.log = atom.pend = 0.0
        for w in self._writers:
            w.log_share.clear()
            w.ring_base = w.count
        self.guest.logging = True
        self.repredict_all()

    def stop_dirty_log(self) -> None:
        self.guest.logging = False
        self.repredict_all()

    def harvest(self, ahead_fraction: Callable[[int], float]) -> int:
        """A dirty sync: the log (and, in ring mode, every ring and the reaped set) merges into
        the migration bitmap. Returns the pages newly dirty (an integer count, kept exact
        with each atom's rounding carry)."""
        self.settle_all()
        ring = bool(self.guest.dirty_ring)
        total = 0
        for i, atom in enumerate(self.guest.atoms):
            got = atom.log
            if ring:
                got = atom.pend + got - atom.pend * got / atom.pages
                atom.pend = 0.0
            atom.clear_log()
            if got <= 0:
                continue
            w = atom.pages
            mig = atom.mig
            new_f = got * (1.0 - mig / w) + atom.carry
            new = int(new_f)
            new = max(0, min(new, w - mig))
            atom.carry = new_f - new
            if new:
                # New dirty pages are spread over the atom: those past the cursor go this pass.
                frac = ahead_fraction(i)
                ahead = int(round(new * frac))
                atom.ahead += ahead
                atom.behind += new - ahead
                total += new
        for w in self._writers:
            w.log_share.clear()
            w.ring_base = w.count
        self.repredict_all()
        return total

    # -- time

    def schedule(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, None, fn))

    def advance_to(self, t: float) -> None:
        """Runs the guest to virtual time `t`: every exit and timer due by then, in order.
        An event is (time, sequence, writer, its prediction's version) or (time, sequence,
        None, a function): writers' events, by far the most, need no closure."""
        events = self._events
        pop = heapq.heappop
        while events and events[0][0] <= t:
            et, _, w, what = pop(events)
            if et > self.now:
                self.now = et
            if w is None:
                what()
            elif what == w.version:
                self._writer_event(w)
        if t > self.now:
            self.now = t

    def settle_writer(self, w: SimWriter) -> None:
        now = self.now
        for atom, _ in w.targets:
            if atom.t < now:
                atom.settle(now)
        if w.t < now:
            w.settle(now)

    def settle_all(self) -> None:
        now = self.now
        for atom in self.guest.atoms:
            atom.settle(now)
        for w in self._writers:
            w.settle(now)

    def _set_running(self, w: SimWriter, running: bool) -> None:
        """Changes whether `w` writes: its atoms are settled first (their rate changes)."""
        if w.running == running:
            return
        now = self.now
        for atom, _ in w.targets:
            if atom.t < now:
                atom.settle(now)
            if len(atom.writers) > 1:
                for other, _ in atom.writers:
                    if other is not w:
                        other.settle(now)
        w.running = running
        for atom, per_step in w.targets:
            atom.rate += (1 if running else -1) * w.step_rate * per_step
            if atom.rate < 1e-12:
                atom.rate = 0.0
        if w is not self._handling or w.sharing:  # else predicted once, at the end of its event
            self.repredict_sharing(w)

    def _halt(self, w: SimWriter) -> None:
        """`w` stops writing (a sleep or a stop): a rate-limited writer's bucket keeps the
        tokens of a burst cut short and refills from now."""
        if not w.running:
            return
        self.settle_writer(w)
        self._set_running(w, False)
        if w.limited:
            w.tokens = max(0.0, w.burst_until - self.now) * (w.speed - w.base_rate)
            w.step_rate, w.cpu_share, w.burst_until = w.base_rate, w.base_rate / w.speed, 0.0
            w.stopped_at = self.now

    def _run(self, w: SimWriter) -> None:
        """`w` writes again. A rate-limited writer first spends the tokens its bucket saved
        while it did not run (at most RATE_BURST_S of its rate) flat out, then runs at its
        rate: the emulator's token bucket (rust/src/vcpu.rs, take_token), which lets a
        throttled writer catch up after short sleeps. The caller has settled `w` and its
        atoms to now."""
        if w.limited and w.stopped_at is not None:
            cap = max(1.0, w.base_rate * RATE_BURST_S)
            tokens = min(cap, w.tokens + (self.now - w.stopped_at) * w.base_rate)
            w.stopped_at, w.tokens = None, 0.0
            burst_s = tokens / (w.speed - w.base_rate)
            if EPS < tokens and burst_s <= INSTANT_BURST_S and self._room_for(w, tokens):
                self._write_at_once(w, tokens, burst_s)
            elif tokens > EPS:
                w.step_rate, w.cpu_share = w.speed, 1.0
                w.burst_until = self.now + burst_s
        self._set_running(w, w.step_rate > 0)

    def _room_for(self, w: SimWriter, steps: float) -> bool:
        """`steps` more writes cannot reach `w`'s quota (an exit inside the burst, which the
        allocator would see as overshoot) nor overfill its ring (KVM's hard size). `w`'s count
        is settled to now."""
        limit = float(w._quota) if w._quota else math.inf
        if self.guest.dirty_ring and self.guest.logging and not w.is_device:
            limit = min(limit, w.ring_base + self.guest.dirty_ring)
        return w.count + steps < limit

    def _write_at_once(self, w: SimWriter, steps: float, burst_s: float) -> None:
        """A burst too short to matter as time (microseconds at a flat-out speed far above
        the rate): its `steps` beyond the rate are written now, without the two events and
        rate changes a timed burst costs. Its CPU time is counted as the burst's would be."""
        w.progress += steps
        w.cpu_s += burst_s * (1.0 - w.cpu_share)
        w.halt_s -= burst_s * (1.0 - w.cpu_share)
        shared = False
        for atom, per_step in w.targets:  # settled to now by the caller
            new = atom.write(steps * per_step)
            w.count += new
            if len(atom.writers) > 1:
                shared = True
                w.log_share[atom] = w.log_share.get(atom, 0.0) + new
        if shared:
            self.repredict_sharing(w)  # the other writers' clean pages are fewer

    def _end_burst(self, w: SimWriter) -> None:
        """The saved tokens are spent: back to the program's rate."""
        self.settle_writer(w)
        self._set_running(w, False)
        w.step_rate, w.cpu_share, w.burst_until = w.base_rate, w.base_rate / w.speed, 0.0
        self._set_running(w, True)

    # -- predictions

    def refresh(self) -> None:
        """After a policy hook: a policy that started or stopped wanting timeslice exits."""
        wants = bool(getattr(self.handler, "wants_timeslices", False))
        if wants != self._wants_timeslices:
            self._wants_timeslices = wants
            for w in self._writers:
                if w.state == "run":
                    w.run_start = self.now
            self.repredict_all()

    def repredict_all(self) -> None:
        for w in self._writers:
            self.repredict(w)

    def repredict_sharing(self, w: SimWriter) -> None:
        self.repredict(w)
        for other in w.sharing:
            self.repredict(other)

    def repredict(self, w: SimWriter) -> None:
        """Schedules `w`'s next event: waking, or its next exit. While `w`'s own event is
        being handled it is predicted once, at the end (`_writer_event`): a prediction made
        mid-handler would be superseded and only cost a stale heap entry."""
        if w is self._handling:
            return
        w.version += 1
        if self.paused or w.state in ("stop", "done"):
            return
        if w.state == "sleep":
            self._push(w, w.wake)
            return
        t = self._next_exit_time(w)
        if t < math.inf:
            self._push(w, t)

    def _push(self, w: SimWriter, t: float) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t if t > self.now else self.now, self._seq, w, w.version))

    def _target(self, w: SimWriter) -> float:
        """The dirty count at which `w` exits next (quota or ring), or inf."""
        target = math.inf
        if w._quota:
            target = float(w._quota)
        if self.guest.dirty_ring and self.guest.logging and not w.is_device:
            target = min(target, w.ring_base + self.guest.ring_soft)
        elif self.guest.dirty_ring and self.guest.logging and w.is_device:
            pass  # the DMA writer has no ring: its pages go to the bitmap
        return target

    def _next_exit_time(self, w: SimWriter) -> float:
        self.settle_writer(w)
        t = math.inf
        if self._wants_timeslices and not w.is_device:
            t = w.run_start + self.timeslice
        if w.burst_until > self.now:
            t = min(t, w.burst_until)
        if w.spec.steps and w.step_rate > 0:
            t = min(t, self.now + max(0.0, (w.spec.steps - w.progress) / w.step_rate))
        target = self._target(w)
        w.due = None
        if target < math.inf and w.running:
            need = target - w.count
            due = self.now if need <= EPS else self.now + self._time_to_gain(w, need, t - self.now)
            if due <= t:
                t = due
                w.due = "DIRTY_QUOTA_EXHAUSTED" if w._quota and target == w._quota else "DIRTY_RING_FULL"
        return t

    def _time_to_gain(self, w: SimWriter, need: float, horizon: float) -> float:
        """Seconds until `w` has caused `need` more transitions (inf if never at these rates)."""
        if len(w.targets) == 1:
            atom, per_step = w.targets[0]
            rate = atom.rate
            if rate <= 0:
                return math.inf
            share = w.step_rate * per_step / rate
            cap = (atom.pages - atom.log) * share
            if atom.sequential:
                return need / (rate * share) if need <= cap + EPS else math.inf
            if need >= cap:
                return math.inf
            return -math.log1p(-need / cap) / (rate * atom.lam)
        total = sum(a.gain(w, 1e12) for a, _ in w.targets)
        if need >= total:
            return math.inf
        hi = 1e-3
        while sum(a.gain(w, hi) for a, _ in w.targets) < need:
            hi *= 2
            if hi > horizon * 2 and hi > 1e9:
                return math.inf
        lo = 0.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if sum(a.gain(w, mid) for a, _ in w.targets) < need:
                lo = mid
            else:
                hi = mid
        return hi

    # -- events

    def _writer_event(self, w: SimWriter) -> None:
        """`w`'s current prediction is due (a superseded one never gets here)."""
        if self.paused:
            return
        self._handling = w
        try:
            self._handle_writer_event(w)
        finally:
            self._handling = None
        self.repredict(w)

    def _handle_writer_event(self, w: SimWriter) -> None:
        """`w`'s predicted event (woken, or an exit); `_writer_event` predicts its next."""
        if w.state == "sleep":
            self.settle_writer(w)
            w.state = "run"
            w.run_start = self.now
            self._run(w)
            return
        if w.state != "run":
            return
        self.settle_writer(w)
        if w.burst_until and self.now >= w.burst_until - EPS:
            self._end_burst(w)
        # The predicted exit is trusted: at a high rate the count can fall short of the
        # target by more than rounding allows for, and the time step left to close the gap
        # would be below the clock's resolution.
        reason = self._reason(w) or w.due
        if reason is None:
            return  # woken, or out of its burst: predicted again
        if reason == "DONE":
            w.exits["DONE"] += 1
            self._set_running(w, False)
            w.state = "done"
            self.done[w.slot] = True
            return
        if reason == "DIRTY_QUOTA_EXHAUSTED":
            w.count = max(w.count, float(w._quota))
        elif reason == "DIRTY_RING_FULL":
            w.count = max(w.count, w.ring_base + self.guest.ring_soft)
        w.exits[reason] += 1
        exit = SimExit(reason, int(w.count + EPS), w._quota)
        self.handler.handle_exit(self, w, exit)
        if w.state == "run":
            w.run_start = self.now
            self._guard(w)

    _last_exit: tuple[int, float, int] = (-1, -1.0, 0)

    def _guard(self, w: SimWriter) -> None:
        slot, t, n = self._last_exit
        n = n + 1 if (slot, t) == (w.slot, self.now) else 0
        self._last_exit = (w.slot, self.now, n)
        if n > MAX_EXITS_AT_ONCE:
            raise SimError(f"vcpu {w.slot} exits endlessly at t={self.now:.6f} s: its handler never lets it run")

    def _reason(self, w: SimWriter) -> str | None:
        if w.spec.steps and w.progress >= w.spec.steps - 1e-6:
            return "DONE"
        if w._quota and w.count >= w._quota - EPS and w.running:
            return "DIRTY_QUOTA_EXHAUSTED"
        ring = self.guest.dirty_ring and self.guest.logging and not w.is_device
        if ring and w.running and w.count >= w.ring_base + self.guest.ring_soft - EPS:
            return "DIRTY_RING_FULL"
        if self._wants_timeslices and not w.is_device and self.now >= w.run_start + self.timeslice - EPS:
            return "TIMESLICE"
        return None

    # -- run state

    def pause(self) -> float:
        """Stops every writer (QEMU's stop): interruptible sleeps end now; an uninterruptible
        one is waited for (virtual time runs on, timers fire) and that wait, the stop
        latency, is returned."""
        t0 = self.now
        latest = max([w.wake for w in self._writers if w.state == "sleep" and not w.interruptible], default=t0)
        self.settle_all()
        for w in self._writers:
            if w.state == "run" or (w.state == "sleep" and w.interruptible):
                self._halt(w)
                w.state = "stop"
            w.version += 1
        self.paused = True  # the sleepers' wake events are ignored: they park instead
        self.advance_to(latest)
        self.settle_all()
        for w in self._writers:
            if w.state == "sleep":
                w.state = "stop"
        return latest - t0

    def resume(self) -> None:
        self.paused = False
        self.settle_all()
        for w in self._writers:
            if w.state in ("stop", "run"):
                w.state = "run"
                w.run_start = self.now
                self._run(w)
        self.repredict_all()

    def counters(self) -> list[dict[str, Any]]:
        self.settle_all()
        out = []
        for w in self._writers:
            out.append(
                {
                    "pages_dirtied": int(w.count + EPS),
                    "progress": int(w.progress + 1e-6),
                    "sleep_ns": int(w.sleep_s * 1e9),
                    "cpu_ns": int(w.cpu_s * 1e9),
                    "halt_ns": int(w.halt_s * 1e9),
                    "quota": w._quota,
                    "exits": dict(w.exits),
                }
            )
        return out
