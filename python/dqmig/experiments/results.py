"""The saved results (results.json): what was run, where, and what it measured.

A results file carries the scenario (in its TOML layout, so it can be rerun), the dqmig
version, the git commit it comes from and how that is known ("git": provenance.py's
"checkout" or "build", null when unknown), the command line and the machine's facts (CPUs,
memory, Python, platform, load), then one entry per run, each with the host's load and steal
time over that run (`host_snapshot`, `host_usage`). `validate` checks the shape a report
needs and names the first field that is wrong.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

from dqmig import __version__
from dqmig.migration.destination import host_memory
from dqmig.provenance import commit_facts

SCHEMA = "dqmig-results/1"
KINDS = ("compare", "sweep")
PROC_STAT = Path("/proc/stat")
STEAL = 7  # index of steal in /proc/stat's cpu line (user nice system idle iowait irq softirq steal)


class ResultsError(ValueError):
    """A results file that a report cannot be drawn from; the message names the field."""


def new(kind: str, scenario: dict[str, Any], policies: list[str], argv: list[str]) -> dict[str, Any]:
    """An empty results document; runs are appended to its "runs" list."""
    return {
        "schema": SCHEMA,
        "kind": kind,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dqmig": __version__,
        "git": commit_facts(),
        "machine": machine_facts(),
        "command": ["dqmig", *argv],
        "scenario": scenario,
        "policies": policies,
        "runs": [],
    }


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "memory": host_memory(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "load-average": list(os.getloadavg()),
    }
    for module in ("numpy", "matplotlib"):
        try:
            facts[module] = __import__(module).__version__
        except ImportError:
            facts[module] = None
    return facts


def host_snapshot() -> dict[str, Any]:
    """The host's load averages and its total CPU jiffies now, to compare with a later one."""
    return {"load-average": list(os.getloadavg()), "jiffies": cpu_jiffies(_read(PROC_STAT))}


def host_usage(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Load at both ends of a run and the share of CPU time the hypervisor stole in between.

    On a virtualized host, steal is time a vCPU of this machine was runnable but not run: it
    slows the guest programs whose pace a run measures, so it belongs next to the slowdowns."""
    a, b = before["jiffies"], after["jiffies"]
    steal = None
    if a and b and sum(b[: STEAL + 1]) > sum(a[: STEAL + 1]):
        steal = (b[STEAL] - a[STEAL]) / (sum(b[: STEAL + 1]) - sum(a[: STEAL + 1]))
    return {"load-before": before["load-average"], "load-after": after["load-average"], "steal": steal}


def cpu_jiffies(stat: str | None) -> list[int] | None:
    """The aggregate `cpu` line of /proc/stat as numbers (None where there is none).

    Guest and guest_nice (after steal) are already counted in user and nice, so totals use
    the first eight values only."""
    for line in (stat or "").splitlines():
        name, *values = line.split()
        if name == "cpu" and len(values) > STEAL:
            return [int(v) for v in values]
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# -- saving and loading --------------------------------------------------------------------------


def save(results: dict[str, Any], path: Path) -> None:
    validate(results)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False))
    tmp.replace(path)


def load(path: Path) -> dict[str, Any]:
    """A validated results document from a results.json or a report directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not JSON: {e}") from None
    try:
        validate(data)
    except ResultsError as e:
        raise ResultsError(f"{path}: {e}") from None
    return data


# -- the schema ----------------------------------------------------------------------------------

NUMBER = (int, float)
OPTIONAL_NUMBER = (int, float, type(None))

TOP: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "kind": (str,),
    "created": (str,),
    "dqmig": (str,),
    "git": (dict, type(None)),
    "machine": (dict,),
    "command": (list,),
    "scenario": (dict,),
    "policies": (list,),
    "runs": (list,),
}
MACHINE = {"cpus": (int, type(None)), "memory": (int,), "python": (str,), "platform": (str,)}
RUN: dict[str, tuple[type, ...]] = {
    "policy": (str,),
    "seed": (int,),
    "status": (str,),
    "converged": (bool,),
    "error": (str, type(None)),
    "total-time": OPTIONAL_NUMBER,
    "downtime": OPTIONAL_NUMBER,
    "transferred": NUMBER,
    "iterations": NUMBER,
    "peak-throttle": NUMBER,
    "vcpus": (list,),
    "slowdown": (dict,),
    "fairness": OPTIONAL_NUMBER,
}
VCPU: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "class": (str,),
    "baseline-rate": NUMBER,
    "migration-rate": NUMBER,
    "retained": OPTIONAL_NUMBER,
    "slowdown": OPTIONAL_NUMBER,
}
HOST = {"load-before": (list,), "load-after": (list,), "steal": OPTIONAL_NUMBER}
SWEEP = {"name": (str,), "field": (str,), "values": (list,), "labels": (list,), "repeat": (int,)}
SERIES = ("guest", "migration")


def validate(data: Any) -> None:
    """Raises ResultsError naming the first missing or mistyped field."""
    _fields(data, TOP, "")
    if data["schema"] != SCHEMA:
        raise ResultsError(f"schema: expected {SCHEMA!r}, not {data['schema']!r}")
    if data["kind"] not in KINDS:
        raise ResultsError(f"kind: expected one of {', '.join(KINDS)}, not {data['kind']!r}")
    _fields(data["machine"], MACHINE, "machine.")
    if data["kind"] == "sweep":
        _fields(data.get("sweep"), SWEEP, "sweep.")
    for i, run in enumerate(data["runs"]):
        where = f"runs[{i}]."
        _fields(run, RUN, where)
        if data["kind"] == "sweep" and not isinstance(run.get("point"), int):
            raise ResultsError(f"{where}point: expected the index of the sweep value")
        for j, v in enumerate(run["vcpus"]):
            _fields(v, VCPU, f"{where}vcpus[{j}].")
        if "host" in run:  # results saved before runs recorded it have none
            _fields(run["host"], HOST, f"{where}host.")
        if "series" in run:
            series = run["series"]
            if not isinstance(series, dict) or any(not isinstance(series.get(k), dict) for k in SERIES):
                raise ResultsError(f"{where}series: expected tables 'guest' and 'migration'")


def _fields(obj: Any, spec: dict[str, tuple[type, ...]], where: str) -> None:
    if not isinstance(obj, dict):
        raise ResultsError(f"{where.rstrip('.') or 'results'}: expected an object")
    for key, types in spec.items():
        if key not in obj:
            raise ResultsError(f"{where}{key}: missing")
        value = obj[key]
        if isinstance(value, bool) and bool not in types:
            raise ResultsError(f"{where}{key}: expected {_names(types)}, not a boolean")
        if not isinstance(value, types):
            raise ResultsError(f"{where}{key}: expected {_names(types)}, not {type(value).__name__}")


def _names(types: tuple[type, ...]) -> str:
    names = {int: "a number", float: "a number", str: "a string", bool: "true/false", list: "a list"}
    names |= {dict: "an object", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))
