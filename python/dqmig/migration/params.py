"""Migration parameters and capabilities, with QEMU's names, units and defaults.

Every parameter and capability of QEMU 10.0 (qapi/migration.json) is accepted and reported.
Those dqmig does not emulate take their default, or a value that changes nothing here (the
tuning of a feature that is off); any other value is refused with an error naming it.
dqmig's own parameters carry QEMU's `x-` prefix for experimental ones.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from dqmig.qapi import Enum, List, QmpError, check
from dqmig.units import MiB

# Capabilities dqmig emulates. The wire carries these as bits, in this order.
CAPABILITIES = ("multifd", "auto-converge", "dirty-limit", "dirty-quota")
# QEMU 10.0's MigrationCapability, in its order (query-migrate-capabilities lists them so),
# then dqmig's dirty-quota. `events` is emulated too (MIGRATION and MIGRATION_PASS events).
QEMU_CAPABILITIES = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo",
    "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
    "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
    "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit",
    "mapped-ram",
)  # fmt: skip
ALL_CAPABILITIES = (*QEMU_CAPABILITIES, "dirty-quota")
EMULATED_CAPABILITIES = frozenset(CAPABILITIES) | {"events"}


@dataclass(frozen=True)
class Param:
    default: Any
    kind: type  # int, float, bool or str
    lo: float = 0
    hi: float = 1 << 62
    doc: str = ""
    qtype: Any = None  # QAPI type (qapi.check); None: from kind (uint64, number, bool)
    emulated: Any = True  # True, or the values dqmig emulates (others are refused)


def _qemu(default: Any, qtype: Any, lo: float = 0, hi: float = 1 << 62, doc: str = "", emulated: Any = True) -> Param:
    kind = bool if qtype == "bool" else str if qtype in ("StrOrNull", "str") or isinstance(qtype, Enum) else int
    return Param(default, kind, lo, hi, doc, qtype, emulated)


_COMPRESSION = Enum(("none", "zlib", "zstd", "qatzip", "qpl", "uadk"))


PARAMS: dict[str, Param] = {
    # QEMU's, that only tune what dqmig has not got (self-announce of a NIC, COLO, xbzrle,
    # postcopy, multifd compression levels): any valid value is kept and reported
    "announce-initial": _qemu(50, "size", 0, 100_000, "ms (no NIC: no effect)"),
    "announce-max": _qemu(550, "size", 0, 100_000, "ms (no NIC: no effect)"),
    "announce-rounds": _qemu(5, "size", 0, 1000, "(no NIC: no effect)"),
    "announce-step": _qemu(100, "size", 1, 10_000, "ms (no NIC: no effect)"),
    # QEMU's, emulated
    "throttle-trigger-threshold": Param(50, int, 1, 100, "% of transferred bytes dirtied that triggers", "uint8"),
    "cpu-throttle-initial": Param(20, int, 1, 99, "%", "uint8"),
    "cpu-throttle-increment": Param(10, int, 1, 99, "%", "uint8"),
    "cpu-throttle-tailslow": Param(False, bool, doc="smaller increments near the ideal"),
    # TLS: not emulated; only plain text (tls-creds empty)
    "tls-creds": _qemu("", "StrOrNull", doc="TLS credentials: dqmig has no TLS", emulated=("",)),
    "tls-hostname": _qemu("", "StrOrNull", doc="(no TLS: no effect)"),
    "tls-authz": _qemu("", "StrOrNull", doc="(no TLS: no effect)"),
    "max-bandwidth": Param(128 * MiB, int, 0, 1 << 62, "bytes/s; 0 = unlimited", "size"),
    "avail-switchover-bandwidth": Param(
        0, int, 0, 1 << 62, "bytes/s the switchover may use; 0 = the measured bandwidth", "size"
    ),
    "downtime-limit": Param(300, int, 0, 2_000_000, "ms", "uint64"),
    "x-checkpoint-delay": _qemu(200, "uint32", doc="ms between COLO checkpoints (no COLO: no effect)"),
    "multifd-channels": Param(2, int, 1, 255, "page channels with multifd", "uint8"),
    "xbzrle-cache-size": _qemu(64 * MiB, "size", doc="bytes (no xbzrle: no effect)"),
    "max-postcopy-bandwidth": _qemu(0, "size", doc="bytes/s (no postcopy: no effect)"),
    "max-cpu-throttle": Param(99, int, 1, 99, "%", "uint8"),
    "multifd-compression": _qemu("none", _COMPRESSION, doc="dqmig sends pages uncompressed", emulated=("none",)),
    "multifd-zlib-level": _qemu(1, "uint8", 0, 9, "(no compression: no effect)"),
    "multifd-qatzip-level": _qemu(1, "uint8", 1, 9, "(no compression: no effect)"),
    "multifd-zstd-level": _qemu(1, "uint8", 0, 20, "(no compression: no effect)"),
    "mode": _qemu("normal", Enum(("normal", "cpr-reboot", "cpr-transfer")), doc="only normal", emulated=("normal",)),
    "zero-page-detection": _qemu(
        "multifd",
        Enum(("none", "legacy", "multifd")),
        doc="dqmig always detects zero pages",
        emulated=("legacy", "multifd"),
    ),
    "direct-io": _qemu(False, "bool", doc="(file migration only: not emulated)", emulated=(False,)),
    # QEMU's migration property: the dirty log is cleared (re-protected) in chunks of 2^shift
    # pages just before a chunk's first page is sent; dqmig: 0 clears it at the sync
    "x-clear-bitmap-shift": Param(18, int, 0, 31, "dirty-log clear chunk: 2^shift pages; 0 = at the sync", "uint8"),
    "x-cpu-throttle-periodic-sync": Param(
        True, bool, doc="QEMU 9.2+: a 5 s timer syncs when no sync came since its last tick; off: never"
    ),
    # dirty-limit (QEMU 8.1)
    "x-vcpu-dirty-limit-period": Param(1000, int, 1, 1000, "ms between dirty-rate measurements", "uint64"),
    "vcpu-dirty-limit": Param(1, int, 1, 1 << 40, "MB/s per vCPU once triggered", "uint64"),
    "x-dirty-limit-interruptible": Param(False, bool, doc="a stop ends dirty-limit's sleeps (QEMU's do not end)"),
    # dirty quota (the KVM/QEMU patch series, done as intended, and beyond)
    "x-dirty-quota-interval": Param(10, int, 1, 1000, "ms per quota interval"),
    "x-dirty-quota-window": Param(500, int, 1, 60_000, "ms of throughput measurements averaged"),
    # The RFC's budget is the measured throughput (ratio 1); only its initial estimate is halved.
    # A ratio > 1 is dqmig's extension: headroom for the network.
    "x-dirty-quota-ratio": Param(1.0, float, 0.1, 100, "dirty budget = throughput / ratio (the RFC: 1)"),
    "x-dirty-quota-initial-throughput": Param(125_000_000, int, 1, 1 << 40, "bytes/s assumed at first"),
    "x-dirty-quota-dma": Param(True, bool, doc="the DMA writer gets its quota from the same budget"),
    "x-dirty-quota-skip-bulk": Param(False, bool, doc="no throttling during the first (bulk) iteration"),
    "x-dirty-quota-fallback": Param(True, bool, doc="fall back to auto-converge when over-throttling"),
    # dqmig: give up when pre-copy does not converge (guestperf: 30 iterations or 300 s); 0 = never
    "x-max-iterations": Param(0, int, 0, 1 << 31),
    "x-max-time": Param(0.0, float, 0, 1e9, "s"),
}


class MigrationParameters:
    """QEMU's `migrate-set-parameters` and `migrate-set-capabilities` state. Attributes use
    _ for QEMU's - (`p.downtime_limit`); `set` takes QEMU's names and checks type and range."""

    def __init__(self, **overrides: Any) -> None:
        self.capabilities: dict[str, bool] = dict.fromkeys(ALL_CAPABILITIES, False)
        self.block_bitmap_mapping: list[Any] | None = None  # never set
        for name, spec in PARAMS.items():
            setattr(self, _attr(name), spec.default)
        for attr, value in overrides.items():
            self.set(attr.replace("_", "-"), value)

    def __getattr__(self, attr: str) -> Any:  # only for type checkers; real values are set above
        raise AttributeError(attr)

    def copy(self) -> MigrationParameters:
        p = MigrationParameters()
        p.__dict__.update(self.__dict__)
        p.capabilities = dict(self.capabilities)
        return p

    def set(self, name: str, value: Any) -> None:
        """QEMU's checks, in its order and wording: the QAPI type (qapi.check), then the
        range (migrate_params_check); then whether dqmig emulates the value."""
        key = name.replace("_", "-")
        if key == "block-bitmap-mapping":  # reported only once set, as in QEMU
            _checked(List("any"), value, key)
            if value:
                raise ValueError(f"Parameter '{key}': dqmig has no block devices, so only [] is accepted")
            self.block_bitmap_mapping = []
            return
        spec = PARAMS.get(key)
        if spec is None:
            raise ValueError(f"Parameter '{name}' is unexpected")
        _checked(spec.qtype or _QTYPE[spec.kind], value, key)
        if spec.kind is str:
            value = "" if value is None else value  # StrOrNull: null means ""
        elif spec.kind is not bool:
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"Parameter '{name}' expects a finite number, not {value}")
            if not spec.lo <= value <= spec.hi:  # before any conversion: 10**400 is an int too
                raise ValueError(
                    f"Parameter '{name}' expects a value in [{spec.lo:g}, {spec.hi:g}], not {_show_number(value)}"
                )
            value = spec.kind(value)
        if spec.emulated is not True and value not in spec.emulated:
            allowed = " or ".join(_show(v) for v in spec.emulated)
            raise ValueError(f"Parameter '{key}': dqmig does not emulate {_show(value)}; it accepts only {allowed}")
        setattr(self, _attr(name), value)

    def set_capability(self, name: str, state: bool) -> None:
        if name not in self.capabilities:
            raise ValueError(f"Capability '{name}' is unknown; known: {', '.join(ALL_CAPABILITIES)}")
        if not isinstance(state, bool):
            raise ValueError(f"Capability '{name}' state must be true or false")
        if state and name not in EMULATED_CAPABILITIES:
            raise ValueError(f"Capability '{name}': dqmig does not emulate it; it can only be false")
        self.capabilities[name] = state

    def check_capabilities(self, dirty_ring: int) -> None:
        """QEMU's combination checks."""
        caps = self.capabilities
        if caps["dirty-limit"] and caps["auto-converge"]:
            raise ValueError("dirty-limit conflicts with auto-converge, only one of them is available currently")
        if caps["dirty-quota"] and (caps["auto-converge"] or caps["dirty-limit"]):
            raise ValueError("dirty-quota conflicts with auto-converge and dirty-limit: choose one throttle")
        if caps["dirty-limit"] and not dirty_ring:
            raise ValueError("dirty-limit requires the dirty ring (a guest with dirty-ring-size set)")

    def as_qmp(self) -> dict[str, Any]:
        """query-migrate-parameters."""
        out = {name: getattr(self, _attr(name)) for name in PARAMS}
        if self.block_bitmap_mapping is not None:
            out["block-bitmap-mapping"] = self.block_bitmap_mapping
        return out

    def capabilities_qmp(self) -> list[dict[str, Any]]:
        """query-migrate-capabilities."""
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    def capability_bits(self) -> int:
        return sum(1 << i for i, c in enumerate(CAPABILITIES) if self.capabilities.get(c))

    @property
    def channels(self) -> int:
        """Page channels: multifd-channels with multifd, else the main channel alone."""
        return self.multifd_channels if self.capabilities["multifd"] else 1


