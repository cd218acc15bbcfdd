"""The result tables, built once and written as text (terminal), Markdown (docs) or HTML.

Each column's best value is marked: `*` in text, bold in Markdown, highlighted in HTML."""

from __future__ import annotations

import html
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dqmig.units import MiB


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str = ""
    best: set[tuple[int, int]] = field(default_factory=set)  # (row, column) of each best value
    note: str = ""  # what `best` means, shown under the table when anything is marked

    def marked_rows(self) -> list[list[str]]:
        """Rows with `*` after best values; other cells of those columns get a space, so
        the digits stay aligned."""
        starred = {c for _, c in self.best}
        return [
            [cell + ("*" if (r, c) in self.best else " ") if c in starred else cell for c, cell in enumerate(row)]
            for r, row in enumerate(self.rows)
        ]

    def text(self) -> str:
        rows = self.marked_rows()
        w = [max(len(r[i]) for r in [self.headers, *rows]) for i in range(len(self.headers))]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells)).rstrip()

        out = [line(self.headers), "  ".join("-" * x for x in w), *map(line, rows)]
        return "\n".join(([self.title] if self.title else []) + out + ([f"* {self.note}"] if self.best else []))

    def markdown(self) -> str:
        def row(cells: list[str]) -> str:
            return "| " + " | ".join(cells) + " |"

        rows = [
            [f"**{c}**" if (r, i) in self.best else c for i, c in enumerate(cells)] for r, cells in enumerate(self.rows)
        ]
        sep = "|" + "|".join(["---"] + ["---:"] * (len(self.headers) - 1)) + "|"
        return "\n".join([row(self.headers), sep, *map(row, rows)])

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join(
            "<tr>" + "".join(_td(c, (r, i) in self.best) for i, c in enumerate(cells)) + "</tr>"
            for r, cells in enumerate(self.rows)
        )
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        note = f'<p class="note"><span class="best">bold</span>: {html.escape(self.note)}</p>' if self.best else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _td(cell: str, best: bool) -> str:
    return f'<td class="best">{html.escape(cell)}</td>' if best else f"<td>{html.escape(cell)}</td>"


# -- best values ---------------------------------------------------------------------------------


def best_cells(
    rows: list[list[str]],
    headers: list[str],
    goals: dict[str, str],
    eligible: Sequence[bool],
    groups: Sequence[Hashable] | None = None,
) -> set[tuple[int, int]]:
    """(row, column) of each column's best value, by `goals` (header -> 'min' or 'max'), among
    the eligible rows of each group, as displayed (ties all marked). A column needs two
    eligible values: a lone one is not the best of anything."""
    groups = groups if groups is not None else [0] * len(rows)
    marked = set()
    for group in dict.fromkeys(groups):
        members = [i for i, (g, ok) in enumerate(zip(groups, eligible, strict=True)) if g == group and ok]
        for header, goal in goals.items():
            col = headers.index(header)
            values = {i: v for i in members if (v := _value(rows[i][col])) is not None}
            if len(values) < 2:
                continue
            target = min(values.values()) if goal == "min" else max(values.values())
            marked |= {(i, col) for i, v in values.items() if v == target}
    return marked


def _value(cell: str) -> float | None:
    """The number a cell shows ('+4.2', '1,234', '1.6 [1.5..1.8]' -> its median), or None."""
    try:
        return float(cell.split(" [")[0].replace(",", ""))
    except ValueError:
        return None


# -- formatting ----------------------------------------------------------------------------------


def seconds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f}"


def millis(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}"


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:.0f}"


def percent(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x * 100:+.{digits}f}"


def plain(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def spread(s: dict[str, Any], fmt: Any) -> str:
    """'median [min-max]' over repetitions, or the single value."""
    if s["median"] is None:
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}..{fmt(s['max'])}]"


def share(x: float | None) -> str:
    """A share as an unsigned percentage (steal)."""
    return "-" if x is None else f"{x * 100:.1f}"


def load(run: dict[str, Any]) -> str:
    """The host's 1-minute load average at the run's start and end ('1.2→2.0')."""
    host = run.get("host")
    if not host:
        return "-"
    return f"{host['load-before'][0]:.1f}→{host['load-after'][0]:.1f}"


def steal(run: dict[str, Any]) -> str:
    return share((run.get("host") or {}).get("steal"))


def converged(run: dict[str, Any]) -> str:
    if run["converged"]:
        return "yes"
    return "no" if run["status"] == "cancelled" else run["status"]


# -- the tables ----------------------------------------------------------------------------------

