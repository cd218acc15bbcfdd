"""The live progress line of a migration, from query-migrate and the migration's samples.

Besides QEMU's counters the line shows every policy's throttle the same way, as the share
of the last second each class of vCPUs spent asleep, plus the policy's own figure (auto-
converge's cpu-throttle-percentage, dirty-quota's pool). When the bytes left stop
shrinking it prints a hint once (convergence.py) and marks the line `not converging`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections import deque
from typing import TYPE_CHECKING, Any, TextIO

from dqmig.migration import convergence
from dqmig.units import format_size

if TYPE_CHECKING:
    from dqmig.migration.source import Migration

SLEEP_WINDOW_S = 1.0  # the sleep share is over the last second of samples


SPARE = ("sent ", "dirty ", "bw ")  # dropped first, in this order, when the line is too wide


def progress_line(
    q: dict[str, Any], asleep: dict[str, float] | None = None, stalled: bool = False, width: int | None = None
) -> str:
    """One line from query-migrate `q`, the share of time each vCPU class slept (None: not
    measured yet) and whether pre-copy has stalled; within `width` columns if given, by
    dropping the SPARE fields, then cutting."""
    parts = _parts(q, asleep, stalled)
    for spare in SPARE:
        if width is None or len("  ".join(parts)) <= width:
            break
        parts = [p for p in parts if not p.startswith(spare)]
    return "  ".join(parts)[:width]


def _parts(q: dict[str, Any], asleep: dict[str, float] | None, stalled: bool) -> list[str]:
    ram = q.get("ram", {})
    parts = [f"{q.get('status', '?'):<9}", f"iter {ram.get('dirty-sync-count', 0):>3}"]
    if ram:
        parts += [
            f"sent {format_size(ram['transferred']):>10}",
            f"left {format_size(ram['remaining']):>10}",
            f"dirty {ram['dirty-pages-rate']:>7} pg/s",
            f"bw {ram['mbps']:>8.1f} Mbit/s",
        ]
    parts.append("asleep " + (" ".join(f"{c} {s:4.0%}" for c, s in asleep.items()) if asleep else "-"))
    throttle = q.get("cpu-throttle-percentage")
    if throttle is not None:
        parts.append(f"throttle {throttle}%")
    quota = q.get("dirty-quota")
    if quota is not None:
        parts.append(f"pool {quota['pool-pages']} pg")
    parts.append(f"{q.get('total-time', 0) / 1000:6.1f} s")
    if stalled:
        parts.append("not converging")
    return parts


def sleep_shares(before: dict[str, Any], after: dict[str, Any], classes: list[str]) -> dict[str, float]:
    """Mean share of the time between two samples that each class's writers slept, in the
    order classes first appear (writers: the vCPUs, then the DMA writer)."""
    dt = after["t"] - before["t"]
    shares: dict[str, list[float]] = {}
    for cls, b, a in zip(classes, before["vcpus"], after["vcpus"], strict=True):
        share = (a["sleep-ns"] - b["sleep-ns"]) / 1e9 / dt if dt > 0 else 0.0
        shares.setdefault(cls, []).append(min(1.0, max(0.0, share)))
    return {cls: sum(s) / len(s) for cls, s in shares.items()}


class Watch:
    """Reads a migration's samples as they arrive: the sleep share over the last second and
    the bytes left after each dirty sync."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes
        self.syncs: list[tuple[float, int]] = []  # (t, bytes left) after each dirty sync
        self.threshold = 0.0  # bytes that would switch over, at the latest sync
        self._seen = 0
        self._recent: deque[dict[str, Any]] = deque()

    def feed(self, samples: list[dict[str, Any]]) -> None:
        new = samples[self._seen :]  # the migration thread appends; a slice is a safe snapshot
        self._seen += len(new)
        for s in new:
            if "vcpus" not in s or "ram" not in s:
                continue
            if s["event"] == "sync":
                self.syncs.append((s["t"], s["ram"]["remaining"]))
                self.threshold = s["threshold"]
            self._recent.append(s)
        while len(self._recent) > 1 and self._recent[1]["t"] <= self._recent[-1]["t"] - SLEEP_WINDOW_S:
            self._recent.popleft()

    def asleep(self) -> dict[str, float] | None:
        if len(self._recent) < 2:
            return None
        return sleep_shares(self._recent[0], self._recent[-1], self.classes)

    @property
    def stalled(self) -> bool:
        return convergence.stalled(self.syncs)


class Progress:
    """Redraws one line on a terminal; on a pipe, prints a line every `every` seconds."""

    def __init__(self, migration: Migration, out: TextIO = sys.stderr, every: float = 1.0) -> None:
        self.migration = migration
        self.watch = Watch(migration.vm.writer_classes())
        self.out = out
        self.tty = out.isatty()
        self.every = every
        self._last = 0.0
        self._hinted = False

    def update(self) -> None:
        m = self.migration
        self.watch.feed(m.samples)
        stalled = self.watch.stalled
        if stalled and not self._hinted:
            # A line of its own, kept above the progress line (redrawn just below).
            print(("\r\x1b[K" if self.tty else "") + "hint: " + self._hint(), file=self.out, flush=True)
        self._hinted = stalled  # a stall that ends and comes back is hinted again
        now = time.monotonic()
        if self.tty:
            # Redrawn in place, so it must not wrap: one column spare for the cursor.
            line = progress_line(m.query(), self.watch.asleep(), stalled, width=self._columns() - 1)
            print("\r\x1b[K" + line, end="", file=self.out, flush=True)
        elif now - self._last >= self.every:
            print(progress_line(m.query(), self.watch.asleep(), stalled), file=self.out, flush=True)
            self._last = now

    def _columns(self) -> int:
        """The terminal's width (a pty may say 0: then $COLUMNS or 80)."""
        try:
            columns = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        return columns or shutil.get_terminal_size().columns

    def _hint(self) -> str:
        m, stall = self.migration, convergence.since_lowest(self.watch.syncs)
        assert stall is not None
        return convergence.hint(
            m.policy.name if m.policy else "none",
            m.params.as_qmp(),
            stall,
            threshold=self.watch.threshold,
            throttle=m.query().get("cpu-throttle-percentage", 0),
            has_dma=m.vm.dma is not None,
        )

    def close(self) -> None:
        if self.tty:
            print(file=self.out, flush=True)
