"""The result tables, built once and written as text (terminal), Markdown (docs) or HTML."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from dqmig.units import MiB


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str = ""

    def widths(self) -> list[int]:
        return [max(len(r[i]) for r in [self.headers, *self.rows]) for i in range(len(self.headers))]

    def text(self) -> str:
        w = self.widths()

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells))

        out = [line(self.headers), "  ".join("-" * x for x in w), *map(line, self.rows)]
        return "\n".join(([self.title] if self.title else []) + out)

    def markdown(self) -> str:
        def row(cells: list[str]) -> str:
            return "| " + " | ".join(cells) + " |"

        sep = "|" + "|".join(["---"] + ["---:"] * (len(self.headers) - 1)) + "|"
        return "\n".join([row(self.headers), sep, *map(row, self.rows)])

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
    "load 1m",
    "steal %",
    "fairness",
]


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
                load(r),
                steal(r),
                plain(r["fairness"]),
            ]
        )
    return Table(COMPARE_HEADERS, rows)


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
                    f"{v.get('sleep', 0):.2f}",
                ]
            )
    headers = ["policy", "vCPU", "class", "steps/s before", "steps/s during", "slowdown %", "slept s"]
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
                spread(p["load"], plain),
                spread(p["steal"], share),
                spread(p["fairness"], plain),
            ]
        )
    headers = [label, "policy", "converged", "total s", "downtime ms", "writers slowdown %", "readers slowdown %"]
    return Table([*headers, "load 1m at end", "steal %", "fairness"], rows)
