"""The source's monitor: QMP commands over a VM and its migration, without any socket.

Each command takes the QMP `arguments` object and returns the `return` value, or raises
QmpError, which the server turns into `{"error": {"class": ..., "desc": ...}}`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

from dqmig.migration.params import MigrationParameters
from dqmig.migration.source import Migration
from dqmig.vm import VM


class QmpError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc, self.cls = desc, cls


class Monitor:
    def __init__(self, vm: VM, params: MigrationParameters | None = None) -> None:
        self.vm = vm
        self.params = params or MigrationParameters()
        self.migration: Migration | None = None  # the latest attempt
        self.attempts: list[Migration] = []  # every `migrate`, oldest first
        self.closing = False  # the process is ending: no new migration
        self._migrate_lock = threading.Lock()
        self.on_migrate: Callable[[Migration], None] | None = None  # e.g. the CLI's display
        self.commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "qmp_capabilities": lambda a: {},
            "query-status": self.query_status,
            "stop": self.stop,
            "cont": self.cont,
            "migrate-set-capabilities": self.migrate_set_capabilities,
            "migrate-set-parameters": self.migrate_set_parameters,
            "query-migrate-parameters": lambda a: self.params.as_qmp(),
            "query-migrate-capabilities": lambda a: self.params.capabilities_qmp(),
            "migrate": self.migrate,
            "query-migrate": self.query_migrate,
            "migrate_cancel": self.migrate_cancel,
            "set-vcpu-dirty-limit": self.set_vcpu_dirty_limit,
            "cancel-vcpu-dirty-limit": self.cancel_vcpu_dirty_limit,
            "query-vcpu-dirty-limit": self.query_vcpu_dirty_limit,
            "query-commands": lambda a: [{"name": n} for n in sorted(self.commands)],
        }

    def execute(self, command: str, arguments: dict[str, Any]) -> Any:
        fn = self.commands.get(command)
        if fn is None:
            raise QmpError(f"The command {command} has not been found", "CommandNotFound")
        return fn(arguments)

    @property
    def migrating(self) -> bool:
        return self.migration is not None and self.migration.active

    def query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        m = self.migration
        if m is not None and m.status == "completed":
            status = "postmigrate"
        elif m is not None and m.status == "device":
            status = "finish-migrate"
        elif self.vm.running:
            status = "running"
        else:
            status = "paused"
        return {"status": status, "running": status == "running", "singlestep": False}

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
            if m is not None and m.outcome_unknown and args.get("x-override-split-brain-check") is not True:
                raise QmpError(
                    "The switchover's outcome is unknown: the destination may be running this guest, and "
                    "running it here too would run it twice. Check the destination; to resume here anyway, "
                    "cont with x-override-split-brain-check: true"
                )
            self.vm.resume()
        return {}

    def _run_state(self) -> Any:
        """The latest migration's run-state lock: a stop or cont never interleaves with the
        switchover's stop of the vCPUs."""
        return self.migration.run_state_lock if self.migration is not None else contextlib.nullcontext()

    def _refuse_during_switchover(self, command: str) -> None:
        if self.migration is not None and self.migration.status == "device":
            raise QmpError(f"The migration is switching over: {command} is refused until it has failed or completed")

    def migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        """All or nothing. During a migration only dirty-quota may change (dqmig's live
        toggle, beyond QEMU): the migration switches policy at its next step."""
        caps = _arg(args, "capabilities", list)
        staged = self.params.copy()
        for c in caps:
            if not isinstance(c, dict) or set(c) != {"capability", "state"}:
                raise QmpError("Each capability needs exactly 'capability' and 'state'")
            if self.migrating and c["capability"] != "dirty-quota":
                raise QmpError("There's a migration process in progress")
            try:
                staged.set_capability(c["capability"], c["state"])
            except ValueError as e:
                raise QmpError(str(e)) from None
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

    def migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        uri = _arg(args, "uri", str)
        with self._migrate_lock:
            if self.migrating:
                raise QmpError("There's a migration process in progress")
            if self.migration is not None and self.migration.status == "completed":
                raise QmpError("The guest has already migrated")
            if self.closing:
                raise QmpError("dqmig is shutting down: no new migration")
            try:
                from dqmig.migration.channel import parse_uri

                parse_uri(uri)
            except ValueError as e:
                raise QmpError(str(e)) from None
            self.migration = Migration(self.vm, uri, self.params)
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
        return self.migration.query() if self.migration else {}

    def _limiter(self) -> Any:
        from dqmig.policies.dirtylimit import DirtyLimiter

        if self.vm.dirty_limiter is None:
            try:
                self.vm.dirty_limiter = DirtyLimiter(self.vm)
            except ValueError as e:
                raise QmpError(str(e)) from None
        return self.vm.dirty_limiter

    def set_vcpu_dirty_limit(self, args: dict[str, Any]) -> dict[str, Any]:
        rate = _arg(args, "dirty-rate", int)
        cpu = args.get("cpu-index")
        if cpu is not None and not isinstance(cpu, int):
            raise QmpError("Invalid parameter type for 'cpu-index', expected: int")
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
        if cpu is not None and not isinstance(cpu, int):
            raise QmpError("Invalid parameter type for 'cpu-index', expected: int")
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


def _arg(args: dict[str, Any], name: str, kind: type) -> Any:
    if name not in args:
        raise QmpError(f"Parameter '{name}' is missing")
    if not isinstance(args[name], kind):
        raise QmpError(f"Invalid parameter type for '{name}', expected: {kind.__name__}")
    return args[name]
