"""The throttling policy interface.

A policy is the VM's exit handler while a migration runs (its `handle_exit` runs on each
vCPU's thread) and follows the migration through its hooks: `start` right after the setup
sync (dirty-sync-count 1), `on_tick` at every 100 ms bandwidth window, `on_sync` at every
later dirty sync, `periodic_sync_due` between send steps, and `stop` at completion, failure
or cancel, when every throttle ends. Throttle sleeps go through `Host.throttle_sleep`. The
policy's decisions read `clock` (the host's by default), which tests replace.

A policy sees the VM and the migration only through `dqmig.engine` (Host, Writer, Exit,
MigrationView), so the same code runs on the emulator and on the simulator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dqmig.engine import Clock, Exit, Host, MigrationView, Writer

if TYPE_CHECKING:
    from dqmig.migration.params import MigrationParameters


class ContinueHandler:
    """The default: no throttling. Reaps a full dirty ring (then applies a dirty limit, if one
    is set) and turns off a spent quota that no policy owns, so the vCPU continues.

    The reap follows QEMU's KVM_EXIT_DIRTY_RING_FULL handling (kvm_cpu_exec): every ring
    while no dirty limit is in service, only the exiting vCPU's ring while one is
    (dirtylimit_in_service). Reaping every ring then would empty the other writers' rings
    before they fill, and they would miss the sleeps the controller counts on."""

    def handle_exit(self, vm: Host, vcpu: Writer, exit: Exit) -> None:
        if exit.reason == "DIRTY_RING_FULL":
            limiter = vm.dirty_limiter
            if limiter is not None and limiter.limiting and vcpu.index is not None:
                vm.guest.reap_vcpu(vcpu.index)
                limiter.on_ring_full(vm, vcpu)
            else:
                vm.guest.reap()
        elif exit.reason == "DIRTY_QUOTA_EXHAUSTED":
            vcpu.quota = 0


class Policy(ContinueHandler):
    """`none`: plain pre-copy. Reaps full dirty rings and otherwise lets vCPUs run."""

    name = "none"
    #: whether the simulator must deliver TIMESLICE exits (the emulator always does): only
    #: a policy that acts on them pays for one event per vCPU per timeslice
    wants_timeslices = False

    def __init__(self, vm: Host, params: MigrationParameters) -> None:
        self.vm = vm
        self.params = params
        #: the time the policy's decisions use: the host's clock unless a test replaces it
        self.clock: Clock = vm.clock
        self.migration: MigrationView | None = None
        self._saved_handler: Any = None
        self.active = False

    def start(self, migration: MigrationView) -> None:
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

    def on_tick(self, migration: MigrationView) -> None:
        pass

    def on_sync(self, migration: MigrationView) -> None:
        pass

    def periodic_sync_due(self, migration: MigrationView, t: float) -> bool:
        """Asked by the migration thread between send steps: True to sync now although the
        pending bytes do not fit yet (auto-converge's QEMU 9.2 timer)."""
        return False

    def query(self) -> dict[str, Any]:
        """Fields this policy adds to query-migrate."""
        return {}

    def sample(self) -> dict[str, Any]:
        """Telemetry this policy adds to each time-series sample."""
        return {}

    def slot(self, vcpu: Writer) -> int:
        """Index of a writer in VM.all_writers (vCPUs, then the DMA writer)."""
        return self.vm.slot(vcpu)
