"""The `compare`, `sweep`, `validate` and `report` subcommands. `dqmig.cli.build_parser` calls
`add_parsers(sub)` with its subparsers."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from dqmig import policies
from dqmig.experiments import compare, grid, results, scenario, sweep, validate
from dqmig.experiments.scenario import Scenario, ScenarioError
from dqmig.outputs import check_dir


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_compare(sub)
    _add_sweep(sub)
    _add_validate(sub)
    _add_report(sub)


# -- shared options ------------------------------------------------------------------------------


def _policy_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in policies.POLICIES:
            raise argparse.ArgumentTypeError(f"unknown policy {n!r}; choose from {', '.join(policies.POLICIES)}")
    if not names:
        raise argparse.ArgumentTypeError("no policy given")
    return names


def _add_common(p: argparse.ArgumentParser, what: str, *, engine: bool = True) -> None:
    p.add_argument(
        "--policies",
        type=_policy_list,
        metavar="A,B,...",
        help=f"policies to run ({', '.join(policies.POLICIES)}); default: {what}",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a scenario field, e.g. guest.vcpus=4, network.max-bandwidth=1Gbit, "
        "x-max-time=10 (a migration parameter by QEMU's name) (repeatable)",
    )
    p.add_argument("--out", type=Path, metavar="DIR", help="report directory (default ./dqmig-<command>-<time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if not engine:
        return
    p.add_argument(
        "--engine",
        choices=scenario.ENGINES,
        help="emu (the emulator) or sim (the virtual-time simulator); default: the scenario's `engine` (emu)",
    )


def _scenario(name: str | None, overrides: list[str]) -> Scenario:
    s = scenario.load(name)
    for item in overrides:
        field, eq, value = item.partition("=")
        field = field.strip()
        if not eq or not field:
            raise ScenarioError(f"--set {item!r}: expected FIELD=VALUE")
        if "." in field:
            s = s.with_value(field, scenario.parse_value(value.strip()))
        else:
            s = s.with_parameter(field, scenario.parse_value(value.strip()))
    return s


def _engine(s: Scenario, args: argparse.Namespace) -> Scenario:
    return s.with_value("engine", args.engine) if args.engine else s


def _out_dir(args: argparse.Namespace, stem: str) -> Path:
    """The report directory, checked before any run so that a long experiment does not fail
    at its end."""
    out = args.out or Path(f"dqmig-{stem}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    check_dir(out, "--out")
    return out


def _saver(out: Path, every_s: float = 0.0) -> Any:
    """Saves results after every run, so an interrupted experiment keeps what it measured; at
    most once in `every_s` for sweeps, whose journal already holds each run as it finishes
    (rewriting a thousand-run document after every run would cost more than the runs)."""
    last = [-math.inf]

    def save(doc: dict[str, Any]) -> None:
        if time.monotonic() - last[0] < every_s:
            return
        last[0] = time.monotonic()
        out.mkdir(parents=True, exist_ok=True)
        results.save(doc, out / "results.json")

    return save


def _finish(doc: dict[str, Any], out: Path) -> int:
    from dqmig.experiments import report  # matplotlib: imported only when drawing

    print(report.text(doc))
    report.write(doc, out)
    print(f"\nreport written to {out}/ (index.html, results.json, figures)")
    failed = doc.get("failed", [])
    for f in failed:
        where = f"{f['policy']} at {doc['sweep']['labels'][f['point']]}, repetition {f['repeat'] + 1}"
        print(f"dqmig: run {where} failed: {f['error']}", file=sys.stderr)
    if failed:
        print(f"dqmig: {len(failed)} run(s) failed; `dqmig sweep --resume {out}` runs them again", file=sys.stderr)
    return 1 if failed else 0


# -- compare -------------------------------------------------------------------------------------


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="migrate one scenario under each throttling policy, side by side",
        description="Run the same scenario (guest, network, parameters) under each policy and print "
        "converged, total time, downtime (QEMU's), MiB sent, iterations, peak throttle, guest slowdown "
        "per vCPU class (raw, and net of steal), host load and steal, and a fairness index, each "
        "column's best marked *; write a report directory (results.json, summary.png first, PNG "
        f"figures, index.html). Built-in scenarios: {', '.join(scenario.builtin_names())}.",
    )
    p.add_argument("scenario", nargs="?", metavar="SCENARIO", help="a TOML file or a built-in name (default)")
    _add_common(p, "the scenario's `policies`")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    s = _engine(_scenario(args.scenario, args.set), args)
    names = args.policies or list(s.policies)
    out = _out_dir(args, "compare")
    doc = compare.run(s, names, argv=sys.argv[1:], progress=not args.quiet, on_run=_saver(out))
    return _finish(doc, out)


# -- sweep ---------------------------------------------------------------------------------------


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    kinds = "; ".join(f"{k.name}: {k.help} (default {','.join(k.defaults)})" for k in sweep.SWEEPS.values())
    p = sub.add_parser(
        "sweep",
        help="run a scenario across the values of one parameter (or a grid of two or three), repeated",
        description="guestperf-style sweep: every value x policy runs --repeat times (seeds seed, seed+1, ...); "
        f"each point reports the median and min-max. Sweeps: {kinds}. "
        "Or --param NAME for any migration parameter by QEMU's name, or a grid of two or three axes "
        "(--grid dirty-rate=0.5,1,2 --grid max-bandwidth=1Gbit,10Gbit). Each finished run is appended to "
        "DIR/runs.jsonl: --resume DIR runs only what is missing. --workers/--cluster run on Dask (docs/cluster.md).",
    )
    p.add_argument("kind", nargs="?", choices=sorted(sweep.SWEEPS), metavar="KIND", help="what to sweep")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="finish an interrupted sweep: run only what DIR's runs.jsonl does not hold",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster",
        metavar="tcp://HOST:8786",
        help="run every run as a task on this Dask scheduler (pip install 'dqmig[cluster]')",
    )
    where.add_argument(
        "--workers",
        type=_worker_count,
        metavar="N",
        help="run on a local Dask cluster of N worker processes (emulator runs: one worker)",
    )
    p.add_argument("--param", metavar="NAME", help="sweep this migration parameter (QEMU's name) instead")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="one axis of a grid sweep (give it 2 or 3 times): a KIND, a field a KIND changes (max-bandwidth) "
        "or a migration parameter; the report draws phase diagrams of where each policy wins",
    )
    p.add_argument("--values", metavar="V1,V2,...", help="the values (default: the sweep's own)")
    p.add_argument("--scenario", metavar="SCENARIO", help="a TOML file or a built-in name (default)")
    p.add_argument("--repeat", type=_positive_int, metavar="N", help="runs per point (default 1)")
    _add_common(p, "the sweep's own (dl-*: dirty-limit, dq-*: dirty-quota), else the scenario's")
    p.set_defaults(func=cmd_sweep)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return n


def _worker_count(text: str) -> int:
    n = _positive_int(text)
    if n > (os.cpu_count() or 1):
        raise argparse.ArgumentTypeError(f"{n}: this host has {os.cpu_count()} CPUs; more workers only share them")
    return n


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.resume:
        return _resume_sweep(args)
    if args.grid:
        return _grid_sweep(args)
    if bool(args.kind) == bool(args.param):
        what = "a KIND (e.g. bandwidth), --param NAME or --grid NAME=V1,V2,..."
        raise ScenarioError(f"sweep: give {what}: one, not both or neither")
    kind = sweep.SWEEPS[args.kind] if args.kind else sweep.param_sweep(args.param)
    values = [v.strip() for v in args.values.split(",") if v.strip()] if args.values else list(kind.defaults)
    s = _engine(_scenario(args.scenario, args.set), args)
    names = args.policies or list(kind.policies or s.policies)
    out = _out_dir(args, f"sweep-{kind.name}")
    doc = sweep.run(s, kind, values, names, args.repeat or 1, argv=sys.argv[1:], **_execution(args, out))
    return _finish(doc, out)


def _grid_sweep(args: argparse.Namespace) -> int:
    if args.kind or args.param or args.values:
        raise ScenarioError("sweep --grid: the axes carry their values; give no KIND, --param or --values")
    axes = [grid.parse_axis(text) for text in args.grid]
    grid.check_axes(axes)
    s = _engine(_scenario(args.scenario, args.set), args)
    names = args.policies or grid.policies_for(axes, s.policies)
    out = _out_dir(args, "sweep-grid")
    doc = grid.run(s, axes, names, args.repeat or 1, argv=sys.argv[1:], **_execution(args, out))
    return _finish(doc, out)


def _execution(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """How a sweep's runs execute and where they go: progress, results.json, the journal,
    and the cluster (sweep.run, grid.run and sweep.resume take these)."""
    return {
        "progress": not args.quiet,
        "on_run": _saver(out, SWEEP_SAVE_S),
        "journal": out / JOURNAL,
        "cluster_address": args.cluster,
        "workers": args.workers,
    }


JOURNAL = "runs.jsonl"  # a sweep's finished runs, one JSON object per line, as they arrive
SWEEP_SAVE_S = 10.0  # results.json of a running sweep is at most this old (the journal is current)


def _resume_sweep(args: argparse.Namespace) -> int:
    given = (args.kind, args.param, args.values, args.grid, args.scenario, args.set, args.policies, args.engine)
    if any(given) or args.repeat or args.out:
        raise ScenarioError(
            "sweep --resume DIR: the sweep is the one saved in DIR, its report goes there; "
            "give no KIND, values, overrides, --repeat or --out"
        )
    out = args.resume
    doc = results.load(out)
    if doc["kind"] != "sweep":
        raise ScenarioError(f"{out}: holds a {doc['kind']} result, not a sweep")
    doc = sweep.resume(doc, **_execution(args, out))
    return _finish(doc, out)


# -- validate ------------------------------------------------------------------------------------


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="run scenarios on both engines and check the simulator against the emulator",
        description="Cross-validation (issue 12): each scenario under each policy, --repeat times on the "
        "emulator and once on the simulator (same scenario and seed); per policy the emulator's median "
        "[min..max] beside the simulator's value (converged, total time, iterations, downtime, MiB sent, "
        "peak throttle, slowdown per class) and a verdict: same convergence verdict; total time, bytes "
        "sent and iterations within 15 % (or 2 iterations) of the emulator's median; auto-converge's "
        "throttle steps at the same syncs. Writes validation.json, validation.md and each scenario's "
        f"compare results. Default: every built-in scenario ({', '.join(scenario.builtin_names())}).",
    )
    p.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help="TOML files or built-in names (default: all built-in)"
    )
    p.add_argument("--repeat", type=_positive_int, default=3, metavar="N", help="emulator runs per policy (default 3)")
    p.add_argument(
        "--from",
        dest="saved",
        type=Path,
        metavar="DIR",
        help="judge the runs saved in a validate directory again (validation.md, validation.json), run nothing",
    )
    p.add_argument(
        "--resimulate",
        action="store_true",
        help="with --from: run the simulator's side again (today's model) against the saved emulator runs",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="run the simulator's flat-out vCPUs at the paces the emulator measured (guest.sim-speeds) "
        "rather than its own table, which assumes a host core per vCPU",
    )
    _add_common(p, "each scenario's `policies`", engine=False)
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    if args.resimulate and not args.saved:
        raise ScenarioError("--resimulate needs --from DIR (a validate directory with saved emulator runs)")
    if args.saved:
        if args.calibrate and not args.resimulate:
            raise ScenarioError("--calibrate with --from needs --resimulate (it changes the simulator's runs)")
        doc = validate.rebuild(
            args.saved, sys.argv[1:], resimulate=args.resimulate, calibrate=args.calibrate, progress=not args.quiet
        )
        print(validate.text(doc))
        return 0
    names = args.scenarios or scenario.builtin_names()
    scenarios = [_scenario(n, args.set) for n in names]
    out = _out_dir(args, "validate")
    doc = validate.run(
        scenarios,
        args.policies,
        args.repeat,
        argv=sys.argv[1:],
        out=out,
        progress=not args.quiet,
        calibrate=args.calibrate,
    )
    print(validate.text(doc))
    print(f"\nwritten to {out}/ (validation.md, validation.json, <scenario>/emu.json and sim.json)")
    return 0


# -- report --------------------------------------------------------------------------------------


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="redraw figures, tables and the HTML page from a saved results.json",
        description="Redraw a report (tables, PNG figures, index.html) from saved results without rerunning.",
    )
    p.add_argument("results", type=Path, metavar="RESULTS", help="a results.json or a report directory")
    p.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: beside RESULTS)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    doc = results.load(args.results)
    out = args.out or (args.results if args.results.is_dir() else args.results.parent)
    check_dir(out, "--out")
    return _finish(doc, out)
