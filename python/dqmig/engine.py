"""The engine boundary: everything a throttling policy may use of a running VM and migration.

Two engines implement it. The emulator (`dqmig.vm.VM`, `dqmig.migration.source.Migration`)
runs real vCPU threads against real memory and a real TCP stream, on the host's monotonic
clock; the simulator (`dqmig.sim`) models the guest and the link in virtual time. The
policies (`dqmig.policies`) import this module and nothing of either engine, so the same
policy code, unchanged, runs on both.

Time: a policy reads time only through `Host.clock` (or its own `clock`, which defaults to
it and which tests replace). A policy never sees that clock go backwards. Periodic work of a
policy (dirty-limit's controller) runs through `Host.start_timer`, which the emulator runs
on a thread and the simulator as events in virtual time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

Clock = Callable[[], float]  # seconds, never decreasing


class Writer(Protocol):
    """A vCPU (or the DMA writer): its dirty counter and its dirty quota (0 = off)."""

    @property
    def index(self) -> int | None: ...  # the vCPU index; None for the DMA writer

    @property
    def is_device(self) -> bool: ...

    @property
    def dirty_count(self) -> int: ...  # clean-to-dirty transitions it caused

    quota: int


class Exit(Protocol):
    """Why a vCPU left KVM_RUN: DIRTY_QUOTA_EXHAUSTED, DIRTY_RING_FULL, TIMESLICE, KICK."""

    @property
    def reason(self) -> str: ...

    @property
    def count(self) -> int: ...

    @property
    def quota(self) -> int: ...


class Memory(Protocol):
    """The guest's memory as a policy sees it: its geometry and the dirty rings."""

    @property
    def page_size(self) -> int: ...

    @property
    def pages(self) -> int: ...

    @property
    def dirty_ring(self) -> int: ...  # entries per vCPU; 0 = dirty bitmap

    def reap(self) -> Any: ...  # every vCPU's ring into the migration's set

    def reap_vcpu(self, index: int) -> Any: ...  # one vCPU's ring


class ExitHandler(Protocol):
    """What a throttling policy implements: called at every exit of a writer."""

    def handle_exit(self, vm: Any, vcpu: Any, exit: Any) -> None: ...


class Timer(Protocol):
    @property
    def alive(self) -> bool:
        """Whether it still fires (a tick that raised ends the emulator's timer thread)."""

    def stop(self) -> None: ...


class Host(Protocol):
    """A running VM."""

    guest: Memory
    vcpus: Sequence[Writer]
    dma: Writer | None
    handler: ExitHandler
    dirty_limiter: Any  # the VM's policies.dirtylimit.DirtyLimiter once a limit is set
    done: list[bool]  # per writer: its program has finished

    @property
    def clock(self) -> Clock: ...

    @property
    def all_writers(self) -> Sequence[Writer]: ...  # the vCPUs, then the DMA writer

    @property
    def running(self) -> bool: ...

    def slot(self, vcpu: Writer) -> int: ...  # index in all_writers

    def vcpu_classes(self) -> list[str]: ...  # writer / reader / idle per vCPU

    def throttle_sleep(self, vcpu: Writer, seconds: float, *, interruptible: bool = True) -> float:
        """Sleeps the writer that is in its exit handler; returns the time slept (the
        simulator: the time it will sleep). Interruptible sleeps end at a stop."""
        ...

    def start_timer(self, period: Callable[[], float], tick: Callable[[float], None], name: str) -> Timer:
        """Calls `tick(now)` every `period()` seconds (read again each round) until stopped."""
        ...


class MigrationView(Protocol):
    """What a policy reads of the migration it throttles (query-migrate's counters)."""

    page_size: int
    t_start: float
    dirty_sync_count: int
    transferred: int  # bytes
    new_dirty_pages: int  # pages newly dirtied, summed over syncs
    bandwidth: float  # bytes/s over the last 100 ms window

    @property
    def remaining(self) -> int: ...  # bytes

    def request_policy(self, name: str, reason: str) -> None:
        """Switch policies at the migration's next step (dirty quota's fallback)."""
        ...