def value_of(name: str, value: Any) -> Any:
    """A parameter's value from text as users write it ('1Gbit' or '125M' for max-bandwidth,
    'on'/'off'/'true'/'false', numbers), or an already typed value (TOML, JSON), which
    `MigrationParameters.set` then checks. Errors name the parameter."""
    name = name.replace("_", "-")
    spec = PARAMS.get(name)
    if spec is None:
        raise ValueError(f"unknown migration parameter {name!r}")
    if not isinstance(value, str):
        return value
    text = value.strip()
    if spec.kind is str:
        return text
    if name == "max-bandwidth":
        return parse_bandwidth(text)
    if spec.kind is bool:
        if text in ("on", "true", "off", "false"):
            return text in ("on", "true")
        raise ValueError(f"{name}: expected on or off, not {text!r}")
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number") from None
    return int(number) if spec.kind is int and number.is_integer() else number


_QTYPE = {bool: "bool", int: "uint64", float: "number"}


def _checked(qtype: Any, value: Any, name: str) -> None:
    try:
        check(qtype, value, name, name)
    except QmpError as e:
        raise ValueError(e.desc) from None


def _show(value: Any) -> str:
    return json.dumps(value)


def _show_number(value: float) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


def _attr(name: str) -> str:
    return name.replace("-", "_")


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?)(bit|b|B|bps)?(/s)?\s*$")


def parse_bandwidth(text: str | int) -> int:
    """Bytes/s from '134217728', '125M' (bytes, binary like QEMU's size suffixes), '1Gbit'
    or '100Mbit' (bits, decimal as network rates are), or '0' (unlimited)."""
    if isinstance(text, int):
        return text
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"bad bandwidth {text!r}: expected e.g. 134217728, 125M, 1Gbit, 100Mbit")
    number, prefix, binary, unit = float(m.group(1)), m.group(2).lower(), m.group(3), m.group(4)
    if not math.isfinite(number) or number > 1e30:
        raise ValueError(f"bad bandwidth {text[:40]!r}: too large (at most {1 << 62} bytes/s)")
    power = "kmgt".index(prefix) + 1 if prefix else 0
    if unit in ("bit", "bps"):
        return int(number * (1024 if binary else 1000) ** power / 8)
    return int(number * 1024**power)
