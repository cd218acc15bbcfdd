"""Throttling policies, each selected by a QEMU-style migration capability."""

from __future__ import annotations

from dqmig.engine import Host
from dqmig.migration.params import MigrationParameters
from dqmig.policies.autoconverge import AutoConverge
from dqmig.policies.base import Policy
from dqmig.policies.dirtylimit import DirtyLimit
from dqmig.policies.dirtyquota import DirtyQuota

POLICIES: dict[str, type[Policy]] = {
    "none": Policy,
    "auto-converge": AutoConverge,
    "dirty-limit": DirtyLimit,
    "dirty-quota": DirtyQuota,
}


def policy_name(params: MigrationParameters) -> str:
    for name in ("dirty-quota", "dirty-limit", "auto-converge"):
        if params.capabilities[name]:
            return name
    return "none"


def make_policy(vm: Host, params: MigrationParameters, name: str | None = None) -> Policy:
    """The policy the capabilities select (or `name`), after QEMU's combination checks."""
    if name is None:
        params.check_capabilities(vm.guest.dirty_ring)
        name = policy_name(params)
    return POLICIES[name](vm, params)


def select(params: MigrationParameters, name: str) -> None:
    """Sets the capabilities for policy `name` (the CLI's --policy)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    for cap in ("auto-converge", "dirty-limit", "dirty-quota"):
        params.set_capability(cap, cap == name)
