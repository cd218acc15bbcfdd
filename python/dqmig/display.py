"""The live progress line of a migration, from query-migrate."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from dqmig.units import format_size


def progress_line(q: dict[str, Any]) -> str:
    ram = q.get("ram", {})
    parts = [f"{q.get('status', '?'):<9}", f"iter {ram.get('dirty-sync-count', 0):>3}"]
    if ram:
        parts += [
            f"sent {format_size(ram['transferred']):>10}",
            f"left {format_size(ram['remaining']):>10}",
            f"dirty {ram['dirty-pages-rate']:>7} pg/s",
            f"bw {ram['mbps']:>8.1f} Mbit/s",
        ]
    throttle = q.get("cpu-throttle-percentage")
    parts.append(f"throttle {throttle}%" if throttle is not None else "throttle -")
    parts.append(f"{q.get('total-time', 0) / 1000:6.1f} s")
    return "  ".join(parts)


class Progress:
    """Redraws one line on a terminal; on a pipe, prints a line every `every` seconds."""

    def __init__(self, out: TextIO = sys.stderr, every: float = 1.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every = every
        self._last = 0.0

    def update(self, q: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.tty:
            print("\r\x1b[K" + progress_line(q), end="", file=self.out, flush=True)
        elif now - self._last >= self.every:
            print(progress_line(q), file=self.out, flush=True)
            self._last = now

    def close(self) -> None:
        if self.tty:
            print(file=self.out, flush=True)
