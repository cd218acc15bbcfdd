"""The throttling policy interface.

A policy is the VM's exit handler while a migration runs (its `handle_exit` runs on each
vCPU's thread) and follows the migration through its hooks: `start` right after the setup
sync (dirty-sync-count 1), `on_tick` at every 100 ms bandwidth window, `on_sync` at every
later dirty sync, `periodic_sync_due` between send steps, and `stop` at completion, failure
or cancel, when every throttle ends. Throttle sleeps go through `VM.throttle_sleep`. The
policy's decisions read `clock`, which tests replace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dqmig import _native
from dqmig.vm import VM, ContinueHandler

if TYPE_CHECKING:
    from dqmig.migration.params import MigrationParameters
    from dqmig.migration.source import Migration


def now() -> float:
    return time.monotonic()


class Policy(ContinueHandler):
    """`none`: plain pre-copy. Reaps full dirty rings and otherwise lets vCPUs run."""

    name = "none"
    #: the time the policy's decisions use (monotonic seconds)
    clock: Callable[[], float] = staticmethod(now)

    def __init__(self, vm: VM, params: MigrationParameters) -> None:
        self.vm = vm
        self.params = params
        self.migration: Migration | None = None
        self._saved_handler: Any = None
        self.active = False

    def start(self, migration: Migration) -> None:
        self.migration = migration
        self._saved_handler = self.vm.handler
        self.vm.handler = self
        self.active = True

    def stop(self) -> None:
        """Ends throttling: the VM gets its previous handler back."""
        if not self.active:
            return
        self.active = False
        if self.vm.handler is self:
            self.vm.handler = self._saved_handler

    def on_tick(self, migration: Migration) -> None:
        pass

    def on_sync(self, migration: Migration) -> None:
        pass

    def periodic_sync_due(self, migration: Migration, t: float) -> bool:
        """Asked by the migration thread between send steps: True to sync now although the
        pending bytes do not fit yet (auto-converge's QEMU 9.2 timer)."""
        return False

    def query(self) -> dict[str, Any]:
        """Fields this policy adds to query-migrate."""
        return {}

    def sample(self) -> dict[str, Any]:
        """Telemetry this policy adds to each time-series sample."""
        return {}

    def slot(self, vcpu: _native.Vcpu) -> int:
        """Index of a writer in VM.all_writers (vCPUs, then the DMA writer)."""
        return self.vm.slot(vcpu)
