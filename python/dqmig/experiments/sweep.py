"""Sweeps: one scenario across the values of one parameter, under several policies, repeated.

guestperf-style: every (value, policy) point runs `repeat` times with seeds seed, seed+1, ...
and reports the median and min-max. Repetitions are the outer loop, so a change in the
machine's load during a long sweep spreads over all points instead of biasing a few.

Named sweeps change the guest or the network in ways a single parameter cannot:
dirty-rate (writers' rate as a multiple of the bandwidth: the convergence cliff) and skew
(how many vCPUs share the same total dirty rate). `--param NAME` sweeps any migration
parameter by QEMU's name.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dqmig.experiments import cluster, metrics, results
from dqmig.experiments.scenario import Scenario, ScenarioError
from dqmig.experiments.scenario import parse as parse_scenario
from dqmig.migration.params import PARAMS, parse_bandwidth, value_of
from dqmig.programs import classify
from dqmig.units import MiB

RATE_KINDS = ("uniform", "hot-cold", "sequential")  # writers whose pace is a steps/s rate


@dataclass(frozen=True)
class Sweep:
    name: str
    field: str  # what changes, as a scenario field or a parameter name
    axis: str  # the x-axis label
    defaults: tuple[str, ...]
    parse: Callable[[str], Any]
    apply: Callable[[Scenario, Any], Scenario]
    x: Callable[[Any], float] = float  # the value as a number on the x axis
    log: bool = False
    policies: tuple[str, ...] = ()  # the policies it is about (default: the scenario's)
    help: str = ""


# -- changing the scenario -----------------------------------------------------------------------


def _writers(s: Scenario) -> list[int]:
    """vCPUs running a writer whose pace is a steps/s rate (uniform, hot-cold, sequential)."""
    programs = s.vm_config().programs
    return [i for i, p in enumerate(programs) if classify(p) == "writer" and p.kind in RATE_KINDS]


def _dirty_rate(s: Scenario, ratio: float) -> Scenario:
    """Writers dirty `ratio` x max-bandwidth in total (nominal: one new page per step)."""
    if not ratio > 0:
        raise ScenarioError(f"dirty-rate {ratio}: must be > 0 (a writer rate of 0 would mean flat out)")
    writers = _writers(s)
    if not writers or any(i < len(s.guest.programs) for i in writers):
        raise ScenarioError(f"{s.source}: dirty-rate sweep needs writers from guest.workload, not guest.programs")
    bandwidth = s.migration_parameters("none").max_bandwidth
    if not bandwidth:
        raise ScenarioError(f"{s.source}: dirty-rate sweep needs a max-bandwidth (not 0 = unlimited)")
    return s.with_value("guest.writer-rate", ratio * bandwidth / s.guest.page_size / len(writers))


def _skew(s: Scenario, writers: int) -> Scenario:
    """`writers` vCPUs share the scenario's total writer rate; the rest are read-mostly."""
    if not 1 <= writers <= s.guest.vcpus:
        raise ScenarioError(f"{s.source}: skew {writers}: must be 1..{s.guest.vcpus} writer vCPUs")
    programs = s.vm_config().programs
    base = [programs[i] for i in _writers(s)]
    if not base:
        raise ScenarioError(f"{s.source}: skew sweep needs a rate-limited writer in guest.workload")
    rate = sum(p.rate for p in base) / writers
    specs = [f"{base[0].kind}:rate={rate:g}"] * writers + ["read-mostly"] * (s.guest.vcpus - writers)
    return s.with_value("guest.programs", specs)


def _parameter(name: str) -> Callable[[Scenario, Any], Scenario]:
    return lambda s, v: s.with_parameter(name, v)


def _field(field: str) -> Callable[[Scenario, Any], Scenario]:
    return lambda s, v: s.with_value(field, v)


