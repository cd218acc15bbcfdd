"""Cross-validation (issue 12): each scenario on both engines, the simulator against the emulator.

For every scenario the emulator runs `repeat` times (compare.run, the scenario's seed each
time: what varies is the host, not the guest) and the simulator once; per policy the
figures are set side by side, the emulator's median and min-max beside the simulator's
value, with a verdict against the issue's bars:

- the same convergence verdict (the emulator's majority; a split emulator accepts either);
- total time, transferred bytes and iterations within 15 % of the emulator's median
  (iterations: or within 2);
- auto-converge: cpu-throttle-percentage changes at the same dirty syncs as in one of the
  emulator's runs.

Downtime, peak throttle and per-class slowdown are shown without a bar. The output
directory holds each scenario's compare documents (`<name>/emu.json`, `<name>/sim.json`:
`dqmig report` draws them), `validation.json` (the comparisons) and `validation.md`;
`dqmig validate --from DIR` judges saved runs again (`rebuild`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dqmig.experiments import compare, metrics, results, tables
from dqmig.experiments.scenario import Scenario
from dqmig.experiments.scenario import parse as parse_scenario
from dqmig.provenance import commit_facts

SCHEMA = "dqmig-validate/1"
RELATIVE = 0.15  # total time, transferred, iterations: within 15 % of the emulator's median
ITERATIONS_ABS = 2  # or within 2 iterations
BARRED = ("total-time", "transferred", "iterations")
SHOWN = ("downtime", "peak-throttle")


def run(
    scenarios: Sequence[Scenario],
    policies: list[str] | None,
    repeat: int,
    *,
    argv: list[str],
    out: Path,
    progress: bool = True,
    calibrate: bool = False,
) -> dict[str, Any]:
    """Runs every scenario on both engines (saving as it goes); returns the validation
    document. With `calibrate`, the simulator's flat-out vCPUs run at the paces the
    emulator measured (`calibrated`)."""
    for s in scenarios:  # a policy that cannot run fails before any run starts
        s.check_policies(policies or list(s.policies))
    doc = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": commit_facts(),
        "machine": results.machine_facts(),
        "command": ["dqmig", *argv],
        "repeat": repeat,
        "calibrate": calibrate,
        "scenarios": [],
    }
    for s in scenarios:
        names = policies or list(s.policies)
        emu = s.with_value("engine", "emu")
        where = out / s.name
        where.mkdir(parents=True, exist_ok=True)
        emu_doc = results.new("compare", emu.to_dict(), names, argv)
        for rep in range(repeat):
            one = compare.run(
                emu, names, argv=argv, progress=progress, desc=f"validate {s.name} emu {rep + 1}/{repeat}"
            )
            emu_doc["runs"] += [{**r, "repeat": rep} for r in one["runs"]]
            results.save(emu_doc, where / "emu.json")
        sim = s.with_value("engine", "sim")
        if calibrate:
            sim = calibrated(sim, emu_doc["runs"])
        sim_doc = compare.run(sim, names, argv=argv, progress=progress, desc=f"validate {s.name} sim")
        results.save(sim_doc, where / "sim.json")
        doc["scenarios"].append(
            {"name": s.name, "description": s.description, "policies": compare_runs(emu_doc["runs"], sim_doc["runs"])}
        )
        write(doc, out)
    return doc


def rebuild(
    out: Path, argv: list[str], *, resimulate: bool = False, calibrate: bool = False, progress: bool = True
) -> dict[str, Any]:
    """The validation document again from a directory's saved runs (`<name>/emu.json` and
    `sim.json`), judged by today's bars. With `resimulate`, the simulator's side is run
    again (today's model, the saved scenario) against the saved emulator runs: the emulator's
    figures are measurements of a host, the simulator's are a deterministic function of the
    code, so a model change needs only its own side rerun."""
    old = json.loads((out / "validation.json").read_text())
    doc = {**old, "command": ["dqmig", *argv], "scenarios": []}
    entries = old["scenarios"]
    if resimulate:
        doc["git-sim"] = commit_facts()
        doc["calibrate"] = calibrate
        entries = entries + _unjudged(out, {e["name"] for e in entries})
    for entry in entries:
        where = out / entry["name"]
        emu = results.load(where / "emu.json")
        if resimulate:
            sim_doc = _simulate(emu, argv, progress, calibrate)
            results.save(sim_doc, where / "sim.json")
        sim = results.load(where / "sim.json")
        policies = compare_runs(emu["runs"], sim["runs"])
        doc["scenarios"].append({**entry, "policies": policies})
    write(doc, out)
    return doc


def _unjudged(out: Path, judged: set[str]) -> list[dict[str, Any]]:
    """Scenarios whose emulator runs were saved but whose simulation never finished."""
    found = []
    for path in sorted(out.glob("*/emu.json")):
        if path.parent.name not in judged:
            s = results.load(path)["scenario"]
            found.append({"name": path.parent.name, "description": s.get("description", "")})
    return found


def _simulate(emu: dict[str, Any], argv: list[str], progress: bool, calibrate: bool) -> dict[str, Any]:
    """The simulator's compare document for the scenario and policies of saved emulator runs."""
    s = parse_scenario(emu["scenario"], "saved emu.json").with_value("engine", "sim")
    if calibrate:
        s = calibrated(s, emu["runs"])
    names = list(dict.fromkeys(r["policy"] for r in emu["runs"]))
    return compare.run(s, names, argv=argv, progress=progress, desc=f"validate {s.name} sim")


def calibrated(s: Scenario, emu_runs: list[dict[str, Any]]) -> Scenario:
    """`s` with `guest.sim-speeds`: each flat-out vCPU's pace is the median of the emulator's
    baseline paces for it (steps/s before the migration, over every run). The simulator's own
    flat-out speeds are one table for a host with a core per vCPU; an emulator that
    overcommits its host's cores (skewed4: 4 vCPU threads and the migration on 2) runs its
    flat-out vCPUs several times slower, and they dirty that much less."""
    programs = s.vm_config().programs
    speeds = []
    for i, p in enumerate(programs):
        paces = [r["vcpus"][i]["baseline-rate"] for r in emu_runs if i < len(r["vcpus"])]
        flat_out = p.kind != "idle" and not p.rate and paces
        speeds.append(round(metrics.spread(paces)["median"], 1) if flat_out else 0.0)
    return s.with_value("guest.sim-speeds", speeds) if any(speeds) else s


# -- the comparison ------------------------------------------------------------------------------


def compare_runs(emu_runs: list[dict[str, Any]], sim_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per policy (in the simulator's order): both engines' figures and the verdict."""
    return [compare_policy(r["policy"], [e for e in emu_runs if e["policy"] == r["policy"]], r) for r in sim_runs]


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run that validation sets side by side."""
    out = {k: run[k] for k in ("converged", *BARRED, *SHOWN)}
    out["slowdown"] = dict(run["slowdown"])
    out["throttle-steps"] = throttle_steps(run)
    out["load"] = (run.get("host") or {}).get("load-before")
    return out


def throttle_steps(run: dict[str, Any]) -> list[list[int]] | None:
    """[dirty-sync-count, cpu-throttle-percentage] at each change of the percentage (auto-
    converge changes it in on_sync, before that sync's sample), from the migration series
    (the setup sync is count 1, each "sync" sample adds one); None without a series or a
    percentage."""
    series = (run.get("series") or {}).get("migration")
    if not series:
        return None
    steps, count, last = [], 1, 0
    for event, pct in zip(series["event"], series["cpu-throttle-percentage"], strict=True):
        count += event == "sync"
        if pct and pct != last:  # 0 or none: the policy off at the end, not a step
            steps.append([count, pct])
            last = pct
    return steps if steps or run["policy"] == "auto-converge" else None


def compare_policy(policy: str, emu_runs: list[dict[str, Any]], sim_run: dict[str, Any]) -> dict[str, Any]:
    emu = [figures(r) for r in emu_runs]
    sim = figures(sim_run)
    spreads = {k: metrics.spread([e[k] for e in emu]) for k in (*BARRED, *SHOWN)}
    classes = sorted({c for e in [*emu, sim] for c in e["slowdown"]})
    spreads |= {f"slowdown-{c}": metrics.spread([e["slowdown"].get(c) for e in emu]) for c in classes}
    sim_flat = {k: sim[k] for k in (*BARRED, *SHOWN)} | {f"slowdown-{c}": sim["slowdown"].get(c) for c in classes}
    checks = verdict(
        [e["converged"] for e in emu],
        sim["converged"],
        {k: spreads[k]["median"] for k in BARRED},
        {k: sim[k] for k in BARRED},
        [e["throttle-steps"] for e in emu] if policy == "auto-converge" else None,
        sim["throttle-steps"] if policy == "auto-converge" else None,
    )
    return {
        "policy": policy,
        "emu": {
            "runs": len(emu),
            "converged": sum(e["converged"] for e in emu),
            "figures": spreads,
            "throttle-steps": [e["throttle-steps"] for e in emu],
            "load": [e["load"] for e in emu],
        },
        "sim": {"converged": sim["converged"], "figures": sim_flat, "throttle-steps": sim["throttle-steps"]},
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
    }


def within(emu_median: float | None, sim: float | None, *, absolute: float = 0.0) -> dict[str, Any]:
    """Whether `sim` is within RELATIVE of the emulator's median (or `absolute` of it)."""
    if emu_median is None or sim is None:
        return {"ok": emu_median is None and sim is None, "delta": None}
    diff = sim - emu_median
    rel = diff / emu_median if emu_median else (0.0 if diff == 0 else float("inf"))
    ok = abs(diff) <= max(RELATIVE * abs(emu_median), absolute)
    return {"ok": ok, "delta": None if rel == float("inf") else round(rel, 4)}


def verdict(
    emu_converged: Sequence[bool],
    sim_converged: bool,
    emu_medians: dict[str, float | None],
    sim_values: dict[str, float | None],
    emu_steps: Sequence[list[list[int]] | None] | None = None,
    sim_steps: list[list[int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The bars, each {"ok": bool, ...}: converged, total-time, transferred, iterations, and
    (given the emulator's runs' steps) throttle-steps."""
    yes = sum(emu_converged)
    no = len(emu_converged) - yes
    agreed = yes != no  # a split emulator (as many runs each way) accepts either verdict
    checks: dict[str, dict[str, Any]] = {
        "converged": {"ok": not agreed or sim_converged == (yes > no), "emu": f"{yes}/{len(emu_converged)}"}
    }
    for k in BARRED:
        checks[k] = within(emu_medians[k], sim_values[k], absolute=ITERATIONS_ABS if k == "iterations" else 0.0)
    if emu_steps is not None:
        syncs = [[s for s, _ in steps or []] for steps in emu_steps]
        mine = [s for s, _ in sim_steps or []]
        matched = sum(mine == other for other in syncs)
        checks["throttle-steps"] = {"ok": matched > 0, "matched": f"{matched}/{len(syncs)}"}
    return checks


# -- output --------------------------------------------------------------------------------------

HEADERS = [
    "policy",
    "converged emu/sim",
    "total s",
    "iters",
    "downtime ms",
    "sent MiB",
    "peak throttle %",
    "writers slowdown %",
    "readers slowdown %",
    "throttle steps",
    "emu load 1m",
    "verdict",
]


def _cell(emu: dict[str, Any], sim: float | None, fmt: Callable[[float | None], str]) -> str:
    """'median [min..max] / sim' (the emulator's spread, then the simulator's value)."""
    return f"{tables.spread(emu, fmt)} / {fmt(sim)}"


def _steps(row: dict[str, Any]) -> str:
    check = row["checks"].get("throttle-steps")
    if check is None:
        return "-"
    return f"{check['matched']} {'ok' if check['ok'] else 'MISS'}"


def _verdict(row: dict[str, Any]) -> str:
    missed = []
    for name, c in row["checks"].items():
        if c["ok"]:
            continue
        delta = c.get("delta")
        missed.append(name if delta is None else f"{name} {delta * 100:+.0f}%")
    return "ok" if not missed else "MISS: " + ", ".join(missed)


def table(entry: dict[str, Any]) -> tables.Table:
    rows = []
    for row in entry["policies"]:
        f, s = row["emu"]["figures"], row["sim"]["figures"]
        empty = metrics.spread([])
        rows.append(
            [
                row["policy"],
                f"{row['emu']['converged']}/{row['emu']['runs']} / {'yes' if row['sim']['converged'] else 'no'}",
                _cell(f["total-time"], s["total-time"], tables.seconds),
                _cell(f["iterations"], s["iterations"], lambda x: "-" if x is None else f"{x:.0f}"),
                _cell(f["downtime"], s["downtime"], tables.millis),
                _cell(f["transferred"], s["transferred"], tables.mib),
                _cell(f["peak-throttle"], s["peak-throttle"], lambda x: "-" if x is None else f"{x:.0f}"),
                _cell(f.get("slowdown-writer", empty), s.get("slowdown-writer"), tables.percent),
                _cell(f.get("slowdown-reader", empty), s.get("slowdown-reader"), tables.percent),
                _steps(row),
                _load_range(row["emu"]["load"]),
                _verdict(row),
            ]
        )
    return tables.Table(HEADERS, rows, title=f"{entry['name']}: {entry['description']}")


def _load_range(loads: list[list[float] | None]) -> str:
    """The 1-minute load averages at the runs' starts, min..max."""
    ones = [load[0] for load in loads if load]
    return "-" if not ones else f"{min(ones):.1f}..{max(ones):.1f}"


def _loads(doc: dict[str, Any]) -> str:
    return _load_range([load for e in doc["scenarios"] for p in e["policies"] for load in p["emu"]["load"]])


def summary(doc: dict[str, Any]) -> str:
    rows = [p for e in doc["scenarios"] for p in e["policies"]]
    passed = sum(p["ok"] for p in rows)
    return (
        f"{passed}/{len(rows)} scenario x policy pairs meet every bar; "
        f"1-minute load at the emulator's runs' starts {_loads(doc)}"
    )


def text(doc: dict[str, Any]) -> str:
    parts = [table(e).text() for e in doc["scenarios"]]
    return "\n\n".join([*parts, summary(doc)])


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    head = [
        "# dqmig validate",
        "",
        f"`{' '.join(doc['command'])}`, {doc['created']}, git {(doc['git'] or {}).get('commit', 'unknown')}; "
        f"{m['cpus']} CPUs, {m['platform']}, "
        f"load average {' '.join(f'{x:.2f}' for x in m['load-average'])} at the start.",
        "",
        f"Each cell: the emulator's median [min..max] over {doc['repeat']} runs / the simulator's value.",
    ]
    parts = [f"## {e['name']}\n\n{e['description']}\n\n{table(e).markdown()}" for e in doc["scenarios"]]
    return "\n\n".join(["\n".join(head), *parts, summary(doc)]) + "\n"


def write(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "validation.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False))
    tmp.replace(out / "validation.json")
    (out / "validation.md").write_text(markdown(doc))


__all__ = ["compare_runs", "rebuild", "run", "text", "throttle_steps", "verdict", "within", "write"]
