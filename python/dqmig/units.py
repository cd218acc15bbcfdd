"""Sizes and rates written the way QEMU users write them."""

from __future__ import annotations

import re
from fractions import Fraction

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtKMGT])(?:i?[bB])?|[bB])?\s*$")
_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40}

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def parse_size(text: str | int) -> int:
    """Bytes from '4096', '256M', '4G', '2MiB', '1.5G' (binary units, as QEMU's -m)."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"bad size {text}: must not be negative")
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"bad size {text!r}: expected a number with an optional K/M/G/T suffix")
    value = Fraction(m.group(1)) * (1 << _SHIFT.get((m.group(2) or "").lower(), 0))
    if value.denominator != 1:
        raise ValueError(f"bad size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"
