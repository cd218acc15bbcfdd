"""QEMU's QAPI argument checks, with QEMU's wording (qapi/qobject-input-visitor.c,
qapi/qapi-visit-core.c): a command's `arguments` are visited against its schema, so an
unknown member is "Parameter 'x' is unexpected", a missing one "Parameter 'x' is missing",
and a wrong type "Invalid parameter type for 'x', expected: integer" (or QEMU's other forms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class QmpError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc, self.cls = desc, cls


@dataclass(frozen=True)
class Enum:
    values: tuple[str, ...]


@dataclass(frozen=True)
class List:
    item: Any


@dataclass(frozen=True)
class Struct:
    """Members by name; a name starting with '*' is optional."""

    members: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Union:
    """A flat union: the base's `discriminator` member picks which variant's members apply."""

    base: dict[str, Any]
    discriminator: str
    variants: dict[str, Any]  # members, or a Union


_UINT_MAX = {"uint8": 0xFF, "uint16": 0xFFFF, "uint32": 0xFFFFFFFF}


def _type_error(name: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{name}', expected: {expected}")


def check(schema: Any, value: Any, name: str = "", short: str | None = None) -> Any:
    """Checks `value` against `schema`; returns it. `name` is QEMU's full name of the
    member (`capabilities[0].state`), `short` the bare name some of QEMU's errors use
    (`None` for a list element, which QEMU calls 'null')."""
    if isinstance(schema, Struct | Union):
        if not isinstance(value, dict):
            raise _type_error(name or "<anonymous>", "object")
        members = dict(schema.members) if isinstance(schema, Struct) else dict(schema.base)
        if isinstance(schema, Union):
            key = schema.discriminator
            if key not in value:
                raise QmpError(f"Parameter '{_join(name, key)}' is missing")
            variant = schema.variants[check(members[key], value[key], _join(name, key))]
            if isinstance(variant, Union):  # a union inside a union: its base joins ours
                return check(Union({**members, **variant.base}, variant.discriminator, variant.variants), value, name)
            members.update(variant)
        return _check_members(members, value, name)
    if isinstance(schema, List):
        if not isinstance(value, list):
            raise _type_error(name, "array")
        return [check(schema.item, v, f"{name}[{i}]", None) for i, v in enumerate(value)]
    if isinstance(schema, Enum):
        if not isinstance(value, str):
            raise _type_error(name, "string")
        if value not in schema.values:
            raise QmpError(f"Parameter '{short or 'null'}' does not accept value '{value}'")
        return value
    if schema == "str":
        if not isinstance(value, str):
            raise _type_error(name, "string")
    elif schema == "bool":
        if not isinstance(value, bool):
            raise _type_error(name, "boolean")
    elif schema == "int":
        if not _is_int(value) or not -(1 << 63) <= value < 1 << 63:
            raise _type_error(name, "integer")
    elif schema in ("uint64", "size", "uint8", "uint16", "uint32"):
        # qobject_input_type_uint64 (negative int64 accepted, cast as QEMU does), then
        # visit_type_uintN's range check
        if not _is_int(value) or not -(1 << 63) <= value < 1 << 64:
            raise QmpError(f"Parameter '{name}' expects uint64")
        if schema in _UINT_MAX and value % (1 << 64) > _UINT_MAX[schema]:
            raise QmpError(f"Parameter '{short or 'null'}' expects {schema}_t")
    elif schema == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(name, "number")
    elif schema == "StrOrNull":
        if value is not None and not isinstance(value, str):
            raise _type_error(short or "null", "StrOrNull")
    elif schema != "any":
        raise AssertionError(f"unknown schema type {schema!r}")
    return value


def _check_members(members: dict[str, Any], value: dict[str, Any], name: str) -> dict[str, Any]:
    known = {m.lstrip("*") for m in members}
    for m, kind in members.items():
        key = m.lstrip("*")
        if key in value:
            check(kind, value[key], _join(name, key), key)
        elif not m.startswith("*"):
            raise QmpError(f"Parameter '{_join(name, key)}' is missing")
    for key in value:  # qobject_input_check_struct, after the members were visited
        if key not in known:
            raise QmpError(f"Parameter '{_join(name, key)}' is unexpected")
    return value


def _join(name: str, key: str) -> str:
    return f"{name}.{key}" if name else key


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- migration addresses (qapi/migration.json MigrationChannel, qapi/sockets.json) ------------

INET = {
    "host": "str",
    "port": "str",
    "*numeric": "bool",
    "*to": "uint16",
    "*ipv4": "bool",
    "*ipv6": "bool",
    "*keep-alive": "bool",
    "*keep-alive-count": "uint32",
    "*keep-alive-idle": "uint32",
    "*keep-alive-interval": "uint32",
    "*mptcp": "bool",
}
SOCKET_ADDRESS = Union(
    {"type": Enum(("inet", "unix", "vsock", "fd"))},
    "type",
    {
        "inet": INET,
        "unix": {"path": "str", "*abstract": "bool", "*tight": "bool"},
        "vsock": {"cid": "str", "port": "str"},
        "fd": {"str": "str"},
    },
)
MIGRATION_ADDRESS = Union(
    {"transport": Enum(("socket", "exec", "rdma", "file"))},
    "transport",
    {
        "socket": SOCKET_ADDRESS,
        "exec": {"args": List("str")},
        "rdma": INET,
        "file": {"filename": "str", "offset": "uint64"},
    },
)
MIGRATION_CHANNEL = Struct({"channel-type": Enum(("main", "cpr")), "addr": MIGRATION_ADDRESS})


def channels_uri(channels: list[dict[str, Any]]) -> str:
    """The tcp: URI of a `migrate`/`migrate-incoming` `channels` list (QEMU 8.2+), with
    QEMU's errors for its shape; dqmig moves memory over TCP only."""
    check(List(MIGRATION_CHANNEL), channels, "channels")
    kinds = [c["channel-type"] for c in channels]
    for kind in set(kinds):
        if kinds.count(kind) > 1:
            raise QmpError(f"Channel list has more than one {kind} entry")
    main = [c for c in channels if c["channel-type"] == "main"]
    if not main:
        raise QmpError("Channel list has no main entry")
    if len(channels) > 1:
        raise QmpError("dqmig does not emulate cpr-transfer: give only a main channel")
    addr = main[0]["addr"]
    if addr["transport"] != "socket" or addr.get("type") != "inet":
        kind = addr["transport"] if addr["transport"] != "socket" else f"socket type {addr.get('type')}"
        raise QmpError(f"dqmig migrates over TCP only (transport socket, type inet), not {kind}")
    host = addr["host"]
    return f"tcp:[{host}]:{addr['port']}" if ":" in host else f"tcp:{host}:{addr['port']}"
