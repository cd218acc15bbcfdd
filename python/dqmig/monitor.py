"""The monitors: QMP commands over a VM and its migration, without any socket.

Each command has its QAPI argument schema (qapi.py checks the `arguments` with QEMU's
wording) and returns the `return` value, or raises QmpError, which the server turns into
`{"error": {"class": ..., "desc": ...}}`. `Monitor` is the source's, `IncomingMonitor` a
destination's. Both publish QEMU's events through `events` (MIGRATION, MIGRATION_PASS,
STOP, RESUME, SHUTDOWN), with QEMU's shape and timestamp.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from dqmig import __version__, dirtyrate
from dqmig.migration.params import ALL_CAPABILITIES, MigrationParameters
from dqmig.migration.source import Migration
from dqmig.qapi import MIGRATION_CHANNEL, Enum, List, QmpError, Struct, channels_uri, check
from dqmig.vm import VM

__all__ = ["QEMU_VERSION", "EventHub", "IncomingMonitor", "Monitor", "QmpError", "qmp_migration_info"]

# The QEMU whose QMP dqmig follows: its schema (qapi/*.json), replies and events. The
# fidelity work measured against QEMU 10.0.2 (docs/results.md).
QEMU_VERSION = (10, 0, 2)

NO_ARGS = Struct({})
CAPABILITY_LIST = Struct({"capabilities": List(Struct({"capability": Enum(ALL_CAPABILITIES), "state": "bool"}))})
DIRTY_RATE_MODES = ("page-sampling", "dirty-ring", "dirty-bitmap")
MIN_CALC_TIME_MS, MAX_CALC_TIME_MS = 100, 60_000  # migration/dirtyrate.c
MIN_SAMPLE_PAGES, MAX_SAMPLE_PAGES = 128, 16384
DEFAULT_SAMPLE_PAGES = 512


def version_info() -> dict[str, Any]:
    """query-version: QEMU's version whose behaviour is emulated; dqmig's own in `package`."""
    major, minor, micro = QEMU_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"dqmig {__version__}"}


class EventHub:
    """QEMU's events (monitor_qapi_event_emit): every negotiated QMP session gets each one.
    Subscribers must not block: the emitter may be the migration or a vCPU thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []

    def subscribe(self, fn: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            self._subscribers.append(fn)

    def unsubscribe(self, fn: Callable[[dict[str, Any]], None]) -> None:
        with self._lock:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """qmp_event_build_dict: {"event", "data" (if the event has any), "timestamp"}."""
        now = time.time_ns() // 1000
        event: dict[str, Any] = {"event": name}
        if data is not None:
            event["data"] = data
        event["timestamp"] = {"seconds": now // 1_000_000, "microseconds": now % 1_000_000}
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            fn(event)


class _Common:
    """What the source's and a destination's monitors share: the commands any QEMU
    answers, events, quit."""

    def __init__(self, params: MigrationParameters | None) -> None:
        self.params = params or MigrationParameters()
        self.events = EventHub()
        self.quit_requested = threading.Event()  # `quit`: the process ends (the CLI's loop)
        self.name: str | None = None
        self.commands: dict[str, tuple[Any, Callable[[dict[str, Any]], Any]]] = {
            "qmp_capabilities": (Struct({"*enable": List(Enum(("oob",)))}), lambda a: {}),
            "query-version": (NO_ARGS, lambda a: version_info()),
            "query-name": (NO_ARGS, lambda a: {"name": self.name} if self.name else {}),
            # dqmig emulates KVM's interfaces (KVM_RUN exits, dirty log, dirty ring)
            "query-kvm": (NO_ARGS, lambda a: {"enabled": True, "present": True}),
            "query-commands": (NO_ARGS, lambda a: [{"name": n} for n in sorted(self.commands)]),
            "quit": (NO_ARGS, self.quit),
            "query-status": (NO_ARGS, self.query_status),
            "query-migrate": (NO_ARGS, self.query_migrate),
            "migrate-set-capabilities": (CAPABILITY_LIST, self.migrate_set_capabilities),
            "migrate-set-parameters": (None, self.migrate_set_parameters),
            "query-migrate-parameters": (NO_ARGS, lambda a: self.params.as_qmp()),
            "query-migrate-capabilities": (NO_ARGS, lambda a: self.params.capabilities_qmp()),
            "query-cpus-fast": (NO_ARGS, self.query_cpus_fast),
        }

    def execute(self, command: str, arguments: dict[str, Any]) -> Any:
        entry = self.commands.get(command)
        if entry is None:
            raise QmpError(f"The command {command} has not been found", "CommandNotFound")
        schema, fn = entry
        if schema is not None:  # None: the command checks its members itself
            check(schema, arguments)
        return fn(arguments)

    def quit(self, args: dict[str, Any]) -> dict[str, Any]:
        """qmp_quit: the reply goes out first; the process's loop then sends SHUTDOWN
        (`shutdown`) and ends."""
        self.quit_requested.set()
        return {}

    def shutdown(self, reason: str = "host-qmp-quit") -> None:
        """The SHUTDOWN event QEMU sends as it ends (qemu_system_shutdown)."""
        self.events.emit("SHUTDOWN", {"guest": False, "reason": reason})

    def _vm_events(self, vm: VM) -> None:
        vm.on_run_state = lambda running: self.events.emit("RESUME" if running else "STOP")

    def _migration_event(self, name: str, data: dict[str, Any]) -> None:
        """MIGRATION and MIGRATION_PASS go out only with the `events` capability on, checked
        when they happen (migrate_generate_event, migration_bitmap_sync)."""
        if name == "MIGRATION" and data.get("status") == "device":
            return  # QEMU stays "active" through stop-and-copy (see qmp_migration_info)
        if self.params.capabilities["events"]:
            self.events.emit(name, data)

    def migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def migrate_set_parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        staged = self.params.copy()
        for name, value in args.items():
            try:
                staged.set(name, value)
            except ValueError as e:
                raise QmpError(str(e)) from None
        # All or nothing: apply only when every parameter was valid. A running migration
        # reads its parameters live (downtime-limit and max-bandwidth take effect at once).
        for name in args:
            attr = name.replace("-", "_")
            setattr(self.params, attr, getattr(staged, attr))
        return {}

    def _stage_capabilities(self, args: dict[str, Any], locked: Callable[[str], bool]) -> MigrationParameters:
        """migrate-set-capabilities is all or nothing: every entry is checked on a copy."""
        staged = self.params.copy()
        for c in args["capabilities"]:
            if locked(c["capability"]):
                raise QmpError("There's a migration process in progress")
            try:
                staged.set_capability(c["capability"], c["state"])
            except ValueError as e:
                raise QmpError(str(e)) from None
        return staged

    def query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def query_cpus_fast(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError


def cpus_fast(vm: VM | None) -> list[dict[str, Any]]:
    """query-cpus-fast as QEMU answers for x86 with -smp N (one socket of N cores): one entry
    per vCPU, its thread-id the vCPU thread's TID."""
    if vm is None:
        return []
    return [
        {
            "cpu-index": i,
            "qom-path": f"/machine/unattached/device[{i}]",
            "thread-id": vm.vcpu_thread_id(i),
            "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
            "target": "x86_64",
        }
        for i in range(len(vm.vcpus))
    ]


class Monitor(_Common):
    def __init__(self, vm: VM, params: MigrationParameters | None = None) -> None:
        super().__init__(params)
        self.vm = vm
        self.migration: Migration | None = None  # the latest attempt
        self.attempts: list[Migration] = []  # every `migrate`, oldest first
        self.closing = False  # the process is ending: no new migration
        self._migrate_lock = threading.Lock()
        self.on_migrate: Callable[[Migration], None] | None = None  # e.g. the CLI's display
        self._dirty_rate: dict[str, Any] | None = None  # the latest calc-dirty-rate
        self._vm_events(vm)
        cpu = Struct({"*cpu-index": "int"})
        self.commands.update(
            {
                "stop": (NO_ARGS, self.stop),
                "cont": (Struct({"*x-override-split-brain-check": "bool"}), self.cont),
                "migrate": (
                    Struct({"*uri": "str", "*channels": List(MIGRATION_CHANNEL), "*detach": "bool", "*resume": "bool"}),
                    self.migrate,
                ),
                "migrate_cancel": (NO_ARGS, self.migrate_cancel),
                "query-migrationthreads": (NO_ARGS, self.query_migrationthreads),
                "set-vcpu-dirty-limit": (
                    Struct({"*cpu-index": "int", "dirty-rate": "uint64"}),
                    self.set_vcpu_dirty_limit,
                ),
                "cancel-vcpu-dirty-limit": (cpu, self.cancel_vcpu_dirty_limit),
                "query-vcpu-dirty-limit": (NO_ARGS, self.query_vcpu_dirty_limit),
                "calc-dirty-rate": (
                    Struct(
                        {
                            "calc-time": "int",
                            "*calc-time-unit": Enum(("second", "millisecond")),
                            "*sample-pages": "int",
                            "*mode": Enum(DIRTY_RATE_MODES),
                        }
                    ),
                    self.calc_dirty_rate,
                ),
                "query-dirty-rate": (
                    Struct({"*calc-time-unit": Enum(("second", "millisecond"))}),
                    self.query_dirty_rate,
                ),
            }
        )

    def query_cpus_fast(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return cpus_fast(self.vm)

    @property
    def migrating(self) -> bool:
        return self.migration is not None and self.migration.active

    def query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        m = self.migration
        if m is not None and m.status == "completed":
            status = "postmigrate"
        elif self._switching_over():
            status = "finish-migrate"
        elif self.vm.running:
            status = "running"
        else:
            status = "paused"
        return {"running": status == "running", "status": status}

    def stop(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._run_state():
            self._refuse_during_switchover("stop")
            self.vm.pause()
        return {}

    def cont(self, args: dict[str, Any]) -> dict[str, Any]:
        """Refused from the switchover's stop until the migration has failed or completed,
        after completion, and after a failure past the point of no return, unless
        `x-override-split-brain-check` is true: the destination may be running the guest."""
        with self._run_state():
            self._refuse_during_switchover("cont")
            m = self.migration
            if m is not None and m.status == "completed":
                raise QmpError("Migration is complete: the guest runs on the destination; cannot cont")
            if self.vm.switchover_unknown:
                if args.get("x-override-split-brain-check") is not True:
                    raise QmpError(SPLIT_BRAIN + "to resume here anyway, cont with x-override-split-brain-check: true")
                self.vm.switchover_unknown = False  # the operator has decided: this copy is the guest
            self.vm.resume()
        return {}

    def _run_state(self) -> Any:
        """The latest migration's run-state lock: a stop or cont never interleaves with the
        switchover's stop of the vCPUs."""
        return self.migration.run_state_lock if self.migration is not None else contextlib.nullcontext()

    def _switching_over(self) -> bool:
        """From the switchover's stop of the vCPUs until the migration has ended (a cancel
        meanwhile included: the vCPUs stay stopped until it has)."""
        m = self.migration
        return m is not None and m.active and m.t_stop is not None

    def _refuse_during_switchover(self, command: str) -> None:
        if self._switching_over():
            raise QmpError(f"The migration is switching over: {command} is refused until it has failed or completed")

    def migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        """All or nothing. During a migration only dirty-quota may change (dqmig's live
        toggle, beyond QEMU): the migration switches policy at its next step."""
        staged = self._stage_capabilities(args, lambda name: self.migrating and name != "dirty-quota")
        try:
            staged.check_capabilities(self.vm.guest.dirty_ring)
        except ValueError as e:
            raise QmpError(str(e)) from None
        self.params.capabilities = staged.capabilities
        if self.migrating:
            from dqmig.policies import policy_name

            assert self.migration is not None
            self.migration.request_policy(policy_name(self.params), "migrate-set-capabilities")
        return {}

    def migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """qmp_migrate: `uri` or, QEMU 8.2+, `channels` (exactly one of them)."""
        if ("uri" in args) == ("channels" in args):
            raise QmpError("need either 'uri' or 'channels' argument")
        if args.get("resume"):
            raise QmpError("Cannot resume if there is no paused migration")
        uri = args["uri"] if "uri" in args else channels_uri(args["channels"])
        with self._migrate_lock:
            if self.migrating:
                raise QmpError("There's a migration process in progress")
            if self.migration is not None and self.migration.status == "completed":
                raise QmpError("The guest has already migrated")
            if self.vm.switchover_unknown:
                raise QmpError(SPLIT_BRAIN + "migrating this copy could run the guest in a third place")
            rate = self._dirty_rate
            if rate is not None and rate["status"] == "measuring" and rate["mode"] != "page-sampling":
                raise QmpError(f"calc-dirty-rate (mode {rate['mode']}) is using the dirty log: migrate when it ends")
            if self.closing:
                raise QmpError("dqmig is shutting down: no new migration")
            try:
                from dqmig.migration.channel import parse_uri

                parse_uri(uri)
            except ValueError as e:
                raise QmpError(str(e)) from None
            self.migration = Migration(self.vm, uri, self.params)
            self.migration.on_event = self._migration_event
            self.attempts.append(self.migration)
            if self.on_migrate:
                self.on_migrate(self.migration)
            self.migration.start()
        return {}

    def close_migrations(self) -> Migration | None:
        """Refuses every later `migrate`; returns the last attempt, which can no longer change."""
        with self._migrate_lock:
            self.closing = True
            return self.migration

    def query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        return qmp_migration_info(self.migration) if self.migration else {}

    def query_migrationthreads(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        """QEMU 9.0+'s thread names: the migration thread, then each multifd sender; only
        while they run (migration_threads_add/remove)."""
        m = self.migration
        if m is None or not m.active:
            return []
        threads = [("mig/src/main", m.thread_id)]
        threads += [(f"mig/src/send_{i}", tid) for i, tid in enumerate(m.multifd_thread_ids())]
        return [{"name": n, "thread-id": tid} for n, tid in threads if tid is not None]

    def calc_dirty_rate(self, args: dict[str, Any]) -> dict[str, Any]:
        """qmp_calc_dirty_rate: starts a measurement on a thread of its own; query-dirty-rate
        reads it. dqmig's measurements are dirtyrate.py's three modes."""
        unit = args.get("calc-time-unit", "second")
        ms = args["calc-time"] * (1000 if unit == "second" else 1)
        mode = args.get("mode", "page-sampling")
        if not MIN_CALC_TIME_MS <= ms <= MAX_CALC_TIME_MS:
            raise QmpError(f"Calculation time is out of range [{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms].")
        sample_pages = args.get("sample-pages", DEFAULT_SAMPLE_PAGES)
        if "sample-pages" in args:
            if mode != "page-sampling":
                raise QmpError("sample-pages is used only in page-sampling mode")
            if not MIN_SAMPLE_PAGES <= sample_pages <= MAX_SAMPLE_PAGES:
                raise QmpError(f"sample-pages is out of range[{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}].")
        if (mode == "dirty-ring") != bool(self.vm.guest.dirty_ring) and mode != "page-sampling":
            raise QmpError(f"mode {mode} is not enabled, use other method instead.")
        with self._migrate_lock:  # a migrate never starts between this check and the start
            self._start_dirty_rate(mode, ms, unit, args["calc-time"], sample_pages)
        return {}

    def _start_dirty_rate(self, mode: str, ms: int, unit: str, calc_time: int, sample_pages: int) -> None:
        if self._dirty_rate is not None and self._dirty_rate["status"] == "measuring":
            raise QmpError("the dirty rate is already being measured.")
        if mode != "page-sampling" and self.migrating:
            # QEMU gives each dirty-log client its own bitmap; dqmig's guest has one log, and
            # a migration owns it until it ends.
            raise QmpError(f"mode {mode} needs the dirty log, which the running migration owns: use page-sampling")
        info: dict[str, Any] = {
            "status": "measuring",
            "start-time": int(time.time()),
            "calc-time": calc_time,
            "calc-time-unit": unit,
            "sample-pages": sample_pages if mode == "page-sampling" else 0,
            "mode": mode,
        }
        self._dirty_rate = info

        def measure() -> None:
            try:
                if mode == "page-sampling":
                    rate = dirtyrate.page_sampling(self.vm, ms / 1000, pages_per_gib=sample_pages)
                else:
                    rate = dirtyrate.MODES[mode](self.vm, ms / 1000)
            except (ValueError, OSError) as e:
                info["x-dqmig-error"] = str(e)
                rate = None
            if rate is not None:
                info["dirty-rate"] = rate.dirty_rate
                if mode == "dirty-ring":
                    info["vcpu-dirty-rate"] = [{"id": i, "dirty-rate": r} for i, r in enumerate(rate.vcpu_dirty_rate)]
            info["status"] = "measured"

        threading.Thread(target=measure, name="mig/dirtyrate", daemon=True).start()

    def query_dirty_rate(self, args: dict[str, Any]) -> dict[str, Any]:
        """query-dirty-rate (DirtyRateInfo): `dirty-rate` once measured."""
        info = self._dirty_rate
        if info is None:
            return {
                "status": "unstarted",
                "start-time": 0,
                "calc-time": 0,
                "calc-time-unit": "second",
                "sample-pages": DEFAULT_SAMPLE_PAGES,
                "mode": "page-sampling",
            }
        out = {k: v for k, v in info.items() if not (k == "dirty-rate" and info["status"] != "measured")}
        if args.get("calc-time-unit", info["calc-time-unit"]) != info["calc-time-unit"]:
            factor = 1000 if info["calc-time-unit"] == "second" else 1 / 1000
            out["calc-time"], out["calc-time-unit"] = int(info["calc-time"] * factor), args["calc-time-unit"]
        return out

    def _limiter(self) -> Any:
        from dqmig.policies.dirtylimit import DirtyLimiter

        if self.vm.dirty_limiter is None:
            try:
                self.vm.dirty_limiter = DirtyLimiter(self.vm)
            except ValueError as e:
                raise QmpError(str(e)) from None
        return self.vm.dirty_limiter

    def set_vcpu_dirty_limit(self, args: dict[str, Any]) -> dict[str, Any]:
        rate = args["dirty-rate"]
        cpu = args.get("cpu-index")
        if rate < 1:
            raise QmpError("Parameter 'dirty-rate' expects a rate >= 1 MB/s")
        limiter = self._limiter()
        self._check_dirty_limit_allowed("set")
        try:
            limiter.set(rate, cpu)
        except ValueError as e:
            raise QmpError(str(e)) from None
        return {}

    def cancel_vcpu_dirty_limit(self, args: dict[str, Any]) -> dict[str, Any]:
        cpu = args.get("cpu-index")
        if self.vm.dirty_limiter is not None:
            self._check_dirty_limit_allowed("cancel")
            try:
                self.vm.dirty_limiter.cancel(cpu)
            except ValueError as e:
                raise QmpError(str(e)) from None
        return {}

    def _check_dirty_limit_allowed(self, verb: str) -> None:
        """dirtylimit_is_allowed: while a migration with the dirty-limit capability runs and
        a limit is in service, the migration owns the limits."""
        limiter = self.vm.dirty_limiter
        if self.migrating and self.params.capabilities["dirty-limit"] and limiter is not None and limiter.limiting:
            raise QmpError(f"can't {verb} dirty page rate limit while migration is running")

    def query_vcpu_dirty_limit(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.vm.dirty_limiter.query() if self.vm.dirty_limiter is not None else []

    def migrate_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.migration is not None:
            self.migration.cancel()
        return {}


SPLIT_BRAIN = (
    "The last switchover's outcome is unknown: the destination may be running this guest, and "
    "running it here too would run it twice. Check the destination; "
)


# -- query-migrate, as QEMU 10.0 fills it (migration/migration.c) -------------------------------

ACTIVE_STATUSES = ("active", "cancelling")  # populate_time_info and populate_ram_info


def qmp_migration_info(m: Migration) -> dict[str, Any]:
    """fill_source_migration_info: in setup only `status`; while active (and cancelling) the
    times, expected-downtime and every MigrationStats field; at completion downtime, with
    `remaining` and `dirty-pages-rate` 0; after a failure or cancel `status` and
    `error-desc`. `cpu-throttle-percentage` appears only while the CPU throttle is on, the
    dirty-limit fields only while a limit is in service (the policies report them so). What
    dqmig adds (its own measures, and a failed attempt's counters) is under `x-dqmig`."""
    internal = m.query()
    # dqmig's "device" is its stop-and-copy; QEMU enters DEVICE only with
    # pause-before-switchover (migration_maybe_pause), which dqmig does not emulate, and
    # otherwise stays ACTIVE until completed. query-status says finish-migrate meanwhile.
    status = "active" if internal["status"] == "device" else internal["status"]
    out: dict[str, Any] = {"status": status}
    if status in (*ACTIVE_STATUSES, "completed"):
        out["setup-time"] = internal["setup-time"]
        out["total-time"] = internal["total-time"]
        if status == "completed":
            out["downtime"] = internal["downtime"]
        else:
            out["expected-downtime"] = internal.get("expected-downtime", m.params.downtime_limit)
        ram = dict(internal["ram"])
        ram["mbps"] = float(ram["mbps"])
        ram["multifd-bytes"] = ram["transferred"] if m.multifd else 0
        ram.update({"postcopy-requests": 0, "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 0})
        if status == "completed":
            ram["remaining"] = ram["dirty-pages-rate"] = 0
        out["ram"] = ram
        if internal.get("cpu-throttle-percentage"):
            out["cpu-throttle-percentage"] = internal["cpu-throttle-percentage"]
        for key in ("dirty-limit-throttle-time-per-round", "dirty-limit-ring-full-time"):
            if key in internal:
                out[key] = internal[key]
    # qmp_migrate_cancel sets no error (migration_cancel(NULL)): a cancelled migration has
    # no error-desc in QEMU; dqmig's reason for it stays under x-dqmig.
    if "error-desc" in internal and status != "cancelled":
        out["error-desc"] = internal["error-desc"]
    if status != "setup":
        extra = {k: v for k, v in internal.items() if k not in out and k != "cpu-throttle-percentage"}
        if extra:
            out["x-dqmig"] = extra
    return out


# -- a destination's monitor ---------------------------------------------------------------------


class IncomingMonitor(_Common):
    """`dqmig incoming --qmp`: query-status (inmigrate, then running), query-migrate of the
    incoming side, events, and `-incoming defer`: `migrate-incoming` starts listening."""

    def __init__(
        self, params: MigrationParameters | None = None, accept_timeout: float | None = None, mem_prealloc: bool = False
    ) -> None:
        super().__init__(params)
        self.accept_timeout, self.mem_prealloc = accept_timeout, mem_prealloc
        self.deferred = False  # started as `-incoming defer`
        self.incoming: Any = None  # the destination.Incoming once listening
        self.result: Any = None
        self.vm: VM | None = None
        self.error: str | None = None
        self.status = "none"
        self.address: tuple[str, int] | None = None  # where it listens (host, port)
        self.ended = threading.Event()  # the incoming migration completed or failed
        self._lock = threading.Lock()
        self.commands.update(
            {
                "migrate-incoming": (
                    Struct({"*uri": "str", "*channels": List(MIGRATION_CHANNEL), "*exit-on-error": "bool"}),
                    self.migrate_incoming,
                ),
                "query-migrationthreads": (NO_ARGS, lambda a: []),
            }
        )

    def _set_status(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self._migration_event("MIGRATION", {"status": status})

    def listen(self, uri: str) -> Any:
        """Starts listening on `uri` and receiving on a thread of its own; returns the
        destination.Incoming (its `address` is where it listens)."""
        from dqmig.migration.destination import Incoming, IncomingError

        with self._lock:
            if self.incoming is not None:
                raise QmpError("The incoming migration has already been started")
            try:
                self.incoming = Incoming(uri, accept_timeout=self.accept_timeout, mem_prealloc=self.mem_prealloc)
            except (ValueError, OSError) as e:
                raise QmpError(str(e)) from None
        self.address = self.incoming.listener.getsockname()[:2]
        self.incoming.on_handshake = lambda: self._set_status("active")
        self._set_status("setup")

        def receive() -> None:
            try:
                self.result = self.incoming.run()
            except (IncomingError, OSError, ValueError) as e:
                self.error = str(e)
                self._set_status("failed")
            else:
                self.vm = self.result.vm
                self.events.emit("RESUME")  # the guest runs here (vm_start), then completed
                if self.vm is not None:
                    self._vm_events(self.vm)
                self._set_status("completed")
            finally:
                self.ended.set()

        threading.Thread(target=receive, name="mig/dst/main", daemon=True).start()
        return self.incoming

    def migrate_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        """qmp_migrate_incoming: only with `-incoming defer` (dqmig incoming defer)."""
        if not self.deferred:
            raise QmpError("'-incoming' was not specified on the command line")
        if ("uri" in args) == ("channels" in args):
            raise QmpError("need either 'uri' or 'channels' argument")
        self.listen(args["uri"] if "uri" in args else channels_uri(args["channels"]))
        return {}

    def migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        staged = self._stage_capabilities(args, lambda name: self.status in ("active",))
        self.params.capabilities = staged.capabilities
        return {}

    def query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.vm is None:
            return {"running": False, "status": "inmigrate"}
        running = self.vm.running
        return {"running": running, "status": "running" if running else "paused"}

    def query_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """fill_destination_migration_info: the status and where it listens."""
        if self.status == "none":
            return {}
        out: dict[str, Any] = {"status": self.status}
        if self.address is not None:
            host, port = self.address
            out["socket-address"] = [{"type": "inet", "host": host, "port": str(port)}]
        if self.error:
            out["error-desc"] = self.error
        return out

    def query_cpus_fast(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return cpus_fast(self.vm)
