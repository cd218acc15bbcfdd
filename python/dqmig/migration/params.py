"""Migration parameters and capabilities, with QEMU's names, units and defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from dqmig.units import MiB

# Capabilities (migrate-set-capabilities). The wire carries them as bits.
CAPABILITIES = ("multifd",)


@dataclass
class MigrationParameters:
    """QEMU's `migrate-set-parameters` fields (attribute names use _ for QEMU's -)."""

    downtime_limit: int = 300  # ms
    max_bandwidth: int = 128 * MiB  # bytes/s; 0 = unlimited
    multifd_channels: int = 2
    # dqmig's own, experimental (x-): give up when pre-copy does not converge, as guestperf
    # does after 30 iterations or 300 s. 0 = no cap.
    x_max_iterations: int = 0
    x_max_time: float = 0.0  # s
    capabilities: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(CAPABILITIES, False))

    def set(self, name: str, value: Any) -> None:
        """Sets one parameter by its QEMU name, checking type and range."""
        attr = name.replace("-", "_")
        kinds = {f.name: f.type for f in fields(self) if f.name != "capabilities"}
        if attr not in kinds:
            raise ValueError(f"Parameter '{name}' is unexpected")
        want = float if kinds[attr] in (float, "float") else int
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"Parameter '{name}' expects a number")
        value = want(value)
        _check_range(name, value)
        setattr(self, attr, value)

    def set_capability(self, name: str, state: bool) -> None:
        if name not in self.capabilities:
            raise ValueError(f"Capability '{name}' is unknown; known: {', '.join(CAPABILITIES)}")
        if not isinstance(state, bool):
            raise ValueError(f"Capability '{name}' state must be true or false")
        self.capabilities[name] = state

    def as_qmp(self) -> dict[str, Any]:
        """query-migrate-parameters."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if f.name != "capabilities"}

    def capabilities_qmp(self) -> list[dict[str, Any]]:
        """query-migrate-capabilities."""
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    def capability_bits(self) -> int:
        return sum(1 << i for i, c in enumerate(CAPABILITIES) if self.capabilities.get(c))

    @property
    def channels(self) -> int:
        """Page channels: multifd-channels with multifd, else the main channel alone."""
        return self.multifd_channels if self.capabilities["multifd"] else 1


_RANGES = {
    "downtime-limit": (0, 2_000_000),  # QEMU: up to 2000 s
    "max-bandwidth": (0, 1 << 62),
    "multifd-channels": (1, 255),
    "x-max-iterations": (0, 1 << 31),
    "x-max-time": (0, 1e9),
}


def _check_range(name: str, value: float) -> None:
    lo, hi = _RANGES[name.replace("_", "-")]
    if not lo <= value <= hi:
        raise ValueError(f"Parameter '{name}' expects a value in [{lo}, {hi}], not {value}")


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
    power = "kmgt".index(prefix) + 1 if prefix else 0
    if unit in ("bit", "bps"):
        return int(number * (1024 if binary else 1000) ** power / 8)
    return int(number * 1024**power)