def _number(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise ScenarioError(f"sweep value {text!r} is not a number") from None

    return parse


def _param_value(name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return value_of(name, text)
        except ValueError as e:
            raise ScenarioError(f"sweep value {text!r}: {e}") from None

    return parse


def _bool_x(v: Any) -> float:
    return float(v) if not isinstance(v, bool) else (1.0 if v else 0.0)


SWEEPS: dict[str, Sweep] = {
    s.name: s
    for s in (
        Sweep(
            "bandwidth",
            "max-bandwidth",
            "max-bandwidth (log scale)",  # ticks show the values as given; positions in MiB/s
            ("100Mbit", "1Gbit", "10Gbit"),
            parse_bandwidth,
            _parameter("max-bandwidth"),
            x=lambda v: v / MiB,
            log=True,
            help="network bandwidth, e.g. 100Mbit,1Gbit,10Gbit",
        ),
        Sweep(
            "dirty-rate",
            "guest.writer-rate",
            "writers' dirty rate / bandwidth",
            ("0.5", "1", "1.5", "2"),
            _number(float),
            _dirty_rate,
            help="the writers' total rate as a multiple of max-bandwidth: the convergence cliff",
        ),
        Sweep(
            "dq-interval",
            "x-dirty-quota-interval",
            "x-dirty-quota-interval (ms)",
            ("2", "10", "50", "200"),
            _number(int),
            _parameter("x-dirty-quota-interval"),
            log=True,
            policies=("dirty-quota",),
            help="dirty-quota interval in ms",
        ),
        Sweep(
            "dq-window",
            "x-dirty-quota-window",
            "x-dirty-quota-window (ms)",
            ("100", "500", "2000"),
            _number(int),
            _parameter("x-dirty-quota-window"),
            log=True,
            policies=("dirty-quota",),
            help="dirty-quota throughput-estimation window in ms",
        ),
        Sweep(
            "dl-period",
            "x-vcpu-dirty-limit-period",
            "x-vcpu-dirty-limit-period (ms)",
            ("100", "300", "500", "1000"),
            _number(int),
            _parameter("x-vcpu-dirty-limit-period"),
            policies=("dirty-limit",),
            help="dirty-limit measuring period in ms",
        ),
        Sweep(
            "dl-limit",
            "vcpu-dirty-limit",
            "vcpu-dirty-limit (MB/s)",
            ("1", "8", "32"),
            _number(int),
            _parameter("vcpu-dirty-limit"),
            log=True,
            policies=("dirty-limit",),
            help="dirty-limit per-vCPU limit in MB/s",
        ),
        Sweep(
            "ring",
            "guest.dirty-ring",
            "dirty ring entries per vCPU",
            ("1024", "4096", "16384"),
            _number(int),
            _field("guest.dirty-ring"),
            log=True,
            help="dirty ring size (KVM dirty-ring-size)",
        ),
        Sweep(
            "vcpus",
            "guest.vcpus",
            "vCPUs",
            ("1", "2", "4"),
            _number(int),
            _field("guest.vcpus"),
            help="vCPU count (the preset gives each its program)",
        ),
        Sweep(
            "skew",
            "guest.programs",
            "writer vCPUs (same total dirty rate)",
            ("1", "2"),
            _number(int),
            _skew,
            help="how many vCPUs share the writers' total rate; the others are read-mostly",
        ),
    )
}


def param_sweep(name: str) -> Sweep:
    """A sweep of any migration parameter, by QEMU's name."""
    name = name.replace("_", "-")
    if name not in PARAMS:
        raise ScenarioError(f"--param: unknown migration parameter {name!r}")
    is_bool = PARAMS[name].kind is bool
    doc = PARAMS[name].doc
    axis = f"{name} ({doc})" if doc and len(doc) <= 8 else name
    return Sweep(name, name, axis, ("off", "on") if is_bool else (), _param_value(name), _parameter(name), x=_bool_x)


# -- running -------------------------------------------------------------------------------------


def prepare(base: Scenario, sweep: Sweep, values: list[str], policies: list[str]) -> list[Scenario]:
    """The scenario at every value, all validated before anything runs."""
    if not values:
        raise ScenarioError(f"sweep {sweep.name}: no values given (--values)")
    points = [sweep.apply(base, sweep.parse(v)) for v in values]
    for p in points:
        p.check_policies(policies)
    return points


def tasks(
    base: Scenario, points: list[Scenario], policies: list[str], repeat: int, sweep_id: str
) -> list[cluster.Task]:
    """Every (repetition, point, policy), repetitions outermost (see the module's doc)."""
    return [
        cluster.Task(i, policy, rep, scenario.to_dict(), base.seed + rep, sweep_id)
        for rep in range(repeat)
        for i, scenario in enumerate(points)
        for policy in policies
    ]


def run(
    base: Scenario,
    sweep: Sweep,
    values: list[str],
    policies: list[str],
    repeat: int,
    *,
    argv: list[str],
    progress: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    journal: Path | None = None,
    cluster_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Runs every (repetition, value, policy); returns the results document. Each finished
    run goes to `journal` (JSON lines) before anything else, so `resume` can finish it."""
    points = prepare(base, sweep, values, policies)
    doc = results.new("sweep", base.to_dict(), policies, argv)
    parsed = [sweep.parse(v) for v in values]
    doc["sweep"] = {
        "name": sweep.name,
        "field": sweep.field,
        "axis": sweep.axis,
        "log": sweep.log,
        "values": [v if isinstance(v, int | float | bool) else str(v) for v in parsed],
        "x": [sweep.x(v) for v in parsed],
        "labels": list(values),
        "repeat": repeat,
        "scenarios": [p.to_dict() for p in points],
    }
    return run_points(doc, base, points, policies, repeat, progress, on_run, journal, cluster_address, workers)


def run_points(
    doc: dict[str, Any],
    base: Scenario,
    points: list[Scenario],
    policies: list[str],
    repeat: int,
    progress: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    journal: Path | None = None,
    cluster_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Runs every (repetition, point, policy) of a sweep or grid whose `doc` is ready. A
    journal that exists already belongs to another sweep: refused, not appended to."""
    if journal is not None and journal.exists():
        raise ScenarioError(f"{journal} exists: that directory holds a sweep (--resume {journal.parent}), use another")
    doc["sweep"]["id"] = uuid.uuid4().hex[:12]
    todo = tasks(base, points, policies, repeat, doc["sweep"]["id"])
    return _execute(doc, todo, progress, on_run, journal, cluster_address, workers)


def resume(
    doc: dict[str, Any],
    journal: Path,
    *,
    progress: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    cluster_address: str | None = None,
    workers: int | None = None,
) -> dict[str, Any]:
    """Finishes an interrupted sweep: the runs in `journal` count as done (each once), and
    only the missing (point, policy, repetition) run."""
    sw = doc["sweep"]
    points = [parse_scenario(s, f"sweep point {i}") for i, s in enumerate(sw["scenarios"])]
    base = parse_scenario(doc["scenario"], "the sweep's scenario")
    sw.setdefault("id", uuid.uuid4().hex[:12])  # a sweep saved before ids: its journal is its own
    every = tasks(base, points, doc["policies"], sw["repeat"], sw["id"])
    keys = {t.key for t in every}
    done = {_key(r): r for r in read_journal(journal) if r.get("sweep-id", sw["id"]) == sw["id"] and _key(r) in keys}
    _end_line(journal)
    doc["runs"] = list(done.values())
    todo = [t for t in every if t.key not in done]
    return _execute(doc, todo, progress, on_run, journal, cluster_address, workers)


def _key(run: dict[str, Any]) -> tuple[Any, Any, Any]:
    return (run.get("point"), run.get("policy"), run.get("repeat"))


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The runs a sweep's journal holds; a last line cut short by an interruption is skipped."""
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        try:
            runs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return runs


def _end_line(path: Path) -> None:
    """Ends a last line an interruption cut short, so the next run starts a line of its own."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _execute(
    doc: dict[str, Any],
    todo: list[cluster.Task],
    progress: bool,
    on_run: Callable[[dict[str, Any]], None] | None,
    journal: Path | None,
    cluster_address: str | None,
    workers: int | None,
) -> dict[str, Any]:
    doc["failed"] = []  # runs that raised or lost their worker on every attempt: --resume reruns them
    if on_run:
        on_run(doc)  # saved before any run: an interruption leaves a sweep to resume
    total = len(doc["runs"]) + len(todo)
    name = doc["sweep"]["name"]
    running = [0]
    with tqdm(total=total, initial=len(doc["runs"]), desc=f"sweep {name}", unit="run", disable=not progress) as bar:

        def show() -> None:
            bar.set_postfix_str(f"running {running[0]}, failed {len(doc['failed'])}")

        def state(now: int) -> None:
            running[0] = now
            show()

        def finished(result: dict[str, Any]) -> None:
            result["sweep-id"] = doc["sweep"]["id"]
            if journal is not None:
                journal.parent.mkdir(parents=True, exist_ok=True)
                with journal.open("a") as f:
                    f.write(json.dumps(result, allow_nan=False) + "\n")
            doc["runs"].append(result)
            bar.update()
            if on_run:
                on_run(doc)

        def failed(task: cluster.Task, reason: str) -> None:
            doc["failed"].append({"point": task.point, "policy": task.policy, "repeat": task.repeat, "error": reason})
            show()
            bar.update()

        try:
            cluster.run_tasks(todo, finished, failed, cluster=cluster_address, workers=workers, on_state=state)
        except cluster.ClusterError as e:
            kept = journal is not None and bool(doc["runs"])
            where = f": `dqmig sweep --resume {journal.parent}` runs what is missing" if kept else ""
            raise cluster.ClusterError(f"{e}{where}") from None
    doc["runs"].sort(key=lambda r: (r["repeat"], r["point"], doc["policies"].index(r["policy"])))
    return doc


# -- summarising ---------------------------------------------------------------------------------


def summarize(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (value, policy): how many converged, and median/min-max of each measure.

    Runs that did not converge count with the time they were given (the cap), so a point's
    total time is then a lower bound; `converged` < `runs` says so."""
    sw = doc["sweep"]
    out = []
    for i, label in enumerate(sw["labels"]):
        for policy in doc["policies"]:
            runs = [r for r in doc["runs"] if r["point"] == i and r["policy"] == policy]
            out.append(
                {
                    "point": i,
                    "label": label,
                    "x": sw["x"][i],
                    "policy": policy,
                    "runs": len(runs),
                    "converged": sum(r["converged"] for r in runs),
                    "total-time": metrics.spread([r["total-time"] for r in runs]),
                    "downtime": metrics.spread([r["downtime"] for r in runs]),
                    "slowdown-writer": metrics.spread([r["slowdown"].get("writer") for r in runs]),
                    "slowdown-reader": metrics.spread([r["slowdown"].get("reader") for r in runs]),
                    "net-slowdown-writer": metrics.spread([r.get("net-slowdown", {}).get("writer") for r in runs]),
                    "net-slowdown-reader": metrics.spread([r.get("net-slowdown", {}).get("reader") for r in runs]),
                    "fairness": metrics.spread([r["fairness"] for r in runs]),
                    "load": metrics.spread([_host(r, "load-after", 0) for r in runs]),
                    "steal": metrics.spread([_host(r, "steal") for r in runs]),
                    "cap": _cap(runs),
                }
            )
    return out


def _host(run: dict[str, Any], key: str, index: int | None = None) -> float | None:
    """A host fact of the run (None for results saved before runs recorded it)."""
    value = (run.get("host") or {}).get(key)
    return value[index] if index is not None and value is not None else value


def _cap(runs: list[dict[str, Any]]) -> float | None:
    """x-max-time of these runs in ms, if they had one."""
    caps = [r.get("parameters", {}).get("x-max-time") for r in runs]
    caps = [c for c in caps if c]
    return max(caps) * 1000 if caps else None