COMPARE_HEADERS = [
    "policy",
    "converged",
    "total s",
    "downtime ms",
    "sent MiB",
    "iters",
    "peak throttle %",
    "writers slowdown %",
    "readers slowdown %",
    "writers net %",
    "readers net %",
    "load 1m",
    "host steal %",
    "fairness",
]
COMPARE_BEST = {
    "total s": "min",
    "downtime ms": "min",
    "sent MiB": "min",
    "iters": "min",
    "writers slowdown %": "min",
    "readers slowdown %": "min",
    "writers net %": "min",
    "readers net %": "min",
    "fairness": "max",
}
SWEEP_BEST = {k: v for k, v in COMPARE_BEST.items() if k not in ("sent MiB", "iters")}  # columns a sweep has


def compare_table(runs: list[dict[str, Any]]) -> Table:
    """One row per run: the migration's outcome and what it cost the guest."""
    rows = []
    for r in runs:
        rows.append(
            [
                r["policy"],
                converged(r),
                seconds(r["total-time"]),
                millis(r["downtime"]),
                mib(r["transferred"]),
                str(r["iterations"]),
                f"{r['peak-throttle']:.0f}",
                percent(r["slowdown"].get("writer")),
                percent(r["slowdown"].get("reader")),
                percent(r.get("net-slowdown", {}).get("writer")),
                percent(r.get("net-slowdown", {}).get("reader")),
                load(r),
                steal(r),
                plain(r["fairness"]),
            ]
        )
    best = best_cells(rows, COMPARE_HEADERS, COMPARE_BEST, [r["converged"] for r in runs])
    return Table(COMPARE_HEADERS, rows, best=best, note="best in its column among the runs that converged")


def vcpu_table(runs: list[dict[str, Any]]) -> Table:
    """Per vCPU: pace before and during the migration, under each policy."""
    rows = []
    for r in runs:
        for v in r["vcpus"]:
            rows.append(
                [
                    r["policy"],
                    v["name"],
                    v["class"],
                    f"{v['baseline-rate']:,.0f}",
                    f"{v['migration-rate']:,.0f}",
                    percent(v["slowdown"]),
                    percent(v.get("net-slowdown")),
                    share(v.get("steal")),
                    f"{v.get('sleep', 0):.2f}",
                ]
            )
    headers = ["policy", "vCPU", "class", "steps/s before", "steps/s during", "slowdown %", "net %", "steal %"]
    headers += ["slept s"]
    return Table(headers, rows)


def sweep_table(points: list[dict[str, Any]], label: str) -> Table:
    """One row per (value, policy): medians and [min..max] over the repetitions."""
    rows = []
    for p in points:
        rows.append(
            [
                p["label"],
                p["policy"],
                f"{p['converged']}/{p['runs']}",
                spread(p["total-time"], seconds),
                spread(p["downtime"], millis),
                spread(p["slowdown-writer"], percent),
                spread(p["slowdown-reader"], percent),
                spread(p["net-slowdown-writer"], percent),
                spread(p["net-slowdown-reader"], percent),
                spread(p["load"], plain),
                spread(p["steal"], share),
                spread(p["fairness"], plain),
            ]
        )
    headers = [label, "policy", "converged", "total s", "downtime ms", "writers slowdown %", "readers slowdown %"]
    headers += ["writers net %", "readers net %", "load 1m at end", "host steal %", "fairness"]
    every = [p["converged"] == p["runs"] > 0 for p in points]
    best = best_cells(rows, headers, SWEEP_BEST, every, [p["point"] for p in points])
    return Table(headers, rows, best=best, note="best at its value among the policies whose every run converged")


def phase_table(phases: list[dict[str, Any]], axes: list[dict[str, Any]]) -> Table:
    """One row per grid cell: the policy that converged fastest and the one that kept the
    read-mostly vCPUs' pace best there ("-": nothing converged)."""
    rows = []
    for p in phases:
        values = [a["labels"][i] for a, i in zip(axes, p["cell"], strict=True)]
        nothing = "not run (failed)" if not p["ran"] else "nothing converged" if not p["converged"] else "-"
        rows.append(
            values
            + [
                p["fastest"] or nothing,
                seconds(p["total-time"]),
                p["gentlest"] or ("no reader" if p["converged"] else nothing),
                percent(p["slowdown-reader"]),
            ]
        )
    headers = [a["name"] for a in axes] + ["fastest", "total s", "readers' pace best", "readers slowdown %"]
    return Table(headers, rows, title="Where each policy wins (among those whose runs mostly converged)")
